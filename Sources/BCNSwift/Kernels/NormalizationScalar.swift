/// A floating-point element type bcnswift computes on: `Float` and `Double`.
///
/// The requirements are the only loops that touch tensor elements. Every reduction accumulates in `Double`
/// whatever `Self` is, in centred form: sums of `(x - centre)` never `E[x²] - E[x]²`, so a large mean does not
/// cancel away the variance. Implementations are SIMD (AVX2/FMA when built with `-Xcc -march=x86-64-v3`).
///
/// All pointers address `count` contiguous elements; `count` may be 0.
public protocol NormalizationScalar: BinaryFloatingPoint, SIMDScalar, Codable, Sendable {
    /// Count, mean and centred sum of squares of `count` values that fit in cache: a first pass for an
    /// approximate centre, then the corrected second pass of Chan, Golub & LeVeque (mean = c + Σ(x-c)/n,
    /// M2 = Σ(x-c)² - (Σ(x-c))²/n), which repairs the centre's rounding: a constant run gives exactly its value
    /// and M2 = 0. NaN or infinity in the input gives a non-finite mean or M2.
    static func _chunkMoments(_ x: UnsafePointer<Self>, count: Int) -> Moments

    /// y[i] = scale · (x[i] - centre) + offset. `y` may alias `x`.
    static func _scaleShift(
        _ x: UnsafePointer<Self>, _ y: UnsafeMutablePointer<Self>, count: Int,
        centre: Double, scale: Double, offset: Double)

    /// (Σ dy[i], Σ dy[i] · (x[i] - centre)), accumulated in Float64.
    static func _gradientSums(
        _ dy: UnsafePointer<Self>, _ x: UnsafePointer<Self>, count: Int, centre: Double
    ) -> (sum: Double, dot: Double)

    /// Four values from `p + i`, widened to Float64 (the row path's maps compute in Float64).
    static func _load4Wide(_ p: UnsafePointer<Self>, _ i: Int) -> SIMD4<Double>

    /// Stores four Float64 values to `p + i`, each rounded once to `Self`.
    static func _store4Narrow(_ v: SIMD4<Double>, _ p: UnsafeMutablePointer<Self>, _ i: Int)

    /// dx[i] = p · dy[i] + q · (x[i] - centre) + r. `dx` may alias `dy`.
    static func _combine(
        _ dy: UnsafePointer<Self>, _ x: UnsafePointer<Self>, _ dx: UnsafeMutablePointer<Self>, count: Int,
        centre: Double, p: Double, q: Double, r: Double)
}
