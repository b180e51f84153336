/// The channel-norm stage on one unit, sample b's group of K channels (one channel without that stage), from its
/// planes' numbers: the only place its algebra is written, but for its Float32 transcription for [B, C] Float
/// input (Kernels/Float+ValueGroups.swift). Every layout calls it, per unit, in its own order.
///
/// With the batch-norm stage y₁ = a (x - μ) + β, plane k of the unit (mean p, centred sum of squares q over S
/// values) has mean ȳ = a (p - μ) + β and centred sum a² q after it. The group (N = K·S values) has mean m and
/// variance v from Chan's formula over its K planes; r = 1/√(v + eps), and the layer's output on the plane is
/// out = A (x - p) + M with A = r w a, M = r w (ȳ - m) + bias.
///
/// Loops over the K planes run four lanes at a time (`Lanes`), so that a unit of many short planes (the rows
/// layout, where S = 1 makes every value a plane) costs little more than its values.
struct NormalizationUnit {
    /// K planes of S values; `groupEps` is nil without a channel-norm stage (then K = 1).
    let planes: Int
    let spatial: Int
    let groupEps: Double?

    /// The unit's planes: means and M2s (M2 nil when all zero, S = 1).
    var p: UnsafePointer<Double>
    var q: UnsafePointer<Double>?
    /// The batch-norm stage of the unit's channels (the context's mu, a, beta at its first channel).
    var mu: UnsafePointer<Double>
    var a: UnsafePointer<Double>
    var beta: UnsafePointer<Double>

    /// ȳ = β + a (p - μ) of planes k..<k+4, rounded once (a fused multiply-add), since a small group variance
    /// magnifies their rounding: the planes' means after the batch-norm stage.
    @inline(__always)
    func stagedMeans(_ k: Int) -> SIMD4<Double> { beta.lanes(k).addingProduct(a.lanes(k), p.lanes(k) - mu.lanes(k)) }

    /// ȳ of plane k alone, the same operations as `stagedMeans`.
    @inline(__always)
    func stagedMean(_ k: Int) -> Double { beta[k].addingProduct(a[k], p[k] - mu[k]) }

    /// A plane's M2 after the batch-norm stage, a² q (or, with `power` 1, a q, its share of Σ dy₁ (x - p)), and 0
    /// where a = 0: every value of such a plane maps to β exactly, whatever q. That includes an overflowed q = ∞
    /// (double input deviating by more than about 1e154), whose batch variance is infinite too, so a = γ/∞ = 0;
    /// 0 · ∞ would make the group's moments NaN where the values are β, as PyTorch's batch norm gives them.
    @inline(__always)
    static func scaledM2(_ q: SIMD4<Double>, _ a: SIMD4<Double>, power: Int = 2) -> SIMD4<Double> {
        (power == 2 ? q * (a * a) : a * q).replacing(with: 0, where: a .== 0)
    }
    @inline(__always)
    static func scaledM2(_ q: Double, _ a: Double, power: Int = 2) -> Double {
        a == 0 ? 0 : power == 2 ? q * (a * a) : a * q
    }

    /// Moments of y₁ over the group from the planes' staged means (stored into `yBar`, K values) and M2s a² q:
    /// Chan's formula for K sets of S values, M2 = Σ a² q + S Σ (ȳ - mean)².
    ///
    /// One pass shifted by an early ȳ, kept when the shift was within a standard deviation of the mean
    /// ((Σd)²/K at most half of Σd²: the same rule as the plane kernels), else a corrected second pass around
    /// the mean found (mean = c + Σ(ȳ - c)/K, Σ (ȳ - mean)² = Σ (ȳ - c)² - (Σ(ȳ - c))²/K): r magnifies the
    /// mean's rounding when the group's spread is small against it. One plane gives its ȳ and Σ a² q exactly.
    @inline(__always)
    func groupMoments(_ yBar: UnsafeMutablePointer<Double>) -> Moments {
        groupMoments(stagedMeans, stagedMean, storingInto: yBar)
    }

