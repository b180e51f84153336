// Float kernels. Reductions run in Float32 blocks (256 elements over four 8-lane accumulators, or 128 over two),
// so each lane sums at most 8 terms of a full block (10 in a block that ends a plane: its last vectors and tail)
// and a block's rounding stays below ~10 ulps of its terms; blocks flush to Float64. Inner loops have no
// conversion, which is what keeps the passes at memory speed. Exactness comes from the algorithms around them (a
// corrected second pass, centring, power-of-two scaling), not from wide accumulators.

extension Float: NormalizationScalar {
    @inlinable @inline(__always)
    static func _load8(_ p: UnsafePointer<Float>, _ i: Int) -> SIMD8<Float> {
        UnsafeRawPointer(p + i).loadUnaligned(as: SIMD8<Float>.self)
    }

    @inlinable @inline(__always)
    static func _store8(_ v: SIMD8<Float>, _ p: UnsafeMutablePointer<Float>, _ i: Int) {
        UnsafeMutableRawPointer(p + i).storeBytes(of: v, as: SIMD8<Float>.self)
    }

    @inlinable @inline(__always)
    public static func _load4Wide(_ p: UnsafePointer<Float>, _ i: Int) -> SIMD4<Double> {
        SIMD4<Double>(UnsafeRawPointer(p + i).loadUnaligned(as: SIMD4<Float>.self))
    }

    @inlinable @inline(__always)
    public static func _store4Narrow(_ v: SIMD4<Double>, _ p: UnsafeMutablePointer<Float>, _ i: Int) {
        UnsafeMutableRawPointer(p + i).storeBytes(of: SIMD4<Float>(v), as: SIMD4<Float>.self)
    }

    /// Σ of the lanes by halving. `SIMD.sum()` reduces lane by lane, and `lowHalf`/`highHalf` are built lane
    /// by lane, both of which LLVM compiles to dozens of lane inserts; reinterpreting the storage as two halves
    /// compiles to one extract and an add per level.
    @inlinable @inline(__always)
    static func _hsum(_ v: SIMD8<Float>) -> Float {
        let (lo, hi) = unsafeBitCast(v, to: (SIMD4<Float>, SIMD4<Float>).self)
        let (a, b) = unsafeBitCast(lo + hi, to: (SIMD2<Float>, SIMD2<Float>).self)
        let c = a + b
        return c[0] + c[1]
    }

    /// Adds the lane sums of two block accumulators to two Float64 totals. Kept out of line: inlined into a
    /// loop nest, LLVM's SLP vectorizer fuses the two reductions with the accumulators into ~80 lane shuffles.
    @inline(never) @usableFromInline
    static func _flush(_ a: SIMD8<Float>, _ b: SIMD8<Float>, into ta: inout Double, _ tb: inout Double) {
        ta += Double(_hsum(a))
        tb += Double(_hsum(b))
    }

    /// (Σa, Σb) over the lanes, each summed exactly as `_hsum` sums it, both in the same vector operations: inline,
    /// unlike `_flush`, without handing LLVM's SLP vectorizer scalar lanes to regroup.
    @inlinable @inline(__always)
    static func _hsum2(_ a: SIMD8<Float>, _ b: SIMD8<Float>) -> (Float, Float) {
        let t = SIMD8<Float>(lowHalf: a.lowHalf, highHalf: b.lowHalf)
            + SIMD8<Float>(lowHalf: a.highHalf, highHalf: b.highHalf)  // (a.lo + a.hi, b.lo + b.hi)
        let pairs = unsafeBitCast(t, to: SIMD4<UInt64>.self)  // (t0 t1), (t2 t3), (t4 t5), (t6 t7)
        let c = unsafeBitCast(pairs.evenHalf, to: SIMD4<Float>.self)
            + unsafeBitCast(pairs.oddHalf, to: SIMD4<Float>.self)  // (t0 + t2, t1 + t3, t4 + t6, t5 + t7)
        let d = c.evenHalf + c.oddHalf  // (c0 + c1, c2 + c3)
        return (d[0], d[1])
    }

    /// (Σa, Σb, Σc, Σd) over the lanes, each summed exactly as `_hsum` sums it, all four in the same vector
    /// operations (`_hsum2`'s, one level wider).
    @inlinable @inline(__always)
    static func _hsum4(_ a: SIMD8<Float>, _ b: SIMD8<Float>, _ c: SIMD8<Float>, _ d: SIMD8<Float>) -> SIMD4<Float> {
        let x = SIMD8<Float>(lowHalf: a.lowHalf, highHalf: b.lowHalf)
            + SIMD8<Float>(lowHalf: a.highHalf, highHalf: b.highHalf)  // (a.lo + a.hi, b.lo + b.hi)
        let y = SIMD8<Float>(lowHalf: c.lowHalf, highHalf: d.lowHalf)
            + SIMD8<Float>(lowHalf: c.highHalf, highHalf: d.highHalf)
        let xp = unsafeBitCast(x, to: SIMD4<UInt64>.self), yp = unsafeBitCast(y, to: SIMD4<UInt64>.self)
        let u = unsafeBitCast(SIMD4<UInt64>(xp[0], xp[2], yp[0], yp[2]), to: SIMD8<Float>.self)  // (a0 a1 b0 b1 ...)
        let v = unsafeBitCast(SIMD4<UInt64>(xp[1], xp[3], yp[1], yp[3]), to: SIMD8<Float>.self)  // (a2 a3 b2 b3 ...)
        let s = u + v
        return s.evenHalf + s.oddHalf
    }

    /// 2^k ≈ 1/√v for a finite v > 0 (half of v's binary exponent, so no square root), within Float's normal
    /// range; 1 otherwise.
    @inlinable
    static func _inverseRootScale(_ v: Double) -> Float {
        guard v >= Double.leastNormalMagnitude, v.isFinite else { return 1 }
        let exponent = Int((v.bitPattern >> 52) & 0x7ff) - 1023
        let k = Swift.min(Swift.max(-(exponent >> 1), -126), 126)
        return Float(bitPattern: UInt32(127 + k) << 23)
    }

    /// Lanes 0..<8-(n mod 8) of the last eight elements x[n-8..<n]: the ones the vector loop already visited.
    /// A tail handled as one overlapping vector masks these lanes out of its sums (needs n ≥ 8).
    @inlinable @inline(__always)
    static func _visitedLanes(_ n: Int) -> SIMDMask<SIMD8<Int32>> {
        SIMD8<Int32>(0, 1, 2, 3, 4, 5, 6, 7) .< SIMD8<Int32>(repeating: Int32(truncatingIfNeeded: 8 - (n & 7)))
    }

