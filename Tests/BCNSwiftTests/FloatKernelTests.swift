import BCNSwift
import BCNSwiftTestSupport
import XCTest

/// White-box tests of the Float kernels against Float64 sums of the same Float inputs: every length from 1 to 70
/// (all tail lengths, with and without full vectors and blocks) and a few long ones, and data that drives each
/// path of `_chunkMoments` (one pass; corrected second pass; from scratch; wide Float64).
/// Tolerances are in units of Float's ulp of one (ε = 2⁻²³).
final class FloatKernelTests: XCTestCase {
    var rng = SplitMix64(seed: 0xF10A7)
    let eps = Double(Float.ulpOfOne)
    let lengths = Array(1...70) + [127, 196, 255, 256, 257, 784, 4095, 4096]

    /// Count, mean and M2 of the Float values, in Float64 two-pass (exact enough to be the truth here).
    func exactMoments(_ x: [Float]) -> (mean: Double, m2: Double) {
        let v = x.map(Double.init), mean = v.reduce(0, +) / Double(v.count)
        let d = v.map { $0 - mean }, correction = d.reduce(0, +)
        return (mean + correction / Double(v.count),
                d.reduce(0) { $0 + $1 * $1 } - correction * correction / Double(v.count))
    }

    func checkMoments(_ x: [Float], _ what: String, m2Ulps: Double = 64, meanUlps: Double = 32,
                      line: UInt = #line) {
        let got = x.withUnsafeBufferPointer { Float._chunkMoments($0.baseAddress!, count: $0.count) }
        let want = exactMoments(x), n = Double(x.count), std = (want.m2 / n).squareRoot()
        XCTAssertEqual(got.count, n, line: line)
        XCTAssertLessThanOrEqual(abs(got.mean - want.mean), meanUlps * eps * std + 1e-300,
                                 "\(what), n = \(x.count): mean \(got.mean) vs \(want.mean)", line: line)
        XCTAssertLessThanOrEqual(abs(got.m2 - want.m2), m2Ulps * eps * want.m2 + 1e-300,
                                 "\(what), n = \(x.count): M2 \(got.m2) vs \(want.m2)", line: line)
    }

    func testMomentsOnePassAndCorrected() {
        for n in lengths {
            // shift close to the mean: the one-pass result is kept
            checkMoments((0..<n).map { _ in Float(rng.normal(3, 2)) }, "normal(3, 2)")
            // a large mean against a small spread (the shift is within a few spreads of the mean)
            checkMoments((0..<n).map { _ in Float(rng.normal(100, 0.01)) }, "normal(100, 0.01)")
            checkMoments((0..<n).map { _ in Float(rng.normal(-1e4, 1)) }, "normal(-1e4, 1)")
            // the first eight values far from the rest: the one-pass result is rejected and corrected
            checkMoments((0..<n).map { i in Float(i < 8 ? rng.normal(1000, 1) : rng.normal(-2, 0.01)) },
                         "outlying head")
            // a step: half zeros (as after a ReLU), half positive
            checkMoments((0..<n).map { i in i < n / 2 ? 0 : Float(rng.normal(4, 1)) }, "zeros then values")
        }
    }

    func testMomentsExtremeMagnitudesAndConstants() {
        for n in lengths {
            checkMoments((0..<n).map { _ in Float(rng.normal(1e20, 1e19)) }, "1e20")     // from scratch, then wide
            checkMoments((0..<n).map { _ in Float(rng.normal(3e-20, 1e-20)) }, "3e-20")  // tiny: wide
            checkMoments((0..<n).map { _ in Float(rng.normal(0, 1e-17)) }, "1e-17 around 0")
            for value: Float in [0, 1e7, -3.25, 1e-30, 3e38] {
                let got = [Float](repeating: value, count: n).withUnsafeBufferPointer {
                    Float._chunkMoments($0.baseAddress!, count: n)
                }
                XCTAssertEqual(got.mean, Double(value), "constant \(value), n = \(n)")
                XCTAssertEqual(got.m2, 0, "constant \(value), n = \(n)")
            }
        }
    }

    func testMomentsPropagateNonFinite() {
        for n in [1, 7, 8, 9, 16, 17, 196] {
            for bad: Float in [.nan, .infinity, -.infinity] {
                for at in Set([0, n / 2, n - 1]) {
                    var x = (0..<n).map { _ in Float(rng.normal(1, 1)) }
                    x[at] = bad
                    let got = x.withUnsafeBufferPointer { Float._chunkMoments($0.baseAddress!, count: n) }
                    XCTAssertFalse(got.mean.isFinite && got.m2.isFinite, "\(bad) at \(at) of \(n)")
                }
            }
        }
    }

