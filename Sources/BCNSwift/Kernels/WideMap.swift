/// The Float64 maps that the Float32 lanes stand for, each value rounded once to T by fused multiply-adds:
/// y = o + s (x - c) and dx = r + q (x - c) + p dy. Planes too short for Float32 lanes take them (the rows
/// layout's short planes, Float planes of fewer than 8 values), and so does any map whose constants Float cannot
/// hold (`MapRange`), in every layout: one place for the arithmetic, so that each path gives a value its bits.
@usableFromInline
enum WideMap {
    /// o + s (x - c), rounded once to T.
    @inlinable @inline(__always)
    static func value<T: NormalizationScalar>(_ x: T, centre c: Double, scale s: Double, offset o: Double) -> T {
        T(o.addingProduct(Double(x) - c, s))
    }

    /// r + q (x - c) + p dy, rounded once to T.
    @inlinable @inline(__always)
    static func gradient<T: NormalizationScalar>(_ dy: T, _ x: T, centre c: Double, p: Double, q: Double,
                                                 r: Double) -> T {
        T(r.addingProduct(Double(x) - c, q).addingProduct(Double(dy), p))
    }

    /// `value` on the plane of values at..<at+S, four values a step, with the same operations on each value. (A
    /// `for` over the plane's range cost 56 instructions a plane of four: range and overflow checks, and a vector
    /// loop's prologue.) A plane whose length is not a multiple of 4 ends with one vector over its last four
    /// values, overlapping the step before: it is computed before the steps (y may alias x) and stored after
    /// them, so the values it shares are written twice with the same bits. (One value at a time, the last value
    /// of a 3x3 plane cost about 15 instructions, as much as a step.) Planes of fewer than 4 values run one value
    /// at a time. Offsets wrap unchecked: the plane lies inside the tensor.
    @inlinable @inline(__always)
    static func values<T: NormalizationScalar>(_ x: UnsafePointer<T>, _ y: UnsafeMutablePointer<T>, at: Int,
                                               count S: Int, centre: Double, scale: Double, offset: Double) {
        var i = at
        let end = at &+ S
        if S >= 4 {
            let c = SIMD4(repeating: centre), s = SIMD4(repeating: scale), o = SIMD4(repeating: offset)
            let ragged = S & 3 != 0, last = end &- 4
            let tail = ragged ? o.addingProduct(T._load4Wide(x, last) - c, s) : o
            while i &+ 4 <= end { T._store4Narrow(o.addingProduct(T._load4Wide(x, i) - c, s), y, i); i &+= 4 }
            if ragged { T._store4Narrow(tail, y, last) }
            return
        }
        while i < end { y[i] = value(x[i], centre: centre, scale: scale, offset: offset); i &+= 1 }
    }

    /// `gradient` on the plane of values at..<at+S, as `values` (the overlapping last vector as there, since dx
    /// may alias dy).
    @inlinable @inline(__always)
    static func gradients<T: NormalizationScalar>(_ dy: UnsafePointer<T>, _ x: UnsafePointer<T>,
                                                  _ dx: UnsafeMutablePointer<T>, at: Int, count S: Int,
                                                  centre: Double, p: Double, q: Double, r: Double) {
        var i = at
        let end = at &+ S
        if S >= 4 {
            let c = SIMD4(repeating: centre), pv = SIMD4(repeating: p), qv = SIMD4(repeating: q)
            let rv = SIMD4(repeating: r)
            @inline(__always) func lanes(_ i: Int) -> SIMD4<Double> {
                rv.addingProduct(T._load4Wide(x, i) - c, qv).addingProduct(T._load4Wide(dy, i), pv)
            }
            let ragged = S & 3 != 0, last = end &- 4, tail = ragged ? lanes(last) : rv
            while i &+ 4 <= end { T._store4Narrow(lanes(i), dx, i); i &+= 4 }
            if ragged { T._store4Narrow(tail, dx, last) }
            return
        }
        while i < end { dx[i] = gradient(dy[i], x[i], centre: centre, p: p, q: q, r: r); i &+= 1 }
    }
}
