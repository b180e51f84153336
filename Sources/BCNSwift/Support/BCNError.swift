/// Why a bcnswift call refused to compute.
///
/// Every failure is detected before any output or running buffer is written, so a thrown error leaves the
/// layer exactly as it was. `message` is a complete sentence naming the argument and the value at fault.
public struct BCNError: Error, Equatable, CustomStringConvertible, Sendable {
    /// The broad class of a failure; the C ABI maps each to a status code (see `bcnswift.h`).
    public enum Kind: Int32, Sendable {
        /// An argument is outside its valid range (group count, eps, momentum, a count of batches, a shape too
        /// large to address, ...).
        case invalidArgument = 1
        /// A shape or an array's size does not match what the layer, its parameters or the previous forward
        /// expect (a size of 0 or below, a rank below 2, a count of elements that is not the shape's).
        case shapeMismatch = 2
        /// Statistics would be undefined: one value per channel in training with batch statistics, or one value
        /// per group in any mode (a group's variance is always measured); a fan-in of 1 with an unbiased WS.
        case degenerateStatistics = 3
        /// `nanPolicy == .raise` and the input (or a backward's dy) holds NaN or infinity. Parameters and running
        /// buffers are not screened.
        case nonFinite = 4
        /// `backward` was called with no forward to differentiate.
        case noForward = 5
        /// Memory for the call (its output, scratch, or a layer's arrays) could not be allocated; nothing was
        /// written.
        case outOfMemory = 6
    }

    /// The class of the failure, which the C ABI returns as its status code.
    public let kind: Kind
    /// A complete sentence naming the argument and the value at fault.
    public let message: String

    /// An error of `kind` that says `message`.
    public init(_ kind: Kind, _ message: String) {
        self.kind = kind
        self.message = message
    }

    public var description: String { message }
}

extension BCNError {
    /// Throws `.invalidArgument` unless `eps`, added to a variance under a square root, is positive and finite: the
    /// one rule for every eps, each named (`name`) as its caller knows it.
    static func checkEps(_ eps: Double, named name: String) throws(BCNError) {
        guard eps > 0, eps.isFinite else {
            throw BCNError(.invalidArgument, "\(name) must be a positive finite number, got \(eps)")
        }
    }
}
