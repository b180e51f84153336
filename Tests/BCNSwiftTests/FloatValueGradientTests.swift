@testable import BCNSwift
import BCNSwiftTestSupport
import XCTest

/// White-box tests of the Float32 lanes of the [B, C] backward (Kernels/Float+ValueGradients.swift) on one item
/// of a row, against Float64 sums of the same values: which groups the guard lets through, their sums T and W,
/// and each value's dy₁ and x - μ. (The layer-level tests in python/tests/test_numerics.py check the results of
/// whole calls; these check that the lanes themselves compute what the Float64 path does, and are taken.)
final class FloatValueGradientTests: XCTestCase {
    var rng = SplitMix64(seed: 0xB4C3)
    let eps = Double(Float.ulpOfOne), groupEps = 1e-5

    /// Collects what the kernels hand a sink, by tensor index.
    final class Collected: FloatValueSink {
        var dy1: [Float], z: [Float], channels: [Int]
        init(_ n: Int) { dy1 = Array(repeating: .nan, count: n); z = dy1; channels = Array(repeating: -1, count: n) }
        func lanes(_ i: Int, _ c: Int, _ dy1: SIMD8<Float>, _ z: SIMD8<Float>) {
            for l in 0..<8 { self.dy1[i + l] = dy1[l]; self.z[i + l] = z[l]; channels[i + l] = c + l }
        }
        func prepare(first c0: Int, count n: Int) {}
        func flush(first c0: Int, count n: Int) {}
    }

    /// One item of four groups of K = 16 channels, from value `first` of a row: group 2 is 20 standard
    /// deviations off 0 (refused by `RowRounding.acceptsGradient`), group 3 has dy of 1e-30 (refused by
    /// `acceptsGradientSums`); groups 0 and 1 take the lanes, and match the Float64 algebra.
    func testItemSumsAndValuesMatchFloat64AndRefuseWhatTheGuardRefuses() {
        let K = 16, groups = 4, C = K * groups, first = 8
        let mu = (0..<C).map { _ in rng.normal(0.5, 1) }, a = (0..<C).map { _ in rng.normal(1, 0.3) }
        let beta = (0..<C).map { _ in rng.normal(0, 0.3) }, weight = (0..<groups).map { _ in rng.normal(1, 0.3) }
        var x = [Float](repeating: 0, count: first + C), dy = x
        for c in 0..<C {
            x[first + c] = Float(mu[c] + rng.normal(0.2, 1.5) + (c / K == 2 ? 20 / a[c] : 0))
            dy[first + c] = Float(rng.normal(0.3, 1) * (c / K == 3 ? 1e-30 : 1))
        }
        // the forward's m and r of each group, from ȳ = β + a (x - μ) in Float64
        let yBar = (0..<C).map { c in beta[c] + a[c] * (Double(x[first + c]) - mu[c]) }
        var m = [Double](), r = [Double](), reach = [Double]()
        for g in 0..<groups {
            let v = yBar[g * K..<(g + 1) * K], mean = v.reduce(0, +) / Double(K)
            m.append(mean)
            r.append(1 / (v.reduce(0) { $0 + ($1 - mean) * ($1 - mean) } / Double(K) + groupEps).squareRoot())
            reach.append(beta[g * K..<(g + 1) * K].map(abs).max()!)
        }
        var storage = [Float](repeating: 0, count: 4 * C), t = [Double](repeating: .nan, count: groups), w = t
        var constants = [UInt8](repeating: 0, count: Float.GradientConstants.bytes(groups: groups))
        let out = Collected(first + C)
        let kept = storage.withUnsafeMutableBufferPointer { s in
            let lanes = Float.ValueConstants(count: C, mu: mu, a: a, beta: beta, storage: s.baseAddress!)
            let kept = Float._valueItemGradientSums(x.withUnsafeBufferPointer { $0.baseAddress! + first },
                                                    dy.withUnsafeBufferPointer { $0.baseAddress! + first },
                                                    groups: groups, size: K, lanes, means: m, inverses: r,
                                                    weights: weight, betaReach: reach, t: &t, w: &w)
            constants.withUnsafeMutableBytes { raw in
                let table = Float.GradientConstants(raw.baseAddress!, groups: groups)
                for g in 0..<groups where kept & (1 << UInt64(g)) != 0 {
                    table.store(t: t[g], w: w[g], planes: K, m: m[g], r: r[g], weight: weight[g], group: g)
                }
                Float._valueItemGradients(x.withUnsafeBufferPointer { $0.baseAddress! + first },
                                          dy.withUnsafeBufferPointer { $0.baseAddress! + first }, first: first,
                                          channel: 0, size: K, lanes, constants: table,
                                          groups: kept, into: out)
            }
            return kept
        }
        XCTAssertEqual(kept, 0b0011, "groups 0 and 1 take the lanes; 2 (far off 0) and 3 (tiny dy) do not")
        for g in 0..<2 {
            let range = g * K..<(g + 1) * K
            let tWant = range.reduce(0.0) { $0 + Double(dy[first + $1]) }
            let wWant = range.reduce(0.0) { $0 + (yBar[$1] - m[g]) * Double(dy[first + $1]) }
            let tScale = range.reduce(0.0) { $0 + abs(Double(dy[first + $1])) }
            let wScale = range.reduce(0.0) { $0 + abs((yBar[$1] - m[g]) * Double(dy[first + $1])) }
            XCTAssertLessThanOrEqual(abs(t[g] - tWant), 8 * eps * tScale, "T of group \(g)")
            XCTAssertLessThanOrEqual(abs(w[g] - wWant), 8 * eps * wScale, "W of group \(g)")
            // dy₁ = r w (dy - T/K) - r³ w W/K (ȳ - m) from the Float64 sums, and its scale: the terms' size
            let rw = r[g] * weight[g], c = rw * r[g] * r[g] * wWant / Double(K)
            for k in range {
                let terms = abs(rw * (Double(dy[first + k]) - tWant / Double(K))) + abs(c * (yBar[k] - m[g]))
                let want = rw * (Double(dy[first + k]) - tWant / Double(K)) - c * (yBar[k] - m[g])
                let scale = range.reduce(0.0) { s, j in
                    max(s, abs(rw * (Double(dy[first + j]) - tWant / Double(K))) + abs(c * (yBar[j] - m[g])))
                }
                XCTAssertLessThanOrEqual(abs(Double(out.dy1[first + k]) - want), 8 * eps * max(scale, terms),
                                         "dy₁ of channel \(k)")
                XCTAssertLessThanOrEqual(abs(Double(out.z[first + k]) - (Double(x[first + k]) - mu[k])),
                                         2 * eps * abs(Double(x[first + k]) - mu[k]), "x - μ of channel \(k)")
                XCTAssertEqual(out.channels[first + k], k)
            }
        }
        XCTAssertTrue(out.dy1[(first + 2 * K)...].allSatisfy(\.isNaN), "refused groups reach no sink")
    }

