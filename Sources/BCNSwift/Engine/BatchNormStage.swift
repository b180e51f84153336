/// The batch-norm stage as [C] numbers in Float64: the only place its algebra is written (y₁ has a Float32
/// transcription for [B, C] Float input, `Float.ValueConstants.staged`).
///
/// Forward: the batch's moments per channel merged from plane moments, the running-buffer update, and the map
/// y₁ = a (x - μ) + β with a = γ/σ. Backward: with S₁ = Σ dy₁ and S₂ = Σ dy₁ (x - μ) per channel
/// (n = B·S values), dγ = S₂/σ, dβ = S₁, and dx = a [dy₁ - S₁/n - (x - μ) S₂/(σ² n)] with batch
/// statistics (the statistics depend on x), dx = a dy₁ otherwise.
enum BatchNormStage {
    /// Moments per channel of B samples from their plane moments (Chan's formula for B sets of S values):
    ///   μ = Σ_b p / B,  M2 = Σ_b q + S Σ_b (p - μ)²,
    /// as shifted sums around c = the mean of the first (up to) eight samples' p: d = Σ (p - c), μ = c + d/B,
    /// Σ (p - μ)² = Σ (p - c)² - d²/B, kept when c lay within a standard deviation of μ (d²/B at most half of
    /// Σ (p - c)², the rule of the plane kernels); otherwise summed again around the μ found: the corrected
    /// two-pass algorithm, since the channel norm magnifies μ's rounding when a group's spread is small. Each
    /// channel's numbers depend on its own values alone, whichever strip or tail computes them.
    ///
    /// - Parameters:
    ///   - width: channels to merge (a block of them; rows of `p`, `q` and `out` are indexed from 0).
    ///   - p: plane means, sample b's at `p + b·stride`; of type T, since with S = 1 they are the input itself.
    ///   - q: plane M2s at the same stride, or nil when all are zero (S = 1).
    static func batchMoments<T: NormalizationScalar>(
        batch B: Int, spatial: Int, width: Int, p: UnsafePointer<T>, q: UnsafePointer<Double>?, stride: Int,
        into out: UnsafeMutablePointer<Moments>
    ) {
        // Sixteen channels at a time down all the samples when there are no M2s (S = 1: a whole cache line of
        // Float32 a row, so each line is fetched once a pass), eight otherwise, their sums in registers (chains of
        // four lanes); then four, then one, with the same operations per channel.
        var c = 0
        while q == nil && c + 16 <= width {
            stripMoments(batch: B, spatial: spatial, p: p + c, q: nil, stride: stride, chains: 4, into: out + c)
            c += 16
        }
        while c + 8 <= width {
            stripMoments(batch: B, spatial: spatial, p: p + c, q: q.map { $0 + c }, stride: stride, chains: 2,
                         into: out + c)
            c += 8
        }
        if c + 4 <= width {
            stripMoments(batch: B, spatial: spatial, p: p + c, q: q.map { $0 + c }, stride: stride, chains: 1,
                         into: out + c)
            c += 4
        }
        let picks = min(B, 8), invB = 1 / Double(B)
        while c < width {
            var centre = 0.0
            for b in 0..<picks { centre += Double(p[b * stride + c]) }
            centre *= 1 / Double(picks)
            func sums(around k: Double) -> StripSums {
                var within = 0.0, deviation = 0.0, between = 0.0
                for b in 0..<B {
                    if let q { within += q[b * stride + c] }
                    let d = Double(p[b * stride + c]) - k
                    deviation += d; between.addProduct(d, d)
                }
                return StripSums(centre: SIMD4(repeating: k), within: SIMD4(repeating: within),
                                 deviation: SIMD4(repeating: deviation), between: SIMD4(repeating: between))
            }
            var strip = sums(around: centre)
            if !strip.kept(invB)[0] { strip = sums(around: centre + strip.deviation[0] * invB) }
            out[c] = strip.moments(0, batch: B, spatial: spatial)
            c += 1
        }
    }

