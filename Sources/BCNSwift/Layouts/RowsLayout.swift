/// Rows: [B, C, S] with S < `smallPlane` ([B, C] input, 2x2 or 3x3 maps, and channels-last with S = 1, which
/// is the same memory).
///
/// Planes this short hold fewer values than the numbers the stored layouts keep per plane, so nothing is kept
/// per plane: each pass computes the plane moments and gradient sums of a block of whole channel groups where
/// the stages need them, in per-thread scratch, and hands them to the same stages as every layout. With S = 1
/// every value is a plane and its own mean: the unit's value methods (`valueMoments`, `mapValues`, `valueSums`,
/// `valueGradients`) read x and dy directly, and the passes keep nothing at all (`applyValues`,
/// `forEachValueGradient`).
/// Work is cut into column blocks of whole groups (their numbers stay in L1), grouped into panels of about 512
/// values a row for the passes that sum over samples: a panel's rows are read sample by sample, a contiguous
/// stretch each, which the hardware prefetches (a block's few hundred bytes a row, 4 KB apart, it does not).
/// The cut is the same whatever the thread count, and sums over samples run in sample order inside a panel,
/// so results never depend on it.
struct RowsLayout {
    let shape: NormalizationShape
    let units: Units

    init(plan: NormalizationPlan, shape: NormalizationShape) {
        self.shape = shape
        units = Units(plan: plan, shape: shape)
    }

    /// Channels per column block: whole groups, about 64 channels.
    var blockChannels: Int { let K = units.groupSize; return max(K, (64 / K) * K) }
    var blocks: Int { (shape.channels + blockChannels - 1) / blockChannels }
    /// Blocks per panel, and panels: the parallel work items of the passes that sum over samples.
    var panelBlocks: Int { max(1, 512 / (blockChannels * shape.spatial)) }
    var panels: Int { (blocks + panelBlocks - 1) / panelBlocks }
    /// Channels of the widest panel: a block may be wider than the whole tensor (64 channels for C = 1).
    var panelWidth: Int { min(panelBlocks * blockChannels, shape.channels) }
    /// The channels of panel i.
    func panel(_ i: Int) -> (first: Int, count: Int) {
        let c0 = i * panelBlocks * blockChannels
        return (c0, min(panelBlocks * blockChannels, shape.channels - c0))
    }

    /// A thread's scratch, in blocks of `blockChannels` Doubles: p, q, T, U of a block's planes, then the unit
    /// stage's arrays (A, M, m and r forward; ȳ, F, H, Σ dy₁, Σ dy₁ (x - p), P, Q, R backward), then the
    /// panel's groups' sums (backward); with one-value planes, which use none of the 13 blocks, the panel's
    /// groups' sums and the constants of their dy₁ (`SumGradient.store`, 4 Doubles a group).
    var slotLength: Int {
        shape.spatial == 1 ? 6 * panelBlocks * blockChannels : 13 * blockChannels + 2 * panelBlocks * blockChannels
    }

    func scratch(_ cost: Int, count: Int, arena: inout ScratchArena) -> UnsafeMutablePointer<Double> {
        arena.take(parallelSlots(count, cost: cost) * slotLength, of: Double.self)
    }

    func scratchBytes(_ cost: Int, count: Int) -> Int {
        ScratchArena.bytes(parallelSlots(count, cost: cost) * slotLength, of: Double.self)
    }

