import Foundation  // tests only; the library itself stays free of Foundation

/// A plain Float64 reference of Batch-Channel Normalization: loops straight from the definitions, no fusion,
/// E[(x - mean)²] computed directly. Used to check the fused engine; its own gradients are derived by finite
/// differences in the tests, never by hand, so the two cannot share a mistake.
public struct ReferenceBCN {
    public enum BatchNormKind { case none, batch, estimated(aroundRunningMean: Bool) }

    public var channels: Int, groups: Int   // groups 0: no channel-norm stage
    public var kind: BatchNormKind
    public var eps: Double, momentum: Double
    public var unbiased: Bool
    public var gamma: [Double], beta: [Double], w: [Double], b: [Double]
    public var runningMean: [Double], runningVar: [Double]

    public init(channels: Int, groups: Int, kind: BatchNormKind, eps: Double = 1e-5, momentum: Double = 0.1,
                unbiased: Bool) {
        self.channels = channels; self.groups = groups; self.kind = kind
        self.eps = eps; self.momentum = momentum; self.unbiased = unbiased
        gamma = Array(repeating: 1, count: channels); beta = Array(repeating: 0, count: channels)
        w = Array(repeating: 1, count: groups); b = Array(repeating: 0, count: groups)
        runningMean = Array(repeating: 0, count: channels); runningVar = Array(repeating: 1, count: channels)
    }

    /// Output for x [B, C, S]; updates the running buffers when `training`.
    public mutating func forward(_ x: [Double], batch B: Int, spatial S: Int, training: Bool) -> [Double] {
        let C = channels
        func at(_ bi: Int, _ c: Int, _ s: Int) -> Int { (bi * C + c) * S + s }
        var y1 = x
        switch kind {
        case .none:
            break
        case .batch, .estimated:
            var mean = runningMean, variance = runningVar
            if training {
                let n = Double(B * S)
                for c in 0..<C {
                    var m = 0.0
                    for bi in 0..<B { for s in 0..<S { m += x[at(bi, c, s)] } }
                    m /= n
                    var around = m
                    if case .estimated(true) = kind { around = runningMean[c] }
                    var v = 0.0, vb = 0.0
                    for bi in 0..<B {
                        for s in 0..<S {
                            let d = x[at(bi, c, s)] - around; v += d * d
                            let e = x[at(bi, c, s)] - m; vb += e * e
                        }
                    }
                    v /= n; vb /= n
                    let folded = unbiased ? v * n / (n - 1) : v
                    runningMean[c] = (1 - momentum) * runningMean[c] + momentum * m
                    runningVar[c] = (1 - momentum) * runningVar[c] + momentum * folded
                    if case .batch = kind { mean[c] = m; variance[c] = vb } else {
                        mean[c] = runningMean[c]; variance[c] = runningVar[c]
                    }
                }
            }
            for bi in 0..<B {
                for c in 0..<C {
                    for s in 0..<S {
                        let i = at(bi, c, s)
                        y1[i] = gamma[c] * (x[i] - mean[c]) / (variance[c] + eps).squareRoot() + beta[c]
                    }
                }
            }
        }
        guard groups > 0 else { return y1 }
        let K = C / groups, n = Double(K * S)
        var out = y1
        for bi in 0..<B {
            for g in 0..<groups {
                let lo = (bi * C + g * K) * S, hi = lo + K * S
                var m = 0.0
                for i in lo..<hi { m += y1[i] }
                m /= n
                var v = 0.0
                for i in lo..<hi { v += (y1[i] - m) * (y1[i] - m) }
                v /= n
                for i in lo..<hi { out[i] = w[g] * (y1[i] - m) / (v + eps).squareRoot() + b[g] }
            }
        }
        return out
    }
}

/// Weight Standardization from the definition, in Float64.
public func referenceWeightStandardization(_ w: [Double], outChannels: Int, eps: Double, unbiased: Bool,
                                           epsInsideSquareRoot: Bool) -> [Double] {
    let n = w.count / outChannels
    var out = w
    for o in 0..<outChannels {
        let row = w[(o * n)..<((o + 1) * n)]
        let mean = row.reduce(0, +) / Double(n)
        let v = row.reduce(0) { $0 + ($1 - mean) * ($1 - mean) } / Double(n - (unbiased ? 1 : 0))
        let den = epsInsideSquareRoot ? (v + eps).squareRoot() : v.squareRoot() + eps
        for i in 0..<n { out[o * n + i] = (row[row.startIndex + i] - mean) / den }
    }
    return out
}

/// Maximum over elements of |a - b| / max(1, |b|).
public func maxScaledError<T: BinaryFloatingPoint>(_ a: [T], _ b: [Double]) -> Double {
    precondition(a.count == b.count, "compared arrays differ in length")
    var e = 0.0
    for i in a.indices { e = max(e, abs(Double(a[i]) - b[i]) / max(1, abs(b[i]))) }
    return e
}

/// A small deterministic generator (SplitMix64) so Swift tests draw fresh but reproducible inputs.
public struct SplitMix64: RandomNumberGenerator {
    var state: UInt64
    public init(seed: UInt64) { state = seed }
    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
    /// Normal(mean, std) by Box-Muller.
    public mutating func normal(_ mean: Double = 0, _ std: Double = 1) -> Double {
        let u = Double.random(in: Double.ulpOfOne..<1, using: &self), v = Double.random(in: 0..<1, using: &self)
        return mean + std * (-2 * log(u)).squareRoot() * cos(2 * Double.pi * v)
    }
}
