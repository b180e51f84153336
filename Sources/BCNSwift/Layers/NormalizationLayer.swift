/// A normalization layer that owns its parameters, running buffers and gradients as Swift arrays.
///
/// `BatchChannelNorm`, `BatchNorm`, `EstimatedBatchNorm` and `ChannelNorm` are this class with a given plan.
/// Inputs are flat arrays in C order with a shape [B, C, *]. Not thread-safe: use one layer per thread, or
/// serialize calls yourself.
public class NormalizationLayer<Scalar: NormalizationScalar> {
    public let plan: NormalizationPlan
    /// Training mode: batch statistics (or their estimates) and running-buffer updates. Eval when false.
    public var training = true

    /// Batch-norm stage (C each; empty without that stage).
    public var bnWeight: [Scalar]
    public var bnBias: [Scalar]
    public var runningMean: [Scalar]
    public var runningVar: [Scalar]
    public var numBatchesTracked: Int64 = 0
    /// Channel-norm stage (G each; empty without that stage).
    public var weight: [Scalar]
    public var bias: [Scalar]

    /// Parameter gradients, accumulated by `backward` until `zeroGradients()`; same sizes as the parameters.
    public private(set) var gradBnWeight: [Scalar]
    public private(set) var gradBnBias: [Scalar]
    public private(set) var gradWeight: [Scalar]
    public private(set) var gradBias: [Scalar]

    private var saved: (x: [Scalar], shape: NormalizationShape, context: [Double])?

    public init(plan: NormalizationPlan) throws(BCNError) {
        try plan.validate()
        self.plan = plan
        let C = plan.batchNorm == nil ? 0 : plan.channels, G = plan.groups
        bnWeight = [Scalar](repeating: 1, count: C)
        bnBias = [Scalar](repeating: 0, count: C)
        runningMean = [Scalar](repeating: 0, count: C)
        runningVar = [Scalar](repeating: 1, count: C)
        weight = [Scalar](repeating: 1, count: G)
        bias = [Scalar](repeating: 0, count: G)
        gradBnWeight = [Scalar](repeating: 0, count: C)
        gradBnBias = [Scalar](repeating: 0, count: C)
        gradWeight = [Scalar](repeating: 0, count: G)
        gradBias = [Scalar](repeating: 0, count: G)
    }

    /// Normalizes `x` of shape `shape` ([B, C, *]); in training also updates the running buffers.
    /// - Throws: `BCNError` (and changes nothing) for a bad shape, degenerate statistics, or NaN with `.raise`.
    public func forward(_ x: [Scalar], shape: [Int]) throws(BCNError) -> [Scalar] {
        let s = try NormalizationShape(dimensions: shape)
        guard x.count == s.count else {
            throw BCNError(.shapeMismatch, "input has \(x.count) elements, shape \(shape) needs \(s.count)")
        }
        try checkParameterSizes()
        guard let length = NormalizationContextLayout.length(batch: s.batch, channels: s.channels,
                                                             groups: plan.groups) else {
            throw BCNError(.invalidArgument, "input shape \(shape) is too large")
        }
        // The engine takes raw pointers: parameters and buffers go into one block for the call, and the
        // running buffers come back from it only if the forward succeeds.
        let C = bnWeight.count, G = weight.count
        var block = bnWeight + bnBias + runningMean + runningVar + weight + bias
        var counter = [numBatchesTracked]
        var context = [Double](repeating: 0, count: length)
        var y = [Scalar](repeating: 0, count: s.count)
        try block.withUnsafeMutableBufferPointer { (pb) throws(BCNError) in
            try counter.withUnsafeMutableBufferPointer { (nb) throws(BCNError) in
                try context.withUnsafeMutableBufferPointer { (cb) throws(BCNError) in
                    try y.withUnsafeMutableBufferPointer { (yb) throws(BCNError) in
                        try x.withUnsafeBufferPointer { (xb) throws(BCNError) in
                            let p = pb.baseAddress!
                            let state = NormalizationState<Scalar>(
                                bnWeight: p, bnBias: p + C, runningMean: p + 2 * C, runningVar: p + 3 * C,
                                numBatchesTracked: nb.baseAddress, cnWeight: p + 4 * C, cnBias: p + 4 * C + G)
                            try FusedNormalization.forward(plan: plan, shape: s, training: training,
                                                           x: xb.baseAddress!, y: yb.baseAddress!, state: state,
                                                           context: cb)
                        }
                    }
                }
            }
        }
        runningMean = Array(block[(2 * C)..<(3 * C)])
        runningVar = Array(block[(3 * C)..<(4 * C)])
        numBatchesTracked = counter[0]
        saved = (x, s, context)
        return y
    }