    /// Plane moments of sample b's channels c0..<c0+n, into `p` and `q` (planes of 2 to 15 values; one-value
    /// planes are their own means, which the value methods read from x).
    @inline(__always)
    func planeMoments<T: NormalizationScalar>(_ x: UnsafePointer<T>, sample b: Int, first c0: Int, count n: Int,
                                              p: UnsafeMutablePointer<Double>, q: UnsafeMutablePointer<Double>)
        -> (UnsafePointer<Double>, UnsafePointer<Double>)
    {
        let S = shape.spatial, first = b * shape.channels + c0
        // Planes of 2 to 15 values: the corrected two-pass algorithm in Float64, every value widened exactly
        // (Float32 deviations would round them relative to the plane's spread, which a channel norm of small
        // groups magnifies).
        // Four planes at a time, one in each lane (value i of each per step): the same operations per plane.
        let invS = 1 / Double(S), invS4 = SIMD4(repeating: invS)
        var k = 0
        RowsLayout.withShortPlane(S) { S in
            while k &+ 4 <= n {
                let at = (first &+ k) &* S
                var total = SIMD4<Double>()
                for i in 0..<S { total += Self.planeLanes(x, at, i, spatial: S) }
                let c = total * invS4
                var d = SIMD4<Double>(), squares = d
                for i in 0..<S {
                    let e = Self.planeLanes(x, at, i, spatial: S) - c
                    d += e; squares.addProduct(e, e)
                }
                p.storeLanes(c + d * invS4, k)
                // max(M2, 0) lane by lane as `FloatingPoint.maximum` takes it (NaN gives 0), which
                // `pointwiseMax` calls out of line, one lane at a time; squares that overflowed (finite values:
                // non-finite ones make them NaN) bound an infinite M2, where ∞ - ∞ would give NaN, then 0
                let m2 = squares - d * d * invS4
                q.storeLanes(SIMD4().replacing(with: m2, where: m2 .> SIMD4())
                                    .replacing(with: .infinity, where: squares .== .infinity), k)
                k &+= 4
            }
        }
        while k < n {
            let plane = x + (first + k) * S
            var total = 0.0
            for i in 0..<S { total += Double(plane[i]) }
            let c = total * invS
            var d = 0.0, squares = 0.0
            for i in 0..<S { let e = Double(plane[i]) - c; d += e; squares.addProduct(e, e) }
            p[k] = c + d * invS; q[k] = squares == .infinity ? .infinity : max(squares - d * d * invS, 0)
            k &+= 1
        }
        return (UnsafePointer(p), UnsafePointer(q))
    }

    /// Value i of the four planes of S values from `at`, widened: one plane per lane.
    @inline(__always)
    static func planeLanes<T: NormalizationScalar>(_ x: UnsafePointer<T>, _ at: Int, _ i: Int, spatial S: Int)
        -> SIMD4<Double>
    {
        let v = x + (at &+ i)
        return SIMD4(Double(v[0]), Double(v[S]), Double(v[2 &* S]), Double(v[3 &* S]))
    }

    /// `body(S)` with S a constant for the planes of 2x2 and 3x3 maps and [B, C, 2..4], so that loops over a
    /// plane's values unroll: with S unknown they cost as much again as their work (the planes' moments and maps),
    /// and repeating and folding the value view's O(C·S) per-value numbers cost 7 instructions a value, a third of
    /// a small batch's backward.
    @inline(__always)
    static func withShortPlane(_ S: Int, _ body: (Int) -> Void) {
        switch S {
        case 2: body(2)
        case 3: body(3)
        case 4: body(4)
        case 9: body(9)
        default: body(S)
        }
    }

    /// T = Σ dy and U = Σ dy (x - p) of sample b's channels c0..<c0+n.
    @inline(__always)
    func gradientSums<T: NormalizationScalar>(_ x: UnsafePointer<T>, _ dy: UnsafePointer<T>, sample b: Int,
                                              first c0: Int, count n: Int, p: UnsafePointer<Double>,
                                              t: UnsafeMutablePointer<Double>, u: UnsafeMutablePointer<Double>) {
        let S = shape.spatial, first = b * shape.channels + c0
        var k = 0
        RowsLayout.withShortPlane(S) { S in
            while k &+ 4 <= n {  // in Float64, as the moments, four planes at a time
                let at = (first &+ k) &* S, centre = p.lanes(k)
                var sum = SIMD4<Double>(), dot = sum
                for i in 0..<S {
                    let g = Self.planeLanes(dy, at, i, spatial: S)
                    sum += g; dot.addProduct(g, Self.planeLanes(x, at, i, spatial: S) - centre)
                }
                t.storeLanes(sum, k); u.storeLanes(dot, k)
                k &+= 4
            }
        }
        while k < n {
            let at = (first + k) * S
            var sum = 0.0, dot = 0.0
            for i in 0..<S { let g = Double(dy[at + i]); sum += g; dot.addProduct(g, Double(x[at + i]) - p[k]) }
            t[k] = sum; u[k] = dot
            k &+= 1
        }
    }