    /// `groupMoments` from the planes' staged means given by `staged` (planes k..<k+4) and `stagedOne` (plane
    /// k), stored into `yBar` when given; without it a second pass computes them again.
    @inline(__always)
    func groupMoments(_ staged: (Int) -> SIMD4<Double>, _ stagedOne: (Int) -> Double,
                      storingInto yBar: UnsafeMutablePointer<Double>?) -> Moments {
        let K = planes, invK = 1 / Double(K), a = self.a, q = self.q
        let shift = K >= 4 ? Lanes.reduce(staged(0)) * 0.25 : stagedOne(0), sv = SIMD4(repeating: shift)
        var d = 0.0, squares = 0.0, within = 0.0
        if let q {
            Lanes.accumulate(K, { k in
                let y = staged(k), e = y - sv
                yBar?.storeLanes(y, k)
                return (e, e * e, Self.scaledM2(q.lanes(k), a.lanes(k)))
            }, scalar: { k in
                let y = stagedOne(k), e = y - shift
                yBar?[k] = y
                return (e, e * e, Self.scaledM2(q[k], a[k]))
            }, into: &d, &squares, &within)
        } else {  // within = 0: the two sums alone, in the same order
            (d, squares) = Lanes.sums(K) { k in
                let y = staged(k), e = y - sv
                yBar?.storeLanes(y, k)
                return (e, e * e)
            } scalar: { k in
                let y = stagedOne(k), e = y - shift
                yBar?[k] = y
                return (e, e * e)
            }
        }
        var mean = shift + d * invK, between = squares - d * d * invK
        if !ShiftRule.keeps(m2: between, squares: squares) {
            let c = mean, cv = SIMD4(repeating: c)
            let (d2, s2) = Lanes.sums(K) { k in let e = (yBar?.lanes(k) ?? staged(k)) - cv; return (e, e * e) }
                scalar: { k in let e = (yBar?[k] ?? stagedOne(k)) - c; return (e, e * e) }
            mean = c + d2 * invK
            between = max(s2 - d2 * d2 * invK, 0)
        }
        return Moments(count: Double(K * spatial), mean: mean, m2: within + Double(spatial) * between)
    }

    /// r = 1/√(v + eps), the group's inverse deviation (the same operations lane by lane).
    @inline(__always)
    static func inverseDeviation(_ variance: Double, eps: Double) -> Double { 1 / (variance + eps).squareRoot() }
    @inline(__always)
    static func inverseDeviation(_ variance: SIMD4<Double>, eps: Double) -> SIMD4<Double> {
        1 / (variance + SIMD4(repeating: eps)).squareRoot()
    }

    /// `inverseDeviation` of `count` groups' variances, in place: several groups' square roots and divisions
    /// at once, instead of each stalling its own group's output.
    @inline(__always)
    static func inverseDeviations(_ v: UnsafeMutablePointer<Double>, count n: Int, eps: Double) {
        Lanes.map(n, into: v) { inverseDeviation(v.lanes($0), eps: eps) } scalar: { inverseDeviation(v[$0], eps: eps) }
    }

    /// Each plane's map out = A (x - p) + M from the group's m and r: M = r w (ȳ - m) + bias into `offsets`
    /// (which holds ȳ on entry, from `groupMoments`), and A = r w a into `scales` when given.
    @inline(__always)
    func coefficients(mean m: Double, r: Double, weight w: Double, bias: Double,
                      offsets: UnsafeMutablePointer<Double>, scales: UnsafeMutablePointer<Double>?) {
        let rw = r * w, rwv = SIMD4(repeating: rw), mv = SIMD4(repeating: m), bv = SIMD4(repeating: bias)
        if let scales { Lanes.map(planes, into: scales) { rwv * a.lanes($0) } scalar: { rw * a[$0] } }
        Lanes.map(planes, into: offsets) { rwv * (offsets.lanes($0) - mv) + bv } scalar: {
            rw * (offsets[$0] - m) + bias
        }
    }

    /// Without a channel-norm stage, a plane whose mean p is NaN or infinite (a non-finite value in it) is mapped
    /// about its channel's μ instead, when μ is finite (eval, or training with estimates that are): then
    /// y₁ = a (x - μ) + β value by value, and the non-finite value stays its own, as in PyTorch, where x - p made
    /// every value of the plane NaN (and the backward's x - p likewise). The plane's p becomes μ for both
    /// directions. With batch statistics, μ is not finite either and nothing changes.
    @inline(__always)
    static func recentre(_ p: UnsafeMutablePointer<Double>, channel mu: Double) {
        if !p.pointee.isFinite && mu.isFinite { p.pointee = mu }
    }

