import BCNSwift
import BCNSwiftTestSupport
import XCTest

/// `Double._chunkMoments` against a corrected two-pass sum over the array, on every
/// length from 1 to 40 and long ones, with data for each path (one pass kept; corrected; non-finite).
final class DoubleKernelTests: XCTestCase {
    var rng = SplitMix64(seed: 0xD0B1E)
    let lengths = Array(1...40) + [196, 1000, 4096]

    func exactMoments(_ v: [Double]) -> (mean: Double, m2: Double) {
        let mean = v.reduce(0, +) / Double(v.count)
        let d = v.map { $0 - mean }, correction = d.reduce(0, +)
        return (mean + correction / Double(v.count),
                d.reduce(0) { $0 + $1 * $1 } - correction * correction / Double(v.count))
    }

    func check(_ x: [Double], _ what: String, line: UInt = #line) {
        let got = x.withUnsafeBufferPointer { Double._chunkMoments($0.baseAddress!, count: $0.count) }
        let want = exactMoments(x), std = (want.m2 / Double(x.count)).squareRoot(), eps = Double.ulpOfOne
        XCTAssertLessThanOrEqual(abs(got.mean - want.mean), 32 * eps * (std + 1e-300), "\(what), n = \(x.count)",
                                 line: line)
        XCTAssertLessThanOrEqual(abs(got.m2 - want.m2), 64 * eps * want.m2 + 1e-300, "\(what), n = \(x.count)",
                                 line: line)
    }

    func testMomentsEveryPath() {
        for n in lengths {
            check((0..<n).map { _ in rng.normal(3, 2) }, "normal(3, 2)")
            check((0..<n).map { _ in rng.normal(1e8, 1e-3) }, "normal(1e8, 1e-3)")
            check((0..<n).map { i in i < 4 ? rng.normal(1e6, 1) : rng.normal(-2, 1e-3) }, "outlying head")
            check((0..<n).map { _ in rng.normal(1e150, 1e149) }, "magnitude 1e150")
            for value in [0, 1e7, -3.25, 1e-300] {
                let got = [Double](repeating: value, count: n).withUnsafeBufferPointer {
                    Double._chunkMoments($0.baseAddress!, count: n)
                }
                XCTAssertEqual(got.mean, value, "constant \(value), n = \(n)")
                XCTAssertEqual(got.m2, 0, "constant \(value), n = \(n)")
            }
        }
    }

    func testMomentsPropagateNonFinite() {
        for n in [1, 5, 8, 9, 196] {
            for bad in [Double.nan, .infinity, -.infinity] {
                var x = (0..<n).map { _ in rng.normal(1, 1) }
                x[n / 2] = bad
                let got = x.withUnsafeBufferPointer { Double._chunkMoments($0.baseAddress!, count: n) }
                XCTAssertFalse(got.mean.isFinite && got.m2.isFinite, "\(bad) in \(n)")
            }
        }
    }
}
