#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// The one computation behind every layer (see DESIGN.md): batch norm, channel norm, or both fused.
///
/// Forward, for x of shape [B, C, S] with G groups of K = C/G channels:
/// 1. per plane (b, c): mean p and centred sum of squares q (chunked two-pass, Float64);
/// 2. on [B, C] numbers in Float64: the batch-norm stage is y₁ = a_c (x - μ_c) + β_c with a = γ/σ; its plane
///    means are ȳ = a (p - μ) + β and centred sums a² q, merged over each group into m[b,g], v[b,g];
///    r = 1/√(v + eps); the whole layer is out = A (x - p) + M per plane, A = r w a, M = r w (ȳ - m) + bias;
/// 3. one output pass. Centring on p keeps a constant plane exact: x - p = 0 there, so out = M.
public enum FusedNormalization {
    /// Normalizes `x` into `y` (which may alias `x` when no backward follows) and fills `context` for backward.
    ///
    /// - Parameters:
    ///   - training: batch-norm stage uses (and updates) batch statistics as its options say; else running ones.
    ///   - context: at least `NormalizationContextLayout.length(...)` Doubles.
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
        try plan.validate()
        try checkShape(plan: plan, shape: shape)
        let layout = NormalizationContextLayout(shape: shape, groups: plan.groups)
        guard let ctx = context.baseAddress, context.count >= layout.length else {
            throw BCNError(.invalidArgument,
                           "context holds \(context.count) values, this shape needs \(layout.length)")
        }
        try checkState(plan: plan, state: state)
        try checkDegenerate(plan: plan, shape: shape, training: training)

        // Short planes take the row path (FusedNormalization+Rows.swift): no per-plane numbers.
        let rows = shape.spatial < smallPlane
        if rows {
            if plan.nanPolicy == .raise, let i = (0..<shape.count).first(where: { !Double(x[$0]).isFinite }) {
                throw nonFinite(plane: i / shape.spatial, shape: shape)
            }
        } else {
            planeMoments(x, shape: shape, mean: ctx + layout.p, m2: ctx + layout.q)
            if plan.nanPolicy == .raise,
               let i = (0..<shape.planes).first(where: { !(ctx[layout.p + $0].isFinite && ctx[layout.q + $0].isFinite) }) {
                throw nonFinite(plane: i, shape: shape)
            }
        }

