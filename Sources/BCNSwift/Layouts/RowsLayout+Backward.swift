/// The rows layout's backward: every unit's gradient from x and dy, computed where it is needed as the
/// forward's plane moments are (RowsLayout.swift), and handed to sinks that add the batch-norm stage's channel
/// sums and write dx.
extension RowsLayout {
    var gradientCost: Int { 4 * shape.batch * shape.spatial * panelBlocks * blockChannels }

    /// Runs every unit's backward, panel by panel (in parallel), sample by sample in order inside a panel, and
    /// block by block of the panel for each sample; then `sink.unit(b, c, K, the unit's p, E, its gradient
    /// arrays, scratch for its P, Q, R)` with c its first channel. Each group's ΣT and r W, summed over the
    /// samples, go to `group(g, ΣT, r W)` once its panel is done (so threads never write next to each other per
    /// unit). The sink is a type, not a closure: a closure captured by the parallel body would be called per unit
    /// instead of inlined. `memo`: each unit's p and gradient go to a `PlaneMemo` (`.record`), or come from one
    /// that an earlier pass over the same x and dy recorded (`.reuse`), which reads neither x nor dy.
    private func forEachUnitGradient<T: NormalizationScalar, Sink: PlaneGradientSink>(
        _ x: UnsafePointer<T>, _ dy: UnsafePointer<T>, plan: NormalizationPlan, context ctx: NormalizationContext,
        scratch: UnsafeMutablePointer<Double>, group: (Int, Double, Double) -> Void = { _, _, _ in },
        memo: PhaseMemo<PlaneMemo> = .none, into sink: Sink
    ) {
        let width = blockChannels, K = units.groupSize, G = plan.groups, C = shape.channels
        parallelFor(panels, cost: memo.reuses ? gradientCost / 2 : gradientCost) { range, slot in
            let p = scratch + slot * slotLength, q = p + width, t = q + width, u = t + width
            let yBar = u + width
            let out = NormalizationUnit.Gradient(yBar + width, planes: width)
            let coefficients = yBar + 5 * width, groupSums = coefficients + 3 * width  // [ΣT | r W] per group
            for i in range {
                let (panelFirst, panelCount) = panel(i), groups = panelCount / K
                groupSums.update(repeating: 0, count: 2 * groups)
                for b in 0..<shape.batch {
                    if case .reuse(let kept) = memo {
                        for c in Swift.stride(from: panelFirst, to: panelFirst + panelCount, by: K) {
                            let at = b * C + c, unit = at / K, j = (c - panelFirst) / K
                            groupSums[j] += kept.gradients.biasGradient[unit]
                            groupSums[groups + j] += kept.gradients.weightGradient[unit]
                            sink.unit(b, c, K, kept.p + at, kept.gradients.maps[at],
                                      kept.gradients.gradient(first: at), coefficients)
                        }
                        continue
                    }
                    var c0 = panelFirst
                    while c0 < panelFirst + panelCount {
                        let n = min(width, panelFirst + panelCount - c0)
                        let (pb, qb) = planeMoments(x, sample: b, first: c0, count: n, p: p, q: q)
                        if G == 0 {  // as the forward mapped them (`NormalizationUnit.recentre`)
                            for k in 0..<n { NormalizationUnit.recentre(p + k, channel: ctx.mu[c0 + k]) }
                        }
                        gradientSums(x, dy, sample: b, first: c0, count: n, p: pb, t: t, u: u)
                        for k0 in Swift.stride(from: 0, to: n, by: K) {
                            let c = c0 + k0, g = c / K, bg = b * G + g, at = b * C + c
                            var gradient = out.advanced(by: k0)
                            if case .record(let kept) = memo { gradient = kept.gradients.gradient(first: at) }
                            let (e, bias, weight) = unit(channel: c, p: pb + k0, q: qb + k0, context: ctx)
                                .backward(t: t + k0, u: u + k0, m: G > 0 ? ctx.m[bg] : 0,
                                          r: G > 0 ? ctx.r[bg] : 0,
                                          weight: G > 0 ? ctx.w[g] : 1, yBar: yBar, into: gradient)
                            if case .record(let kept) = memo {
                                (kept.p + at).update(from: pb + k0, count: K)
                                kept.gradients.record(unit: at / K, first: at, planes: K, e: e, bias: bias,
                                                      weight: weight)
                            }
                            let j = (c - panelFirst) / K
                            groupSums[j] += bias; groupSums[groups + j] += weight
                            sink.unit(b, c, K, pb + k0, e, gradient, coefficients)
                        }
                        c0 += n
                    }
                }
                if G > 0 { for j in 0..<groups { group(panelFirst / K + j, groupSums[j], groupSums[groups + j]) } }
            }
        }
    }

