/// A floating-point element type bcnswift computes on: `Float` and `Double`.
///
/// The requirements are the only loops that touch tensor elements. Every reduction accumulates in `Double`
/// whatever `Self` is, in centred form: sums of `(x - centre)` never `E[x²] - E[x]²`, so a large mean does not
/// cancel away the variance. Implementations are SIMD (AVX2/FMA when built with `-Xcc -march=x86-64-v3`).
///
/// All pointers address `count` contiguous elements; `count` may be 0.
public protocol NormalizationScalar: BinaryFloatingPoint, SIMDScalar, Codable, Sendable {
    /// Σ x[i], accumulated in Float64.
    static func _sum(_ x: UnsafePointer<Self>, count: Int) -> Double

    /// (Σ (x[i] - centre), Σ (x[i] - centre)²), accumulated in Float64: the second pass of the corrected
    /// two-pass algorithm, whose first sum repairs the rounding of `centre`.
    static func _centredSums(_ x: UnsafePointer<Self>, count: Int, centre: Double) -> (sum: Double, squares: Double)

    /// y[i] = scale · (x[i] - centre) + offset. `y` may alias `x`.
    static func _scaleShift(
        _ x: UnsafePointer<Self>, _ y: UnsafeMutablePointer<Self>, count: Int,
        centre: Double, scale: Double, offset: Double)

    /// (Σ dy[i], Σ dy[i] · (x[i] - centre)), accumulated in Float64.
    static func _gradientSums(
        _ dy: UnsafePointer<Self>, _ x: UnsafePointer<Self>, count: Int, centre: Double
    ) -> (sum: Double, dot: Double)

    /// dx[i] = p · dy[i] + q · (x[i] - centre) + r. `dx` may alias `dy`.
    static func _combine(
        _ dy: UnsafePointer<Self>, _ x: UnsafePointer<Self>, _ dx: UnsafeMutablePointer<Self>, count: Int,
        centre: Double, p: Double, q: Double, r: Double)
}
