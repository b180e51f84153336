extension WeightStandardization {
    /// dw of one output channel of two weights (a fan-in of 2), in closed form.
    ///
    /// Its ŵ are ±h/den with h = (w₀ - w₁)/2, ±1 but for eps, so dw exists only through eps: the general formula
    /// makes it a cancellation of terms about 1/eps times larger (float32 dw 7e2-3e3 ulps of its largest
    /// magnitude off at eps 1e-5, float64 as many of its own). With ν = 2 - ddof, std = |h|·√(2/ν) and
    /// gh = (dŵ₀ - dŵ₁)/2, both ddof alike:
    ///   dw₀ = -dw₁ = eps · gh / den³   (labml: den = √(std² + eps)),
    ///   dw₀ = -dw₁ = eps · gh / den²   (the authors': den = std + eps).
    /// A constant row gives gh/√eps and gh/eps, the general formula's limit.
    ///
    /// Computed on significands, so that no step over- or underflows where dw does not: with 2^E near den (the
    /// larger of |h| and √eps, or eps, in powers of two), den' = den / 2^E lies near 1 (h and eps scaled
    /// exactly, a part far below the other dropped), and dw = (sig(eps) · sig(gh) / den'ᵏ) · 2^(exp(eps) +
    /// exp(gh) - k·E), k = 3 or 2, rounded once at the end. The differences are taken whole (exact where they
    /// are subnormal, which halving first would round) and halved in the exponent; values whose difference
    /// overflows are halved first, which is exact for them. Returns false, writing nothing, for a row or dŵ
    /// holding NaN or an infinity, which the general path passes on.
    static func pairGradient<T: NormalizationScalar>(_ w: UnsafePointer<T>, _ g: UnsafePointer<T>,
                                                     into dw: UnsafeMutablePointer<T>,
                                                     options: WeightStandardizationOptions) -> Bool {
        // (a - b)/2 as v·2^shift
        @inline(__always) func halfDifference(_ a: Double, _ b: Double) -> (v: Double, shift: Int) {
            let d = a - b
            return d.isFinite ? (d, -1) : (a / 2 - b / 2, 0)
        }
        let (hv, hs) = halfDifference(Double(w[0]), Double(w[1])), (gv, gs) = halfDifference(Double(g[0]), Double(g[1]))
        guard hv.isFinite, gv.isFinite else { return false }
        guard gv != 0 else {
            dw[0] = 0; dw[1] = 0
            return true
        }
        let eps = options.eps, inside = options.epsInsideSquareRoot
        @inline(__always) func scaled(_ v: Double, by p: Int) -> Double {
            v == 0 ? 0 : Double(sign: .plus, exponent: v.exponent + p, significand: v.significand)
        }
        // (√eps's exponent, rounded down, for the root's scale)
        let epsScale = inside ? eps.exponent >> 1 : eps.exponent
        let E = hv == 0 ? epsScale : max(hv.exponent + hs, epsScale)
        let std = scaled(hv.magnitude, by: hs - E) * (options.unbiased ? 2.0.squareRoot() : 1)
        let k = inside ? 3 : 2
        let den = inside ? (std * std + scaled(eps, by: -2 * E)).squareRoot() : std + scaled(eps, by: -E)
        var t = eps.significand * gv.significand / den / den  // (a significand is never negative)
        if inside { t /= den }
        let dw0 = Double(sign: gv.sign, exponent: eps.exponent + gv.exponent + gs - k * E, significand: t)
        dw[0] = T(dw0)
        dw[1] = T(-dw0)
        return true
    }
}