    /// The sums `batchMoments` keeps for four channels, in registers: centre c, Σ q, d = Σ (p - c) and
    /// Σ (p - c)².
    private struct StripSums {
        var centre, within, deviation, between: SIMD4<Double>

        /// The lanes whose centre lay within a standard deviation of the mean: d²/B at most half of Σ (p - c)²
        /// (false for NaN).
        @inline(__always)
        func kept(_ invB: Double) -> SIMDMask<SIMD4<Int64>> {
            ShiftRule.keeps(m2: between - deviation * deviation * invB, squares: between)
        }

        /// These sums in the lanes of `mask`, `other`'s in the rest.
        @inline(__always)
        func keeping(_ mask: SIMDMask<SIMD4<Int64>>, else other: StripSums) -> StripSums {
            let rest = .!mask
            return StripSums(centre: centre.replacing(with: other.centre, where: rest),
                             within: within.replacing(with: other.within, where: rest),
                             deviation: deviation.replacing(with: other.deviation, where: rest),
                             between: between.replacing(with: other.between, where: rest))
        }

        /// Channel k's moments: μ = c + d/B, M2 = Σ q + S (Σ (p - c)² - d²/B).
        @inline(__always)
        func moments(_ k: Int, batch B: Int, spatial: Int) -> Moments {
            BatchNormStage.moments(centre: centre[k], within: within[k], deviation: deviation[k],
                                   between: between[k], sets: B, size: spatial)
        }
    }

    /// The moments of `sets` sets of `size` values each from their sums around a centre c: `within` = Σ of
    /// their M2s, d = Σ (mean - c) and `between` = Σ (mean - c)²; μ = c + d/sets, M2 = within + size ·
    /// (between - d²/sets). The batch's planes merge so (`batchMoments`), and so do a short plane's columns
    /// (`RowsLayout.columnMoments`).
    ///
    /// Double input whose deviations pass about 1e154 overflows these squares: `between` and d² both become
    /// infinite (or a plane's M2 in `within` NaN), and their difference NaN. With a finite mean every value was
    /// finite, and M2 is at least the square of that spread, so it is +∞ there, as PyTorch's float64 batch norm
    /// gives it: the variance infinite, the running variance too, and a batch norm alone gives its bias. NaN or
    /// infinite input leaves the mean non-finite and M2 as the sums make it.
    @inline(__always)
    static func moments(centre: Double, within: Double, deviation d: Double, between: Double, sets: Int,
                        size: Int) -> Moments {
        let n = Double(size), inverse = 1 / Double(sets)
        let mean = centre + d * inverse, m2 = within + n * max(between - d * d * inverse, 0)
        return Moments(count: Double(sets) * n, mean: mean, m2: m2.isNaN && mean.isFinite ? .infinity : m2)
    }

