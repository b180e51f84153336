// Float kernels: 8 lanes of Float per load, widened to two SIMD4<Double> accumulators so that a plane of tens of
// millions of values keeps full Float64 accuracy in its sums. Four independent accumulators hide FMA latency.

extension Float: NormalizationScalar {
    @inlinable @inline(__always)
    static func _load8(_ p: UnsafePointer<Float>, _ i: Int) -> SIMD8<Float> {
        UnsafeRawPointer(p + i).loadUnaligned(as: SIMD8<Float>.self)
    }

    @inlinable @inline(__always)
    static func _widen(_ v: SIMD8<Float>) -> (SIMD4<Double>, SIMD4<Double>) {
        (SIMD4<Double>(v.lowHalf), SIMD4<Double>(v.highHalf))
    }

    @inlinable
    public static func _sum(_ x: UnsafePointer<Float>, count n: Int) -> Double {
        var a0 = SIMD4<Double>(), a1 = SIMD4<Double>(), a2 = SIMD4<Double>(), a3 = SIMD4<Double>()
        var i = 0
        while i + 16 <= n {
            let (l0, h0) = _widen(_load8(x, i)), (l1, h1) = _widen(_load8(x, i + 8))
            a0 += l0; a1 += h0; a2 += l1; a3 += h1
            i += 16
        }
        var s = ((a0 + a1) + (a2 + a3)).sum()
        while i < n { s += Double(x[i]); i += 1 }
        return s
    }

    @inlinable
    public static func _centredSums(_ x: UnsafePointer<Float>, count n: Int, centre: Double)
        -> (sum: Double, squares: Double)
    {
        let c = SIMD4<Double>(repeating: centre)
        var s0 = SIMD4<Double>(), s1 = SIMD4<Double>()
        var a0 = SIMD4<Double>(), a1 = SIMD4<Double>(), a2 = SIMD4<Double>(), a3 = SIMD4<Double>()
        var i = 0
        while i + 16 <= n {
            let (l0, h0) = _widen(_load8(x, i)), (l1, h1) = _widen(_load8(x, i + 8))
            let d0 = l0 - c, d1 = h0 - c, d2 = l1 - c, d3 = h1 - c
            s0 += d0 + d1; s1 += d2 + d3
            a0.addProduct(d0, d0); a1.addProduct(d1, d1); a2.addProduct(d2, d2); a3.addProduct(d3, d3)
            i += 16
        }
        var sum = (s0 + s1).sum(), squares = ((a0 + a1) + (a2 + a3)).sum()
        while i < n { let d = Double(x[i]) - centre; sum += d; squares.addProduct(d, d); i += 1 }
        return (sum, squares)
    }

    @inlinable
    public static func _scaleShift(
        _ x: UnsafePointer<Float>, _ y: UnsafeMutablePointer<Float>, count n: Int,
        centre: Double, scale: Double, offset: Double
    ) {
        // x - cf is exact near the centre; the residue centre - cf, which Float cannot hold, goes into the offset
        // (in Float64), so a mean of 100 with spread 0.01 loses nothing to rounding the centre.
        let cf = Float(centre), sf = Float(scale), of = Float(offset - scale * (centre - Double(cf)))
        let c = SIMD8<Float>(repeating: cf), s = SIMD8<Float>(repeating: sf), o = SIMD8<Float>(repeating: of)
        var i = 0
        while i + 8 <= n {
            var v = o
            v.addProduct(_load8(x, i) - c, s)
            UnsafeMutableRawPointer(y + i).storeBytes(of: v, as: SIMD8<Float>.self)
            i += 8
        }
        while i < n { y[i] = of.addingProduct(x[i] - cf, sf); i += 1 }
    }

    @inlinable
    public static func _gradientSums(
        _ dy: UnsafePointer<Float>, _ x: UnsafePointer<Float>, count n: Int, centre: Double
    ) -> (sum: Double, dot: Double) {
        let c = SIMD4<Double>(repeating: centre)
        var s0 = SIMD4<Double>(), s1 = SIMD4<Double>(), d0 = SIMD4<Double>(), d1 = SIMD4<Double>()
        var i = 0
        while i + 8 <= n {
            let (gl, gh) = _widen(_load8(dy, i)), (xl, xh) = _widen(_load8(x, i))
            s0 += gl; s1 += gh
            d0.addProduct(gl, xl - c); d1.addProduct(gh, xh - c)
            i += 8
        }
        var sum = (s0 + s1).sum(), dot = (d0 + d1).sum()
        while i < n { let g = Double(dy[i]); sum += g; dot.addProduct(g, Double(x[i]) - centre); i += 1 }
        return (sum, dot)
    }

    @inlinable
    public static func _combine(
        _ dy: UnsafePointer<Float>, _ x: UnsafePointer<Float>, _ dx: UnsafeMutablePointer<Float>, count n: Int,
        centre: Double, p: Double, q: Double, r: Double
    ) {
        let cf = Float(centre), pf = Float(p), qf = Float(q), rf = Float(r - q * (centre - Double(cf)))
        let c = SIMD8<Float>(repeating: cf), pv = SIMD8<Float>(repeating: pf)
        let qv = SIMD8<Float>(repeating: qf), rv = SIMD8<Float>(repeating: rf)
        var i = 0
        while i + 8 <= n {
            var v = rv
            v.addProduct(_load8(x, i) - c, qv)
            v.addProduct(_load8(dy, i), pv)
            UnsafeMutableRawPointer(dx + i).storeBytes(of: v, as: SIMD8<Float>.self)
            i += 8
        }
        while i < n { dx[i] = rf.addingProduct(x[i] - cf, qf).addingProduct(dy[i], pf); i += 1 }
    }
}
