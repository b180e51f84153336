/// A memory layout whose plane moments are kept in the context: planes ([B, C, S], S ≥ 16) and channels-last
/// ([B, S, C]). Such a layout supplies only the passes that touch the data; the phases around them (below) are
/// the same for both and call the stages (`BatchNormStage`, `NormalizationUnit`) for every number in between.
protocol StoredLayout {
    var shape: NormalizationShape { get }

    /// Bytes of call scratch the passes take from the arena (beyond what the phases below reserve).
    func scratchBytes<T: NormalizationScalar>(_: T.Type) -> Int

    /// Forward pass 1: p (mean) and q (centred sum of squares) of every plane (b, c), into B·C slots each.
    func planeMoments<T: NormalizationScalar>(_ x: UnsafePointer<T>, p: UnsafeMutablePointer<Double>,
                                              q: UnsafeMutablePointer<Double>, arena: inout ScratchArena)

    /// True when `mapPlanes` maps a unit's planes (each unit right after its coefficients, while its planes are
    /// in cache); false when `map` sweeps the data once, computing each sample's coefficients where it first
    /// needs them.
    var mapsPerPlane: Bool { get }

    /// Forward pass 1 on `count` planes from `first` alone (used only when `mapsPerPlane`): the same numbers
    /// `planeMoments` gives them.
    func planeMoments<T: NormalizationScalar>(first: Int, count: Int, _ x: UnsafePointer<T>,
                                              p: UnsafeMutablePointer<Double>, q: UnsafeMutablePointer<Double>)

    /// Forward pass 2 on `count` planes from `first` (used only when `mapsPerPlane`): out = scale (x - p) + offset,
    /// plane first + k with centres[k], scales[k] and offsets[k].
    func mapPlanes<T: NormalizationScalar>(first: Int, count: Int, _ x: UnsafePointer<T>, _ y: UnsafeMutablePointer<T>,
                                           centres: UnsafePointer<Double>, scales: UnsafePointer<Double>,
                                           offsets: UnsafePointer<Double>)

    /// Forward pass 2 over every plane: out = A (x - p) + M with A, M per plane (`scale`, `offset`), where
    /// sample b's A and M (and its p, which they may move) are written by `coefficients(b)`: `map` calls it once
    /// per sample, on whichever thread first needs that sample's maps (`OncePerIndex`), before it maps any of
    /// the sample's values. So the units' coefficients run inside the sweep, spread over its threads.
    func map<T: NormalizationScalar>(_ x: UnsafePointer<T>, _ y: UnsafeMutablePointer<T>, p: UnsafePointer<Double>,
                                     scale: UnsafePointer<Double>, offset: UnsafePointer<Double>,
                                     coefficients: (Int) -> Void, arena: inout ScratchArena)

    /// Plane i's first element and the distance between its values (planes: i·S and 1; channels-last: its sample's
    /// first element plus its channel, and C).
    func planeElements(_ plane: Int) -> (first: Int, stride: Int)

    /// Backward pass 1: T = Σ dy and U = Σ dy (x - p) of every plane.
    func gradientSums<T: NormalizationScalar>(_ x: UnsafePointer<T>, _ dy: UnsafePointer<T>, p: UnsafePointer<Double>,
                                              t: UnsafeMutablePointer<Double>, u: UnsafeMutablePointer<Double>,
                                              arena: inout ScratchArena)

    /// Backward pass 2: dx = P dy + Q (x - p) + R with P, Q, R per plane (`coefficients` holds P, Q, R in
    /// blocks of B·C), the lanes centred at each plane's x mean p and dy mean `dySums`/S (T). dx may alias dy.
    /// Sample b's P, Q, R are made by `maps(b)`, which `combine` calls once per sample, on whichever thread first
    /// needs them (`OncePerIndex`), before it writes any of the sample's dx.
    func combine<T: NormalizationScalar>(_ dy: UnsafePointer<T>, _ x: UnsafePointer<T>, _ dx: UnsafeMutablePointer<T>,
                                         p: UnsafePointer<Double>, dySums: UnsafePointer<Double>,
                                         coefficients: UnsafePointer<Double>, maps: (Int) -> Void,
                                         arena: inout ScratchArena)
}

/// The units of a shape: sample b's groups of K channels (single channels without a channel-norm stage).
struct Units {
    let channels: Int, groupSize: Int, count: Int
    let hasChannelNorm: Bool

    init(plan: NormalizationPlan, shape: NormalizationShape) {
        channels = shape.channels
        groupSize = plan.channelNorm.map { shape.channels / $0.groups } ?? 1
        count = shape.planes / groupSize
        hasChannelNorm = plan.channelNorm != nil
    }

