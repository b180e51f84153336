// The channel-norm stage on rows of one-value planes ([B, C] Float input, S = 1, and short planes seen as such by
// `RowsValueView`) in Float32 lanes: eight values a step where the Float64 path (`NormalizationUnit.valueMoments`,
// `mapValues`) takes four. The group's sums run in Float32 lanes flushed to Float64 every 64 values; the shift rule, m,
// r and the coefficients stay Float64. This is the Float32 transcription of those value methods' algebra, for the
// groups `RowRounding.accepts`; the rest take the Float64 path.

extension Float {
    /// The batch-norm stage's per-channel constants, rounded to Float32 once a call: μ as the sum of two Floats
    /// (so that x - μ's rounding stays relative to x - μ, however far x and μ are from 0), a and β to nearest.
    struct ValueConstants {
        let muHigh, muLow, a, beta: UnsafeMutablePointer<Float>

        /// The constants of `count` channels from the context's Float64 μ, a, β, each repeated `repeating` times
        /// (the values of a channel's short plane, `RowsValueView`), into `storage` (4·count·repeating Floats).
        init(count n: Int, repeating S: Int = 1, mu: UnsafePointer<Double>, a a64: UnsafePointer<Double>,
             beta b64: UnsafePointer<Double>, storage: UnsafeMutablePointer<Float>) {
            let values = n * S
            muHigh = storage; muLow = storage + values; a = muLow + values; beta = a + values
            var i = 0
            for c in 0..<n {
                let high = Float(mu[c]), low = Float(mu[c] - Double(high)), ac = Float(a64[c]), bc = Float(b64[c])
                for _ in 0..<S { muHigh[i] = high; muLow[i] = low; a[i] = ac; beta[i] = bc; i &+= 1 }
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

    /// One group of K one-value planes from x[k0] (K a multiple of 8): its ȳ into `staged` (K Floats), and the
    /// sums of `groupMoments`'s one pass, shifted by the mean of its first eight ȳ: (shift, Σ(ȳ - shift),
    /// Σ(ȳ - shift)²), the lanes summed in Float32 over at most 64 values (8 terms a lane), then in Float64.
    @inline(__always)
    static func _valueGroupSums(_ x: UnsafePointer<Float>, from k0: Int, count K: Int, _ c: ValueConstants,
                                staged: UnsafeMutablePointer<Float>) -> (shift: Double, d: Double, squares: Double) {
        // The first vector's sum by `_hsum2`'s vector operations: `_hsum` here let LLVM compute its eight
        // values one by one, then regroup them (about 60 instructions instead of 10).
        let first = c.staged(x, k0)
        _store8(first, staged, 0)
        let shift = _hsum2(first, first).0 * 0.125, sv = SIMD8(repeating: shift)
        var d = 0.0, squares = 0.0, e = first - sv, dv = e, qv = e * e, i = 8
        while i < K {
            if i & 63 == 0 {
                let (ds, qs) = _hsum2(dv, qv)
                d += Double(ds); squares += Double(qs); dv = SIMD8(); qv = dv
            }
            let y = c.staged(x, k0 &+ i)
            _store8(y, staged, i)
            e = y - sv; dv += e; qv.addProduct(e, e)
            i &+= 8
        }
        let (ds, qs) = _hsum2(dv, qv)
        d += Double(ds); squares += Double(qs)
        return (Double(shift), d, squares)
    }

    /// out = bias + rw (ȳ - m) of K staged values (a multiple of 8) into y, in Float32: m as the sum of two
    /// Floats, so that ȳ - m's rounding stays relative to ȳ - m.
    @inline(__always)
    static func _valueGroupMap(_ staged: UnsafePointer<Float>, into y: UnsafeMutablePointer<Float>, count K: Int,
                               mean m: Double, scale rw: Double, bias: Double) {
        let high = Float(m), mh = SIMD8(repeating: high), ml = SIMD8(repeating: Float(m - Double(high)))
        let s = SIMD8(repeating: Float(rw)), b = SIMD8(repeating: Float(bias))
        var i = 0
        while i < K {
            _store8(b.addingProduct(s, (_load8(staged, i) - mh) - ml), y, i)
            i &+= 8
        }
    }
}

extension Float {
    /// Every group of one item (`groups` groups of K one-value planes from x, one row's stretch; the constants
    /// from its first channel): `_valueGroupSums`, then the group's mean and variance into `means` and
    /// `variances` where `RowRounding` accepts it. Returns the groups it refused (bit j for group j, at most 64),
    /// whose entries the caller fills from the Float64 path. Out of line: inlined into the parallel loop, the
    /// pointers it advances per group spilled around every group.
    @inline(never)
    static func _valueItemMoments(_ x: UnsafePointer<Float>, groups: Int, size K: Int, _ c: ValueConstants,
                                  betaReach: UnsafePointer<Double>, staged: UnsafeMutablePointer<Float>,
                                  means: UnsafeMutablePointer<Double>, variances: UnsafeMutablePointer<Double>)
        -> UInt64
    {
        precondition(groups <= 64, "an item of one-value planes holds at most 64 groups")
        let invK = 1 / Double(K)
        var refused: UInt64 = 0, j = 0, at = 0
        while j < groups {
            let (shift, d, squares) = _valueGroupSums(x, from: at, count: K, c, staged: staged + at)
            let mean = shift + d * invK, between = squares - d * d * invK
            if RowRounding.accepts(count: K, mean: mean, squares: squares, between: between, beta: betaReach[j]) {
                means[j] = mean; variances[j] = Moments(count: Double(K), mean: mean, m2: between).variance
            } else {
                refused |= 1 << UInt64(j)
            }
            j &+= 1; at &+= K
        }
        return refused
    }

    /// `_valueGroupMap` of every group of one item but those in `skipping` (bit j for group j): group j's
    /// staged values to y with mean `means[j]`, scale `inverses[j]` · `weights[j]` and bias `bias[j]` (0 without).
    @inline(never)
    static func _valueItemMaps(_ staged: UnsafePointer<Float>, into y: UnsafeMutablePointer<Float>, groups: Int,
                               size K: Int, means: UnsafePointer<Double>, inverses: UnsafePointer<Double>,
                               weights: UnsafePointer<Double>, bias: UnsafePointer<Float>?, skipping: UInt64) {
        var j = 0, at = 0
        while j < groups {
            if skipping & (1 << UInt64(j)) == 0 {
                _valueGroupMap(staged + at, into: y + at, count: K, mean: means[j], scale: inverses[j] * weights[j],
                               bias: bias.map { Double($0[j]) } ?? 0)
            }
            j &+= 1; at &+= K
        }
    }
}

/// When a group of one-value planes may take the Float32 lanes.
enum RowRounding {
    /// Whether a group of one-value planes of Float input keeps the Float32 lanes' result: its Float32 sums
    /// (`Float._valueGroupSums`: K values, mean `mean`, Σ(ȳ - shift)² = `squares`, M2 = `between`), and `beta`,
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
    @inline(__always)
    static func accepts(count K: Int, mean: Double, squares: Double, between: Double, beta: Double) -> Bool {
        let meanSquare = squares / Double(K), reach = max(abs(mean), beta)
        return between >= 0.5 * squares && between >= Double(K) * reach * reach * 0.0625
            && meanSquare > 1e-30 && meanSquare < 1e36
    }

    /// Whether the backward of a group of one-value planes may take the Float32 lanes (`Float._valueItemGradients`),
    /// from the forward's m and r, the group's weight w and the largest |β| of its channels. e = ȳ - m is rounded
    /// within about 2 ulps of the larger of |ȳ| and |β|, and dy₁ magnifies e by r: so r · max(|m|, |β|) ≤ 4, the
    /// forward's rule (`accepts`, with 1/r ≥ σ). r and r |w| within 1e-10...1e10 (not NaN), so that with the sums'
    /// ranges (`acceptsGradientSums`) the scale of every Float32 product and constant (the group's root mean
    /// squares times these factors) stays within about 1e-30...1e30: far from overflow, and what a subnormal
    /// value loses is far below an ulp of that scale.
    @inline(__always)
    static func acceptsGradient(m: Double, r: Double, weight w: Double, beta: Double) -> Bool {
        let rw = r * abs(w)
        return r >= 1e-10 && r <= 1e10 && rw >= 1e-10 && rw <= 1e10 && r * max(abs(m), beta) <= 4
    }

    /// Whether a group's Float32 sums (`Float._valueGroupGradientSums`: K values, ΣT, W, Σ dy² and Σ (x - μ)²) are
    /// kept: ΣT and W finite, and the mean squares of dy and of x - μ within 1e-20...1e20 (with
    /// `acceptsGradient`'s ranges, what keeps dy₁, the batch-norm stage's (x - μ) dy₁ and the constants of dy₁ in
    /// Float32's normal range: near 1e-38, (x - μ) dy₁ would be subnormal).
    @inline(__always)
    static func acceptsGradientSums(count K: Int, t: Double, w: Double, squares: Double, centred: Double) -> Bool {
        let invK = 1 / Double(K), dy = squares * invK, z = centred * invK
        return t.isFinite && w.isFinite && dy >= 1e-20 && dy <= 1e20 && z >= 1e-20 && z <= 1e20
    }

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