    /// The moments of 4·`chains` channels (1, 2 or 4 chains of four lanes) into `out`, their sums in registers.
    @inline(__always)
    private static func stripMoments<T: NormalizationScalar>(
        batch B: Int, spatial: Int, p: UnsafePointer<T>, q: UnsafePointer<Double>?, stride: Int, chains: Int,
        into out: UnsafeMutablePointer<Moments>
    ) {
        // One pass of shifted sums around the mean of the first (up to) eight samples, and for the lanes that
        // fail the rule (NaN too) a second one around the means found. (An exact mean first, a pass over every
        // sample, cost 0.6 instructions a value of the 2.6.)
        // Row offsets wrap (`&*`): b < B, and B rows of `stride` lie inside the input (checked multiplies were 3 of
        // the 21 instructions a row of 16 channels).
        let picks = min(B, 8), invB = 1 / Double(B), invB4 = SIMD4(repeating: invB), zero = SIMD4<Double>()
        var c0 = zero, c1 = zero, c2 = zero, c3 = zero
        for b in 0..<picks {
            let row = p + b &* stride
            c0 += T._load4Wide(row, 0)
            if chains > 1 { c1 += T._load4Wide(row, 4) }
            if chains > 2 { c2 += T._load4Wide(row, 8); c3 += T._load4Wide(row, 12) }
        }
        let invPicks = SIMD4(repeating: 1 / Double(picks))
        c0 *= invPicks; c1 *= invPicks; c2 *= invPicks; c3 *= invPicks
        @inline(__always)
        func sums(_ c0: SIMD4<Double>, _ c1: SIMD4<Double>, _ c2: SIMD4<Double>, _ c3: SIMD4<Double>)
            -> (StripSums, StripSums, StripSums, StripSums)
        {
            var w0 = zero, w1 = zero, w2 = zero, w3 = zero, d0 = zero, d1 = zero, d2 = zero, d3 = zero
            var e0 = zero, e1 = zero, e2 = zero, e3 = zero
            for b in 0..<B {
                let row = p + b &* stride
                if let q {
                    let m2 = q + b &* stride
                    w0 += m2.lanes(0)
                    if chains > 1 { w1 += m2.lanes(4) }
                    if chains > 2 { w2 += m2.lanes(8); w3 += m2.lanes(12) }
                }
                let x0 = T._load4Wide(row, 0) - c0
                d0 += x0; e0.addProduct(x0, x0)
                if chains > 1 { let x1 = T._load4Wide(row, 4) - c1; d1 += x1; e1.addProduct(x1, x1) }
                if chains > 2 {
                    let x2 = T._load4Wide(row, 8) - c2, x3 = T._load4Wide(row, 12) - c3
                    d2 += x2; e2.addProduct(x2, x2); d3 += x3; e3.addProduct(x3, x3)
                }
            }
            return (StripSums(centre: c0, within: w0, deviation: d0, between: e0),
                    StripSums(centre: c1, within: w1, deviation: d1, between: e1),
                    StripSums(centre: c2, within: w2, deviation: d2, between: e2),
                    StripSums(centre: c3, within: w3, deviation: d3, between: e3))
        }
        var (s0, s1, s2, s3) = sums(c0, c1, c2, c3)
        let k0 = s0.kept(invB), k1 = s1.kept(invB), k2 = s2.kept(invB), k3 = s3.kept(invB)
        if !all(k0 .& k1 .& k2 .& k3) {  // unused chains are all zeros, which pass
            let (t0, t1, t2, t3) = sums(c0 + s0.deviation * invB4, c1 + s1.deviation * invB4,
                                        c2 + s2.deviation * invB4, c3 + s3.deviation * invB4)
            s0 = s0.keeping(k0, else: t0); s1 = s1.keeping(k1, else: t1)
            s2 = s2.keeping(k2, else: t2); s3 = s3.keeping(k3, else: t3)
        }
        for k in 0..<4 {
            out[k] = s0.moments(k, batch: B, spatial: spatial)
            if chains > 1 { out[4 + k] = s1.moments(k, batch: B, spatial: spatial) }
            if chains > 2 {
                out[8 + k] = s2.moments(k, batch: B, spatial: spatial)
                out[12 + k] = s3.moments(k, batch: B, spatial: spatial)
            }
        }
    }

    /// New running-buffer values, staged until nothing can fail, then committed.
    struct RunningUpdate<T: NormalizationScalar> {
        let mean: UnsafeMutablePointer<T>
        let variance: UnsafeMutablePointer<T>
        let count: Int64

        func commit(_ state: NormalizationState<T>, channels: Int) {
            guard let rm = state.runningMean, let rv = state.runningVar,
                  let nbt = state.numBatchesTracked else { return }
            for c in 0..<channels { rm[c] = mean[c]; rv[c] = variance[c] }
            nbt.pointee = count
        }
    }