    /// `forEachUnitGradient` for one-value planes (S = 1): every unit's dy₁ from x and dy, handed to `sink` four
    /// values or one at a time, panel by panel and sample by sample in order inside a panel: first every group's
    /// ΣT and W of the sample's stretch and the constants of its dy₁ (`valueSums`, `SumGradient`), then the
    /// values (`valueGradients`). Each group's ΣT and r W, summed over the samples, go to `group(g, ΣT, r W)`
    /// once its panel is done. (The sink is a type, not a closure: a closure captured by the parallel body would
    /// be called per value.)
    private func forEachValueGradient<T: NormalizationScalar, Sink: ValueGradientSink>(
        _ x: UnsafePointer<T>, _ dy: UnsafePointer<T>, plan: NormalizationPlan, context ctx: NormalizationContext,
        scratch: UnsafeMutablePointer<Double>, group: (Int, Double, Double) -> Void = { _, _, _ in },
        unitSums: PhaseMemo<UnsafeMutablePointer<Double>> = .none, into sink: Sink
    ) {
        let C = shape.channels, K = units.groupSize, G = plan.groups, slotLength = slotLength
        let width = panelBlocks * blockChannels
        parallelFor(panels, cost: gradientCost) { range, slot in
            // [ΣT | r W] per group of the panel, then each group's `SumGradient` for the current sample
            let groupSums = scratch + slot * slotLength, constants = groupSums + 2 * width
            for i in range {
                let (c0, n) = panel(i), groups = G > 0 ? n / K : 0, g0 = c0 / K
                groupSums.update(repeating: 0, count: 2 * groups)
                for b in 0..<shape.batch {
                    let first = b &* C &+ c0
                    guard G > 0 else {  // the batch-norm stage alone: dy₁ = dy
                        valueUnit(channel: c0, planes: n, context: ctx)
                            .valueGradients(x, dy, first: first, channel: c0, from: 0, nil, into: sink)
                        continue
                    }
                    // one unit value for the panel's groups of this sample, each from its offset (wrapping: the
                    // panel lies inside the tensor)
                    let unit = valueUnit(channel: c0, planes: K, context: ctx)
                    for j in 0..<groups {
                        let g = g0 &+ j, bg = b &* G &+ g, r = ctx.r[bg], m = ctx.m[bg]
                        let (t, w): (Double, Double)
                        switch unitSums {
                        case .reuse(let kept): (t, w) = (kept[2 &* bg], kept[2 &* bg &+ 1])
                        case .record(let kept):
                            (t, w) = unit.valueSums(x, dy, first: first, from: j &* K, m: m)
                            kept[2 &* bg] = t; kept[2 &* bg &+ 1] = w
                        case .none: (t, w) = unit.valueSums(x, dy, first: first, from: j &* K, m: m)
                        }
                        groupSums[j] += t; groupSums[groups &+ j] += r * w
                        SumGradient.store(t: t, w: w, planes: K, m: m, r: r, weight: ctx.w[g],
                                          into: constants + 4 &* j)
                    }
                    for j in 0..<groups {
                        unit.valueGradients(x, dy, first: first, channel: c0, from: j &* K,
                                            SumGradient(constants + 4 &* j), into: sink)
                    }
                }
                for j in 0..<groups { group(g0 + j, groupSums[j], groupSums[groups + j]) }
            }
        }
    }

    /// Each unit's p and gradient for planes of several values (`UnitGradients` and p per plane), kept between
    /// the phases of one call.
    struct PlaneMemo {
        let gradients: UnitGradients, p: UnsafeMutablePointer<Double>

