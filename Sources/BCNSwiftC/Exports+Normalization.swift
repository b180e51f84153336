import BCNSwift

/// Builds the plan a flag word and scalars describe; the C header documents each bit.
func makePlan(flags: UInt32, channels: Int, groups: Int64, eps: Double, bnEps: Double, momentum: Double)
    throws(BCNError) -> NormalizationPlan
{
    guard flags & ~Flag.all == 0 else {
        throw BCNError(.invalidArgument, "unknown flag bits 0x\(String(flags & ~Flag.all, radix: 16))")
    }
    var bn: BatchNormOptions? = nil
    if flags & Flag.batchNorm != 0 {
        bn = BatchNormOptions(
            statistics: flags & Flag.estimated != 0 ? .estimated : .batch,
            eps: bnEps,
            momentum: flags & Flag.cumulativeAverage != 0 ? nil : momentum,
            unbiasedRunningVariance: flags & Flag.unbiasedRunningVar != 0,
            varianceCentre: flags & Flag.varianceAroundRunningMean != 0 ? .runningMean : .batchMean)
    }
    var cn: ChannelNormOptions? = nil
    if flags & Flag.channelNorm != 0 {
        cn = ChannelNormOptions(groups: try intSize(groups, "groups"), eps: eps)
    }
    guard bn != nil || cn != nil else {
        throw BCNError(.invalidArgument, "flags select neither a batch-norm nor a channel-norm stage")
    }
    let plan = NormalizationPlan(channels: channels, batchNorm: bn, channelNorm: cn,
                                 nanPolicy: flags & Flag.nanRaise != 0 ? .raise : .propagate)
    try plan.validate()
    return plan
}

func normForward<T: NormalizationScalar>(
    _ flags: UInt32, _ batch: Int64, _ channels: Int64, _ spatial: Int64, _ groups: Int64,
    _ eps: Double, _ bnEps: Double, _ momentum: Double,
    _ x: UnsafePointer<T>?, _ y: UnsafeMutablePointer<T>?,
    _ bnWeight: UnsafePointer<T>?, _ bnBias: UnsafePointer<T>?,
    _ runningMean: UnsafeMutablePointer<T>?, _ runningVar: UnsafeMutablePointer<T>?,
    _ numBatchesTracked: UnsafeMutablePointer<Int64>?,
    _ cnWeight: UnsafePointer<T>?, _ cnBias: UnsafePointer<T>?,
    _ context: UnsafeMutablePointer<Double>?, _ contextLength: Int64
) throws(BCNError) {
    let shape = try NormalizationShape(batch: try intSize(batch, "batch"), channels: try intSize(channels, "channels"),
                                       spatial: try intSize(spatial, "spatial"))
    let plan = try makePlan(flags: flags, channels: shape.channels, groups: groups, eps: eps, bnEps: bnEps,
                            momentum: momentum)
    let x = try nonNull(x, "x"), y = try nonNull(y, "y"), ctx = try nonNull(context, "context")
    guard contextLength >= 0, contextLength <= Int64(Int.max) else {
        throw BCNError(.invalidArgument, "context_length must be non-negative, got \(contextLength)")
    }
    let state = NormalizationState(bnWeight: bnWeight, bnBias: bnBias, runningMean: runningMean,
                                   runningVar: runningVar, numBatchesTracked: numBatchesTracked,
                                   cnWeight: cnWeight, cnBias: cnBias)
    try FusedNormalization.forward(plan: plan, shape: shape, training: flags & Flag.training != 0, x: x, y: y,
                                   state: state,
                                   context: UnsafeMutableBufferPointer(start: ctx, count: Int(contextLength)))
}

func normBackward<T: NormalizationScalar>(
    _ flags: UInt32, _ batch: Int64, _ channels: Int64, _ spatial: Int64, _ groups: Int64,
    _ x: UnsafePointer<T>?, _ dy: UnsafePointer<T>?, _ dx: UnsafeMutablePointer<T>?,
    _ gBnWeight: UnsafeMutablePointer<T>?, _ gBnBias: UnsafeMutablePointer<T>?,
    _ gCnWeight: UnsafeMutablePointer<T>?, _ gCnBias: UnsafeMutablePointer<T>?,
    _ context: UnsafePointer<Double>?, _ contextLength: Int64
) throws(BCNError) {
    let shape = try NormalizationShape(batch: try intSize(batch, "batch"), channels: try intSize(channels, "channels"),
                                       spatial: try intSize(spatial, "spatial"))
    let plan = try makePlan(flags: flags, channels: shape.channels, groups: groups, eps: 1, bnEps: 1, momentum: 0)
    let x = try nonNull(x, "x"), dy = try nonNull(dy, "dy"), dx = try nonNull(dx, "dx")
    let ctx = try nonNull(context, "context")
    guard contextLength >= 0, contextLength <= Int64(Int.max) else {
        throw BCNError(.invalidArgument, "context_length must be non-negative, got \(contextLength)")
    }
    try FusedNormalization.backward(
        plan: plan, shape: shape, x: x, dy: dy, dx: dx,
        gradients: NormalizationGradients(bnWeight: gBnWeight, bnBias: gBnBias, cnWeight: gCnWeight, cnBias: gCnBias),
        context: UnsafeBufferPointer(start: ctx, count: Int(contextLength)))
}

