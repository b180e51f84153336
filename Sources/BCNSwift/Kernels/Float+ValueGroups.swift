// The channel-norm stage on rows of one-value planes ([B, C] Float input, S = 1, and short planes seen as such by
// `RowsValueView`) in Float32 lanes: eight values a step where the Float64 path (`NormalizationUnit.valueMoments`,
// `mapValues`) takes four. The group's sums run in Float32 lanes flushed to Float64 every 64 values; the shift rule, m,
// r and the coefficients stay Float64. This is the Float32 transcription of those value methods' algebra, for the
// groups `RowRounding.accepts`; the rest take the Float64 path.

extension Float {
    /// v as the sum of two Floats, high = v rounded and low = the rest rounded: subtracting both from a Float
    /// rounds relative to the difference, however far both lie from 0.
    @inline(__always)
    static func _split(_ v: Double) -> (high: Float, low: Float) {
        let high = Float(v)
        return (high, Float(v - Double(high)))
    }

    /// `_split` of four numbers, lane by lane.
    @inline(__always)
    static func _split(_ v: SIMD4<Double>) -> (high: SIMD4<Float>, low: SIMD4<Float>) {
        let high = SIMD4<Float>(v)
        return (high, SIMD4<Float>(v - SIMD4<Double>(high)))
    }

    /// The batch-norm stage's per-channel constants, rounded to Float32 (once a call, or per panel: `fill`): μ as
    /// the sum of two Floats (`_split`, so that x - μ's rounding stays relative to x - μ, however far x and μ are
    /// from 0), a and β to nearest.
    struct ValueConstants {
        let muHigh, muLow, a, beta: UnsafeMutablePointer<Float>

        /// The constants of `count` channels from the context's Float64 μ, a, β, each repeated `repeating` times
        /// (the values of a channel's short plane, `RowsValueView`), into `storage` (4·count·repeating Floats).
        init(count n: Int, repeating S: Int = 1, mu: UnsafePointer<Double>, a a64: UnsafePointer<Double>,
             beta b64: UnsafePointer<Double>, storage: UnsafeMutablePointer<Float>) {
            self.init(count: n * S, storage: storage)
            var i = 0
            for c in 0..<n {
                let (high, low) = Float._split(mu[c]), ac = Float(a64[c]), bc = Float(b64[c])
                for _ in 0..<S { muHigh[i] = high; muLow[i] = low; a[i] = ac; beta[i] = bc; i &+= 1 }
            }
        }

        /// Room for the constants of `count` channels in `storage` (4·count Floats), to be filled by `fill`.
        init(count n: Int, storage: UnsafeMutablePointer<Float>) {
            muHigh = storage; muLow = storage + n; a = muLow + n; beta = a + n
        }

        /// The constants of channels c0..<c0+n from the context's Float64 μ, a, β, as `init` rounds them: a
        /// parallel pass fills the channels it is about to read.
        func fill(first c0: Int, count n: Int, mu: UnsafePointer<Double>, a a64: UnsafePointer<Double>,
                  beta b64: UnsafePointer<Double>) {
            for c in c0..<c0 &+ n {
                (muHigh[c], muLow[c]) = Float._split(mu[c]); a[c] = Float(a64[c]); beta[c] = Float(b64[c])
            }
        }

        private init(_ muHigh: UnsafeMutablePointer<Float>, _ muLow: UnsafeMutablePointer<Float>,
                     _ a: UnsafeMutablePointer<Float>, _ beta: UnsafeMutablePointer<Float>) {
            self.muHigh = muHigh; self.muLow = muLow; self.a = a; self.beta = beta
        }

        /// The constants from channel c on.
        @inline(__always)
        func advanced(by c: Int) -> Self { Self(muHigh + c, muLow + c, a + c, beta + c) }

        /// ȳ = β + a (x - μ) of the eight values from k (channels k..<k+8): x - μ in two steps (μ's two
        /// Floats, `centred`), then one fused multiply-add.
        @inline(__always)
        func staged(_ x: UnsafePointer<Float>, _ k: Int) -> SIMD8<Float> { staged(centred: centred(x, k), k) }

