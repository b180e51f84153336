// Short planes eight at a time. A plane of 16 to a few dozen values holds two to a few vectors, and the per-plane
// kernels (`_planeMoments`) spent most of their instructions around them: a shift from one reduction, the sums
// from another, checks and Float64 algebra, about 100 instructions for a plane of 16 values. Here eight planes
// share each reduction (`_hsum8`: one vector of eight sums), with every value and every sum computed exactly as
// the per-plane kernels compute them, so the results are theirs bit for bit.

extension Float {
    /// (Σv₀, ..., Σv₇) over the lanes of eight vectors, each summed exactly as `_hsum` sums it
    /// (((v₀ + v₄) + (v₂ + v₆)) + ((v₁ + v₅) + (v₃ + v₇)) lane by lane): the halves of each pair added, then
    /// their pairs, then their lanes, one vector operation a step for all eight.
    @inlinable @inline(__always)
    static func _hsum8(_ v0: SIMD8<Float>, _ v1: SIMD8<Float>, _ v2: SIMD8<Float>, _ v3: SIMD8<Float>,
                       _ v4: SIMD8<Float>, _ v5: SIMD8<Float>, _ v6: SIMD8<Float>, _ v7: SIMD8<Float>)
        -> SIMD8<Float>
    {
        // (a.lo + a.hi | b.lo + b.hi): t_i = v_i + v_{i+4} of a, then of b
        // (in 64-bit lanes: `lowHalf` and `highHalf`, generic, were left as calls in some specializations)
        @inline(__always) func halves(_ a: SIMD8<Float>, _ b: SIMD8<Float>) -> SIMD8<Float> {
            let u = unsafeBitCast(a, to: SIMD4<UInt64>.self), v = unsafeBitCast(b, to: SIMD4<UInt64>.self)
            return unsafeBitCast(SIMD4<UInt64>(u[0], u[1], v[0], v[1]), to: SIMD8<Float>.self)
                + unsafeBitCast(SIMD4<UInt64>(u[2], u[3], v[2], v[3]), to: SIMD8<Float>.self)
        }
        // x = (a | c), y = (b | d) of `halves` -> (a₀ a₁ b₀ b₁ | c₀ c₁ d₀ d₁), c₀ = t₀ + t₂, c₁ = t₁ + t₃
        @inline(__always) func pairs(_ x: SIMD8<Float>, _ y: SIMD8<Float>) -> SIMD8<Float> {
            let u = unsafeBitCast(x, to: SIMD4<UInt64>.self), v = unsafeBitCast(y, to: SIMD4<UInt64>.self)
            return unsafeBitCast(SIMD4<UInt64>(u[0], v[0], u[2], v[2]), to: SIMD8<Float>.self)
                + unsafeBitCast(SIMD4<UInt64>(u[1], v[1], u[3], v[3]), to: SIMD8<Float>.self)
        }
        let z = pairs(halves(v0, v4), halves(v1, v5))  // (v0 v1 | v4 v5), two partial sums each
        let w = pairs(halves(v2, v6), halves(v3, v7))  // (v2 v3 | v6 v7)
        return SIMD8(z[0], z[2], w[0], w[2], z[4], z[6], w[4], w[6])
            + SIMD8(z[1], z[3], w[1], w[3], z[5], z[7], w[5], w[7])
    }

    /// `_planeOctetMoments` of the planes from 0, eight at a time, where it takes planes of n values (two to four
    /// whole vectors: 16, 24 or 32); returns the planes done (a multiple of 8, 0 for other n).
    @inlinable @inline(__always)
    static func _planeOctets(_ x: UnsafePointer<Float>, planes: Int, spatial n: Int,
                             mean: UnsafeMutablePointer<Double>, m2: UnsafeMutablePointer<Double>) -> Int {
        guard n == 16 || n == 24 || n == 32 else { return 0 }
        var i = 0
        while i &+ 8 <= planes {
            _planeOctetMoments(x + i &* n, spatial: n, mean: mean + i, m2: m2 + i)
            i &+= 8
        }
        return i
    }