    /// The running-buffer update from the batch's moments per channel: with factor f = momentum (or
    /// 1/num_batches_tracked), running ← (1 - f) running + f·batch, the variance folded in being the biased one,
    /// times n/(n-1) if unbiased, plus (mean - running mean)² when measured around the running mean (the authors'
    /// EstBN). The new values go to `newMean` and `newVar` in Float64 (C each), and rounded to T into `staged`
    /// (2·C values), which the returned update commits once nothing can fail.
    static func runningUpdate<T: NormalizationScalar>(
        _ bn: BatchNormOptions, batch: UnsafePointer<Moments>, state: NormalizationState<T>, channels C: Int,
        newMean: UnsafeMutablePointer<Double>, newVar: UnsafeMutablePointer<Double>, staged: UnsafeMutablePointer<T>
    ) -> RunningUpdate<T> {
        let rm = state.runningMean!, rv = state.runningVar!, nbt = state.numBatchesTracked!
        // The authors' EstBN never advances num_batches_tracked; keep its state dicts interchangeable, except
        // when the cumulative average needs the count.
        let counts = !(bn.statistics == .estimated && bn.varianceCentre == .runningMean) || bn.momentum == nil
        // At 2^63 - 1 (a count loaded, never reached by training) the count stays: wrapping to -2^63 made the
        // layer's own state dict unloadable, and a cumulative average refuses that count before it gets here.
        let count = counts && nbt.pointee < Int64.max ? nbt.pointee + 1 : nbt.pointee
        let factor = bn.momentum ?? 1 / Double(count)
        let update = RunningUpdate<T>(mean: staged, variance: staged + C, count: count)
        for c in 0..<C {
            let moments = batch[c], n = moments.count
            let oldMean = Double(rm[c]), oldVar = Double(rv[c])
            var folded = moments.variance
            if bn.statistics == .estimated && bn.varianceCentre == .runningMean {
                let d = moments.mean - oldMean
                folded += d * d  // (1/n) Σ (x - μ_old)² = biased variance + (mean - μ_old)²
            }
            if bn.unbiasedRunningVariance { folded *= n / (n - 1) }
            newMean[c] = (1 - factor) * oldMean + factor * moments.mean
            newVar[c] = (1 - factor) * oldVar + factor * folded
            update.mean[c] = T(newMean[c])
            update.variance[c] = T(newVar[c])
        }
        return update
    }

    /// The stage's map into the context: μ, 1/σ, a = γ/σ and β per channel (0, 1, 1, 0 without the stage).
    ///
    /// In training, `batch` holds the batch's moments per channel; the running update (`runningUpdate`) is
    /// staged in `staged` (2·C values) and returned. Batch statistics normalize with the batch's mean and biased
    /// variance; estimates with the new running values, before they are rounded to T (in Float32 a mean of 100
    /// rounds by 4e-6, which a spread of 0.01 would magnify to 4e-4). In eval the running buffers are the
    /// statistics.
    static func finish<T: NormalizationScalar>(
        plan: NormalizationPlan, training: Bool, batch: UnsafePointer<Moments>?, state: NormalizationState<T>,
        context ctx: NormalizationContext, staged: UnsafeMutablePointer<T>
    ) -> (flags: NormalizationContext.Flags, update: RunningUpdate<T>?) {
        let C = plan.channels
        let mu = ctx.mu, invSigma = ctx.invSigma, a = ctx.a, beta = ctx.beta
        guard let bn = plan.batchNorm, let gamma = state.bnWeight, let bias = state.bnBias,
              let rm = state.runningMean, let rv = state.runningVar else {
            for c in 0..<C { mu[c] = 0; invSigma[c] = 1; a[c] = 1; beta[c] = 0 }
            return ([], nil)
        }
        var flags: NormalizationContext.Flags = [.batchNorm]
        var update: RunningUpdate<T>? = nil
        if training, let batch {
            // the new estimates in Float64, in the slots of μ and 1/σ until they become those
            update = runningUpdate(bn, batch: batch, state: state, channels: C, newMean: mu, newVar: invSigma,
                                   staged: staged)
            // Four channels a step: one square root and one division of four lanes (the same roundings) where
            // one channel's took about ten cycles, serially, a tenth of a [64, 2048] eval call.
            let eps = bn.eps
            switch bn.statistics {
            case .batch:
                @inline(__always) func lanes(_ k: Int, _ f: (Moments) -> Double) -> SIMD4<Double> {
                    SIMD4(f(batch[k]), f(batch[k &+ 1]), f(batch[k &+ 2]), f(batch[k &+ 3]))
                }
                Lanes.map(C, into: mu) { lanes($0) { $0.mean } } scalar: { batch[$0].mean }
                Lanes.map(C, into: invSigma) { 1 / (lanes($0) { $0.variance } + eps).squareRoot() }
                    scalar: { 1 / (batch[$0].variance + eps).squareRoot() }
                flags.insert(.gradientThroughBatchStatistics)
            case .estimated:
                Lanes.map(C, into: invSigma) { 1 / (invSigma.lanes($0) + eps).squareRoot() }
                    scalar: { 1 / (invSigma[$0] + eps).squareRoot() }
            }
            ctx.statisticsCount = batch[0].count
        } else {
            let eps = bn.eps
            Lanes.map(C, into: mu) { T._load4Wide(rm, $0) } scalar: { Double(rm[$0]) }
            Lanes.map(C, into: invSigma) { 1 / (T._load4Wide(rv, $0) + eps).squareRoot() }
                scalar: { 1 / (Double(rv[$0]) + eps).squareRoot() }
        }
        Lanes.map(C, into: a) { T._load4Wide(gamma, $0) * invSigma.lanes($0) }
            scalar: { Double(gamma[$0]) * invSigma[$0] }
        Lanes.map(C, into: beta) { T._load4Wide(bias, $0) } scalar: { Double(bias[$0]) }
        return (flags, update)
    }