    /// The channel norm's eps as the forward recorded it in the context (nil without that stage).
    @inline(__always)
    func groupEps(_ ctx: NormalizationContext) -> Double? { hasChannelNorm ? ctx.groupEps : nil }

    /// (first plane, first channel, group) of unit `u`.
    @inline(__always)
    func locate(_ u: Int) -> (plane: Int, channel: Int, group: Int) {
        let perSample = channels / groupSize, b = u / perSample, g = u - b * perSample
        return (b * channels + g * groupSize, g * groupSize, g)
    }

    /// Unit `u` over the context's plane moments.
    @inline(__always)
    func unit(_ u: Int, spatial: Int, context ctx: NormalizationContext) -> NormalizationUnit {
        let (plane, c0, _) = locate(u)
        return NormalizationUnit(planes: groupSize, spatial: spatial, groupEps: groupEps(ctx), p: ctx.p + plane,
                                 q: ctx.q + plane, mu: ctx.mu + c0, a: ctx.a + c0, beta: ctx.beta + c0)
    }
}

/// `parallelFor`'s cost of one unit's backward: about 550 + 25·K instructions for K planes (callgrind, K = 2 to
/// 16), what a sweep spends on some 256 values. So 256 units or more take the workers.
let unitGradientCost = 256

extension StoredLayout {
    /// Phase (a): plane moments into the context, and the batch's moments per channel into `channelMoments`.
    func localMoments<T: NormalizationScalar>(
        _ x: UnsafePointer<T>, context ctx: NormalizationContext, into channelMoments: UnsafeMutablePointer<Moments>?,
        arena: inout ScratchArena
    ) {
        planeMoments(x, p: ctx.p, q: ctx.q, arena: &arena)
        guard let channelMoments else { return }
        let C = shape.channels
        BatchNormStage.batchMoments(batch: shape.batch, spatial: shape.spatial, width: C, p: UnsafePointer(ctx.p),
                                    q: UnsafePointer(ctx.q), stride: C, into: channelMoments)
    }

    /// Arena bytes of `localMoments`.
    func localMomentsBytes<T: NormalizationScalar>(_: T.Type) -> Int {
        scratchBytes(T.self)
    }

    /// Phase (c), after the batch-norm stage is in the context: each unit's m, r and map, and the output. With
    /// `measure` (only when `mapsPerPlane`), each unit first measures its own planes (pass 1) into the context.
    func apply<T: NormalizationScalar>(
        plan: NormalizationPlan, x: UnsafePointer<T>, y: UnsafeMutablePointer<T>, bias: UnsafePointer<T>?,
        context ctx: NormalizationContext, measure: Bool, arena: inout ScratchArena
    ) {
        let units = Units(plan: plan, shape: shape), K = units.groupSize, S = shape.spatial, G = plan.groups
        let p = UnsafePointer(ctx.p)
        /// Unit u's m, r into the context and its planes' maps into `scales`, `offsets`.
        func coefficients(_ u: Int, scales: UnsafeMutablePointer<Double>, offsets: UnsafeMutablePointer<Double>) {
            let (plane, c, g) = units.locate(u)
            if G == 0 { NormalizationUnit.recentre(ctx.p + plane, channel: ctx.mu[c]) }  // one plane a unit
            let (m, r) = units.unit(u, spatial: S, context: ctx).forward(
                weight: G > 0 ? ctx.w[g] : 1, bias: bias.map { Double($0[g]) } ?? 0, scales: scales, offsets: offsets)
            if G > 0 { ctx.m[u] = m; ctx.r[u] = r }
        }
        if mapsPerPlane {  // each unit maps its planes while they are in cache
            // the slots from the loop's own cost: with `measure` it may run on more threads than without
            let cost = (measure ? 2 : 1) * K * S, slots = parallelSlots(units.count, cost: cost)
            let scratch = arena.take(2 * slots * K, of: Double.self)
            parallelFor(units.count, cost: cost) { range, slot in
                assert(slot < slots, "a thread's slot beyond the scratch reserved for the call")
                let scales = scratch + 2 * slot * K, offsets = scales + K
                for u in range {
                    let first = units.locate(u).plane
                    if measure { planeMoments(first: first, count: K, x, p: ctx.p, q: ctx.q) }
                    coefficients(u, scales: scales, offsets: offsets)
                    mapPlanes(first: first, count: K, x, y, centres: p + first, scales: scales, offsets: offsets)
                }
            }
            return
        }
        // each sample's units as the sweep first needs them: a loop of their own before it took [8, 256, 14, 14]'s
        // channels-last forward 12 us of 89 on two threads, no less than on one (its 256 units in four ranges,
        // the second thread starting a microsecond late on the caller's batch-norm numbers)
        let scales = arena.take(2 * shape.planes, of: Double.self), offsets = scales + shape.planes
        let perSample = units.count / shape.batch
        map(x, y, p: p, scale: scales, offset: offsets, coefficients: { b in
            for u in b * perSample..<(b + 1) * perSample {
                let first = units.locate(u).plane
                coefficients(u, scales: scales + first, offsets: offsets + first)
            }
        }, arena: &arena)
    }

