/// Channels-last: [B, S, C] (S ≥ 2), each sample an S×C matrix whose columns are its planes. The passes run
/// along rows, vectorized across channels, and stream down the S rows; per-(b, c) constants of the maps are
/// kept in T so the element loops stay at the lanes of T. Work items are (sample, column block) for the sums and
/// (sample, row block) for the maps, a fixed partition, so results never depend on the thread count.
struct ChannelsLastLayout: StoredLayout {
    let shape: NormalizationShape

    /// Channels per column block of the sums: its accumulators stay in registers and L1.
    static let blockChannels = 64

    private var columnBlocks: Int { (shape.channels + Self.blockChannels - 1) / Self.blockChannels }
    /// Rows per chunk of a column block's moments: about `planeChunkLength` values, in L1 for the second pass.
    private var chunkRows: Int { max(1, planeChunkLength / min(shape.channels, Self.blockChannels)) }
    /// Rows per work item of the maps: about `planeChunkLength` values.
    private var mapRows: Int { max(1, planeChunkLength / shape.channels) }

    func scratchBytes<T: NormalizationScalar>(_: T.Type) -> Int {
        let slots = parallelSlots(shape.batch * columnBlocks, cost: shape.spatial * Self.blockChannels)
        return ScratchArena.bytes(slots * 5 * Self.blockChannels, of: Double.self)
            + ScratchArena.bytes(4 * shape.planes, of: T.self)
    }

    /// Each column block's moments chunk by chunk of rows (a corrected two-pass in Float64 while the chunk is
    /// in L1: mean c, then mean = c + Σ(x - c)/n, M2 = Σ(x - c)² - (Σ(x - c))²/n), chunks merged in order (Chan).
    func planeMoments<T: NormalizationScalar>(_ x: UnsafePointer<T>, p: UnsafeMutablePointer<Double>,
                                              q: UnsafeMutablePointer<Double>, arena: inout ScratchArena) {
        let S = shape.spatial, C = shape.channels, blocks = columnBlocks, chunkRows = self.chunkRows
        let width = Self.blockChannels
        let slots = parallelSlots(shape.batch * blocks, cost: S * width)
        let scratch = arena.take(slots * 5 * width, of: Double.self)
        parallelFor(shape.batch * blocks, cost: S * width) { range, slot in
            let count = scratch + slot * 5 * width, mean = count + width, m2 = mean + width
            let sum = m2 + width, squares = sum + width
            for item in range {
                let b = item / blocks, c0 = (item - b * blocks) * width, n = min(width, C - c0)
                let base = x + b * S * C + c0
                for c in 0..<n { count[c] = 0; mean[c] = 0; m2[c] = 0 }
                var r0 = 0
                while r0 < S {
                    let rows = min(chunkRows, S - r0), chunk = base + r0 * C, m = Double(rows), invM = 1 / m
                    ColumnKernels.sums(chunk, rows: rows, columns: n, stride: C, into: sum)
                    for c in 0..<n { sum[c] *= invM }  // the chunk's approximate mean, the centre
                    ColumnKernels.centredSums(chunk, rows: rows, columns: n, stride: C, centre: sum,
                                              sums: squares, squares: squares + n)
                    for c in 0..<n {
                        let d = squares[c], s2 = squares[n + c]
                        var acc = Moments(count: count[c], mean: mean[c], m2: m2[c])
                        acc.merge(Moments(count: m, mean: sum[c] + d * invM, m2: max(s2 - d * d * invM, 0)))
                        count[c] = acc.count; mean[c] = acc.mean; m2[c] = acc.m2
                    }
                    r0 += rows
                }
                for c in 0..<n { p[b * C + c0 + c] = mean[c]; q[b * C + c0 + c] = m2[c] }
            }
        }
    }

    var mapsPerPlane: Bool { false }

    func mapPlane<T: NormalizationScalar>(_ plane: Int, _ x: UnsafePointer<T>, _ y: UnsafeMutablePointer<T>,
                                          centre: Double, scale: Double, offset: Double) {
        preconditionFailure("channels-last maps every plane in one sweep")
    }

