/// The one computation behind every layer (docs/ARCHITECTURE.md): a batch norm, a channel norm, or both fused.
///
/// For x with B samples, C channels, S positions and G groups of K = C/G channels, everything reduces to the
/// moments of each (sample, channel) plane:
/// 1. pass 1 (the layout's): mean p and centred sum of squares q of every plane;
/// 2. [B, C] numbers in Float64 (`BatchNormStage`, `NormalizationUnit`): the batch's moments per channel merged
///    from the planes' (Chan's formula), the running buffers and the batch-norm map y₁ = a (x - μ) + β, then per
///    (sample, group) the moments of y₁ merged from the planes' (means ȳ = a (p - μ) + β, M2 a² q), so the whole
///    layer is out = A (x - p) + M per plane;
/// 3. pass 2 (the layout's): out = A (x - p) + M. Centring on p keeps a constant plane exact.
///
/// The statistics are a phase of their own, so that moments from elsewhere (other processes) can join:
/// (a) `localMoments`: pass 1 and the batch's moments per channel; (b) `mergeMoments`: any number of moment
/// sets, in a fixed order; (c) `finishForward`: running buffers, coefficients, pass 2. `forward` chains them.
/// The backward is split the same way around its per-channel sums (NormalizationEngine+Backward.swift).
///
/// Every phase checks all its arguments before it writes anything; a failure leaves the caller's buffers,
/// running buffers included, exactly as they were.
public enum NormalizationEngine {
    /// Normalizes `x` into `y` and fills `context` for the backward: phases (a) and (c) in one call.
    ///
    /// - Parameters:
    ///   - training: the batch-norm stage uses (and updates) batch statistics as its options say; else running ones.
    ///   - y: may alias `x` when no backward follows (the backward needs x).
    ///   - context: at least `NormalizationContext.length(...)` Doubles.
    /// - Throws: `BCNError` before anything is written if an argument, a pointer or the statistics are invalid.
    // Specialized here because callers in other modules (the C ABI) would otherwise run the generic body, where
    // every Float/Double conversion is a dynamic cast.
    @_specialize(where T == Float)
    @_specialize(where T == Double)
    public static func forward<T: NormalizationScalar>(
        plan: NormalizationPlan, shape: NormalizationShape, training: Bool,
        x: UnsafePointer<T>, y: UnsafeMutablePointer<T>,
        state: NormalizationState<T>, context: UnsafeMutableBufferPointer<Double>
    ) throws(BCNError) {
        let pinned = BCNThreads.pin()  // one thread count for the scratch and the loops
        defer { BCNThreads.unpin(pinned) }
        let ctx = try checkedContext(plan: plan, shape: shape, context)
        try checkState(plan: plan, state: state)
        try checkCount(plan: plan, state: state, updating: training)
        try checkDegenerate(plan: plan, shape: shape, training: training)
        try checkFinite(plan: plan, shape: shape, x)
        let layout = Layout(plan: plan, shape: shape), C = shape.channels
        let batchStatistics = training && plan.batchNorm != nil
        // Short planes keep no moments in the context; a single call keeps phase (a)'s for its phase (c).
        let memoCount = batchStatistics ? layout.momentsMemoCount(T.self, plan: plan) : 0
        // phase (c) reuses phase (a)'s scratch (`ScratchArena.phase`): the moments and the memo come before it
        var arena = try ScratchArena(bytes: (batchStatistics ? ScratchArena.bytes(C, of: Moments.self) : 0)
                                 + ScratchArena.bytes(memoCount, of: Double.self)
                                 + max(localMomentsBytes(layout, T.self, moments: batchStatistics, memo: memoCount > 0),
                                       finishBytes(layout, T.self, plan: plan)))
        let moments = batchStatistics ? arena.take(C, of: Moments.self) : nil
        let memo = memoCount > 0 ? arena.take(memoCount, of: Double.self) : nil
        // Without batch statistics no plane's map waits for the whole batch: each unit's planes are measured
        // and mapped while they are in cache (one read of x from memory instead of two; the same bits).
        let fused = !batchStatistics && layout.measuresPerUnit
        if !fused {
            arena.phase { localMoments(layout, plan: plan, x: x, context: ctx, into: moments, memo: memo, arena: &$0) }
        }
        finish(layout, plan: plan, training: training, x: x, y: y, state: state, batch: moments, context: ctx,
               measure: fused, memo: memo, arena: &arena)
    }

