/// The rows layout's backward of one-value planes (S = 1) of Float input in Float32 lanes
/// (`Float+ValueGradients.swift`), for groups of whole 8-lane vectors: `forEachValueGradient`'s walk, with each
/// group's sums and values in Float32 where `RowRounding` lets it, and the Float64 value methods for the rest.
extension RowsLayout {
    /// Whether the backward may run Float32 lanes on input of type T, as its scratch is reserved: one-value planes
    /// under `floatLanes`' rule. A call takes them by `gradientLanes`.
    func floatGradientLanes<T: NormalizationScalar>(_: T.Type) -> Bool { shape.spatial == 1 && floatLanes(T.self) }

    /// Whether a backward call runs Float32 lanes: `floatGradientLanes`, unless its gradient goes `through` batch
    /// statistics that rest on two values a channel (the context's count: over several processes the whole
    /// batch's, so two processes of one sample each too). The batch norm's dx is then what is left of its terms
    /// (`NormalizationShape.twoValuesAChannel`), and Float32 lanes left up to 4e4 ulps of the largest |dx|.
    func gradientLanes<T: NormalizationScalar>(_: T.Type, context ctx: NormalizationContext, through: Bool) -> Bool {
        floatGradientLanes(T.self) && !(through && ctx.statisticsCount == 2)
    }

    /// What the Float32 lanes of one backward call need: ȳ's constants (`Float.ValueConstants`) and each
    /// group's largest |β| (`RowRounding.betaReach`), each panel's filled by `prepare` in the parallel pass (on
    /// one thread before it, with the value view's O(C·S) per-value numbers, small batches ran 1.1-1.5x slower).
    struct FloatGradientLanes {
        let constants: Float.ValueConstants, betaReach: UnsafeMutablePointer<Double>
        /// The value view's per-value context, which each panel fills first (nil for one-value planes).
        let expansion: ValueExpansion?

        init(channels C: Int, groups G: Int, expansion: ValueExpansion?, arena: inout ScratchArena) {
            constants = Float.ValueConstants(count: C, storage: arena.take(4 * C, of: Float.self))
            betaReach = arena.take(G, of: Double.self)
            self.expansion = expansion
        }

        /// The constants of channels c0..<c0+n, whole groups of K, from the context.
        func prepare(first c0: Int, count n: Int, size K: Int, context ctx: NormalizationContext) {
            expansion?.expand(first: c0, count: n)
            constants.fill(first: c0, count: n, mu: ctx.mu, a: ctx.a, beta: ctx.beta)
            RowRounding.betaReach(ctx.beta + c0, groups: n / K, size: K, into: betaReach + c0 / K)
        }

        static func bytes(channels C: Int, groups G: Int) -> Int {
            ScratchArena.bytes(4 * C, of: Float.self) + ScratchArena.bytes(G, of: Double.self)
        }
    }

    /// Scratch of the Float32 lanes beyond `FloatGradientLanes`: the Float32 partial sums of S₁ and S₂
    /// (`floatPartials`) or the Float32 constants of dx (`Float.InputGradientConstants`, 3·C Floats).
    func floatGradientBytes<T: NormalizationScalar>(_: T.Type, plan: NormalizationPlan) -> Int {
        guard floatGradientLanes(T.self) else { return 0 }
        return FloatGradientLanes.bytes(channels: shape.channels, groups: plan.groups)
            + max(ScratchArena.bytes(3 * shape.channels, of: Float.self), floatPartialsBytes)
    }

    /// `FloatValueSums`' partials, zeroed: 2·C Floats for each thread slot of the passes over panels.
    func floatPartials(arena: inout ScratchArena) -> UnsafeMutablePointer<Float> {
        let partials = arena.take(floatPartialsCount, of: Float.self)
        partials.update(repeating: 0, count: floatPartialsCount)
        return partials
    }

    var floatPartialsBytes: Int { ScratchArena.bytes(floatPartialsCount, of: Float.self) }

    private var floatPartialsCount: Int { parallelSlots(panels, cost: gradientCost) * 2 * shape.channels }

