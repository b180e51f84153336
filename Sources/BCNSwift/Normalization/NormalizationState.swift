/// Caller-owned parameters and running buffers of a normalization, as raw pointers.
///
/// Batch-norm pointers address C elements and are required when the plan has a batch-norm stage; channel-norm
/// pointers address G elements and are required when it has a channel-norm stage. The engine reads parameters,
/// and writes the running buffers only after every check of a training forward has passed. (The Swift layers' own
/// arrays, as one value to save and load, are `NormalizationLayerState`.)
public struct NormalizationState<T: NormalizationScalar> {
    public var bnWeight: UnsafePointer<T>?
    public var bnBias: UnsafePointer<T>?
    public var runningMean: UnsafeMutablePointer<T>?
    public var runningVar: UnsafeMutablePointer<T>?
    public var numBatchesTracked: UnsafeMutablePointer<Int64>?
    public var cnWeight: UnsafePointer<T>?
    public var cnBias: UnsafePointer<T>?

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
    public var bnWeight: UnsafeMutablePointer<T>?
    public var bnBias: UnsafeMutablePointer<T>?
    public var cnWeight: UnsafeMutablePointer<T>?
    public var cnBias: UnsafeMutablePointer<T>?

    public init(bnWeight: UnsafeMutablePointer<T>? = nil, bnBias: UnsafeMutablePointer<T>? = nil,
                cnWeight: UnsafeMutablePointer<T>? = nil, cnBias: UnsafeMutablePointer<T>? = nil) {
        self.bnWeight = bnWeight; self.bnBias = bnBias; self.cnWeight = cnWeight; self.cnBias = cnBias
    }
}