    /// Without a channel-norm stage the map is y₁ itself: A = a into `scales` (when given), M = ȳ into
    /// `offsets`, for every plane (any number of them: no group couples them).
    @inline(__always)
    func batchNormMaps(offsets: UnsafeMutablePointer<Double>, scales: UnsafeMutablePointer<Double>?) {
        Lanes.map(planes, into: offsets) { stagedMeans($0) } scalar: { stagedMean($0) }
        scales?.update(from: a, count: planes)
    }

    /// The forward: the group's (m, r), each plane's map out = A (x - p) + M with A in `scales` and M in
    /// `offsets` (K values each). Without a channel-norm stage the map is y₁ itself (`batchNormMaps`; m and r
    /// are not defined).
    @inline(__always)
    func forward(weight w: Double, bias: Double, scales: UnsafeMutablePointer<Double>,
                 offsets: UnsafeMutablePointer<Double>) -> (m: Double, r: Double) {
        guard let eps = groupEps else {
            batchNormMaps(offsets: offsets, scales: scales)
            return (0, 0)
        }
        let group = groupMoments(offsets), r = Self.inverseDeviation(group.variance, eps: eps)
        coefficients(mean: group.mean, r: r, weight: w, bias: bias, offsets: offsets, scales: scales)
        return (group.mean, r)
    }

    /// ȳ of one-value planes k..<k+4 whose values are `x` itself (S = 1, so p = x): the operations of
    /// `stagedMeans`, without widening the values into plane means first.
    @inline(__always)
    func stagedValues<T: NormalizationScalar>(_ x: UnsafePointer<T>, _ k: Int) -> SIMD4<Double> {
        beta.lanes(k).addingProduct(a.lanes(k), T._load4Wide(x, k) - mu.lanes(k))
    }

    @inline(__always)
    func stagedValue<T: NormalizationScalar>(_ x: UnsafePointer<T>, _ k: Int) -> Double {
        beta[k].addingProduct(a[k], Double(x[k]) - mu[k])
    }

    /// The group's moments of y₁ for a unit of one-value planes (S = 1) whose values are x[k0..<k0+K] (and
    /// whose a, β, μ are the unit's from k0 on): the numbers `groupMoments` gives on planes p = x, with the
    /// staged means (y₁ itself) stored into `yBar` (K values) for `mapValues`. The offset lets one unit value
    /// serve a row's consecutive groups from fixed pointers (per-group pointers spilled registers).
    @inline(__always)
    func valueMoments<T: NormalizationScalar>(_ x: UnsafePointer<T>, from k0: Int = 0,
                                              storingInto yBar: UnsafeMutablePointer<Double>) -> Moments {
        groupMoments({ stagedValues(x, k0 &+ $0) }, { stagedValue(x, k0 &+ $0) }, storingInto: yBar)
    }

    /// The output of a unit of one-value planes from the staged means `valueMoments` stored (K values) into
    /// `y` (K values), rounded once to T: every plane's map is the constant M = r w (ȳ - m) + bias, the numbers
    /// of `coefficients` on planes p = x.
    @inline(__always)
    func mapValues<T: NormalizationScalar>(staged yBar: UnsafePointer<Double>, into y: UnsafeMutablePointer<T>,
                                           mean m: Double, r: Double, weight w: Double, bias: Double) {
        let rw = r * w, rwv = SIMD4(repeating: rw), mv = SIMD4(repeating: m), bv = SIMD4(repeating: bias)
        var k = 0
        // eight values a step (two independent lanes of four, half the loop's bookkeeping), then four
        while k &+ 8 <= planes {
            T._store4Narrow(rwv * (yBar.lanes(k) - mv) + bv, y, k)
            T._store4Narrow(rwv * (yBar.lanes(k &+ 4) - mv) + bv, y, k &+ 4)
            k &+= 8
        }
        if k &+ 4 <= planes { T._store4Narrow(rwv * (yBar.lanes(k) - mv) + bv, y, k); k &+= 4 }
        while k < planes { y[k] = T(rw * (yBar[k] - m) + bias); k &+= 1 }
    }

    /// Without a channel-norm stage, the output of one-value planes is y₁ = ȳ itself, from `x` into `y`
    /// (`planes` values each; any number of them: no group couples them).
    @inline(__always)
    func batchNormValues<T: NormalizationScalar>(_ x: UnsafePointer<T>, into y: UnsafeMutablePointer<T>) {
        var k = 0
        while k &+ 4 <= planes { T._store4Narrow(stagedValues(x, k), y, k); k &+= 4 }
        while k < planes { y[k] = T(stagedValue(x, k)); k &+= 1 }
    }