        var flags: NormalizationContextLayout.Flags = rows ? [.rows] : []
        let update = batchNormStage(plan: plan, shape: shape, training: training, x: x, rows: rows, state: state,
                                    layout: layout, ctx: ctx, flags: &flags)
        if plan.channelNorm != nil, let weight = state.cnWeight {
            flags.insert(.channelNorm)
            for g in 0..<plan.groups { ctx[layout.w + g] = Double(weight[g]) }
        }
        if rows {
            rowsOutput(plan: plan, shape: shape, x: x, y: y, state: state, layout: layout, ctx: ctx)
        } else {
            planesOutput(plan: plan, shape: shape, x: x, y: y, state: state, layout: layout, ctx: ctx)
        }
        update?.commit(state)
        layout.writeHeader(ctx, flags: flags)
    }

    /// The group statistics and the output map of the plane path, one unit (sample, channel group) at a time.
    static func planesOutput<T: NormalizationScalar>(
        plan: NormalizationPlan, shape: NormalizationShape, x: UnsafePointer<T>, y: UnsafeMutablePointer<T>,
        state: NormalizationState<T>, layout: NormalizationContextLayout, ctx: UnsafeMutablePointer<Double>
    ) {
        let K = plan.channelNorm.map { shape.channels / $0.groups } ?? 1, units = shape.planes / K
        let p = UnsafePointer(ctx + layout.p), chunks = PlaneChunks(shape)
        if chunks.perPlane == 1 {  // each unit maps its own planes as soon as it knows their coefficients
            let s = shape.spatial
            parallelFor(units, cost: K * s) { range in
                for u in range {
                    unitMap(u, groupSize: K, plan: plan, shape: shape, state: state, layout: layout, ctx: ctx) {
                        plane, scale, offset in
                        T._scaleShift(x + plane * s, y + plane * s, count: s, centre: p[plane], scale: scale,
                                      offset: offset)
                    }
                }
            }
            return
        }
        // planes in several chunks: coefficients first, then the chunks in parallel
        let coefficients = UnsafeMutableBufferPointer<Double>.allocate(capacity: 2 * shape.planes)
        defer { coefficients.deallocate() }
        let co = coefficients.baseAddress!
        for u in 0..<units {
            unitMap(u, groupSize: K, plan: plan, shape: shape, state: state, layout: layout, ctx: ctx) {
                plane, scale, offset in
                co[plane] = scale; co[shape.planes + plane] = offset
            }
        }
        parallelFor(chunks.count, cost: planeChunkLength) { range in
            for i in range {
                let c = chunks.chunk(i)
                T._scaleShift(x + c.offset, y + c.offset, count: c.length,
                              centre: p[c.plane], scale: co[c.plane], offset: co[shape.planes + c.plane])
            }
        }
    }

    static func nonFinite(plane i: Int, shape: NormalizationShape) -> BCNError {
        BCNError(.nonFinite,
                 "input holds NaN or infinity (channel \(i % shape.channels) of sample \(i / shape.channels)) and nan_policy is 'raise'")
    }

    // MARK: checks

    static func checkShape(plan: NormalizationPlan, shape: NormalizationShape) throws(BCNError) {
        guard shape.channels == plan.channels else {
            throw BCNError(.shapeMismatch,
                           "input has \(shape.channels) channels (dimension 1) but the layer has \(plan.channels)")
        }
    }

    static func checkState<T>(plan: NormalizationPlan, state: NormalizationState<T>) throws(BCNError) {
        if plan.batchNorm != nil {
            guard state.bnWeight != nil, state.bnBias != nil, state.runningMean != nil, state.runningVar != nil,
                  state.numBatchesTracked != nil else {
                throw BCNError(.invalidArgument, "batch-norm weight, bias, running_mean, running_var and num_batches_tracked must not be null")
            }
        }
        if plan.channelNorm != nil {
            guard state.cnWeight != nil, state.cnBias != nil else {
                throw BCNError(.invalidArgument, "channel-norm weight and bias must not be null")
            }
        }
    }

    static func checkDegenerate(plan: NormalizationPlan, shape: NormalizationShape, training: Bool) throws(BCNError) {
        var dims: String { "[\(shape.batch), \(shape.channels), \(shape.spatial)]" }
        if let bn = plan.batchNorm, training, shape.batch * shape.spatial == 1 {
            if bn.statistics == .batch {
                throw BCNError(.degenerateStatistics,
                               "Expected more than 1 value per channel when training, got input of size \(dims) ([B, C, S])")
            }
            if bn.unbiasedRunningVariance {
                throw BCNError(.degenerateStatistics,
                               "an unbiased running variance needs more than 1 value per channel, got input of size \(dims) ([B, C, S])")
            }
        }
        if let cn = plan.channelNorm, (shape.channels / cn.groups) * shape.spatial == 1 {
            throw BCNError(.degenerateStatistics,
                           "Expected more than 1 value per channel group, got \(shape.channels / cn.groups) channel(s) per group and spatial size \(shape.spatial)")
        }
    }

    // MARK: pass 1

    /// Mean and M2 of every plane: each chunk two-pass in cache, chunks merged in fixed order (Chan).
    static func planeMoments<T: NormalizationScalar>(
        _ x: UnsafePointer<T>, shape: NormalizationShape,
        mean: UnsafeMutablePointer<Double>, m2: UnsafeMutablePointer<Double>
    ) {
        let chunks = PlaneChunks(shape)
        if chunks.perPlane == 1 {
            let s = shape.spatial
            parallelFor(shape.planes, cost: s) { range in
                for i in range {
                    let m = T._chunkMoments(x + i * s, count: s)
                    mean[i] = m.mean; m2[i] = m.m2
                }
            }
            return
        }
        let parts = UnsafeMutableBufferPointer<Moments>.allocate(capacity: chunks.count)
        defer { parts.deallocate() }
        parallelFor(chunks.count, cost: planeChunkLength) { range in
            for i in range {
                let c = chunks.chunk(i)
                parts.initializeElement(at: i, to: T._chunkMoments(x + c.offset, count: c.length))
            }
        }
        for plane in 0..<shape.planes {
            var m = Moments()
            for k in 0..<chunks.perPlane { m.merge(parts[plane * chunks.perPlane + k]) }
            mean[plane] = m.mean; m2[plane] = m.m2
        }
    }

    // MARK: [B, C] work

    /// New running-buffer values, written only once nothing can fail.
    struct RunningUpdate<T: NormalizationScalar> {
        var mean: [T]
        var variance: [T]
        var count: Int64

        func commit(_ state: NormalizationState<T>) {
            guard let rm = state.runningMean, let rv = state.runningVar, let nbt = state.numBatchesTracked else { return }
            for c in 0..<mean.count { rm[c] = mean[c]; rv[c] = variance[c] }
            nbt.pointee = count
        }
    }

    /// Fills μ, 1/σ and a = γ/σ in the context (1 and 0 without a batch-norm stage); returns the running update
    /// a training forward makes. The batch's moments per channel come from the plane moments, or on the row
    /// path from the columns of x.
    static func batchNormStage<T: NormalizationScalar>(
        plan: NormalizationPlan, shape: NormalizationShape, training: Bool, x: UnsafePointer<T>, rows: Bool,
        state: NormalizationState<T>, layout: NormalizationContextLayout, ctx: UnsafeMutablePointer<Double>,
        flags: inout NormalizationContextLayout.Flags
    ) -> RunningUpdate<T>? {
        let B = shape.batch, C = shape.channels, S = Double(shape.spatial)
        let p = ctx + layout.p, q = ctx + layout.q
        let mu = ctx + layout.mu, invSigma = ctx + layout.invSigma, a = ctx + layout.a
        guard let bn = plan.batchNorm else {
            for c in 0..<C { mu[c] = 0; invSigma[c] = 1; a[c] = 1 }
            return nil
        }
        var batch: UnsafeMutableBufferPointer<Moments>? = nil
        defer { batch?.deallocate() }
        if training && rows {
            let m = UnsafeMutableBufferPointer<Moments>.allocate(capacity: C)
            columnMoments(x, shape: shape, into: m.baseAddress!)
            batch = m
        } else if training {
            // Batch statistics per channel (Chan's formula for B equal planes): μ = Σ_b p / B,
            // M2 = Σ_b q + S Σ_b (p - μ)², with the batch loop outside so the channel loop runs contiguously.
            let sums = UnsafeMutableBufferPointer<Double>.allocate(capacity: 3 * C)
            defer { sums.deallocate() }
            let bMean = sums.baseAddress!, within = bMean + C, between = within + C
            sums.initialize(repeating: 0)
            for b in 0..<B { let row = p + b * C; for c in 0..<C { bMean[c] += row[c] } }
            let invB = 1 / Double(B)
            for c in 0..<C { bMean[c] *= invB }
            for b in 0..<B {
                let pr = p + b * C, qr = q + b * C
                for c in 0..<C { within[c] += qr[c]; let d = pr[c] - bMean[c]; between[c] += d * d }
            }
            let m = UnsafeMutableBufferPointer<Moments>.allocate(capacity: C)
            for c in 0..<C {
                m.initializeElement(at: c, to: Moments(count: Double(B) * S, mean: bMean[c],
                                                       m2: within[c] + S * between[c]))
            }
            batch = m
        }
        return channelNormalization(bn: bn, training: training, channels: C,
                                    batch: batch.map { UnsafePointer($0.baseAddress!) }, state: state,
                                    mu: mu, invSigma: invSigma, a: a, flags: &flags)
    }

    /// The batch-norm stage per channel, shared by the plane and row paths: μ, 1/σ and a = γ/σ, and in training
    /// the running-buffer update computed from the batch's moments per channel (`batch`, required in training).
    static func channelNormalization<T: NormalizationScalar>(
        bn: BatchNormOptions, training: Bool, channels C: Int, batch: UnsafePointer<Moments>?,
        state: NormalizationState<T>, mu: UnsafeMutablePointer<Double>, invSigma: UnsafeMutablePointer<Double>,
        a: UnsafeMutablePointer<Double>, flags: inout NormalizationContextLayout.Flags
    ) -> RunningUpdate<T>? {
        guard let gamma = state.bnWeight, let rm = state.runningMean, let rv = state.runningVar,
              let nbt = state.numBatchesTracked else { return nil }
        flags.insert(.batchNorm)
        var update: RunningUpdate<T>? = nil
        if training, let batch {
            // The authors' EstBN never advances num_batches_tracked; keep its state dicts interchangeable,
            // except when the cumulative average needs the count.
            let counts = !(bn.statistics == .estimated && bn.varianceCentre == .runningMean) || bn.momentum == nil
            let count = counts ? nbt.pointee &+ 1 : nbt.pointee
            let factor = bn.momentum ?? 1 / Double(count)
            var u = RunningUpdate<T>(mean: [T](repeating: 0, count: C), variance: [T](repeating: 0, count: C),
                                     count: count)
            for c in 0..<C {
                let moments = batch[c], n = moments.count
                let oldMean = Double(rm[c]), oldVar = Double(rv[c])
                var folded = moments.variance
                if bn.statistics == .estimated && bn.varianceCentre == .runningMean {
                    let d = moments.mean - oldMean
                    folded += d * d  // (1/n) Σ (x - μ_old)² = biased variance + (mean - μ_old)²
                }
                if bn.unbiasedRunningVariance { folded *= n / (n - 1) }
                let newMean = (1 - factor) * oldMean + factor * moments.mean
                let newVar = (1 - factor) * oldVar + factor * folded
                u.mean[c] = T(newMean)
                u.variance[c] = T(newVar)
                switch bn.statistics {
                case .batch:
                    mu[c] = moments.mean
                    invSigma[c] = 1 / (moments.variance + bn.eps).squareRoot()
                case .estimated:
                    // The new estimates before rounding to T: in Float32 a mean of 100 rounds by 4e-6, which a
                    // spread of 0.01 would magnify to 4e-4 in the output.
                    mu[c] = newMean
                    invSigma[c] = 1 / (newVar + bn.eps).squareRoot()
                }
            }
            if bn.statistics == .batch { flags.insert(.gradientThroughBatchStatistics) }
            update = u
        } else {
            for c in 0..<C {
                mu[c] = Double(rm[c])
                invSigma[c] = 1 / (Double(rv[c]) + bn.eps).squareRoot()
            }
        }
        for c in 0..<C { a[c] = Double(gamma[c]) * invSigma[c] }
        return update
    }

    /// One unit of the output stage: sample b's channel group g (or channel g without a channel-norm stage),
    /// u = b·(C/K) + g. Writes ȳ = a (p - μ) + β of its K planes, and with a channel norm the group's m and
    /// r = 1/√(v + eps) from the K planes' y₁ moments (means ȳ, M2 a²q); then calls `apply(plane, scale,
    /// offset)` with each plane's map out = scale·(x - p) + offset, scale = r w a, offset = r w (ȳ - m) + bias.
    @inline(__always)
    static func unitMap<T: NormalizationScalar>(
        _ u: Int, groupSize K: Int, plan: NormalizationPlan, shape: NormalizationShape,
        state: NormalizationState<T>, layout: NormalizationContextLayout, ctx: UnsafeMutablePointer<Double>,
        apply: (Int, Double, Double) -> Void
    ) {
        let C = shape.channels, perSample = C / K, b = u / perSample, g = u - b * perSample
        let base = b * C + g * K, c0 = g * K
        let p = ctx + layout.p, q = ctx + layout.q, yBar = ctx + layout.yBar
        let mu = ctx + layout.mu, a = ctx + layout.a
        if let beta = state.bnBias, plan.batchNorm != nil {
            for k in 0..<K { yBar[base + k] = a[c0 + k] * (p[base + k] - mu[c0 + k]) + Double(beta[c0 + k]) }
        } else {
            for k in 0..<K { yBar[base + k] = p[base + k] }
        }
        guard let cn = plan.channelNorm, let bias = state.cnBias else {
            apply(base, a[c0], yBar[base])
            return
        }
        let group = Moments.ofEqualSets(count: K, size: Double(shape.spatial), means: yBar + base, m2s: q + base,
                                        stride: 1, m2Scale: { k in a[c0 + k] * a[c0 + k] })
        let rg = 1 / (group.variance + cn.eps).squareRoot()
        ctx[layout.m + b * cn.groups + g] = group.mean
        ctx[layout.r + b * cn.groups + g] = rg
        let rw = rg * ctx[layout.w + g], offset = Double(bias[g])
        for k in 0..<K { apply(base + k, rw * a[c0 + k], rw * (yBar[base + k] - group.mean) + offset) }
    }
}
