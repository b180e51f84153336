/// Short planes of Float input seen as one-value planes: a [B, C, S] input whose units (K planes of S values) are
/// whole 8-lane vectors is, to the channel-norm stage, a [B, C·S] input in groups of K·S values whose batch-norm
/// constants μ, a, β repeat each channel's S times. Its output then runs `applyValues`, and its backward
/// `forEachValueGradient32`, in Float32 lanes where `RowRounding` accepts a group (the batch statistics and the
/// batch-norm stage's gradient sums, per channel, stay the short planes' own).
struct RowsValueView {
    /// The [B, C·S] layout and plan of the view, the plan of the planes themselves, and S.
    let layout: RowsLayout, plan: NormalizationPlan, planes: NormalizationPlan, spatial: Int

    /// Scratch of `apply`: the per-value constants, then what the view's `applyValues` takes.
    var bytes: Int {
        ScratchArena.bytes(3 * layout.shape.channels, of: Double.self) + layout.applyBytes(Float.self, plan: plan)
    }

    /// The context of the view: the planes' context with per-value μ, a and β (3·C·S Doubles of `arena`).
    func context(_ ctx: NormalizationContext, arena: inout ScratchArena) -> NormalizationContext {
        // Built per channel, each value a store: this runs before the parallel passes, on one thread (an integer
        // division per value, or conversions per value, left the other thread waiting for a tenth of the call).
        let (view, expansion) = emptyContext(ctx, arena: &arena)
        expansion.expand(first: 0, count: layout.shape.channels)
        return view
    }

    /// `context` with its per-value numbers not filled yet: the expansion that fills them, channel range by
    /// channel range (the backward's panels, in its parallel pass).
    func emptyContext(_ ctx: NormalizationContext, arena: inout ScratchArena)
        -> (NormalizationContext, ValueExpansion)
    {
        let n = layout.shape.channels, constants = arena.take(3 * n, of: Double.self)
        let view = NormalizationContext(valuesOf: ctx, shape: layout.shape, mu: constants, a: constants + n,
                                        beta: constants + 2 * n)
        let channels = (mu: UnsafePointer(ctx.mu), a: UnsafePointer(ctx.a), beta: UnsafePointer(ctx.beta))
        return (view, ValueExpansion(spatial: spatial, channelCount: n / spatial, channels: channels,
                                     values: (view.mu, view.a, view.beta)))
    }

    /// The output of every unit, and its m and r in the context, as `RowsLayout.apply` writes them.
    func apply<T: NormalizationScalar>(x: UnsafePointer<T>, y: UnsafeMutablePointer<T>, bias: UnsafePointer<T>?,
                                       context ctx: NormalizationContext, arena: inout ScratchArena) {
        let n = layout.shape.channels, S = spatial, C = n / S, G = plan.groups
        let view = context(ctx, arena: &arena)
        let lanes = Float.ValueConstants(count: C, repeating: S, mu: ctx.mu, a: ctx.a, beta: ctx.beta,
                                         storage: arena.take(4 * n, of: Float.self))
        let reach = arena.take(G, of: Double.self)
        RowRounding.betaReach(ctx.beta, groups: G, size: C / G, into: reach)  // the same as over the values
        layout.applyValues(plan: plan, x: x, y: y, bias: bias, context: view, lanes: (lanes, UnsafePointer(reach)),
                           arena: &arena)
    }
}