    /// The moments of a chunk: usually one pass, shifted by the mean of its first eight values; two passes over
    /// data in cache when that shift turns out to be far from the mean. No conversion in any inner loop.
    ///
    /// One pass: d = x - k with k = Float(mean of x[0..<8]), Σd and Σd² in Float32 blocks flushed to Float64;
    /// mean = k + Σd/n, M2 = Σd² - (Σd)²/n. The cancellation in M2 is (Σd)²/n = n (mean - k)², so the result
    /// is kept only when that is at most half of Σd² (k within one standard deviation of the mean): then M2
    /// carries at most twice the relative rounding of Σd², the same order as a centred pass. Otherwise the mean
    /// just found is the centre of a corrected second pass (below). Σd²/n must also sit in Float32's
    /// comfortable range (1e-30 to 1e36), else the chunk takes the two-pass path from scratch.
    ///
    /// Corrected pass: deviations from cf = Float(c), scaled by s = 2^k ≈ 1/rms (exactly) so that their squares
    /// neither overflow nor underflow in Float32 (|x - c|·s ≤ 2√n·rms·s ≤ 256 in a chunk), computed as
    /// x·s - cf·s by one FMA, summed in Float32 blocks; then mean = cf + Σ(x-cf)/n and
    /// M2 = Σ(x-cf)² - (Σ(x-cf))²/n: the corrected two-pass algorithm of Chan, Golub & LeVeque, which repairs
    /// the error in c, and gives a constant chunk its exact value and M2 = 0.
    /// Chunks whose Σx² leaves Float32's comfortable range (|x| beyond ~1e18 or all below ~1e-15) take the
    /// Float64 path instead.
    @inlinable
    public static func _chunkMoments(_ x: UnsafePointer<Float>, count n: Int) -> Moments {
        if n == 0 { return Moments() }
        if n >= _shiftedMinimum {
            let k = _hsum(_load8(x, 0)) * 0.125  // the mean of the first eight values
            if k.isFinite {
                let (d, q) = _scaledDeviationSums(x, count: n, centre: k, scale: 1)
                if let moments = _shiftedMoments(x, count: n, shift: k, sum: d, squares: q) { return moments }
            }
        }
        return _unshiftedMoments(x, count: n)
    }

    /// The moments from the one pass's Σd and Σd² (d = x - k): kept, or corrected by a second pass (see
    /// `_chunkMoments`); nil when Σd²/n leaves Float32's comfortable range (or is NaN).
    @inlinable @inline(__always)
    static func _shiftedMoments(_ x: UnsafePointer<Float>, count n: Int, shift k: Float, sum d: Double,
                                squares q: Double) -> Moments? {
        let m = Double(n), invM = 1 / m
        let meanSquare = q * invM
        guard meanSquare > 1e-30, meanSquare < 1e36 else { return nil }  // false for NaN too
        let m2 = q - d * d * invM, mean = Double(k) + d * invM
        if ShiftRule.keeps(m2: m2, squares: q) { return Moments(count: m, mean: mean, m2: m2) }
        return _correctedMoments(x, count: n, centre: mean, meanSquare: meanSquare)
    }

    /// `_chunkMoments` of `planes` consecutive planes of `spatial` values, into mean[i] and m2[i]: the same
    /// numbers, eight planes a step for planes of 16, 24 or 32 values (`_planeOctets`), then two planes a step
    /// when a plane's one pass is one block (16 to 263 values). The pair's shifts come
    /// from one reduction and their four lane sums from another, each lane summed as `_hsum` sums it; when a
    /// shift is not finite both planes take `_chunkMoments`, and a plane whose one-pass sums leave Float32's
    /// comfortable range takes `_unshiftedMoments`, as `_chunkMoments` would. (A plane of 196 values spent about
    /// half of its ~230 instructions around the loop: shift, reduction, checks.)
    @inlinable
    public static func _planeMoments(_ x: UnsafePointer<Float>, planes: Int, spatial n: Int,
                                     mean: UnsafeMutablePointer<Double>, m2: UnsafeMutablePointer<Double>) {
        @inline(__always)
        func store(_ j: Int, _ m: Moments) { mean[j] = m.mean; m2[j] = m.m2 }
        let full = n & ~7
        var i = 0
        if n >= _shiftedMinimum && full <= _deviationBlockLength {
            i = _planeOctets(x, planes: planes, spatial: n, mean: mean, m2: m2)
            let one = SIMD8<Float>(repeating: 1)
            while i &+ 2 <= planes {  // the planes lie inside the tensor (checked at the ABI): offsets wrap unchecked
                let x0 = x + i &* n, x1 = x0 + n
                let (h0, h1) = _hsum2(_load8(x0, 0), _load8(x1, 0))  // the shifts `_chunkMoments` takes
                let k0 = h0 * 0.125, k1 = h1 * 0.125
                if k0.isFinite && k1.isFinite {
                    var j0 = 0, j1 = 0
                    let (a0, b0) = _deviationBlock(x0, &j0, end: full, full: full, count: n,
                                                   shift: SIMD8(repeating: -k0), scale: one)
                    let (a1, b1) = _deviationBlock(x1, &j1, end: full, full: full, count: n,
                                                   shift: SIMD8(repeating: -k1), scale: one)
                    let h = _hsum4(a0, b0, a1, b1)
                    // 0 + s, as `_scaledDeviationSums` adds a block's sums to zero totals (-0 becomes +0)
                    let m0 = _shiftedMoments(x0, count: n, shift: k0, sum: 0 + Double(h[0]), squares: 0 + Double(h[1]))
                        ?? _unshiftedMoments(x0, count: n)
                    let m1 = _shiftedMoments(x1, count: n, shift: k1, sum: 0 + Double(h[2]), squares: 0 + Double(h[3]))
                        ?? _unshiftedMoments(x1, count: n)
                    store(i, m0); store(i &+ 1, m1)
                } else {
                    store(i, _chunkMoments(x0, count: n)); store(i &+ 1, _chunkMoments(x1, count: n))
                }
                i &+= 2
            }
        }
        while i < planes {
            store(i, _chunkMoments(x + i &* n, count: n))
            i &+= 1
        }
    }

    /// The moments without the one pass's shift: Float32 block sums for the centre, then the corrected pass; or
    /// all in Float64 for extreme magnitudes and non-finite values.
    @inlinable
    static func _unshiftedMoments(_ x: UnsafePointer<Float>, count n: Int) -> Moments {
        let invM = 1 / Double(n)
        let (total, squares) = _blockSums(x, count: n)
        let meanSquare = squares * invM
        guard total.isFinite, meanSquare.isFinite, meanSquare > 1e-30, meanSquare < 1e36 else {
            // zeros (a dead channel, a zero-initialized filter) have their moments without the Float64 passes,
            // which cost them 15 instructions a value: the same numbers, (n, 0, 0)
            if squares == 0 && _allEqual(x, count: n, to: 0) { return Moments(count: Double(n), mean: 0, m2: 0) }
            return _chunkMomentsWide(x, count: n)
        }
        return _correctedMoments(x, count: n, centre: total * invM, meanSquare: meanSquare)
    }

    /// The corrected second pass around an approximate mean `c`; `meanSquare` is a mean square of x about any
    /// point (it only sizes the scale).
    @inlinable
    static func _correctedMoments(_ x: UnsafePointer<Float>, count n: Int, centre c: Double, meanSquare: Double)
        -> Moments
    {
        let m = Double(n), invM = 1 / m
        let s = _inverseRootScale(meanSquare), cf = Float(c)
        let (ds, qs) = _scaledDeviationSums(x, count: n, centre: cf, scale: s)
        let inv = Double(bitPattern: UInt64(1150 - Int((s.bitPattern >> 23) & 0xff)) << 52)  // 1/s = 2^-k, exactly
        let d = ds * inv, q = qs * inv * inv
        return Moments(count: m, mean: Double(cf) + d * invM, m2: Swift.max(q - d * d * invM, 0))
    }

