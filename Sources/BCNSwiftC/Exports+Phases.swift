import BCNSwift
import CBCNSwift

// The statistics phases of bcnswift.h: forward (a) moments, (b) merge, (c) finish; backward likewise.

@_cdecl("bcn_norm_moments_f32")
public func bcn_norm_moments_f32(
    _ flags: UInt32, _ batch: Int64, _ channels: Int64, _ spatial: Int64, _ groups: Int64,
    _ x: UnsafePointer<Float>?, _ moments: UnsafeMutablePointer<Double>?,
    _ context: UnsafeMutablePointer<Double>?, _ contextLength: Int64,
    _ message: UnsafeMutablePointer<CChar>?, _ messageCapacity: Int64
) -> Int32 {
    guarded(message, messageCapacity) { () throws(BCNError) in
        try normMoments(flags, batch, channels, spatial, groups, x, moments, context, contextLength)
    }
}

@_cdecl("bcn_norm_moments_f64")
public func bcn_norm_moments_f64(
    _ flags: UInt32, _ batch: Int64, _ channels: Int64, _ spatial: Int64, _ groups: Int64,
    _ x: UnsafePointer<Double>?, _ moments: UnsafeMutablePointer<Double>?,
    _ context: UnsafeMutablePointer<Double>?, _ contextLength: Int64,
    _ message: UnsafeMutablePointer<CChar>?, _ messageCapacity: Int64
) -> Int32 {
    guarded(message, messageCapacity) { () throws(BCNError) in
        try normMoments(flags, batch, channels, spatial, groups, x, moments, context, contextLength)
    }
}

@_cdecl("bcn_moments_merge")
public func bcn_moments_merge(
    _ sets: Int64, _ channels: Int64, _ moments: UnsafePointer<Double>?, _ merged: UnsafeMutablePointer<Double>?,
    _ message: UnsafeMutablePointer<CChar>?, _ messageCapacity: Int64
) -> Int32 {
    guarded(message, messageCapacity) { () throws(BCNError) in
        let (s, c) = try setsLength(sets, channels, width: 3)
        let input = try nonNull(moments, "moments"), output = try nonNull(merged, "merged")
        try withMoments(input, count: s * c) { (m) throws(BCNError) in
            try withMoments(output, count: c) { (out) throws(BCNError) in
                try NormalizationEngine.mergeMoments(sets: s, channels: c, m!, into: out!)
            }
        }
    }
}

@_cdecl("bcn_norm_finish_f32")
public func bcn_norm_finish_f32(
    _ flags: UInt32, _ batch: Int64, _ channels: Int64, _ spatial: Int64, _ groups: Int64,
    _ eps: Double, _ bnEps: Double, _ momentum: Double,
    _ x: UnsafePointer<Float>?, _ y: UnsafeMutablePointer<Float>?,
    _ bnWeight: UnsafePointer<Float>?, _ bnBias: UnsafePointer<Float>?,
    _ runningMean: UnsafeMutablePointer<Float>?, _ runningVar: UnsafeMutablePointer<Float>?,
    _ numBatchesTracked: UnsafeMutablePointer<Int64>?,
    _ cnWeight: UnsafePointer<Float>?, _ cnBias: UnsafePointer<Float>?, _ moments: UnsafePointer<Double>?,
    _ context: UnsafeMutablePointer<Double>?, _ contextLength: Int64,
    _ message: UnsafeMutablePointer<CChar>?, _ messageCapacity: Int64
) -> Int32 {
    guarded(message, messageCapacity) { () throws(BCNError) in
        try normForward(flags, batch, channels, spatial, groups, eps, bnEps, momentum, x, y,
                        state(bnWeight, bnBias, runningMean, runningVar, numBatchesTracked, cnWeight, cnBias),
                        moments, finishOnly: true, context, contextLength)
    }
}