        /// μ's two Floats, a and β of the eight channels from k: `staged`'s constants, for a caller that applies
        /// them to several rows.
        @inline(__always)
        func lanes(_ k: Int) -> (SIMD8<Float>, SIMD8<Float>, SIMD8<Float>, SIMD8<Float>) {
            (Float._load8(muHigh, k), Float._load8(muLow, k), Float._load8(a, k), Float._load8(beta, k))
        }

        /// x - μ of the eight values from k, in two steps (μ's two Floats).
        @inline(__always)
        func centred(_ x: UnsafePointer<Float>, _ k: Int) -> SIMD8<Float> {
            (Float._load8(x, k) - Float._load8(muHigh, k)) - Float._load8(muLow, k)
        }

        /// ȳ = β + a d of the eight values from k, from their d = x - μ (`centred`).
        @inline(__always)
        func staged(centred d: SIMD8<Float>, _ k: Int) -> SIMD8<Float> {
            Float._load8(beta, k).addingProduct(Float._load8(a, k), d)
        }
    }

    /// ȳ = β + a (x - μ) of n values (a multiple of 8) of each of `rows` rows of x, `stride` values apart, into
    /// `staged` (n values a row; the constants from x's first channel). The constants' four loads serve up to four
    /// rows: with one row they were four of a step's five loads, and the loads bound this pass.
    @inline(never)
    static func _stageRows(_ x: UnsafePointer<Float>, rows: Int, stride: Int, count n: Int, _ c: ValueConstants,
                           into staged: UnsafeMutablePointer<Float>) {
        var r = 0
        while r < rows {
            let xr = x + r &* stride, out = staged + r &* n, left = rows &- r
            var k = 0
            if left >= 4 {
                let x1 = xr + stride, x2 = x1 + stride, x3 = x2 + stride
                let o1 = out + n, o2 = o1 + n, o3 = o2 + n
                while k < n {
                    let (h, l, a, b) = c.lanes(k)
                    _store8(b.addingProduct(a, (_load8(xr, k) - h) - l), out, k)
                    _store8(b.addingProduct(a, (_load8(x1, k) - h) - l), o1, k)
                    _store8(b.addingProduct(a, (_load8(x2, k) - h) - l), o2, k)
                    _store8(b.addingProduct(a, (_load8(x3, k) - h) - l), o3, k)
                    k &+= 8
                }
                r &+= 4
            } else if left >= 2 {
                let x1 = xr + stride, o1 = out + n
                while k < n {
                    let (h, l, a, b) = c.lanes(k)
                    _store8(b.addingProduct(a, (_load8(xr, k) - h) - l), out, k)
                    _store8(b.addingProduct(a, (_load8(x1, k) - h) - l), o1, k)
                    k &+= 8
                }
                r &+= 2
            } else {
                while k < n { _store8(c.staged(xr, k), out, k); k &+= 8 }
                r &+= 1
            }
        }
    }

    /// The sums of `groupMoments`'s one pass over one group's K staged values ȳ (K a multiple of 8), shifted by
    /// the mean of its first eight: (shift, Σ(ȳ - shift), Σ(ȳ - shift)²), the lanes summed in Float32 over at
    /// most 64 values (8 terms a lane), then in Float64.
    @inline(__always)
    static func _stagedGroupSums(_ staged: UnsafePointer<Float>, count K: Int)
        -> (shift: Double, d: Double, squares: Double)
    {
        // The first vector's sum by `_hsum2`'s vector operations: `_hsum` here let LLVM compute its eight
        // values one by one, then regroup them (about 60 instructions instead of 10).
        let first = _load8(staged, 0)
        let shift = _hsum2(first, first).0 * 0.125, sv = SIMD8(repeating: shift)
        var d = 0.0, squares = 0.0, e = first - sv, dv = e, qv = e * e, i = 8
        while i < K {
            if i & 63 == 0 {
                let (ds, qs) = _hsum2(dv, qv)
                d += Double(ds); squares += Double(qs); dv = SIMD8(); qv = dv
            }
            e = _load8(staged, i) - sv; dv += e; qv.addProduct(e, e)
            i &+= 8
        }
        let (ds, qs) = _hsum2(dv, qv)
        d += Double(ds); squares += Double(qs)
        return (Double(shift), d, squares)
    }