    /// (Σx, Σx²) accumulated in Float32 blocks of 256 elements, flushed to Float64.
    @inlinable
    static func _blockSums(_ x: UnsafePointer<Float>, count n: Int) -> (Double, Double) {
        var ts = 0.0, tq = 0.0
        let full = n & ~7
        var i = 0
        while i < full {  // blocks of 256: four independent chains of at most 8 terms per lane (s0: 10 in a last one)
            var s0 = SIMD8<Float>(), s1 = SIMD8<Float>(), s2 = SIMD8<Float>(), s3 = SIMD8<Float>()
            var q0 = SIMD8<Float>(), q1 = SIMD8<Float>(), q2 = SIMD8<Float>(), q3 = SIMD8<Float>()
            let end = Swift.min(full, i + 256)
            while i + 32 <= end {
                let v0 = _load8(x, i), v1 = _load8(x, i + 8), v2 = _load8(x, i + 16), v3 = _load8(x, i + 24)
                s0 += v0; s1 += v1; s2 += v2; s3 += v3
                q0.addProduct(v0, v0); q1.addProduct(v1, v1); q2.addProduct(v2, v2); q3.addProduct(v3, v3)
                i += 32
            }
            while i < end { let v = _load8(x, i); s0 += v; q0.addProduct(v, v); i += 8 }
            // horizontal Float sums: 3 more roundings each, then one convert
            _flush((s0 + s1) + (s2 + s3), (q0 + q1) + (q2 + q3), into: &ts, &tq)
        }
        while i < n { let v = Double(x[i]); ts += v; tq.addProduct(v, v); i += 1 }
        return (ts, tq)
    }

    @inlinable
    public static func _allEqual(_ x: UnsafePointer<Float>, count n: Int, to value: Float) -> Bool {
        let v = SIMD8<Float>(repeating: value)
        var i = 0
        while i &+ 32 <= n {
            let differ = (_load8(x, i) .!= v) .| (_load8(x, i &+ 8) .!= v) .| (_load8(x, i &+ 16) .!= v)
                .| (_load8(x, i &+ 24) .!= v)
            if any(differ) { return false }
            i &+= 32
        }
        while i < n {
            if x[i] != value { return false }
            i &+= 1
        }
        return true
    }

    @inlinable @inline(__always)
    public static func _shift(_ v: SIMD8<Float>) -> Float {
        let eighth = SIMD8<Float>(repeating: 0.125), e = v - SIMD8(repeating: v[0])
        let magnitude = unsafeBitCast(unsafeBitCast(e, to: SIMD8<UInt32>.self) & 0x7fff_ffff, to: SIMD8<Float>.self)
        let (m, d) = _hsum2(v * eighth, magnitude * eighth)
        return _shift(mean: m, distance: d)
    }

    /// `_shift` of four vectors, lane l for the l-th: the same numbers, their reductions in the same vector
    /// operations (`_hsum4`).
    @inlinable @inline(__always)
    static func _shift(_ a: SIMD8<Float>, _ b: SIMD8<Float>, _ c: SIMD8<Float>, _ d: SIMD8<Float>) -> SIMD4<Float> {
        let eighth = SIMD8<Float>(repeating: 0.125)
        @inline(__always) func distance(_ v: SIMD8<Float>) -> SIMD8<Float> {
            let e = v - SIMD8(repeating: v[0])
            return unsafeBitCast(unsafeBitCast(e, to: SIMD8<UInt32>.self) & 0x7fff_ffff, to: SIMD8<Float>.self)
                * eighth
        }
        let m = _hsum4(a * eighth, b * eighth, c * eighth, d * eighth)
        let distances = _hsum4(distance(a), distance(b), distance(c), distance(d))
        // `_shift(mean:distance:)` lane by lane: m where |m| > 2 d, else 0 (NaN gives 0)
        let size = unsafeBitCast(unsafeBitCast(m, to: SIMD4<UInt32>.self) & 0x7fff_ffff, to: SIMD4<Float>.self)
        return SIMD4().replacing(with: m, where: size .> 2 * distances)
    }

    /// By `MapRange`: Float32 lanes round the constants.
    @inlinable
    public static func _mapKeeps(count: Int, centres: UnsafePointer<Double>, dyCentres: UnsafePointer<Double>?,
                                 offsets: UnsafePointer<Double>, slopes s1: UnsafePointer<Double>,
                                 _ s2: UnsafePointer<Double>?) -> Bool {
        MapRange.keeps(count: count, centres: centres, dyCentres: dyCentres, offsets: offsets, slopes: s1, s2)
    }

    /// Two-pass moments with every sum in Float64: for chunks of extreme magnitude, and NaN or infinity.
    @inlinable
    static func _chunkMomentsWide(_ x: UnsafePointer<Float>, count n: Int) -> Moments {
        let m = Double(n)
        var total = 0.0
        for i in 0..<n { total += Double(x[i]) }
        let c = total / m
        guard c.isFinite else { return Moments(count: m, mean: c, m2: .nan) }
        var d = 0.0, q = 0.0
        for i in 0..<n { let e = Double(x[i]) - c; d += e; q.addProduct(e, e) }
        return Moments(count: m, mean: c + d / m, m2: Swift.max(q - d * d / m, 0))
    }

    /// Values a block of `_scaledDeviationSums` covers (four chains of eight terms per lane), and the plane length
    /// up to which `_chunkMoments` measures with no shift (`_planeMoments` relies on both).
    @inlinable static var _deviationBlockLength: Int { 256 }
    @inlinable static var _shiftedMinimum: Int { 16 }

    /// Two Float64 totals of the block sums of `full` values (and the tail that `block` takes with the last
    /// one), blocks of `length` values two at a time: `block(&i, end)` sums one from i, the pair's four lane sums
    /// are reduced in one `_hsum4` (each lane as `_hsum` sums it) and added to the totals block by block, in
    /// order; an odd last block uses `_hsum2`. (An out-of-line `_flush` a block cost a plane of 16 ~110
    /// instructions around 14 of work, and a plane of 196 ~80 in the backward.) Returns where i stopped.
    @inlinable @inline(__always)
    static func _blockTotals(full: Int, length: Int,
                             _ block: (inout Int, Int) -> (SIMD8<Float>, SIMD8<Float>)) -> (Double, Double, Int) {
        var ta = 0.0, tb = 0.0, i = 0
        while i < full {
            let (a, b) = block(&i, Swift.min(full, i &+ length))  // i < n: the counters wrap unchecked
            if i < full {
                let (c, d) = block(&i, Swift.min(full, i &+ length))
                let h = _hsum4(a, b, c, d)
                ta += Double(h[0]); tb += Double(h[1])
                ta += Double(h[2]); tb += Double(h[3])
            } else {
                let (ha, hb) = _hsum2(a, b)
                ta += Double(ha); tb += Double(hb)
            }
        }
        return (ta, tb, i)
    }

    /// (Σ (x - c)·s, Σ ((x - c)·s)²) with (x - c)·s computed as x·s - c·s by one FMA.
    @inlinable @inline(__always)
    static func _scaledDeviationSums(_ x: UnsafePointer<Float>, count n: Int, centre: Float, scale: Float)
        -> (Double, Double)
    {
        let s = SIMD8<Float>(repeating: scale), ncs = SIMD8<Float>(repeating: -(centre * scale))
        let full = n & ~7
        var (ts, tq, i) = _blockTotals(full: full, length: _deviationBlockLength) { i, end in
            _deviationBlock(x, &i, end: end, full: full, count: n, shift: ncs, scale: s)
        }
        while i < n {  // only when n < 8
            let d = Double((-(centre * scale)).addingProduct(x[i], scale))
            ts += d; tq.addProduct(d, d); i += 1
        }
        return (ts, tq)
    }

