extension NormalizationEngine {
    /// Gradient of the forward that filled `context`: writes dx and *adds* the parameter gradients.
    ///
    /// With T = Σ_s dy and U = Σ_s dy (x - p) per plane from one pass over (x, dy), every gradient is closed
    /// form (`NormalizationUnit.backward`, `BatchNormStage`): dy₁ = E dy + F (x - p) + H per plane through the
    /// channel norm, the batch-norm stage's S₁ = Σ dy₁ and S₂ = Σ dy₁ (x - μ) per channel, and
    /// dx = P dy + Q (x - p) + R, one more pass. The phases, for sums over several processes:
    /// (a) `localGradientSums`, (b) `mergeGradientSums`, (c) `finishBackward`; this chains them.
    ///
    /// - Parameters:
    ///   - x: the input of that forward, unchanged since.
    ///   - dx: may alias `dy`.
    /// - Throws: `.noForward` if `context` was not filled by a forward of this plan, shape and memory format;
    ///   `.nonFinite` with `NaNPolicy.raise` if dy holds NaN or infinity (before anything is written).
    @_specialize(where T == Float)
    @_specialize(where T == Double)
    public static func backward<T: NormalizationScalar>(
        plan: NormalizationPlan, shape: NormalizationShape,
        x: UnsafePointer<T>, dy: UnsafePointer<T>, dx: UnsafeMutablePointer<T>,
        gradients: NormalizationGradients<T>, context: UnsafeBufferPointer<Double>
    ) throws(BCNError) {
        let pinned = BCNThreads.pin()  // one thread count for the scratch and the loops
        defer { BCNThreads.unpin(pinned) }
        // The context is only read here: T and U go to the call's scratch.
        let buffer = UnsafeMutableBufferPointer(mutating: context)
        let (ctx, through) = try forwardContext(plan: plan, shape: shape, buffer, of: T.self)
        try checkFinite(plan: plan, shape: shape, dy, what: "the output gradient dy")
        let layout = Layout(plan: plan, shape: shape), C = shape.channels
        let sumsBytes = ScratchArena.bytes(2 * C, of: Double.self)
        switch layout {
        case .planes(let l):
            try storedBackward(l, plan: plan, through: through, x: x, dy: dy, dx: dx, gradients: gradients,
                               context: ctx)
        case .channelsLast(let l):
            try storedBackward(l, plan: plan, through: through, x: x, dy: dy, dx: dx, gradients: gradients,
                               context: ctx)
        case .rows(let l):
            // Phase (a) keeps what phase (c) would compute again from x and dy (`RowsLayout.memoCount`).
            let kept = through ? l.memoCount(plan: plan, T.self) : 0
            // phase (c) reuses phase (a)'s scratch (`ScratchArena.phase`): the sums and the memo come before it
            var arena = try ScratchArena(bytes: sumsBytes + ScratchArena.bytes(kept, of: Double.self)
                                     + max(l.gradientSumsBytes(T.self, plan: plan),
                                           l.finishBackwardBytes(T.self, plan: plan)))
            let sums = through ? arena.take(2 * C, of: Double.self) : nil
            let memo = kept > 0 ? arena.take(kept, of: Double.self) : nil
            if let sums {
                arena.phase {
                    l.gradientSums(plan: plan, x: x, dy: dy, context: ctx, into: sums, memo: memo, arena: &$0)
                }
            }
            l.finishBackward(plan: plan, through: through, x: x, dy: dy, dx: dx, gradients: gradients, context: ctx,
                             sums: sums, memo: memo, sumsAreLocal: true, arena: &arena)
        }
    }

    /// Both backward phases on a stored layout, T and U in the call's scratch.
    static func storedBackward<L: StoredLayout, T: NormalizationScalar>(
        _ l: L, plan: NormalizationPlan, through: Bool, x: UnsafePointer<T>, dy: UnsafePointer<T>,
        dx: UnsafeMutablePointer<T>, gradients: NormalizationGradients<T>, context ctx: NormalizationContext
    ) throws(BCNError) {
        let C = l.shape.channels, planes = l.shape.planes, unitGradients = l.unitGradientsCount(plan: plan)
        var arena = try ScratchArena(bytes: ScratchArena.bytes(2 * planes, of: Double.self)
                                 + ScratchArena.bytes(2 * C, of: Double.self)
                                 + ScratchArena.bytes(unitGradients, of: Double.self)
                                 + max(l.gradientSumsBytes(T.self, plan: plan),
                                       l.finishBackwardBytes(T.self, plan: plan)))
        let t = arena.take(2 * planes, of: Double.self), u = t + planes
        let sums = through ? arena.take(2 * C, of: Double.self) : nil
        let gradient = UnitGradients(storage: arena.take(unitGradients, of: Double.self), plan: plan, shape: l.shape)
        // Through batch statistics, phase (a) computes every unit's gradient for the sums; phase (c) reuses them,
        // and its scratch (`ScratchArena.phase`): T, U, the sums and the gradients come before it.
        arena.phase {
            l.gradientSums(plan: plan, through: through, x: x, dy: dy, context: ctx, t: t, u: u, into: sums,
                           unitGradients: gradient, arena: &$0)
        }
        l.finishBackward(plan: plan, through: through, x: x, dy: dy, dx: dx, gradients: gradients, context: ctx,
                         t: t, u: u, sums: sums, unitGradients: gradient, computed: through, arena: &arena)
    }