    /// Groups of up to 64 values take the four-group kernel (`_valueQuadsGradientSums`), the rest of an item one
    /// group at a time: both give, bit for bit, what `_valueGroupGradientSums` gives each group alone, and the
    /// item's kept groups and their T and W land at their own indices. Among the groups: dy near 0, far off it
    /// and near the edge of `_shift`'s rule, and, refused, a NaN dy, an infinite x and a dy of signed zeros.
    func testFourGroupSumsMatchOneGroupAtATimeBitForBit() {
        for K in [8, 16, 24, 64, 72] {
            for groups in [1, 4, 7, 9] {
                let C = K * groups
                let mu = (0..<C).map { _ in rng.normal(0.5, 1) }, a = (0..<C).map { _ in rng.normal(1, 0.3) }
                let beta = (0..<C).map { _ in rng.normal(0.1, 0.3) }
                var x = (0..<C).map { c in Float(mu[c] + rng.normal(0.3, 1.5)) }
                // dy's mean near 0 (shift 0), far off it (shift kept), and near the shift rule's edge
                var dy = (0..<C).map { c in Float(rng.normal([0.2, 40, 2.5][c / K % 3], 1)) }
                if groups > 4 { dy[2 * K + 3] = .nan; x[4 * K + 1] = .infinity }
                if groups > 5 { for i in 0..<K { dy[5 * K + i] = i % 2 == 0 ? -0.0 : 0 } }
                let m = (0..<groups).map { _ in rng.normal(0.2, 0.5) }
                let r = (0..<groups).map { _ in abs(rng.normal(1, 0.3)) }, weight = r.map { 1.5 - $0 / 2 }
                let reach = (0..<groups).map { g in beta[g * K..<(g + 1) * K].map(abs).max()! }
                var storage = [Float](repeating: 0, count: 4 * C), t = [Double](repeating: 7, count: groups), w = t
                let what = "K = \(K), \(groups) groups (seed 0xB4C3)"
                storage.withUnsafeMutableBufferPointer { s in
                    let c = Float.ValueConstants(count: C, mu: mu, a: a, beta: beta, storage: s.baseAddress!)
                    x.withUnsafeBufferPointer { xs in
                        dy.withUnsafeBufferPointer { dys in
                            let kept = Float._valueItemGradientSums(xs.baseAddress!, dys.baseAddress!, groups: groups,
                                                                    size: K, c, means: m, inverses: r, weights: weight,
                                                                    betaReach: reach, t: &t, w: &w)
                            for g in 0..<groups {
                                let want = Float._valueGroupGradientSums(xs.baseAddress!, dys.baseAddress!,
                                                                         from: g * K, count: K, c, mean: m[g])
                                let open = RowRounding.acceptsGradient(m: m[g], r: r[g], weight: weight[g],
                                                                       beta: reach[g])
                                let keep = open && RowRounding.acceptsGradientSums(count: K, want)
                                XCTAssertEqual(kept >> UInt64(g) & 1 == 1, keep, "group \(g) kept, \(what)")
                                guard keep else { continue }
                                XCTAssertEqual(t[g].bitPattern, want[0].bitPattern, "T of group \(g), \(what)")
                                XCTAssertEqual(w[g].bitPattern, want[1].bitPattern, "W of group \(g), \(what)")
                            }
                            XCTAssertEqual(kept >> UInt64(groups), 0, "no bits beyond the item's groups, \(what)")
                            if groups > 5 && K <= 64 {
                                XCTAssertEqual(kept & 0b11_1111, 0b00_1011, "groups 0, 1 and 3 kept, \(what)")
                            }
                        }
                    }
                }
            }
        }
    }
}