    /// Where a memo of one-value planes (`memoCount`: 2 numbers per unit, then one per unit) keeps which groups
    /// took the Float32 lanes: for each panel's sample, a mask of its groups (a UInt64's bits, in raw memory) at
    /// its first unit.
    @inline(__always)
    private static func floatGroups(_ kept: UnsafeMutablePointer<Double>, units: Int) -> UnsafeMutableRawPointer {
        UnsafeMutableRawPointer(kept + 2 &* units)
    }

    /// The groups of a panel as a mask: at most 64, since a panel of one-value planes holds one group (of more
    /// than 512 channels) or at most 512 channels, in groups of at least 8 here.
    @inline(__always)
    private static func mask(_ groups: Int) -> UInt64 { groups >= 64 ? ~0 : (1 << UInt64(groups)) &- 1 }

    /// Phase (c)'s values in Float32 lanes (`forEachValueGradient32`): dx = dy₁ without a batch-norm stage, else
    /// dx = a ((dy₁ - S₁/n) - (x - μ) k) from `terms` ([S₁/n | k] per channel), with `sums` ([S₁ | S₂],
    /// added to) the channel sums too when the call does not know them yet; each group's gradients to `group`.
    /// `expansion`: the value view's, to fill its per-value context (and terms) panel by panel.
    func valueGradients32<T: NormalizationScalar>(
        _ x: UnsafePointer<T>, _ dy: UnsafePointer<T>, _ dx: UnsafeMutablePointer<T>, plan: NormalizationPlan,
        context ctx: NormalizationContext, terms: UnsafePointer<Double>, sums: UnsafeMutablePointer<Double>?,
        group: (Int, Double, Double) -> Void, unitSums: PhaseMemo<UnsafeMutablePointer<Double>>,
        scratch: UnsafeMutablePointer<Double>, expansion: ValueExpansion? = nil, arena: inout ScratchArena
    ) {
        let C = shape.channels
        let lanes = FloatGradientLanes(channels: C, groups: plan.groups, expansion: expansion, arena: &arena)
        let xf = Self.floats(x), dyf = Self.floats(dy)
        let dxf = UnsafeMutableRawPointer(dx).assumingMemoryBound(to: Float.self)
        guard plan.batchNorm != nil else {  // dx = dy₁
            return forEachValueGradient32(xf, dyf, plan: plan, context: ctx, lanes: lanes, scratch: scratch,
                                          group: group, unitSums: unitSums, into: FloatValueCopy(dx: dxf),
                                          ValueCopy(dx: dx))
        }
        let input = ValueInputGradient(x: x, mu: ctx.mu, dx: dx, a: ctx.a, s1n: terms, k: terms + C)
        let constants = Float.InputGradientConstants(count: C, storage: arena.take(3 * C, of: Float.self))
        let input32 = FloatInputGradient(dx: dxf, constants: constants, a: ctx.a, s1n: terms, k: terms + C)
        guard let sums else {
            return forEachValueGradient32(xf, dyf, plan: plan, context: ctx, lanes: lanes, scratch: scratch,
                                          group: group, unitSums: unitSums, into: input32, input)
        }
        // the sums too: their partials in the arena after dx's constants
        let sums64 = ValueSums(x: x, mu: ctx.mu, s1: sums, s2: sums + C)
        let sums32 = FloatValueSums(partials: floatPartials(arena: &arena), channels: C, sums: sums)
        forEachValueGradient32(xf, dyf, plan: plan, context: ctx, lanes: lanes, scratch: scratch, group: group,
                               unitSums: unitSums, into: FloatSinkPair(first: sums32, second: input32),
                               ValueSinkPair(first: sums64, second: input))
    }

    /// The memo's (ΣT, W) pairs of n units (`unitSums`) from ΣT and W apart, four units a step.
    @inline(__always)
    private static func zip(_ t: UnsafePointer<Double>, _ w: UnsafePointer<Double>,
                            into pairs: UnsafeMutablePointer<Double>, count n: Int) {
        var j = 0
        while j &+ 4 <= n {
            let tj = t.lanes(j), wj = w.lanes(j)
            pairs.storeLanes(SIMD4(tj[0], wj[0], tj[1], wj[1]), 2 &* j)
            pairs.storeLanes(SIMD4(tj[2], wj[2], tj[3], wj[3]), 2 &* j &+ 4)
            j &+= 4
        }
        for j in j..<n { pairs[2 &* j] = t[j]; pairs[2 &* j &+ 1] = w[j] }
    }

