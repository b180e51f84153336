/// The channels-last forward map's per-plane constants in T, since its element loops meet every plane's
/// constants in each row: y = o + s (x - cf) with cf the plane's centre p rounded to T, s its scale rounded to T,
/// and o its offset with the centre's residue folded in (`CentreResidue.offset`, as `_scaleShift` forms its
/// three). Each sample records whether its maps keep their precision with constants in T (`_mapKeeps`); a sample
/// whose maps do not is mapped in Float64 instead, value by value. The map prepares a sample's constants where it
/// first needs them (`OncePerIndex`), so each sample has one writer.
struct MapConstants<T: NormalizationScalar> {
    let centre: UnsafeMutablePointer<T>, scale: UnsafeMutablePointer<T>, offset: UnsafeMutablePointer<T>
    private let kept: UnsafeMutablePointer<Bool>

    /// Room for `samples` samples of `channels` planes.
    init(samples: Int, channels: Int, arena: inout ScratchArena) {
        let planes = samples * channels
        centre = arena.take(3 * planes, of: T.self)
        scale = centre + planes
        offset = scale + planes
        kept = arena.take(samples, of: Bool.self)
    }

    /// Arena bytes of `init(samples:channels:arena:)`.
    static func bytes(samples: Int, channels: Int) -> Int {
        ScratchArena.bytes(3 * samples * channels, of: T.self) + ScratchArena.bytes(samples, of: Bool.self)
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
        kept[b] = T._mapKeeps(count: planes.count, centres: p + i, dyCentres: nil, offsets: offset + i,
                              slopes: scale + i, nil)
    }

    /// Whether sample b's maps keep their precision with constants in T (after `prepare`).
    @inline(__always)
    func keeps(sample b: Int) -> Bool { kept[b] }
}