    /// The unit of the group starting at channel c (relative offset k0 in the block's plane numbers).
    @inline(__always)
    func unit(channel c: Int, p: UnsafePointer<Double>, q: UnsafePointer<Double>, context ctx: NormalizationContext)
        -> NormalizationUnit
    {
        NormalizationUnit(planes: units.groupSize, spatial: shape.spatial, groupEps: units.groupEps(ctx), p: p,
                          q: q, mu: ctx.mu + c, a: ctx.a + c, beta: ctx.beta + c)
    }

    // MARK: forward

    private var momentsCost: Int { 2 * shape.batch * shape.spatial * panelWidth }
    /// Doubles of a thread's scratch for phase (a): the panel's plane moments of every sample (none when S = 1),
    /// 2·B·`panelWidth`, so O(B·C) whatever the blocks' width. Its columns' moments (`columnMoments`: 3·S a
    /// channel) fit the same room, since `byColumns` asks for 8 samples and S ≤ 4.
    private var momentsSlot: Int { (shape.spatial == 1 ? 0 : 2 * shape.batch) * panelWidth }

    /// Whether `localMoments` may take the batch moments by columns (`columnMoments`) when no memo asks for the
    /// plane moments: planes of 2 to 4 values, from 8 samples. Per column that costs a strip's setup and the
    /// merge, which fewer samples do not repay (callgrind, forward, against planes: [2, 512, 2, 2] 1.22x,
    /// [3, 128, 2, 2] 1.10x, [4, 64, 2, 2] 1.03x; [8, 256, 2, 2] 0.92x, [64, 512, 2, 2] 0.63x).
    var byColumns: Bool { (2...4).contains(shape.spatial) && shape.batch >= 8 }

    /// Phase (a): the batch's moments per channel, panel by panel (nothing without `channelMoments`). With
    /// S = 1 the plane means are the input's rows themselves. `memo` (`momentsMemoCount` Doubles, planes of 2
    /// to 15 values): every plane's p and q, kept there for `apply` in the same call (which the value view of
    /// short planes, `valueView`, does not read). Without a memo, planes of 2 to 4 values may go by columns
    /// (`byColumns`, `columnMoments`), where a single call of this `plan` would keep no memo either: the two ways
    /// add in different orders, so they round differently, and phase (a) alone must give the single call's bits
    /// (for Double input, and for Float input the value view does not take, phase (a) alone took the columns
    /// and the single call the planes).
    func localMoments<T: NormalizationScalar>(_ x: UnsafePointer<T>, plan: NormalizationPlan,
                                              into channelMoments: UnsafeMutablePointer<Moments>?,
                                              memo: UnsafeMutablePointer<Double>? = nil, arena: inout ScratchArena) {
        guard let channelMoments else { return }
        let B = shape.batch, S = shape.spatial, C = shape.channels, slotLength = memo == nil ? momentsSlot : 0
        let takesColumns = memo == nil && byColumns && momentsMemoCount(T.self, plan: plan) == 0
        let width = panelWidth
        let scratch = arena.take(parallelSlots(panels, cost: momentsCost) * slotLength, of: Double.self)
        parallelFor(panels, cost: momentsCost) { range, slot in
            // [B, width] per thread, or [B, C] for the whole call in `memo`
            let p = memo ?? scratch + slot * slotLength, q = p + B * (memo == nil ? width : C)
            for i in range {
                let (c0, n) = panel(i)
                if S == 1 {
                    BatchNormStage.batchMoments(batch: B, spatial: 1, width: n, p: x + c0, q: nil, stride: C,
                                                into: channelMoments + c0)
                    continue
                }
                if takesColumns {
                    assert(3 * S <= 2 * B, "the columns' moments beyond the slot (`momentsSlot`)")
                    let columns = UnsafeMutableRawPointer(p).bindMemory(to: Moments.self, capacity: n * S)
                    columnMoments(x, first: c0, count: n, columns: columns, into: channelMoments + c0)
                    continue
                }
                let (at, stride) = memo == nil ? (0, n) : (c0, C)
                for b in 0..<B {
                    _ = planeMoments(x, sample: b, first: c0, count: n, p: p + at + b * stride,
                                     q: q + at + b * stride)
                }
                BatchNormStage.batchMoments(batch: B, spatial: S, width: n, p: UnsafePointer(p + at),
                                            q: UnsafePointer(q + at), stride: stride, into: channelMoments + c0)
            }
        }
    }

