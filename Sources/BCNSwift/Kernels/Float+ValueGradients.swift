// The backward of rows of one-value planes ([B, C] Float input, S = 1) in Float32 lanes: eight values a step
// where the Float64 path (`NormalizationUnit.valueSums`, `valueGradients`) takes four. The Float32 transcription of
// those value methods' algebra, for the groups `RowRounding.acceptsGradient` lets through; the group's sums run
// in Float32 lanes flushed to Float64 every 64 values, its constants come from Float64 (m, r, T, W), and each value's
// dy₁ and x - μ go to a `FloatValueSink`.

extension Float {
    /// One group's dy₁ = r w ((dy - T/K)) - r³ w W/K · e with e = (ȳ - m), as six Floats at `constants`: r w,
    /// T/K as two Floats, r³ w W/K, m as two Floats (so that dy - T/K and ȳ - m round relative to their own
    /// size, however far dy and ȳ sit from 0).
    enum GradientConstants {
        static let count = 6

        /// The constants from the group's ΣT and W, the forward's m and r, and the weight w (`SumGradient.store`
        /// in Float32).
        @inline(__always)
        static func store(t: Double, w wg: Double, planes K: Int, m: Double, r: Double, weight w: Double,
                          into out: UnsafeMutablePointer<Float>) {
            let invK = 1 / Double(K), rw = r * w, meanT = t * invK, tHigh = Float(meanT), mHigh = Float(m)
            out[0] = Float(rw); out[1] = tHigh; out[2] = Float(meanT - Double(tHigh))
            out[3] = Float(rw * r * r * wg * invK); out[4] = mHigh; out[5] = Float(m - Double(mHigh))
        }
    }

    /// ΣT = Σ dy, W = Σ (ȳ - m) dy and Σ dy² of one group of K one-value planes from k0 (K a multiple of 8), with
    /// ȳ = β + a (x - μ) from `c` (`ValueConstants.staged`) and m as two Floats; the lanes summed in Float32 over
    /// at most 64 values (8 terms a lane), then in Float64.
    @inline(__always)
    static func _valueGroupGradientSums(_ x: UnsafePointer<Float>, _ dy: UnsafePointer<Float>, from k0: Int,
                                        count K: Int, _ c: ValueConstants, mean m: Double)
        -> (t: Double, w: Double, squares: Double)
    {
        let high = Float(m), mh = SIMD8(repeating: high), ml = SIMD8(repeating: Float(m - Double(high)))
        // The first eight values outside the loop, so that its flush test is one bit test. One loop that
        // flushes every 64 values: nested loops per block, or a countdown to each flush, let LLVM's SLP
        // vectorizer split the lanes into halves and merge the reductions (23 instructions a step, not 17).
        var tv = _load8(dy, k0), e = (c.staged(x, k0) - mh) - ml, wv = e * tv, qv = tv * tv, i = 8
        var sums = SIMD4<Double>()
        while i < K {
            if i & 63 == 0 {
                sums += SIMD4<Double>(_hsum4(tv, wv, qv, SIMD8()))
                tv = SIMD8(); wv = tv; qv = tv
            }
            let g = _load8(dy, k0 &+ i)
            e = (c.staged(x, k0 &+ i) - mh) - ml
            tv += g; wv.addProduct(e, g); qv.addProduct(g, g)
            i &+= 8
        }
        sums += SIMD4<Double>(_hsum4(tv, wv, qv, SIMD8()))
        return (sums[0], sums[1], sums[2])
    }

