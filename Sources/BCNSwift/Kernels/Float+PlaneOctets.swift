// Short planes eight at a time. A plane of 16, 24 or 32 values (4x4 maps: the last stage of a ResNet on 32x32
// images) holds two to four vectors, and the per-plane kernels spent most of their instructions around them: a
// shift from one reduction, the sums from another, checks and Float64 algebra, about 100 instructions a plane of
// 16 values for the moments and as many for the gradient sums. Here eight planes share each reduction (`_hsum8`:
// one vector of eight sums) and their Float64 algebra runs in lanes, with each plane's values summed by the
// per-plane kernels' own blocks (`_deviationBlock`, `_gradientBlock`), so the results are theirs bit for bit.
// Other lengths keep the per-plane kernels: octets of 49 and 64 values gained 1-3% of a forward over
// `_planeMoments`' pairs.

extension Float {
    /// The lane sums of eight vectors v0...v7, lane p of the result for vp, each summed exactly as `_hsum` sums
    /// it: with lanes e₀...e₇ of one vector, ((e₀ + e₄) + (e₂ + e₆)) + ((e₁ + e₅) + (e₃ + e₇)).
    /// Each step is one vector operation for all eight: half against half, then pair against pair, then
    /// lane against lane.
    @inlinable @inline(__always)
    static func _hsum8(_ v0: SIMD8<Float>, _ v1: SIMD8<Float>, _ v2: SIMD8<Float>, _ v3: SIMD8<Float>,
                       _ v4: SIMD8<Float>, _ v5: SIMD8<Float>, _ v6: SIMD8<Float>, _ v7: SIMD8<Float>)
        -> SIMD8<Float>
    {
        // (a.lo + a.hi | b.lo + b.hi): tᵢ = eᵢ + eᵢ₊₄ of a, then of b
        // (in 64-bit lanes: `lowHalf` and `highHalf`, generic, were left as calls in some specializations)
        @inline(__always) func halves(_ a: SIMD8<Float>, _ b: SIMD8<Float>) -> SIMD8<Float> {
            let u = unsafeBitCast(a, to: SIMD4<UInt64>.self), v = unsafeBitCast(b, to: SIMD4<UInt64>.self)
            return unsafeBitCast(SIMD4<UInt64>(u[0], u[1], v[0], v[1]), to: SIMD8<Float>.self)
                + unsafeBitCast(SIMD4<UInt64>(u[2], u[3], v[2], v[3]), to: SIMD8<Float>.self)
        }
        // x = (a | c), y = (b | d) of `halves` -> (a₀ a₁ b₀ b₁ | c₀ c₁ d₀ d₁), each vector's
        // s₀ = t₀ + t₂ and s₁ = t₁ + t₃
        @inline(__always) func pairs(_ x: SIMD8<Float>, _ y: SIMD8<Float>) -> SIMD8<Float> {
            let u = unsafeBitCast(x, to: SIMD4<UInt64>.self), v = unsafeBitCast(y, to: SIMD4<UInt64>.self)
            return unsafeBitCast(SIMD4<UInt64>(u[0], v[0], u[2], v[2]), to: SIMD8<Float>.self)
                + unsafeBitCast(SIMD4<UInt64>(u[1], v[1], u[3], v[3]), to: SIMD8<Float>.self)
        }
        let z = pairs(halves(v0, v4), halves(v1, v5))  // (v0 v1 | v4 v5), s₀ and s₁ of each
        let w = pairs(halves(v2, v6), halves(v3, v7))  // (v2 v3 | v6 v7)
        return SIMD8(z[0], z[2], w[0], w[2], z[4], z[6], w[4], w[6])
            + SIMD8(z[1], z[3], w[1], w[3], z[5], z[7], w[5], w[7])
    }

    /// Whether the octet kernels take planes of n values: two to four whole vectors (a specialized copy each).
    @inlinable @inline(__always)
    static func _octetPlanes(_ n: Int) -> Bool { n == 16 || n == 24 || n == 32 }