    /// `zip` undone: ΣT and W of n units from the memo's pairs.
    @inline(__always)
    private static func unzip(_ pairs: UnsafePointer<Double>, into t: UnsafeMutablePointer<Double>,
                              _ w: UnsafeMutablePointer<Double>, count n: Int) {
        var j = 0
        while j &+ 4 <= n {
            let a = pairs.lanes(2 &* j), b = pairs.lanes(2 &* j &+ 4)
            t.storeLanes(SIMD4(a[0], a[2], b[0], b[2]), j); w.storeLanes(SIMD4(a[1], a[3], b[1], b[3]), j)
            j &+= 4
        }
        for j in j..<n { t[j] = pairs[2 &* j]; w[j] = pairs[2 &* j &+ 1] }
    }

    /// `forEachValueGradient` in Float32 lanes: per sample of a panel, every group's ΣT and W
    /// (`Float._valueItemGradientSums` for the groups `RowRounding.acceptsGradient` lets through and whose sums
    /// it keeps, the Float64 `valueSums` for the rest), then the values: Float32 lanes to `sink32`, the other
    /// groups' Float64 values to `sink`. Samples and groups in the same order as `forEachValueGradient`, so
    /// results never depend on the thread count. `unitSums` keeps (or reads) each unit's ΣT and W as there, and
    /// which groups took the Float32 lanes (`floatGroups`).
    func forEachValueGradient32<Sink32: FloatValueSink, Sink: ValueGradientSink>(
        _ x: UnsafePointer<Float>, _ dy: UnsafePointer<Float>, plan: NormalizationPlan,
        context ctx: NormalizationContext, lanes: FloatGradientLanes, scratch: UnsafeMutablePointer<Double>,
        group: (Int, Double, Double) -> Void = { _, _, _ in },
        unitSums: PhaseMemo<UnsafeMutablePointer<Double>> = .none, into sink32: Sink32, _ sink: Sink
    ) {
        let C = shape.channels, K = units.groupSize, G = plan.groups, B = shape.batch, slotLength = slotLength
        let width = panelBlocks * blockChannels
        parallelFor(panels, cost: gradientCost) { range, slot in
            // [ΣT | r W] per group of the panel, then per group of the current sample: the Float64 constants of
            // its dy₁ (`SumGradient.store`, 4 Doubles), ΣT, W, and the Float32 constants (`GradientConstants`, 6
            // Floats): 9 Doubles a group, inside the slot's 4·width (groups ≤ width / 8)
            let groupSums = scratch + slot * slotLength, wide = groupSums + 2 * width, sink32 = sink32.slot(slot)
            for i in range {
                let (c0, n) = panel(i), groups = n / K, g0 = c0 / K, all = Self.mask(groups)
                precondition(groups <= 64, "a panel of one-value planes holds at most 64 groups")
                let t = wide + 4 * groups, w = t + groups
                let narrow = Float.GradientConstants(UnsafeMutableRawPointer(w + groups), groups: groups)
                lanes.prepare(first: c0, count: n, size: K, context: ctx)
                sink32.prepare(first: c0, count: n)
                let unit = valueUnit(channel: c0, planes: K, context: ctx), constants = lanes.constants.advanced(by: c0)
                groupSums.update(repeating: 0, count: 2 * groups)
                for b in 0..<B {
                    let first = b &* C &+ c0, bg0 = b &* G &+ g0
                    let floats: UInt64
                    if case .reuse(let kept) = unitSums {
                        floats = Self.floatGroups(kept, units: B &* G).load(fromByteOffset: 8 &* bg0, as: UInt64.self)
                        Self.unzip(kept + 2 &* bg0, into: t, w, count: groups)
                    } else {
                        floats = Float._valueItemGradientSums(x + first, dy + first, groups: groups, size: K, constants,
                                                              means: ctx.m + bg0, inverses: ctx.r + bg0,
                                                              weights: ctx.w + g0, betaReach: lanes.betaReach + g0,
                                                              t: t, w: w)
                        var rest = all & ~floats
                        while rest != 0 {
                            let j = rest.trailingZeroBitCount
                            (t[j], w[j]) = unit.valueSums(x, dy, first: first, from: j &* K, m: ctx.m[bg0 &+ j])
                            rest &= rest &- 1
                        }
                        if case .record(let kept) = unitSums {
                            Self.floatGroups(kept, units: B &* G).storeBytes(of: floats, toByteOffset: 8 &* bg0,
                                                                             as: UInt64.self)
                            Self.zip(t, w, into: kept + 2 &* bg0, count: groups)
                        }
                    }
                    // Four groups at a time where they are whole: their sums and Float32 constants in vector
                    // operations (the Float32 constants of a group on the Float64 path go unused)
                    var j = 0
                    while groups &- j >= 4 {
                        let bg = bg0 &+ j, tj = t.lanes(j), wj = w.lanes(j), r = ctx.r.lanes(bg)
                        groupSums.storeLanes(groupSums.lanes(j) + tj, j)
                        groupSums.storeLanes(groupSums.lanes(groups &+ j) + r * wj, groups &+ j)
                        narrow.store(t: tj, w: wj, planes: K, m: ctx.m.lanes(bg), r: r, weight: ctx.w.lanes(g0 &+ j),
                                     groups: j)
                        var rest = ~floats >> UInt64(j) & 15
                        while rest != 0 {
                            let l = j &+ rest.trailingZeroBitCount
                            SumGradient.store(t: t[l], w: w[l], planes: K, m: ctx.m[bg0 &+ l], r: ctx.r[bg0 &+ l],
                                              weight: ctx.w[g0 &+ l], into: wide + 4 &* l)
                            rest &= rest &- 1
                        }
                        j &+= 4
                    }
                    for j in j..<groups {
                        let g = g0 &+ j, bg = bg0 &+ j, r = ctx.r[bg], m = ctx.m[bg]
                        groupSums[j] += t[j]; groupSums[groups &+ j] += r * w[j]
                        if floats & (1 << UInt64(j)) != 0 {
                            narrow.store(t: t[j], w: w[j], planes: K, m: m, r: r, weight: ctx.w[g], group: j)
                        } else {
                            SumGradient.store(t: t[j], w: w[j], planes: K, m: m, r: r, weight: ctx.w[g],
                                              into: wide + 4 &* j)
                        }
                    }
                    Float._valueItemGradients(x + first, dy + first, first: first, channel: c0, size: K, constants,
                                              constants: narrow, groups: floats, into: sink32)
                    var rest = all & ~floats
                    while rest != 0 {
                        let j = rest.trailingZeroBitCount
                        unit.valueGradients(x, dy, first: first, channel: c0, from: j &* K,
                                            SumGradient(wide + 4 &* j), into: sink)
                        rest &= rest &- 1
                    }
                    if b & 7 == 7 || b == B &- 1 { sink32.flush(first: c0, count: n) }
                }
                for j in 0..<groups { group(g0 + j, groupSums[j], groupSums[groups + j]) }
            }
        }
    }
}

