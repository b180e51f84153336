import BCNSwift
import BCNSwiftTestSupport
import XCTest

/// White-box tests of the column kernels of channels-last input (`_columnSums`, `_columnGradientSums`): their
/// two reading orders, a strip of columns down a block's rows (sums in registers) and each row in order (sums in
/// `partials`), give the same bits, for every tail of columns and rows, with row strides wider than the rows, for
/// Float and Double; and both are the column sums, against Float64 sums of the same values. Float's maps
/// (`_mapColumns`, `_combineColumns`) give each value's bits as one value at a time, in place and out.
final class ColumnKernelTests: XCTestCase {
    var rng = SplitMix64(seed: 0xC01_5EED)
    let columnCounts = Array(1...40) + [63, 64, 65, 96, 128, 257]
    let rowCounts = [1, 2, 7, 8, 9, 16, 17, 33]

    /// Runs `check(columns, rows, stride)` over the shapes: every column count with a few row counts, and
    /// strides equal to the row or a few values wider.
    func forEachShape(_ check: (Int, Int, Int) -> Void) {
        for n in columnCounts {
            for rows in rowCounts where n <= 64 || rows <= 9 {
                check(n, rows, n)
                check(n, rows, n + 3)
            }
        }
    }

    func checkSums<T: NormalizationScalar & BinaryFloatingPoint>(_: T.Type, tolerance: Double) {
        forEachShape { n, rows, stride in
            let x = (0..<rows * stride).map { _ in T(rng.normal(2.5, 3)) }
            let centre = (0..<n).map { _ in T(rng.normal(2, 1)) }
            let start = (0..<2 * n).map { _ in rng.normal(1, 1) }  // the kernels add to what is there
            for withCentre in [true, false] {
                var inRegisters = start, inOrder = start, partials = [T](repeating: .nan, count: 2 * n)
                x.withUnsafeBufferPointer { xs in
                    centre.withUnsafeBufferPointer { k in
                        let k = withCentre ? k.baseAddress! : nil
                        inRegisters.withUnsafeMutableBufferPointer { s in
                            T._columnSums(xs.baseAddress!, rows: rows, columns: n, stride: stride, centre: k,
                                          sums: s.baseAddress!, squares: s.baseAddress! + n, partials: nil)
                        }
                        inOrder.withUnsafeMutableBufferPointer { s in
                            partials.withUnsafeMutableBufferPointer { p in
                                T._columnSums(xs.baseAddress!, rows: rows, columns: n, stride: stride, centre: k,
                                              sums: s.baseAddress!, squares: s.baseAddress! + n,
                                              partials: p.baseAddress!)
                            }
                        }
                    }
                }
                let what = "\(T.self) columns \(n) rows \(rows) stride \(stride) centre \(withCentre)"
                XCTAssertEqual(inOrder.map(\.bitPattern), inRegisters.map(\.bitPattern), what)
                for c in 0..<n {
                    let k = withCentre ? Double(centre[c]) : 0
                    let d = (0..<rows).map { Double(x[$0 * stride + c]) - k }
                    let sum = d.reduce(0, +), squares = d.reduce(0) { $0 + $1 * $1 }
                    let scale = d.reduce(0) { $0 + abs($1) } + 1
                    XCTAssertEqual(inOrder[c], start[c] + sum, accuracy: tolerance * scale, what)
                    XCTAssertEqual(inOrder[n + c], start[n + c] + squares, accuracy: tolerance * (squares + 1), what)
                }
            }
        }
    }

    func checkGradientSums<T: NormalizationScalar & BinaryFloatingPoint>(_: T.Type, tolerance: Double) {
        forEachShape { n, rows, stride in
            let x = (0..<rows * stride).map { _ in T(rng.normal(-1.5, 2)) }
            let dy = (0..<rows * stride).map { _ in T(rng.normal(0.5, 1)) }
            let centre = (0..<n).map { _ in T(rng.normal(-1, 1)) }
            let shift = (0..<n).map { _ in T(rng.normal(0.5, 1)) }
            let start = (0..<2 * n).map { _ in rng.normal(-1, 1) }
            var inRegisters = start, inOrder = start, partials = [T](repeating: .nan, count: 2 * n)
            for (out, withPartials) in [(0, false), (1, true)] {
                var sums = out == 0 ? inRegisters : inOrder
                x.withUnsafeBufferPointer { xs in
                    dy.withUnsafeBufferPointer { g in
                        sums.withUnsafeMutableBufferPointer { s in
                            partials.withUnsafeMutableBufferPointer { p in
                                T._columnGradientSums(g.baseAddress!, xs.baseAddress!, rows: rows, columns: n,
                                                      stride: stride, centre: centre, dyShift: shift,
                                                      sums: s.baseAddress!, dots: s.baseAddress! + n,
                                                      partials: withPartials ? p.baseAddress! : nil)
                            }
                        }
                    }
                }
                if out == 0 { inRegisters = sums } else { inOrder = sums }
            }
            let what = "\(T.self) columns \(n) rows \(rows) stride \(stride)"
            XCTAssertEqual(inOrder.map(\.bitPattern), inRegisters.map(\.bitPattern), what)
            for c in 0..<n {
                let g = (0..<rows).map { Double(dy[$0 * stride + c]) - Double(shift[c]) }  // about the shift
                let e = (0..<rows).map { Double(x[$0 * stride + c]) - Double(centre[c]) }
                let dot = zip(g, e).reduce(0) { $0 + $1.0 * $1.1 }
                let scale = zip(g, e).reduce(0) { $0 + abs($1.0) * (abs($1.1) + 1) } + 1
                XCTAssertEqual(inOrder[c], start[c] + g.reduce(0, +), accuracy: tolerance * scale, what)
                XCTAssertEqual(inOrder[n + c], start[n + c] + dot, accuracy: tolerance * scale, what)
            }
        }
    }