    /// One block of `_scaledDeviationSums`, from i to `end` (at most 256 values; with the overlapping tail when
    /// it ends the full vectors): four independent chains of at most 8 terms per lane (a block that ends a plane
    /// gives its last one to three vectors to s1, up to 10 terms, and its tail to s2), returned added pairwise.
    @inlinable @inline(__always)
    static func _deviationBlock(_ x: UnsafePointer<Float>, _ i: inout Int, end: Int, full: Int, count n: Int,
                                shift ncs: SIMD8<Float>, scale s: SIMD8<Float>) -> (SIMD8<Float>, SIMD8<Float>) {
        var s0 = SIMD8<Float>(), s1 = SIMD8<Float>(), s2 = SIMD8<Float>(), s3 = SIMD8<Float>()
        var q0 = SIMD8<Float>(), q1 = SIMD8<Float>(), q2 = SIMD8<Float>(), q3 = SIMD8<Float>()
        let last = end &- 32  // one compare a step (with `i &+ 32 <= end` LLVM kept a second counter)
        while i <= last {
            var d0 = ncs, d1 = ncs, d2 = ncs, d3 = ncs
            d0.addProduct(_load8(x, i), s); d1.addProduct(_load8(x, i &+ 8), s)
            d2.addProduct(_load8(x, i &+ 16), s); d3.addProduct(_load8(x, i &+ 24), s)
            s0 += d0; s1 += d1; s2 += d2; s3 += d3
            q0.addProduct(d0, d0); q1.addProduct(d1, d1); q2.addProduct(d2, d2); q3.addProduct(d3, d3)
            i &+= 32
        }
        while i < end { var d = ncs; d.addProduct(_load8(x, i), s); s1 += d; q1.addProduct(d, d); i &+= 8 }
        if i == full && i < n {  // the tail as one overlapping vector, its visited lanes masked out
            var d = ncs
            d.addProduct(_load8(x, n - 8), s)
            d.replace(with: 0, where: _visitedLanes(n))
            s2 += d; q2.addProduct(d, d)
            i = n
        }
        return ((s0 + s1) + (s2 + s3), (q0 + q1) + (q2 + q3))
    }

    /// About cf = Float(centre), the residue folded into the offset (`CentreResidue`); in Float64, rounded once,
    /// for planes shorter than a vector and for constants `MapRange` refuses.
    @inlinable
    public static func _scaleShift(
        _ x: UnsafePointer<Float>, _ y: UnsafeMutablePointer<Float>, count n: Int,
        centre: Double, scale: Double, offset: Double
    ) {
        let cf = Float(centre), sf = Float(scale)
        let of = Float(CentreResidue.offset(offset, slope: scale, centre: centre, rounded: Double(cf)))
        let c = SIMD8<Float>(repeating: cf), s = SIMD8<Float>(repeating: sf), o = SIMD8<Float>(repeating: of)
        if n >= 8 && MapRange.keeps(centre: centre, offset: offset, slopes: scale, 0) {
            // The tail as one overlapping vector, computed before the loop overwrites x (y may alias it) and
            // stored after: the lanes it shares with the last full vector get the same values again.
            var tail = o
            tail.addProduct(_load8(x, n - 8) - c, s)
            var i = 0
            // Four vectors a step: one add, compare and branch for 32 values (i stays below n, so it wraps
            // unchecked); the same operations per value as the loop of one below.
            let last = n &- 32
            while i <= last {
                var v0 = o, v1 = o, v2 = o, v3 = o
                v0.addProduct(_load8(x, i) - c, s); v1.addProduct(_load8(x, i &+ 8) - c, s)
                v2.addProduct(_load8(x, i &+ 16) - c, s); v3.addProduct(_load8(x, i &+ 24) - c, s)
                _store8(v0, y, i); _store8(v1, y, i &+ 8); _store8(v2, y, i &+ 16); _store8(v3, y, i &+ 24)
                i &+= 32
            }
            while i &+ 8 <= n {
                var v = o
                v.addProduct(_load8(x, i) - c, s)
                _store8(v, y, i)
                i &+= 8
            }
            _store8(tail, y, n - 8)
            return
        }
        // Planes shorter than 8 (such as [B, C] input) in Float64: there a tiny channel group can make scale and
        // offset large and cancelling, and Float rounding would show. So do constants out of `MapRange`.
        WideMap.values(x, y, at: 0, count: n, centre: centre, scale: scale, offset: offset)
    }

    /// Float32 blocks of Σ(dy - s) and Σ(dy - s)(x - cf) with s = dyShift, as in `_scaledDeviationSums`, then
    /// Σ dy = Σ(dy - s) + n s and Σ(dy - s)(x - c) = Σ(dy - s)(x - cf) - (c - cf) Σ(dy - s). Products that
    /// overflow Float32 (|dy·(x-c)| > 3e38) are detected and the chunk is summed again in Float64.
    @inlinable @inline(__always)
    public static func _gradientSums(
        _ dy: UnsafePointer<Float>, _ x: UnsafePointer<Float>, count n: Int, centre: Double, dyShift: Float
    ) -> (sum: Double, dot: Double) {
        let cf = Float(centre), c = SIMD8<Float>(repeating: cf), k = SIMD8<Float>(repeating: dyShift)
        let full = n & ~7
        var (negated, td, i) = _blockTotals(full: full, length: 128) { i, end in
            _gradientBlock(dy, x, &i, end: end, full: full, count: n, centre: c, shift: k)
        }
        var ts = 0 - negated  // the blocks sum s - dy (`_gradientBlock`); 0 - t maps a zero to +0, as 0 + t does
        let shift = Double(dyShift)
        while i < n { let e = Double(dy[i]) - shift; ts += e; td.addProduct(e, Double(x[i] - cf)); i += 1 }  // n < 8
        if !(ts.isFinite && td.isFinite) { return _gradientSumsWide(dy, x, count: n, centre: centre, dyShift: shift) }
        // ts = Σ(dy - s): Σ dy = ts + n s keeps dy's spread too, where summing dy itself rounded it to dy's size
        return (ts + Double(n) * shift, CentreResidue.dot(td, sum: ts, centre: centre, rounded: Double(cf)))
    }

    /// One block of `_gradientSums`: (Σ(k - dy), Σ(k - dy)(c - x)), the negated sum of dy - k and the dot of
    /// dy - k and x - c, from i to `end` (at most 128 values; with the overlapping tail when it ends the full
    /// vectors): two chains of at most 8 terms per lane (9 with the tail), returned added. Negating both
    /// differences is exact and leaves their product as it was; k - dy and c - x take dy and x as an operand of
    /// the subtraction, two load instructions fewer a vector. The loop takes four vectors a step, each chain its
    /// two in turn: the same terms in the same order as a step of two, with half the loop's bookkeeping.
    @inlinable @inline(__always)
    static func _gradientBlock(_ dy: UnsafePointer<Float>, _ x: UnsafePointer<Float>, _ i: inout Int, end: Int,
                               full: Int, count n: Int, centre c: SIMD8<Float>, shift k: SIMD8<Float>)
        -> (SIMD8<Float>, SIMD8<Float>)
    {
        var s0 = SIMD8<Float>(), s1 = SIMD8<Float>(), p0 = SIMD8<Float>(), p1 = SIMD8<Float>()
        let last = end &- 32
        while i <= last {
            let e0 = k - _load8(dy, i), e1 = k - _load8(dy, i &+ 8)
            let e2 = k - _load8(dy, i &+ 16), e3 = k - _load8(dy, i &+ 24)
            s0 += e0; s1 += e1
            p0.addProduct(e0, c - _load8(x, i)); p1.addProduct(e1, c - _load8(x, i &+ 8))
            s0 += e2; s1 += e3
            p0.addProduct(e2, c - _load8(x, i &+ 16)); p1.addProduct(e3, c - _load8(x, i &+ 24))
            i &+= 32
        }
        if i &+ 16 <= end {
            let e0 = k - _load8(dy, i), e1 = k - _load8(dy, i &+ 8)
            s0 += e0; s1 += e1
            p0.addProduct(e0, c - _load8(x, i)); p1.addProduct(e1, c - _load8(x, i &+ 8))
            i &+= 16
        }
        if i < end { let e = k - _load8(dy, i); s0 += e; p0.addProduct(e, c - _load8(x, i)); i &+= 8 }
        if i == full && i < n {  // the tail as one overlapping vector, its visited lanes masked out (both terms)
            let e = (k - _load8(dy, n &- 8)).replacing(with: 0, where: _visitedLanes(n))
            s1 += e; p1.addProduct(e, c - _load8(x, n &- 8))
            i = n
        }
        return (s0 + s1, p0 + p1)
    }

