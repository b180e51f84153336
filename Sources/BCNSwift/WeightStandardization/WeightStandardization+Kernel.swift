/// Options of Weight Standardization. With n the fan-in and var = M2 / (n - ddof), ddof = 1 when `unbiased`:
/// - `epsInsideSquareRoot` (labml): ŵ = (w - mean) / √(var + eps);
/// - otherwise (the authors' convolution): ŵ = (w - mean) / (√var + eps).
public struct WeightStandardizationOptions: Equatable, Sendable {
    /// > 0; keeps a constant filter finite.
    public var eps: Double
    /// Divide M2 by n - 1 (torch.var/std default) rather than n (TensorFlow).
    public var unbiased: Bool
    public var epsInsideSquareRoot: Bool

    public init(eps: Double = 1e-5, unbiased: Bool = true, epsInsideSquareRoot: Bool = true) {
        self.eps = eps
        self.unbiased = unbiased
        self.epsInsideSquareRoot = epsInsideSquareRoot
    }

    public func validate(outChannels: Int, fanIn: Int) throws(BCNError) {
        guard eps > 0, eps.isFinite else {
            throw BCNError(.invalidArgument, "eps must be a positive finite number, got \(eps)")
        }
        guard outChannels > 0, fanIn > 0 else {
            throw BCNError(.shapeMismatch,
                           "weight must have positive output channels and fan-in, got \(outChannels) x \(fanIn)")
        }
        guard !outChannels.multipliedReportingOverflow(by: fanIn).overflow,
              outChannels * fanIn <= Int.max / 16 else {
            throw BCNError(.invalidArgument, "weight of \(outChannels) x \(fanIn) elements is too large")
        }
        if unbiased && fanIn == 1 {
            throw BCNError(.degenerateStatistics,
                           "an unbiased standard deviation needs a fan-in of at least 2, got 1 (pass unbiased=False)")
        }
    }
}

/// Weight Standardization of a weight [O, fan-in], each output channel over its fan-in.
public enum WeightStandardization {
    /// Mean and denominator of one output channel.
    @usableFromInline
    struct RowStatistics {
        var count: Double, mean: Double, m2: Double, std: Double, den: Double

        /// Whether the SIMD kernels keep their precision on this row of elements of type T; other rows take
        /// `ScaledRow`. Float32 lanes form w - mean (at most √M2) and take 1/den in Float32: both normal there.
        /// Float64 ones need M2 at most 2^600, so that den³ and Σ g (w - mean) stay finite; M2 at least 2^-600 or
        /// den at least 2^-300, so that 1/den and den³ keep their bits and the variance beside eps is not
        /// subnormal; and a spread of at least 2^-13 of |mean| (or none), so that the mean's rounding to Float64
        /// stays below 2^-40 of w - mean. (A Float row's spread is at least an ulp of Float32: 2^29 of that.)
        @inline(__always)
        func fits<T: NormalizationScalar>(_: T.Type) -> Bool {
            if T.self == Float.self { return m2 <= 0x1p250 && den >= 0x1p-126 && den <= 0x1p126 }
            return m2 <= 0x1p600 && (m2 >= 0x1p-600 || den >= 0x1p-300)
                && (m2 == 0 || m2 >= count * mean * mean * 0x1p-26)
        }

        /// Whether the backward's constants (`_combine`'s q and r from Σ g and Σ g (w - mean)) keep their
        /// precision in the lanes of T: finite, and in Float32 lanes q normal unless the dot is 0, r not overflowing.
        @inline(__always)
        static func gradientFits<T: NormalizationScalar>(_: T.Type, sum: Double, dot: Double, q: Double,
                                                         r: Double) -> Bool {
            guard sum.isFinite, dot.isFinite, q.isFinite, r.isFinite else { return false }
            guard T.self == Float.self else { return true }
            return (dot == 0 || (q.magnitude >= 0x1p-126 && q.magnitude <= 0x1p126)) && r.magnitude <= 0x1p126
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

    /// ŵ = (w - mean) / den per output channel. `wHat` may alias `w`.
    @_specialize(where T == Float)
    @_specialize(where T == Double)
    public static func forward<T: NormalizationScalar>(
        _ w: UnsafePointer<T>, _ wHat: UnsafeMutablePointer<T>, outChannels: Int, fanIn: Int,
        options: WeightStandardizationOptions
    ) throws(BCNError) {
        try options.validate(outChannels: outChannels, fanIn: fanIn)
        parallelFor(outChannels, cost: 2 * fanIn) { range, _ in
            for o in range {
                let row = w + o * fanIn
                let st = rowStatistics(row, fanIn: fanIn, options: options)
                if !st.fits(T.self), let scaled = ScaledRow(row, count: fanIn, options: options) {
                    scaled.standardize(into: wHat + o * fanIn)
                    continue
                }
                T._scaleShift(row, wHat + o * fanIn, count: fanIn, centre: st.mean, scale: 1 / st.den, offset: 0)
            }
        }
    }

    /// dw from dŵ, with s = Σ dŵ (w - mean), ν = n - ddof:
    ///   dw = (dŵ - mean(dŵ)) / den - s (w - mean) · k,
    ///   k = 1 / (den³ ν) when eps is inside the root, 1 / (den² std ν) otherwise (0 for a constant filter,
    ///   whose w - mean is 0: the limit, where the formula would divide 0 by 0).
    @_specialize(where T == Float)
    @_specialize(where T == Double)
    public static func backward<T: NormalizationScalar>(
        _ w: UnsafePointer<T>, _ gradWHat: UnsafePointer<T>, _ gradW: UnsafeMutablePointer<T>,
        outChannels: Int, fanIn: Int, options: WeightStandardizationOptions
    ) throws(BCNError) {
        try options.validate(outChannels: outChannels, fanIn: fanIn)
        let ddof: Double = options.unbiased ? 1 : 0
        if fanIn == 1 {  // (biased) w_hat is 0 whatever w is: dw is exactly 0, not p·g + r's rounding
            gradW.update(repeating: 0, count: outChannels)
            return
        }
        parallelFor(outChannels, cost: 4 * fanIn) { range, _ in
            for o in range {
                let row = w + o * fanIn, g = gradWHat + o * fanIn
                let st = rowStatistics(row, fanIn: fanIn, options: options)
                var sum = 0.0, dot = 0.0
                var start = 0
                while start < fanIn {
                    let r = T._gradientSums(g + start, row + start, count: min(planeChunkLength, fanIn - start),
                                            centre: st.mean)
                    sum += r.sum; dot += r.dot
                    start += planeChunkLength
                }
                let nu = st.count - ddof
                let k: Double
                if options.epsInsideSquareRoot {
                    k = 1 / (st.den * st.den * st.den * nu)
                } else {
                    k = st.std > 0 ? 1 / (st.den * st.den * st.std * nu) : 0
                }
                // Σ g (w - mean) is 0 exactly for a constant row, whose term then vanishes
                let q = dot == 0 ? 0 : -dot * k, r = -sum / st.count / st.den
                if !(st.fits(T.self) && RowStatistics.gradientFits(T.self, sum: sum, dot: dot, q: q, r: r)),
                   let scaled = ScaledRow(row, count: fanIn, options: options) {
                    scaled.gradient(g, into: gradW + o * fanIn, epsInsideSquareRoot: options.epsInsideSquareRoot)
                    continue
                }
                T._combine(g, row, gradW + o * fanIn, count: fanIn, centre: st.mean, p: 1 / st.den, q: q, r: r)
            }
        }
    }
}
