// Double kernels: SIMD4<Double> loads, four independent accumulators to hide FMA latency. Tails use the same
// fused operations as the vector body, so an element's result does not depend on where it sits in the plane.

extension Double: NormalizationScalar {
    /// Σ of the lanes by halving; `SIMD.sum()` reduces lane by lane.
    @inlinable @inline(__always)
    static func _hsum(_ v: SIMD4<Double>) -> Double {
        let (lo, hi) = unsafeBitCast(v, to: (SIMD2<Double>, SIMD2<Double>).self)  // see Float._hsum
        let a = lo + hi
        return a[0] + a[1]
    }

    @inlinable @inline(__always)
    static func _load4(_ p: UnsafePointer<Double>, _ i: Int) -> SIMD4<Double> {
        UnsafeRawPointer(p + i).loadUnaligned(as: SIMD4<Double>.self)
    }

    @inlinable @inline(__always)
    public static func _load4Wide(_ p: UnsafePointer<Double>, _ i: Int) -> SIMD4<Double> { _load4(p, i) }

    @inlinable @inline(__always)
    public static func _store4Narrow(_ v: SIMD4<Double>, _ p: UnsafeMutablePointer<Double>, _ i: Int) {
        UnsafeMutableRawPointer(p + i).storeBytes(of: v, as: SIMD4<Double>.self)
    }

    /// One pass shifted by the mean of the first four values, kept when the cancellation (Σd)²/n is at most
    /// half of Σd² (see `Float._chunkMoments`); otherwise, or for non-finite sums, the corrected two-pass
    /// algorithm around the mean found (or around Σx/n).
    @inlinable
    public static func _chunkMoments(_ x: UnsafePointer<Double>, count n: Int) -> Moments {
        if n == 0 { return Moments() }
        let m = Double(n)
        var c: Double
        if n >= 8, case let k = _hsum(_load4(x, 0)) * 0.25, k.isFinite {
            let (d, q) = _centredSums(x, count: n, centre: k)
            let m2 = q - d * d / m
            if q.isFinite && m2 >= 0.5 * q { return Moments(count: m, mean: k + d / m, m2: m2) }
            c = k + d / m
            if !c.isFinite { c = _sum(x, count: n) / m }
        } else {
            c = _sum(x, count: n) / m
        }
        let (d, s) = _centredSums(x, count: n, centre: c)
        return Moments(count: m, mean: c + d / m, m2: max(s - d * d / m, 0))
    }

    @inlinable
    static func _sum(_ x: UnsafePointer<Double>, count n: Int) -> Double {
        var a0 = SIMD4<Double>(), a1 = SIMD4<Double>(), a2 = SIMD4<Double>(), a3 = SIMD4<Double>()
        var i = 0
        while i + 16 <= n {
            a0 += _load4(x, i); a1 += _load4(x, i + 4); a2 += _load4(x, i + 8); a3 += _load4(x, i + 12)
            i += 16
        }
        var s = _hsum((a0 + a1) + (a2 + a3))
        while i < n { s += x[i]; i += 1 }
        return s
    }

    @inlinable
    static func _centredSums(_ x: UnsafePointer<Double>, count n: Int, centre: Double)
        -> (sum: Double, squares: Double)
    {
        let c = SIMD4<Double>(repeating: centre)
        var s0 = SIMD4<Double>(), s1 = SIMD4<Double>(), a0 = SIMD4<Double>(), a1 = SIMD4<Double>()
        var i = 0
        while i + 8 <= n {
            let d0 = _load4(x, i) - c, d1 = _load4(x, i + 4) - c
            s0 += d0; s1 += d1
            a0.addProduct(d0, d0); a1.addProduct(d1, d1)
            i += 8
        }
        var sum = _hsum(s0 + s1), squares = _hsum(a0 + a1)
        while i < n { let d = x[i] - centre; sum += d; squares.addProduct(d, d); i += 1 }
        return (sum, squares)
    }