    /// Phase (a): pass 1 over `x`, its plane moments into `context`, and with `moments` the batch's moments per
    /// channel (count B·S, mean, M2; C of them), which `mergeMoments` can combine with other processes'.
    @_specialize(where T == Float)
    @_specialize(where T == Double)
    public static func localMoments<T: NormalizationScalar>(
        plan: NormalizationPlan, shape: NormalizationShape, x: UnsafePointer<T>,
        context: UnsafeMutableBufferPointer<Double>, into moments: UnsafeMutablePointer<Moments>?
    ) throws(BCNError) {
        let pinned = BCNThreads.pin()  // one thread count for the scratch and the loops
        defer { BCNThreads.unpin(pinned) }
        let ctx = try checkedContext(plan: plan, shape: shape, context)
        try checkGroups(plan: plan, shape: shape)
        try checkFinite(plan: plan, shape: shape, x)
        let layout = Layout(plan: plan, shape: shape)
        var arena = try ScratchArena(bytes: localMomentsBytes(layout, T.self, moments: moments != nil, memo: false))
        localMoments(layout, plan: plan, x: x, context: ctx, into: moments, arena: &arena)
        ctx.writeHeader(.moments, format: shape.format, of: T.self)
    }

    /// Phase (b): the moments of the union of `sets` moment sets of `channels` channels each (set i at
    /// `moments + i·channels`), merged per channel in set order by Chan's formula, into `merged` (which may be
    /// the first set). Empty sets (count 0) contribute nothing (their mean and M2 are not read: sets all empty
    /// merge to zeros); one set with values merges to itself, bit for bit. A channel's counts add up to at most
    /// 2^53, which Double counts exactly.
    public static func mergeMoments(sets: Int, channels: Int, _ moments: UnsafePointer<Moments>,
                                    into merged: UnsafeMutablePointer<Moments>) throws(BCNError) {
        guard sets >= 1, channels >= 1, !sets.multipliedReportingOverflow(by: channels).overflow else {
            throw BCNError(.invalidArgument, "need at least one set of at least one channel, got \(sets) x \(channels)")
        }
        for i in 0..<(sets * channels) {
            let part = moments[i]
            guard part.count >= 0, part.count.isFinite, part.count == part.count.rounded(), !(part.m2 < 0) else {
                throw BCNError(.invalidArgument,
                               "moment set \(i / channels), channel \(i % channels): "
                               + "count \(part.count) and M2 \(part.m2) are not moments")
            }
        }
        // counts add exactly up to 2^53, and no more is counted: past it a merge's weight nₐ·n_b/n could overflow
        // (from about 1.3e154 up: a NaN M2 from equal means), and past Double's range the count itself (checked
        // before `merged`, which may be the first set, is written)
        for c in 0..<channels {
            var total = 0.0  // exact while it stays within 2^53, so each count is tested against what is left
            for i in 0..<sets {
                let count = moments[i * channels + c].count
                guard count <= 0x1p53 - total else {
                    throw BCNError(.invalidArgument, "channel \(c)'s counts add up to more than 2^53 (\(total) "
                                                     + "+ \(count)): more values than a count holds exactly")
                }
                total += count
            }
        }
        for c in 0..<channels {
            var m = Moments()
            for i in 0..<sets { m.merge(moments[i * channels + c]) }
            merged[c] = m
        }
    }

