import Synchronization

/// A normalization layer that owns its parameters, running buffers and gradients as Swift arrays.
///
/// `BatchChannelNorm`, `BatchNorm`, `EstimatedBatchNorm` and `ChannelNorm` are this class with a given plan.
/// Inputs are flat arrays in C order with a shape [B, C, *] (or channels-last, `MemoryFormat`).
///
/// Threads: the calls on one layer (`forward`, `backward`, `zeroGradients`, `state`, `load`) take turns, as the
/// Python layers' do, so a layer shared by threads computes what the same calls in some order would (which
/// order, and so which running buffers each forward sees, is the threads' race). Its arrays are plain stored
/// properties: reading or setting them while another thread calls the layer is a data race, as for any class.
/// The class is not `Sendable`, so Swift 6's language mode refuses to share one across threads anyway; separate
/// layers run in parallel freely.
public class NormalizationLayer<Scalar: NormalizationScalar> {
    /// The layer's computation, fixed at creation: its stages and their options.
    public let plan: NormalizationPlan
    /// Training mode: batch statistics (or their estimates) and running-buffer updates. Eval when false.
    public var training = true

    /// The batch-norm stage's affine γ (C values; empty without that stage):
    /// y₁ = γ (x - μ) / √(σ² + eps) + β.
    public var bnWeight: [Scalar]
    /// The batch-norm stage's β (C values; empty without that stage).
    public var bnBias: [Scalar]
    /// Running estimate of each channel's mean (C values; empty without a batch-norm stage): eval normalizes
    /// with it and `runningVar`, and so does training with estimated statistics.
    public var runningMean: [Scalar]
    /// Running estimate of each channel's variance (C values; empty without a batch-norm stage).
    public var runningVar: [Scalar]
    /// Training forwards of inputs with values (PyTorch also counts those without); with momentum nil the update
    /// factor is 1 / this count. The authors' EstBN convention (`varianceCentre: .runningMean`) never advances
    /// it, as their code does not, unless momentum is nil. A count set below 0 is kept and advanced, but
    /// `load` refuses one (`NormalizationLayerState.validate(for:)`).
    public var numBatchesTracked: Int64 = 0
    /// The channel-norm stage's per-group w (G values; empty without that stage): per sample and group,
    /// y = w (y₁ - m) / √(v + eps) + b, with m and v the group's mean and variance. A `BatchNorm`'s or
    /// `EstimatedBatchNorm`'s γ and β are `bnWeight` and `bnBias`; its `weight` and `bias` are empty.
    public var weight: [Scalar]
    /// The channel-norm stage's per-group b (G values; empty without that stage).
    public var bias: [Scalar]

    /// dγ of the batch-norm stage, accumulated by `backward` until `zeroGradients()` (C values, or none).
    public private(set) var gradBnWeight: [Scalar]
    /// dβ of the batch-norm stage, accumulated likewise (C values, or none).
    public private(set) var gradBnBias: [Scalar]
    /// dw of the channel-norm stage, accumulated likewise (G values, or none).
    public private(set) var gradWeight: [Scalar]
    /// db of the channel-norm stage, accumulated likewise (G values, or none).
    public private(set) var gradBias: [Scalar]

    /// Makes the layer's calls take turns (see the class's doc): `context` and `staging` serve one call at a time.
    private let turns = Mutex(())

    /// The last forward's input (kept by reference, as arrays are) and shape, for `backward`.
    private var saved: (x: [Scalar], shape: NormalizationShape?)?  // shape nil: an input without values
    /// What the last forward left for its backward; reused from call to call.
    private var context = UnsafeMutableBufferPointer<Double>(start: nil, count: 0)
    /// The engine takes raw pointers: parameters, buffers and gradients are copied here for a call, and what
    /// the call changed is copied back only if it succeeded.
    private var staging = UnsafeMutableBufferPointer<Scalar>(start: nil, count: 0)
    /// Allocated once init can no longer throw: a throwing init runs no deinit, and would leak it.
    private let counter: UnsafeMutablePointer<Int64>

