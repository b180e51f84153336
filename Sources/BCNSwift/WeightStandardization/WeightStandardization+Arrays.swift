extension WeightStandardization {
    /// (out channels, fan-in) of a weight shape [O, ...] of rank ≥ 2.
    static func rows(of shape: [Int], count: Int) throws(BCNError) -> (Int, Int) {
        guard shape.count >= 2 else {
            throw BCNError(.shapeMismatch, "weight must have rank >= 2 ([out_channels, ...]), got shape \(shape)")
        }
        var fanIn = 1
        for d in shape.dropFirst() {
            guard d > 0 else {
                throw BCNError(.shapeMismatch, "weight dimensions must be positive, got shape \(shape)")
            }
            let (p, o) = fanIn.multipliedReportingOverflow(by: d)
            guard !o else { throw BCNError(.invalidArgument, "weight shape \(shape) is too large") }
            fanIn = p
        }
        guard shape[0] > 0 else {
            throw BCNError(.shapeMismatch, "weight dimensions must be positive, got shape \(shape)")
        }
        let (needed, overflow) = shape[0].multipliedReportingOverflow(by: fanIn)
        guard !overflow else { throw BCNError(.invalidArgument, "weight shape \(shape) is too large") }
        guard needed == count else {
            throw BCNError(.shapeMismatch, "weight has \(count) elements, shape \(shape) needs \(needed)")
        }
        return (shape[0], fanIn)
    }

    /// The standardized weight ŵ of `w` with shape `shape` ([O, ...], rank ≥ 2, in C order): per output channel
    /// o, over its fan-in n = Π shape[1...], ŵ = (w - mean) / √(var + eps) or (w - mean) / (√var + eps) as
    /// `options` says, var = M2 / (n - 1) when unbiased, else M2 / n.
    /// - Throws: `BCNError` (see `WeightStandardizationOptions.validate`): `.shapeMismatch` for a rank below 2,
    ///   a size below 1 or a `w` of another count than the shape's; `.invalidArgument` for a bad eps or a shape
    ///   too large; `.degenerateStatistics` for a fan-in of 1 when unbiased; `.outOfMemory`.
    public static func standardize<T: NormalizationScalar>(
        _ w: [T], shape: [Int], options: WeightStandardizationOptions = .init()
    ) throws(BCNError) -> [T] {
        let (o, n) = try rows(of: shape, count: w.count)
        try requireArrayMemory(arrayBytes(w.count, of: T.self), for: "the standardized weight of shape \(shape)")
        var out = [T](repeating: 0, count: w.count)
        try w.withUnsafeBufferPointer { (wp) throws(BCNError) in
            try out.withUnsafeMutableBufferPointer { (op) throws(BCNError) in
                try forward(wp.baseAddress!, op.baseAddress!, outChannels: o, fanIn: n, options: options)
            }
        }
        return out
    }

    /// dw, the gradient with respect to `w` given `gradWHat`, the gradient with respect to ŵ (as many values as
    /// `w`): per output channel, dw = (dŵ - mean(dŵ)) / den - (w - mean) · k · Σ dŵ (w - mean), with den the
    /// forward's denominator and k as `backward` documents it.
    /// - Throws: as `standardize`, and `.shapeMismatch` when `gradWHat` has another count than `w`.
    public static func gradient<T: NormalizationScalar>(
        _ w: [T], _ gradWHat: [T], shape: [Int], options: WeightStandardizationOptions = .init()
    ) throws(BCNError) -> [T] {
        let (o, n) = try rows(of: shape, count: w.count)
        guard gradWHat.count == w.count else {
            throw BCNError(.shapeMismatch, "gradient has \(gradWHat.count) elements, the weight has \(w.count)")
        }
        try requireArrayMemory(arrayBytes(w.count, of: T.self), for: "the gradient of a weight of shape \(shape)")
        var out = [T](repeating: 0, count: w.count)
        try w.withUnsafeBufferPointer { (wp) throws(BCNError) in
            try gradWHat.withUnsafeBufferPointer { (gp) throws(BCNError) in
                try out.withUnsafeMutableBufferPointer { (op) throws(BCNError) in
                    try backward(wp.baseAddress!, gp.baseAddress!, op.baseAddress!, outChannels: o, fanIn: n,
                                 options: options)
                }
            }
        }
        return out
    }
}