    // MARK: backward

    /// Whether the backward's dx is a·dy, value by value: a plan without a channel norm (E = 1, F = H = 0) whose
    /// backward does not pass through batch statistics (`dxTerms` gives k = 0 and S₁/n = 0), so that P = a,
    /// Q = 0 and R = 0. Such a dx is then mapped from dy alone, as y is from x (PyTorch gives a·dy there too):
    /// the map dx = P dy + Q (x - p) + R would make Q (x - p) = 0·∞ = NaN at a non-finite x, and with dy in x's
    /// place, at a non-finite dy.
    static func scalesOnly(plan: NormalizationPlan, through: Bool, sums: UnsafePointer<Double>?) -> Bool {
        plan.channelNorm == nil && !(through && sums != nil)
    }

    /// Per channel, from the batch's S₁ and S₂ (n = B·S values): k = S₂/(σ² n) and S₁/n with batch
    /// statistics, zero otherwise; written over `sums` ([S₁ | S₂]) so the plane maps need no division.
    static func dxTerms(sums: UnsafeMutablePointer<Double>, channels C: Int, values n: Double, through: Bool,
                        invSigma: UnsafePointer<Double>) {
        let invn = 1 / n
        for c in 0..<C {
            let s1 = sums[c], s2 = sums[C + c]
            sums[C + c] = through ? s2 * invSigma[c] * invSigma[c] * invn : 0
            sums[c] = through ? s1 * invn : 0
        }
    }

    /// Adds a unit's planes to the channel sums: S₁ += Σ dy₁, S₂ += Σ dy₁ (x - p) + (p - μ) Σ dy₁, for
    /// its K planes (means `p`) of channels with centres `mu`.
    @inline(__always)
    static func addSums(_ K: Int, sum: UnsafePointer<Double>, dot: UnsafePointer<Double>, p: UnsafePointer<Double>,
                        mu: UnsafePointer<Double>, s1: UnsafeMutablePointer<Double>, s2: UnsafeMutablePointer<Double>) {
        Lanes.map(K, into: s1) { s1.lanes($0) + sum.lanes($0) } scalar: { s1[$0] + sum[$0] }
        Lanes.map(K, into: s2) { s2.lanes($0) + (dot.lanes($0) + (p.lanes($0) - mu.lanes($0)) * sum.lanes($0)) }
            scalar: { s2[$0] + (dot[$0] + (p[$0] - mu[$0]) * sum[$0]) }
    }