    /// The batch's moments of channels c0..<c0+n of planes of 2 to 4 values, by columns: each of a plane's S
    /// positions is a column of B values, whose moments `BatchNormStage.batchMoments` takes as it takes [B, C]
    /// input's (16 columns a strip down the samples, Float32 rows widened as they load), into `columns`
    /// (n·S); then a channel's S columns merge around the first one's mean. Walking four planes at a time
    /// instead, their values gathered into lanes, cost 4 instructions a value before the merge over samples;
    /// this costs about 1.
    private func columnMoments<T: NormalizationScalar>(_ x: UnsafePointer<T>, first c0: Int, count n: Int,
                                                       columns: UnsafeMutablePointer<Moments>,
                                                       into out: UnsafeMutablePointer<Moments>) {
        let S = shape.spatial, row = shape.channels * S
        BatchNormStage.batchMoments(batch: shape.batch, spatial: 1, width: n * S, p: x + c0 * S, q: nil,
                                    stride: row, into: columns)
        // Every column holds B values. Around the first column's mean c, the columns' means merge as a plane's
        // values do in `BatchNormStage.batchMoments`: d = Σ (mean - c), μ = c + d/S, M2 = Σ M2 + B (Σ (mean - c)²
        // - d²/S). Chan's merge one column at a time instead rounds each partial mean (by 1/3 for the third),
        // and the next column's distance from it carried that rounding: 1e-10 of M2 where the spread was 1e-8
        // of the mean. With c one of the means, Σ (mean - c)² is at most S + 1 times the difference taken from
        // it, so the subtraction loses at most a few bits of the between-columns term.
        Self.withShortPlane(S) { S in
            for k in 0..<n {
                let plane = columns + k &* S, centre = plane[0].mean
                var within = 0.0, deviation = 0.0, between = 0.0
                for i in 0..<S {
                    let d = plane[i].mean - centre
                    within += plane[i].m2; deviation += d; between.addProduct(d, d)
                }
                out[k] = BatchNormStage.moments(centre: centre, within: within, deviation: deviation,
                                                between: between, sets: S, size: shape.batch)
            }
        }
    }

    /// Arena bytes of `localMoments`: none without the batch's moments (`moments`: it returns at once) or with a
    /// memo (`memo`: the plane moments go there).
    func localMomentsBytes(moments: Bool, memo: Bool) -> Int {
        guard moments && !memo else { return 0 }
        return ScratchArena.bytes(parallelSlots(panels, cost: momentsCost) * momentsSlot, of: Double.self)
    }

    /// Doubles of `localMoments`' memo: p and q of every plane (2·B·C) for planes of 2 to 15 values, else none;
    /// none either above `memoLimit`.
    /// None for one-value planes, nor where the value view runs the output (it measures its groups from x).
    func momentsMemoCount<T: NormalizationScalar>(_: T.Type, plan: NormalizationPlan) -> Int {
        shape.spatial == 1 || valueView(plan: plan, T.self) != nil ? 0 : RowsLayout.memo(2 * shape.planes)
    }

    /// Bytes a memo kept between one call's phases may take: the scratch arena's cache limit. A plane of 2 to 15
    /// values holds 8 to 60 bytes of Float32, and a backward's memo 48 bytes of Doubles per plane, so a large
    /// input would need several times its own size; above this the phases measure again (the same bits).
    static let memoLimit = ScratchArena.cacheLimit

    /// `count` Doubles if they fit `memoLimit`, else 0 (no memo).
    static func memo(_ count: Int) -> Int { count <= memoLimit / MemoryLayout<Double>.stride ? count : 0 }

    private var applyCost: Int { 3 * blockChannels * shape.spatial }