    /// `_planeOctetMoments` of the planes from 0, eight at a time, where it takes planes of n values
    /// (`_octetPlanes`); returns the planes done (a multiple of 8, 0 for other n).
    @inlinable @inline(__always)
    static func _planeOctets(_ x: UnsafePointer<Float>, planes: Int, spatial n: Int,
                             mean: UnsafeMutablePointer<Double>, m2: UnsafeMutablePointer<Double>) -> Int {
        guard _octetPlanes(n) else { return 0 }
        var i = 0
        while i &+ 8 <= planes {
            _planeOctetMoments(x + i &* n, spatial: n, mean: mean + i, m2: m2 + i)
            i &+= 8
        }
        return i
    }

    /// `_planeMoments` of eight planes of n values from x (`_octetPlanes`), into mean[0..<8] and m2[0..<8]: each
    /// plane's shift k (the mean of its first eight values), its sums d = Σ(x - k) and q = Σ(x - k)² and its
    /// moments exactly as `_deviationBlock` and `_shiftedMoments` compute them, the eight shifts and the sums each
    /// from one `_hsum8`, the moments in Float64 lanes. A plane whose sums fail `_shiftedMoments`' checks takes its
    /// fallbacks: the same numbers. Out of line (inlined into the parallel loop, its generic SIMD conversions and
    /// stores were left as calls), with a copy of the octet's code for each n.
    @inlinable @inline(never)
    static func _planeOctetMoments(_ x: UnsafePointer<Float>, spatial n: Int, mean: UnsafeMutablePointer<Double>,
                                   m2: UnsafeMutablePointer<Double>) {
        switch n {
        case 16: _planeOctet(x, spatial: 16, mean: mean, m2: m2)
        case 24: _planeOctet(x, spatial: 24, mean: mean, m2: m2)
        default: _planeOctet(x, spatial: 32, mean: mean, m2: m2)
        }
    }