    /// The sums of four planes of one value each (x = p, so Σ dy₁ (x - p) = 0): S₁ += dy₁,
    /// S₂ += (x - μ) dy₁, into `s1` and `s2` at k.
    @inline(__always)
    static func addValueSums(_ dy1: SIMD4<Double>, x: SIMD4<Double>, mu: SIMD4<Double>,
                             s1: UnsafeMutablePointer<Double>, s2: UnsafeMutablePointer<Double>, _ k: Int) {
        s1.storeLanes(s1.lanes(k) + dy1, k)
        s2.storeLanes(s2.lanes(k) + (x - mu) * dy1, k)
    }

    /// `addValueSums` of one value.
    @inline(__always)
    static func addValueSums(_ dy1: Double, x: Double, mu: Double, s1: inout Double, s2: inout Double) {
        s1 += dy1
        s2 += (x - mu) * dy1
    }

    /// dx = a [dy₁ - S₁/n - (x - μ) k] of four one-value planes (dy₁ is the value's own), with `s1n` and `k`
    /// the channels' S₁/n and k from `dxTerms`.
    @inline(__always)
    static func dxValues(_ dy1: SIMD4<Double>, x: SIMD4<Double>, mu: SIMD4<Double>, a: SIMD4<Double>,
                         s1n: SIMD4<Double>, k: SIMD4<Double>) -> SIMD4<Double> {
        a * (dy1 - s1n - (x - mu) * k)
    }

    /// `dxValues` of one value.
    @inline(__always)
    static func dxValue(_ dy1: Double, x: Double, mu: Double, a: Double, s1n: Double, k: Double) -> Double {
        a * (dy1 - s1n - (x - mu) * k)
    }

    /// dx = a [dy₁ - S₁/n - (x - μ) k] for dy₁ = E dy + F (x - p) + H, per plane of a unit: the map
    /// dx = P dy + Q (x - p) + R with P = a E, Q = a (F - k), R = a (H - S₁/n - (p - μ) k) into `P`, `Q`, `R`
    /// (K values each), where `s1n` and `k` are the channels' S₁/n and k from `dxTerms`.
    @inline(__always)
    static func dxMaps(_ K: Int, e: Double, gradient g: NormalizationUnit.Gradient, p: UnsafePointer<Double>,
                       mu: UnsafePointer<Double>, a: UnsafePointer<Double>, s1n: UnsafePointer<Double>,
                       k: UnsafePointer<Double>, P: UnsafeMutablePointer<Double>, Q: UnsafeMutablePointer<Double>,
                       R: UnsafeMutablePointer<Double>) {
        let e4 = SIMD4(repeating: e)
        Lanes.map(K, into: P) { e4 * a.lanes($0) } scalar: { e * a[$0] }
        dxMaps(K, f: g.f, h: g.h, p: p, mu: mu, a: a, s1n: s1n, k: k, Q: Q, R: R)
    }

    /// `dxMaps` of K planes whose E differ, in place: E, F, H become P, Q, R.
    @inline(__always)
    static func dxMaps(_ K: Int, e: UnsafeMutablePointer<Double>, f: UnsafeMutablePointer<Double>,
                       h: UnsafeMutablePointer<Double>, p: UnsafePointer<Double>, mu: UnsafePointer<Double>,
                       a: UnsafePointer<Double>, s1n: UnsafePointer<Double>, k: UnsafePointer<Double>) {
        Lanes.map(K, into: e) { e.lanes($0) * a.lanes($0) } scalar: { e[$0] * a[$0] }
        dxMaps(K, f: f, h: h, p: p, mu: mu, a: a, s1n: s1n, k: k, Q: f, R: h)
    }

