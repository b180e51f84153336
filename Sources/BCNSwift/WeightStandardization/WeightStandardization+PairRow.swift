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
    /// exp(gh) - k·E), k = 3 or 2, rounded once at the end. h and gh are halves taken before the difference.
    /// Returns false, writing nothing, for a row or dŵ holding NaN or an infinity, which the general path passes on.
    static func pairGradient<T: NormalizationScalar>(_ w: UnsafePointer<T>, _ g: UnsafePointer<T>,
                                                     into dw: UnsafeMutablePointer<T>,
                                                     options: WeightStandardizationOptions) -> Bool {
        let h = (Double(w[0]) / 2 - Double(w[1]) / 2).magnitude, gh = Double(g[0]) / 2 - Double(g[1]) / 2
        guard h.isFinite, gh.isFinite else { return false }
        guard gh != 0 else {
            dw[0] = 0; dw[1] = 0
            return true
        }
        let eps = options.eps, inside = options.epsInsideSquareRoot
        @inline(__always) func scaled(_ v: Double, by p: Int) -> Double {
            v == 0 ? 0 : Double(sign: .plus, exponent: v.exponent + p, significand: v.significand)
        }
        // (√eps's exponent, rounded down, for the root's scale)
        let epsScale = inside ? eps.exponent >> 1 : eps.exponent
        let E = h == 0 ? epsScale : max(h.exponent, epsScale)
        let std = scaled(h, by: -E) * (options.unbiased ? 2.0.squareRoot() : 1)
        let k = inside ? 3 : 2
        let den = inside ? (std * std + scaled(eps, by: -2 * E)).squareRoot() : std + scaled(eps, by: -E)
        var t = eps.significand * gh.significand / den / den  // (a significand is never negative)
        if inside { t /= den }
        let dw0 = Double(sign: gh.sign, exponent: eps.exponent + gh.exponent - k * E, significand: t)
        dw[0] = T(dw0)
        dw[1] = T(-dw0)
        return true
    }
}
