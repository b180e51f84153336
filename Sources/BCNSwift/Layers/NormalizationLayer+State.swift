/// What a layer learns and tracks besides its plan: its parameters and running buffers, as one value to keep,
/// compare, encode (`Codable`) and load into a layer of the same plan (`NormalizationLayer.load(_:)`).
///
/// Each field is the layer's property of the same name. Their PyTorch state-dict keys, as the authors' `BCNorm`
/// and bcnswift's Python layers write them: `bnWeight` `bn.weight`, `bnBias` `bn.bias`, `runningMean`
/// `bn.running_mean`, `runningVar` `bn.running_var`, `numBatchesTracked` `bn.num_batches_tracked`, and
/// `weight`, `bias` the channel norm's `weight`, `bias` (G values, shaped (1, G, 1) there). A layer without a
/// stage has empty arrays for it. Gradients are not state: a new layer's are zero.
public struct NormalizationLayerState<Scalar: NormalizationScalar>: Equatable, Sendable, Codable {
    /// The batch-norm stage's γ and β, C values each (empty without that stage).
    public var bnWeight: [Scalar]
    public var bnBias: [Scalar]
    /// The running estimates of each channel's mean and variance, C values each (empty without that stage).
    public var runningMean: [Scalar]
    public var runningVar: [Scalar]
    /// Training forwards counted, ≥ 0.
    public var numBatchesTracked: Int64
    /// The channel-norm stage's per-group w and b, G values each (empty without that stage).
    public var weight: [Scalar]
    public var bias: [Scalar]

    public init(bnWeight: [Scalar], bnBias: [Scalar], runningMean: [Scalar], runningVar: [Scalar],
                numBatchesTracked: Int64, weight: [Scalar], bias: [Scalar]) {
        self.bnWeight = bnWeight
        self.bnBias = bnBias
        self.runningMean = runningMean
        self.runningVar = runningVar
        self.numBatchesTracked = numBatchesTracked
        self.weight = weight
        self.bias = bias
    }

    /// Checks that `plan`'s layer can hold this state: C values in each array of the batch-norm stage and G in
    /// each of the channel norm's (none where the plan has no such stage), and a count of batches ≥ 0.
    /// - Throws: `.shapeMismatch` naming the first array of another size; `.invalidArgument` for a negative count.
    public func validate(for plan: NormalizationPlan) throws(BCNError) {
        try checkSizes(for: plan)
        guard numBatchesTracked >= 0 else {
            throw BCNError(.invalidArgument, "numBatchesTracked must be >= 0, got \(numBatchesTracked)")
        }
    }

    /// The sizes `validate(for:)` checks, which every forward checks too (the layer's arrays are public).
    func checkSizes(for plan: NormalizationPlan) throws(BCNError) {
        let C = plan.batchNorm == nil ? 0 : plan.channels, G = plan.groups
        for (name, count, expected) in [("bnWeight", bnWeight.count, C), ("bnBias", bnBias.count, C),
                                        ("runningMean", runningMean.count, C), ("runningVar", runningVar.count, C),
                                        ("weight", weight.count, G), ("bias", bias.count, G)]
        where count != expected {
            throw BCNError(.shapeMismatch, "\(name) has \(count) elements, expected \(expected)")
        }
    }
}

extension NormalizationLayer {
    /// A copy of the layer's parameters and running buffers (arrays are values: later training leaves it as it
    /// is).
    public var state: NormalizationLayerState<Scalar> {
        NormalizationLayerState(bnWeight: bnWeight, bnBias: bnBias, runningMean: runningMean, runningVar: runningVar,
                                numBatchesTracked: numBatchesTracked, weight: weight, bias: bias)
    }

    /// Replaces the layer's parameters and running buffers with `state`'s, checked first
    /// (`NormalizationLayerState.validate(for:)`). Gradients, the training flag and the last forward stay: a
    /// backward after a load differentiates the forward before it, with the parameters that forward used.
    /// - Throws: `BCNError` for a state this layer's plan cannot hold; the layer is then unchanged.
    public func load(_ state: NormalizationLayerState<Scalar>) throws(BCNError) {
        try state.validate(for: plan)
        bnWeight = state.bnWeight
        bnBias = state.bnBias
        runningMean = state.runningMean
        runningVar = state.runningVar
        numBatchesTracked = state.numBatchesTracked
        weight = state.weight
        bias = state.bias
    }
}
