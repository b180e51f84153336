extension WeightStandardization {
    /// dw of one output channel of two weights (a fan-in of 2), in closed form.
    ///
    /// Its ŵ are ±h/den with h = (w₀ - w₁)/2, ±1 but for eps, so dw exists only through eps: the general formula
    /// makes it a cancellation of terms about 1/eps times larger (float32 dw 7e2-3e3 ulps of its largest
    /// magnitude off at eps 1e-5, float64 as many of its own). With ν = 2 - ddof, std = |h|·√(2/ν) and
    /// gh = (dŵ₀ - dŵ₁)/2, both ddof alike:
    ///   dw₀ = -dw₁ = eps · gh / den³   (labml: den = √(std² + eps)),
    ///   dw₀ = -dw₁ = eps · gh / den²   (the authors': den = std + eps).
    /// h and gh are halves taken before the difference (exact but for subnormals), and eps is divided by den one
    /// factor at a time, so nothing overflows unless dw does; a constant row gives gh/√eps and gh/eps, the
    /// general formula's limit. Returns false, writing nothing, for a row or dŵ holding NaN or an infinity, which
    /// the general path passes on.
    static func pairGradient<T: NormalizationScalar>(_ w: UnsafePointer<T>, _ g: UnsafePointer<T>,
                                                     into dw: UnsafeMutablePointer<T>,
                                                     options: WeightStandardizationOptions) -> Bool {
        let h = Double(w[0]) / 2 - Double(w[1]) / 2, gh = Double(g[0]) / 2 - Double(g[1]) / 2
        guard h.isFinite, gh.isFinite else { return false }
        let eps = options.eps
        let std = h.magnitude * (options.unbiased ? 2.0.squareRoot() : 1)
        let dw0: Double
        if options.epsInsideSquareRoot {
            // (std² overflows from about 1e154: there eps / std² is below 2^-1000 of 1, and √(1 + it) is 1)
            let den = std > 0x1p500 ? std * (1 + eps / std / std).squareRoot() : (std * std + eps).squareRoot()
            dw0 = eps / den / den / den * gh
        } else {
            let den = std + eps
            dw0 = eps / den / den * gh
        }
        dw[0] = T(dw0)
        dw[1] = T(-dw0)
        return true
    }
}
