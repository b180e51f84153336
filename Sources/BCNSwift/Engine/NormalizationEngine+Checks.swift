/// What every phase checks before it writes anything.
extension NormalizationEngine {
    /// A valid plan for this shape, and a view of a context buffer long enough for it.
    static func checkedContext(plan: NormalizationPlan, shape: NormalizationShape,
                               _ buffer: UnsafeMutableBufferPointer<Double>) throws(BCNError) -> NormalizationContext {
        try plan.validate()
        guard shape.channels == plan.channels else {
            throw BCNError(.shapeMismatch, "input has \(shape.channels) channels but the layer has \(plan.channels)")
        }
        guard let ctx = NormalizationContext(buffer, shape: shape, groups: plan.groups) else {
            let needed = NormalizationContext.length(batch: shape.batch, channels: shape.channels, groups: plan.groups)
            throw BCNError(.invalidArgument,
                           "context holds \(buffer.count) values, "
                           + "this shape needs \(needed.map(String.init) ?? "too many")")
        }
        return ctx
    }

    static func checkState<T>(plan: NormalizationPlan, state: NormalizationState<T>) throws(BCNError) {
        if plan.batchNorm != nil, state.bnWeight == nil || state.bnBias == nil || state.runningMean == nil
            || state.runningVar == nil || state.numBatchesTracked == nil {
            throw nullPointers("a batch-norm", [("bn_weight", state.bnWeight == nil), ("bn_bias", state.bnBias == nil),
                                                ("running_mean", state.runningMean == nil),
                                                ("running_var", state.runningVar == nil),
                                                ("num_batches_tracked", state.numBatchesTracked == nil)])
        }
        if plan.channelNorm != nil, state.cnWeight == nil || state.cnBias == nil {
            throw nullPointers("a channel-norm",
                               [("cn_weight", state.cnWeight == nil), ("cn_bias", state.cnBias == nil)])
        }
    }

    /// The error for the null pointers among `pointers` (name, is null) of a stage the plan has, named as the C
    /// ABI names them: null pointers come from there.
    private static func nullPointers(_ stage: String, _ pointers: [(String, Bool)]) -> BCNError {
        BCNError(.invalidArgument, pointers.filter(\.1).map(\.0).joined(separator: ", ")
                                   + " must not be null: the plan has \(stage) stage")
    }

    /// A cumulative average (momentum nil) weighs each update by 1/num_batches_tracked, the count it advances: a
    /// negative count, or one about to wrap, would leave the running buffers NaN or wrong without a word. With a
    /// momentum the count only counts, as PyTorch's does (a negative one advances too).
    static func checkCount<T>(plan: NormalizationPlan, state: NormalizationState<T>,
                              updating: Bool) throws(BCNError) {
        guard updating, let bn = plan.batchNorm, bn.momentum == nil, let count = state.numBatchesTracked else { return }
        guard count.pointee >= 0, count.pointee < Int64.max else {
            throw BCNError(.invalidArgument, "num_batches_tracked must count batches (0 to 2^63 - 2) for a "
                                             + "cumulative average, got \(count.pointee)")
        }
    }

    /// A channel group of one value per sample has no variance to normalize by.
    static func checkGroups(plan: NormalizationPlan, shape: NormalizationShape) throws(BCNError) {
        if let cn = plan.channelNorm, (shape.channels / cn.groups) * shape.spatial == 1 {
            throw BCNError(.degenerateStatistics,
                           "Expected more than 1 value per channel group, got \(shape.channels / cn.groups) "
                           + "channel(s) per group and spatial size \(shape.spatial)")
        }
    }

    /// Training statistics of one value per channel are undefined (batch statistics) or have no unbiased
    /// variance; PyTorch words the first the same way.
    static func checkDegenerate(plan: NormalizationPlan, shape: NormalizationShape, training: Bool) throws(BCNError) {
        try checkGroups(plan: plan, shape: shape)
        if let bn = plan.batchNorm, training, shape.batch * shape.spatial == 1 {
            try degenerate(bn, values: 1,
                           dims: "input of size [\(shape.batch), \(shape.channels), \(shape.spatial)] ([B, C, S])")
        }
    }

