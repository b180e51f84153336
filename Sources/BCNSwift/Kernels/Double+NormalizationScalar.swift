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
            if q.isFinite && ShiftRule.keeps(m2: m2, squares: q) { return Moments(count: m, mean: k + d / m, m2: m2) }
            c = k + d / m
            if !c.isFinite { c = _sum(x, count: n) / m }
        } else {
            c = _sum(x, count: n) / m
        }
        let (d, s) = _centredSums(x, count: n, centre: c)
        return Moments(count: m, mean: c + d / m, m2: max(s - d * d / m, 0))
    }

    @inlinable
    public static func _allEqual(_ x: UnsafePointer<Double>, count n: Int, to value: Double) -> Bool {
        let v = SIMD4<Double>(repeating: value)
        var i = 0
        while i &+ 16 <= n {
            let differ = (_load4(x, i) .!= v) .| (_load4(x, i &+ 4) .!= v) .| (_load4(x, i &+ 8) .!= v)
                .| (_load4(x, i &+ 12) .!= v)
            if any(differ) { return false }
            i &+= 16
        }
        while i < n {
            if x[i] != value { return false }
            i &+= 1
        }
        return true
    }

    @inlinable @inline(__always)
    public static func _shift(_ v: SIMD8<Double>) -> Double {
        let eighth = SIMD4<Double>(repeating: 0.125), m = _hsum(v.lowHalf * eighth + v.highHalf * eighth)
        let e = v - SIMD8(repeating: v[0]), a = e.replacing(with: -e, where: e .< 0)
        let d = _hsum(a.lowHalf * eighth + a.highHalf * eighth)
        return _shift(mean: m, distance: d)
    }

    /// Double maps keep their constants as they are.
    @inlinable @inline(__always)
    public static func _mapKeeps(count: Int, centres: UnsafePointer<Double>, dyCentres: UnsafePointer<Double>?,
                                 offsets: UnsafePointer<Double>, slopes s1: UnsafePointer<Double>,
                                 _ s2: UnsafePointer<Double>?) -> Bool { true }

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

    @inlinable @inline(__always)
    public static func _gradientSums(
        _ dy: UnsafePointer<Double>, _ x: UnsafePointer<Double>, count n: Int, centre: Double, dyShift: Double
    ) -> (sum: Double, dot: Double) {
        let c = SIMD4<Double>(repeating: centre), k = SIMD4<Double>(repeating: dyShift)
        var s0 = SIMD4<Double>(), s1 = SIMD4<Double>(), d0 = SIMD4<Double>(), d1 = SIMD4<Double>()
        var i = 0
        while i + 8 <= n {
            let g0 = _load4(dy, i), g1 = _load4(dy, i + 4)
            s0 += g0; s1 += g1
            d0.addProduct(g0 - k, _load4(x, i) - c); d1.addProduct(g1 - k, _load4(x, i + 4) - c)
            i += 8
        }
        var sum = _hsum(s0 + s1), dot = _hsum(d0 + d1)
        while i < n { sum += dy[i]; dot.addProduct(dy[i] - dyShift, x[i] - centre); i += 1 }
        return (sum, dot)
    }

    @inlinable @inline(__always)
    public static func _combine(
        _ dy: UnsafePointer<Double>, _ x: UnsafePointer<Double>, _ dx: UnsafeMutablePointer<Double>, count n: Int,
        centre: Double, dyMean: Double, p: Double, q: Double, r: Double
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
    public static func _mapColumns(
        _ x: UnsafePointer<Double>, _ y: UnsafeMutablePointer<Double>, rows: Int, columns n: Int, stride: Int,
        centre: UnsafePointer<Double>, scale: UnsafePointer<Double>, offset: UnsafePointer<Double>
    ) {
        var c = 0
        while c + 4 <= n {
            let k = _load4(centre, c), s = _load4(scale, c), o = _load4(offset, c)
            for row in 0..<rows {
                let at = row * stride + c
                var v = o
                v.addProduct(_load4(x, at) - k, s)
                UnsafeMutableRawPointer(y + at).storeBytes(of: v, as: SIMD4<Double>.self)
            }
            c += 4
        }
        while c < n {
            for row in 0..<rows {
                let at = row * stride + c
                y[at] = offset[c].addingProduct(x[at] - centre[c], scale[c])
            }
            c += 1
        }
    }

    @inlinable
    public static func _combineColumns(
        _ dy: UnsafePointer<Double>, _ x: UnsafePointer<Double>, _ dx: UnsafeMutablePointer<Double>, rows: Int,
        columns n: Int, stride: Int, centre: UnsafePointer<Double>, dyCentre: UnsafePointer<Double>,
        p: UnsafePointer<Double>, q: UnsafePointer<Double>, r: UnsafePointer<Double>
    ) {
        var dyRow = dy, xRow = x, dxRow = dx
        for _ in 0..<rows {  // row by row, as Float's
            var c = 0
            while c &+ 4 <= n {
                var v = _load4(r, c)
                v.addProduct(_load4(xRow, c) - _load4(centre, c), _load4(q, c))
                v.addProduct(_load4(dyRow, c) - _load4(dyCentre, c), _load4(p, c))
                UnsafeMutableRawPointer(dxRow + c).storeBytes(of: v, as: SIMD4<Double>.self)
                c &+= 4
            }
            while c < n {
                dxRow[c] = r[c].addingProduct(xRow[c] - centre[c], q[c]).addingProduct(dyRow[c] - dyCentre[c], p[c])
                c &+= 1
            }
            dyRow += stride; xRow += stride; dxRow += stride
        }
    }

    /// out[0..<4] += v.
    @inlinable @inline(__always)
    static func _add(_ v: SIMD4<Double>, to out: UnsafeMutablePointer<Double>) {
        let raw = UnsafeMutableRawPointer(out)
        raw.storeBytes(of: raw.loadUnaligned(as: SIMD4<Double>.self) + v, as: SIMD4<Double>.self)
    }

    /// Blocks of 8 rows outermost, 16 columns (four lanes of 4) at a time, as `Float._columnSums` and for the
    /// same reason; with `partials`, each block's rows in order, as there.
    @inlinable
    public static func _columnSums(
        _ x: UnsafePointer<Double>, rows: Int, columns n: Int, stride: Int, centre: UnsafePointer<Double>?,
        sums: UnsafeMutablePointer<Double>, squares: UnsafeMutablePointer<Double>?,
        partials: UnsafeMutablePointer<Double>?
    ) {
        let wide = n & ~3
        var r0 = 0
        while r0 < rows {
            let end = Swift.min(rows, r0 + 8)
            if let partials {
                let s = partials, q = partials + wide
                for r in r0..<end {
                    let row = x + r &* stride, first = r == r0  // the first row starts the sums, from +0
                    var c = 0
                    while c < wide {
                        let d = _load4(row, c) - (centre.map { _load4($0, c) } ?? SIMD4())
                        let (s0, q0) = first ? (SIMD4(), SIMD4()) : (_load4(s, c), _load4(q, c))
                        _store4Narrow(s0 + d, s, c); _store4Narrow(q0.addingProduct(d, d), q, c)
                        c &+= 4
                    }
                }
                var c = 0
                while c < wide {
                    _add(_load4(s, c), to: sums + c)
                    if let squares { _add(_load4(q, c), to: squares + c) }
                    c &+= 4
                }
                r0 = end
                continue
            }
            var c = 0
            while c + 16 <= wide {
                let k0 = centre.map { _load4($0, c) } ?? SIMD4<Double>(), k1 = centre.map { _load4($0, c + 4) } ?? k0
                let k2 = centre.map { _load4($0, c + 8) } ?? k0, k3 = centre.map { _load4($0, c + 12) } ?? k0
                var s0 = SIMD4<Double>(), s1 = s0, s2 = s0, s3 = s0, q0 = s0, q1 = s0, q2 = s0, q3 = s0
                for r in r0..<end {
                    let row = x + r * stride + c
                    let d0 = _load4(row, 0) - k0, d1 = _load4(row, 4) - k1, d2 = _load4(row, 8) - k2
                    let d3 = _load4(row, 12) - k3
                    s0 += d0; s1 += d1; s2 += d2; s3 += d3
                    q0.addProduct(d0, d0); q1.addProduct(d1, d1); q2.addProduct(d2, d2); q3.addProduct(d3, d3)
                }
                _add(s0, to: sums + c); _add(s1, to: sums + c + 4); _add(s2, to: sums + c + 8)
                _add(s3, to: sums + c + 12)
                if let squares {
                    _add(q0, to: squares + c); _add(q1, to: squares + c + 4); _add(q2, to: squares + c + 8)
                    _add(q3, to: squares + c + 12)
                }
                c += 16
            }
            while c < wide {
                let k = centre.map { _load4($0, c) } ?? SIMD4<Double>()
                var s = SIMD4<Double>(), q = SIMD4<Double>()
                for r in r0..<end { let d = _load4(x + r * stride, c) - k; s += d; q.addProduct(d, d) }
                _add(s, to: sums + c)
                if let squares { _add(q, to: squares + c) }
                c += 4
            }
            r0 = end
        }
        for c in wide..<n {
            let k = centre?[c] ?? 0
            var s = 0.0, q = 0.0
            for r in 0..<rows { let d = x[r * stride + c] - k; s += d; q.addProduct(d, d) }
            sums[c] += s
            squares?[c] += q
        }
    }

    /// As `_columnSums`: blocks of 8 rows outermost, 16 columns at a time, or with `partials` each block's rows
    /// in order.
    @inlinable
    public static func _columnGradientSums(
        _ dy: UnsafePointer<Double>, _ x: UnsafePointer<Double>, rows: Int, columns n: Int, stride: Int,
        centre: UnsafePointer<Double>, dyShift: UnsafePointer<Double>, sums: UnsafeMutablePointer<Double>,
        dots: UnsafeMutablePointer<Double>, partials: UnsafeMutablePointer<Double>?
    ) {
        let wide = n & ~3
        var r0 = 0
        while r0 < rows {
            let end = Swift.min(rows, r0 + 8)
            if let partials {
                let s = partials, p = partials + wide
                for r in r0..<end {
                    let at = r &* stride, g = dy + at, v = x + at, first = r == r0  // as in `_columnSums`
                    var c = 0
                    while c < wide {
                        let ec = _load4(g, c) - _load4(dyShift, c)
                        let (s0, p0) = first ? (SIMD4(), SIMD4()) : (_load4(s, c), _load4(p, c))
                        _store4Narrow(s0 + ec, s, c)
                        _store4Narrow(p0.addingProduct(ec, _load4(v, c) - _load4(centre, c)), p, c)
                        c &+= 4
                    }
                }
                var c = 0
                while c < wide { _add(_load4(s, c), to: sums + c); _add(_load4(p, c), to: dots + c); c &+= 4 }
                r0 = end
                continue
            }
            var c = 0
            while c + 16 <= wide {
                let k0 = _load4(centre, c), k1 = _load4(centre, c + 4), k2 = _load4(centre, c + 8)
                let k3 = _load4(centre, c + 12)
                let h0 = _load4(dyShift, c), h1 = _load4(dyShift, c + 4), h2 = _load4(dyShift, c + 8)
                let h3 = _load4(dyShift, c + 12)
                var s0 = SIMD4<Double>(), s1 = s0, s2 = s0, s3 = s0, p0 = s0, p1 = s0, p2 = s0, p3 = s0
                for r in r0..<end {
                    let g = dy + r * stride + c, v = x + r * stride + c
                    let e0 = _load4(g, 0) - h0, e1 = _load4(g, 4) - h1, e2 = _load4(g, 8) - h2
                    let e3 = _load4(g, 12) - h3
                    s0 += e0; s1 += e1; s2 += e2; s3 += e3
                    p0.addProduct(e0, _load4(v, 0) - k0); p1.addProduct(e1, _load4(v, 4) - k1)
                    p2.addProduct(e2, _load4(v, 8) - k2); p3.addProduct(e3, _load4(v, 12) - k3)
                }
                _add(s0, to: sums + c); _add(s1, to: sums + c + 4); _add(s2, to: sums + c + 8)
                _add(s3, to: sums + c + 12)
                _add(p0, to: dots + c); _add(p1, to: dots + c + 4); _add(p2, to: dots + c + 8)
                _add(p3, to: dots + c + 12)
                c += 16
            }
            while c < wide {
                let k = _load4(centre, c), h = _load4(dyShift, c)
                var s = SIMD4<Double>(), d = SIMD4<Double>()
                for r in r0..<end {
                    let e = _load4(dy + r * stride, c) - h
                    s += e; d.addProduct(e, _load4(x + r * stride, c) - k)
                }
                _add(s, to: sums + c); _add(d, to: dots + c)
                c += 4
            }
            r0 = end
        }
        for c in wide..<n {
            var s = 0.0, d = 0.0
            for r in 0..<rows {
                let e = dy[r * stride + c] - dyShift[c]
                s += e; d.addProduct(e, x[r * stride + c] - centre[c])
            }
            sums[c] += s; dots[c] += d
        }
    }
}