    @inlinable
    public static func _scaleShiftPlanes(
        _ x: UnsafePointer<Float>, _ y: UnsafeMutablePointer<Float>, planes: Int, spatial n: Int,
        centres: UnsafePointer<Double>, scales: UnsafePointer<Double>, offsets: UnsafePointer<Double>
    ) {
        let quads = _scaleShiftQuads(x, y, planes: planes, spatial: n, centres: centres, scales: scales,
                                     offsets: offsets)
        for i in quads..<planes {  // the rest (every plane of other n) one at a time
            _scaleShift(x + i &* n, y + i &* n, count: n, centre: centres[i], scale: scales[i], offset: offsets[i])
        }
    }

    @inlinable
    public static func _combinePlanes(
        _ dy: UnsafePointer<Float>, _ x: UnsafePointer<Float>, _ dx: UnsafeMutablePointer<Float>, planes: Int,
        spatial n: Int, centres: UnsafePointer<Double>, dySums: UnsafePointer<Double>, p: UnsafePointer<Double>,
        q: UnsafePointer<Double>, r: UnsafePointer<Double>
    ) {
        let invN = 1 / Double(n)
        for i in _combineQuads(dy, x, dx, planes: planes, spatial: n, centres: centres, dySums: dySums, p: p, q: q,
                               r: r)..<planes {
            let at = i &* n
            _combine(dy + at, x + at, dx + at, count: n, centre: centres[i], dyMean: dySums[i] * invN, p: p[i],
                     q: q[i], r: r[i])
        }
    }

    @inlinable
    public static func _planeGradientSums(
        _ dy: UnsafePointer<Float>, _ x: UnsafePointer<Float>, planes: Int, spatial n: Int,
        centres: UnsafePointer<Double>, sums: UnsafeMutablePointer<Double>, dots: UnsafeMutablePointer<Double>
    ) {
        let octets = _planeGradientOctets(dy, x, planes: planes, spatial: n, centres: centres, sums: sums, dots: dots)
        for i in octets..<planes {
            let plane = dy + i &* n
            (sums[i], dots[i]) = _gradientSums(plane, x + i &* n, count: n, centre: centres[i],
                                               dyShift: _earlyMean(plane, count: n))
        }
    }

    /// The same sums accumulated in Float64 throughout: the fallback for Float32 overflow.
    @inlinable
    static func _gradientSumsWide(
        _ dy: UnsafePointer<Float>, _ x: UnsafePointer<Float>, count n: Int, centre: Double, dyShift: Double
    ) -> (sum: Double, dot: Double) {
        var sum = 0.0, dot = 0.0
        for i in 0..<n {
            let g = Double(dy[i])
            sum += g
            dot.addProduct(g - dyShift, Double(x[i]) - centre)
        }
        return (sum, dot)
    }

    @inlinable @inline(__always)
    public static func _combine(
        _ dy: UnsafePointer<Float>, _ x: UnsafePointer<Float>, _ dx: UnsafeMutablePointer<Float>, count n: Int,
        centre: Double, dyMean: Double, p: Double, q: Double, r: Double
    ) {
        // about cf = Float(centre) and df = Float(dyMean): r + q (x - c) + p dy = r' + q (x - cf) + p (dy - df)
        let cf = Float(centre), df = Float(dyMean), pf = Float(p), qf = Float(q)
        let rf = Float(CentreResidue.offset(r, slope: q, centre: centre, rounded: Double(cf)) + p * Double(df))
        let c = SIMD8<Float>(repeating: cf), d = SIMD8<Float>(repeating: df), pv = SIMD8<Float>(repeating: pf)
        let qv = SIMD8<Float>(repeating: qf), rv = SIMD8<Float>(repeating: rf)
        if n >= 8 && MapRange.keeps(centre: centre, dyCentre: dyMean, offset: r, slopes: q, p) {
            // A tail (n not a multiple of 8) as one overlapping vector, computed first as in `_scaleShift` (dx may
            // alias dy). Planes of 16 values have none, and computing one anyway cost them a third of the map.
            let ragged = n & 7 != 0
            var tail = rv
            if ragged {
                tail.addProduct(_load8(x, n - 8) - c, qv)
                tail.addProduct(_load8(dy, n - 8) - d, pv)
            }
            var i = 0
            let last = n &- 32
            while i <= last {  // four vectors a step, as `_scaleShift` takes
                var v0 = rv, v1 = rv, v2 = rv, v3 = rv
                v0.addProduct(_load8(x, i) - c, qv); v1.addProduct(_load8(x, i &+ 8) - c, qv)
                v2.addProduct(_load8(x, i &+ 16) - c, qv); v3.addProduct(_load8(x, i &+ 24) - c, qv)
                v0.addProduct(_load8(dy, i) - d, pv); v1.addProduct(_load8(dy, i &+ 8) - d, pv)
                v2.addProduct(_load8(dy, i &+ 16) - d, pv); v3.addProduct(_load8(dy, i &+ 24) - d, pv)
                _store8(v0, dx, i); _store8(v1, dx, i &+ 8); _store8(v2, dx, i &+ 16); _store8(v3, dx, i &+ 24)
                i &+= 32
            }
            while i &+ 8 <= n {
                var v = rv
                v.addProduct(_load8(x, i) - c, qv)
                v.addProduct(_load8(dy, i) - d, pv)
                _store8(v, dx, i)
                i &+= 8
            }
            if ragged { _store8(tail, dx, n - 8) }
            return
        }
        // in Float64, as in `_scaleShift` (short planes, constants out of `MapRange`)
        WideMap.gradients(dy, x, dx, at: 0, count: n, centre: centre, p: p, q: q, r: r)
    }

