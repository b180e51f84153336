@testable import BCNSwift
import BCNSwiftTestSupport
import XCTest

/// White-box tests of the channels-last layout's plane moments: a stretch of rows measured around a shift of
/// its own (`ChannelsLastLayout.shift`, `stretchMoments`), summed again in Float64 where the shift was off, and a
/// sample's stretches merged by Chan's formula (`planeMoments`). Against Float64 two-pass moments of the same
/// values.
final class ChannelsLastLayoutTests: XCTestCase {
    var rng = SplitMix64(seed: 0xC1A5_7EAD)

    /// Mean and M2 of column c of a [rows, C] block, two-pass in Float64 (the truth here).
    func exactMoments<T: BinaryFloatingPoint>(_ x: [T], rows: Int, columns C: Int, _ c: Int, first: Int = 0)
        -> (mean: Double, m2: Double)
    {
        let v = (0..<rows).map { Double(x[(first + $0) * C + c]) }, mean = v.reduce(0, +) / Double(rows)
        let d = v.map { $0 - mean }, correction = d.reduce(0, +)
        return (mean + correction / Double(rows), d.reduce(0) { $0 + $1 * $1 } - correction * correction / Double(rows))
    }

    /// `stretchMoments` from the column sums of a block around shifts `k`.
    func stretchMoments<T: NormalizationScalar>(_ x: [T], rows: Int, columns C: Int, shift k: [T])
        -> (mean: [Double], m2: [Double])
    {
        var sums = [Double](repeating: 0, count: 2 * C)
        x.withUnsafeBufferPointer { xs in
            k.withUnsafeBufferPointer { ks in
                sums.withUnsafeMutableBufferPointer { s in
                    let mean = s.baseAddress!, m2 = mean + C
                    T._columnSums(xs.baseAddress!, rows: rows, columns: C, stride: C, centre: ks.baseAddress!,
                                  sums: mean, squares: m2, partials: nil)
                    ChannelsLastLayout.stretchMoments(xs.baseAddress!, rows: rows, columns: C,
                                                      shift: ks.baseAddress!, mean: mean, m2: m2)
                }
            }
        }
        return (Array(sums[..<C]), Array(sums[C...]))
    }

    /// Columns whose shift lies 300 spreads off the mean: their Float32 sums around it would cancel to a few
    /// digits of M2 (about 5e-3 relative), so the rule sends them to the Float64 pass; the others keep the
    /// Float32 sums (about 1e-7). Every tail of four columns, and a column of NaN.
    func testStretchMomentsSumAgainWhereTheShiftWasOff() {
        for (rows, C) in [(64, 40), (9, 13), (200, 8), (3, 5)] {
            var x = (0..<rows * C).map { _ in Float(rng.normal(1000, 0.5)) }
            x[C - 1] = .nan  // the last column's first value
            let k = (0..<C).map { c -> Float in c % 2 == 0 ? 1150 : 1000.1 }
            let got = stretchMoments(x, rows: rows, columns: C, shift: k)
            for c in 0..<C - 1 {
                let want = exactMoments(x, rows: rows, columns: C, c), what = "rows \(rows) columns \(C) c \(c)"
                XCTAssertEqual(got.mean[c], want.mean, accuracy: 1e-6 * 0.5, what)
                XCTAssertEqual(got.m2[c], want.m2, accuracy: 4e-6 * want.m2, what)
            }
            XCTAssert(got.mean[C - 1].isNaN && got.m2[C - 1].isNaN, "NaN column: \(got.mean[C - 1]), \(got.m2[C - 1])")
        }
    }

