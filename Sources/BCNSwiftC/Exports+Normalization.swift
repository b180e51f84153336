import BCNSwift
import CBCNSwift

// The normalization exports of bcnswift.h: each checks what only it can know (null pointers, C integer sizes,
// buffer lengths passed with them) and hands the rest to NormalizationEngine, which checks everything else
// before it writes. Each f32/f64 pair is one generic body.

/// The plan and shape that a call's flags and sizes describe.
func describe(_ flags: UInt32, _ batch: Int64, _ channels: Int64, _ spatial: Int64, _ groups: Int64,
              eps: Double = 1, bnEps: Double = 1, momentum: Double = 0) throws(BCNError)
    -> (NormalizationPlan, NormalizationShape)
{
    guard flags & ~Flag.all == 0 else {
        throw BCNError(.invalidArgument, "unknown flag bits 0x\(String(flags & ~Flag.all, radix: 16))")
    }
    let shape = try NormalizationShape(
        batch: try intSize(batch, "batch"), channels: try intSize(channels, "channels"),
        spatial: try intSize(spatial, "spatial"),
        format: flags & Flag.channelsLast != 0 ? .channelsLast : .channelsFirst)
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
    let plan = NormalizationPlan(channels: shape.channels, batchNorm: bn, channelNorm: cn,
                                 nanPolicy: flags & Flag.nanRaise != 0 ? .raise : .propagate)
    try plan.validate()
    return (plan, shape)
}

/// The caller's context buffer with its stated length.
func contextBuffer(_ context: UnsafePointer<Double>?, _ length: Int64) throws(BCNError)
    -> UnsafeMutableBufferPointer<Double>
{
    let ctx = try nonNull(context, "context")
    guard length >= 0, length <= Int64(Int.max) else {
        throw BCNError(.invalidArgument, "context_length must be non-negative, got \(length)")
    }
    return UnsafeMutableBufferPointer(start: UnsafeMutablePointer(mutating: ctx), count: Int(length))
}

/// `body` with the caller's (count, mean, M2) triples seen as `Moments` (the same layout).
func withMoments<R>(_ p: UnsafePointer<Double>?, count: Int,
                    _ body: (UnsafeMutablePointer<Moments>?) throws(BCNError) -> R) throws(BCNError) -> R {
    guard let p else { return try body(nil) }
    let raw = UnsafeMutableRawPointer(mutating: p)
    return try body(raw.bindMemory(to: Moments.self, capacity: count))
}

func state<T>(_ bnWeight: UnsafePointer<T>?, _ bnBias: UnsafePointer<T>?, _ runningMean: UnsafeMutablePointer<T>?,
              _ runningVar: UnsafeMutablePointer<T>?, _ numBatchesTracked: UnsafeMutablePointer<Int64>?,
              _ cnWeight: UnsafePointer<T>?, _ cnBias: UnsafePointer<T>?) -> NormalizationState<T> {
    NormalizationState(bnWeight: bnWeight, bnBias: bnBias, runningMean: runningMean, runningVar: runningVar,
                       numBatchesTracked: numBatchesTracked, cnWeight: cnWeight, cnBias: cnBias)
}

func normForward<T: NormalizationScalar>(
    _ flags: UInt32, _ batch: Int64, _ channels: Int64, _ spatial: Int64, _ groups: Int64,
    _ eps: Double, _ bnEps: Double, _ momentum: Double,
    _ x: UnsafePointer<T>?, _ y: UnsafeMutablePointer<T>?, _ state: NormalizationState<T>,
    _ moments: UnsafePointer<Double>?, finishOnly: Bool,
    _ context: UnsafeMutablePointer<Double>?, _ contextLength: Int64
) throws(BCNError) {
    let (plan, shape) = try describe(flags, batch, channels, spatial, groups, eps: eps, bnEps: bnEps,
                                     momentum: momentum)
    let x = try nonNull(x, "x"), y = try nonNull(y, "y"), ctx = try contextBuffer(context, contextLength)
    let training = flags & Flag.training != 0
    guard finishOnly else {
        try NormalizationEngine.forward(plan: plan, shape: shape, training: training, x: x, y: y, state: state,
                                        context: ctx)
        return
    }
    try withMoments(moments, count: shape.channels) { (m) throws(BCNError) in
        try NormalizationEngine.finishForward(plan: plan, shape: shape, training: training, x: x, y: y,
                                              state: state, batchMoments: m.map { UnsafePointer($0) }, context: ctx)
    }
}

func normMoments<T: NormalizationScalar>(
    _ flags: UInt32, _ batch: Int64, _ channels: Int64, _ spatial: Int64, _ groups: Int64,
    _ x: UnsafePointer<T>?, _ moments: UnsafeMutablePointer<Double>?,
    _ context: UnsafeMutablePointer<Double>?, _ contextLength: Int64
) throws(BCNError) {
    let (plan, shape) = try describe(flags, batch, channels, spatial, groups)
    let x = try nonNull(x, "x"), ctx = try contextBuffer(context, contextLength)
    try withMoments(moments, count: shape.channels) { (m) throws(BCNError) in
        try NormalizationEngine.localMoments(plan: plan, shape: shape, x: x, context: ctx, into: m)
    }
}