extension RowsLayout {
    /// The value view of this layout's short planes for input of type T, when its channel-norm stage can run on
    /// it in Float32 lanes: Float input, units of a whole number of 8-lane vectors, and planes of 2 to 4 values
    /// (but not one sample's planes of two, `NormalizationShape.twoValuesAChannel`).
    /// The view measures the groups again from x (where a training forward has the planes' moments in `memo`
    /// already) and builds per-value constants on one thread, which longer planes pay for: A/B against the
    /// planes layout, training forward 0.70-0.91 for S = 2 to 4, 0.94 for 6, 1.11-1.50 from 8 up; eval 0.50-0.52
    /// for S = 4, 0.68-0.74 for 9, but 1.06 for 12 on 16 samples. The `backward` takes the view for planes of
    /// up to 4 values, and of up to 15 from 16 samples. Forward+backward against the planes layout (fresh process
    /// pairs, 2 threads): 0.41-0.58 on [64, 512, 2, 2], 0.65 on [16, 256, 2, 2], 0.85-0.93 on [8, 512 or 2048,
    /// 2, 2], 0.88 on [4, 512 or 1024, 2, 2], 1.03 on [2, 512, 2, 2]; 0.72-0.79 on [32, 256 or 512, 3, 3],
    /// 0.88-0.91 on [16, 256 or 512, 3, 3]; but on 8 samples 0.94 for [8, 256, 3, 3], 1.07-1.11 for
    /// [8, 1024, 2, 3] and [8, 512, 3, 3], whose long groups (144-192 values) make 11-16 panels, split unevenly
    /// over two threads.
    func valueView<T: NormalizationScalar>(plan: NormalizationPlan, _: T.Type, backward: Bool = false)
        -> RowsValueView?
    {
        let S = shape.spatial, B = shape.batch
        // (one sample's planes of two: not in the forward either, whose Float32 lanes' group moments, kept in the
        // context, the backward would read)
        let fits = (backward ? S <= 4 || (S <= 15 && B >= 16) : S <= 4) && !shape.twoValuesAChannel
        guard T.self == Float.self, S > 1, fits, units.hasChannelNorm, (units.groupSize * S) & 7 == 0,
              let viewShape = try? NormalizationShape(batch: shape.batch, channels: shape.channels * S, spatial: 1)
        else { return nil }
        var viewPlan = plan
        viewPlan.channels = viewShape.channels
        return RowsValueView(layout: RowsLayout(plan: viewPlan, shape: viewShape), plan: viewPlan, planes: plan,
                             spatial: S)
    }
}

/// The backward through the view: its units' sums and values in Float32 lanes where `RowRounding` lets them
/// (`RowsLayout.forEachValueGradient32` on the [B, C·S] view), the batch-norm stage's sums S₁, S₂ per value of a
/// plane, then added over the plane's S values in order: the channel's.
extension RowsValueView {
    private var values: Int { layout.shape.channels }

    /// Scratch of `gradientSums`: the per-value constants and sums, and what the view's phase (a) takes.
    var gradientSumsBytes: Int {
        ScratchArena.bytes(3 * values, of: Double.self) + ScratchArena.bytes(2 * values, of: Double.self)
            + layout.gradientSumsBytes(Float.self, plan: plan)
    }

    /// Scratch of `finishBackward`: the planes' batch-norm scratch, the per-value constants, terms and sums, and
    /// what the view's phase (c) takes.
    var finishBackwardBytes: Int {
        // the view's phase (c) as `RowsLayout.finishBackward` takes it, less the batch-norm scratch it leaves to
        // the planes: its pass scratch and Float32 constants, and the channel sums' Float32 partials
        BatchNormStage.backwardScratchBytes(plan: planes) + ScratchArena.bytes(3 * values, of: Double.self)
            + 2 * ScratchArena.bytes(2 * values, of: Double.self) + layout.gradientSumsBytes(Float.self, plan: plan)
            + layout.floatPartialsBytes
    }

    /// Backward phase (a) (`RowsLayout.gradientSums`): the planes' S₁, S₂ per channel into `sums` ([S₁ | S₂]),
    /// and with `memo` (the view's `memoCount`) what `finishBackward` in the same call reuses.
    func gradientSums<T: NormalizationScalar>(x: UnsafePointer<T>, dy: UnsafePointer<T>,
                                              context ctx: NormalizationContext,
                                              into sums: UnsafeMutablePointer<Double>,
                                              memo: UnsafeMutablePointer<Double>?, arena: inout ScratchArena) {
        let (view, expansion) = emptyContext(ctx, arena: &arena), perValue = arena.take(2 * values, of: Double.self)
        layout.gradientSums(plan: plan, x: x, dy: dy, context: view, into: perValue, memo: memo,
                            expansion: expansion, arena: &arena)
        fold(perValue, into: sums)
    }