    /// What the backward leaves per plane: dy₁ = E dy + F (x - p) + H, and the totals the batch-norm stage sums.
    struct Gradient {
        /// Σ dy₁ per plane (K values, caller's scratch).
        var sum: UnsafeMutablePointer<Double>
        /// F, H and Σ dy₁ (x - p) per plane. E is returned.
        var f, h, dot: UnsafeMutablePointer<Double>
    }

    /// The backward, given each plane's T = Σ dy and U = Σ dy (x - p) and the forward's m, r, w (one-value
    /// planes: `valueSums` and `valueGradients`).
    ///
    /// With W = Σ_k (a U + e T), e = ȳ - m, N = K·S:
    ///   E = r w,  F = -r³ w W a / N,  H = -r w ΣT / N - r³ w W e / N,
    ///   Σ dy₁ = r w (T - ΣT/K) - r³ w W e / K,
    ///   Σ dy₁ (x - p) = E U + F q = r³ w [U (eps + v') - a q W'/N],
    /// where v' = (M2 - a² q)/N and W' = W - a U are the group's variance and W without the plane itself: the
    /// form 1 - r² a² q/N = r² (eps + v') keeps what exists only through eps (one plane per group) instead of
    /// cancelling it away, and one plane per group gives Σ dy₁ = 0 exactly. Fills `out`'s arrays (`yBar` is K
    /// values of scratch) and returns (E, ΣT, r W): ΣT and r W are the group bias's and weight's gradients.
    /// Without a channel-norm stage dy₁ = dy.
    @inline(__always)
    func backward(t: UnsafePointer<Double>, u: UnsafePointer<Double>, m: Double, r: Double, weight w: Double,
                  yBar: UnsafeMutablePointer<Double>, into out: Gradient) -> (e: Double, biasGradient: Double,
                                                                            weightGradient: Double) {
        guard let eps = groupEps else {
            out.sum.update(from: t, count: planes)
            out.f.update(repeating: 0, count: planes); out.h.update(repeating: 0, count: planes)
            out.dot.update(from: u, count: planes)
            return (1, 0, 0)
        }
        let K = planes, a = self.a, q = self.q, mv = SIMD4(repeating: m)
        let m2 = groupMoments(yBar).m2  // the group's M2, for Σ dy₁ (x - p)
        let (tg, wg) = Lanes.sums(K) { k in
            (t.lanes(k), a.lanes(k) * u.lanes(k) + (yBar.lanes(k) - mv) * t.lanes(k))
        } scalar: { k in (t[k], a[k] * u[k] + (yBar[k] - m) * t[k]) }
        let invN = 1 / Double(K * spatial)
        // r³ w W as (r² w)(r W), never r³ alone: r W and r² w stay in range where r³ leaves it (a group's spread
        // past 1e±103 in Float64; likewise each product of `dots` pairs r with a factor of the spread's scale)
        let rw = r * w, r3wW = rw * r * (r * wg) * invN, hConst = -rw * tg * invN
        let v = Lanes.Constants(rw: rw, r: r, r3wW: r3wW, hConst: hConst, wg: wg, invN: invN, m: m)
        let terms = SumGradient.terms(t: tg, w: wg, planes: K, m: m, r: r, weight: w)  // Σ dy₁'s, as values take it
        let sumGradient = SumGradient(rw: terms.rw, meanT: terms.meanT, r3wWK: terms.r3wWK, m: m)
        Lanes.map(K, into: out.sum) { sumGradient(t.lanes($0), yBar.lanes($0)) }
            scalar: { sumGradient(t[$0], yBar[$0]) }
        let f = out.f, h = out.h, dot = out.dot
        Lanes.map(K, into: f) { -v.r3wW4 * a.lanes($0) } scalar: { -r3wW * a[$0] }
        Lanes.map(K, into: h) { v.hConst4 - v.r3wW4 * (yBar.lanes($0) - v.m4) } scalar: {
            hConst - r3wW * (yBar[$0] - m)
        }
        // Σ dy₁ (x - p) needs the plane's own a² q and a U taken out of M2 and W; r³ w [...] as
        // r w [(r U)(r (eps + v')) - (r a q)(r W')/N].
        let m2v = SIMD4(repeating: m2), epsv = SIMD4(repeating: eps)
        @inline(__always)
        func dots(_ q4: (Int) -> SIMD4<Double>, _ q1: (Int) -> Double) {
            Lanes.map(K, into: dot) { k in
                let ak = a.lanes(k), qk = q4(k), uk = u.lanes(k)
                let others = (m2v - Self.scaledM2(qk, ak)) * v.invN4, wOthers = v.wg4 - ak * uk
                return v.rw4 * ((v.r4 * uk) * (v.r4 * (epsv + others))
                                - (v.r4 * Self.scaledM2(qk, ak, power: 1)) * (v.r4 * wOthers) * v.invN4)
            } scalar: { k in
                let qk = q1(k), others = (m2 - Self.scaledM2(qk, a[k])) * invN, wOthers = wg - a[k] * u[k]
                return rw * ((r * u[k]) * (r * (eps + others))
                             - (r * Self.scaledM2(qk, a[k], power: 1)) * (r * wOthers) * invN)
            }
        }
        // q tested once, not per load: `q?.lanes(k) ?? 0` became masked loads (see BatchNormStage.backwardScratch)
        if let q { dots({ q.lanes($0) }, { q[$0] }) } else { dots({ _ in SIMD4() }, { _ in 0 }) }
        return (rw, tg, r * wg)
    }
}

