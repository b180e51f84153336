/// When a map's constants may be rounded to Float: the rule of every Float32 map of the planes and channels-last
/// layouts.
///
/// Those maps compute y = o + s (x - c), and the backward's dx = r + q (x - c) + p dy, in Float32 lanes: each
/// constant rounded to Float, x - cf in Float (`CentreResidue` puts c - cf back in the offset). That keeps the
/// Float64 map's precision, up to the output's own rounding, when
/// - |c| < 2^101, so that x - cf cannot overflow for any finite Float x (|x| + 2^101 rounds to at most the
///   largest Float), where x - c would not: activations near ±3e38 with a mean of the other sign; and so for
///   the backward's centre of dy (`_combine`'s dyMean);
/// - each slope (s; q and p) is 0 or within 2^-126...2^101. A slope below Float's normal range keeps fewer bits,
///   down to none: a batch spread over 1e19 or more makes the backward's q about 1/σ², which rounded to 0 dropped
///   its whole term (12% of the largest |dx| at a spread of 1e30). One from 2^101 up may overflow its product;
/// - |o| < 2^101, for the same reason.
/// A plane that fails is mapped in Float64 and rounded once, as planes shorter than a vector always are (on
/// channels-last rows, the whole sample); a Double map never rounds its constants (`NormalizationScalar._mapKeeps`).
/// Constants that are NaN or infinite may take either path: both give non-finite outputs.
/// The test costs a forward or backward of [8, 64, 14, 14], whose planes come two at a time, 3.6% more instructions
/// (about 1% of its time); four separate tests, or SIMD4 lanes for one plane (which LLVM splits), cost more.
@usableFromInline
enum MapRange {
    /// Whether a Float32 map about `centre` with this offset and slopes keeps its precision: the largest
    /// magnitude below 2^101, the smallest nonzero slope at least 2^-126 (two comparisons).
    @inlinable @inline(__always)
    static func keeps(centre c: Double, dyCentre c2: Double = 0, offset o: Double, slopes s1: Double,
                      _ s2: Double) -> Bool {
        @inline(__always) func larger(_ a: Double, _ b: Double) -> Double { a > b ? a : b }
        let a1 = s1.magnitude, a2 = s2.magnitude
        let largest = larger(larger(larger(c.magnitude, c2.magnitude), o.magnitude), larger(a1, a2))
        let smallest = a1 == 0 ? (a2 == 0 ? 1 : a2) : (a2 == 0 || a1 < a2 ? a1 : a2)
        return largest < 0x1p101 && smallest >= 0x1p-126
    }

    /// Whether every one of `count` maps keeps it, map i with centres[i], (when given) dy's centre at most
    /// dyCentres[i] in magnitude, offsets[i], slopes[i] and (when given) second slopes[i]: four maps a step, one
    /// test at the end.
    @inlinable
    static func keeps(count: Int, centres: UnsafePointer<Double>, dyCentres: UnsafePointer<Double>?,
                      offsets: UnsafePointer<Double>, slopes s1: UnsafePointer<Double>,
                      _ s2: UnsafePointer<Double>?) -> Bool {
        var kept = SIMDMask<SIMD4<Int64>>(repeating: true), i = 0
        while i &+ 4 <= count {
            kept .&= lanes(c: centres.lanes(i), o: offsets.lanes(i), s1: s1.lanes(i), s2: s2?.lanes(i) ?? SIMD4())
            if let dyCentres { kept .&= lanes(c: dyCentres.lanes(i), o: SIMD4(), s1: SIMD4(), s2: SIMD4()) }
            i &+= 4
        }
        while i < count {
            if !keeps(centre: centres[i], dyCentre: dyCentres?[i] ?? 0, offset: offsets[i], slopes: s1[i],
                      s2?[i] ?? 0) { return false }
            i &+= 1
        }
        return all(kept)
    }

    /// Whether all four maps keep it (lane l for map l; `keeps` on the biased exponent fields: 1023 + ⌊log2 |v|⌋
    /// for normal v, 0 for 0 and subnormals, 2047 for infinity and NaN).
    @inlinable @inline(__always)
    static func keeps(c: SIMD4<Double>, dyCentre c2: SIMD4<Double> = SIMD4(), o: SIMD4<Double>, s1: SIMD4<Double>,
                      s2: SIMD4<Double>) -> Bool {
        all(lanes(c: c, o: o, s1: s1, s2: s2) .& lanes(c: c2, o: c2, s1: SIMD4(), s2: SIMD4()))
    }

    /// `keeps`, lane by lane.
    @inlinable @inline(__always)
    static func lanes(c: SIMD4<Double>, o: SIMD4<Double>, s1: SIMD4<Double>, s2: SIMD4<Double>)
        -> SIMDMask<SIMD4<Int64>>
    {
        let top = SIMD4<Int64>(repeating: 1023 + 100), bottom = SIMD4<Int64>(repeating: 1023 - 126)
        @inline(__always) func exponent(_ v: SIMD4<Double>) -> SIMD4<Int64> {
            unsafeBitCast(v, to: SIMD4<Int64>.self) &>> 52 & 0x7ff
        }
        @inline(__always) func slope(_ v: SIMD4<Double>) -> SIMDMask<SIMD4<Int64>> {
            let e = exponent(v)
            return (e .>= bottom .& e .<= top) .| v .== 0
        }
        return exponent(c) .<= top .& exponent(o) .<= top .& slope(s1) .& slope(s2)
    }
}