    /// Backward phase (a): pass 1 over (x, dy), its plane sums into `context`, and with `sums` the batch's
    /// S₁ = Σ dy₁ and S₂ = Σ dy₁ (x - μ) per channel ([S₁ | S₂], 2·C values), which `mergeGradientSums`
    /// can add up over processes. Only a forward with batch statistics in training needs them (`needsGradientSums`).
    @_specialize(where T == Float)
    @_specialize(where T == Double)
    public static func localGradientSums<T: NormalizationScalar>(
        plan: NormalizationPlan, shape: NormalizationShape, x: UnsafePointer<T>, dy: UnsafePointer<T>,
        context: UnsafeMutableBufferPointer<Double>, into sums: UnsafeMutablePointer<Double>?
    ) throws(BCNError) {
        let pinned = BCNThreads.pin()  // one thread count for the scratch and the loops
        defer { BCNThreads.unpin(pinned) }
        let (ctx, through) = try forwardContext(plan: plan, shape: shape, context, of: T.self)
        try checkFinite(plan: plan, shape: shape, dy, what: "the output gradient dy")
        let sums = through ? sums : nil
        let layout = Layout(plan: plan, shape: shape)
        switch layout {
        case .planes(let l):
            try storedGradientSums(l, plan: plan, through: through, x: x, dy: dy, context: ctx, into: sums)
        case .channelsLast(let l):
            try storedGradientSums(l, plan: plan, through: through, x: x, dy: dy, context: ctx, into: sums)
        case .rows(let l):
            if let sums {
                var arena = try ScratchArena(bytes: l.gradientSumsBytes(T.self, plan: plan))
                l.gradientSums(plan: plan, x: x, dy: dy, context: ctx, into: sums, arena: &arena)
            }
        }
        let flags = ctx.readFlags(format: shape.format, element: nil) ?? []  // forwardContext read it
        ctx.writeHeader(flags.union(.gradientSums), format: shape.format, of: T.self)
    }

    static func storedGradientSums<L: StoredLayout, T: NormalizationScalar>(
        _ l: L, plan: NormalizationPlan, through: Bool, x: UnsafePointer<T>, dy: UnsafePointer<T>,
        context ctx: NormalizationContext, into sums: UnsafeMutablePointer<Double>?
    ) throws(BCNError) {
        let count = sums == nil ? 0 : l.unitGradientsCount(plan: plan)
        var arena = try ScratchArena(bytes: l.gradientSumsBytes(T.self, plan: plan)
                                 + ScratchArena.bytes(count, of: Double.self))
        let gradient = UnitGradients(storage: arena.take(count, of: Double.self), plan: plan, shape: l.shape)
        l.gradientSums(plan: plan, through: through, x: x, dy: dy, context: ctx, t: ctx.t, u: ctx.u, into: sums,
                       unitGradients: gradient, arena: &arena)
    }

    /// True when the forward that filled `context` used batch statistics in training: its backward then needs
    /// the whole batch's gradient sums.
    public static func needsGradientSums(plan: NormalizationPlan, shape: NormalizationShape,
                                         context: UnsafeBufferPointer<Double>) throws(BCNError) -> Bool {
        // either element type: this call reads no input
        try forwardContext(plan: plan, shape: shape, UnsafeMutableBufferPointer(mutating: context), element: nil)
            .through
    }

    /// Backward phase (b): the element-wise sum of `sets` sum vectors of `2·channels` values (set i at
    /// `sums + i·2·channels`), added in set order, into `merged` (which may be the first set).
    public static func mergeGradientSums(sets: Int, channels: Int, _ sums: UnsafePointer<Double>,
                                         into merged: UnsafeMutablePointer<Double>) throws(BCNError) {
        guard sets >= 1, channels >= 1, channels <= Int.max / 2,
              !sets.multipliedReportingOverflow(by: 2 * channels).overflow else {
            throw BCNError(.invalidArgument, "need at least one set of at least one channel, got \(sets) x \(channels)")
        }
        let n = 2 * channels
        for i in 0..<n {
            var s = 0.0
            for k in 0..<sets { s += sums[k * n + i] }
            merged[i] = s
        }
    }