    /// Phase (c): every unit's m, r and output, one (sample, column block) at a time: the block's group
    /// moments first, then their r together, then the maps (groups of a few values would otherwise each wait
    /// on their own reduction, square root and division). `memo`: the plane moments `localMoments` kept in the
    /// same call, instead of measuring x again. One-value planes, and short planes of Float input that the value
    /// view takes (`valueView`), run `applyValues` instead (the view measures its groups from x, memo or not).
    func apply<T: NormalizationScalar>(plan: NormalizationPlan, x: UnsafePointer<T>, y: UnsafeMutablePointer<T>,
                                       bias: UnsafePointer<T>?, context ctx: NormalizationContext,
                                       memo: UnsafePointer<Double>? = nil, arena: inout ScratchArena) {
        let width = blockChannels, C = shape.channels, S = shape.spatial, K = units.groupSize, G = plan.groups
        if S == 1 { return applyValues(plan: plan, x: x, y: y, bias: bias, context: ctx, arena: &arena) }
        if let view = valueView(plan: plan, T.self) {
            return view.apply(x: x, y: y, bias: bias, context: ctx, arena: &arena)
        }
        let scratch = scratch(applyCost, count: blocks * shape.batch, arena: &arena)
        parallelFor(blocks * shape.batch, cost: applyCost) { range, slot in
            let p = scratch + slot * slotLength, q = p + width, scales = q + width, offsets = scales + width
            let means = offsets + width, inverses = means + width
            for item in range {
                // sample-major: a thread's consecutive items are consecutive memory
                let b = item / blocks, c0 = (item - b * blocks) * width, n = min(width, C - c0)
                let (pb, qb) = memo.map { ($0 + b * C + c0, $0 + shape.planes + b * C + c0) }
                    ?? planeMoments(x, sample: b, first: c0, count: n, p: p, q: q)
                if let eps = units.groupEps(ctx) {
                    let groups = n / K, g0 = c0 / K
                    for j in 0..<groups {
                        let moments = unit(channel: c0 + j * K, p: pb + j * K, q: qb + j * K, context: ctx)
                            .groupMoments(offsets + j * K)
                        means[j] = moments.mean; inverses[j] = moments.variance
                    }
                    NormalizationUnit.inverseDeviations(inverses, count: groups, eps: eps)
                    for j in 0..<groups {
                        let g = g0 + j
                        unit(channel: c0 + j * K, p: pb + j * K, q: qb + j * K, context: ctx).coefficients(
                            mean: means[j], r: inverses[j], weight: ctx.w[g], bias: bias.map { Double($0[g]) } ?? 0,
                            offsets: offsets + j * K, scales: scales + j * K)
                        ctx.m[b * G + g] = means[j]; ctx.r[b * G + g] = inverses[j]
                    }
                } else {
                    if memo == nil {  // (a memo is batch statistics': μ is then not finite where p is not)
                        for k in 0..<n { NormalizationUnit.recentre(p + k, channel: ctx.mu[c0 + k]) }
                    }
                    NormalizationUnit(planes: n, spatial: S, groupEps: nil, p: pb, q: nil, mu: ctx.mu + c0,
                                      a: ctx.a + c0, beta: ctx.beta + c0)
                        .batchNormMaps(offsets: offsets, scales: scales)
                }
                let first = b * C + c0
                Self.withShortPlane(S) { S in
                    for k in 0..<n {
                        WideMap.values(x, y, at: (first &+ k) &* S, count: S, centre: pb[k], scale: scales[k],
                                       offset: offsets[k])
                    }
                }
            }
        }
    }

    /// Channels per item of `applyValues`: whole groups, about 512 values of a row.
    private var valueBlockChannels: Int { let K = units.groupSize; return max(K, (512 / K) * K) }
    /// Rows per item of `applyValues` on input of type T: four in Float32 lanes (`Float._stageRows`), one else.
    private func valueRows<T: NormalizationScalar>(_: T.Type) -> Int { floatLanes(T.self) ? 4 : 1 }
    private func valueCost<T: NormalizationScalar>(_: T.Type) -> Int { 3 * valueRows(T.self) * valueBlockChannels }
    private func valueItems<T: NormalizationScalar>(_: T.Type) -> Int {
        let R = valueRows(T.self)
        return (shape.channels + valueBlockChannels - 1) / valueBlockChannels * ((shape.batch + R - 1) / R)
    }