func normBackward<T: NormalizationScalar>(
    _ flags: UInt32, _ batch: Int64, _ channels: Int64, _ spatial: Int64, _ groups: Int64,
    _ x: UnsafePointer<T>?, _ dy: UnsafePointer<T>?, _ dx: UnsafeMutablePointer<T>?,
    _ gradients: NormalizationGradients<T>, _ sums: UnsafePointer<Double>?, finishOnly: Bool,
    _ context: UnsafePointer<Double>?, _ contextLength: Int64
) throws(BCNError) {
    let (plan, shape) = try describe(flags, batch, channels, spatial, groups)
    let x = try nonNull(x, "x"), dy = try nonNull(dy, "dy"), dx = try nonNull(dx, "dx")
    let ctx = try contextBuffer(context, contextLength)
    if finishOnly {
        try NormalizationEngine.finishBackward(plan: plan, shape: shape, x: x, dy: dy, dx: dx, gradients: gradients,
                                               batchSums: sums, context: ctx)
    } else {
        try NormalizationEngine.backward(plan: plan, shape: shape, x: x, dy: dy, dx: dx, gradients: gradients,
                                         context: UnsafeBufferPointer(ctx))
    }
}

func normBackwardSums<T: NormalizationScalar>(
    _ flags: UInt32, _ batch: Int64, _ channels: Int64, _ spatial: Int64, _ groups: Int64,
    _ x: UnsafePointer<T>?, _ dy: UnsafePointer<T>?, _ sums: UnsafeMutablePointer<Double>?,
    _ context: UnsafeMutablePointer<Double>?, _ contextLength: Int64
) throws(BCNError) {
    let (plan, shape) = try describe(flags, batch, channels, spatial, groups)
    let x = try nonNull(x, "x"), dy = try nonNull(dy, "dy"), ctx = try contextBuffer(context, contextLength)
    try NormalizationEngine.localGradientSums(plan: plan, shape: shape, x: x, dy: dy, context: ctx, into: sums)
}

/// sets·channels·width, checked: the length of a caller's array of sets.
func setsLength(_ sets: Int64, _ channels: Int64, width: Int) throws(BCNError) -> (Int, Int) {
    let s = try intSize(sets, "sets"), c = try intSize(channels, "channels")
    let (n, o1) = s.multipliedReportingOverflow(by: c)
    let (total, o2) = n.multipliedReportingOverflow(by: width)
    guard !o1, !o2, total <= Int.max / 8 else {
        throw BCNError(.invalidArgument, "\(sets) sets of \(channels) channels are too many")
    }
    return (s, c)
}

@_cdecl("bcn_context_length")
public func bcn_context_length(_ batch: Int64, _ channels: Int64, _ groups: Int64) -> Int64 {
    guard batch >= 0, channels >= 0, groups >= 0, batch <= Int64(Int.max), channels <= Int64(Int.max),
          groups <= Int64(Int.max),
          let n = NormalizationContext.length(batch: Int(batch), channels: Int(channels), groups: Int(groups))
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
        try normForward(flags, batch, channels, spatial, groups, eps, bnEps, momentum, x, y,
                        state(bnWeight, bnBias, runningMean, runningVar, numBatchesTracked, cnWeight, cnBias),
                        nil, finishOnly: false, context, contextLength)
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
        try normForward(flags, batch, channels, spatial, groups, eps, bnEps, momentum, x, y,
                        state(bnWeight, bnBias, runningMean, runningVar, numBatchesTracked, cnWeight, cnBias),
                        nil, finishOnly: false, context, contextLength)
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
        try normBackward(flags, batch, channels, spatial, groups, x, dy, dx,
                         NormalizationGradients(bnWeight: gBnWeight, bnBias: gBnBias, cnWeight: gCnWeight,
                                                cnBias: gCnBias), nil, finishOnly: false, context, contextLength)
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
        try normBackward(flags, batch, channels, spatial, groups, x, dy, dx,
                         NormalizationGradients(bnWeight: gBnWeight, bnBias: gBnBias, cnWeight: gCnWeight,
                                                cnBias: gCnBias), nil, finishOnly: false, context, contextLength)
    }
}

/// The running update alone: only the batch-norm stage's flags matter (the channel-norm stage, training bit
/// and memory format are ignored, so a layer passes the flags it passes everywhere).
func runningUpdate<T: NormalizationScalar>(
    _ flags: UInt32, _ channels: Int64, _ momentum: Double, _ moments: UnsafePointer<Double>?,
    _ runningMean: UnsafeMutablePointer<T>?, _ runningVar: UnsafeMutablePointer<T>?,
    _ numBatchesTracked: UnsafeMutablePointer<Int64>?
) throws(BCNError) {
    guard flags & Flag.batchNorm != 0 else {
        throw BCNError(.invalidArgument, "flags select no batch-norm stage, which alone has running buffers")
    }
    let (plan, _) = try describe(flags & ~Flag.channelNorm, 1, channels, 1, 1, momentum: momentum)
    let m = try nonNull(moments, "moments")
    try withMoments(m, count: plan.channels) { (batch) throws(BCNError) in
        try NormalizationEngine.updateRunningBuffers(
            plan: plan, batchMoments: batch!,
            state: state(nil, nil, try nonNull(runningMean, "running_mean"), try nonNull(runningVar, "running_var"),
                         try nonNull(numBatchesTracked, "num_batches_tracked"), nil, nil))
    }
}
