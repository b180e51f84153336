import BCNSwift

func wsOptions(_ flags: UInt32, _ eps: Double) throws(BCNError) -> WeightStandardizationOptions {
    guard flags & ~Flag.wsAll == 0 else {
        throw BCNError(.invalidArgument, "unknown flag bits 0x\(String(flags & ~Flag.wsAll, radix: 16))")
    }
    return WeightStandardizationOptions(eps: eps, unbiased: flags & Flag.wsUnbiased != 0,
                                        epsInsideSquareRoot: flags & Flag.wsEpsInSqrt != 0)
}

func wsForward<T: NormalizationScalar>(
    _ flags: UInt32, _ outChannels: Int64, _ fanIn: Int64, _ eps: Double,
    _ w: UnsafePointer<T>?, _ wHat: UnsafeMutablePointer<T>?
) throws(BCNError) {
    let options = try wsOptions(flags, eps)
    let o = try intSize(outChannels, "out_channels"), n = try intSize(fanIn, "fan_in")
    try WeightStandardization.forward(try nonNull(w, "w"), try nonNull(wHat, "w_hat"), outChannels: o, fanIn: n,
                                      options: options)
}

func wsBackward<T: NormalizationScalar>(
    _ flags: UInt32, _ outChannels: Int64, _ fanIn: Int64, _ eps: Double,
    _ w: UnsafePointer<T>?, _ gradWHat: UnsafePointer<T>?, _ gradW: UnsafeMutablePointer<T>?
) throws(BCNError) {
    let options = try wsOptions(flags, eps)
    let o = try intSize(outChannels, "out_channels"), n = try intSize(fanIn, "fan_in")
    try WeightStandardization.backward(try nonNull(w, "w"), try nonNull(gradWHat, "grad_w_hat"),
                                       try nonNull(gradW, "grad_w"), outChannels: o, fanIn: n, options: options)
}

@_cdecl("bcn_ws_forward_f32")
public func bcn_ws_forward_f32(
    _ flags: UInt32, _ outChannels: Int64, _ fanIn: Int64, _ eps: Double,
    _ w: UnsafePointer<Float>?, _ wHat: UnsafeMutablePointer<Float>?,
    _ message: UnsafeMutablePointer<CChar>?, _ messageCapacity: Int64
) -> Int32 {
    guarded(message, messageCapacity) { () throws(BCNError) in try wsForward(flags, outChannels, fanIn, eps, w, wHat) }
}

@_cdecl("bcn_ws_forward_f64")
public func bcn_ws_forward_f64(
    _ flags: UInt32, _ outChannels: Int64, _ fanIn: Int64, _ eps: Double,
    _ w: UnsafePointer<Double>?, _ wHat: UnsafeMutablePointer<Double>?,
    _ message: UnsafeMutablePointer<CChar>?, _ messageCapacity: Int64
) -> Int32 {
    guarded(message, messageCapacity) { () throws(BCNError) in try wsForward(flags, outChannels, fanIn, eps, w, wHat) }
}

@_cdecl("bcn_ws_backward_f32")
public func bcn_ws_backward_f32(
    _ flags: UInt32, _ outChannels: Int64, _ fanIn: Int64, _ eps: Double,
    _ w: UnsafePointer<Float>?, _ gradWHat: UnsafePointer<Float>?, _ gradW: UnsafeMutablePointer<Float>?,
    _ message: UnsafeMutablePointer<CChar>?, _ messageCapacity: Int64
) -> Int32 {
    guarded(message, messageCapacity) { () throws(BCNError) in
        try wsBackward(flags, outChannels, fanIn, eps, w, gradWHat, gradW)
    }
}

@_cdecl("bcn_ws_backward_f64")
public func bcn_ws_backward_f64(
    _ flags: UInt32, _ outChannels: Int64, _ fanIn: Int64, _ eps: Double,
    _ w: UnsafePointer<Double>?, _ gradWHat: UnsafePointer<Double>?, _ gradW: UnsafeMutablePointer<Double>?,
    _ message: UnsafeMutablePointer<CChar>?, _ messageCapacity: Int64
) -> Int32 {
    guarded(message, messageCapacity) { () throws(BCNError) in
        try wsBackward(flags, outChannels, fanIn, eps, w, gradWHat, gradW)
    }
}