    /// `_stagedGroupSums` of the four groups of K ≤ 64 staged values from `staged` (one Float32 partial a lane, so
    /// no flush), the same sums bit for bit: the four groups step together (four independent chains), and their
    /// horizontal sums run in the same vector operations (`_hsum4`), so that per group the shift and the two final
    /// sums cost what one of them did.
    @inline(__always)
    static func _stagedQuadSums(_ staged: UnsafePointer<Float>, count K: Int) -> GroupSums {
        let p0 = staged, p1 = p0 + K, p2 = p1 + K, p3 = p2 + K
        let f0 = _load8(p0, 0), f1 = _load8(p1, 0), f2 = _load8(p2, 0), f3 = _load8(p3, 0)
        let shifts = _hsum4(f0, f1, f2, f3) * 0.125
        let s0 = SIMD8(repeating: shifts[0]), s1 = SIMD8(repeating: shifts[1])
        let s2 = SIMD8(repeating: shifts[2]), s3 = SIMD8(repeating: shifts[3])
        var e0 = f0 - s0, e1 = f1 - s1, e2 = f2 - s2, e3 = f3 - s3
        var d0 = e0, d1 = e1, d2 = e2, d3 = e3, q0 = e0 * e0, q1 = e1 * e1, q2 = e2 * e2, q3 = e3 * e3
        var i = 8
        while i < K {
            e0 = _load8(p0, i) - s0; d0 += e0; q0.addProduct(e0, e0)
            e1 = _load8(p1, i) - s1; d1 += e1; q1.addProduct(e1, e1)
            e2 = _load8(p2, i) - s2; d2 += e2; q2.addProduct(e2, e2)
            e3 = _load8(p3, i) - s3; d3 += e3; q3.addProduct(e3, e3)
            i &+= 8
        }
        // 0 + d, as `_stagedGroupSums`'s Float64 totals start (a -0 sum becomes +0)
        return GroupSums(shift: SIMD4<Double>(shifts), d: SIMD4<Double>() + SIMD4<Double>(_hsum4(d0, d1, d2, d3)),
                         squares: SIMD4<Double>(_hsum4(q0, q1, q2, q3)))
    }

    /// Four groups' `_stagedGroupSums`, lane l for group l.
    struct GroupSums {
        var shift = SIMD4<Double>(), d = SIMD4<Double>(), squares = SIMD4<Double>()
    }

    /// out = bias + rw (ȳ - m) of K staged values (a multiple of 8) into y, in Float32: m as the sum of two
    /// Floats, so that ȳ - m's rounding stays relative to ȳ - m.
    @inline(__always)
    static func _valueGroupMap(_ staged: UnsafePointer<Float>, into y: UnsafeMutablePointer<Float>, count K: Int,
                               mean m: Double, scale rw: Double, bias: Double) {
        let (high, low) = _split(m), mh = SIMD8(repeating: high), ml = SIMD8(repeating: low)
        let s = SIMD8(repeating: Float(rw)), b = SIMD8(repeating: Float(bias))
        var i = 0
        while i < K {
            _store8(b.addingProduct(s, (_load8(staged, i) - mh) - ml), y, i)
            i &+= 8
        }
    }
}

