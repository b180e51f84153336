import BCNSwift

// Status codes and flag bits; they must match include/bcnswift.h.
let statusOK: Int32 = 0

enum Flag {
    static let batchNorm: UInt32 = 1 << 0
    static let estimated: UInt32 = 1 << 1
    static let unbiasedRunningVar: UInt32 = 1 << 2
    static let varianceAroundRunningMean: UInt32 = 1 << 3
    static let cumulativeAverage: UInt32 = 1 << 4
    static let channelNorm: UInt32 = 1 << 5
    static let nanRaise: UInt32 = 1 << 6
    static let training: UInt32 = 1 << 7
    static let all: UInt32 = (1 << 8) - 1

    static let wsUnbiased: UInt32 = 1 << 0
    static let wsEpsInSqrt: UInt32 = 1 << 1
    static let wsAll: UInt32 = 3
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

/// Runs `body`, returning 0 or the error's status code after writing its message.
@inline(__always)
func guarded(_ message: UnsafeMutablePointer<CChar>?, _ capacity: Int64,
             _ body: () throws(BCNError) -> Void) -> Int32 {
    do {
        try body()
        if let message, capacity > 0 { message[0] = 0 }
        return statusOK
    } catch {
        report(error.message, into: message, capacity: capacity)
        return error.kind.rawValue
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