    /// Backward phase (c): dx and the parameter gradients (this process's share of them), with `batchSums` the
    /// batch's S₁, S₂ per channel (from phase (a), or summed over processes by phase (b); needed only when
    /// `needsGradientSums`). `context` must hold phase (a)'s plane sums of this (x, dy).
    @_specialize(where T == Float)
    @_specialize(where T == Double)
    public static func finishBackward<T: NormalizationScalar>(
        plan: NormalizationPlan, shape: NormalizationShape,
        x: UnsafePointer<T>, dy: UnsafePointer<T>, dx: UnsafeMutablePointer<T>,
        gradients: NormalizationGradients<T>, batchSums: UnsafePointer<Double>?,
        context: UnsafeMutableBufferPointer<Double>
    ) throws(BCNError) {
        let pinned = BCNThreads.pin()  // one thread count for the scratch and the loops
        defer { BCNThreads.unpin(pinned) }
        let (ctx, through) = try forwardContext(plan: plan, shape: shape, context, of: T.self)
        guard ctx.readFlags(format: shape.format, element: nil)?.contains(.gradientSums) == true else {
            throw BCNError(.noForward, "context holds no gradient sums of this input: run the backward's phase (a) "
                                       + "first (localGradientSums; bcn_norm_backward_sums_* in C)")
        }
        // as `finishForward` screens x: whatever its phase (a) screened
        try checkFinite(plan: plan, shape: shape, dy, what: "the output gradient dy")
        if through && batchSums == nil {
            throw BCNError(.invalidArgument, "a forward with batch statistics needs the batch's gradient sums")
        }
        let sums = through ? batchSums : nil
        if let sums { try checkFiniteSums(plan: plan, sums, channels: shape.channels) }
        switch Layout(plan: plan, shape: shape) {
        case .planes(let l):
            try storedFinishBackward(l, plan: plan, through: through, x: x, dy: dy, dx: dx, gradients: gradients,
                                 context: ctx, sums: sums)
        case .channelsLast(let l):
            try storedFinishBackward(l, plan: plan, through: through, x: x, dy: dy, dx: dx, gradients: gradients,
                                 context: ctx, sums: sums)
        case .rows(let l):
            var arena = try ScratchArena(bytes: l.finishBackwardBytes(T.self, plan: plan))
            l.finishBackward(plan: plan, through: through, x: x, dy: dy, dx: dx, gradients: gradients, context: ctx,
                             sums: sums, arena: &arena)
        }
    }

    static func storedFinishBackward<L: StoredLayout, T: NormalizationScalar>(
        _ l: L, plan: NormalizationPlan, through: Bool, x: UnsafePointer<T>, dy: UnsafePointer<T>,
        dx: UnsafeMutablePointer<T>, gradients: NormalizationGradients<T>, context ctx: NormalizationContext,
        sums: UnsafePointer<Double>?
    ) throws(BCNError) {
        let count = l.unitGradientsCount(plan: plan)
        var arena = try ScratchArena(bytes: l.finishBackwardBytes(T.self, plan: plan)
                                 + ScratchArena.bytes(count, of: Double.self))
        let gradient = UnitGradients(storage: arena.take(count, of: Double.self), plan: plan, shape: l.shape)
        l.finishBackward(plan: plan, through: through, x: x, dy: dy, dx: dx, gradients: gradients, context: ctx,
                         t: ctx.t, u: ctx.u, sums: sums, unitGradients: gradient, arena: &arena)
    }

    /// `forwardContext(plan:shape:_:element:)` for input of type T.
    static func forwardContext<T: NormalizationScalar>(
        plan: NormalizationPlan, shape: NormalizationShape, _ buffer: UnsafeMutableBufferPointer<Double>, of _: T.Type
    ) throws(BCNError) -> (NormalizationContext, through: Bool) {
        try forwardContext(plan: plan, shape: shape, buffer, element: NormalizationContext.element(T.self))
    }

    /// The context of a finished forward of this plan, shape and memory format, on input of `element`'s type
    /// (`NormalizationContext.element`; nil: either), and whether its gradients flow through batch statistics.
    static func forwardContext(plan: NormalizationPlan, shape: NormalizationShape,
                               _ buffer: UnsafeMutableBufferPointer<Double>, element: Double?) throws(BCNError)
        -> (NormalizationContext, through: Bool)
    {
        // the plan, the channel count and the context's length, as the forward checks them (the same words)
        let ctx = try checkedContext(plan: plan, shape: shape, buffer)
        guard let flags = ctx.readFlags(format: shape.format, element: element), flags.contains(.forward),
              flags.contains(.batchNorm) == (plan.batchNorm != nil),
              flags.contains(.channelNorm) == (plan.channelNorm != nil) else {
            // formatted here, on failure only: it cost about 1.5K instructions a call
            let dims = "[\(shape.batch), \(shape.channels), \(shape.spatial)] ([B, C, S])"
            let type = element == 4 ? "float32 " : element == 8 ? "float64 " : ""
            throw BCNError(.noForward, "no forward of this layer with \(type)input of shape \(dims) and this memory "
                                       + "format to differentiate")
        }
        return (ctx, flags.contains(.gradientThroughBatchStatistics))
    }
}