    static func degenerate(_ bn: BatchNormOptions, values: Double, dims: String) throws(BCNError) {
        if bn.statistics == .batch {
            throw BCNError(.degenerateStatistics, "Expected more than 1 value per channel when training, got \(dims)")
        }
        if bn.unbiasedRunningVariance {
            throw BCNError(.degenerateStatistics,
                           "an unbiased running variance needs more than 1 value per channel, got \(dims)")
        }
    }

    /// Moments handed to phase (c) must be moments (a count that is a whole number from 1 up, an M2 not below 0: a
    /// NaN M2 passes, for the NaN policy to judge), the same count in every channel, and as many values as
    /// training needs.
    static func checkBatchMoments(_ bn: BatchNormOptions, _ batch: UnsafePointer<Moments>,
                                  channels: Int) throws(BCNError) {
        func counted(_ n: Double) -> String { n == n.rounded() && n.magnitude < 0x1p63 ? "\(Int64(n))" : "\(n)" }
        let n = batch[0].count
        for c in 0..<channels {
            let count = batch[c].count
            guard count >= 1, count.isFinite, count == count.rounded() else {
                throw BCNError(.invalidArgument, "batch moments of channel \(c) count \(counted(count)) values: "
                                                 + "a count must be a whole number from 1 up")
            }
            guard count == n else {
                throw BCNError(.invalidArgument, "batch moments of channel \(c) count \(counted(count)) values and "
                                                 + "channel 0's \(counted(n)): every channel counts the same values")
            }
            guard !(batch[c].m2 < 0) else {
                throw BCNError(.invalidArgument, "batch moments of channel \(c) have M2 \(batch[c].m2): "
                                                 + "a sum of squared deviations cannot be negative")
            }
        }
        if n == 1 { try degenerate(bn, values: n, dims: "1 value per channel over the whole batch") }
    }

    /// With `.raise`, batch moments (from phase (a), or merged from other processes) that hold NaN or infinity.
    static func checkFiniteMoments(plan: NormalizationPlan, _ batch: UnsafePointer<Moments>,
                                   channels: Int) throws(BCNError) {
        guard plan.nanPolicy == .raise,
              let c = (0..<channels).first(where: { !batch[$0].mean.isFinite || !batch[$0].m2.isFinite })
        else { return }
        throw BCNError(.nonFinite, "batch moments of channel \(c) hold NaN or infinity")
    }

    /// With `.raise`, the backward's batch gradient sums ([S₁ | S₂], 2·C; merged from other processes, say) that
    /// hold NaN or infinity, as `checkFiniteMoments` refuses the forward's.
    static func checkFiniteSums(plan: NormalizationPlan, _ sums: UnsafePointer<Double>,
                                channels: Int) throws(BCNError) {
        guard plan.nanPolicy == .raise, let i = (0..<2 * channels).first(where: { !sums[$0].isFinite }) else { return }
        throw BCNError(.nonFinite, "batch gradient sums of channel \(i % channels) hold NaN or infinity")
    }

    /// With `.raise`, the first NaN or infinity in x (in memory order) as an error naming its sample and channel;
    /// `what` names the tensor (the forward's input; the backward's dy).
    static func checkFinite<T: NormalizationScalar>(plan: NormalizationPlan, shape: NormalizationShape,
                                                    _ x: UnsafePointer<T>, what: String = "input") throws(BCNError) {
        guard plan.nanPolicy == .raise, let i = T._firstNonFinite(x, count: shape.count) else { return }
        let C = shape.channels, S = shape.spatial
        let (b, c) = shape.format == .channelsLast ? (i / (S * C), i % C) : (i / (S * C), (i / S) % C)
        throw BCNError(.nonFinite, "\(what) holds NaN or infinity (channel \(c) of sample \(b))")
    }
}
