/// A floating-point element type bcnswift computes on: `Float` and `Double`.
///
/// The requirements are the only loops that touch tensor elements. Every reduction accumulates in `Double`
/// whatever `Self` is, in centred form: sums of `(x - centre)` never `E[x²] - E[x]²`, so a large mean does not
/// cancel away the variance. Implementations are SIMD (AVX2/FMA when built with `-Xcc -march=x86-64-v3`).
///
/// All pointers address `count` contiguous elements; `count` may be 0.
public protocol NormalizationScalar: BinaryFloatingPoint, SIMDScalar, Codable, Sendable {
    /// Count, mean and centred sum of squares of `count` values that fit in cache: one pass shifted by an
    /// early value's neighbourhood, kept when the shift turns out within a standard deviation of the mean;
    /// otherwise the corrected second pass of Chan, Golub & LeVeque around the mean found (mean = c + Σ(x-c)/n,
    /// M2 = Σ(x-c)² - (Σ(x-c))²/n), which repairs the centre's rounding. A constant run gives exactly its value
    /// and M2 = 0. NaN or infinity in the input gives a non-finite mean or M2.
    static func _chunkMoments(_ x: UnsafePointer<Self>, count: Int) -> Moments

    /// `_chunkMoments` of `planes` consecutive planes of `spatial` values each, into mean[i] and m2[i] (the same
    /// numbers; Float shares the work around the loop between eight planes of 16, 24 or 32 values, and between
    /// pairs of other planes of one block).
    static func _planeMoments(_ x: UnsafePointer<Self>, planes: Int, spatial: Int,
                              mean: UnsafeMutablePointer<Double>, m2: UnsafeMutablePointer<Double>)

    /// y[i] = scale · (x[i] - centre) + offset. `y` may alias `x`.
    static func _scaleShift(
        _ x: UnsafePointer<Self>, _ y: UnsafeMutablePointer<Self>, count: Int,
        centre: Double, scale: Double, offset: Double)

    /// `_scaleShift` of `planes` consecutive planes of `spatial` values each, plane i with centres[i], scales[i]
    /// and offsets[i] (the same numbers; Float rounds four planes' constants at once for planes of 16, 24 or 32
    /// values). `y` may alias `x`.
    static func _scaleShiftPlanes(
        _ x: UnsafePointer<Self>, _ y: UnsafeMutablePointer<Self>, planes: Int, spatial: Int,
        centres: UnsafePointer<Double>, scales: UnsafePointer<Double>, offsets: UnsafePointer<Double>)

    /// `_combine` of `planes` consecutive planes of `spatial` values each, plane i with centres[i], dy's mean
    /// dySums[i] / spatial, p[i], q[i] and r[i] (the same numbers, as `_scaleShiftPlanes`). `dx` may alias `dy`.
    static func _combinePlanes(
        _ dy: UnsafePointer<Self>, _ x: UnsafePointer<Self>, _ dx: UnsafeMutablePointer<Self>, planes: Int,
        spatial: Int, centres: UnsafePointer<Double>, dySums: UnsafePointer<Double>, p: UnsafePointer<Double>,
        q: UnsafePointer<Double>, r: UnsafePointer<Double>)

    /// (Σ dy[i], Σ (dy[i] - dyShift) · (x[i] - centre)), accumulated in Float64.
    ///
    /// With `centre` the values' mean, the dot is Σ dy (x - centre) whatever the shift, as the backward's algebra
    /// takes it; but its terms, and so its rounding, are of the size of dy's spread, not of dy: a gradient 1000
    /// times its spread off 0 lost 1700 ulps of a channel-norm weight's gradient in Float32 lanes without the
    /// shift (`_earlyMean` of dy gives one). Nor does the dot carry the rounding of the centre times Σ dy.
    static func _gradientSums(
        _ dy: UnsafePointer<Self>, _ x: UnsafePointer<Self>, count: Int, centre: Double, dyShift: Self
    ) -> (sum: Double, dot: Double)

    /// `_gradientSums` of `planes` consecutive planes of `spatial` values each (of dy and x), around
    /// centres[i] and each plane's `_earlyMean` of dy, into sums[i] and dots[i] (the same numbers; Float shares
    /// the work around the loop between eight planes of 16, 24 or 32 values).
    static func _planeGradientSums(
        _ dy: UnsafePointer<Self>, _ x: UnsafePointer<Self>, planes: Int, spatial: Int,
        centres: UnsafePointer<Double>, sums: UnsafeMutablePointer<Double>, dots: UnsafeMutablePointer<Double>)

    /// Four values from `p + i`, widened to Float64 (the row path's maps compute in Float64).
    static func _load4Wide(_ p: UnsafePointer<Self>, _ i: Int) -> SIMD4<Double>

