/// How the batch-norm stage of a layer gets its statistics while training.
public enum BatchStatistics: Int32, Sendable {
    /// Normalize with the batch's mean and biased variance; gradients flow through them (PyTorch BatchNorm2d,
    /// labml `BatchNorm`).
    case batch = 1
    /// First fold the batch into the running estimates, then normalize with those; gradients treat them as
    /// constants (labml `EstimatedBatchNorm`, the authors' `EstBN`).
    case estimated = 2
}

/// Around which mean the estimated batch norm measures the batch variance that it folds into `runningVar`.
public enum VarianceCentre: Int32, Sendable {
    /// (1/n) Σ (x - batch mean)²: labml's `EstimatedBatchNorm`.
    case batchMean = 0
    /// (1/n) Σ (x - running mean before this update)²: the authors' `EstBN`.
    case runningMean = 1
}

/// What to do when the input (or, in a backward, dy) holds NaN or ±infinity.
public enum NaNPolicy: Int32, Sendable {
    /// Let it flow into outputs and running buffers, as PyTorch does by default.
    case propagate = 0
    /// Throw `BCNError.Kind.nonFinite` before anything is written.
    case raise = 1
}

/// Options of the batch-norm stage.
///
/// Training with `momentum = m` updates `running ← (1 - m)·running + m·batch`; with `momentum = nil` the factor
/// is `1 / numBatchesTracked` (a cumulative average, as PyTorch). The variance folded into `runningVar` is the
/// batch's biased variance times n/(n-1) when `unbiasedRunningVariance`, n = batch × spatial size; with
/// `varianceCentre = .runningMean` (estimated statistics only) the biased variance plus (batch mean - running
/// mean)², before that factor.
public struct BatchNormOptions: Equatable, Sendable {
    /// Batch statistics, or their running estimates, in training.
    public var statistics: BatchStatistics
    /// Added to the variance under the square root; > 0 and finite.
    public var eps: Double
    /// Update rate of the running buffers in [0, 1], or nil for a cumulative average.
    public var momentum: Double?
    /// Whether the variance folded into `runningVar` is the batch's times n/(n-1) (PyTorch) or the biased one.
    public var unbiasedRunningVariance: Bool
    /// Around which mean the folded variance is measured; `.runningMean` with estimated statistics only.
    public var varianceCentre: VarianceCentre

    /// - Parameter unbiasedRunningVariance: nil picks the documents' choice: true with batch statistics
    ///   (PyTorch), false when estimating (labml and the authors' EstBN both store the biased variance).
    public init(
        statistics: BatchStatistics = .batch, eps: Double = 1e-5, momentum: Double? = 0.1,
        unbiasedRunningVariance: Bool? = nil, varianceCentre: VarianceCentre = .batchMean
    ) {
        self.statistics = statistics
        self.eps = eps
        self.momentum = momentum
        self.unbiasedRunningVariance = unbiasedRunningVariance ?? (statistics == .batch)
        self.varianceCentre = varianceCentre
    }

    /// Throws `.invalidArgument` naming the first option out of range: eps not positive and finite, momentum
    /// outside [0, 1] (or NaN), `.runningMean` with batch statistics.
    public func validate() throws(BCNError) {
        try BCNError.checkEps(eps, named: "the batch-norm stage's eps")  // (the C ABI's bn_eps: named apart)
        if let m = momentum, !(m >= 0 && m <= 1) {
            throw BCNError(.invalidArgument, "momentum must be in [0, 1], got \(m)")
        }
        // it names how estimates fold a batch in; batch statistics would ignore it without a word
        guard varianceCentre == .batchMean || statistics == .estimated else {
            throw BCNError(.invalidArgument, "varianceCentre .runningMean (BCN_VARIANCE_AROUND_RUNNING_MEAN) applies "
                                             + "to estimated statistics only")
        }
    }
}

/// Options of the channel-norm stage: per sample, statistics over each group of `channels / groups` channels,
/// then a per-group affine.
public struct ChannelNormOptions: Equatable, Sendable {
    /// G, the number of groups: > 0 and dividing the channel count.
    public var groups: Int
    /// Added to the group variance under the square root; > 0 and finite.
    public var eps: Double

    /// The options; `validate(channels:)` checks them against a channel count.
    public init(groups: Int, eps: Double = 1e-5) {
        self.groups = groups
        self.eps = eps
    }

    /// Throws `.invalidArgument` unless `channels` and `groups` are positive, `groups` divides `channels`, and
    /// eps is positive and finite.
    public func validate(channels: Int) throws(BCNError) {
        guard channels > 0 else { throw BCNError(.invalidArgument, "channels must be positive, got \(channels)") }
        guard groups > 0 else { throw BCNError(.invalidArgument, "groups must be positive, got \(groups)") }
        guard channels % groups == 0 else {
            throw BCNError(.invalidArgument,
                           "channels (\(channels)) must be divisible by groups (\(groups))")
        }
        try BCNError.checkEps(eps, named: "the channel-norm stage's eps")
    }
}

/// The whole computation: an optional batch-norm stage followed by an optional channel-norm stage.
/// BatchNorm is (bn, nil), ChannelNorm (nil, cn), BatchChannelNorm (bn, cn) fused into one pass.
public struct NormalizationPlan: Equatable, Sendable {
    /// C, the channel count: in 1...2^32 (`maxChannels`).
    public var channels: Int
    /// The batch-norm stage, first; nil without one.
    public var batchNorm: BatchNormOptions?
    /// The channel-norm stage, after the batch norm; nil without one.
    public var channelNorm: ChannelNormOptions?
    /// What NaN or infinity in an input (or a backward's dy) does.
    public var nanPolicy: NaNPolicy

    /// The plan; `validate()` checks it.
    public init(channels: Int, batchNorm: BatchNormOptions?, channelNorm: ChannelNormOptions?,
                nanPolicy: NaNPolicy = .propagate) {
        self.channels = channels
        self.batchNorm = batchNorm
        self.channelNorm = channelNorm
        self.nanPolicy = nanPolicy
    }

    /// Channels a plan may have at most: 2^32, beyond any network, and far below where the O(C) buffers of a
    /// layer or a call (a few C-sized arrays) would overflow their byte counts.
    public static let maxChannels = 1 << 32

    /// Throws unless `channels` is in 1...2^32, at least one stage is present (neither would be the identity,
    /// which no caller means), and each stage's options are valid.
    public func validate() throws(BCNError) {
        guard channels > 0, channels <= Self.maxChannels else {
            throw BCNError(.invalidArgument, "channels must be positive and at most 2^32, got \(channels)")
        }
        guard batchNorm != nil || channelNorm != nil else {
            throw BCNError(.invalidArgument, "a plan needs a batch-norm stage, a channel-norm stage or both")
        }
        try batchNorm?.validate()
        try channelNorm?.validate(channels: channels)
    }

    /// Number of channel groups (0 without a channel-norm stage).
    @inlinable public var groups: Int { channelNorm?.groups ?? 0 }
}