        /// Over `memoCount` Doubles at `storage`.
        init(_ storage: UnsafeMutablePointer<Double>, planes: Int, units: Int) {
            gradients = UnitGradients(storage: storage, planes: planes, units: units)
            p = storage + UnitGradients.count(planes: planes, units: units)
        }
    }

    /// Doubles of what phase (a) of one call keeps for its phase (c), which then reads neither x nor dy for it
    /// (the same numbers): with one-value planes each unit's ΣT and W, and which groups took the Float32 lanes
    /// (3·B·G, with a channel norm; the channel sums are `finishBackward`'s `sumsAreLocal`; the value view of
    /// short planes keeps the same for its units), else a `PlaneMemo` (6·B·C + 2·B·G) up to `memoLimit`.
    func memoCount<T: NormalizationScalar>(plan: NormalizationPlan, _: T.Type) -> Int {
        if let view = valueView(plan: plan, T.self, backward: true) {
            return view.layout.memoCount(plan: view.plan, Float.self)
        }
        if shape.spatial == 1 { return plan.groups > 0 ? 3 * shape.batch * plan.groups : 0 }
        return RowsLayout.memo(UnitGradients.count(planes: shape.planes, units: units.count) + shape.planes)
    }

    private func planeMemo(_ storage: UnsafeMutablePointer<Double>) -> PlaneMemo {
        PlaneMemo(storage, planes: shape.planes, units: units.count)
    }

    /// Backward phase (a): S₁ = Σ dy₁ and S₂ = Σ dy₁ (x - μ) per channel into `sums` ([S₁ | S₂]); with
    /// `memo` (`memoCount` Doubles) what `finishBackward` in the same call can reuse. `expansion`: the value view's
    /// (its per-value context, filled panel by panel).
    func gradientSums<T: NormalizationScalar>(plan: NormalizationPlan, x: UnsafePointer<T>, dy: UnsafePointer<T>,
                                              context ctx: NormalizationContext,
                                              into sums: UnsafeMutablePointer<Double>,
                                              memo: UnsafeMutablePointer<Double>? = nil,
                                              expansion: ValueExpansion? = nil, arena: inout ScratchArena) {
        if let view = valueView(plan: plan, T.self, backward: true) {
            return view.gradientSums(x: x, dy: dy, context: ctx, into: sums, memo: memo, arena: &arena)
        }
        let C = shape.channels
        sums.update(repeating: 0, count: 2 * C)
        let scratch = scratch(gradientCost, count: panels, arena: &arena)
        if shape.spatial == 1 {
            let sink = ValueSums(x: x, mu: ctx.mu, s1: sums, s2: sums + C)
            let unitSums: PhaseMemo<UnsafeMutablePointer<Double>> = memo.map { .record($0) } ?? .none
            // the value view's layout (`expansion`) runs the lanes, as its phase (c) always does: the count in the
            // context is the planes' (whatever a phased caller merged), whose rule `valueView` applied already
            if expansion != nil ? floatGradientLanes(T.self) : gradientLanes(T.self, context: ctx, through: true) {
                let lanes = FloatGradientLanes(channels: C, groups: plan.groups, expansion: expansion, arena: &arena)
                let partials = floatPartials(arena: &arena)
                return forEachValueGradient32(Self.floats(x), Self.floats(dy), plan: plan, context: ctx, lanes: lanes,
                                              scratch: scratch, unitSums: unitSums,
                                              into: FloatValueSums(partials: partials, channels: C, sums: sums), sink)
            }
            return forEachValueGradient(x, dy, plan: plan, context: ctx, scratch: scratch, unitSums: unitSums,
                                        into: sink)
        }
        forEachUnitGradient(x, dy, plan: plan, context: ctx, scratch: scratch,
                            memo: memo.map { .record(planeMemo($0)) } ?? .none,
                            into: PlaneSums(mu: ctx.mu, s1: sums, s2: sums + C))
    }

    func gradientSumsBytes<T: NormalizationScalar>(_: T.Type, plan: NormalizationPlan) -> Int {
        if let view = valueView(plan: plan, T.self, backward: true) { return view.gradientSumsBytes }
        return scratchBytes(gradientCost, count: panels) + floatGradientBytes(T.self, plan: plan)
    }