    /// `_planeMoments` of eight planes of n values from x (16, 24 or 32: `_planeOctets`), into mean[0..<8] and m2[0..<8]: each
    /// plane's shift k (the mean of its first eight values), its sums d = Σ(x - k) and q = Σ(x - k)² and its moments
    /// exactly as `_deviationBlock` and `_shiftedMoments` compute them, the eight shifts and the sums each from one
    /// `_hsum8`, the moments in Float64 lanes. (A -0 lane where `_deviationBlock` has +0 changes no sum but the sign
    /// of a zero total, which `_shiftedMoments`' 0 + d turns to +0 either way.) A plane whose sums fail
    /// `_shiftedMoments`' checks takes its fallbacks: the same numbers.
    /// Out of line (inlined into the parallel loop, its generic SIMD conversions and stores were left as calls),
    /// with a copy of the octet's code for each n.
    @inlinable @inline(never)
    static func _planeOctetMoments(_ x: UnsafePointer<Float>, spatial n: Int, mean: UnsafeMutablePointer<Double>,
                                   m2: UnsafeMutablePointer<Double>) {
        switch n {
        case 16: _planeOctet(x, spatial: 16, mean: mean, m2: m2)
        case 24: _planeOctet(x, spatial: 24, mean: mean, m2: m2)
        default: _planeOctet(x, spatial: 32, mean: mean, m2: m2)
        }
    }

    @inlinable @inline(__always)
    static func _planeOctet(_ x: UnsafePointer<Float>, spatial n: Int, mean: UnsafeMutablePointer<Double>,
                            m2: UnsafeMutablePointer<Double>) {
        @inline(__always) func plane(_ p: Int) -> UnsafePointer<Float> { x + p &* n }
        @inline(__always) func first(_ p: Int) -> SIMD8<Float> { _load8(plane(p), 0) }
        // A shift that is not finite (an infinite or NaN value among the first eight) leaves its plane's sums
        // infinite or NaN, which fail the checks below: the plane then takes `_unshiftedMoments`, as in
        // `_chunkMoments`.
        let k = _hsum8(first(0), first(1), first(2), first(3), first(4), first(5), first(6), first(7)) * 0.125
        // d and q of plane p: `_deviationBlock`'s one chain (n = 16, 24) or four chains added pairwise (n = 32)
        @inline(__always) func sums(_ p: Int) -> (SIMD8<Float>, SIMD8<Float>) {
            let v = plane(p), c = SIMD8(repeating: k[p])
            let d0 = _load8(v, 0) - c, d1 = _load8(v, 8) - c
            if n == 32 {
                let d2 = _load8(v, 16) - c, d3 = _load8(v, 24) - c
                return ((d0 + d1) + (d2 + d3), (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3))
            }
            var s = d0 + d1, q = (d0 * d0).addingProduct(d1, d1)
            if n == 24 { let d2 = _load8(v, 16) - c; s += d2; q.addProduct(d2, d2) }
            return (s, q)
        }
        let (s0, q0) = sums(0), (s1, q1) = sums(1), (s2, q2) = sums(2), (s3, q3) = sums(3)
        let (s4, q4) = sums(4), (s5, q5) = sums(5), (s6, q6) = sums(6), (s7, q7) = sums(7)
        let (dLow, dHigh) = unsafeBitCast(_hsum8(s0, s1, s2, s3, s4, s5, s6, s7), to: (SIMD4<Float>, SIMD4<Float>).self)
        let (qLow, qHigh) = unsafeBitCast(_hsum8(q0, q1, q2, q3, q4, q5, q6, q7), to: (SIMD4<Float>, SIMD4<Float>).self)
        let (kLow, kHigh) = unsafeBitCast(k, to: (SIMD4<Float>, SIMD4<Float>).self)
        let invM = 1 / Double(n)
        // `_shiftedMoments` four planes a step (0 + s as there); a plane it would not keep takes it alone
        @inline(__always) func moments(_ at: Int, _ k: SIMD4<Float>, _ ds: SIMD4<Float>, _ qs: SIMD4<Float>) {
            let d = SIMD4<Double>() + SIMD4<Double>(ds), q = SIMD4<Double>() + SIMD4<Double>(qs)
            let meanSquare = q * invM, deviation = q - d * d * invM
            UnsafeMutableRawPointer(mean + at).storeBytes(of: SIMD4<Double>(k) + d * invM, as: SIMD4<Double>.self)
            UnsafeMutableRawPointer(m2 + at).storeBytes(of: deviation, as: SIMD4<Double>.self)
            let kept = meanSquare .> 1e-30 .& meanSquare .< 1e36 .& deviation .>= 0.5 * q
            if !all(kept) {
                for l in 0..<4 where !kept[l] {
                    let p = at &+ l
                    let m = _shiftedMoments(plane(p), count: n, shift: k[l], sum: d[l], squares: q[l])
                        ?? _unshiftedMoments(plane(p), count: n)
                    mean[p] = m.mean; m2[p] = m.m2
                }
            }
        }
        moments(0, kLow, dLow, qLow)
        moments(4, kHigh, dHigh, qHigh)
    }
}