extension NormalizationUnit {
    /// The backward of a unit of one-value planes (S = 1), from values `x` and gradients `dy` (K each, from value
    /// `first` + k0 of the tensor and channel `channel` + k0, where the unit's a, β and μ are those of `channel`:
    /// the offset k0 lets one unit value serve a row's consecutive groups, as in `valueMoments`): the numbers
    /// `backward` gives on planes p = x with T = dy and U = 0, without scratch, in two steps. `valueSums` gives
    /// the unit's ΣT and W (the group bias's gradient, and its weight's over r), `SumGradient.store` turns
    /// them into the constants of dy₁, and `valueGradients` hands each value's dy₁ to a sink. Rows run the first
    /// two for all their groups before the third, so that the value loops run back to back. Without a
    /// channel-norm stage dy₁ = dy (`valueGradients` with no constants).
    ///
    /// W = Σ (a U + e T) with U = 0; the zero is still added, as the general form adds a U, so that a sum of zero
    /// terms has the same sign.
    @inline(__always)
    func valueSums<T: NormalizationScalar>(_ x: UnsafePointer<T>, _ dy: UnsafePointer<T>, first i: Int,
                                           from k0: Int, m: Double) -> (t: Double, w: Double) {
        let x = x + i, dy = dy + i, mv = SIMD4(repeating: m)
        return Lanes.sums(planes) { j in
            let k = k0 &+ j, t = T._load4Wide(dy, k)
            return (t, SIMD4() + (stagedValues(x, k) - mv) * t)
        } scalar: { j in
            let k = k0 &+ j, t = Double(dy[k])
            return (t, 0 + (stagedValue(x, k) - m) * t)
        }
    }

    /// Each value's dy₁ = r w (dy - ΣT/K) - r³ w W (ȳ - m)/K (`gradient`; dy itself when nil), handed to `sink`.
    @inline(__always)
    func valueGradients<T: NormalizationScalar, Sink: ValueGradientSink>(
        _ x: UnsafePointer<T>, _ dy: UnsafePointer<T>, first i: Int, channel c: Int, from k0: Int,
        _ gradient: SumGradient?, into sink: Sink
    ) {
        let x = x + i, dy = dy + i, end = k0 &+ planes
        var k = k0
        // Wrapping index arithmetic (see `Lanes`): the unit lies inside the tensor (checked at the ABI).
        guard let gradient else {
            while k &+ 4 <= end { sink.lanes(i &+ k, c &+ k, T._load4Wide(dy, k)); k &+= 4 }
            while k < end { sink.one(i + k, c + k, Double(dy[k])); k &+= 1 }
            return
        }
        while k &+ 4 <= end { sink.lanes(i &+ k, c &+ k, gradient(T._load4Wide(dy, k), stagedValues(x, k))); k &+= 4 }
        while k < end { sink.one(i + k, c + k, gradient(Double(dy[k]), stagedValue(x, k))); k &+= 1 }
    }
}