    /// x or dy of a call whose T is Float (`floatGradientLanes`).
    @inline(__always)
    static func floats<T: NormalizationScalar>(_ p: UnsafePointer<T>) -> UnsafePointer<Float> {
        UnsafeRawPointer(p).assumingMemoryBound(to: Float.self)
    }

    /// Backward phase (c): dx and the parameter gradients, with `sums` the batch's S₁, S₂ (through batch
    /// statistics; nil otherwise), and `memo` what `gradientSums` recorded of these x and dy, if anything.
    /// `sumsAreLocal`: `sums` are this process's own, from `gradientSums` in the same call (no merge), so the
    /// parameter gradients take them instead of summing every dy₁ again (bit for bit the same numbers: the same
    /// values added in the same order).
    func finishBackward<T: NormalizationScalar>(
        plan: NormalizationPlan, through: Bool, x: UnsafePointer<T>, dy: UnsafePointer<T>,
        dx: UnsafeMutablePointer<T>, gradients: NormalizationGradients<T>, context ctx: NormalizationContext,
        sums: UnsafePointer<Double>?, memo: UnsafeMutablePointer<Double>? = nil, sumsAreLocal: Bool = false,
        arena: inout ScratchArena
    ) {
        if let view = valueView(plan: plan, T.self, backward: true) {
            return view.finishBackward(through: through, x: x, dy: dy, dx: dx, gradients: gradients, context: ctx,
                                       sums: sums, memo: memo, sumsAreLocal: sumsAreLocal, arena: &arena)
        }
        let C = shape.channels, G = plan.groups, S = shape.spatial, hasBN = plan.batchNorm != nil
        let (local, terms, groupGradients) = BatchNormStage.backwardScratch(plan: plan, channels: C, sums: sums,
                                                                             through: through, context: ctx,
                                                                             arena: &arena)
        let scratch = scratch(gradientCost, count: panels, arena: &arena)
        let addGroup = BatchNormStage.groupGradientAdder(groupGradients, groups: G)
        let known = hasBN && sumsAreLocal ? sums : nil
        if let known { local.update(from: known, count: 2 * C) }
        let scalesOnly = BatchNormStage.scalesOnly(plan: plan, through: through, sums: sums)
        let unitSums: PhaseMemo<UnsafeMutablePointer<Double>> = memo.map { .reuse($0) } ?? .none
        if gradientLanes(T.self, context: ctx, through: through) {
            valueGradients32(x, dy, dx, plan: plan, context: ctx, terms: terms,
                             sums: hasBN && known == nil ? local : nil, group: addGroup, unitSums: unitSums,
                             scratch: scratch, arena: &arena)
        } else if S == 1 && hasBN {
            // The sums are a sink of their own, so that a call which knows them runs a loop without them.
            func run<Sink: ValueGradientSink>(_ dxSink: Sink) {
                if known == nil {
                    let sums = ValueSums(x: x, mu: ctx.mu, s1: local, s2: local + C)
                    forEachValueGradient(x, dy, plan: plan, context: ctx, scratch: scratch, group: addGroup,
                                         unitSums: unitSums, into: ValueSinkPair(first: sums, second: dxSink))
                } else {
                    forEachValueGradient(x, dy, plan: plan, context: ctx, scratch: scratch, group: addGroup,
                                         unitSums: unitSums, into: dxSink)
                }
            }
            if scalesOnly { run(ValueScaledGradient(dx: dx, a: ctx.a)) } else {
                run(ValueInputGradient(x: x, mu: ctx.mu, dx: dx, a: ctx.a, s1n: terms, k: terms + C))
            }
        } else if S == 1 {
            forEachValueGradient(x, dy, plan: plan, context: ctx, scratch: scratch, group: addGroup,
                                 unitSums: unitSums, into: ValueCopy(dx: dx))
        } else {
            let sink = PlaneInputGradient(sums: hasBN ? PlaneSums(mu: ctx.mu, s1: local, s2: local + C) : nil,
                                          addsSums: known == nil, x: x, dy: dy, dx: dx, channels: C, spatial: S,
                                          scalesOnly: scalesOnly,
                                          a: ctx.a, s1n: terms, k: terms + C)
            forEachUnitGradient(x, dy, plan: plan, context: ctx, scratch: scratch, group: addGroup,
                                memo: memo.map { .reuse(planeMemo($0)) } ?? .none, into: sink)
        }
        BatchNormStage.addGradients(gradients, plan: plan, local: local, groups: groupGradients,
                                    invSigma: ctx.invSigma)
    }