    /// Q = a (F - k) and R = a (H - S₁/n - (p - μ) k) of `dxMaps` (Q and R may be F and H).
    @inline(__always)
    static func dxMaps(_ K: Int, f: UnsafePointer<Double>, h: UnsafePointer<Double>, p: UnsafePointer<Double>,
                       mu: UnsafePointer<Double>, a: UnsafePointer<Double>, s1n: UnsafePointer<Double>,
                       k: UnsafePointer<Double>, Q: UnsafeMutablePointer<Double>, R: UnsafeMutablePointer<Double>) {
        Lanes.map(K, into: Q) { a.lanes($0) * (f.lanes($0) - k.lanes($0)) } scalar: { a[$0] * (f[$0] - k[$0]) }
        Lanes.map(K, into: R) { i in
            a.lanes(i) * (h.lanes(i) - s1n.lanes(i) - (p.lanes(i) - mu.lanes(i)) * k.lanes(i))
        } scalar: { i in a[i] * (h[i] - s1n[i] - (p[i] - mu[i]) * k[i]) }
    }

    /// A backward's per-call numbers, from the arena: this process's channel sums [S₁ | S₂] (zeroed), the dx
    /// terms [S₁/n | k] of the batch's sums (zero without batch statistics), and the groups' [dw | dbias] (zeroed).
    static func backwardScratch(
        plan: NormalizationPlan, channels C: Int, sums: UnsafePointer<Double>?, through: Bool,
        context ctx: NormalizationContext, arena: inout ScratchArena
    ) -> (local: UnsafeMutablePointer<Double>, terms: UnsafeMutablePointer<Double>,
          groups: UnsafeMutablePointer<Double>) {
        let G = max(plan.groups, 1)
        let local = arena.take(2 * C, of: Double.self), terms = arena.take(2 * C, of: Double.self)
        let groups = arena.take(2 * G, of: Double.self)
        local.update(repeating: 0, count: 2 * C)
        // not `sums?[i] ?? 0` in the loop: LLVM made that masked loads, which near the null address (no sums:
        // estimates, or no batch-norm stage) each take a microcode assist, ~100 cycles, 0.5 us of a tiny call
        if let sums { terms.update(from: sums, count: 2 * C) } else { terms.update(repeating: 0, count: 2 * C) }
        groups.update(repeating: 0, count: 2 * G)
        if plan.batchNorm != nil {
            dxTerms(sums: terms, channels: C, values: ctx.statisticsCount, through: through && sums != nil,
                    invSigma: ctx.invSigma)
        }
        return (local, terms, groups)
    }

    /// What a layout calls with each group's bias and weight gradients (group g, ΣT, r W): adds them to the
    /// groups' part of `backwardScratch` ([dw | dbias], G each).
    static func groupGradientAdder(_ groups: UnsafeMutablePointer<Double>, groups G: Int)
        -> (Int, Double, Double) -> Void
    {
        { g, bias, weight in groups[g] += weight; groups[G + g] += bias }
    }

    static func backwardScratchBytes(plan: NormalizationPlan) -> Int {
        2 * ScratchArena.bytes(2 * plan.channels, of: Double.self)
            + ScratchArena.bytes(2 * max(plan.groups, 1), of: Double.self)
    }

    /// Adds the parameter gradients: dγ += S₂/σ and dβ += S₁ from this process's channel sums `local`, and the
    /// groups' dw and dbias.
    static func addGradients<T: NormalizationScalar>(
        _ gradients: NormalizationGradients<T>, plan: NormalizationPlan, local: UnsafeMutablePointer<Double>,
        groups: UnsafePointer<Double>, invSigma: UnsafePointer<Double>
    ) {
        let C = plan.channels, G = plan.groups
        if G > 0 {
            addGradient(gradients.cnWeight, groups, G)
            addGradient(gradients.cnBias, groups + G, G)
        }
        guard plan.batchNorm != nil else { return }
        for c in 0..<C { local[C + c] *= invSigma[c] }
        addGradient(gradients.bnWeight, local + C, C)
        addGradient(gradients.bnBias, local, C)
    }
}

/// target[i] += delta[i] for a gradient accumulator in T (nothing when it is nil).
func addGradient<T: NormalizationScalar>(_ target: UnsafeMutablePointer<T>?, _ delta: UnsafePointer<Double>,
                                         _ count: Int) {
    guard let target else { return }
    for i in 0..<count { target[i] = T(Double(target[i]) + delta[i]) }
}
