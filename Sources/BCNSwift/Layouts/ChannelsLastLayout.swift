/// Channels-last: [B, S, C] (S ≥ 2), each sample an S×C matrix whose columns are its planes. Every pass reads
/// memory in order: work items are (sample, stretch of rows) with all channels, vectorized across channels
/// (`_columnSums`, `_columnGradientSums`, `_mapColumns`, `_combineColumns`). The sums of each stretch are kept
/// apart and added per plane in stretch order, and per-(b, c) constants of the maps are kept in T so the element
/// loops stay at the lanes of T. The partition is fixed, so results never depend on the thread count.
struct ChannelsLastLayout: StoredLayout {
    let shape: NormalizationShape

    /// Rows per stretch: about 32K values, so that the stretches' sums (2 numbers per channel) add little
    /// traffic to the input's; and at most `maxStretches` stretches a sample, so that their partial sums stay
    /// O(B·C) however many channels there are (at thousands of channels, 32K-value stretches would leave partials
    /// as large as the input).
    private var stretchRows: Int {
        let most = ChannelsLastLayout.maxStretches
        return max(1, 32768 / shape.channels, (shape.spatial + most - 1) / most)
    }
    /// Stretches a sample at most: work items enough for 16 threads on one sample.
    static let maxStretches = 16
    private var stretches: Int { (shape.spatial + stretchRows - 1) / stretchRows }
    /// Rows per work item of the maps: about `planeChunkLength` values.
    private var mapRows: Int { max(1, planeChunkLength / shape.channels) }
    private var sumsCost: Int { 2 * stretchRows * shape.channels }

    /// Bytes of input above which it is taken to stream from memory rather than cache (here, 32 MB of L3: an
    /// input this large and its output no longer fit together). The sums then read each block of rows in order
    /// (`_columnSums`' `partials`): [64, 128, 32, 32] Float forward on one thread 0.55-0.6x the time. Below it
    /// that costs loads and stores a step (L2-resident blocks: 1.2-1.35x the time).
    static let streamingBytes = 16 << 20

    /// Whether the input streams from memory (`streamingBytes`).
    private func streaming<T>(_: T.Type) -> Bool {
        shape.planes * shape.spatial * MemoryLayout<T>.stride > ChannelsLastLayout.streamingBytes
    }

    /// Values of T of the sums' block partials (2·C a thread), when the input streams from memory; else 0.
    private func blockPartialsCount<T>(_: T.Type) -> Int {
        streaming(T.self) ? parallelSlots(shape.batch * stretches, cost: sumsCost) * 2 * shape.channels : 0
    }

    func scratchBytes<T: NormalizationScalar>(_: T.Type) -> Int {
        ScratchArena.bytes(2 * shape.batch * stretches * shape.channels, of: Double.self)
            + ScratchArena.bytes(4 * shape.planes, of: T.self)
            + ScratchArena.bytes(blockPartialsCount(T.self), of: T.self)
    }

    /// Runs `body(b, first row, rows, the stretch's two C-sized partial sums, the thread's block partials)` over
    /// every (sample, stretch) in parallel, then `finish(b, partials of the sample's stretches)` per sample:
    /// partials are added per channel in stretch order. Block partials (for `_columnSums`, nil unless the input
    /// streams from memory) come from `arena`.
    private func stretchSums<T>(
        _ partials: UnsafeMutablePointer<Double>, _: T.Type, arena: inout ScratchArena,
        _ body: (Int, Int, Int, UnsafeMutablePointer<Double>, UnsafeMutablePointer<Double>, UnsafeMutablePointer<T>?)
            -> Void,
        finish: (Int, UnsafePointer<Double>) -> Void
    ) {
        let C = shape.channels, S = shape.spatial, n = stretches, rowsPer = stretchRows
        let blocks = blockPartialsCount(T.self), blockPartials = blocks == 0 ? nil : arena.take(blocks, of: T.self)
        parallelFor(shape.batch * n, cost: sumsCost) { range, slot in
            for item in range {
                let b = item / n, r0 = (item - b * n) * rowsPer, part = partials + 2 * C * item
                part.update(repeating: 0, count: 2 * C)
                body(b, r0, min(rowsPer, S - r0), part, part + C, blockPartials.map { $0 + slot * 2 * C })
            }
        }
        for b in 0..<shape.batch { finish(b, partials + 2 * C * n * b) }
    }

    /// Σ over a sample's stretches of the partials at `offset` (0 or C) into `out`, in stretch order.
    private func addStretches(_ parts: UnsafePointer<Double>, offset: Int, into out: UnsafeMutablePointer<Double>) {
        let C = shape.channels
        out.update(from: parts + offset, count: C)
        for k in 1..<stretches {
            let part = parts + 2 * C * k + offset
            for c in 0..<C { out[c] += part[c] }
        }
    }