    func finishBackwardBytes<T: NormalizationScalar>(_: T.Type, plan: NormalizationPlan) -> Int {
        if let view = valueView(plan: plan, T.self, backward: true) { return view.finishBackwardBytes }
        // with the Float32 lanes and the sums unknown, their partials too (`floatPartials`)
        return BatchNormStage.backwardScratchBytes(plan: plan) + gradientSumsBytes(T.self, plan: plan)
            + (floatGradientLanes(T.self) ? floatPartialsBytes : 0)
    }
}

/// The batch-norm stage's channel sums S₁ and S₂ (`BatchNormStage.addValueSums`).
struct ValueSums<T: NormalizationScalar>: ValueGradientSink {
    let x: UnsafePointer<T>, mu: UnsafePointer<Double>, s1: UnsafeMutablePointer<Double>,
        s2: UnsafeMutablePointer<Double>

    @inline(__always)
    func lanes(_ i: Int, _ c: Int, _ dy1: SIMD4<Double>) {
        BatchNormStage.addValueSums(dy1, x: T._load4Wide(x, i), mu: mu.lanes(c), s1: s1 + c, s2: s2 + c, 0)
    }

    @inline(__always)
    func one(_ i: Int, _ c: Int, _ dy1: Double) {
        BatchNormStage.addValueSums(dy1, x: Double(x[i]), mu: mu[c], s1: &s1[c], s2: &s2[c])
    }
}

/// dx through the batch-norm stage (`BatchNormStage.dxValues`). `x`: the input, or dy where dx does not depend on
/// it (`BatchNormStage.mapInput`).
struct ValueInputGradient<T: NormalizationScalar>: ValueGradientSink {
    let x: UnsafePointer<T>, mu: UnsafePointer<Double>, dx: UnsafeMutablePointer<T>
    /// The stage's a per channel, and S₁/n and k of the batch (`BatchNormStage.dxTerms`).
    let a: UnsafePointer<Double>, s1n: UnsafePointer<Double>, k: UnsafePointer<Double>

    @inline(__always)
    func lanes(_ i: Int, _ c: Int, _ dy1: SIMD4<Double>) {
        let v = BatchNormStage.dxValues(dy1, x: T._load4Wide(x, i), mu: mu.lanes(c), a: a.lanes(c),
                                        s1n: s1n.lanes(c), k: k.lanes(c))
        T._store4Narrow(v, dx, i)
    }

    @inline(__always)
    func one(_ i: Int, _ c: Int, _ dy1: Double) {
        dx[i] = T(BatchNormStage.dxValue(dy1, x: Double(x[i]), mu: mu[c], a: a[c], s1n: s1n[c], k: k[c]))
    }
}

/// dx = a dy₁ (`BatchNormStage.scalesOnly`).
struct ValueScaledGradient<T: NormalizationScalar>: ValueGradientSink {
    let dx: UnsafeMutablePointer<T>, a: UnsafePointer<Double>

    @inline(__always)
    func lanes(_ i: Int, _ c: Int, _ dy1: SIMD4<Double>) { T._store4Narrow(a.lanes(c) * dy1, dx, i) }

    @inline(__always)
    func one(_ i: Int, _ c: Int, _ dy1: Double) { dx[i] = T(a[c] * dy1) }
}

/// Two sinks for every value, `first` then `second`.
struct ValueSinkPair<First: ValueGradientSink, Second: ValueGradientSink>: ValueGradientSink {
    let first: First, second: Second

    @inline(__always)
    func lanes(_ i: Int, _ c: Int, _ dy1: SIMD4<Double>) { first.lanes(i, c, dy1); second.lanes(i, c, dy1) }

