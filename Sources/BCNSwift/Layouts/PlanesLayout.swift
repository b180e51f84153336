/// Planes: [B, C, S] with S ≥ `smallPlane`, each (sample, channel) plane S contiguous values. Every pass runs
/// the SIMD kernels of `NormalizationScalar` along planes, cut into chunks of at most `planeChunkLength`
/// whatever the thread count (chunk partials merge in a fixed order), so results never depend on it.
struct PlanesLayout: StoredLayout {
    let shape: NormalizationShape
    private var chunks: PlaneChunks { PlaneChunks(shape) }

    /// Planes of several chunks: the chunks' moments; or the maps' state a sample (`OncePerIndex`).
    func scratchBytes<T: NormalizationScalar>(_: T.Type) -> Int {
        let chunks = PlaneChunks(shape), states = OncePerIndex.bytes(count: shape.batch)
        return chunks.perPlane == 1 ? states : max(ScratchArena.bytes(chunks.count, of: Moments.self), states)
    }

    /// Mean and M2 of every plane: by `_planeMoments` when a plane is one chunk, else each chunk by
    /// `_chunkMoments`, chunks merged in order (Chan).
    func planeMoments<T: NormalizationScalar>(_ x: UnsafePointer<T>, p: UnsafeMutablePointer<Double>,
                                              q: UnsafeMutablePointer<Double>, arena: inout ScratchArena) {
        let chunks = self.chunks
        if chunks.perPlane == 1 {
            let s = shape.spatial
            parallelFor(shape.planes, cost: s) { range, _ in
                let i = range.lowerBound
                T._planeMoments(x + i * s, planes: range.count, spatial: s, mean: p + i, m2: q + i)
            }
            return
        }
        let parts = arena.take(chunks.count, of: Moments.self)
        parallelFor(chunks.count, cost: planeChunkLength) { range, _ in
            for i in range {
                let c = chunks.chunk(i)
                parts[i] = T._chunkMoments(x + c.offset, count: c.length)
            }
        }
        for plane in 0..<shape.planes {
            var m = Moments()
            for k in 0..<chunks.perPlane { m.merge(parts[plane * chunks.perPlane + k]) }
            p[plane] = m.mean; q[plane] = m.m2
        }
    }

    func planeMoments<T: NormalizationScalar>(first: Int, count: Int, _ x: UnsafePointer<T>,
                                              p: UnsafeMutablePointer<Double>, q: UnsafeMutablePointer<Double>) {
        T._planeMoments(x + first * shape.spatial, planes: count, spatial: shape.spatial, mean: p + first,
                        m2: q + first)
    }

    func planeElements(_ plane: Int) -> (first: Int, stride: Int) { (plane * shape.spatial, 1) }

    /// A unit maps its planes as soon as it knows their coefficients, unless planes span several chunks.
    var mapsPerPlane: Bool { chunks.perPlane == 1 }

    func mapPlanes<T: NormalizationScalar>(first: Int, count: Int, _ x: UnsafePointer<T>, _ y: UnsafeMutablePointer<T>,
                                           centres: UnsafePointer<Double>, scales: UnsafePointer<Double>,
                                           offsets: UnsafePointer<Double>) {
        let at = first * shape.spatial
        T._scaleShiftPlanes(x + at, y + at, planes: count, spatial: shape.spatial, centres: centres, scales: scales,
                            offsets: offsets)
    }

    /// Planes of several chunks (`mapsPerPlane` false), a chunk a work item; the first chunk of sample b to run
    /// computes its maps (`coefficients(b)`), which the sample's other chunks wait for (`OncePerIndex`).
    func map<T: NormalizationScalar>(_ x: UnsafePointer<T>, _ y: UnsafeMutablePointer<T>, p: UnsafePointer<Double>,
                                     scale: UnsafePointer<Double>, offset: UnsafePointer<Double>,
                                     coefficients: (Int) -> Void, arena: inout ScratchArena) {
        let chunks = self.chunks, C = shape.channels
        let ready = OncePerIndex(count: shape.batch, arena: &arena)
        parallelFor(chunks.count, cost: min(shape.spatial, planeChunkLength)) { range, _ in
            for i in range {
                let c = chunks.chunk(i)
                ready.ensure(c.plane / C, coefficients)
                T._scaleShift(x + c.offset, y + c.offset, count: c.length, centre: p[c.plane],
                              scale: scale[c.plane], offset: offset[c.plane])
            }
        }
    }