    /// Phase (c) with one-value planes (S = 1, or the value view of short planes, `RowsValueView`): units from x
    /// straight to y (`valueMoments`, `mapValues`), the same numbers as the planes' maps, with an item's staged means
    /// (y₁, one Double a value) in the thread's scratch between the two; for Float input with groups of whole 8-lane
    /// vectors, Float32 lanes where `RowRounding` allows (`valueGroups32`). An item is a stretch of a row (of up to
    /// four rows in Float32 lanes, staged together: `Float._stageRows`): per row, the moments of all its groups first
    /// (into the context's m and r), then their r together, then the outputs, so that each group's reduction, square
    /// root and division overlap the others' instead of stalling its own output. `lanes`: the
    /// Float32 lanes' constants and each group's largest |β|, when the caller built them (the value view of short
    /// planes builds them per channel, not per value).
    func applyValues<T: NormalizationScalar>(plan: NormalizationPlan, x: UnsafePointer<T>,
                                             y: UnsafeMutablePointer<T>, bias: UnsafePointer<T>?,
                                             context ctx: NormalizationContext,
                                             lanes: (Float.ValueConstants, UnsafePointer<Double>)? = nil,
                                             arena: inout ScratchArena) {
        let width = valueBlockChannels, C = shape.channels, K = units.groupSize, G = plan.groups
        let perRow = (C + width - 1) / width, groupEps = units.groupEps(ctx), R = valueRows(T.self)
        let items = valueItems(T.self), cost = valueCost(T.self), slots = parallelSlots(items, cost: cost)
        let scratch = groupEps == nil ? nil : arena.take(slots * width, of: Double.self)
        // Float input and groups of whole Float32 vectors: the groups take Float32 lanes where they can
        let lanes32 = floatLanes(T.self)
        var constants: Float.ValueConstants?, betaReach: UnsafePointer<Double>?
        if lanes32, let lanes {
            (constants, betaReach) = lanes
        } else if lanes32 {
            constants = Float.ValueConstants(count: C, mu: ctx.mu, a: ctx.a, beta: ctx.beta,
                                             storage: arena.take(4 * C, of: Float.self))
            let reach = arena.take(G, of: Double.self)
            RowRounding.betaReach(ctx.beta, groups: G, size: K, into: reach)
            betaReach = UnsafePointer(reach)
        }
        let scratch32 = lanes32 ? arena.take(slots * R * width, of: Float.self) : nil
        parallelFor(items, cost: cost) { range, slot in
            for item in range {
                let b0 = item / perRow * R, c0 = item % perRow * width, n = min(width, C - c0)
                let rows = min(R, shape.batch - b0), first = b0 * C + c0
                guard let eps = groupEps, let scratch else {  // the batch-norm stage alone: no group couples channels
                    let unit = valueUnit(channel: c0, planes: n, context: ctx)
                    for r in 0..<rows { unit.batchNormValues(x + first + r * C, into: y + first + r * C) }
                    continue
                }
                let groups = n / K, g0 = c0 / K, staged = scratch + slot * width
                // One unit value for the item's groups (its pointers at c0), each group from its offset; offsets
                // inside the item wrap unchecked (the item lies inside the tensor).
                let unit = valueUnit(channel: c0, planes: K, context: ctx)
                if let constants, let scratch32, let betaReach {
                    let staged32 = scratch32 + slot * R * width
                    Float._stageRows(UnsafeRawPointer(x + first).assumingMemoryBound(to: Float.self), rows: rows,
                                     stride: C, count: groups * K, constants.advanced(by: c0), into: staged32)
                    for r in 0..<rows {
                        let at = first + r * C, row = (b0 + r) * G + g0
                        valueGroups32(x + at, y + at, groups: groups, first: c0, unit: unit,
                                      betaReach: betaReach + g0, staged: staged, staged32: staged32 + r * groups * K,
                                      bias: bias, context: ctx, means: ctx.m + row, inverses: ctx.r + row, eps: eps)
                    }
                    continue
                }
                assert(rows == 1, "items of several rows run only in Float32 lanes")
                let means = ctx.m + b0 * G + g0, inverses = ctx.r + b0 * G + g0, xs = x + first, ys = y + first
                var j = 0
                while j < groups {
                    let moments = unit.valueMoments(xs, from: j &* K, storingInto: staged + j &* K)
                    means[j] = moments.mean; inverses[j] = moments.variance
                    j &+= 1
                }
                NormalizationUnit.inverseDeviations(inverses, count: groups, eps: eps)
                j = 0
                while j < groups {
                    let g = g0 &+ j, at = j &* K
                    unit.mapValues(staged: staged + at, into: ys + at, mean: means[j], r: inverses[j],
                                   weight: ctx.w[g], bias: bias.map { Double($0[g]) } ?? 0)
                    j &+= 1
                }
            }
        }
    }