    @inline(__always)
    func one(_ i: Int, _ c: Int, _ dy1: Double) { first.one(i, c, dy1); second.one(i, c, dy1) }
}

/// dx = dy₁, without a batch-norm stage.
struct ValueCopy<T: NormalizationScalar>: ValueGradientSink {
    let dx: UnsafeMutablePointer<T>

    @inline(__always)
    func lanes(_ i: Int, _ c: Int, _ dy1: SIMD4<Double>) { T._store4Narrow(dy1, dx, i) }

    @inline(__always)
    func one(_ i: Int, _ c: Int, _ dy1: Double) { dx[i] = T(dy1) }
}

/// What the backward of planes of several values does with each unit's gradient: `unit(b, c, K, p, E,
/// gradient, scratch for P, Q, R)` for sample b's K planes from channel c (means `p`).
protocol PlaneGradientSink {
    func unit(_ b: Int, _ c: Int, _ K: Int, _ p: UnsafePointer<Double>, _ e: Double, _ g: NormalizationUnit.Gradient,
              _ coefficients: UnsafeMutablePointer<Double>)
}

/// The batch-norm stage's channel sums S₁ and S₂ (`BatchNormStage.addSums`).
struct PlaneSums: PlaneGradientSink {
    let mu: UnsafePointer<Double>, s1: UnsafeMutablePointer<Double>, s2: UnsafeMutablePointer<Double>

    @inline(__always)
    func unit(_ b: Int, _ c: Int, _ K: Int, _ p: UnsafePointer<Double>, _ e: Double, _ g: NormalizationUnit.Gradient,
              _ coefficients: UnsafeMutablePointer<Double>) {
        BatchNormStage.addSums(K, sum: g.sum, dot: g.dot, p: p, mu: mu + c, s1: s1 + c, s2: s2 + c)
    }
}

/// The channel sums (`sums`, nil without a batch-norm stage; not added when `addsSums` is false: known
/// already) and dx = P dy + Q (x - p) + R per plane (`BatchNormStage.dxMaps`; dx = dy₁ without the stage). `x`: the
/// input, or dy where dx does not depend on it (`BatchNormStage.mapInput`); the sums come from the unit's gradient.
struct PlaneInputGradient<T: NormalizationScalar>: PlaneGradientSink {
    let sums: PlaneSums?, addsSums: Bool
    let x: UnsafePointer<T>, dy: UnsafePointer<T>, dx: UnsafeMutablePointer<T>
    let channels: Int, spatial: Int
    /// Whether dx = P dy (`BatchNormStage.scalesOnly`): mapped from dy alone.
    let scalesOnly: Bool
    /// The stage's a per channel, and S₁/n and k of the batch (`BatchNormStage.dxTerms`).
    let a: UnsafePointer<Double>, s1n: UnsafePointer<Double>, k: UnsafePointer<Double>

    @inline(__always)
    func unit(_ b: Int, _ c: Int, _ K: Int, _ p: UnsafePointer<Double>, _ e: Double, _ g: NormalizationUnit.Gradient,
              _ coefficients: UnsafeMutablePointer<Double>) {
        let P = coefficients, Q = P + K, R = Q + K, S = spatial, first = b * channels + c
        if let sums {
            if addsSums { sums.unit(b, c, K, p, e, g, coefficients) }
            BatchNormStage.dxMaps(K, e: e, gradient: g, p: p, mu: sums.mu + c, a: a + c, s1n: s1n + c, k: k + c,
                                  P: P, Q: Q, R: R)
        } else {  // dx = dy₁
            g.maps(K, e: e, P: P, Q: Q, R: R)
        }
        RowsLayout.withShortPlane(S) { S in
            for j in 0..<K {
                if scalesOnly {
                    WideMap.values(dy, dx, at: (first &+ j) &* S, count: S, centre: 0, scale: P[j], offset: 0)
                } else {
                    WideMap.gradients(dy, x, dx, at: (first &+ j) &* S, count: S, centre: p[j], p: P[j], q: Q[j],
                                      r: R[j])
                }
            }
        }
    }
}