@_cdecl("bcn_norm_finish_f64")
public func bcn_norm_finish_f64(
    _ flags: UInt32, _ batch: Int64, _ channels: Int64, _ spatial: Int64, _ groups: Int64,
    _ eps: Double, _ bnEps: Double, _ momentum: Double,
    _ x: UnsafePointer<Double>?, _ y: UnsafeMutablePointer<Double>?,
    _ bnWeight: UnsafePointer<Double>?, _ bnBias: UnsafePointer<Double>?,
    _ runningMean: UnsafeMutablePointer<Double>?, _ runningVar: UnsafeMutablePointer<Double>?,
    _ numBatchesTracked: UnsafeMutablePointer<Int64>?,
    _ cnWeight: UnsafePointer<Double>?, _ cnBias: UnsafePointer<Double>?, _ moments: UnsafePointer<Double>?,
    _ context: UnsafeMutablePointer<Double>?, _ contextLength: Int64,
    _ message: UnsafeMutablePointer<CChar>?, _ messageCapacity: Int64
) -> Int32 {
    guarded(message, messageCapacity) { () throws(BCNError) in
        try normForward(flags, batch, channels, spatial, groups, eps, bnEps, momentum, x, y,
                        state(bnWeight, bnBias, runningMean, runningVar, numBatchesTracked, cnWeight, cnBias),
                        moments, finishOnly: true, context, contextLength)
    }
}

@_cdecl("bcn_norm_needs_gradient_sums")
public func bcn_norm_needs_gradient_sums(
    _ flags: UInt32, _ batch: Int64, _ channels: Int64, _ spatial: Int64, _ groups: Int64,
    _ context: UnsafePointer<Double>?, _ contextLength: Int64
) -> Int32 {
    do throws(BCNError) {
        let (plan, shape) = try describe(flags, batch, channels, spatial, groups)
        let ctx = try contextBuffer(context, contextLength)
        return try NormalizationEngine.needsGradientSums(plan: plan, shape: shape, context: UnsafeBufferPointer(ctx))
            ? 1 : 0
    } catch {
        return -status(error.kind)
    }
}

@_cdecl("bcn_norm_backward_sums_f32")
public func bcn_norm_backward_sums_f32(
    _ flags: UInt32, _ batch: Int64, _ channels: Int64, _ spatial: Int64, _ groups: Int64,
    _ x: UnsafePointer<Float>?, _ dy: UnsafePointer<Float>?, _ sums: UnsafeMutablePointer<Double>?,
    _ context: UnsafeMutablePointer<Double>?, _ contextLength: Int64,
    _ message: UnsafeMutablePointer<CChar>?, _ messageCapacity: Int64
) -> Int32 {
    guarded(message, messageCapacity) { () throws(BCNError) in
        try normBackwardSums(flags, batch, channels, spatial, groups, x, dy, sums, context, contextLength)
    }
}

@_cdecl("bcn_norm_backward_sums_f64")
public func bcn_norm_backward_sums_f64(
    _ flags: UInt32, _ batch: Int64, _ channels: Int64, _ spatial: Int64, _ groups: Int64,
    _ x: UnsafePointer<Double>?, _ dy: UnsafePointer<Double>?, _ sums: UnsafeMutablePointer<Double>?,
    _ context: UnsafeMutablePointer<Double>?, _ contextLength: Int64,
    _ message: UnsafeMutablePointer<CChar>?, _ messageCapacity: Int64
) -> Int32 {
    guarded(message, messageCapacity) { () throws(BCNError) in
        try normBackwardSums(flags, batch, channels, spatial, groups, x, dy, sums, context, contextLength)
    }
}

@_cdecl("bcn_sums_merge")
public func bcn_sums_merge(
    _ sets: Int64, _ channels: Int64, _ sums: UnsafePointer<Double>?, _ merged: UnsafeMutablePointer<Double>?,
    _ message: UnsafeMutablePointer<CChar>?, _ messageCapacity: Int64
) -> Int32 {
    guarded(message, messageCapacity) { () throws(BCNError) in
        let (s, c) = try setsLength(sets, channels, width: 2)
        try NormalizationEngine.mergeGradientSums(sets: s, channels: c, try nonNull(sums, "sums"),
                                                  into: try nonNull(merged, "merged"))
    }
}

