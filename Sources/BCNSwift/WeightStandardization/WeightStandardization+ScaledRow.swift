extension WeightStandardization {
    /// One output channel outside `RowStatistics.fits` (or whose gradient's sums or constants are outside
    /// `gradientFits`), computed in scalar Float64 on w' = s·w, where s is the power of two that puts the largest
    /// |w| in [1/2, 1) (a constant row keeps s = 1): Float64 weights around 1e90 and beyond, whose M2 or den³ would
    /// overflow, tiny weights or constant rows whose den is below 2^-300 (eps below about 1e-180), where 1/den and
    /// den³ would lose their precision, rows spread over a few ulps of their mean, and Float32 rows whose 1/den,
    /// w - mean or gradient constants leave Float32's normal range. The mean is kept as two Float64s (`centre`,
    /// `centreLow`), so w' - mean rounds once, relative to itself.
    ///
    /// ŵ is scale-free: ŵ = (w' - mean') / den' with den' = s·den, which is √(var' + s²·eps) (labml) or
    /// √var' + s·eps (the authors'). When s²·eps (s·eps) overflows, the variance is negligible beside eps and
    /// den' = √eps·s (eps·s); it is held as den.a · den.b, each finite, and divided by one factor at a time.
    /// The gradient, with ν = n - ddof and c = Σ g ŵ / ν:
    ///   dw = ((g - mean(g)) - c·ŵ) / den          (labml, eps inside the root),
    ///   dw = ((g - mean(g)) - c·z) / den,  z = (w' - mean') / √var'  (0 for a constant row; the authors').
    /// Nothing here overflows unless the result does.
    struct ScaledRow<T: NormalizationScalar> {
        let w: UnsafePointer<T>
        let count: Int
        let scale: Double
        let centre: Double, centreLow: Double
        /// den' = den.a · den.b, den.b either 1 or `scale`.
        let den: (a: Double, b: Double)
        /// 1 / √var' (0 for a constant row).
        let inverseDeviation: Double
        let nu: Double

        /// nil when the row holds NaN or an infinity, which the SIMD path passes on as it does for any row.
        init?(_ w: UnsafePointer<T>, count n: Int, options: WeightStandardizationOptions) {
            var largest = 0.0, constant = true
            let first = Double(w[0])
            for i in 0..<n {
                let v = Double(w[i])
                guard v.isFinite else { return nil }
                largest = Swift.max(largest, v.magnitude)
                constant = constant && v == first
            }
            self.w = w
            self.count = n
            nu = Double(n) - (options.unbiased ? 1 : 0)
            var m2 = 0.0
            if constant {  // (a row of zeros too)
                scale = 1
                centre = first
                centreLow = 0
            } else {
                scale = Double(sign: .plus, exponent: Swift.min(Swift.max(-largest.exponent - 1, -1024), 1000),
                               significand: 1)
                var sum = 0.0
                for i in 0..<n { sum += Double(w[i]) * scale }
                let c = sum / Double(n)
                var d = 0.0
                for i in 0..<n {
                    let e = Double(w[i]) * scale - c
                    d += e; m2 += e * e
                }
                m2 = Swift.max(m2 - d * d / Double(n), 0)
                centre = c
                centreLow = d / Double(n)
            }
            let variance = m2 / nu
            inverseDeviation = variance > 0 ? 1 / variance.squareRoot() : 0
            if options.epsInsideSquareRoot {
                let t = options.eps * scale * scale
                den = t.isFinite ? ((variance + t).squareRoot(), 1) : (options.eps.squareRoot(), scale)
            } else {
                let t = options.eps * scale
                den = t.isFinite ? (variance.squareRoot() + t, 1) : (options.eps, scale)
            }
        }

        @inline(__always)
        func centred(_ i: Int) -> Double { (Double(w[i]) * scale - centre) - centreLow }

        @inline(__always)
        func standardized(_ i: Int) -> Double { centred(i) / den.a / den.b }

        /// x / den, where den = den.a · den.b / s: x / den.a then times s, unless that quotient over- or
        /// underflows where the result need not (then x · s first).
        @inline(__always)
        func dividedByDen(_ x: Double) -> Double {
            let quotient = x / den.a
            guard den.b == 1 else { return quotient }
            if quotient.isFinite && (quotient.magnitude >= 0x1p-1000 || x == 0) { return quotient * scale }
            return x * scale / den.a
        }

        /// ŵ into `out` (which may be the row itself).
        func standardize(into out: UnsafeMutablePointer<T>) {
            for i in 0..<count { out[i] = T(standardized(i)) }
        }

        /// dw from dŵ = `g` into `out` (which may be `g`). dw is linear in g: a g whose sums could overflow (Σ g
        /// has n terms, Σ g ŵ n terms of |ŵ| < √n) is taken as t·g, t the power of two that puts its largest
        /// |g| in [1/2, 1), and each result divided by t last, so that it overflows only where the exact value
        /// does. (Double g from about 2^1000 / n^1.5; any other g runs with t = 1, bit for bit as before.)
        func gradient(_ g: UnsafePointer<T>, into out: UnsafeMutablePointer<T>, epsInsideSquareRoot: Bool) {
            var largest = 0.0
            for i in 0..<count { largest = Swift.max(largest, Double(g[i]).magnitude) }
            let n = Double(count)
            let t = largest.isFinite && largest > 0x1p1000 / (n * n.squareRoot() + n)
                ? Double(sign: .plus, exponent: -largest.exponent - 1, significand: 1) : 1
            var sum = 0.0, dot = 0.0
            for i in 0..<count {
                let gi = Double(g[i]) * t
                sum += gi; dot += gi * standardized(i)
            }
            let mean = sum / n, c = dot / nu
            for i in 0..<count {
                let v = epsInsideSquareRoot ? standardized(i) : centred(i) * inverseDeviation
                out[i] = T(dividedByDen((Double(g[i]) * t - mean) - c * v) / t)
            }
        }
    }
}