    /// Float sums 8 rows in Float32 before Float64: a few ulps of Float32 relative to the terms' magnitude.
    /// `_combineColumns` gives every value dx = r + q (x - centre) + p (dy - dyCentre) as Float computes it one value
    /// at a time (two fused multiply-adds), for every column count and row stride of the shapes (rows of exactly 32
    /// channels back to back take their own loop), out of place and with dx aliasing dy.
    func testFloatCombineColumnsEveryShapeInPlaceAndOut() {
        forEachShape { n, rows, stride in
            let count = (rows - 1) * stride + n
            func draws(_ count: Int, _ mean: Double, _ deviation: Double) -> [Float] {
                (0..<count).map { _ in Float(rng.normal(mean, deviation)) }
            }
            let x = draws(count, 1, 2), dy = draws(count, 0, 1), centre = draws(n, 1, 0.5), p = draws(n, 1, 0.3)
            let q = draws(n, -0.2, 0.1), r = draws(n, 0, 0.1), dyCentre = draws(n, 0, 0.5)
            var want = [Float](repeating: .nan, count: count)
            for row in 0..<rows {
                for c in 0..<n {
                    let i = row * stride + c
                    want[i] = r[c].addingProduct(x[i] - centre[c], q[c]).addingProduct(dy[i] - dyCentre[c], p[c])
                }
            }
            var out = [Float](repeating: .nan, count: count), inPlace = dy
            Float._combineColumns(dy, x, &out, rows: rows, columns: n, stride: stride, centre: centre,
                                  dyCentre: dyCentre, p: p, q: q, r: r)
            inPlace.withUnsafeMutableBufferPointer {
                Float._combineColumns($0.baseAddress!, x, $0.baseAddress!, rows: rows, columns: n, stride: stride,
                                      centre: centre, dyCentre: dyCentre, p: p, q: q, r: r)
            }
            for row in 0..<rows {
                for c in 0..<n {
                    let i = row * stride + c
                    XCTAssertEqual(out[i].bitPattern, want[i].bitPattern, "\(rows) rows of \(n) (stride \(stride))")
                    XCTAssertEqual(inPlace[i].bitPattern, want[i].bitPattern, "in place, \(rows) rows of \(n)")
                }
            }
        }
    }

    /// `_mapColumns` gives every value y = offset + scale (x - centre) as Float computes it one value at a time
    /// (one fused multiply-add), for every column count and row stride of the shapes (rows of exactly 64
    /// channels back to back go row by row), out of place and in place.
    func testFloatMapColumnsEveryShapeInPlaceAndOut() {
        forEachShape { n, rows, stride in
            let count = (rows - 1) * stride + n
            let x = (0..<count).map { _ in Float(rng.normal(1, 2)) }
            let centre = (0..<n).map { _ in Float(rng.normal(1, 0.5)) }
            let scale = (0..<n).map { _ in Float(rng.normal(1, 0.3)) }
            let offset = (0..<n).map { _ in Float(rng.normal(0, 1)) }
            var want = [Float](repeating: .nan, count: count)
            for row in 0..<rows {
                for c in 0..<n {
                    let i = row * stride + c
                    want[i] = offset[c].addingProduct(x[i] - centre[c], scale[c])
                }
            }
            var out = [Float](repeating: .nan, count: count), inPlace = x
            Float._mapColumns(x, &out, rows: rows, columns: n, stride: stride, centre: centre, scale: scale,
                              offset: offset)
            inPlace.withUnsafeMutableBufferPointer {
                Float._mapColumns($0.baseAddress!, $0.baseAddress!, rows: rows, columns: n, stride: stride,
                                  centre: centre, scale: scale, offset: offset)
            }
            for row in 0..<rows {
                for c in 0..<n {
                    let i = row * stride + c
                    XCTAssertEqual(out[i].bitPattern, want[i].bitPattern, "\(rows) rows of \(n) (stride \(stride))")
                    XCTAssertEqual(inPlace[i].bitPattern, want[i].bitPattern, "in place, \(rows) rows of \(n)")
                }
            }
        }
    }

    func testFloatSumsInOrderEqualInRegisters() { checkSums(Float.self, tolerance: 16 * Double(Float.ulpOfOne)) }
    func testDoubleSumsInOrderEqualInRegisters() { checkSums(Double.self, tolerance: 64 * Double.ulpOfOne) }
    func testFloatGradientSumsInOrderEqualInRegisters() {
        checkGradientSums(Float.self, tolerance: 16 * Double(Float.ulpOfOne))
    }
    func testDoubleGradientSumsInOrderEqualInRegisters() {
        checkGradientSums(Double.self, tolerance: 64 * Double.ulpOfOne)
    }
}