    /// `_planeMoments` (pairs of short planes, and octets of 16, 24 or 32 values) gives each plane exactly
    /// `_chunkMoments`' numbers: planes whose one pass is kept, corrected, refused for range (a pair's partner
    /// then goes on alone), or not finite (both of its pair fall back; in an octet, that plane alone), zero
    /// planes of either sign, plane counts that leave pairs and single planes after the octets, and odd first
    /// planes, across the pair and octet paths' lengths and beyond.
    func testPlaneMomentsEqualChunkMomentsBitForBit() {
        func bits(_ v: Double) -> UInt64 { v.isNaN ? 0x7FF8_0000_0000_0000 : v.bitPattern }
        for n in [8, 15, 16, 17, 24, 32, 63, 64, 100, 196, 255, 256, 257, 263, 264, 300] {
            let planes = 19
            var x = [Float]()
            for plane in 0..<planes {
                x += (0..<n).map { i -> Float in
                    switch plane {
                    case 2: return i == 3 ? .nan : Float(rng.normal(1, 1))              // shift not finite
                    case 3: return Float(rng.normal(1e20, 1e19))                          // out of range: unshifted
                    case 4: return Float(i < 8 ? rng.normal(1000, 1) : rng.normal(-2, 0.01))  // corrected
                    case 5: return 2.5                                                    // constant
                    case 6: return i < n / 2 ? 0 : Float(rng.normal(4, 1))
                    case 10: return i == 0 ? .infinity : Float(rng.normal(1, 1))         // shift infinite
                    case 11: return -0.0                                                  // zeros, negative
                    case 12: return 0                                                     // zeros
                    case 13: return i == n - 1 ? -.infinity : Float(rng.normal(-1, 3))   // past the shift's values
                    case 14: return Float(rng.normal(-3e-20, 1e-21))                      // below the range
                    case 15: return Float(rng.normal(3e38, 1e36))                         // the shift overflows
                    default: return Float(rng.normal(3 - Double(plane), 2))
                    }
                }
            }
            for first in [0, 1, 2, 3] {
                let count = planes - first
                var mean = [Double](repeating: -1, count: count), m2 = mean
                x.withUnsafeBufferPointer { xs in
                    Float._planeMoments(xs.baseAddress! + first * n, planes: count, spatial: n, mean: &mean, m2: &m2)
                    for k in 0..<count {
                        let want = Float._chunkMoments(xs.baseAddress! + (first + k) * n, count: n)
                        XCTAssertEqual(bits(mean[k]), bits(want.mean), "mean, n = \(n), plane \(first + k)")
                        XCTAssertEqual(bits(m2[k]), bits(want.m2), "M2, n = \(n), plane \(first + k)")
                    }
                }
            }
        }
    }

    /// `_planeGradientSums` (octets of planes of 16, 24 or 32 values) gives each plane exactly `_gradientSums`'
    /// numbers: ordinary planes, centres far from Float's grid, sums that overflow Float32 (the Float64 fallback),
    /// non-finite values, zeros of either sign, and plane counts and first planes that leave single planes after
    /// the octets; lengths on and off the octet path.
    func testPlaneGradientSumsEqualGradientSumsBitForBit() {
        func bits(_ v: Double) -> UInt64 { v.isNaN ? 0x7FF8_0000_0000_0000 : v.bitPattern }
        for n in [8, 15, 16, 17, 24, 32, 40, 64, 196] {
            let planes = 19
            var x = [Float](), dy = [Float](), centres = [Double]()
            for plane in 0..<planes {
                x += (0..<n).map { _ in Float(plane == 3 ? rng.normal(1e5, 1) : rng.normal(2 - Double(plane), 2)) }
                dy += (0..<n).map { i -> Float in
                    switch plane {
                    case 2: return i == 5 ? .nan : Float(rng.normal(0.5, 1))
                    case 4: return Float(rng.normal(3e38, 1e37))                     // Σ dy overflows Float32
                    case 9: return i == n - 1 ? -.infinity : Float(rng.normal(0, 1))
                    case 10: return -0.0
                    case 11: return 0
                    default: return Float(rng.normal(0.3, 1))
                    }
                }
                centres.append(plane == 3 ? 1e5 + 1.0 / 3 : rng.normal(2 - Double(plane), 0.5))
            }
            for first in [0, 1, 3] {
                let count = planes - first
                var sums = [Double](repeating: -1, count: count), dots = sums
                x.withUnsafeBufferPointer { xs in
                    dy.withUnsafeBufferPointer { gs in
                        let x0 = xs.baseAddress! + first * n, g0 = gs.baseAddress! + first * n
                        centres.withUnsafeBufferPointer {
                            Float._planeGradientSums(g0, x0, planes: count, spatial: n,
                                                     centres: $0.baseAddress! + first, sums: &sums, dots: &dots)
                        }
                        for k in 0..<count {
                            let shift = Float._earlyMean(g0 + k * n, count: n)  // as `_planeGradientSums` takes
                            let want = Float._gradientSums(g0 + k * n, x0 + k * n, count: n, centre: centres[first + k],
                                                           dyShift: shift)
                            XCTAssertEqual(bits(sums[k]), bits(want.sum), "Σ dy, n = \(n), plane \(first + k)")
                            XCTAssertEqual(bits(dots[k]), bits(want.dot),
                                           "Σ (dy - s)(x - c), n = \(n), plane \(first + k)")
                        }
                    }
                }
            }
        }
    }

