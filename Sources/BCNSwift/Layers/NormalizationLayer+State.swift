/// What a layer learns and tracks besides its plan: its parameters and running buffers, as one value to keep,
/// compare, encode (`Codable`) and load into a layer of the same plan (`NormalizationLayer.load(_:)`). (The
/// engine's raw-pointer view of the same arrays is `NormalizationState`.)
///
/// Each field is the layer's property of the same name, and `Codable` keys them by these Swift names. Their
/// PyTorch state-dict keys, as the authors' modules and bcnswift's Python layers write them:
/// - `BatchChannelNorm`: `bnWeight` `bn.weight`, `bnBias` `bn.bias`, `runningMean` `bn.running_mean`,
///   `runningVar` `bn.running_var`, `numBatchesTracked` `bn.num_batches_tracked`; `weight`, `bias` the channel
///   norm's `weight`, `bias` (G values, shaped (1, G, 1) there);
/// - `BatchNorm`, `EstimatedBatchNorm`: the same without `bn.` (`bnWeight` is `weight`);
/// - `ChannelNorm`: `weight`, `bias`.
/// The authors' EstBN also writes `bn.estbn_moving_speed`: that is the momentum, part of the plan, not of the
/// state. A layer without a stage has empty arrays for it. Gradients are not state.
///
/// `==` compares values as IEEE numbers: a state holding NaN (running buffers after a NaN input, under the default
/// `.propagate`) is not equal to itself. Foundation's `JSONEncoder` refuses NaN and infinity unless given a
/// `nonConformingFloatEncodingStrategy`.
public struct NormalizationLayerState<Scalar: NormalizationScalar>: Hashable, Sendable, Codable {
    /// The batch-norm stage's γ, C values (empty without that stage).
    public var bnWeight: [Scalar]
    /// The batch-norm stage's β, C values (empty without that stage).
    public var bnBias: [Scalar]
    /// The running estimate of each channel's mean, C values (empty without that stage).
    public var runningMean: [Scalar]
    /// The running estimate of each channel's variance, C values (empty without that stage).
    public var runningVar: [Scalar]
    /// Training forwards counted: 0 to 2^63 - 1, and below 2^63 - 1 for a cumulative average (momentum nil),
    /// which advances it. (The authors' EstBN convention, `varianceCentre: .runningMean`, does not, unless
    /// momentum is nil.)
    public var numBatchesTracked: Int64
    /// The channel-norm stage's per-group w, G values (empty without that stage).
    public var weight: [Scalar]
    /// The channel-norm stage's per-group b, G values (empty without that stage).
    public var bias: [Scalar]

    /// A state of these arrays; `validate(for:)` (which `load` runs) checks their sizes against a plan.
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
    /// each of the channel norm's (none where the plan has no such stage), and a count of batches in range
    /// (`numBatchesTracked`): 0 to 2^63 - 2 for a cumulative average, as the next training forward checks it, and
    /// 0 to 2^63 - 1 with a momentum. There training only advances the count it holds, a negative one set by hand
    /// too, as PyTorch's does; loading refuses a negative count, which PyTorch would take.
    /// - Throws: `.shapeMismatch` naming the first array of another size; `.invalidArgument` for the count.
    public func validate(for plan: NormalizationPlan) throws(BCNError) {
        try checkSizes(for: plan)
        let cumulative = plan.batchNorm.map { $0.momentum == nil } ?? false
        guard numBatchesTracked >= 0, !cumulative || numBatchesTracked < Int64.max else {
            throw BCNError(.invalidArgument, "numBatchesTracked must count batches (0 to 2^63 - "
                                             + (cumulative ? "2 for a cumulative average" : "1")
                                             + "), got \(numBatchesTracked)")
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
        inTurn { stateInTurn }
    }

    /// `state`, for a caller already in the layer's turn.
    var stateInTurn: NormalizationLayerState<Scalar> {
        NormalizationLayerState(bnWeight: bnWeight, bnBias: bnBias, runningMean: runningMean, runningVar: runningVar,
                                numBatchesTracked: numBatchesTracked, weight: weight, bias: bias)
    }

    /// Replaces the layer's parameters and running buffers with `state`'s, checked first
    /// (`NormalizationLayerState.validate(for:)`). Gradients, the training flag and the last forward stay: a
    /// backward after a load differentiates the forward before it, with the parameters that forward used.
    /// - Throws: `BCNError` for a state this layer's plan cannot hold; the layer is then unchanged.
    public func load(_ state: NormalizationLayerState<Scalar>) throws(BCNError) {
        try inTurn { () throws(BCNError) in try loadInTurn(state) }
    }

    private func loadInTurn(_ state: NormalizationLayerState<Scalar>) throws(BCNError) {
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