    /// `_planeOctetMoments` for one n (a constant where it is inlined).
    @inlinable @inline(__always)
    static func _planeOctet(_ x: UnsafePointer<Float>, spatial n: Int, mean: UnsafeMutablePointer<Double>,
                            m2: UnsafeMutablePointer<Double>) {
        @inline(__always) func plane(_ p: Int) -> UnsafePointer<Float> { x + p &* n }
        @inline(__always) func first(_ p: Int) -> SIMD8<Float> { _load8(plane(p), 0) }
        // A shift that is not finite (an infinite or NaN value among the first eight) leaves its plane's sums
        // infinite or NaN, which fail the checks below: the plane then takes `_unshiftedMoments`, as in
        // `_chunkMoments`.
        let k = _hsum8(first(0), first(1), first(2), first(3), first(4), first(5), first(6), first(7)) * 0.125
        // d and q of plane p, by `_deviationBlock` itself (with n a constant, its loops and idle chains fold away)
        let full = n & ~7, one = SIMD8<Float>(repeating: 1)
        @inline(__always) func sums(_ p: Int) -> (SIMD8<Float>, SIMD8<Float>) {
            var i = 0
            return _deviationBlock(plane(p), &i, end: full, full: full, count: n, shift: SIMD8(repeating: -k[p]),
                                   scale: one)
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
            mean.storeLanes(SIMD4<Double>(k) + d * invM, at)
            m2.storeLanes(deviation, at)
            let kept = meanSquare .> 1e-30 .& meanSquare .< 1e36 .& ShiftRule.keeps(m2: deviation, squares: q)
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

    /// `_gradientSums` of the planes from 0, eight at a time, where the octets take planes of n values
    /// (`_octetPlanes`): (Σdy, Σdy (x - centre)) of plane i into sums[i] and dots[i]. Returns the planes done.
    @inlinable @inline(__always)
    static func _planeGradientOctets(_ dy: UnsafePointer<Float>, _ x: UnsafePointer<Float>, planes: Int,
                                     spatial n: Int, centres: UnsafePointer<Double>, sums: UnsafeMutablePointer<Double>,
                                     dots: UnsafeMutablePointer<Double>) -> Int {
        guard _octetPlanes(n) else { return 0 }
        var i = 0
        while i &+ 8 <= planes {
            let at = i &* n
            _planeOctetGradientSums(dy + at, x + at, spatial: n, centres: centres + i, sums: sums + i, dots: dots + i)
            i &+= 8
        }
        return i
    }

    /// `_gradientSums` of eight planes of n values (`_octetPlanes`), exactly as it computes them: each plane's
    /// block (`_gradientBlock`) around its centre rounded to Float and its dy shift s, the block's lane sums
    /// reduced as `_hsum2` reduces them (here by `_hsum8`, eight planes at once), then in Float64 lanes
    /// Σ dy = Σ(dy - s) + n s and Σ(dy - s)(x - centre) = Σ(dy - s)(x - cf) - (centre - cf) Σ(dy - s). A plane
    /// whose Float32 sums are not finite takes `_gradientSumsWide`, as there. Out of line, a copy for each n, as
    /// `_planeOctetMoments`.
    @inlinable @inline(never)
    static func _planeOctetGradientSums(_ dy: UnsafePointer<Float>, _ x: UnsafePointer<Float>, spatial n: Int,
                                        centres: UnsafePointer<Double>, sums: UnsafeMutablePointer<Double>,
                                        dots: UnsafeMutablePointer<Double>) {
        switch n {
        case 16: _planeGradientOctet(dy, x, spatial: 16, centres: centres, sums: sums, dots: dots)
        case 24: _planeGradientOctet(dy, x, spatial: 24, centres: centres, sums: sums, dots: dots)
        default: _planeGradientOctet(dy, x, spatial: 32, centres: centres, sums: sums, dots: dots)
        }
    }

    /// `_planeOctetGradientSums` for one n (a constant where it is inlined).
    @inlinable @inline(__always)
    static func _planeGradientOctet(_ dy: UnsafePointer<Float>, _ x: UnsafePointer<Float>, spatial n: Int,
                                    centres: UnsafePointer<Double>, sums: UnsafeMutablePointer<Double>,
                                    dots: UnsafeMutablePointer<Double>) {
        let full = n & ~7
        // each plane's dy shift (`_earlyMean`), as `_planeGradientSums` takes it
        var shifts = SIMD8<Float>()
        for p in 0..<8 { shifts[p] = _earlyMean(dy + p &* n, count: n) }
        @inline(__always) func block(_ p: Int) -> (SIMD8<Float>, SIMD8<Float>) {
            var i = 0
            let at = p &* n
            return _gradientBlock(dy + at, x + at, &i, end: full, full: full, count: n,
                                  centre: SIMD8(repeating: Float(centres[p])), shift: SIMD8(repeating: shifts[p]))
        }
        let (s0, d0) = block(0), (s1, d1) = block(1), (s2, d2) = block(2), (s3, d3) = block(3)
        let (s4, d4) = block(4), (s5, d5) = block(5), (s6, d6) = block(6), (s7, d7) = block(7)
        let (sLow, sHigh) = unsafeBitCast(_hsum8(s0, s1, s2, s3, s4, s5, s6, s7), to: (SIMD4<Float>, SIMD4<Float>).self)
        let (dLow, dHigh) = unsafeBitCast(_hsum8(d0, d1, d2, d3, d4, d5, d6, d7), to: (SIMD4<Float>, SIMD4<Float>).self)
        // four planes a step: 0 + d, as `_blockTotals` adds a block's sums to zero totals (-0 becomes +0), and
        // 0 - s for the blocks' negated sums, as `_gradientSums` takes them
        let count = SIMD4<Double>(repeating: Double(n))
        @inline(__always) func finish(_ at: Int, _ centre: SIMD4<Double>, _ ss: SIMD4<Float>, _ ds: SIMD4<Float>,
                                      _ shift: SIMD4<Float>) {
            let shifted = SIMD4<Double>() - SIMD4<Double>(ss), d = SIMD4<Double>() + SIMD4<Double>(ds)
            let t = shifted + count * SIMD4<Double>(shift)
            let u = CentreResidue.dot(d, sum: shifted, centre: centre, rounded: SIMD4<Double>(SIMD4<Float>(centre)))
            sums.storeLanes(t, at)
            dots.storeLanes(u, at)
            let finite = t - t .== SIMD4() .& d - d .== SIMD4()  // false for infinity and NaN
            if !all(finite) {
                for l in 0..<4 where !finite[l] {
                    let p = at &+ l
                    (sums[p], dots[p]) = _gradientSumsWide(dy + p &* n, x + p &* n, count: n, centre: centre[l],
                                                           dyShift: Double(shift[l]))
                }
            }
        }
        finish(0, centres.lanes(0), sLow, dLow, shifts.lowHalf)
        finish(4, centres.lanes(4), sHigh, dHigh, shifts.highHalf)
    }

    /// The per-plane constants of `_scaleShift` for the four planes from `at`, in Float64 lanes and rounded as
    /// there: c = Float(centre), s = Float(scale), o = Float(offset - scale (centre - c)).
    @inlinable @inline(__always)
    static func _scaleShiftConstants(_ centres: UnsafePointer<Double>, _ scales: UnsafePointer<Double>,
                                     _ offsets: UnsafePointer<Double>, _ at: Int)
        -> (SIMD4<Float>, SIMD4<Float>, SIMD4<Float>)
    {
        let centre = centres.lanes(at), scale = scales.lanes(at), c = SIMD4<Float>(centre)
        let offset = CentreResidue.offset(offsets.lanes(at), slope: scale, centre: centre, rounded: SIMD4<Double>(c))
        return (c, SIMD4<Float>(scale), SIMD4<Float>(offset))
    }

    /// `_scaleShift` of `planes` planes of n values (`_octetPlanes`: whole vectors), four at a time, with the same
    /// numbers: their constants rounded in Float64 lanes (`_scaleShiftConstants`), then each plane's vectors.
    /// Returns the planes done (a multiple of 4, 0 for other n): it stops at four planes whose constants `MapRange`
    /// refuses, for the caller to map one at a time (with a call here, every call saved registers it did not
    /// use: 15 instructions). y may alias x. Out of line, with a copy for each
    /// n (whose vector loop then unrolls: looping over a plane's two vectors cost as much as their work).
    @inlinable @inline(never)
    static func _scaleShiftQuads(_ x: UnsafePointer<Float>, _ y: UnsafeMutablePointer<Float>, planes: Int,
                                 spatial n: Int, centres: UnsafePointer<Double>, scales: UnsafePointer<Double>,
                                 offsets: UnsafePointer<Double>) -> Int {
        switch n {
        case 16: return _scaleShiftQuads(x, y, planes, 16, centres, scales, offsets)
        case 24: return _scaleShiftQuads(x, y, planes, 24, centres, scales, offsets)
        case 32: return _scaleShiftQuads(x, y, planes, 32, centres, scales, offsets)
        default: return 0
        }
    }

    /// `_scaleShiftQuads` for one n (a constant where it is inlined).
    @inlinable @inline(__always)
    static func _scaleShiftQuads(_ x: UnsafePointer<Float>, _ y: UnsafeMutablePointer<Float>, _ planes: Int,
                                 _ n: Int, _ centres: UnsafePointer<Double>, _ scales: UnsafePointer<Double>,
                                 _ offsets: UnsafePointer<Double>) -> Int {
        var i = 0
        while i &+ 4 <= planes {
            guard MapRange.keeps(c: centres.lanes(i), o: offsets.lanes(i), s1: scales.lanes(i), s2: SIMD4()) else {
                return i  // the caller maps the rest one at a time
            }
            let (c, s, o) = _scaleShiftConstants(centres, scales, offsets, i)
            for l in 0..<4 {
                let at = (i &+ l) &* n, cl = SIMD8(repeating: c[l]), sl = SIMD8(repeating: s[l])
                let ol = SIMD8(repeating: o[l])
                var k = 0
                while k < n { _store8(ol.addingProduct(_load8(x, at &+ k) - cl, sl), y, at &+ k); k &+= 8 }
            }
            i &+= 4
        }
        return i
    }

    /// `_combine` of `planes` planes of n values (`_octetPlanes`), four at a time, with the same numbers: their
    /// constants rounded in Float64 lanes (c = Float(centre), d = Float(dySums / n), Float(p), Float(q),
    /// Float(r - q (centre - c) + p d)), then each plane's vectors. Returns the planes done (a multiple of 4, 0 for
    /// other n), stopping as `_scaleShiftQuads` does. dx may alias dy. Out of line, a copy for each n, as
    /// `_scaleShiftQuads`.
    @inlinable @inline(never)
    static func _combineQuads(_ dy: UnsafePointer<Float>, _ x: UnsafePointer<Float>, _ dx: UnsafeMutablePointer<Float>,
                              planes: Int, spatial n: Int, centres: UnsafePointer<Double>,
                              dySums: UnsafePointer<Double>, p: UnsafePointer<Double>, q: UnsafePointer<Double>,
                              r: UnsafePointer<Double>) -> Int {
        switch n {
        case 16: return _combineQuads(dy, x, dx, planes, 16, centres, dySums, p, q, r)
        case 24: return _combineQuads(dy, x, dx, planes, 24, centres, dySums, p, q, r)
        case 32: return _combineQuads(dy, x, dx, planes, 32, centres, dySums, p, q, r)
        default: return 0
        }
    }

    /// `_combineQuads` for one n (a constant where it is inlined).
    @inlinable @inline(__always)
    static func _combineQuads(_ dy: UnsafePointer<Float>, _ x: UnsafePointer<Float>, _ dx: UnsafeMutablePointer<Float>,
                              _ planes: Int, _ n: Int, _ centres: UnsafePointer<Double>,
                              _ dySums: UnsafePointer<Double>, _ p: UnsafePointer<Double>, _ q: UnsafePointer<Double>,
                              _ r: UnsafePointer<Double>) -> Int {
        var i = 0
        let invN = SIMD4<Double>(repeating: 1 / Double(n))
        while i &+ 4 <= planes {
            let centre = centres.lanes(i), mean = dySums.lanes(i) * invN, pd = p.lanes(i), qd = q.lanes(i)
            guard MapRange.keeps(c: centre, dyCentre: mean, o: r.lanes(i), s1: qd, s2: pd) else {
                return i  // as in `_scaleShiftQuads`
            }
            let c = SIMD4<Float>(centre), d = SIMD4<Float>(mean)
            let rd = CentreResidue.offset(r.lanes(i), slope: qd, centre: centre, rounded: SIMD4<Double>(c))
                + pd * SIMD4<Double>(d)
            let pf = SIMD4<Float>(pd), qf = SIMD4<Float>(qd), rf = SIMD4<Float>(rd)
            for l in 0..<4 {
                let at = (i &+ l) &* n, cl = SIMD8(repeating: c[l]), dl = SIMD8(repeating: d[l])
                let pl = SIMD8(repeating: pf[l]), ql = SIMD8(repeating: qf[l]), rl = SIMD8(repeating: rf[l])
                var k = 0
                while k < n {
                    var v = rl
                    v.addProduct(_load8(x, at &+ k) - cl, ql)
                    v.addProduct(_load8(dy, at &+ k) - dl, pl)
                    _store8(v, dx, at &+ k)
                    k &+= 8
                }
            }
            i &+= 4
        }
        return i
    }
}
