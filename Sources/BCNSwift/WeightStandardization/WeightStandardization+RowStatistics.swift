extension WeightStandardization {
    /// Count, mean, M2 and denominator of one output channel, and whether the SIMD kernels keep their precision
    /// on it (`fits`, `gradientFits`); rows they would not take `ScaledRow`.
    @usableFromInline
    struct RowStatistics {
        var count: Double, mean: Double, m2: Double, std: Double, den: Double

        /// Float32 lanes form w - mean (at most √M2) and take 1/den in Float32: both must be normal there.
        /// Float64 lanes need M2 in [2^-600, 2^600], so that den³ and Σ g (w - mean) stay finite and M2 (and the
        /// mean's rounding below) keep their bits; and a spread of at least 2^-13 of |mean|, so that the mean's
        /// rounding to Float64 stays below 2^-40 of w - mean. (A Float row's spread is at least an ulp of Float32,
        /// 2^29 times that rounding.) A constant row (M2 = 0, every value its mean) fits with den at least 2^-300.
        func fits<T: NormalizationScalar>(_ row: UnsafePointer<T>) -> Bool {
            if T.self == Float.self { return m2 <= 0x1p250 && den >= 0x1p-126 && den <= 0x1p126 }
            // M2 = 0 for a constant row, or from values so close that their squares underflowed
            if m2 == 0 { return den >= 0x1p-300 && T._allEqual(row, count: Int(count), to: row[0]) }
            return m2 >= 0x1p-600 && m2 <= 0x1p600 && m2 >= count * mean * mean * 0x1p-26
        }

        /// Whether the backward's sums and constants (`_combine`'s q and r) keep their precision in the lanes of
        /// T: finite; Σ g (w - mean) (summed as Σ (g - s)(w - mean), s near g's mean: `_gradientSums`) at least
        /// 2^-100 (Float32 lanes) or 2^-960 (Float64) a value, so that the products it sums did not underflow,
        /// unless it is 0 because the row is constant or g is (each term is then 0); q normal in
        /// the lanes' type (with a margin of 2^22 in Float64); r within Float32's range in Float32 lanes.
        func gradientFits<T: NormalizationScalar>(_ g: UnsafePointer<T>, sum: Double, dot: Double, q: Double,
                                                  r: Double) -> Bool {
            guard sum.isFinite, dot.isFinite, q.isFinite, r.isFinite else { return false }
            let float = T.self == Float.self
            guard !float || r.magnitude <= 0x1p126 else { return false }
            if dot == 0 { return m2 == 0 || T._allEqual(g, count: Int(count), to: g[0]) }
            let (floor, qMin, qMax) = float ? (0x1p-100, 0x1p-126, 0x1p126) : (0x1p-960, 0x1p-1000, Double.infinity)
            return dot.magnitude >= count * floor && q.magnitude >= qMin && q.magnitude <= qMax
        }
    }

    static func rowStatistics<T: NormalizationScalar>(
        _ w: UnsafePointer<T>, fanIn: Int, options: WeightStandardizationOptions
    ) -> RowStatistics {
        var m = Moments()
        var start = 0
        while start < fanIn {
            m.merge(T._chunkMoments(w + start, count: min(planeChunkLength, fanIn - start)))
            start += planeChunkLength
        }
        let variance = m.m2 / (m.count - (options.unbiased ? 1 : 0))
        let std = variance.squareRoot()
        let den = options.epsInsideSquareRoot ? (variance + options.eps).squareRoot() : std + options.eps
        return RowStatistics(count: m.count, mean: m.mean, m2: m.m2, std: std, den: den)
    }
}