    func applyBytes<T: NormalizationScalar>(_: T.Type, plan: NormalizationPlan) -> Int {
        let units = Units(plan: plan, shape: shape)
        // `apply`'s largest cost (with `measure`), so that its slots fit either way
        let slots = parallelSlots(units.count, cost: 2 * units.groupSize * shape.spatial)
        return scratchBytes(T.self) + ScratchArena.bytes(2 * (mapsPerPlane ? slots * units.groupSize : shape.planes),
                                                         of: Double.self)
    }

    /// Backward phase (a): T and U of every plane into `t`, `u`, and with `sums` the batch's S₁ = Σ dy₁ and
    /// S₂ = Σ dy₁ (x - μ) per channel ([S₁ | S₂], 2·C values), for which every unit's gradient goes to
    /// `unitGradients` (where phase (c) of the same call may take them). `through`: the forward used batch
    /// statistics in training.
    func gradientSums<T: NormalizationScalar>(
        plan: NormalizationPlan, through: Bool, x: UnsafePointer<T>, dy: UnsafePointer<T>,
        context ctx: NormalizationContext, t: UnsafeMutablePointer<Double>, u: UnsafeMutablePointer<Double>,
        into sums: UnsafeMutablePointer<Double>?, unitGradients gradient: UnitGradients, arena: inout ScratchArena
    ) {
        gradientSums(x, dy, p: ctx.p, t: t, u: u, arena: &arena)
        resumInFloat64(plan: plan, through: through, x, dy, context: ctx, t: t, u: u)
        guard let sums else { return }
        unitGradients(plan: plan, context: ctx, t: t, u: u, into: gradient, arena: &arena)
        channelSums(gradient, context: ctx, into: sums)
    }

    /// Arena bytes of `gradientSums`, besides its `UnitGradients` (`unitGradientsCount` Doubles).
    func gradientSumsBytes<T: NormalizationScalar>(_: T.Type, plan: NormalizationPlan) -> Int {
        scratchBytes(T.self) + unitGradientsBytes(plan: plan)
    }

    /// Backward phase (c): with `sums` the batch's S₁, S₂ (through batch statistics; nil otherwise), dx, and
    /// the parameter gradients (each process's own share: S₁, S₂ of its planes for dβ, dγ). The units'
    /// gradients go to `unitGradients` (then overwritten), unless `computed`: phase (a) of the same call left
    /// them there, and `sums` are its own (not merged).
    func finishBackward<T: NormalizationScalar>(
        plan: NormalizationPlan, through: Bool, x: UnsafePointer<T>, dy: UnsafePointer<T>,
        dx: UnsafeMutablePointer<T>, gradients: NormalizationGradients<T>, context ctx: NormalizationContext,
        t: UnsafePointer<Double>, u: UnsafePointer<Double>, sums: UnsafePointer<Double>?,
        unitGradients gradient: UnitGradients, computed: Bool = false, arena: inout ScratchArena
    ) {
        let C = shape.channels, G = plan.groups, planes = shape.planes
        if !computed { unitGradients(plan: plan, context: ctx, t: t, u: u, into: gradient, arena: &arena) }
        let (local, terms, groupGradients) = BatchNormStage.backwardScratch(plan: plan, channels: C, sums: sums,
                                                                             through: through, context: ctx,
                                                                             arena: &arena)
        if G > 0 {  // units in order, so each group's gradients add up over samples in a fixed order
            let units = Units(plan: plan, shape: shape)
            let add = BatchNormStage.groupGradientAdder(groupGradients, groups: G)
            for unit in 0..<units.count {
                add(units.locate(unit).group, gradient.biasGradient[unit], gradient.weightGradient[unit])
            }
        }
        let maps = gradient.maps  // [E | F | H], made [P | Q | R] in place when a batch-norm stage comes first
        if plan.batchNorm != nil {
            // this process's S₁, S₂ for dβ, dγ: phase (a) of this call summed the same numbers into `sums`
            if computed, let sums { local.update(from: sums, count: 2 * C) } else {
                channelSums(gradient, context: ctx, into: local)
            }
        }
        /// Sample b's [E | F | H] made [P | Q | R], through the batch-norm stage.
        func dxMaps(_ b: Int) {
            guard plan.batchNorm != nil else { return }
            let at = b * C
            BatchNormStage.dxMaps(C, e: maps + at, f: maps + planes + at, h: maps + 2 * planes + at, p: ctx.p + at,
                                  mu: ctx.mu, a: ctx.a, s1n: terms, k: terms + C)
        }
        BatchNormStage.addGradients(gradients, plan: plan, local: local, groups: groupGradients,
                                    invSigma: ctx.invSigma)
        if BatchNormStage.scalesOnly(plan: plan, through: through, sums: sums) {  // dx = P dy, as y = A x
            for b in 0..<shape.batch { dxMaps(b) }
            let zeros = arena.take(planes, of: Double.self)
            zeros.update(repeating: 0, count: planes)
            mapEveryPlane(dy, dx, p: zeros, scale: maps, offset: zeros, arena: &arena)
        } else {  // each sample's maps as the sweep first needs them, spread over its threads
            combine(dy, x, dx, p: ctx.p, dySums: t, coefficients: maps, maps: dxMaps, arena: &arena)
        }
    }