    /// Whether `applyValues` runs Float32 lanes (`valueGroups32`) on input of type T: Float input with a
    /// channel-norm stage whose groups are whole vectors of eight.
    func floatLanes<T: NormalizationScalar>(_: T.Type) -> Bool {
        T.self == Float.self && units.hasChannelNorm && units.groupSize & 7 == 0
    }

    /// `applyValues` on one item of Float input, `groups` groups from channel c0 of a row (xs, ys), in Float32
    /// lanes (`Float._valueItemMoments`, `Float._valueItemMaps`; `betaReach`: the groups' largest |β|); a group
    /// `RowRounding` refuses runs the Float64 value methods instead, from its Float64 staged means in `staged`.
    /// The same order of phases as `applyValues`: every group's moments, then their r together, then the outputs.
    @inline(__always)
    private func valueGroups32<T: NormalizationScalar>(
        _ xs: UnsafePointer<T>, _ ys: UnsafeMutablePointer<T>, groups: Int, first c0: Int, unit: NormalizationUnit,
        betaReach: UnsafePointer<Double>, staged: UnsafeMutablePointer<Double>,
        staged32: UnsafeMutablePointer<Float>, bias: UnsafePointer<T>?, context ctx: NormalizationContext,
        means: UnsafeMutablePointer<Double>, inverses: UnsafeMutablePointer<Double>, eps: Double
    ) {
        let K = units.groupSize, g0 = c0 / K
        let yf = UnsafeMutableRawPointer(ys).assumingMemoryBound(to: Float.self)
        // the groups on the Float64 path (at most 64: an item holds at most 512 channels)
        let wide = Float._valueItemMoments(staged32, groups: groups, size: K, betaReach: betaReach, means: means,
                                           variances: inverses)
        var rest = wide
        while rest != 0 {
            let j = rest.trailingZeroBitCount, at = j * K
            let moments = unit.valueMoments(xs, from: at, storingInto: staged + at)
            means[j] = moments.mean; inverses[j] = moments.variance
            rest &= rest - 1
        }
        NormalizationUnit.inverseDeviations(inverses, count: groups, eps: eps)
        Float._valueItemMaps(staged32, into: yf, groups: groups, size: K, means: means, inverses: inverses,
                             weights: ctx.w + g0,
                             bias: bias.map { UnsafeRawPointer($0 + g0).assumingMemoryBound(to: Float.self) },
                             skipping: wide)
        rest = wide
        while rest != 0 {
            let j = rest.trailingZeroBitCount, g = g0 + j, at = j * K
            unit.mapValues(staged: staged + at, into: ys + at, mean: means[j], r: inverses[j], weight: ctx.w[g],
                           bias: bias.map { Double($0[g]) } ?? 0)
            rest &= rest - 1
        }
    }

    /// The unit of `planes` one-value planes from channel c, for the value methods, which read the plane
    /// means from the input itself (`p` is not read).
    @inline(__always)
    func valueUnit(channel c: Int, planes: Int, context ctx: NormalizationContext) -> NormalizationUnit {
        NormalizationUnit(planes: planes, spatial: 1, groupEps: units.groupEps(ctx), p: ctx.mu + c, q: nil,
                          mu: ctx.mu + c, a: ctx.a + c, beta: ctx.beta + c)
    }

    func applyBytes<T: NormalizationScalar>(_: T.Type, plan: NormalizationPlan) -> Int {
        guard shape.spatial == 1 else {
            let planes = scratchBytes(applyCost, count: blocks * shape.batch)
            return max(planes, valueView(plan: plan, T.self)?.bytes ?? 0)
        }
        let slots = parallelSlots(valueItems(T.self), cost: valueCost(T.self))
        return ScratchArena.bytes(slots * valueBlockChannels, of: Double.self)
            + (floatLanes(T.self) ? ScratchArena.bytes(4 * shape.channels, of: Float.self)
                + ScratchArena.bytes(slots * valueRows(T.self) * valueBlockChannels, of: Float.self)
                + ScratchArena.bytes(shape.channels / units.groupSize, of: Double.self) : 0)
    }
}