    /// out = A (x - p) + M: the constants of every (b, c) in T first (centre rounded to T, its residue folded
    /// into the offset in Float64, as `_scaleShift` does), then rows of C values at a time.
    func map<T: NormalizationScalar>(_ x: UnsafePointer<T>, _ y: UnsafeMutablePointer<T>, p: UnsafePointer<Double>,
                                     scale: UnsafePointer<Double>, offset: UnsafePointer<Double>,
                                     arena: inout ScratchArena) {
        let planes = shape.planes, C = shape.channels, S = shape.spatial
        let k = arena.take(3 * planes, of: T.self), cT = k, sT = k + planes, oT = sT + planes
        for i in 0..<planes {
            let cf = T(p[i])
            cT[i] = cf; sT[i] = T(scale[i]); oT[i] = T(offset[i] - scale[i] * (p[i] - Double(cf)))
        }
        let rowsPerItem = mapRows, perSample = (S + rowsPerItem - 1) / rowsPerItem
        parallelFor(shape.batch * perSample, cost: rowsPerItem * C) { range, _ in
            for item in range {
                let b = item / perSample, r0 = (item - b * perSample) * rowsPerItem
                let constants = b * C
                for row in r0..<min(S, r0 + rowsPerItem) {
                    let at = (b * S + row) * C
                    T._mapElements(x + at, y + at, count: C, centre: cT + constants, scale: sT + constants,
                                   offset: oT + constants)
                }
            }
        }
    }

    /// T and U per column block in Float64, chunk of rows by chunk (each in L1 while its columns are summed),
    /// chunks added in order.
    func gradientSums<T: NormalizationScalar>(_ x: UnsafePointer<T>, _ dy: UnsafePointer<T>, p: UnsafePointer<Double>,
                                              t: UnsafeMutablePointer<Double>, u: UnsafeMutablePointer<Double>,
                                              arena: inout ScratchArena) {
        let S = shape.spatial, C = shape.channels, blocks = columnBlocks, width = Self.blockChannels
        let chunkRows = self.chunkRows
        parallelFor(shape.batch * blocks, cost: 2 * S * width) { range, _ in
            for item in range {
                let b = item / blocks, c0 = (item - b * blocks) * width, n = min(width, C - c0)
                let plane = b * C + c0
                for c in 0..<n { t[plane + c] = 0; u[plane + c] = 0 }
                var r0 = 0
                while r0 < S {
                    let rows = min(chunkRows, S - r0), at = (b * S + r0) * C + c0
                    ColumnKernels.gradientSums(dy + at, x + at, rows: rows, columns: n, stride: C,
                                               centre: p + plane, sums: t + plane, dots: u + plane)
                    r0 += rows
                }
            }
        }
    }

    /// dx = P dy + Q (x - p) + R with the constants in T as in `map` (the centre's residue folded into R).
    func combine<T: NormalizationScalar>(_ dy: UnsafePointer<T>, _ x: UnsafePointer<T>, _ dx: UnsafeMutablePointer<T>,
                                         p: UnsafePointer<Double>, coefficients: UnsafePointer<Double>,
                                         arena: inout ScratchArena) {
        let planes = shape.planes, C = shape.channels, S = shape.spatial
        let P = coefficients, Q = P + planes, R = Q + planes
        let k = arena.take(4 * planes, of: T.self), cT = k, pT = k + planes, qT = pT + planes, rT = qT + planes
        for i in 0..<planes {
            let cf = T(p[i])
            cT[i] = cf; pT[i] = T(P[i]); qT[i] = T(Q[i]); rT[i] = T(R[i] - Q[i] * (p[i] - Double(cf)))
        }
        let rowsPerItem = mapRows, perSample = (S + rowsPerItem - 1) / rowsPerItem
        parallelFor(shape.batch * perSample, cost: 2 * rowsPerItem * C) { range, _ in
            for item in range {
                let b = item / perSample, r0 = (item - b * perSample) * rowsPerItem
                let constants = b * C
                for row in r0..<min(S, r0 + rowsPerItem) {
                    let at = (b * S + row) * C
                    T._combineElements(dy + at, x + at, dx + at, count: C, centre: cT + constants,
                                       p: pT + constants, q: qT + constants, r: rT + constants)
                }
            }
        }
    }
}