    /// `_scaleShiftPlanes` and `_combinePlanes` (four planes' constants at a time for planes of 16 to 32 values)
    /// give each plane exactly `_scaleShift`'s and `_combine`'s values, out of place and in place, for plane
    /// counts and first planes that leave single planes after the quads, and lengths on and off that path.
    func testPlaneMapsEqualPerPlaneMapsBitForBit() {
        for n in [8, 15, 16, 24, 32, 40, 64] {
            let planes = 11
            let x = (0..<planes * n).map { i in Float(rng.normal(Double(i / n) - 4, 2)) }
            let dy = (0..<planes * n).map { _ in Float(rng.normal(0.3, 1)) }
            // centres off Float's grid and far from 0 in some planes: the constants' Float64 residue matters
            let centres: [Double] = (0..<planes).map { k -> Double in
                k % 3 == 0 ? 1e4 + 1.0 / 3 : rng.normal(Double(k) - 4, 0.5)
            }
            let scales = (0..<planes).map { _ in rng.normal(0.7, 0.3) }
            let offsets = (0..<planes).map { _ in rng.normal(1, 1) }
            let rs = (0..<planes).map { _ in rng.normal(0, 1) }
            let dySums = (0..<planes).map { k in dy[k * n..<(k + 1) * n].reduce(0.0) { $0 + Double($1) } }
            for first in [0, 1, 3] {
                let count = planes - first, at = first * n
                var want = [Float](repeating: 0, count: count * n), dxWant = want
                for k in 0..<count {
                    let p = first + k
                    x.withUnsafeBufferPointer { xs in
                        dy.withUnsafeBufferPointer { gs in
                            want.withUnsafeMutableBufferPointer {
                                Float._scaleShift(xs.baseAddress! + p * n, $0.baseAddress! + k * n, count: n,
                                                  centre: centres[p], scale: scales[p], offset: offsets[p])
                            }
                            dxWant.withUnsafeMutableBufferPointer {
                                Float._combine(gs.baseAddress! + p * n, xs.baseAddress! + p * n,
                                               $0.baseAddress! + k * n, count: n, centre: centres[p],
                                               dyMean: dySums[p] / Double(n), p: scales[p], q: offsets[p], r: rs[p])
                            }
                        }
                    }
                }
                var y = [Float](repeating: .nan, count: count * n), inPlace = Array(x[at...])
                var dx = y, dxInPlace = Array(dy[at...])
                x.withUnsafeBufferPointer { xs in
                    let x0 = xs.baseAddress! + at
                    Float._scaleShiftPlanes(x0, &y, planes: count, spatial: n, centres: Array(centres[first...]),
                                            scales: Array(scales[first...]), offsets: Array(offsets[first...]))
                    inPlace.withUnsafeMutableBufferPointer {
                        Float._scaleShiftPlanes($0.baseAddress!, $0.baseAddress!, planes: count, spatial: n,
                                                centres: Array(centres[first...]), scales: Array(scales[first...]),
                                                offsets: Array(offsets[first...]))
                    }
                    dy.withUnsafeBufferPointer { gs in
                        Float._combinePlanes(gs.baseAddress! + at, x0, &dx, planes: count, spatial: n,
                                             centres: Array(centres[first...]), dySums: Array(dySums[first...]),
                                             p: Array(scales[first...]), q: Array(offsets[first...]),
                                             r: Array(rs[first...]))
                    }
                    dxInPlace.withUnsafeMutableBufferPointer {
                        Float._combinePlanes($0.baseAddress!, x0, $0.baseAddress!, planes: count, spatial: n,
                                             centres: Array(centres[first...]), dySums: Array(dySums[first...]),
                                             p: Array(scales[first...]), q: Array(offsets[first...]),
                                             r: Array(rs[first...]))
                    }
                }
                XCTAssertEqual(y.map(\.bitPattern), want.map(\.bitPattern), "map, n = \(n), first \(first)")
                XCTAssertEqual(inPlace.map(\.bitPattern), want.map(\.bitPattern), "map in place, n = \(n)")
                XCTAssertEqual(dx.map(\.bitPattern), dxWant.map(\.bitPattern), "combine, n = \(n), first \(first)")
                XCTAssertEqual(dxInPlace.map(\.bitPattern), dxWant.map(\.bitPattern), "combine in place, n = \(n)")
            }
        }
    }