    /// Whether all `count` values equal `value` (-0 equals 0; NaN equals nothing), compared a few vectors a step
    /// (a scalar loop with an early exit at each value took eleven instructions a value).
    static func _allEqual(_ x: UnsafePointer<Self>, count: Int, to value: Self) -> Bool

    /// `_earlyMean` of eight values: their mean m if |m| exceeds twice their mean distance from the first, else 0,
    /// both in one vector reduction (`SIMD.sum()` reduces lane by lane, and a generic min and max cost 146
    /// instructions a shift: on [256, 1024] rows, a shift a group, a quarter of the backward).
    static func _shift(_ v: SIMD8<Self>) -> Self

    /// Whether `count` maps, map i about centres[i] (and dy about dyCentres[i], or a value at least as large) with
    /// offsets[i] and slopes (`_scaleShift`'s scale; `_combine`'s q and p), keep their precision with their
    /// constants rounded to Self: always for Double, by `MapRange` for Float. The layouts that round constants
    /// themselves (channels-last) ask it.
    static func _mapKeeps(count: Int, centres: UnsafePointer<Double>, dyCentres: UnsafePointer<Double>?,
                          offsets: UnsafePointer<Double>, slopes s1: UnsafePointer<Double>,
                          _ s2: UnsafePointer<Double>?) -> Bool

    /// Stores four Float64 values to `p + i`, each rounded once to `Self`.
    static func _store4Narrow(_ v: SIMD4<Double>, _ p: UnsafeMutablePointer<Self>, _ i: Int)

    /// dx[i] = p · dy[i] + q · (x[i] - centre) + r. `dx` may alias `dy`. `dyMean`, dy's mean (or any value near
    /// it), is where Float32 lanes centre dy, as they centre x at `centre` (`CentreResidue`): p dy + r then
    /// cancel to the size of dy's spread, not of dy (a gradient 1000 times its spread off 0 lost 400 ulps of dx).
    /// Double ignores it.
    static func _combine(
        _ dy: UnsafePointer<Self>, _ x: UnsafePointer<Self>, _ dx: UnsafeMutablePointer<Self>, count: Int,
        centre: Double, dyMean: Double, p: Double, q: Double, r: Double)

    /// y[r, c] = offset[c] + scale[c] · (x[r, c] - centre[c]) over `rows` rows (`stride` apart) of `columns`
    /// columns, in the lanes of Self: rows of channels-last data against their channels' constants, which each
    /// lane loads once for all the rows. `y` may alias `x`.
    static func _mapColumns(
        _ x: UnsafePointer<Self>, _ y: UnsafeMutablePointer<Self>, rows: Int, columns: Int, stride: Int,
        centre: UnsafePointer<Self>, scale: UnsafePointer<Self>, offset: UnsafePointer<Self>)

    /// Column sums of a block of `rows` rows (`stride` apart) and `columns` columns: for each column c,
    /// sums[c] += Σ (x - centre[c]) and, when `squares` is given, squares[c] += Σ (x - centre[c])² (no centre: 0).
    /// Float accumulates 8 rows at a time in Float32 lanes, then in Float64; Double in Float64 throughout.
    /// A block of 8 rows is read a strip of columns at a time down its rows, with the strip's sums in registers;
    /// with `partials` (2·columns values) row by row in order, with the block's sums there. Both give the same
    /// bits; the second is for reads the hardware prefetcher does not follow in the first order (input from
    /// memory, or the gradient sums' two inputs of wide rows: `ChannelsLastLayout`).
    static func _columnSums(
        _ x: UnsafePointer<Self>, rows: Int, columns: Int, stride: Int, centre: UnsafePointer<Self>?,
        sums: UnsafeMutablePointer<Double>, squares: UnsafeMutablePointer<Double>?,
        partials: UnsafeMutablePointer<Self>?)

    /// Column gradient sums about the shifts dyShift[c] (as `_gradientSums`' shift): sums[c] += Σ (dy - dyShift[c])
    /// (Σ dy less rows · shift) and dots[c] += Σ (dy - dyShift[c]) (x - centre[c]), accumulated as `_columnSums`
    /// (`partials` as there).
    static func _columnGradientSums(
        _ dy: UnsafePointer<Self>, _ x: UnsafePointer<Self>, rows: Int, columns: Int, stride: Int,
        centre: UnsafePointer<Self>, dyShift: UnsafePointer<Self>, sums: UnsafeMutablePointer<Double>,
        dots: UnsafeMutablePointer<Double>, partials: UnsafeMutablePointer<Self>?)

    /// dx[r, c] = r[c] + q[c] · (x[r, c] - centre[c]) + p[c] · (dy[r, c] - dyCentre[c]) over `rows` rows
    /// (`stride` apart) of `columns` columns, row by row, with constants the caller rounded to Self (folding the
    /// centres' residues into r, as `_combine` does). `dx` may alias `dy`.
    static func _combineColumns(
        _ dy: UnsafePointer<Self>, _ x: UnsafePointer<Self>, _ dx: UnsafeMutablePointer<Self>, rows: Int,
        columns: Int, stride: Int, centre: UnsafePointer<Self>, dyCentre: UnsafePointer<Self>,
        p: UnsafePointer<Self>, q: UnsafePointer<Self>, r: UnsafePointer<Self>)
}