    @inlinable
    public static func _mapColumns(
        _ x: UnsafePointer<Float>, _ y: UnsafeMutablePointer<Float>, rows: Int, columns n: Int, stride: Int,
        centre: UnsafePointer<Float>, scale: UnsafePointer<Float>, offset: UnsafePointer<Float>
    ) {
        if n >= 64 && n & 31 == 0 && stride == n {
            // Rows of 64 channels or more (a multiple of 32) back to back: row by row, memory in order, the
            // constants read as operands, as `_combineColumns` does. Strips down a few rows kept a strip's
            // constants in registers (two strips' do not fit) but walked several rows at once, out of order:
            // with the input in memory, 1.08-1.2x the time on 128 to 512 channels; in L3 the same or 1.03x.
            // The same operations.
            @inline(__always) func rowsOf(_ n: Int) {  // called with n = 64 too, which LLVM unrolls
                var at = 0
                let end = rows &* n
                while at < end {
                    let row = x + at, out = y + at
                    var c = 0
                    while c < n {
                        var v0 = _load8(offset, c), v1 = _load8(offset, c &+ 8)
                        var v2 = _load8(offset, c &+ 16), v3 = _load8(offset, c &+ 24)
                        v0.addProduct(_load8(row, c) - _load8(centre, c), _load8(scale, c))
                        v1.addProduct(_load8(row, c &+ 8) - _load8(centre, c &+ 8), _load8(scale, c &+ 8))
                        v2.addProduct(_load8(row, c &+ 16) - _load8(centre, c &+ 16), _load8(scale, c &+ 16))
                        v3.addProduct(_load8(row, c &+ 24) - _load8(centre, c &+ 24), _load8(scale, c &+ 24))
                        _store8(v0, out, c); _store8(v1, out, c &+ 8)
                        _store8(v2, out, c &+ 16); _store8(v3, out, c &+ 24)
                        c &+= 32
                    }
                    at &+= n
                }
            }
            if n == 64 { rowsOf(64) } else { rowsOf(n) }
            return
        }
        var c = 0
        // 32 columns at a time: four independent loads and stores a row, so the memory system has several
        // lines in flight (one lane of 8 a row stalled on every load: 2x the plane layout's time for the same
        // traffic). Each value gets the same operations as in the loop of 8 below.
        while c + 32 <= n {
            let k0 = _load8(centre, c), k1 = _load8(centre, c + 8), k2 = _load8(centre, c + 16)
            let k3 = _load8(centre, c + 24)
            let s0 = _load8(scale, c), s1 = _load8(scale, c + 8), s2 = _load8(scale, c + 16), s3 = _load8(scale, c + 24)
            let o0 = _load8(offset, c), o1 = _load8(offset, c + 8), o2 = _load8(offset, c + 16)
            let o3 = _load8(offset, c + 24)
            for row in 0..<rows {
                let at = row &* stride &+ c
                var v0 = o0, v1 = o1, v2 = o2, v3 = o3
                v0.addProduct(_load8(x, at) - k0, s0); v1.addProduct(_load8(x, at &+ 8) - k1, s1)
                v2.addProduct(_load8(x, at &+ 16) - k2, s2); v3.addProduct(_load8(x, at &+ 24) - k3, s3)
                _store8(v0, y, at); _store8(v1, y, at &+ 8); _store8(v2, y, at &+ 16); _store8(v3, y, at &+ 24)
            }
            c += 32
        }
        while c + 8 <= n {
            let k = _load8(centre, c), s = _load8(scale, c), o = _load8(offset, c)
            for row in 0..<rows {
                let at = row * stride + c
                var v = o
                v.addProduct(_load8(x, at) - k, s)
                _store8(v, y, at)
            }
            c += 8
        }
        while c < n {
            for row in 0..<rows {
                let at = row * stride + c
                y[at] = offset[c].addingProduct(x[at] - centre[c], scale[c])
            }
            c += 1
        }
    }

    /// Row by row, each row's columns in order, 32 at a time, the constants read as operands of the arithmetic:
    /// three streams (dy, x, dx) in order, as the plane layout reads them. Holding constants in registers meant
    /// walking a strip of columns down the rows, which ran 1.1-1.5x slower here (A/B, C = 64..512); and a call per
    /// row paid its setup per row (a 32-channel row: 28 instructions of work, about 60 around them).
    @inlinable
    public static func _combineColumns(
        _ dy: UnsafePointer<Float>, _ x: UnsafePointer<Float>, _ dx: UnsafeMutablePointer<Float>, rows: Int,
        columns n: Int, stride: Int, centre: UnsafePointer<Float>, dyCentre: UnsafePointer<Float>,
        p: UnsafePointer<Float>, q: UnsafePointer<Float>, r: UnsafePointer<Float>
    ) {
        if n & 31 == 0 && stride == n {
            // Rows of a multiple of 32 channels back to back (a ResNet's stages): one loop over the rows, each
            // row's columns 32 at a time with nothing to test after them. The general loop kept its row counters
            // on the stack and tested its column tails every row: 23 instructions around a 32-channel row's 28,
            // about 45 around a 64-channel row's 64.
            var at = 0
            let end = rows &* n
            while at < end {
                let dyRow = dy + at, xRow = x + at, dxRow = dx + at
                var c = 0
                repeat {
                    _combineColumn8(dyRow, xRow, dxRow, c, centre: centre, dyCentre: dyCentre, p: p, q: q, r: r)
                    _combineColumn8(dyRow, xRow, dxRow, c &+ 8, centre: centre, dyCentre: dyCentre, p: p, q: q,
                                    r: r)
                    _combineColumn8(dyRow, xRow, dxRow, c &+ 16, centre: centre, dyCentre: dyCentre, p: p, q: q,
                                    r: r)
                    _combineColumn8(dyRow, xRow, dxRow, c &+ 24, centre: centre, dyCentre: dyCentre, p: p, q: q,
                                    r: r)
                    c &+= 32
                } while c < n
                at &+= n
            }
            return
        }
        var dyRow = dy, xRow = x, dxRow = dx
        for _ in 0..<rows {
            var c = 0
            while c &+ 32 <= n {
                _combineColumn8(dyRow, xRow, dxRow, c, centre: centre, dyCentre: dyCentre, p: p, q: q, r: r)
                _combineColumn8(dyRow, xRow, dxRow, c &+ 8, centre: centre, dyCentre: dyCentre, p: p, q: q, r: r)
                _combineColumn8(dyRow, xRow, dxRow, c &+ 16, centre: centre, dyCentre: dyCentre, p: p, q: q, r: r)
                _combineColumn8(dyRow, xRow, dxRow, c &+ 24, centre: centre, dyCentre: dyCentre, p: p, q: q, r: r)
                c &+= 32
            }
            while c &+ 8 <= n {
                _combineColumn8(dyRow, xRow, dxRow, c, centre: centre, dyCentre: dyCentre, p: p, q: q, r: r)
                c &+= 8
            }
            while c < n {
                dxRow[c] = r[c].addingProduct(xRow[c] - centre[c], q[c]).addingProduct(dyRow[c] - dyCentre[c], p[c])
                c &+= 1
            }
            dyRow += stride; xRow += stride; dxRow += stride
        }
    }

    /// dx[i..<i+8] = r + (x - centre) · q + (dy - dyCentre) · p, as every value of `_combineColumns`: the
    /// constants read as operands of the arithmetic, at no instruction of their own.
    @inlinable @inline(__always)
    static func _combineColumn8(_ dy: UnsafePointer<Float>, _ x: UnsafePointer<Float>,
                                _ dx: UnsafeMutablePointer<Float>, _ i: Int, centre: UnsafePointer<Float>,
                                dyCentre: UnsafePointer<Float>, p: UnsafePointer<Float>, q: UnsafePointer<Float>,
                                r: UnsafePointer<Float>) {
        var v = _load8(r, i)
        v.addProduct(_load8(x, i) - _load8(centre, i), _load8(q, i))
        v.addProduct(_load8(dy, i) - _load8(dyCentre, i), _load8(p, i))
        _store8(v, dx, i)
    }