    func testScaleShiftEveryTailInPlaceAndOutOfPlace() {
        for n in lengths {
            let x = (0..<n).map { _ in Float(rng.normal(2, 3)) }
            let centre = rng.normal(2, 0.1), scale = rng.normal(0.5, 0.2), offset = rng.normal(1, 1)
            let want = x.map { offset + scale * (Double($0) - centre) }
            var out = [Float](repeating: .nan, count: n + 1)  // one guard element after the end
            x.withUnsafeBufferPointer { xs in
                out.withUnsafeMutableBufferPointer {
                    Float._scaleShift(xs.baseAddress!, $0.baseAddress!, count: n, centre: centre, scale: scale,
                                      offset: offset)
                }
            }
            var inPlace = x
            inPlace.withUnsafeMutableBufferPointer {
                Float._scaleShift($0.baseAddress!, $0.baseAddress!, count: n, centre: centre, scale: scale,
                                  offset: offset)
            }
            XCTAssertTrue(out.last!.isNaN, "wrote past the end, n = \(n)")
            XCTAssertEqual(Array(out.prefix(n)), inPlace, "in place differs, n = \(n)")
            XCTAssertLessThan(maxScaledError(inPlace, want), 4 * eps, "n = \(n)")
        }
    }

    func testGradientSumsAndCombineEveryTail() {
        for n in lengths {
            let x = (0..<n).map { _ in Float(rng.normal(-1, 2)) }, dy = (0..<n).map { _ in Float(rng.normal(0.5, 1)) }
            let centre = rng.normal(-1, 0.1), shift = Float(rng.normal(0.5, 1))
            let sums = dy.withUnsafeBufferPointer { g in
                x.withUnsafeBufferPointer {
                    Float._gradientSums(g.baseAddress!, $0.baseAddress!, count: n, centre: centre, dyShift: shift)
                }
            }
            let sum = dy.reduce(0.0) { $0 + Double($1) }, s = Double(shift)
            let dot = zip(dy, x).reduce(0.0) { $0 + (Double($1.0) - s) * (Double($1.1) - centre) }
            let sumScale = dy.reduce(0.0) { $0 + abs(Double($1) - s) } + abs(s) * Double(n)
            let dotScale = zip(dy, x).reduce(0.0) { $0 + abs((Double($1.0) - s) * (Double($1.1) - centre)) }
            XCTAssertLessThanOrEqual(abs(sums.sum - sum), 16 * eps * sumScale, "Σdy, n = \(n)")
            XCTAssertLessThanOrEqual(abs(sums.dot - dot), 16 * eps * dotScale, "Σ(dy-s)(x-c), n = \(n)")

            let p = rng.normal(0.7, 0.1), q = rng.normal(-0.2, 0.1), r = rng.normal(0.1, 0.1)
            let want = (0..<n).map { p * Double(dy[$0]) + q * (Double(x[$0]) - centre) + r }
            var dx = [Float](repeating: .nan, count: n + 1)
            dy.withUnsafeBufferPointer { g in
                x.withUnsafeBufferPointer { xs in
                    dx.withUnsafeMutableBufferPointer {
                        Float._combine(g.baseAddress!, xs.baseAddress!, $0.baseAddress!, count: n, centre: centre,
                                       dyMean: sum / Double(max(n, 1)), p: p, q: q, r: r)
                    }
                }
            }
            var inPlace = dy
            x.withUnsafeBufferPointer { xs in
                inPlace.withUnsafeMutableBufferPointer {
                    Float._combine($0.baseAddress!, xs.baseAddress!, $0.baseAddress!, count: n, centre: centre,
                                   dyMean: sum / Double(max(n, 1)), p: p, q: q, r: r)
                }
            }
            XCTAssertTrue(dx.last!.isNaN, "wrote past the end, n = \(n)")
            XCTAssertEqual(Array(dx.prefix(n)), inPlace, "in place differs, n = \(n)")
            XCTAssertLessThan(maxScaledError(inPlace, want), 8 * eps, "n = \(n)")
        }
    }
}