extension Float {
    /// Every group of one item (`groups` groups of K one-value planes, one row's stretch, staged by `_stageRows`):
    /// `_stagedGroupSums` (four groups at a time, `_stagedQuadSums`, where K ≤ 64), then the groups' means and
    /// variances, four at a time, into `means` and `variances` where `RowRounding` accepts them. Returns the groups
    /// it refused (bit j for group j, at most 64), whose entries the caller fills from the Float64 path. Out of
    /// line: inlined into the parallel loop, the pointers it advances per group spilled around every group.
    @inline(never)
    static func _valueItemMoments(_ staged: UnsafePointer<Float>, groups: Int, size K: Int,
                                  betaReach: UnsafePointer<Double>, means: UnsafeMutablePointer<Double>,
                                  variances: UnsafeMutablePointer<Double>) -> UInt64 {
        precondition(groups <= 64, "an item of one-value planes holds at most 64 groups")
        let invK = 1 / Double(K)
        var refused: UInt64 = 0, j = 0
        while j < groups {
            let n = min(4, groups &- j), at = j &* K
            var sums = GroupSums(), reach = SIMD4<Double>()
            if n == 4 && K <= 64 {
                sums = _stagedQuadSums(staged + at, count: K)
                reach = betaReach.lanes(j)
            } else {
                for l in 0..<n {
                    let (shift, d, squares) = _stagedGroupSums(staged + (at &+ l &* K), count: K)
                    sums.shift[l] = shift; sums.d[l] = d; sums.squares[l] = squares; reach[l] = betaReach[j &+ l]
                }
            }
            let mean = sums.shift + sums.d * invK, between = sums.squares - sums.d * sums.d * invK
            let kept = RowRounding.accepts(count: K, mean: mean, squares: sums.squares, between: between, beta: reach)
            let variance = between / Double(K)  // `Moments.variance`, with K > 0
            if n == 4 {
                means.storeLanes(mean, j); variances.storeLanes(variance, j)
                refused |= RowRounding.bits(.!kept) << UInt64(j)
            } else {
                for l in 0..<n { means[j &+ l] = mean[l]; variances[j &+ l] = variance[l] }
                for l in 0..<n where !kept[l] { refused |= 1 << UInt64(j &+ l) }
            }
            j &+= 4
        }
        return refused
    }

    /// `_valueGroupMap` of every group of one item but those in `skipping` (bit j for group j): group j's
    /// staged values to y with mean `means[j]`, scale `inverses[j]` · `weights[j]` and bias `bias[j]` (0 without).
    @inline(never)
    static func _valueItemMaps(_ staged: UnsafePointer<Float>, into y: UnsafeMutablePointer<Float>, groups: Int,
                               size K: Int, means: UnsafePointer<Double>, inverses: UnsafePointer<Double>,
                               weights: UnsafePointer<Double>, bias: UnsafePointer<Float>?, skipping: UInt64) {
        var j = 0
        while j < groups {
            let at = j &* K
            if groups &- j >= 4 && skipping >> UInt64(j) & 15 == 0 {
                _valueQuadMap(staged + at, into: y + at, count: K, means: means + j, inverses: inverses + j,
                              weights: weights + j, bias: bias.map { $0 + j })
                j &+= 4
                continue
            }
            if skipping & (1 << UInt64(j)) == 0 {
                _valueGroupMap(staged + at, into: y + at, count: K, mean: means[j], scale: inverses[j] * weights[j],
                               bias: bias.map { Double($0[j]) } ?? 0)
            }
            j &+= 1
        }
    }