    /// A layer for `plan`, with the documents' initial values: γ, w = 1; β, b = 0; running mean 0, variance 1.
    /// - Throws: `.invalidArgument` for a plan `validate()` refuses; `.outOfMemory` when its arrays cannot be
    ///   allocated.
    public init(plan: NormalizationPlan) throws(BCNError) {
        try plan.validate()
        self.plan = plan
        let C = plan.batchNorm == nil ? 0 : plan.channels, G = plan.groups
        // ten arrays (6C + 4G values) and the staging block (4C + 2G), which would stop the process if memory
        // ran out; C <= 2^32, so the count cannot overflow
        try requireMemory((10 * C + 6 * G) * MemoryLayout<Scalar>.stride,
                          for: "a layer of \(plan.channels) channels (its parameters, buffers and gradients)")
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
        staging = .allocate(capacity: 4 * C + 2 * G)  // a forward's parameters and buffers, or a backward's gradients
        counter = .allocate(capacity: 1)
        counter.initialize(to: 0)
    }

    deinit {
        context.deallocate()
        staging.deallocate()
        counter.deallocate()
    }

    /// Normalizes `x` of logical shape `shape` ([B, C, *], in memory as `format` says); in training also
    /// updates the running buffers. The output has x's memory layout. An input without values (a batch or a
    /// spatial size of 0) gives an empty output and changes nothing (PyTorch's batch norm leaves its running
    /// statistics too, but counts the call in num_batches_tracked).
    /// - Throws: `BCNError`, and changes nothing: `.shapeMismatch` for a bad shape, an `x` of another count, or
    ///   a parameter or buffer array resized to another count than the plan's; `.invalidArgument` for a shape
    ///   too large, or a count of batches out of range for a cumulative average; `.degenerateStatistics`;
    ///   `.nonFinite` for NaN or infinity in x with `.raise`; `.outOfMemory`.
    public func forward(_ x: [Scalar], shape: [Int], format: MemoryFormat = .channelsFirst) throws(BCNError)
        -> [Scalar]
    {
        try inTurn { () throws(BCNError) in try forwardInTurn(x, shape: shape, format: format) }
    }