    /// `map`, or where a layout maps planes apart (`mapsPerPlane`: planes of one chunk, which `mapPlanes` takes
    /// eight at a time when they are short), `mapPlanes` over every plane, in parallel.
    func mapEveryPlane<T: NormalizationScalar>(_ x: UnsafePointer<T>, _ y: UnsafeMutablePointer<T>,
                                               p: UnsafePointer<Double>, scale: UnsafePointer<Double>,
                                               offset: UnsafePointer<Double>, arena: inout ScratchArena) {
        guard mapsPerPlane else {
            return map(x, y, p: p, scale: scale, offset: offset, coefficients: { _ in }, arena: &arena)
        }
        parallelFor(shape.planes, cost: shape.spatial) { range, _ in
            let first = range.lowerBound
            mapPlanes(first: first, count: range.count, x, y, centres: p + first, scales: scale + first,
                      offsets: offset + first)
        }
    }

    /// Arena bytes of `finishBackward`, besides its `UnitGradients`: with a plan of `scalesOnly`, its map's zero
    /// centres and offsets too.
    func finishBackwardBytes<T: NormalizationScalar>(_: T.Type, plan: NormalizationPlan) -> Int {
        scratchBytes(T.self) + unitGradientsBytes(plan: plan) + BatchNormStage.backwardScratchBytes(plan: plan)
            + (plan.channelNorm == nil ? ScratchArena.bytes(shape.planes, of: Double.self) : 0)
    }

    /// Doubles of a `UnitGradients` of this shape.
    func unitGradientsCount(plan: NormalizationPlan) -> Int {
        UnitGradients.count(planes: shape.planes, units: Units(plan: plan, shape: shape).count)
    }

    /// Every unit's backward (`NormalizationUnit.backward`) into `out`, units in parallel (each writes only its
    /// own slots).
    func unitGradients(plan: NormalizationPlan, context ctx: NormalizationContext, t: UnsafePointer<Double>,
                       u: UnsafePointer<Double>, into out: UnitGradients, arena: inout ScratchArena) {
        let units = Units(plan: plan, shape: shape), G = plan.groups, K = units.groupSize
        let yBar = arena.take(parallelSlots(units.count, cost: unitGradientCost) * K, of: Double.self)
        parallelFor(units.count, cost: unitGradientCost) { range, slot in
            for unit in range {
                let (first, _, g) = units.locate(unit)
                let (e, bias, w) = units.unit(unit, spatial: shape.spatial, context: ctx).backward(
                    t: t + first, u: u + first, m: G > 0 ? ctx.m[unit] : 0, r: G > 0 ? ctx.r[unit] : 0,
                    weight: G > 0 ? ctx.w[g] : 1, yBar: yBar + slot * K, into: out.gradient(first: first))
                out.record(unit: unit, first: first, planes: K, e: e, bias: bias, weight: w)
            }
        }
    }

    func unitGradientsBytes(plan: NormalizationPlan) -> Int {
        let units = Units(plan: plan, shape: shape), K = units.groupSize
        return ScratchArena.bytes(parallelSlots(units.count, cost: unitGradientCost) * K, of: Double.self)
    }

    /// The batch-norm stage's S₁ += Σ dy₁ and S₂ += Σ dy₁ (x - μ) per channel from every plane's, samples in
    /// order, into `sums` ([S₁ | S₂], zeroed first).
    func channelSums(_ gradient: UnitGradients, context ctx: NormalizationContext,
                     into sums: UnsafeMutablePointer<Double>) {
        let C = shape.channels
        sums.update(repeating: 0, count: 2 * C)
        for b in 0..<shape.batch {
            let at = b * C
            BatchNormStage.addSums(C, sum: gradient.sum + at, dot: gradient.dot + at, p: ctx.p + at, mu: ctx.mu,
                                   s1: sums, s2: sums + C)
        }
    }
}
