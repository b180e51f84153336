// Four-lane loops and loads over Double arrays: how the units' algebra (`NormalizationUnit`), the batch-norm
// stage and the layouts walk per-plane and per-channel numbers.

/// Loops over K Doubles four lanes at a time, with a scalar tail that does the same operations per element, so
/// an element's result never depends on its position. Reductions keep four lane sums, added pairwise at the end.
///
/// The loop counters here and in the units' value loops wrap (`&+`): they stay below a count that fits the
/// tensor, and Swift's overflow checks on them were 5-8% of the rows layout's instructions (callgrind). Offsets
/// computed from them inside a step (`k + 4`, a tail's `i + k`) keep their checks: wrapping those too changed
/// the register allocation of the hot loops for the worse (backward [256, 1024]: 6.63M -> 6.86M instructions).
enum Lanes {
    @inline(__always)
    static func map(_ n: Int, into out: UnsafeMutablePointer<Double>, _ vector: (Int) -> SIMD4<Double>,
                    scalar: (Int) -> Double) {
        var k = 0
        while k &+ 4 <= n { out.storeLanes(vector(k), k); k &+= 4 }
        while k < n { out[k] = scalar(k); k &+= 1 }
    }

    /// Three sums in one pass, eight lanes of each at a time, added to `a`, `b`, `c`.
    @inline(__always)
    static func accumulate(_ n: Int, _ vector: (Int) -> (SIMD4<Double>, SIMD4<Double>, SIMD4<Double>),
                           scalar: (Int) -> (Double, Double, Double), into a: inout Double, _ b: inout Double,
                           _ c: inout Double) {
        var a0 = SIMD4<Double>(), a1 = a0, b0 = a0, b1 = a0, c0 = a0, c1 = a0, k = 0
        while k &+ 8 <= n {
            let (x0, y0, z0) = vector(k), (x1, y1, z1) = vector(k + 4)
            a0 += x0; b0 += y0; c0 += z0; a1 += x1; b1 += y1; c1 += z1
            k &+= 8
        }
        if k &+ 4 <= n { let (x, y, z) = vector(k); a0 += x; b0 += y; c0 += z; k &+= 4 }
        a += reduce(a0 + a1); b += reduce(b0 + b1); c += reduce(c0 + c1)
        while k < n { let (x, y, z) = scalar(k); a += x; b += y; c += z; k &+= 1 }
    }

    /// Two sums in one pass, as `accumulate` adds them.
    @inline(__always)
    static func sums(_ n: Int, _ vector: (Int) -> (SIMD4<Double>, SIMD4<Double>),
                     scalar: (Int) -> (Double, Double)) -> (Double, Double) {
        var a0 = SIMD4<Double>(), a1 = a0, b0 = a0, b1 = a0, k = 0
        while k &+ 8 <= n {
            let (x0, y0) = vector(k), (x1, y1) = vector(k + 4)
            a0 += x0; b0 += y0; a1 += x1; b1 += y1
            k &+= 8
        }
        if k &+ 4 <= n { let (x, y) = vector(k); a0 += x; b0 += y; k &+= 4 }
        var a = 0 + reduce(a0 + a1), b = 0 + reduce(b0 + b1)  // 0 + : a -0 sum is +0, as `accumulate`'s
        while k < n { let (x, y) = scalar(k); a += x; b += y; k &+= 1 }
        return (a, b)
    }

    @inline(__always)
    static func reduce(_ v: SIMD4<Double>) -> Double { (v[0] + v[1]) + (v[2] + v[3]) }

    /// Scalars of the unit backward, also as lanes.
    struct Constants {
        let rw4, r4, r3wW4, hConst4, wg4, invN4, m4: SIMD4<Double>
        @inline(__always)
        init(rw: Double, r: Double, r3wW: Double, hConst: Double, wg: Double, invN: Double, m: Double) {
            rw4 = SIMD4(repeating: rw); r4 = SIMD4(repeating: r)
            r3wW4 = SIMD4(repeating: r3wW); hConst4 = SIMD4(repeating: hConst)
            wg4 = SIMD4(repeating: wg); invN4 = SIMD4(repeating: invN); m4 = SIMD4(repeating: m)
        }
    }
}

extension UnsafePointer where Pointee == Double {
    /// Four Doubles from `self + i`.
    @usableFromInline @inline(__always)
    func lanes(_ i: Int) -> SIMD4<Double> { UnsafeRawPointer(self + i).loadUnaligned(as: SIMD4<Double>.self) }
}

extension UnsafeMutablePointer where Pointee == Double {
    @usableFromInline @inline(__always)
    func lanes(_ i: Int) -> SIMD4<Double> { UnsafeRawPointer(self + i).loadUnaligned(as: SIMD4<Double>.self) }

    @usableFromInline @inline(__always)
    func storeLanes(_ v: SIMD4<Double>, _ i: Int) {
        UnsafeMutableRawPointer(self + i).storeBytes(of: v, as: SIMD4<Double>.self)
    }
}