    /// A stretch's shift lies within its values' range, for every count of rows (fewer than eight: all of them).
    func testShiftIsNearTheMean() {
        for rows in [1, 2, 7, 8, 9, 100] {
            let C = 11, x = (0..<rows * C).map { _ in Float(rng.normal(-40, 2)) }
            var k = [Float](repeating: .nan, count: C)
            x.withUnsafeBufferPointer { xs in
                k.withUnsafeMutableBufferPointer { ChannelsLastLayout.shift(xs.baseAddress!, rows: rows, columns: C,
                                                                            into: $0.baseAddress!) }
            }
            for c in 0..<C {
                let column = (0..<rows).map { x[$0 * C + c] }
                XCTAssert(k[c] >= column.min()! && k[c] <= column.max()!, "rows \(rows): shift \(k[c])")
            }
        }
    }

    /// Whole samples of several stretches (20000 rows of 8 channels: 8192, 8192, 3616), planes far from zero whose
    /// mean drifts across the rows: the stretches' moments merged in order, against two-pass moments of the
    /// sample's plane, in Double and in Float.
    func testPlaneMomentsMergeStretches() throws {
        try checkPlaneMoments(Double.self, tolerance: 1e-12)
        try checkPlaneMoments(Float.self, tolerance: 4e-6)
    }

    /// A plane of 1e20 ± 3e19 in Float: its squares around the shift overflow Float32 while Σd stays finite, so
    /// the stretch is summed again in Float64 (it was kept with M2 = inf, and the layer's output was NaN).
    func testPlaneMomentsWhoseSquaresOverflowFloat() throws {
        let B = 1, C = 8, S = 64
        let x = (0..<B * S * C).map { i in Float(i % C == 0 ? rng.normal(1e20, 3e19) : rng.normal(2, 1)) }
        let (p, q) = try planeMoments(x, batch: B, channels: C, spatial: S)
        for c in 0..<C {
            let want = exactMoments(x, rows: S, columns: C, c)
            XCTAssert(q[c].isFinite, "c \(c): M2 \(q[c])")
            XCTAssertEqual(p[c], want.mean, accuracy: 1e-6 * (want.m2 / Double(S)).squareRoot(), "c \(c)")
            XCTAssertEqual(q[c], want.m2, accuracy: 4e-6 * want.m2, "c \(c)")
        }
    }

    /// `planeMoments` of a [B, S, C] input (p and q of every plane, b-major).
    func planeMoments<T: NormalizationScalar>(_ x: [T], batch B: Int, channels C: Int, spatial S: Int) throws
        -> (p: [Double], q: [Double])
    {
        let layout = ChannelsLastLayout(shape: try NormalizationShape(batch: B, channels: C, spatial: S))
        var p = [Double](repeating: .nan, count: B * C), q = p
        var arena = try ScratchArena(bytes: layout.scratchBytes(T.self))
        x.withUnsafeBufferPointer { xs in
            p.withUnsafeMutableBufferPointer { ps in
                q.withUnsafeMutableBufferPointer { qs in
                    layout.planeMoments(xs.baseAddress!, p: ps.baseAddress!, q: qs.baseAddress!, arena: &arena)
                }
            }
        }
        return (p, q)
    }

    func checkPlaneMoments<T: NormalizationScalar>(_: T.Type, tolerance: Double) throws {
        let B = 2, C = 8, S = 20000
        let x = (0..<B * S * C).map { i in
            let row = i / C % S, c = i % C
            return T(1e3 + Double(c) + Double(row) / Double(S) * 0.3 + rng.normal(0, 0.05))
        }
        let (p, q) = try planeMoments(x, batch: B, channels: C, spatial: S)
        for b in 0..<B {
            for c in 0..<C {
                let want = exactMoments(x, rows: S, columns: C, c, first: b * S), what = "\(T.self) b \(b) c \(c)"
                // the spread is about 0.1; the mean is also rounded to a Double near 1000
                XCTAssertEqual(p[b * C + c], want.mean, accuracy: tolerance * 0.1 + 4 * want.mean.ulp, what)
                XCTAssertEqual(q[b * C + c], want.m2, accuracy: tolerance * want.m2, what)
            }
        }
    }
}