    /// Backward phase (c) (`RowsLayout.finishBackward`, whose arguments these are): dx and the parameter
    /// gradients, the batch-norm stage's terms S₁/n and k repeated over each plane's values.
    func finishBackward<T: NormalizationScalar>(
        through: Bool, x: UnsafePointer<T>, dy: UnsafePointer<T>, dx: UnsafeMutablePointer<T>,
        gradients: NormalizationGradients<T>, context ctx: NormalizationContext, sums: UnsafePointer<Double>?,
        memo: UnsafeMutablePointer<Double>?, sumsAreLocal: Bool, arena: inout ScratchArena
    ) {
        let n = values, S = spatial, C = n / S, G = plan.groups, hasBN = planes.batchNorm != nil
        let (local, terms, groupGradients) = BatchNormStage.backwardScratch(plan: planes, channels: C, sums: sums,
                                                                             through: through, context: ctx,
                                                                             arena: &arena)
        let known = hasBN && sumsAreLocal ? sums : nil
        if let known { local.update(from: known, count: 2 * C) }
        var (view, expansion) = emptyContext(ctx, arena: &arena)
        let perValue = arena.take(2 * n, of: Double.self)
        expansion.terms = (UnsafePointer(terms), perValue)  // [S₁/n | k] of each value, as the panels need them
        let valueSums = hasBN && known == nil ? arena.take(2 * n, of: Double.self) : nil
        valueSums?.update(repeating: 0, count: 2 * n)
        let scratch = layout.scratch(layout.gradientCost, count: layout.panels, arena: &arena)
        layout.valueGradients32(x, dy, dx, plan: plan, context: view, terms: perValue, sums: valueSums,
                                group: BatchNormStage.groupGradientAdder(groupGradients, groups: G),
                                unitSums: memo.map { .reuse($0) } ?? .none, scratch: scratch,
                                expansion: expansion, arena: &arena)
        if let valueSums { fold(valueSums, into: local) }
        BatchNormStage.addGradients(gradients, plan: planes, local: local, groups: groupGradients,
                                    invSigma: ctx.invSigma)
    }

    /// [S₁ | S₂] per channel (2·C, written) from the view's per value (2·C·S): each plane's S values
    /// added in order.
    private func fold(_ perValue: UnsafePointer<Double>, into sums: UnsafeMutablePointer<Double>) {
        let count = 2 * values / spatial  // both halves at once: a plane's values never straddle them
        @inline(__always) func fold(_ S: Int) {
            var i = 0
            for c in 0..<count {
                var total = 0.0
                for _ in 0..<S { total += perValue[i]; i &+= 1 }
                sums[c] = total
            }
        }
        RowsLayout.withShortPlane(spatial, fold)
    }
}

/// The per-value numbers of a `RowsValueView`'s context (μ, a, β; in the backward's phase (c) also the batch-norm
/// stage's [S₁/n | k]), each a channel's repeated over the S values of its plane, filled for a range of the
/// view's channels at a time: in the backward, by each panel as it begins (`RowsLayout.FloatGradientLanes`), so
/// that these O(C·S) stores run in parallel.
struct ValueExpansion {
    let spatial: Int, channelCount: Int
    let channels: (mu: UnsafePointer<Double>, a: UnsafePointer<Double>, beta: UnsafePointer<Double>)
    let values: (mu: UnsafeMutablePointer<Double>, a: UnsafeMutablePointer<Double>, beta: UnsafeMutablePointer<Double>)
    /// [S₁/n | k] per channel (2·C) and per value (2·C·S), when a phase (c) needs them.
    var terms: (channels: UnsafePointer<Double>, values: UnsafeMutablePointer<Double>)? = nil

    /// The view's values c0..<c0+n (whole planes: c0 and n multiples of S).
    func expand(first c0: Int, count n: Int) {
        let S = spatial, first = c0 / S, count = n / S
        @inline(__always) func repeated(_ from: UnsafePointer<Double>, _ to: UnsafeMutablePointer<Double>) {
            RowsLayout.withShortPlane(S) { S in
                var i = c0
                for c in first..<first &+ count {
                    let v = from[c]
                    for _ in 0..<S { to[i] = v; i &+= 1 }
                }
            }
        }
        repeated(channels.mu, values.mu); repeated(channels.a, values.a); repeated(channels.beta, values.beta)
        if let terms {
            let C = channelCount, perValue = C * S
            repeated(terms.channels, terms.values); repeated(terms.channels + C, terms.values + perValue)
        }
    }
}