extension NormalizationScalar {
    @inlinable
    public static func _planeMoments(_ x: UnsafePointer<Self>, planes: Int, spatial s: Int,
                                     mean: UnsafeMutablePointer<Double>, m2: UnsafeMutablePointer<Double>) {
        for i in 0..<planes {
            let m = _chunkMoments(x + i * s, count: s)
            mean[i] = m.mean; m2[i] = m.m2
        }
    }

    @inlinable
    public static func _scaleShiftPlanes(
        _ x: UnsafePointer<Self>, _ y: UnsafeMutablePointer<Self>, planes: Int, spatial s: Int,
        centres: UnsafePointer<Double>, scales: UnsafePointer<Double>, offsets: UnsafePointer<Double>
    ) {
        for i in 0..<planes {
            _scaleShift(x + i * s, y + i * s, count: s, centre: centres[i], scale: scales[i], offset: offsets[i])
        }
    }

    @inlinable
    public static func _combinePlanes(
        _ dy: UnsafePointer<Self>, _ x: UnsafePointer<Self>, _ dx: UnsafeMutablePointer<Self>, planes: Int,
        spatial s: Int, centres: UnsafePointer<Double>, dySums: UnsafePointer<Double>, p: UnsafePointer<Double>,
        q: UnsafePointer<Double>, r: UnsafePointer<Double>
    ) {
        for i in 0..<planes {
            _combine(dy + i * s, x + i * s, dx + i * s, count: s, centre: centres[i], dyMean: dySums[i] / Double(s),
                     p: p[i], q: q[i], r: r[i])
        }
    }

    @inlinable
    public static func _planeGradientSums(
        _ dy: UnsafePointer<Self>, _ x: UnsafePointer<Self>, planes: Int, spatial s: Int,
        centres: UnsafePointer<Double>, sums: UnsafeMutablePointer<Double>, dots: UnsafeMutablePointer<Double>
    ) {
        for i in 0..<planes {
            (sums[i], dots[i]) = _gradientSums(dy + i * s, x + i * s, count: s, centre: centres[i],
                                               dyShift: _earlyMean(dy + i * s, count: s))
        }
    }

    /// A shift for sums of dy (`_gradientSums`' dyShift): the mean m of the first min(8, count) values when it
    /// lies further from 0 than twice their mean distance d from the first, else 0. A shift helps dy far off 0
    /// against its spread; but one drawn from a few values misses the mean by about σ/√8, and in dy near 0 (or
    /// sparse: a max-pool's or ReLU's backward, which it would move off 0) the sums of dy - s then drifted by that
    /// within each Float32 block: a bias gradient 4 to 30 ulps off where it was within 1.
    /// With no shift those sums are what they were. Each value is scaled by 1/min(8, count) before adding, so that
    /// the sum cannot overflow; NaN or infinity gives 0. Eight values in one vector (`_shift`), inline: out of
    /// line, its call cost a plane 38 instructions where `_shift` takes 20.
    @inlinable @inline(__always)
    public static func _earlyMean(_ v: UnsafePointer<Self>, count: Int) -> Self {
        if count >= 8 { return _shift(UnsafeRawPointer(v).loadUnaligned(as: SIMD8<Self>.self)) }
        guard count > 0 else { return 0 }
        let scale = 1 / Self(count)
        var m: Self = 0, d: Self = 0
        for i in 0..<count { let value = v[i]; m += value * scale; d += (value - v[0]).magnitude * scale }
        return _shift(mean: m, distance: d)
    }

    /// `_earlyMean`'s rule, for a few values' mean m and mean distance d from the first: m if |m| > 2 d, else 0
    /// (NaN gives 0).
    @inlinable @inline(__always)
    public static func _shift(mean m: Self, distance d: Self) -> Self { m.magnitude > 2 * d ? m : 0 }

    /// The index of the first NaN or infinity among `count` values, or nil: blocks are screened by Σ 0·x in
    /// Float64 (NaN for any non-finite term), and only a failing block is searched.
    static func _firstNonFinite(_ x: UnsafePointer<Self>, count: Int) -> Int? {
        var start = 0
        while start < count {
            let end = Swift.min(count, start + 1024)
            var screen = SIMD4<Double>(), i = start
            while i + 4 <= end { screen.addProduct(_load4Wide(x, i), SIMD4(repeating: 0)); i += 4 }
            var tail = 0.0
            while i < end { tail += 0 * Double(x[i]); i += 1 }
            if !(screen.sum() + tail).isFinite {
                return (start..<end).first { !Double(x[$0]).isFinite }
            }
            start = end
        }
        return nil
    }
}
