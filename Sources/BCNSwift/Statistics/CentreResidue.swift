/// What a centre loses when it is rounded to Float, and where the kernels put it back.
///
/// Float32 lanes work about cf = Float(c), not about the Float64 centre c: x - cf is exact for x near the centre.
/// The residue c - cf, which Float cannot hold, is accounted for once per plane, in Float64:
/// - a map y = a + s (x - c) runs as a' + s (x - cf) with the offset a' = a - s (c - cf) (`_scaleShift`; the
///   backward's `_combine` with q for s and r for a; the channels-last maps);
/// - gradient sums take Σdy (x - c) = Σdy (x - cf) - (c - cf) Σdy (`_gradientSums`).
/// So a mean of 100 with a spread of 0.01 loses nothing to rounding the centre. In Double lanes cf = c and the
/// residue is 0.
@usableFromInline
enum CentreResidue {
    /// a - s (c - cf): the offset of a map of slope s about cf instead of c.
    @inlinable @inline(__always)
    static func offset(_ a: Double, slope s: Double, centre c: Double, rounded cf: Double) -> Double {
        a - s * (c - cf)
    }

    /// `offset`, lane by lane.
    @inlinable @inline(__always)
    static func offset(_ a: SIMD4<Double>, slope s: SIMD4<Double>, centre c: SIMD4<Double>,
                       rounded cf: SIMD4<Double>) -> SIMD4<Double> {
        a - s * (c - cf)
    }

    /// Σdy (x - c) from d = Σdy (x - cf) and t = Σdy.
    @inlinable @inline(__always)
    static func dot(_ d: Double, sum t: Double, centre c: Double, rounded cf: Double) -> Double { d - (c - cf) * t }

    /// `dot`, lane by lane.
    @inlinable @inline(__always)
    static func dot(_ d: SIMD4<Double>, sum t: SIMD4<Double>, centre c: SIMD4<Double>,
                    rounded cf: SIMD4<Double>) -> SIMD4<Double> {
        d - (c - cf) * t
    }
}