/// S₁ and S₂ per channel (`ValueSums`) in Float32 partials `s1`, `s2` (C Floats each, zero to begin with), added
/// to the Float64 sums `sum1`, `sum2` (and zeroed) every eighth sample: at most 8 terms a partial.
///
/// Each thread slot has partials of its own (`slot`: slot k's `s1` and `s2` lie 2·C Floats after slot k - 1's;
/// `RowsLayout.floatPartials`). They were one array of 2·C, each panel writing only its own channels' Floats,
/// yet two threads slowed each other's panels: [256, 1024]'s gradient sums took 1.15-1.3x their one-thread time
/// per work item side by side, and 0.96-1.14x with a slot's own partials (timed per item, same runs). Each
/// channel is still added in the same order, so the numbers are the same.
struct FloatValueSums: FloatValueSink {
    let s1: UnsafeMutablePointer<Float>, s2: UnsafeMutablePointer<Float>
    let sum1: UnsafeMutablePointer<Double>, sum2: UnsafeMutablePointer<Double>

    /// The partials of every slot from `partials` (`RowsLayout.floatPartials`), slot 0's first, for C channels,
    /// added into [S₁ | S₂] at `sums`.
    init(partials: UnsafeMutablePointer<Float>, channels C: Int, sums: UnsafeMutablePointer<Double>) {
        self.init(s1: partials, s2: partials + C, sum1: sums, sum2: sums + C)
    }