    /// Adds the lane sums of `s` to `out[0..<8]` in Float64, a half at a time: the generic
    /// `SIMD8<Double>(SIMD8<Float>)` is not always inlined, and its call cost the channels-last gradient sums a
    /// quarter of their instructions.
    @inlinable @inline(__always)
    static func _flush8(_ s: SIMD8<Float>, into out: UnsafeMutablePointer<Double>) {
        let (lo, hi) = unsafeBitCast(s, to: (SIMD4<Float>, SIMD4<Float>).self)
        let raw = UnsafeMutableRawPointer(out)
        raw.storeBytes(of: raw.loadUnaligned(as: SIMD4<Double>.self) + SIMD4<Double>(lo), as: SIMD4<Double>.self)
        raw.storeBytes(of: raw.loadUnaligned(fromByteOffset: 32, as: SIMD4<Double>.self) + SIMD4<Double>(hi),
                       toByteOffset: 32, as: SIMD4<Double>.self)
    }

    /// `_flush8` of the eight lane sums stored at `s`, widened as they load: in a loop of 8-lane arithmetic,
    /// `_flush8`'s halves led LLVM to split all of the loop's vectors into 4-lane halves.
    @inlinable @inline(__always)
    static func _flush8(stored s: UnsafePointer<Float>, into out: UnsafeMutablePointer<Double>) {
        let raw = UnsafeMutableRawPointer(out)
        raw.storeBytes(of: raw.loadUnaligned(as: SIMD4<Double>.self) + _load4Wide(s, 0), as: SIMD4<Double>.self)
        raw.storeBytes(of: raw.loadUnaligned(fromByteOffset: 32, as: SIMD4<Double>.self) + _load4Wide(s, 4),
                       toByteOffset: 32, as: SIMD4<Double>.self)
    }

    /// One block's strip of 32 columns from column c, rows `rows` (`stride` apart): Σ (x - k) and, with `squares`,
    /// Σ (x - k)² per column in Float32 lanes, four independent chains of one term a row, added to the Float64
    /// totals from `sums + c` and `squares + c` (`_flush8`). `_columnSums`' one body for a strip, whichever
    /// loop runs it.
    @inlinable @inline(__always)
    static func _columnStrip(_ x: UnsafePointer<Float>, rows: Range<Int>, stride: Int, column c: Int,
                             centres k: (SIMD8<Float>, SIMD8<Float>, SIMD8<Float>, SIMD8<Float>),
                             sums: UnsafeMutablePointer<Double>, squares: UnsafeMutablePointer<Double>?) {
        // Σ (k - x), negated as it is flushed: negation is exact, and k - x takes x as the operand of the
        // subtraction, one load instruction fewer a vector than x - k
        var s0 = SIMD8<Float>(), s1 = s0, s2 = s0, s3 = s0, q0 = s0, q1 = s0, q2 = s0, q3 = s0
        for r in rows {
            let row = x + (r &* stride &+ c)  // offsets inside the block: they wrap unchecked
            let d0 = k.0 - _load8(row, 0), d1 = k.1 - _load8(row, 8)
            let d2 = k.2 - _load8(row, 16), d3 = k.3 - _load8(row, 24)
            s0 += d0; s1 += d1; s2 += d2; s3 += d3
            q0.addProduct(d0, d0); q1.addProduct(d1, d1); q2.addProduct(d2, d2); q3.addProduct(d3, d3)
        }
        _flush8(-s0, into: sums + c); _flush8(-s1, into: sums + c + 8)
        _flush8(-s2, into: sums + c + 16); _flush8(-s3, into: sums + c + 24)
        if let squares {
            _flush8(q0, into: squares + c); _flush8(q1, into: squares + c + 8)
            _flush8(q2, into: squares + c + 16); _flush8(q3, into: squares + c + 24)
        }
    }

    /// One block's strip of 32 columns of `_columnGradientSums`, as `_columnStrip`: Σ dy and Σ dy (x - k), into
    /// `sums + c` and `dots + c`.
    @inlinable @inline(__always)
    static func _gradientStrip(_ dy: UnsafePointer<Float>, _ x: UnsafePointer<Float>, rows: Range<Int>, stride: Int,
                               column c: Int, centres k: (SIMD8<Float>, SIMD8<Float>, SIMD8<Float>, SIMD8<Float>),
                               shifts h: (SIMD8<Float>, SIMD8<Float>, SIMD8<Float>, SIMD8<Float>),
                               sums: UnsafeMutablePointer<Double>, dots: UnsafeMutablePointer<Double>) {
        // Σ (s - dy) negated as it is flushed, and Σ (s - dy)(k - x), the same dot (as in `_columnStrip`)
        var s0 = SIMD8<Float>(), s1 = s0, s2 = s0, s3 = s0, p0 = s0, p1 = s0, p2 = s0, p3 = s0
        for r in rows {
            let at = r &* stride &+ c, g = dy + at, v = x + at  // as in `_columnStrip`
            let e0 = h.0 - _load8(g, 0), e1 = h.1 - _load8(g, 8), e2 = h.2 - _load8(g, 16), e3 = h.3 - _load8(g, 24)
            s0 += e0; s1 += e1; s2 += e2; s3 += e3
            p0.addProduct(e0, k.0 - _load8(v, 0)); p1.addProduct(e1, k.1 - _load8(v, 8))
            p2.addProduct(e2, k.2 - _load8(v, 16)); p3.addProduct(e3, k.3 - _load8(v, 24))
        }
        _flush8(-s0, into: sums + c); _flush8(-s1, into: sums + c + 8)
        _flush8(-s2, into: sums + c + 16); _flush8(-s3, into: sums + c + 24)
        _flush8(p0, into: dots + c); _flush8(p1, into: dots + c + 8)
        _flush8(p2, into: dots + c + 16); _flush8(p3, into: dots + c + 24)
    }

