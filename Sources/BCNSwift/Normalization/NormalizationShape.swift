/// Where the channel axis of an input lies in memory.
public enum MemoryFormat: Int32, Sendable {
    /// [B, C, S]: each (sample, channel) plane is S contiguous values (numpy's C order of [B, C, *]).
    case channelsFirst = 0
    /// [B, S, C]: each position holds its C channels contiguously (PyTorch's `channels_last`, the [B, *, C] of
    /// flax and Keras).
    case channelsLast = 1
}

/// An input of B samples, C channels and S = Π(spatial dims) positions (S = 1 for [B, C]), in memory as
/// [B, C, S] (B·C planes of S contiguous values) or, channels-last, as [B, S, C].
public struct NormalizationShape: Equatable, Sendable {
    /// B, the samples.
    public let batch: Int
    /// C, the channels.
    public let channels: Int
    /// S, the product of the spatial sizes (1 for [B, C]).
    public let spatial: Int
    /// How the values lie in memory.
    public let format: MemoryFormat

    /// Element count B·C·S (checked not to overflow at construction).
    public let count: Int

    /// Throws `.shapeMismatch` unless every size is positive, and `.invalidArgument` unless B·C·S is at most
    /// Int.max / 16, so that the byte counts of a call's arrays and scratch (a few Doubles a value) cannot
    /// overflow.
    public init(batch: Int, channels: Int, spatial: Int, format: MemoryFormat = .channelsFirst) throws(BCNError) {
        guard batch > 0, channels > 0, spatial > 0 else {
            throw BCNError(.shapeMismatch,
                           "input must have a positive batch, channel and spatial size, "
                           + "got [\(batch), \(channels), \(spatial)]")
        }
        let (bc, o1) = batch.multipliedReportingOverflow(by: channels)
        let (n, o2) = bc.multipliedReportingOverflow(by: spatial)
        guard !o1, !o2, n <= Int.max / 16 else {
            throw BCNError(.invalidArgument, "input of \(batch) x \(channels) x \(spatial) elements is too large")
        }
        self.batch = batch
        self.channels = channels
        self.spatial = spatial
        self.format = format
        self.count = n
    }

    /// From a full logical shape [B, C, d₂, …] (rank ≥ 2), laid out in memory as `format` says.
    public init(dimensions: [Int], format: MemoryFormat = .channelsFirst) throws(BCNError) {
        guard dimensions.count >= 2 else {
            throw BCNError(.shapeMismatch, "input must have rank >= 2 ([B, C, *]), got shape \(dimensions)")
        }
        var s = 1
        for d in dimensions.dropFirst(2) {
            guard d > 0 else {
                throw BCNError(.shapeMismatch, "input dimensions must be positive, got shape \(dimensions)")
            }
            let (p, o) = s.multipliedReportingOverflow(by: d)
            guard !o else { throw BCNError(.invalidArgument, "input shape \(dimensions) is too large") }
            s = p
        }
        try self.init(batch: dimensions[0], channels: dimensions[1], spatial: s, format: format)
    }

    /// B·C: the (sample, channel) planes of S values each.
    @inlinable public var planes: Int { batch * channels }

    /// Whether each channel holds two values (B·S = 2), where a batch-norm stage's dx exists only through eps, and
    /// so no Float32 lanes touch it: in the rows layout, short planes take no value view, and one-value planes'
    /// backward decides by the batch's count in the context (`RowsLayout.gradientLanes`), which over several
    /// processes is the whole batch's; channels-last (one sample of two rows) takes its moments, gradient sums
    /// and backward map in Float64. With ẑ = ±1/√(1 + eps/σ²) the two values' normalized inputs,
    /// dx = ±γ r (1 - ẑ²) (dy₁₁ - dy₁₂)/2 and 1 - ẑ² = eps/(σ² + eps): dx is what is left of its terms, about
    /// eps/σ² of their size, and their rounding to Float32 left 67 to 4e4 ulps of the largest |dx| ([2, 16] and
    /// [1, 16, 2] float32, eps 1e-5, and 96-204 channels-last; Float64: 0.1-0.5).
    var twoValuesAChannel: Bool { batch * spatial == 2 }
}