    /// Gradient with respect to the input of the last forward; adds the parameter gradients.
    public func backward(_ dy: [Scalar]) throws(BCNError) -> [Scalar] {
        guard let saved else { throw BCNError(.noForward, "backward() called before any forward()") }
        guard dy.count == saved.x.count else {
            throw BCNError(.shapeMismatch, "dy has \(dy.count) elements, the last forward's output has \(saved.x.count)")
        }
        let C = gradBnWeight.count, G = gradWeight.count
        var grads = gradBnWeight + gradBnBias + gradWeight + gradBias  // accumulated into, as one block
        var dx = [Scalar](repeating: 0, count: dy.count)
        try grads.withUnsafeMutableBufferPointer { (gb) throws(BCNError) in
            try dx.withUnsafeMutableBufferPointer { (dxb) throws(BCNError) in
                try dy.withUnsafeBufferPointer { (dyb) throws(BCNError) in
                    try saved.x.withUnsafeBufferPointer { (xb) throws(BCNError) in
                        try saved.context.withUnsafeBufferPointer { (cb) throws(BCNError) in
                            let g = gb.baseAddress!
                            try FusedNormalization.backward(
                                plan: plan, shape: saved.shape, x: xb.baseAddress!, dy: dyb.baseAddress!,
                                dx: dxb.baseAddress!,
                                gradients: NormalizationGradients(bnWeight: g, bnBias: g + C, cnWeight: g + 2 * C,
                                                                  cnBias: g + 2 * C + G),
                                context: cb)
                        }
                    }
                }
            }
        }
        gradBnWeight = Array(grads[0..<C]); gradBnBias = Array(grads[C..<(2 * C)])
        gradWeight = Array(grads[(2 * C)..<(2 * C + G)]); gradBias = Array(grads[(2 * C + G)..<(2 * C + 2 * G)])
        return dx
    }

    /// Sets every parameter gradient to zero.
    public func zeroGradients() {
        for i in gradBnWeight.indices { gradBnWeight[i] = 0; gradBnBias[i] = 0 }
        for i in gradWeight.indices { gradWeight[i] = 0; gradBias[i] = 0 }
    }

    private func checkParameterSizes() throws(BCNError) {
        let C = plan.batchNorm == nil ? 0 : plan.channels, G = plan.groups
        for (name, count, expected) in [("bnWeight", bnWeight.count, C), ("bnBias", bnBias.count, C),
                                        ("runningMean", runningMean.count, C), ("runningVar", runningVar.count, C),
                                        ("weight", weight.count, G), ("bias", bias.count, G)]
        where count != expected {
            throw BCNError(.shapeMismatch, "\(name) has \(count) elements, expected \(expected)")
        }
    }
}

/// Batch-Channel Normalization: a batch norm (batch statistics, or estimated ones), then a channel norm with
/// a per-group affine, fused into one pass forward and one backward.
public final class BatchChannelNorm<Scalar: NormalizationScalar>: NormalizationLayer<Scalar> {
    /// - Parameters:
    ///   - channels: C > 0. - groups: G > 0 dividing C. - eps: > 0, both stages' eps unless `bnEps` is given.
    ///   - momentum: in [0, 1], or nil for a cumulative average. - estimate: estimated statistics (default).
    ///   - unbiasedRunningVariance: nil picks true with batch statistics, false when estimating.
    ///   - varianceCentre: `.runningMean` is the authors' EstBN.
    public init(channels: Int, groups: Int, eps: Double = 1e-5, momentum: Double? = 0.1, estimate: Bool = true,
                unbiasedRunningVariance: Bool? = nil, varianceCentre: VarianceCentre = .batchMean,
                bnEps: Double? = nil, nanPolicy: NaNPolicy = .propagate) throws(BCNError) {
        try super.init(plan: NormalizationPlan(
            channels: channels,
            batchNorm: BatchNormOptions(statistics: estimate ? .estimated : .batch, eps: bnEps ?? eps,
                                        momentum: momentum, unbiasedRunningVariance: unbiasedRunningVariance,
                                        varianceCentre: varianceCentre),
            channelNorm: ChannelNormOptions(groups: groups, eps: eps), nanPolicy: nanPolicy))
    }
}

/// Batch normalization with batch statistics in training (gradients flow through them).
public final class BatchNorm<Scalar: NormalizationScalar>: NormalizationLayer<Scalar> {
    public init(channels: Int, eps: Double = 1e-5, momentum: Double? = 0.1, unbiasedRunningVariance: Bool = true,
                nanPolicy: NaNPolicy = .propagate) throws(BCNError) {
        try super.init(plan: NormalizationPlan(
            channels: channels,
            batchNorm: BatchNormOptions(statistics: .batch, eps: eps, momentum: momentum,
                                        unbiasedRunningVariance: unbiasedRunningVariance),
            channelNorm: nil, nanPolicy: nanPolicy))
    }
}

/// Batch normalization with estimated statistics: training folds the batch into the running buffers first, then
/// normalizes with them; gradients treat them as constants.
public final class EstimatedBatchNorm<Scalar: NormalizationScalar>: NormalizationLayer<Scalar> {
    public init(channels: Int, eps: Double = 1e-5, momentum: Double? = 0.1, unbiasedRunningVariance: Bool = false,
                varianceCentre: VarianceCentre = .batchMean, nanPolicy: NaNPolicy = .propagate) throws(BCNError) {
        try super.init(plan: NormalizationPlan(
            channels: channels,
            batchNorm: BatchNormOptions(statistics: .estimated, eps: eps, momentum: momentum,
                                        unbiasedRunningVariance: unbiasedRunningVariance,
                                        varianceCentre: varianceCentre),
            channelNorm: nil, nanPolicy: nanPolicy))
    }
}

/// Channel normalization: per sample, statistics over each group of C/G channels, then a per-group affine.
public final class ChannelNorm<Scalar: NormalizationScalar>: NormalizationLayer<Scalar> {
    public init(channels: Int, groups: Int, eps: Double = 1e-5, nanPolicy: NaNPolicy = .propagate) throws(BCNError) {
        try super.init(plan: NormalizationPlan(channels: channels, batchNorm: nil,
                                               channelNorm: ChannelNormOptions(groups: groups, eps: eps),
                                               nanPolicy: nanPolicy))
    }
}