@_cdecl("bcn_context_length")
public func bcn_context_length(_ batch: Int64, _ channels: Int64, _ groups: Int64) -> Int64 {
    guard batch > 0, channels > 0, groups >= 0, batch <= Int64(Int.max), channels <= Int64(Int.max),
          groups <= Int64(Int.max),
          let n = NormalizationContextLayout.length(batch: Int(batch), channels: Int(channels), groups: Int(groups))
    else { return -1 }
    return Int64(n)
}

@_cdecl("bcn_norm_forward_f32")
public func bcn_norm_forward_f32(
    _ flags: UInt32, _ batch: Int64, _ channels: Int64, _ spatial: Int64, _ groups: Int64,
    _ eps: Double, _ bnEps: Double, _ momentum: Double,
    _ x: UnsafePointer<Float>?, _ y: UnsafeMutablePointer<Float>?,
    _ bnWeight: UnsafePointer<Float>?, _ bnBias: UnsafePointer<Float>?,
    _ runningMean: UnsafeMutablePointer<Float>?, _ runningVar: UnsafeMutablePointer<Float>?,
    _ numBatchesTracked: UnsafeMutablePointer<Int64>?,
    _ cnWeight: UnsafePointer<Float>?, _ cnBias: UnsafePointer<Float>?,
    _ context: UnsafeMutablePointer<Double>?, _ contextLength: Int64,
    _ message: UnsafeMutablePointer<CChar>?, _ messageCapacity: Int64
) -> Int32 {
    guarded(message, messageCapacity) { () throws(BCNError) in
        try normForward(flags, batch, channels, spatial, groups, eps, bnEps, momentum, x, y, bnWeight, bnBias,
                        runningMean, runningVar, numBatchesTracked, cnWeight, cnBias, context, contextLength)
    }
}

@_cdecl("bcn_norm_forward_f64")
public func bcn_norm_forward_f64(
    _ flags: UInt32, _ batch: Int64, _ channels: Int64, _ spatial: Int64, _ groups: Int64,
    _ eps: Double, _ bnEps: Double, _ momentum: Double,
    _ x: UnsafePointer<Double>?, _ y: UnsafeMutablePointer<Double>?,
    _ bnWeight: UnsafePointer<Double>?, _ bnBias: UnsafePointer<Double>?,
    _ runningMean: UnsafeMutablePointer<Double>?, _ runningVar: UnsafeMutablePointer<Double>?,
    _ numBatchesTracked: UnsafeMutablePointer<Int64>?,
    _ cnWeight: UnsafePointer<Double>?, _ cnBias: UnsafePointer<Double>?,
    _ context: UnsafeMutablePointer<Double>?, _ contextLength: Int64,
    _ message: UnsafeMutablePointer<CChar>?, _ messageCapacity: Int64
) -> Int32 {
    guarded(message, messageCapacity) { () throws(BCNError) in
        try normForward(flags, batch, channels, spatial, groups, eps, bnEps, momentum, x, y, bnWeight, bnBias,
                        runningMean, runningVar, numBatchesTracked, cnWeight, cnBias, context, contextLength)
    }
}

@_cdecl("bcn_norm_backward_f32")
public func bcn_norm_backward_f32(
    _ flags: UInt32, _ batch: Int64, _ channels: Int64, _ spatial: Int64, _ groups: Int64,
    _ x: UnsafePointer<Float>?, _ dy: UnsafePointer<Float>?, _ dx: UnsafeMutablePointer<Float>?,
    _ gBnWeight: UnsafeMutablePointer<Float>?, _ gBnBias: UnsafeMutablePointer<Float>?,
    _ gCnWeight: UnsafeMutablePointer<Float>?, _ gCnBias: UnsafeMutablePointer<Float>?,
    _ context: UnsafePointer<Double>?, _ contextLength: Int64,
    _ message: UnsafeMutablePointer<CChar>?, _ messageCapacity: Int64
) -> Int32 {
    guarded(message, messageCapacity) { () throws(BCNError) in
        try normBackward(flags, batch, channels, spatial, groups, x, dy, dx, gBnWeight, gBnBias, gCnWeight, gCnBias,
                         context, contextLength)
    }
}

@_cdecl("bcn_norm_backward_f64")
public func bcn_norm_backward_f64(
    _ flags: UInt32, _ batch: Int64, _ channels: Int64, _ spatial: Int64, _ groups: Int64,
    _ x: UnsafePointer<Double>?, _ dy: UnsafePointer<Double>?, _ dx: UnsafeMutablePointer<Double>?,
    _ gBnWeight: UnsafeMutablePointer<Double>?, _ gBnBias: UnsafeMutablePointer<Double>?,
    _ gCnWeight: UnsafeMutablePointer<Double>?, _ gCnBias: UnsafeMutablePointer<Double>?,
    _ context: UnsafePointer<Double>?, _ contextLength: Int64,
    _ message: UnsafeMutablePointer<CChar>?, _ messageCapacity: Int64
) -> Int32 {
    guarded(message, messageCapacity) { () throws(BCNError) in
        try normBackward(flags, batch, channels, spatial, groups, x, dy, dx, gBnWeight, gBnBias, gCnWeight, gCnBias,
                         context, contextLength)
    }
}
