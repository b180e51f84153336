/// Why a bcnswift call refused to compute.
///
/// Every failure is detected before any output or running buffer is written, so a thrown error leaves the
/// layer exactly as it was. `message` is a complete sentence naming the argument and the value at fault.
public struct BCNError: Error, Equatable, CustomStringConvertible, Sendable {
    /// The broad class of a failure; the C ABI maps each to a status code (see `bcnswift.h`).
    public enum Kind: Int32, Sendable {
        /// An argument is outside its valid range (shape, group count, eps, momentum, ...).
        case invalidArgument = 1
        /// A shape does not match what the layer or the previous forward expects.
        case shapeMismatch = 2
        /// Training statistics would be undefined (one value per channel, or per group).
        case degenerateStatistics = 3
        /// `nanPolicy == .raise` and the input holds NaN or infinity.
        case nonFinite = 4
        /// `backward` was called with no forward to differentiate.
        case noForward = 5
        /// The call's scratch memory could not be allocated (nothing was written).
        case outOfMemory = 6
    }

    public let kind: Kind
    public let message: String

    public init(_ kind: Kind, _ message: String) {
        self.kind = kind
        self.message = message
    }

    public var description: String { message }
}
