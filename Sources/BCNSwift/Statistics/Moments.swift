/// Count, mean and centred sum of squares (M2 = Σ (x - mean)²) of a set of values, in Float64.
///
/// Two sets merge exactly by Chan et al.'s formula:
///   n = nₐ + n_b,  δ = mean_b - meanₐ,  mean = meanₐ + δ·n_b/n,  M2 = M2ₐ + M2_b + δ²·nₐ·n_b/n.
/// Merging never forms E[x²] - E[x]², so the variance of values with a large mean survives.
@frozen
public struct Moments: Equatable, Sendable {
    /// n, the number of values (a Double, as the merge's weights are).
    public var count: Double
    /// Their mean (any value for an empty set, which merges as nothing).
    public var mean: Double
    /// M2 = Σ (x - mean)², ≥ 0.
    public var m2: Double

    /// The moments of a set with these numbers (the empty set by default).
    @inlinable
    public init(count: Double = 0, mean: Double = 0, m2: Double = 0) {
        self.count = count
        self.mean = mean
        self.m2 = m2
    }

    /// Biased variance M2 / n (0 for an empty set).
    @inlinable public var variance: Double { count > 0 ? m2 / count : 0 }

    /// The moments of this set and `other` together, by Chan's formula above (an empty set leaves the other as
    /// it is).
    @inlinable
    public mutating func merge(_ other: Moments) {
        if other.count == 0 { return }
        if count == 0 { self = other; return }
        (mean, m2) = Moments.merged(mean: mean, m2: m2, with: other.mean, other.m2,
                                    Moments.mergeWeights(count, other.count))
        count += other.count
    }

    /// The weights of `merge` for sets of nₐ and n_b values (both > 0): (n_b/n, nₐ·n_b/n). Sets of the same
    /// sizes (the planes of one stretch of rows) share them, so they are computed once for all.
    @inlinable
    static func mergeWeights(_ a: Double, _ b: Double) -> (mean: Double, m2: Double) {
        let n = a + b
        return (b / n, a * b / n)
    }

    /// `merge` of a set's (mean, M2) with another's (`otherMean`, `otherM2`), given their `mergeWeights`.
    @inlinable
    static func merged(mean: Double, m2: Double, with otherMean: Double, _ otherM2: Double,
                       _ weights: (mean: Double, m2: Double)) -> (mean: Double, m2: Double) {
        let delta = otherMean - mean
        return (mean + delta * weights.mean, m2 + (otherM2 + delta * delta * weights.m2))
    }

    /// `merged` of four pairs of sets of the same sizes, lane by lane: the same operations on each lane.
    @inlinable
    static func merged(mean: SIMD4<Double>, m2: SIMD4<Double>, with otherMean: SIMD4<Double>,
                       _ otherM2: SIMD4<Double>, _ weights: (mean: Double, m2: Double))
        -> (mean: SIMD4<Double>, m2: SIMD4<Double>)
    {
        let delta = otherMean - mean
        return (mean + delta * weights.mean, m2 + (otherM2 + delta * delta * weights.m2))
    }
}

/// Elements per chunk of a plane: 4096 Floats (16 KiB) or Doubles (32 KiB) stay in L1 between a chunk's two
/// passes. The partition of work into chunks depends on this constant alone, never on the thread count.
let planeChunkLength = 4096