/// Σ dy₁ of a plane from its T and ȳ (dy₁ itself for a one-value plane): r w (T - ΣT/K) - r³ w W (ȳ - m)/K,
/// four planes or one with the same operations.
struct SumGradient {
    let rw: SIMD4<Double>, meanT: SIMD4<Double>, r3wWK: SIMD4<Double>, m: SIMD4<Double>

    @inline(__always)
    init(rw: Double, meanT: Double, r3wWK: Double, m: Double) {
        self.rw = SIMD4(repeating: rw); self.meanT = SIMD4(repeating: meanT)
        self.r3wWK = SIMD4(repeating: r3wWK); self.m = SIMD4(repeating: m)
    }

    /// The constants of a group of K planes from its ΣT and W, and the forward's m and r, with weight w:
    /// (r w, ΣT/K, r³ w W/K, m).
    @inline(__always)
    static func terms(t: Double, w wg: Double, planes K: Int, m: Double, r: Double, weight w: Double)
        -> (rw: Double, meanT: Double, r3wWK: Double, m: Double)
    {
        let c = terms(t: SIMD4(repeating: t), w: SIMD4(repeating: wg), planes: K, m: SIMD4(repeating: m),
                      r: SIMD4(repeating: r), weight: SIMD4(repeating: w))
        return (c.rw[0], c.meanT[0], c.r3wWK[0], c.m[0])
    }

    /// `terms` of four groups, lane l for group l.
    @inline(__always)
    static func terms(t: SIMD4<Double>, w wg: SIMD4<Double>, planes K: Int, m: SIMD4<Double>, r: SIMD4<Double>,
                      weight w: SIMD4<Double>)
        -> (rw: SIMD4<Double>, meanT: SIMD4<Double>, r3wWK: SIMD4<Double>, m: SIMD4<Double>)
    {
        let invK = 1 / Double(K), rw = r * w
        return (rw, t * invK, (rw * r) * (r * wg) * invK, m)  // r³ w W/K, never r³ alone (`backward`)
    }

    /// `terms` as four Doubles at `out`.
    @inline(__always)
    static func store(t: Double, w wg: Double, planes K: Int, m: Double, r: Double, weight w: Double,
                      into out: UnsafeMutablePointer<Double>) {
        let c = terms(t: t, w: wg, planes: K, m: m, r: r, weight: w)
        out[0] = c.rw; out[1] = c.meanT; out[2] = c.r3wWK; out[3] = c.m
    }

    /// The constants that `store` wrote at `constants`.
    @inline(__always)
    init(_ constants: UnsafePointer<Double>) {
        self.init(rw: constants[0], meanT: constants[1], r3wWK: constants[2], m: constants[3])
    }

    @inline(__always)
    func callAsFunction(_ t: SIMD4<Double>, _ yBar: SIMD4<Double>) -> SIMD4<Double> {
        rw * (t - meanT) - r3wWK * (yBar - m)
    }

    @inline(__always)
    func callAsFunction(_ t: Double, _ yBar: Double) -> Double { rw[0] * (t - meanT[0]) - r3wWK[0] * (yBar - m[0]) }
}

/// What the backward of one-value planes does with each value's dy₁: `lanes` for values i..<i+4 of the tensor
/// (channels c..<c+4), `one` for value i (channel c).
protocol ValueGradientSink {
    func lanes(_ i: Int, _ c: Int, _ dy1: SIMD4<Double>)
    func one(_ i: Int, _ c: Int, _ dy1: Double)
}

extension NormalizationUnit.Gradient {
    /// The arrays in 4·K Doubles of scratch.
    init(_ scratch: UnsafeMutablePointer<Double>, planes K: Int) {
        self.init(sum: scratch, f: scratch + K, h: scratch + 2 * K, dot: scratch + 3 * K)
    }

    /// The arrays from plane k on.
    func advanced(by k: Int) -> Self { Self(sum: sum + k, f: f + k, h: h + k, dot: dot + k) }

    /// dy₁ = E dy + F (x - p) + H of K planes as the map dx = P dy + Q (x - p) + R (P = E, Q = F, R = H): dx
    /// itself when no batch-norm stage comes before (`BatchNormStage.dxMaps` otherwise).
    @inline(__always)
    func maps(_ K: Int, e: Double, P: UnsafeMutablePointer<Double>, Q: UnsafeMutablePointer<Double>,
              R: UnsafeMutablePointer<Double>) {
        P.update(repeating: e, count: K); Q.update(from: f, count: K); R.update(from: h, count: K)
    }
}
