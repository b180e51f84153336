/// Caller-owned parameters and running buffers of a normalization, as raw pointers.
///
/// Batch-norm pointers address C elements and are required when the plan has a batch-norm stage; channel-norm
/// pointers address G elements and are required when it has a channel-norm stage. The engine reads parameters,
/// and writes the running buffers only after every check of a training forward has passed. (The Swift layers' own
/// arrays, as one value to save and load, are `NormalizationLayerState`.)
public struct NormalizationState<T: NormalizationScalar> {
    /// The batch-norm stage's γ (C values).
    public var bnWeight: UnsafePointer<T>?
    /// The batch-norm stage's β (C values).
    public var bnBias: UnsafePointer<T>?
    /// The running mean (C values; a training forward updates it).
    public var runningMean: UnsafeMutablePointer<T>?
    /// The running variance (C values; a training forward updates it).
    public var runningVar: UnsafeMutablePointer<T>?
    /// The training forwards counted (one value; needed with a batch-norm stage, advanced as
    /// `NormalizationLayer.numBatchesTracked` says).
    public var numBatchesTracked: UnsafeMutablePointer<Int64>?
    /// The channel-norm stage's per-group w (G values).
    public var cnWeight: UnsafePointer<T>?
    /// The channel-norm stage's per-group b (G values).
    public var cnBias: UnsafePointer<T>?

    /// The pointers; nil for a stage the plan does not have.
    public init(
        bnWeight: UnsafePointer<T>? = nil, bnBias: UnsafePointer<T>? = nil,
        runningMean: UnsafeMutablePointer<T>? = nil, runningVar: UnsafeMutablePointer<T>? = nil,
        numBatchesTracked: UnsafeMutablePointer<Int64>? = nil,
        cnWeight: UnsafePointer<T>? = nil, cnBias: UnsafePointer<T>? = nil
    ) {
        self.bnWeight = bnWeight; self.bnBias = bnBias
        self.runningMean = runningMean; self.runningVar = runningVar; self.numBatchesTracked = numBatchesTracked
        self.cnWeight = cnWeight; self.cnBias = cnBias
    }
}

/// Caller-owned parameter-gradient accumulators: the backward *adds* to each non-nil one.
public struct NormalizationGradients<T: NormalizationScalar> {
    /// dγ of the batch-norm stage (C values).
    public var bnWeight: UnsafeMutablePointer<T>?
    /// dβ of the batch-norm stage (C values).
    public var bnBias: UnsafeMutablePointer<T>?
    /// dw of the channel-norm stage (G values).
    public var cnWeight: UnsafeMutablePointer<T>?
    /// db of the channel-norm stage (G values).
    public var cnBias: UnsafeMutablePointer<T>?

    /// The accumulators; nil for a gradient the caller does not want.
    public init(bnWeight: UnsafeMutablePointer<T>? = nil, bnBias: UnsafeMutablePointer<T>? = nil,
                cnWeight: UnsafeMutablePointer<T>? = nil, cnBias: UnsafeMutablePointer<T>? = nil) {
        self.bnWeight = bnWeight; self.bnBias = bnBias; self.cnWeight = cnWeight; self.cnBias = cnBias
    }
}