    /// Blocks of 8 rows run outermost, and in each, 32 columns (four lanes of 8) at a time down its rows: a
    /// block (8 rows, read in order) stays in L1 while its columns are summed, in Float32, then added to the
    /// Float64 totals. (Walking one strip of columns down all the rows instead touches many distant lines at
    /// once, which the prefetcher does not follow and a power-of-two row stride makes collide in L1.)
    /// With `partials`, a block's rows are read in order instead, each against the block's partial sums there:
    /// the same operations on each lane, in the same order.
    @inlinable
    public static func _columnSums(
        _ x: UnsafePointer<Float>, rows: Int, columns n: Int, stride: Int, centre: UnsafePointer<Float>?,
        sums: UnsafeMutablePointer<Double>, squares: UnsafeMutablePointer<Double>?,
        partials: UnsafeMutablePointer<Float>?
    ) {
        let wide = n & ~7  // columns in lanes of 8; the rest in Float64
        if n == 32, partials == nil, let centre {
            // Rows of exactly 32 columns, one strip: its centres loaded once for all the blocks, and no column
            // loops or tails around each block (they cost a third of a block's instructions on 32 channels).
            let k = (_load8(centre, 0), _load8(centre, 8), _load8(centre, 16), _load8(centre, 24))
            var r0 = 0
            while r0 < rows {
                let end = Swift.min(rows, r0 &+ 8)
                _columnStrip(x, rows: r0..<end, stride: stride, column: 0, centres: k, sums: sums, squares: squares)
                r0 = end
            }
            return
        }
        var r0 = 0
        while r0 < rows {
            let end = Swift.min(rows, r0 &+ 8)
            if let partials {
                let s = partials, q = partials + wide
                for r in r0..<end {
                    let row = x + r &* stride, first = r == r0  // the first row starts the sums, from +0
                    var c = 0
                    while c < wide {
                        let d = _load8(row, c) - (centre.map { _load8($0, c) } ?? SIMD8())
                        let (s0, q0) = first ? (SIMD8(), SIMD8()) : (_load8(s, c), _load8(q, c))
                        _store8(s0 + d, s, c); _store8(q0.addingProduct(d, d), q, c)
                        c &+= 8
                    }
                }
                var c = 0
                while c < wide {
                    _flush8(_load8(s, c), into: sums + c)
                    if let squares { _flush8(_load8(q, c), into: squares + c) }
                    c &+= 8
                }
                r0 = end
                continue
            }
            var c = 0
            while c &+ 32 <= wide {
                let k0 = centre.map { _load8($0, c) } ?? SIMD8<Float>(), k1 = centre.map { _load8($0, c + 8) } ?? k0
                let k2 = centre.map { _load8($0, c + 16) } ?? k0, k3 = centre.map { _load8($0, c + 24) } ?? k0
                _columnStrip(x, rows: r0..<end, stride: stride, column: c, centres: (k0, k1, k2, k3), sums: sums,
                             squares: squares)
                c &+= 32
            }
            while c < wide {
                let k = centre.map { _load8($0, c) } ?? SIMD8<Float>()
                var s = SIMD8<Float>(), q = SIMD8<Float>()
                for r in r0..<end { let d = _load8(x + r * stride, c) - k; s += d; q.addProduct(d, d) }
                _flush8(s, into: sums + c)
                if let squares { _flush8(q, into: squares + c) }
                c += 8
            }
            r0 = end
        }
        for c in wide..<n {  // remaining columns in Float64
            let k = centre.map { Double($0[c]) } ?? 0
            var s = 0.0, q = 0.0
            for r in 0..<rows { let d = Double(x[r * stride + c]) - k; s += d; q.addProduct(d, d) }
            sums[c] += s
            squares?[c] += q
        }
    }

    /// `count` rows from row r (`stride` apart) of `_columnGradientSums`' block read in order, 8 columns at a time
    /// across `columns`, each lane's sums carried down the rows in registers: with `first`, from 0, else from the
    /// block's `partials` ([S | P], stored there again; with `sums`, which ends the block, then added to `sums`
    /// and `dots`). The same operations on each lane in the same order as the strip (`_gradientStrip`),
    /// with two instructions fewer a vector: S is carried negated, as Σ (s - dy) (negation is exact), so that dy
    /// and x are operands of the subtractions, and Σ (s - dy)(k - x) is the same dot.
    @inlinable @inline(__always)
    static func _gradientRows(_ dy: UnsafePointer<Float>, _ x: UnsafePointer<Float>, from r: Int, _ count: Int,
                              stride: Int, columns wide: Int, centre: UnsafePointer<Float>,
                              dyShift: UnsafePointer<Float>, partials: UnsafeMutablePointer<Float>, first: Bool,
                              sums: UnsafeMutablePointer<Double>?, dots: UnsafeMutablePointer<Double>) {
        let g = dy + r &* stride, v = x + r &* stride, s = partials, p = partials + wide
        var c = 0
        while c < wide {
            let h = _load8(dyShift, c), k = _load8(centre, c)
            var sn = first ? SIMD8<Float>() : _load8(s, c), pc = first ? SIMD8<Float>() : _load8(p, c)
            for j in 0..<count {
                let at = j &* stride &+ c, e = h - _load8(g, at)
                sn += e; pc.addProduct(e, k - _load8(v, at))
            }
            _store8(sums == nil ? sn : -sn, s, c); _store8(pc, p, c)
            if let sums { _flush8(stored: s + c, into: sums + c); _flush8(stored: p + c, into: dots + c) }
            c &+= 8
        }
    }

    /// As `_columnSums`: blocks of 8 rows outermost, 32 columns at a time in Float32, or with `partials` each
    /// block's rows in order.
    @inlinable
    public static func _columnGradientSums(
        _ dy: UnsafePointer<Float>, _ x: UnsafePointer<Float>, rows: Int, columns n: Int, stride: Int,
        centre: UnsafePointer<Float>, dyShift: UnsafePointer<Float>, sums: UnsafeMutablePointer<Double>,
        dots: UnsafeMutablePointer<Double>, partials: UnsafeMutablePointer<Float>?
    ) {
        let wide = n & ~7
        if n == 32 && partials == nil {  // one strip, its centres loaded once, as in `_columnSums`
            let k = (_load8(centre, 0), _load8(centre, 8), _load8(centre, 16), _load8(centre, 24))
            let h = (_load8(dyShift, 0), _load8(dyShift, 8), _load8(dyShift, 16), _load8(dyShift, 24))
            var r0 = 0
            while r0 < rows {
                let end = Swift.min(rows, r0 &+ 8)
                _gradientStrip(dy, x, rows: r0..<end, stride: stride, column: 0, centres: k, shifts: h, sums: sums,
                               dots: dots)
                r0 = end
            }
            return
        }
        var r0 = 0
        while r0 < rows {
            let end = Swift.min(rows, r0 &+ 8)
            if let partials {
                if end &- r0 == 8 {  // a whole block: two sweeps of four rows (eight rows at once were
                    // sixteen streams of loads, too many for the prefetcher; sweeps of two rows ran 1.0-1.1x the
                    // time of these)
                    _gradientRows(dy, x, from: r0, 4, stride: stride, columns: wide, centre: centre, dyShift: dyShift,
                                  partials: partials, first: true, sums: nil, dots: dots)
                    _gradientRows(dy, x, from: r0 &+ 4, 4, stride: stride, columns: wide, centre: centre,
                                  dyShift: dyShift, partials: partials, first: false, sums: sums, dots: dots)
                } else {  // the stretch's last rows, one sweep each
                    for r in r0..<end {
                        _gradientRows(dy, x, from: r, 1, stride: stride, columns: wide, centre: centre,
                                      dyShift: dyShift, partials: partials, first: r == r0,
                                      sums: r == end &- 1 ? sums : nil, dots: dots)
                    }
                }
                r0 = end
                continue
            }
            var c = 0
            while c &+ 32 <= wide {
                let k = (_load8(centre, c), _load8(centre, c + 8), _load8(centre, c + 16), _load8(centre, c + 24))
                let h = (_load8(dyShift, c), _load8(dyShift, c + 8), _load8(dyShift, c + 16), _load8(dyShift, c + 24))
                _gradientStrip(dy, x, rows: r0..<end, stride: stride, column: c, centres: k, shifts: h, sums: sums,
                               dots: dots)
                c &+= 32
            }
            while c < wide {
                let k = _load8(centre, c), h = _load8(dyShift, c)
                var s = SIMD8<Float>(), d = SIMD8<Float>()
                for r in r0..<end {
                    let e = _load8(dy + r * stride, c) - h
                    s += e; d.addProduct(e, _load8(x + r * stride, c) - k)
                }
                _flush8(s, into: sums + c); _flush8(d, into: dots + c)
                c += 8
            }
            r0 = end
        }
        for c in wide..<n {
            let k = Double(centre[c]), h = Double(dyShift[c])
            var s = 0.0, d = 0.0
            for r in 0..<rows {
                let e = Double(dy[r * stride + c]) - h
                s += e; d.addProduct(e, Double(x[r * stride + c]) - k)
            }
            sums[c] += s; dots[c] += d
        }
    }
}