    /// Every group of one item (`groups` groups of K one-value planes from x and dy, one row's stretch; the
    /// constants from its first channel, the forward's m and r and the groups' largest |β| from its first group)
    /// that `RowRounding.acceptsGradient` lets through: `_valueGroupGradientSums`, its ΣT and W into `t[j]` and
    /// `w[j]` where `RowRounding.acceptsGradientSums` keeps them. Returns the groups it kept (bit j for group j).
    /// Out of line, as `_valueItemMoments` is.
    @inline(never)
    static func _valueItemGradientSums(_ x: UnsafePointer<Float>, _ dy: UnsafePointer<Float>, groups: Int, size K: Int,
                                       _ c: ValueConstants, means: UnsafePointer<Double>,
                                       inverses: UnsafePointer<Double>, betaReach: UnsafePointer<Double>,
                                       t: UnsafeMutablePointer<Double>, w: UnsafeMutablePointer<Double>) -> UInt64 {
        var kept: UInt64 = 0, j = 0, at = 0
        while j < groups {
            let m = means[j]
            if RowRounding.acceptsGradient(m: m, r: inverses[j], beta: betaReach[j]) {
                let sums = _valueGroupGradientSums(x, dy, from: at, count: K, c, mean: m)
                if RowRounding.acceptsGradientSums(count: K, t: sums.t, w: sums.w, squares: sums.squares) {
                    t[j] = sums.t; w[j] = sums.w; kept |= 1 << UInt64(j)
                }
            }
            j &+= 1; at &+= K
        }
        return kept
    }

    /// Each value's dy₁ and x - μ for every group of one item in `groups` (bit j for group j), with group j's
    /// `GradientConstants` at `constants + 6 j`, handed to `sink` eight values at a time: values first + k of the
    /// tensor, channels c0 + k. x - μ and ȳ as in `ValueConstants.staged`, then
    /// dy₁ = r w ((dy - T/K high) - T/K low) - r³ w W/K · ((ȳ - m high) - m low).
    @inline(never)
    static func _valueItemGradients<Sink: FloatValueSink>(
        _ x: UnsafePointer<Float>, _ dy: UnsafePointer<Float>, first: Int, channel c0: Int, size K: Int,
        _ c: ValueConstants, constants: UnsafePointer<Float>, groups: UInt64, into sink: Sink
    ) {
        var rest = groups
        while rest != 0 {
            let j = rest.trailingZeroBitCount, g = constants + GradientConstants.count &* j
            let rw = SIMD8(repeating: g[0]), th = SIMD8(repeating: g[1]), tl = SIMD8(repeating: g[2])
            let r3wWK = SIMD8(repeating: g[3]), mh = SIMD8(repeating: g[4]), ml = SIMD8(repeating: g[5])
            var k = j &* K
            let end = k &+ K
            while k < end {
                let z = (_load8(x, k) - _load8(c.muHigh, k)) - _load8(c.muLow, k)
                let e = (_load8(c.beta, k).addingProduct(_load8(c.a, k), z) - mh) - ml
                let dy1 = rw * ((_load8(dy, k) - th) - tl) - r3wWK * e
                sink.lanes(first &+ k, c0 &+ k, dy1, z)
                k &+= 8
            }
            rest &= rest &- 1
        }
    }
}

/// What the Float32 backward of one-value planes does with each value's dy₁: `lanes` for values i..<i+8 of the
/// tensor (channels c..<c+8), with z = x - μ of the batch-norm stage; `flush` after every eighth sample and the
/// last, for the channels c0..<c0+n of a panel (sinks that sum over samples keep Float32 partials until then).
protocol FloatValueSink {
    func lanes(_ i: Int, _ c: Int, _ dy1: SIMD8<Float>, _ z: SIMD8<Float>)
    func flush(first c0: Int, count n: Int)
}

extension Float {
    /// The batch-norm stage's a, S₁/n and k per channel (`BatchNormStage.dxTerms`), rounded to Float32 once a
    /// call, for dx = a ((dy₁ - S₁/n) - (x - μ) k).
    struct InputGradientConstants {
        let a, s1n, k: UnsafeMutablePointer<Float>

        /// From the Float64 a, S₁/n and k of `count` channels, into `storage` (3·count Floats).
        init(count n: Int, a a64: UnsafePointer<Double>, s1n s64: UnsafePointer<Double>, k k64: UnsafePointer<Double>,
             storage: UnsafeMutablePointer<Float>) {
            a = storage; s1n = storage + n; k = s1n + n
            for c in 0..<n { a[c] = Float(a64[c]); s1n[c] = Float(s64[c]); k[c] = Float(k64[c]) }
        }
    }
}