    /// T and U of every plane: by `_planeGradientSums` when a plane is one chunk, else chunk partials added in a
    /// fixed order.
    func gradientSums<T: NormalizationScalar>(_ x: UnsafePointer<T>, _ dy: UnsafePointer<T>, p: UnsafePointer<Double>,
                                              t: UnsafeMutablePointer<Double>, u: UnsafeMutablePointer<Double>,
                                              arena: inout ScratchArena) {
        let chunks = self.chunks
        if chunks.perPlane == 1 {
            let s = shape.spatial
            parallelFor(shape.planes, cost: 2 * s) { range, _ in
                let i = range.lowerBound
                T._planeGradientSums(dy + i * s, x + i * s, planes: range.count, spatial: s, centres: p + i,
                                     sums: t + i, dots: u + i)
            }
            return
        }
        // (Σdy, Σ(dy - s)(x - p)) per chunk, in the Moments-sized slots planeMoments used; s, the plane's dy shift,
        // is the same for its every chunk (`_earlyMean` of the plane's start), so that the chunks' dots add up
        let parts = UnsafeMutableRawPointer(arena.take(chunks.count, of: Moments.self))
            .bindMemory(to: (Double, Double).self, capacity: chunks.count)
        parallelFor(chunks.count, cost: 2 * planeChunkLength) { range, _ in
            for i in range {
                let c = chunks.chunk(i)
                let shift = T._earlyMean(dy + c.plane * shape.spatial, count: shape.spatial)
                let r = T._gradientSums(dy + c.offset, x + c.offset, count: c.length, centre: p[c.plane],
                                        dyShift: shift)
                parts[i] = (r.sum, r.dot)
            }
        }
        for plane in 0..<shape.planes {
            var s = 0.0, d = 0.0
            for k in 0..<chunks.perPlane { let (a, b) = parts[plane * chunks.perPlane + k]; s += a; d += b }
            t[plane] = s; u[plane] = d
        }
    }

    /// Each work item first has the maps of the samples it touches made (`maps`, once a sample: `OncePerIndex`).
    func combine<T: NormalizationScalar>(_ dy: UnsafePointer<T>, _ x: UnsafePointer<T>, _ dx: UnsafeMutablePointer<T>,
                                         p: UnsafePointer<Double>, dySums t: UnsafePointer<Double>,
                                         coefficients: UnsafePointer<Double>, maps: (Int) -> Void,
                                         arena: inout ScratchArena) {
        let chunks = self.chunks, planes = shape.planes, C = shape.channels
        let P = coefficients, Q = P + planes, R = Q + planes
        let ready = OncePerIndex(count: shape.batch, arena: &arena)
        if chunks.perPlane == 1 {  // planes of one chunk: runs of them at a time (`_combinePlanes`)
            let s = shape.spatial
            parallelFor(planes, cost: 2 * s) { range, _ in
                let i = range.lowerBound, at = i * s
                for b in i / C...(range.upperBound - 1) / C { ready.ensure(b, maps) }
                T._combinePlanes(dy + at, x + at, dx + at, planes: range.count, spatial: s, centres: p + i,
                                 dySums: t + i, p: P + i, q: Q + i, r: R + i)
            }
            return
        }
        parallelFor(chunks.count, cost: 2 * min(shape.spatial, planeChunkLength)) { range, _ in
            for i in range {
                let c = chunks.chunk(i)
                ready.ensure(c.plane / C, maps)
                T._combine(dy + c.offset, x + c.offset, dx + c.offset, count: c.length, centre: p[c.plane],
                           dyMean: t[c.plane] / Double(shape.spatial), p: P[c.plane], q: Q[c.plane], r: R[c.plane])
            }
        }
    }
}

/// Planes shorter than this take the rows layout instead of per-plane kernels.
let smallPlane = 16

/// Iterates the fixed partition of B·C planes of S elements into chunks of at most `planeChunkLength`.
struct PlaneChunks {
    let spatial: Int
    let perPlane: Int
    let count: Int

    init(_ shape: NormalizationShape) {
        spatial = shape.spatial
        perPlane = (shape.spatial + planeChunkLength - 1) / planeChunkLength
        count = shape.planes * perPlane
    }

    /// (plane index, element offset, element count) of chunk `i`.
    @inline(__always)
    func chunk(_ i: Int) -> (plane: Int, offset: Int, length: Int) {
        if perPlane == 1 { return (i, i * spatial, spatial) }  // the common case, without a 64-bit division
        let plane = i / perPlane, k = i - plane * perPlane
        let start = k * planeChunkLength
        return (plane, plane * spatial + start, min(planeChunkLength, spatial - start))
    }
}