    /// Phase (c): with the batch's moments per channel (from phase (a), or merged over processes by phase (b);
    /// needed when training a batch-norm stage, ignored otherwise), the running-buffer update, the map of every
    /// plane and the output. `context` must hold phase (a)'s plane moments of this `x`.
    /// - Throws: `.degenerateStatistics` when batch statistics would rest on one value per channel.
    @_specialize(where T == Float)
    @_specialize(where T == Double)
    public static func finishForward<T: NormalizationScalar>(
        plan: NormalizationPlan, shape: NormalizationShape, training: Bool,
        x: UnsafePointer<T>, y: UnsafeMutablePointer<T>, state: NormalizationState<T>,
        batchMoments: UnsafePointer<Moments>?, context: UnsafeMutableBufferPointer<Double>
    ) throws(BCNError) {
        let pinned = BCNThreads.pin()  // one thread count for the scratch and the loops
        defer { BCNThreads.unpin(pinned) }
        let ctx = try checkedContext(plan: plan, shape: shape, context)
        guard let flags = ctx.readFlags(format: shape.format, element: NormalizationContext.element(T.self)),
              flags.contains(.moments) else {
            throw BCNError(.noForward, "context holds no moments of an input of this shape, groups (none without a "
                                       + "channel norm), memory format and element type: run phase (a) first "
                                       + "(localMoments; bcn_norm_moments_* in C)")
        }
        try checkState(plan: plan, state: state)
        try checkCount(plan: plan, state: state, updating: training)
        try checkGroups(plan: plan, shape: shape)
        // `.raise` promises nothing written for a non-finite x. Phase (a) under it screened an x, but maybe not this
        // one, or not at all: a mark in the context could not tell (a refused phase (a) writes nothing to clear it)
        try checkFinite(plan: plan, shape: shape, x)
        let batch = training && plan.batchNorm != nil ? batchMoments : nil
        if training, let bn = plan.batchNorm {
            guard let batch else {
                throw BCNError(.invalidArgument,
                               "training a batch-norm stage needs the batch's moments: moments must not be null")
            }
            try checkBatchMoments(bn, batch, channels: shape.channels)
            try checkFiniteMoments(plan: plan, batch, channels: shape.channels)
        }
        let layout = Layout(plan: plan, shape: shape)
        var arena = try ScratchArena(bytes: finishBytes(layout, T.self, plan: plan))
        finish(layout, plan: plan, training: training, x: x, y: y, state: state, batch: batch, context: ctx,
               measure: false, arena: &arena)
    }

    /// The running-buffer update alone, from the batch's moments per channel (count, mean, M2; C of them, from
    /// phase (a) or merged by phase (b)): what a process holding no share of a batch runs so its buffers follow
    /// the others', and what a framework calls that keeps the buffers' update apart from the (differentiable)
    /// normalization. The stage's weights are not read (may be nil). Writes nothing unless it succeeds.
    @_specialize(where T == Float)
    @_specialize(where T == Double)
    public static func updateRunningBuffers<T: NormalizationScalar>(
        plan: NormalizationPlan, batchMoments: UnsafePointer<Moments>, state: NormalizationState<T>
    ) throws(BCNError) {
        try plan.validate()
        guard let bn = plan.batchNorm else {
            throw BCNError(.invalidArgument, "only a batch-norm stage has running buffers")
        }
        guard state.runningMean != nil, state.runningVar != nil, state.numBatchesTracked != nil else {
            throw BCNError(.invalidArgument, "the running mean, running variance and batch count must not be null")
        }
        let C = plan.channels
        try checkBatchMoments(bn, batchMoments, channels: C)
        try checkCount(plan: plan, state: state, updating: true)
        try checkFiniteMoments(plan: plan, batchMoments, channels: C)
        var arena = try ScratchArena(bytes: ScratchArena.bytes(2 * C, of: Double.self)
                                        + ScratchArena.bytes(2 * C, of: T.self))
        let values = arena.take(2 * C, of: Double.self)
        BatchNormStage.runningUpdate(bn, batch: batchMoments, state: state, channels: C, newMean: values,
                                     newVar: values + C, staged: arena.take(2 * C, of: T.self))
            .commit(state, channels: C)
    }

