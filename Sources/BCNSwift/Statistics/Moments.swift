/// Count, mean and centred sum of squares (M2 = Σ (x - mean)²) of a set of values, in Float64.
///
/// Two sets merge exactly by Chan et al.'s formula:
///   n = nₐ + n_b,  δ = mean_b - meanₐ,  mean = meanₐ + δ·n_b/n,  M2 = M2ₐ + M2_b + δ²·nₐ·n_b/n.
/// Merging never forms E[x²] - E[x]², so the variance of values with a large mean survives.
@frozen
public struct Moments: Equatable, Sendable {
    public var count: Double
    public var mean: Double
    public var m2: Double

    @inlinable
    public init(count: Double = 0, mean: Double = 0, m2: Double = 0) {
        self.count = count
        self.mean = mean
        self.m2 = m2
    }

    /// Biased variance M2 / n (0 for an empty set).
    @inlinable public var variance: Double { count > 0 ? m2 / count : 0 }

    @inlinable
    public mutating func merge(_ other: Moments) {
        if other.count == 0 { return }
        if count == 0 { self = other; return }
        let n = count + other.count
        let delta = other.mean - mean
        mean += delta * (other.count / n)
        m2 += other.m2 + delta * delta * (count * other.count / n)
        count = n
    }
}

/// Elements per chunk of a plane: 4096 Floats (16 KiB) or Doubles (32 KiB) stay in L1 between a chunk's two
/// passes. The partition of work into chunks depends on this constant alone, never on the thread count.
public let planeChunkLength = 4096
