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

    /// The last forward's input (kept by reference, as arrays are) and shape, for `backward`.
    private var saved: (x: [Scalar], shape: NormalizationShape)?
    /// What the last forward left for its backward; reused from call to call.
    private var context = UnsafeMutableBufferPointer<Double>(start: nil, count: 0)
    /// The engine takes raw pointers: parameters, buffers and gradients are copied here for a call, and what
    /// the call changed is copied back only if it succeeded.
    private var staging = UnsafeMutableBufferPointer<Scalar>(start: nil, count: 0)
    private var counter = UnsafeMutablePointer<Int64>.allocate(capacity: 1)

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
        staging = .allocate(capacity: 6 * C + 2 * G)
    }

    deinit {
        context.deallocate()
        staging.deallocate()
        counter.deallocate()
    }

    /// Normalizes `x` of logical shape `shape` ([B, C, *], in memory as `format` says); in training also
    /// updates the running buffers. The output has x's memory layout.
    /// - Throws: `BCNError` (and changes nothing) for a bad shape, degenerate statistics, or NaN with `.raise`.
    public func forward(_ x: [Scalar], shape: [Int], format: MemoryFormat = .channelsFirst) throws(BCNError)
        -> [Scalar]
    {
        let s = try NormalizationShape(dimensions: shape, format: format)
        guard x.count == s.count else {
            throw BCNError(.shapeMismatch, "input has \(x.count) elements, shape \(shape) needs \(s.count)")
        }
        try checkParameterSizes()
        guard let length = NormalizationContext.length(batch: s.batch, channels: s.channels, groups: plan.groups)
        else { throw BCNError(.invalidArgument, "input shape \(shape) is too large") }
        // A larger context replaces the old one only once the forward succeeded: a failed call keeps the last
        // forward differentiable.
        let target = context.count >= length ? context : .allocate(capacity: length)
        let C = bnWeight.count, G = weight.count, p = staging.baseAddress!
        for (offset, values) in [(0, bnWeight), (C, bnBias), (2 * C, runningMean), (3 * C, runningVar),
                                 (4 * C, weight), (4 * C + G, bias)] {
            for i in values.indices { p[offset + i] = values[i] }
        }
        counter.pointee = numBatchesTracked
        let state = NormalizationState<Scalar>(
            bnWeight: p, bnBias: p + C, runningMean: p + 2 * C, runningVar: p + 3 * C,
            numBatchesTracked: counter, cnWeight: p + 4 * C, cnBias: p + 4 * C + G)
        var y = [Scalar](repeating: 0, count: s.count)
        var failure: BCNError?
        x.withUnsafeBufferPointer { xb in
            y.withUnsafeMutableBufferPointer { yb in
                do throws(BCNError) {
                    try NormalizationEngine.forward(plan: plan, shape: s, training: training, x: xb.baseAddress!,
                                                    y: yb.baseAddress!, state: state, context: target)
                } catch { failure = error }
            }
        }
        if let failure {
            if target.baseAddress != context.baseAddress { target.deallocate() }
            throw failure
        }
        if target.baseAddress != context.baseAddress {
            context.deallocate()
            context = target
        }
        runningMean = Array(UnsafeBufferPointer(start: p + 2 * C, count: C))
        runningVar = Array(UnsafeBufferPointer(start: p + 3 * C, count: C))
        numBatchesTracked = counter.pointee
        saved = (x, s)
        return y
    }

    /// Gradient with respect to the input of the last forward (same memory layout); adds the parameter
    /// gradients.
    public func backward(_ dy: [Scalar]) throws(BCNError) -> [Scalar] {
        guard let saved else { throw BCNError(.noForward, "backward() called before any forward()") }
        guard dy.count == saved.x.count else {
            throw BCNError(.shapeMismatch, "dy has \(dy.count) elements, the last forward's output has \(saved.x.count)")
        }
        let C = gradBnWeight.count, G = gradWeight.count, g = staging.baseAddress!
        for (offset, values) in [(0, gradBnWeight), (C, gradBnBias), (2 * C, gradWeight), (2 * C + G, gradBias)] {
            for i in values.indices { g[offset + i] = values[i] }
        }
        let gradients = NormalizationGradients(bnWeight: g, bnBias: g + C, cnWeight: g + 2 * C,
                                               cnBias: g + 2 * C + G)
        var dx = [Scalar](repeating: 0, count: dy.count)
        var failure: BCNError?
        saved.x.withUnsafeBufferPointer { xb in
            dy.withUnsafeBufferPointer { dyb in
                dx.withUnsafeMutableBufferPointer { dxb in
                    do throws(BCNError) {
                        try NormalizationEngine.backward(plan: plan, shape: saved.shape, x: xb.baseAddress!,
                                                         dy: dyb.baseAddress!, dx: dxb.baseAddress!,
                                                         gradients: gradients, context: UnsafeBufferPointer(context))
                    } catch { failure = error }
                }
            }
        }
        if let failure { throw failure }
        gradBnWeight = Array(UnsafeBufferPointer(start: g, count: C))
        gradBnBias = Array(UnsafeBufferPointer(start: g + C, count: C))
        gradWeight = Array(UnsafeBufferPointer(start: g + 2 * C, count: G))
        gradBias = Array(UnsafeBufferPointer(start: g + 2 * C + G, count: G))
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