    /// `_valueGroupMap` of the four groups from `staged` (K values each) into y, the same numbers: their constants
    /// rounded in one vector operation each, and the four groups stepping together.
    @inline(__always)
    static func _valueQuadMap(_ staged: UnsafePointer<Float>, into y: UnsafeMutablePointer<Float>, count K: Int,
                              means: UnsafePointer<Double>, inverses: UnsafePointer<Double>,
                              weights: UnsafePointer<Double>, bias: UnsafePointer<Float>?) {
        let (high, low) = _split(means.lanes(0)), scale = SIMD4<Float>(inverses.lanes(0) * weights.lanes(0))
        let shift = bias.map { UnsafeRawPointer($0).loadUnaligned(as: SIMD4<Float>.self) } ?? SIMD4()
        @inline(__always) func lanes(_ l: Int) -> (SIMD8<Float>, SIMD8<Float>, SIMD8<Float>, SIMD8<Float>) {
            (SIMD8(repeating: high[l]), SIMD8(repeating: low[l]), SIMD8(repeating: scale[l]),
             SIMD8(repeating: shift[l]))
        }
        let (h0, l0, s0, b0) = lanes(0), (h1, l1, s1, b1) = lanes(1)
        let (h2, l2, s2, b2) = lanes(2), (h3, l3, s3, b3) = lanes(3)
        let p1 = staged + K, p2 = p1 + K, p3 = p2 + K, y1 = y + K, y2 = y1 + K, y3 = y2 + K
        var i = 0
        while i < K {
            _store8(b0.addingProduct(s0, (_load8(staged, i) - h0) - l0), y, i)
            _store8(b1.addingProduct(s1, (_load8(p1, i) - h1) - l1), y1, i)
            _store8(b2.addingProduct(s2, (_load8(p2, i) - h2) - l2), y2, i)
            _store8(b3.addingProduct(s3, (_load8(p3, i) - h3) - l3), y3, i)
            i &+= 8
        }
    }
}

/// When a group of one-value planes may take the Float32 lanes.
enum RowRounding {
    /// Whether a group of one-value planes of Float input keeps the Float32 lanes' result: its Float32 sums
    /// (`Float._stagedGroupSums`: K values, mean `mean`, Σ(ȳ - shift)² = `squares`, M2 = `between`), and `beta`,
    /// the largest |β| of its channels. Each ȳ = β + a (x - μ) was rounded in Float32, within about 2 ulps of the
    /// larger of |ȳ| and |β| (|a (x - μ)| is at most their sum), and the channel norm magnifies that by 1/σ
    /// of the group. Measured on [256, 1024], G = 32, β = 0, the output's largest error is 4 ulps of 1 where
    /// |mean|/σ < 1, 6 below 4, 18 below 16 and 59 below 64 (the Float64 path's: 0.5). So the Float64 path takes
    /// the group instead when:
    /// - its standard deviation is below |mean|/4 or below |β|/4 (β cancelling a (x - μ): eval, with inputs
    ///   far from the running mean and a bias that brings them back);
    /// - the shift lay further than a standard deviation from the mean ((Σd)²/K above half of Σd²: the rule of
    ///   `groupMoments`, which then runs a corrected second pass);
    /// - its mean square left Float32's comfortable range (1e-30 to 1e36: a constant group among them, which
    ///   the Float64 path gives exactly its bias), or a value is NaN or infinite.
    /// (Four groups at a time, lane l for group l; a NaN mean or β leaves `between` NaN, which fails.)
    @inline(__always)
    static func accepts(count K: Int, mean: SIMD4<Double>, squares: SIMD4<Double>, between: SIMD4<Double>,
                        beta: SIMD4<Double>) -> SIMDMask<SIMD4<Int64>> {
        let meanSquare = squares / Double(K), reach = reach(mean, beta)
        return ShiftRule.keeps(m2: between, squares: squares) .& between .>= Double(K) * reach * reach * 0.0625
            .& meanSquare .> 1e-30 .& meanSquare .< 1e36
    }

    /// Whether the backward of a group of one-value planes may take the Float32 lanes (`Float._valueItemGradients`),
    /// from the forward's m and r, the group's weight w and the largest |β| of its channels. e = ȳ - m is rounded
    /// within about 2 ulps of the larger of |ȳ| and |β|, and dy₁ magnifies e by r: so r · max(|m|, |β|) ≤ 4,
    /// the forward's rule (`accepts`, with 1/r ≥ σ). r and r |w| within 1e-10...1e10 (not NaN), so that with the
    /// sums' ranges (`acceptsGradientSums`) the scale of every Float32 product and constant (the group's root mean
    /// squares times these factors) stays within about 1e-30...1e30: far from overflow, and what a subnormal
    /// value loses is far below an ulp of that scale.
    /// (Four groups at a time, lane l for group l.)
    @inline(__always)
    static func acceptsGradient(m: SIMD4<Double>, r: SIMD4<Double>, weight w: SIMD4<Double>,
                                beta: SIMD4<Double>) -> SIMDMask<SIMD4<Int64>> {
        let rw = r * magnitude(w), reach = reach(m, beta)
        return r .>= 1e-10 .& r .<= 1e10 .& rw .>= 1e-10 .& rw .<= 1e10 .& r * reach .<= 4
    }

