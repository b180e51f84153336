/// When one-pass sums around a shift may stand: the rule every moments kernel and stage applies.
///
/// Sums d = Σ(x - k) and q = Σ(x - k)² of n values around a shift k give M2 = q - d²/n in one pass. Its rounding is
/// that of q's terms, magnified by q/M2, so the pass is kept when k lay within about a standard deviation of the
/// mean: M2 ≥ q/2, i.e. d²/n at most half of q (at most twice q's relative rounding). Otherwise the caller runs
/// the corrected two-pass algorithm around the mean found (Chan, Golub & LeVeque). NaN fails.
///
/// Callers add guards of their own beside it, each about their arithmetic, not the rule: q finite (sums in
/// Float32 lanes, whose squares may overflow while d stays finite), Float32's comfortable range of q/n, and the
/// Float32 lanes' error bound (`RowRounding.accepts`).
@usableFromInline
enum ShiftRule {
    /// Whether the one-pass M2 (`m2` = q - d²/n) stands beside q = `squares`.
    @inlinable @inline(__always)
    static func keeps(m2: Double, squares q: Double) -> Bool { m2 >= 0.5 * q }

    /// `keeps`, lane by lane.
    @inlinable @inline(__always)
    static func keeps(m2: SIMD4<Double>, squares q: SIMD4<Double>) -> SIMDMask<SIMD4<Int64>> { m2 .>= 0.5 * q }
}