    private init(s1: UnsafeMutablePointer<Float>, s2: UnsafeMutablePointer<Float>, sum1: UnsafeMutablePointer<Double>,
                 sum2: UnsafeMutablePointer<Double>) {
        self.s1 = s1; self.s2 = s2; self.sum1 = sum1; self.sum2 = sum2
    }

    func slot(_ slot: Int) -> Self {
        let stride = 2 &* (s2 - s1)  // 2·C
        return Self(s1: s1 + slot &* stride, s2: s2 + slot &* stride, sum1: sum1, sum2: sum2)
    }

    @inline(__always)
    func lanes(_ i: Int, _ c: Int, _ dy1: SIMD8<Float>, _ z: SIMD8<Float>) {
        Float._store8(Float._load8(s1, c) + dy1, s1, c)
        Float._store8(Float._load8(s2, c).addingProduct(z, dy1), s2, c)
    }

    func flush(first c0: Int, count n: Int) {
        var c = c0
        while c &+ 4 <= c0 &+ n {  // four channels a step (the same additions)
            sum1.storeLanes(sum1.lanes(c) + Float._load4Wide(s1, c), c)
            sum2.storeLanes(sum2.lanes(c) + Float._load4Wide(s2, c), c)
            c &+= 4
        }
        for c in c..<c0 + n { sum1[c] += Double(s1[c]); sum2[c] += Double(s2[c]) }
        (s1 + c0).update(repeating: 0, count: n); (s2 + c0).update(repeating: 0, count: n)
    }
}

/// dx = a ((dy₁ - S₁/n) - (x - μ) k) through the batch-norm stage (`ValueInputGradient`), with the constants in
/// Float32, each panel's rounded from `a`, `s1n`, `k` (per channel, Float64) as the panel begins.
struct FloatInputGradient: FloatValueSink {
    let dx: UnsafeMutablePointer<Float>, constants: Float.InputGradientConstants
    let a: UnsafePointer<Double>, s1n: UnsafePointer<Double>, k: UnsafePointer<Double>

    func prepare(first c0: Int, count n: Int) { constants.fill(first: c0, count: n, a: a, s1n: s1n, k: k) }

    @inline(__always)
    func lanes(_ i: Int, _ c: Int, _ dy1: SIMD8<Float>, _ z: SIMD8<Float>) {
        let k = constants
        Float._store8(Float._load8(k.a, c) * (dy1 - Float._load8(k.s1n, c)).addingProduct(z, -Float._load8(k.k, c)),
                      dx, i)
    }
}

/// dx = dy₁, without a batch-norm stage.
struct FloatValueCopy: FloatValueSink {
    let dx: UnsafeMutablePointer<Float>

    @inline(__always)
    func lanes(_ i: Int, _ c: Int, _ dy1: SIMD8<Float>, _ z: SIMD8<Float>) { Float._store8(dy1, dx, i) }
}

/// Two sinks for every value, `first` then `second`.
struct FloatSinkPair<First: FloatValueSink, Second: FloatValueSink>: FloatValueSink {
    let first: First, second: Second

    @inline(__always)
    func lanes(_ i: Int, _ c: Int, _ dy1: SIMD8<Float>, _ z: SIMD8<Float>) {
        first.lanes(i, c, dy1, z); second.lanes(i, c, dy1, z)
    }

    func prepare(first c0: Int, count n: Int) {
        first.prepare(first: c0, count: n); second.prepare(first: c0, count: n)
    }

    func flush(first c0: Int, count n: Int) { first.flush(first: c0, count: n); second.flush(first: c0, count: n) }

    func slot(_ slot: Int) -> Self { Self(first: first.slot(slot), second: second.slot(slot)) }
}