    // MARK: the phases on a layout

    static func localMoments<T: NormalizationScalar>(
        _ layout: Layout, plan: NormalizationPlan, x: UnsafePointer<T>, context ctx: NormalizationContext,
        into moments: UnsafeMutablePointer<Moments>?, memo: UnsafeMutablePointer<Double>? = nil,
        arena: inout ScratchArena
    ) {
        switch layout {
        case .planes(let l): l.localMoments(x, context: ctx, into: moments, arena: &arena)
        case .channelsLast(let l): l.localMoments(x, context: ctx, into: moments, arena: &arena)
        case .rows(let l): l.localMoments(x, plan: plan, into: moments, memo: memo, arena: &arena)
        }
    }

    /// Arena bytes of phase (a); `moments`: the batch's moments are asked for; `memo`: the rows layout's plane
    /// moments go to a memo of the call's own (the stored layouts ignore both: their plane moments are needed).
    static func localMomentsBytes<T: NormalizationScalar>(_ layout: Layout, _: T.Type, moments: Bool,
                                                          memo: Bool) -> Int {
        switch layout {
        case .planes(let l): return l.localMomentsBytes(T.self)
        case .channelsLast(let l): return l.localMomentsBytes(T.self)
        case .rows(let l): return l.localMomentsBytes(moments: moments, memo: memo)
        }
    }

    /// The batch-norm stage into the context, the channel norm's weights, the output; then the running
    /// buffers and the header. With `measure`, pass 1 runs here too, unit by unit (`Layout.measuresPerUnit`).
    /// `memo`: the rows layout's plane moments, kept by phase (a) of the same call. Nothing here can fail.
    static func finish<T: NormalizationScalar>(
        _ layout: Layout, plan: NormalizationPlan, training: Bool, x: UnsafePointer<T>,
        y: UnsafeMutablePointer<T>, state: NormalizationState<T>, batch: UnsafePointer<Moments>?,
        context ctx: NormalizationContext, measure: Bool, memo: UnsafePointer<Double>? = nil,
        arena: inout ScratchArena
    ) {
        var (flags, update) = BatchNormStage.finish(plan: plan, training: training, batch: batch, state: state,
                                                    context: ctx, staged: arena.take(2 * plan.channels, of: T.self))
        if let cn = plan.channelNorm, let weight = state.cnWeight {
            flags.insert(.channelNorm)
            for g in 0..<plan.groups { ctx.w[g] = Double(weight[g]) }
            ctx.groupEps = cn.eps
        }
        let bias = plan.channelNorm != nil ? state.cnBias : nil  // a caller may pass one it does not use
        switch layout {
        case .planes(let l):
            l.apply(plan: plan, x: x, y: y, bias: bias, context: ctx, measure: measure, arena: &arena)
        case .channelsLast(let l):
            l.apply(plan: plan, x: x, y: y, bias: bias, context: ctx, measure: false, arena: &arena)
        case .rows(let l): l.apply(plan: plan, x: x, y: y, bias: bias, context: ctx, memo: memo, arena: &arena)
        }
        update?.commit(state, channels: plan.channels)
        ctx.writeHeader(flags.union([.moments, .forward]), format: ctx.shape.format, of: T.self)
    }

    static func finishBytes<T: NormalizationScalar>(_ layout: Layout, _: T.Type, plan: NormalizationPlan) -> Int {
        let staged = ScratchArena.bytes(2 * plan.channels, of: T.self)
        switch layout {
        case .planes(let l): return staged + l.applyBytes(T.self, plan: plan)
        case .channelsLast(let l): return staged + l.applyBytes(T.self, plan: plan)
        case .rows(let l): return staged + l.applyBytes(T.self, plan: plan)
        }
    }
}
