/// Options of Weight Standardization. With n the fan-in and var = M2 / (n - ddof), ddof = 1 when `unbiased`:
/// - `epsInsideSquareRoot` (labml): ŵ = (w - mean) / √(var + eps);
/// - otherwise (the authors' convolution): ŵ = (w - mean) / (√var + eps).
public struct WeightStandardizationOptions: Equatable, Sendable {
    /// > 0 and finite; keeps a constant filter finite.
    public var eps: Double
    /// Divide M2 by n - 1 (torch.var/std default) rather than n (TensorFlow); needs a fan-in of at least 2.
    public var unbiased: Bool
    /// Where eps goes: under the square root, √(var + eps) (labml, seed 004), or after it, √var + eps (the
    /// authors' convolution).
    public var epsInsideSquareRoot: Bool

    /// The options; `validate(outChannels:fanIn:)` checks them against a weight's shape.
    public init(eps: Double = 1e-5, unbiased: Bool = true, epsInsideSquareRoot: Bool = true) {
        self.eps = eps
        self.unbiased = unbiased
        self.epsInsideSquareRoot = epsInsideSquareRoot
    }

    /// Throws `.invalidArgument` for an eps that is not positive and finite or a weight too large to address,
    /// `.shapeMismatch` for an output channel count or fan-in below 1, and `.degenerateStatistics` for a fan-in
    /// of 1 with `unbiased`.
    public func validate(outChannels: Int, fanIn: Int) throws(BCNError) {
        try BCNError.checkEps(eps, named: "eps")
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
                           "an unbiased standard deviation needs a fan-in of at least 2, got 1 (turn unbiased off)")
        }
    }
}

/// Weight Standardization of a weight [O, fan-in], each output channel over its fan-in.
public enum WeightStandardization {
    /// ŵ = (w - mean) / den per output channel of the [outChannels, fanIn] weight at `w` (C order), den =
    /// √(var + eps) or √var + eps as `options` says. `wHat` may alias `w`.
    /// - Throws: what `options.validate(outChannels:fanIn:)` throws, before anything is written.
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
                if !st.fits(row), let scaled = ScaledRow(row, count: fanIn, options: options) {
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
    ///   whose w - mean is 0: the limit, where the formula would divide 0 by 0);
    /// a fan-in of 2, where dw exists only through eps, in closed form (`pairGradient`).
    /// `gradW` may alias `gradWHat`. Throws what `options.validate(outChannels:fanIn:)` throws, before anything is
    /// written.
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
                if fanIn == 2 && pairGradient(row, g, into: gradW + o * fanIn, options: options) { continue }
                let st = rowStatistics(row, fanIn: fanIn, options: options)
                var sum = 0.0, dot = 0.0
                var start = 0
                let shift = T._earlyMean(g, count: fanIn)  // one for the row's every chunk, so that their dots add
                while start < fanIn {
                    let r = T._gradientSums(g + start, row + start, count: min(planeChunkLength, fanIn - start),
                                            centre: st.mean, dyShift: shift)
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
                if !(st.fits(row) && st.gradientFits(g, sum: sum, dot: dot, q: q, r: r)),
                   let scaled = ScaledRow(row, count: fanIn, options: options) {
                    scaled.gradient(g, into: gradW + o * fanIn, epsInsideSquareRoot: options.epsInsideSquareRoot)
                    continue
                }
                T._combine(g, row, gradW + o * fanIn, count: fanIn, centre: st.mean, dyMean: sum / st.count,
                           p: 1 / st.den, q: q, r: r)
            }
        }
    }
}
