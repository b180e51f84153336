import BCNSwift
import CBCNSwift

/// The flag bits of bcnswift.h, the one place they are defined, as the exports test them.
enum Flag {
    static let batchNorm = UInt32(BCN_BATCH_NORM)
    static let estimated = UInt32(BCN_ESTIMATED)
    static let unbiasedRunningVar = UInt32(BCN_UNBIASED_RUNNING_VAR)
    static let varianceAroundRunningMean = UInt32(BCN_VARIANCE_AROUND_RUNNING_MEAN)
    static let cumulativeAverage = UInt32(BCN_CUMULATIVE_AVERAGE)
    static let channelNorm = UInt32(BCN_CHANNEL_NORM)
    static let nanRaise = UInt32(BCN_NAN_RAISE)
    static let training = UInt32(BCN_TRAINING)
    static let channelsLast = UInt32(BCN_CHANNELS_LAST)
    static let all = UInt32(BCN_FLAGS_ALL)

    static let wsUnbiased = UInt32(BCN_WS_UNBIASED)
    static let wsEpsInSqrt = UInt32(BCN_WS_EPS_IN_SQRT)
    static let wsAll = UInt32(BCN_WS_FLAGS_ALL)
}

/// The header's status code for an error.
func status(_ kind: BCNError.Kind) -> Int32 {
    switch kind {
    case .invalidArgument: return BCN_ERR_INVALID_ARGUMENT
    case .shapeMismatch: return BCN_ERR_SHAPE
    case .degenerateStatistics: return BCN_ERR_DEGENERATE
    case .nonFinite: return BCN_ERR_NONFINITE
    case .noForward: return BCN_ERR_NO_FORWARD
    case .outOfMemory: return BCN_ERR_OUT_OF_MEMORY
    }
}

/// Copies `message` into the caller's buffer, truncated and NUL-terminated; nothing if the buffer is null or empty.
func report(_ message: String, into buffer: UnsafeMutablePointer<CChar>?, capacity: Int64) {
    guard let buffer, capacity > 0 else { return }
    var n = 0
    for byte in message.utf8 where Int64(n) < capacity - 1 {
        buffer[n] = CChar(bitPattern: byte)
        n += 1
    }
    buffer[n] = 0
}

/// Runs `body`, returning BCN_OK or the error's status code after writing its message.
@inline(__always)
func guarded(_ message: UnsafeMutablePointer<CChar>?, _ capacity: Int64,
             _ body: () throws(BCNError) -> Void) -> Int32 {
    do {
        try body()
        if let message, capacity > 0 { message[0] = 0 }
        return BCN_OK
    } catch {
        report(error.message, into: message, capacity: capacity)
        return status(error.kind)
    }
}

func nonNull<P>(_ pointer: P?, _ name: String) throws(BCNError) -> P {
    guard let pointer else { throw BCNError(.invalidArgument, "\(name) must not be null") }
    return pointer
}

func intSize(_ value: Int64, _ name: String) throws(BCNError) -> Int {
    guard value > 0, value <= Int64(Int.max) else {
        throw BCNError(.invalidArgument, "\(name) must be positive, got \(value)")
    }
    return Int(value)
}