    /// Whether a group's Float32 sums (`Float._valueGroupGradientSums`: K values, ΣT, W, Σ dy² and Σ (x - μ)²)
    /// are kept: ΣT and W finite, and the mean squares of dy and of x - μ within 1e-20...1e20 (with
    /// `acceptsGradient`'s ranges, what keeps dy₁, the batch-norm stage's (x - μ) dy₁ and the constants of dy₁
    /// in Float32's normal range: near 1e-38, (x - μ) dy₁ would be subnormal).
    /// (Four groups at a time, lane l for group l.)
    @inline(__always)
    static func acceptsGradientSums(count K: Int, t: SIMD4<Double>, w: SIMD4<Double>, squares: SIMD4<Double>,
                                    centred: SIMD4<Double>) -> SIMDMask<SIMD4<Int64>> {
        let invK = 1 / Double(K), dy = squares * invK, z = centred * invK
        return finite(t) .& finite(w) .& dy .>= 1e-20 .& dy .<= 1e20 .& z .>= 1e-20 .& z .<= 1e20
    }

    /// `acceptsGradient` of one group.
    @inline(__always)
    static func acceptsGradient(m: Double, r: Double, weight w: Double, beta: Double) -> Bool {
        acceptsGradient(m: SIMD4(repeating: m), r: SIMD4(repeating: r), weight: SIMD4(repeating: w),
                        beta: SIMD4(repeating: beta))[0]
    }

    /// `acceptsGradientSums` of one group, from its (ΣT, W, Σ dy², Σ (x - μ)²).
    @inline(__always)
    static func acceptsGradientSums(count K: Int, _ sums: SIMD4<Double>) -> Bool {
        acceptsGradientSums(count: K, t: SIMD4(repeating: sums[0]), w: SIMD4(repeating: sums[1]),
                            squares: SIMD4(repeating: sums[2]), centred: SIMD4(repeating: sums[3]))[0]
    }

    /// max(|m|, β) lane by lane, as `Swift.max` takes it (β where β >= |m|, so a NaN β gives |m|): the largest
    /// magnitude a group's ȳ - m rounds relative to.
    @inline(__always)
    static func reach(_ m: SIMD4<Double>, _ beta: SIMD4<Double>) -> SIMD4<Double> {
        let size = magnitude(m)
        return size.replacing(with: beta, where: beta .>= size)
    }

    /// Bit l set where lane l of `mask` is: four groups' decisions as the bits of their item's mask.
    @inline(__always)
    static func bits(_ mask: SIMDMask<SIMD4<Int64>>) -> UInt64 {
        SIMD4<UInt64>(1, 2, 4, 8).replacing(with: 0, where: .!mask).wrappedSum()
    }

    /// |v| lane by lane (the sign of a NaN aside).
    @inline(__always)
    static func magnitude(_ v: SIMD4<Double>) -> SIMD4<Double> { v.replacing(with: -v, where: v .< 0) }

    /// Whether each lane is finite: neither infinite nor NaN (|v| below infinity is false for both).
    @inline(__always)
    static func finite(_ v: SIMD4<Double>) -> SIMDMask<SIMD4<Int64>> { magnitude(v) .< .infinity }

    /// The largest |β| of each of `groups` groups of K channels, into `out`: the reach
    /// `accepts` needs. (A NaN β makes the group's sums NaN, which `accepts` refuses anyway.)
    static func betaReach(_ beta: UnsafePointer<Double>, groups: Int, size K: Int,
                          into out: UnsafeMutablePointer<Double>) {
        var c = 0
        for g in 0..<groups {
            var reach = 0.0
            for _ in 0..<K { reach = max(reach, abs(beta[c])); c &+= 1 }
            out[g] = reach
        }
    }
}
