/// The channels-last maps' per-plane constants in T, since their element loops meet every plane's constants in
/// each row: each constant rounded to T, a centre's residue folded into the offset in Float64 (`CentreResidue`,
/// as `_scaleShift` and `_combine` form theirs). Each sample records whether its maps keep their precision with
/// constants in T (`_mapKeeps`, `MapRange`); a sample whose maps do not is mapped in Float64 instead, value by
/// value, rounded once. A map prepares a sample's constants where its sweep first needs them (`OncePerIndex`), so
/// each sample has one writer.

/// `arrays` arrays of T, a value a plane each, for `samples` samples of `channels` planes, and a flag a sample:
/// the storage of both maps' constants.
struct SampleConstants<T> {
    private let first: UnsafeMutablePointer<T>, planes: Int
    private let kept: UnsafeMutablePointer<Bool>

    init(arrays: Int, samples: Int, channels: Int, arena: inout ScratchArena) {
        planes = samples * channels
        first = arena.take(arrays * planes, of: T.self)
        kept = arena.take(samples, of: Bool.self)
    }

    static func bytes(arrays: Int, samples: Int, channels: Int) -> Int {
        ScratchArena.bytes(arrays * samples * channels, of: T.self) + ScratchArena.bytes(samples, of: Bool.self)
    }

    /// Array k's first value.
    func array(_ k: Int) -> UnsafeMutablePointer<T> { first + k * planes }

    /// Sample b's flag: whether its maps keep their precision with constants in T.
    func record(sample b: Int, keeps: Bool) { kept[b] = keeps }
    @inline(__always)
    func keeps(sample b: Int) -> Bool { kept[b] }
}

/// The forward's: y = o + s (x - cf), with cf the plane's centre p rounded to T.
struct MapConstants<T: NormalizationScalar> {
    private let storage: SampleConstants<T>
    var centre: UnsafeMutablePointer<T> { storage.array(0) }
    var scale: UnsafeMutablePointer<T> { storage.array(1) }
    var offset: UnsafeMutablePointer<T> { storage.array(2) }

    /// Room for `samples` samples of `channels` planes.
    init(samples: Int, channels: Int, arena: inout ScratchArena) {
        storage = SampleConstants(arrays: 3, samples: samples, channels: channels, arena: &arena)
    }

    /// Arena bytes of `init(samples:channels:arena:)`.
    static func bytes(samples: Int, channels: Int) -> Int {
        SampleConstants<T>.bytes(arrays: 3, samples: samples, channels: channels)
    }

    /// Sample `b`'s constants, planes `planes`, from their Float64 map (`p`, `scale`, `offset`, indexed by
    /// plane), and whether they keep their precision in T.
    func prepare(sample b: Int, _ planes: Range<Int>, p: UnsafePointer<Double>, scale: UnsafePointer<Double>,
                 offset: UnsafePointer<Double>) {
        for i in planes {
            let cf = T(p[i])
            centre[i] = cf
            self.scale[i] = T(scale[i])
            self.offset[i] = T(CentreResidue.offset(offset[i], slope: scale[i], centre: p[i], rounded: Double(cf)))
        }
        let i = planes.lowerBound
        storage.record(sample: b, keeps: T._mapKeeps(count: planes.count, centres: p + i, dyCentres: nil,
                                                     offsets: offset + i, slopes: scale + i, nil))
    }

    /// Whether sample b's maps keep their precision with constants in T (after `prepare`).
    @inline(__always)
    func keeps(sample b: Int) -> Bool { storage.keeps(sample: b) }
}

/// The backward's: dx = r' + q (x - cf) + p (dy - df), about the plane's x mean p rounded to T (cf) and its dy
/// mean T/S rounded to T (df), with r' = R - Q (p - cf) + P df in Float64, then rounded (`_combine`).
struct CombineConstants<T: NormalizationScalar> {
    private let storage: SampleConstants<T>
    var centre: UnsafeMutablePointer<T> { storage.array(0) }
    var dyCentre: UnsafeMutablePointer<T> { storage.array(1) }
    var p: UnsafeMutablePointer<T> { storage.array(2) }
    var q: UnsafeMutablePointer<T> { storage.array(3) }
    var r: UnsafeMutablePointer<T> { storage.array(4) }
    /// dy's mean per plane in Float64, for `_mapKeeps`.
    private let dyMeans: UnsafeMutablePointer<Double>

    /// Room for `samples` samples of `channels` planes.
    init(samples: Int, channels: Int, arena: inout ScratchArena) {
        storage = SampleConstants(arrays: 5, samples: samples, channels: channels, arena: &arena)
        dyMeans = arena.take(samples * channels, of: Double.self)
    }

    /// Arena bytes of `init(samples:channels:arena:)`.
    static func bytes(samples: Int, channels: Int) -> Int {
        SampleConstants<T>.bytes(arrays: 5, samples: samples, channels: channels)
            + ScratchArena.bytes(samples * channels, of: Double.self)
    }

    /// Sample `b`'s constants, planes `planes`, from their Float64 maps (`P`, `Q`, `R`, indexed by plane), the
    /// planes' x means `centres` and dy sums `dySums` over `spatial` values; and whether they keep their
    /// precision in T (never with `exact`: dx is then a cancellation that constants rounded to T would show).
    func prepare(sample b: Int, _ planes: Range<Int>, centres: UnsafePointer<Double>, dySums: UnsafePointer<Double>,
                 spatial: Int, P: UnsafePointer<Double>, Q: UnsafePointer<Double>, R: UnsafePointer<Double>,
                 exact: Bool) {
        guard !exact else { return storage.record(sample: b, keeps: false) }
        let invS = 1 / Double(spatial)
        for i in planes {
            let cf = T(centres[i]), mean = dySums[i] * invS, df = T(mean)
            centre[i] = cf; dyCentre[i] = df; p[i] = T(P[i]); q[i] = T(Q[i]); dyMeans[i] = mean
            r[i] = T(CentreResidue.offset(R[i], slope: Q[i], centre: centres[i], rounded: Double(cf))
                     + P[i] * Double(df))
        }
        let i = planes.lowerBound
        storage.record(sample: b, keeps: T._mapKeeps(count: planes.count, centres: centres + i,
                                                     dyCentres: dyMeans + i, offsets: R + i, slopes: Q + i, P + i))
    }

    /// Whether sample b's maps keep their precision with constants in T (after `prepare`).
    @inline(__always)
    func keeps(sample b: Int) -> Bool { storage.keeps(sample: b) }
}