@_cdecl("bcn_norm_backward_finish_f32")
public func bcn_norm_backward_finish_f32(
    _ flags: UInt32, _ batch: Int64, _ channels: Int64, _ spatial: Int64, _ groups: Int64,
    _ x: UnsafePointer<Float>?, _ dy: UnsafePointer<Float>?, _ dx: UnsafeMutablePointer<Float>?,
    _ gBnWeight: UnsafeMutablePointer<Float>?, _ gBnBias: UnsafeMutablePointer<Float>?,
    _ gCnWeight: UnsafeMutablePointer<Float>?, _ gCnBias: UnsafeMutablePointer<Float>?,
    _ sums: UnsafePointer<Double>?, _ context: UnsafeMutablePointer<Double>?, _ contextLength: Int64,
    _ message: UnsafeMutablePointer<CChar>?, _ messageCapacity: Int64
) -> Int32 {
    guarded(message, messageCapacity) { () throws(BCNError) in
        try normBackward(flags, batch, channels, spatial, groups, x, dy, dx,
                         NormalizationGradients(bnWeight: gBnWeight, bnBias: gBnBias, cnWeight: gCnWeight,
                                                cnBias: gCnBias), sums, finishOnly: true, context, contextLength)
    }
}

@_cdecl("bcn_norm_backward_finish_f64")
public func bcn_norm_backward_finish_f64(
    _ flags: UInt32, _ batch: Int64, _ channels: Int64, _ spatial: Int64, _ groups: Int64,
    _ x: UnsafePointer<Double>?, _ dy: UnsafePointer<Double>?, _ dx: UnsafeMutablePointer<Double>?,
    _ gBnWeight: UnsafeMutablePointer<Double>?, _ gBnBias: UnsafeMutablePointer<Double>?,
    _ gCnWeight: UnsafeMutablePointer<Double>?, _ gCnBias: UnsafeMutablePointer<Double>?,
    _ sums: UnsafePointer<Double>?, _ context: UnsafeMutablePointer<Double>?, _ contextLength: Int64,
    _ message: UnsafeMutablePointer<CChar>?, _ messageCapacity: Int64
) -> Int32 {
    guarded(message, messageCapacity) { () throws(BCNError) in
        try normBackward(flags, batch, channels, spatial, groups, x, dy, dx,
                         NormalizationGradients(bnWeight: gBnWeight, bnBias: gBnBias, cnWeight: gCnWeight,
                                                cnBias: gCnBias), sums, finishOnly: true, context, contextLength)
    }
}

@_cdecl("bcn_running_update_f32")
public func bcn_running_update_f32(
    _ flags: UInt32, _ channels: Int64, _ momentum: Double, _ moments: UnsafePointer<Double>?,
    _ runningMean: UnsafeMutablePointer<Float>?, _ runningVar: UnsafeMutablePointer<Float>?,
    _ numBatchesTracked: UnsafeMutablePointer<Int64>?,
    _ message: UnsafeMutablePointer<CChar>?, _ messageCapacity: Int64
) -> Int32 {
    guarded(message, messageCapacity) { () throws(BCNError) in
        try runningUpdate(flags, channels, momentum, moments, runningMean, runningVar, numBatchesTracked)
    }
}

@_cdecl("bcn_running_update_f64")
public func bcn_running_update_f64(
    _ flags: UInt32, _ channels: Int64, _ momentum: Double, _ moments: UnsafePointer<Double>?,
    _ runningMean: UnsafeMutablePointer<Double>?, _ runningVar: UnsafeMutablePointer<Double>?,
    _ numBatchesTracked: UnsafeMutablePointer<Int64>?,
    _ message: UnsafeMutablePointer<CChar>?, _ messageCapacity: Int64
) -> Int32 {
    guarded(message, messageCapacity) { () throws(BCNError) in
        try runningUpdate(flags, channels, momentum, moments, runningMean, runningVar, numBatchesTracked)
    }
}