    @inlinable
    public static func _scaleShift(
        _ x: UnsafePointer<Double>, _ y: UnsafeMutablePointer<Double>, count n: Int,
        centre: Double, scale: Double, offset: Double
    ) {
        let c = SIMD4<Double>(repeating: centre), s = SIMD4<Double>(repeating: scale)
        let o = SIMD4<Double>(repeating: offset)
        var i = 0
        while i + 4 <= n {
            var v = o
            v.addProduct(_load4(x, i) - c, s)
            UnsafeMutableRawPointer(y + i).storeBytes(of: v, as: SIMD4<Double>.self)
            i += 4
        }
        while i < n { y[i] = offset.addingProduct(x[i] - centre, scale); i += 1 }
    }

    @inlinable
    public static func _gradientSums(
        _ dy: UnsafePointer<Double>, _ x: UnsafePointer<Double>, count n: Int, centre: Double
    ) -> (sum: Double, dot: Double) {
        let c = SIMD4<Double>(repeating: centre)
        var s0 = SIMD4<Double>(), s1 = SIMD4<Double>(), d0 = SIMD4<Double>(), d1 = SIMD4<Double>()
        var i = 0
        while i + 8 <= n {
            let g0 = _load4(dy, i), g1 = _load4(dy, i + 4)
            s0 += g0; s1 += g1
            d0.addProduct(g0, _load4(x, i) - c); d1.addProduct(g1, _load4(x, i + 4) - c)
            i += 8
        }
        var sum = _hsum(s0 + s1), dot = _hsum(d0 + d1)
        while i < n { sum += dy[i]; dot.addProduct(dy[i], x[i] - centre); i += 1 }
        return (sum, dot)
    }

    @inlinable
    public static func _combine(
        _ dy: UnsafePointer<Double>, _ x: UnsafePointer<Double>, _ dx: UnsafeMutablePointer<Double>, count n: Int,
        centre: Double, p: Double, q: Double, r: Double
    ) {
        let c = SIMD4<Double>(repeating: centre), pv = SIMD4<Double>(repeating: p)
        let qv = SIMD4<Double>(repeating: q), rv = SIMD4<Double>(repeating: r)
        var i = 0
        while i + 4 <= n {
            var v = rv
            v.addProduct(_load4(x, i) - c, qv)
            v.addProduct(_load4(dy, i), pv)
            UnsafeMutableRawPointer(dx + i).storeBytes(of: v, as: SIMD4<Double>.self)
            i += 4
        }
        while i < n { dx[i] = r.addingProduct(x[i] - centre, q).addingProduct(dy[i], p); i += 1 }
    }

    @inlinable
    public static func _mapElements(
        _ x: UnsafePointer<Double>, _ y: UnsafeMutablePointer<Double>, count n: Int,
        centre: UnsafePointer<Double>, scale: UnsafePointer<Double>, offset: UnsafePointer<Double>
    ) {
        var i = 0
        while i + 4 <= n {
            var v = _load4(offset, i)
            v.addProduct(_load4(x, i) - _load4(centre, i), _load4(scale, i))
            UnsafeMutableRawPointer(y + i).storeBytes(of: v, as: SIMD4<Double>.self)
            i += 4
        }
        while i < n { y[i] = offset[i].addingProduct(x[i] - centre[i], scale[i]); i += 1 }
    }

    @inlinable
    public static func _combineElements(
        _ dy: UnsafePointer<Double>, _ x: UnsafePointer<Double>, _ dx: UnsafeMutablePointer<Double>, count n: Int,
        centre: UnsafePointer<Double>, p: UnsafePointer<Double>, q: UnsafePointer<Double>, r: UnsafePointer<Double>
    ) {
        var i = 0
        while i + 4 <= n {
            var v = _load4(r, i)
            v.addProduct(_load4(x, i) - _load4(centre, i), _load4(q, i))
            v.addProduct(_load4(dy, i), _load4(p, i))
            UnsafeMutableRawPointer(dx + i).storeBytes(of: v, as: SIMD4<Double>.self)
            i += 4
        }
        while i < n { dx[i] = r[i].addingProduct(x[i] - centre[i], q[i]).addingProduct(dy[i], p[i]); i += 1 }
    }
}