    private func forwardInTurn(_ x: [Scalar], shape: [Int], format: MemoryFormat) throws(BCNError) -> [Scalar] {
        if shape.count >= 2, shape.contains(0), shape.allSatisfy({ $0 >= 0 }) {
            guard shape[1] == plan.channels else {
                throw BCNError(.shapeMismatch, "input has \(shape[1]) channels but the layer has \(plan.channels)")
            }
            guard x.isEmpty else {
                throw BCNError(.shapeMismatch, "input has \(x.count) elements, shape \(shape) needs 0")
            }
            try checkParameterSizes()
            saved = (x, nil)
            return []
        }
        let s = try NormalizationShape(dimensions: shape, format: format)
        guard x.count == s.count else {
            throw BCNError(.shapeMismatch, "input has \(x.count) elements, shape \(shape) needs \(s.count)")
        }
        try checkParameterSizes()
        guard let length = NormalizationContext.length(batch: s.batch, channels: s.channels, groups: plan.groups)
        else { throw BCNError(.invalidArgument, "input shape \(shape) is too large") }
        let C = bnWeight.count, G = weight.count, p = staging.baseAddress!
        // the output, the running buffers' new arrays and a larger context, which would stop the process if
        // memory ran out (the engine's own scratch throws by itself)
        let grows = context.count < length
        try requireArrayMemory(arrayBytes(s.count, of: Scalar.self), arrayBytes(2 * C, of: Scalar.self),
                               grows ? arrayBytes(length, of: Double.self) : 0,
                               for: "the output and context of a forward of shape \(shape)")
        // A larger context replaces the old one only once the forward succeeded: a failed call keeps the last
        // forward differentiable.
        let target = grows ? .allocate(capacity: length) : context
        for (offset, values) in [(0, bnWeight), (C, bnBias), (2 * C, runningMean), (3 * C, runningVar),
                                 (4 * C, weight), (4 * C + G, bias)] {
            for i in values.indices { p[offset + i] = values[i] }
        }
        counter.pointee = numBatchesTracked
        let pointers = NormalizationState<Scalar>(
            bnWeight: p, bnBias: p + C, runningMean: p + 2 * C, runningVar: p + 3 * C,
            numBatchesTracked: counter, cnWeight: p + 4 * C, cnBias: p + 4 * C + G)
        var y = [Scalar](repeating: 0, count: s.count)
        var failure: BCNError?
        x.withUnsafeBufferPointer { xb in
            y.withUnsafeMutableBufferPointer { yb in
                do throws(BCNError) {
                    try NormalizationEngine.forward(plan: plan, shape: s, training: training, x: xb.baseAddress!,
                                                    y: yb.baseAddress!, state: pointers, context: target)
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
    /// - Throws: `BCNError` (and changes nothing): `.noForward` before any forward, `.shapeMismatch` for a dy
    ///   of another size than the last forward's output, `.nonFinite` for NaN or infinity in dy with `.raise`,
    ///   `.outOfMemory` when dx or the gradients' arrays cannot be allocated.
    public func backward(_ dy: [Scalar]) throws(BCNError) -> [Scalar] {
        try inTurn { () throws(BCNError) in try backwardInTurn(dy) }
    }

    private func backwardInTurn(_ dy: [Scalar]) throws(BCNError) -> [Scalar] {
        guard let saved else { throw BCNError(.noForward, "backward() called before any forward()") }
        guard dy.count == saved.x.count else {
            throw BCNError(.shapeMismatch,
                           "dy has \(dy.count) elements, the last forward's output has \(saved.x.count)")
        }
        guard let shape = saved.shape else { return [] }  // an input without values: no gradient to add
        let C = gradBnWeight.count, G = gradWeight.count, g = staging.baseAddress!
        // dx and the gradients' new arrays
        try requireArrayMemory(arrayBytes(dy.count, of: Scalar.self), arrayBytes(2 * (C + G), of: Scalar.self),
                               for: "the input gradient of \(dy.count) values")
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
                        try NormalizationEngine.backward(plan: plan, shape: shape, x: xb.baseAddress!,
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
        inTurn {
            for i in gradBnWeight.indices { gradBnWeight[i] = 0; gradBnBias[i] = 0 }
            for i in gradWeight.indices { gradWeight[i] = 0; gradBias[i] = 0 }
        }
    }

    private func checkParameterSizes() throws(BCNError) { try stateInTurn.checkSizes(for: plan) }

    /// `body` in the layer's turn (`turns`).
    func inTurn<Result, Failure: Error>(_ body: () throws(Failure) -> Result) throws(Failure) -> Result {
        try turns.withLock { _ throws(Failure) in try body() }
    }
}

/// Batch-Channel Normalization: a batch norm (batch statistics, or estimated ones), then a channel norm with
/// a per-group affine, fused into one pass forward and one backward.
///
/// y₁ = γ (x - μ) / √(σ² + bnEps) + β per channel (μ, σ² the batch's, or the running estimates), then per
/// sample and group of C/G channels y = w (y₁ - m) / √(v + eps) + b, with m, v the group's mean and
/// (biased) variance.
public final class BatchChannelNorm<Scalar: NormalizationScalar>: NormalizationLayer<Scalar> {
    /// - Parameters:
    ///   - channels: C, in 1...2^32.
    ///   - groups: G > 0, dividing C.
    ///   - eps: > 0 and finite; both stages' unless `bnEps` is given.
    ///   - momentum: the running buffers' update rate, in [0, 1]; nil for a cumulative average (1 / count).
    ///   - estimate: true (the default): training first folds the batch into the running buffers, then
    ///     normalizes with them, held constant for the gradient (labml, the authors' EstBN); false: batch
    ///     statistics, which the gradient flows through (the authors' `nn.BatchNorm2d`).
    ///   - unbiasedRunningVariance: whether the running variance folds in σ² n/(n-1); nil picks true with batch
    ///     statistics and false when estimating, as the documents do.
    ///   - varianceCentre: `.batchMean` (labml), or `.runningMean`: the variance measured around the running mean
    ///     before its update (the authors' EstBN; with `estimate` only).
    ///   - bnEps: the batch-norm stage's eps, > 0 and finite, when it differs from the channel norm's.
    ///   - nanPolicy: `.propagate` (NaN and infinity flow through, as in PyTorch) or `.raise`.
    /// - Throws: `BCNError.invalidArgument` for any value outside those ranges.
    public init(channels: Int, groups: Int, eps: Double = 1e-5, momentum: Double? = 0.1, estimate: Bool = true,
                unbiasedRunningVariance: Bool? = nil, varianceCentre: VarianceCentre = .batchMean,
                bnEps: Double? = nil, nanPolicy: NaNPolicy = .propagate) throws(BCNError) {
        // One eps for both stages: name it as the caller did, not as the first stage to check it would.
        if bnEps == nil { try BCNError.checkEps(eps, named: "eps") }
        try super.init(plan: NormalizationPlan(
            channels: channels,
            batchNorm: BatchNormOptions(statistics: estimate ? .estimated : .batch, eps: bnEps ?? eps,
                                        momentum: momentum, unbiasedRunningVariance: unbiasedRunningVariance,
                                        varianceCentre: varianceCentre),
            channelNorm: ChannelNormOptions(groups: groups, eps: eps), nanPolicy: nanPolicy))
    }
}

/// Batch normalization with batch statistics in training (gradients flow through them):
/// y = γ (x - μ) / √(σ² + eps) + β per channel, μ and σ² the batch's in training and the running ones
/// in eval.
public final class BatchNorm<Scalar: NormalizationScalar>: NormalizationLayer<Scalar> {
    /// - Parameters:
    ///   - channels: C, in 1...2^32.
    ///   - eps: > 0 and finite.
    ///   - momentum: the running buffers' update rate, in [0, 1]; nil for a cumulative average (1 / count).
    ///   - unbiasedRunningVariance: fold σ² n/(n-1) into the running variance (PyTorch) or σ² (labml).
    ///   - nanPolicy: `.propagate` or `.raise`.
    /// - Throws: `BCNError.invalidArgument` for any value outside those ranges.
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
/// normalizes with them; gradients treat them as constants. y = γ (x - μ̂) / √(σ̂² + eps) + β per channel.
public final class EstimatedBatchNorm<Scalar: NormalizationScalar>: NormalizationLayer<Scalar> {
    /// - Parameters:
    ///   - channels: C, in 1...2^32.
    ///   - eps: > 0 and finite.
    ///   - momentum: the estimates' update rate, in [0, 1]; nil for a cumulative average (1 / count).
    ///   - unbiasedRunningVariance: fold σ² n/(n-1) into the running variance, or σ² (both documents: false).
    ///   - varianceCentre: `.batchMean` (labml) or `.runningMean` (the authors' EstBN).
    ///   - nanPolicy: `.propagate` or `.raise`.
    /// - Throws: `BCNError.invalidArgument` for any value outside those ranges.
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

/// Channel normalization: per sample, statistics over each group of C/G channels, then a per-group affine:
/// y = w (x - m) / √(v + eps) + b, with m, v the group's mean and (biased) variance.
public final class ChannelNorm<Scalar: NormalizationScalar>: NormalizationLayer<Scalar> {
    /// - Parameters:
    ///   - channels: C, in 1...2^32.
    ///   - groups: G > 0, dividing C.
    ///   - eps: > 0 and finite.
    ///   - nanPolicy: `.propagate` or `.raise`.
    /// - Throws: `BCNError.invalidArgument` for any value outside those ranges.
    public init(channels: Int, groups: Int, eps: Double = 1e-5, nanPolicy: NaNPolicy = .propagate) throws(BCNError) {
        try super.init(plan: NormalizationPlan(channels: channels, batchNorm: nil,
                                               channelNorm: ChannelNormOptions(groups: groups, eps: eps),
                                               nanPolicy: nanPolicy))
    }
}