    /// Every plane's moments in one read of the input in order: sums of d = x - k in the lanes of T
    /// (`_columnSums`), each stretch apart and added in order, around k = the mean of eight rows spread through
    /// the sample, rounded to T; mean = k + Σd/n, M2 = Σd² - (Σd)²/n, kept when k was within a standard deviation
    /// of the mean ((Σd)²/n at most half of Σd², the rule of the plane kernels). A plane where it was not (or
    /// whose Float32 squares overflowed) is summed again alone, in Float64, around the mean found: the corrected
    /// two-pass algorithm, for the few planes that need it.
    func planeMoments<T: NormalizationScalar>(_ x: UnsafePointer<T>, p: UnsafeMutablePointer<Double>,
                                              q: UnsafeMutablePointer<Double>, arena: inout ScratchArena) {
        let C = shape.channels, S = shape.spatial, B = shape.batch, invS = 1 / Double(S)
        let partials = arena.take(2 * B * stretches * C, of: Double.self)
        let centre = arena.take(shape.planes, of: T.self)
        let picks = min(8, S)
        for b in 0..<B {  // the shift: eight rows spread through the sample (cheap, serial)
            let pb = p + b * C
            pb.update(repeating: 0, count: C)
            for j in 0..<picks {
                T._columnSums(x + (b * S + j * S / picks) * C, rows: 1, columns: C, stride: C, centre: nil, sums: pb,
                              squares: nil, partials: nil)
            }
            for c in 0..<C { centre[b * C + c] = T(pb[c] / Double(picks)) }
        }
        stretchSums(partials, T.self, arena: &arena, { b, r0, rows, deviation, squares, blockPartials in
            T._columnSums(x + (b * S + r0) * C, rows: rows, columns: C, stride: C, centre: centre + b * C,
                          sums: deviation, squares: squares, partials: blockPartials)
        }, finish: { b, parts in
            let pb = p + b * C, qb = q + b * C
            addStretches(parts, offset: 0, into: pb)  // Σd
            addStretches(parts, offset: C, into: qb)  // Σd²
            for c in 0..<C {
                let d = pb[c], squares = qb[c], m2 = squares - d * d * invS
                pb[c] = Double(centre[b * C + c]) + d * invS
                qb[c] = max(m2, 0)
                guard !(m2 >= 0.5 * squares) else { continue }  // kept; the rest (NaN too) again, in Float64
                var k = pb[c].isFinite ? pb[c] : 0, deviation = 0.0, again = 0.0
                ColumnKernels.centredSums(x + b * S * C + c, rows: S, columns: 1, stride: C, centre: &k,
                                          sums: &deviation, squares: &again)
                pb[c] = k + deviation * invS
                qb[c] = max(again - deviation * deviation * invS, 0)
            }
        })
    }

    var mapsPerPlane: Bool { false }

    func planeMoments<T: NormalizationScalar>(first: Int, count: Int, _ x: UnsafePointer<T>,
                                              p: UnsafeMutablePointer<Double>, q: UnsafeMutablePointer<Double>) {
        preconditionFailure("channels-last measures all planes in one sweep (mapsPerPlane is false)")
    }

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
                var row = r0
                let end = min(S, r0 + rowsPerItem)
                // Rows of up to 32 channels eight at a time: a row of 32 Floats is then one strip of columns, so
                // memory is read in order while the strip's constants serve eight rows (C = 32: 0.93x the time of
                // two at a time; narrower rows take the 8-lane and one-value loops, a few strips in under a KB).
                // Wider rows: the loads of x and of the strip's constants bound the map, so more rows a strip are
                // faster while the input is cached (C ≥ 128, four rows: 0.93-0.98x the time of two; eight: 1.06x
                // on [2, 512, 28, 28]); but walking a strip down them reads memory out of order, which costs input
                // streaming from memory (four rows: [64, 128, 32, 32] 1.2x) and C = 64 ([32, 64, 32, 32] 1.05x
                // with four, 1.08x with eight). So four rows from 128 channels on cached input, else two.
                let block = C <= 32 ? 8 : (C >= 128 && !streaming(T.self) ? 4 : 2)
                while row < end {
                    let at = (b * S + row) * C, rows = min(block, end - row)
                    T._mapColumns(x + at, y + at, rows: rows, columns: C, stride: C, centre: cT + constants,
                                  scale: sT + constants, offset: oT + constants)
                    row += rows
                }
            }
        }
    }

    /// T and U of every plane in one read of (x, dy) in order: each stretch summed in the lanes of T around the
    /// centre rounded to T, stretches added in order, then U = Σ dy (x - cf) - (p - cf) T. A sample whose Float32
    /// sums overflow is summed again in Float64.
    func gradientSums<T: NormalizationScalar>(_ x: UnsafePointer<T>, _ dy: UnsafePointer<T>, p: UnsafePointer<Double>,
                                              t: UnsafeMutablePointer<Double>, u: UnsafeMutablePointer<Double>,
                                              arena: inout ScratchArena) {
        let C = shape.channels, S = shape.spatial
        let partials = arena.take(2 * shape.batch * stretches * C, of: Double.self)
        let centre = arena.take(shape.planes, of: T.self)
        for i in 0..<shape.planes { centre[i] = T(p[i]) }
        stretchSums(partials, T.self, arena: &arena, { b, r0, rows, sum, dot, blockPartials in
            let at = (b * S + r0) * C
            T._columnGradientSums(dy + at, x + at, rows: rows, columns: C, stride: C, centre: centre + b * C,
                                  sums: sum, dots: dot, partials: blockPartials)
        }, finish: { b, parts in
            let tb = t + b * C, ub = u + b * C, pb = p + b * C
            addStretches(parts, offset: 0, into: tb)
            addStretches(parts, offset: C, into: ub)
            for c in 0..<C { ub[c] -= (pb[c] - Double(centre[b * C + c])) * tb[c] }
            if (0..<C).contains(where: { !(tb[$0].isFinite && ub[$0].isFinite) }) {
                tb.update(repeating: 0, count: C); ub.update(repeating: 0, count: C)
                ColumnKernels.gradientSums(dy + b * S * C, x + b * S * C, rows: S, columns: C, stride: C,
                                           centre: pb, sums: tb, dots: ub)
            }
        })
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
                let constants = b * C, at = (b * S + r0) * C
                T._combineColumns(dy + at, x + at, dx + at, rows: min(S, r0 + rowsPerItem) - r0, columns: C,
                                  stride: C, centre: cT + constants, p: pT + constants, q: qT + constants,
                                  r: rT + constants)
            }
        }
    }
}
