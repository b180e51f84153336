/// Channels-last: [B, S, C] (S ≥ 2), each sample an S×C matrix whose columns are its planes. Every pass reads
/// memory in order: work items are (sample, stretch of rows) with all channels, vectorized across channels
/// (`_columnSums`, `_columnGradientSums`, `_mapColumns`, `_combineColumns`). Each stretch's moments or sums are
/// kept apart and combined per plane in stretch order (in parallel over blocks of channels), and per-(b, c)
/// constants of the maps are kept in T so the element loops stay at the lanes of T. The partition is fixed, so
/// results never depend on the thread count.
struct ChannelsLastLayout: StoredLayout {
    let shape: NormalizationShape

    /// Rows per stretch: about 64K values, so that what each stretch keeps and does per channel (2 partial
    /// sums, its shift, its moments' finish and merge) costs little beside its values (32K: A/B 1.03-1.05x the
    /// time on [2, 512, 28, 28], [2, 64, 56, 56], [1, 256, 56, 56]; 128K gained no more); and at most
    /// `maxStretches` stretches a sample, so that their partial sums stay O(B·C) however many channels there are
    /// (at thousands of channels, 64K-value stretches would leave partials as large as the input).
    private var stretchRows: Int {
        let most = ChannelsLastLayout.maxStretches
        return max(1, 65536 / shape.channels, (shape.spatial + most - 1) / most)
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

    /// Whether the gradient sums read each block's rows in order (`_columnGradientSums`' `partials`): input
    /// streaming from memory, or rows of 128 channels or more, whose blocks the two inputs' strips walk in 16 or
    /// more streams of lines at once, too many for the hardware prefetcher from L3. A/B, forward+backward, fresh
    /// process pairs: [8, 256, 14, 14] 0.90, [1, 256, 56, 56] 0.89, [2, 512, 28, 28] 0.95, [2, 128, 56, 56]
    /// 0.97, [4, 256, 8, 8] 0.99; but [2, 64, 56, 56] 1.04 and [8, 32, 32, 32] 1.10. (The moments' one input
    /// gains only when it streams from memory: [2, 512, 28, 28] forward 1.09 in order.)
    private func gradientsInOrder<T>(_: T.Type) -> Bool { streaming(T.self) || shape.channels >= 128 }

    /// Values of T of a thread's scratch in the sums: a stretch's shift (C), then the block partials (2·C) when
    /// a pass reads its blocks' rows in order.
    private func slotLength<T>(_: T.Type) -> Int { (gradientsInOrder(T.self) ? 3 : 1) * shape.channels }
    private var sumsSlots: Int { parallelSlots(shape.batch * stretches, cost: sumsCost) }

    /// The stretches' partials, the gradient sums' centres and shifts (one of T a plane each) and the slots, or
    /// a map's constants (`CombineConstants`, the larger, or `MapConstants`) and a state a sample for
    /// `OncePerIndex`, whichever is larger: every phase reserves this for itself (`StoredLayout`'s `...Bytes`),
    /// and each uses one of the two.
    func scratchBytes<T: NormalizationScalar>(_: T.Type) -> Int {
        max(ScratchArena.bytes(2 * shape.batch * stretches * shape.channels, of: Double.self)
                + 2 * ScratchArena.bytes(shape.planes, of: T.self)
                + ScratchArena.bytes(sumsSlots * slotLength(T.self), of: T.self),
            CombineConstants<T>.bytes(samples: shape.batch, channels: shape.channels)
                + OncePerIndex.bytes(count: shape.batch))
    }

    /// A thread's scratch in `stretchSums`: C values of T for a stretch's shift, and the block partials of the
    /// column kernels (nil unless the pass reads its blocks' rows in order).
    private struct SlotScratch<T> {
        let shift: UnsafeMutablePointer<T>, blockPartials: UnsafeMutablePointer<T>?
    }

    /// Channels per work item of a `stretchSums` finish.
    private static let finishChannels = 64

    /// Runs `body(b, first row, rows, the stretch's two C-sized partials (zero), the thread's scratch)` over every
    /// (sample, stretch) in parallel, then `finish(b, c0, n, the partials of sample b's stretches)` over every
    /// (sample, block of channels c0..<c0+n) in parallel, which combines them per channel in stretch order; a
    /// sample of one stretch is finished (all its channels at once) in its stretch's work item, while its sums
    /// are in cache, with no loop of finishes after (that loop, a copy of 2048 planes' moments, took 3 us of
    /// [8, 256, 14, 14]'s forward on two threads, on the calling thread between two parallel loops). `inOrder`:
    /// the body gets block partials.
    private func stretchSums<T>(
        _ partials: UnsafeMutablePointer<Double>, _: T.Type, inOrder: Bool,
        arena: inout ScratchArena,
        _ body: (Int, Int, Int, UnsafeMutablePointer<Double>, UnsafeMutablePointer<Double>, SlotScratch<T>) -> Void,
        finish: (Int, Int, Int, UnsafePointer<Double>) -> Void
    ) {
        let C = shape.channels, S = shape.spatial, n = stretches, rowsPer = stretchRows, length = slotLength(T.self)
        let slots = sumsSlots, scratch = arena.take(slots * length, of: T.self)
        assert(!inOrder || length >= 3 * C, "block partials without their scratch")
        parallelFor(shape.batch * n, cost: sumsCost) { range, slot in
            assert(slot < slots, "a thread's slot beyond the scratch reserved for the call")
            let mine = scratch + slot * length
            let slotScratch = SlotScratch(shift: mine, blockPartials: inOrder ? mine + C : nil)
            for item in range {
                let b = item / n, r0 = (item - b * n) * rowsPer, part = partials + 2 * C * item
                part.update(repeating: 0, count: 2 * C)
                body(b, r0, min(rowsPer, S - r0), part, part + C, slotScratch)
                if n == 1 { finish(b, 0, C, part) }
            }
        }
        if n == 1 { return }
        let width = ChannelsLastLayout.finishChannels, blocks = (C + width - 1) / width
        parallelFor(shape.batch * blocks, cost: 4 * n * width) { range, _ in
            for item in range {
                let b = item / blocks, c0 = (item - b * blocks) * width
                finish(b, c0, min(width, C - c0), partials + 2 * C * n * b)
            }
        }
    }

    /// Σ over a sample's stretches of channels c0..<c0+n of the partials at `offset` (0 or C) into `out`, in
    /// stretch order.
    private func addStretches(_ parts: UnsafePointer<Double>, offset: Int, first c0: Int, count n: Int,
                              into out: UnsafeMutablePointer<Double>) {
        let C = shape.channels
        (out + c0).update(from: parts + offset + c0, count: n)
        for k in 1..<stretches {
            let part = parts + 2 * C * k + offset
            for c in c0..<c0 + n { out[c] += part[c] }
        }
    }

    /// Every plane's moments in one read of the input in order, a stretch of rows a work item: the stretch's sums
    /// of d = x - k in the lanes of T (`_columnSums`) around its own k (`shift`: the mean of up to eight of its
    /// rows, in T); its mean = k + Σd/n and M2 = Σd² - (Σd)²/n, kept when k was within a standard deviation of
    /// the mean ((Σd)²/n at most half of Σd², the rule of the plane kernels). A plane where it was not (or whose
    /// squares overflowed T's lanes) is summed again over the stretch, in Float64, around the mean found: the
    /// corrected two-pass algorithm, for the few planes that need it (`stretchMoments`). A sample's stretches then
    /// merge in order by Chan's formula (`Moments.merge`). Each stretch finding its own k leaves no serial pass
    /// before the sweep, and puts the planes summed again in parallel (timed inside [2, 512, 28, 28]'s forward on
    /// two threads, a sample-wide k and the stretches' sums added on the calling thread took 15-35 µs of 125-150).
    func planeMoments<T: NormalizationScalar>(_ x: UnsafePointer<T>, p: UnsafeMutablePointer<Double>,
                                              q: UnsafeMutablePointer<Double>, arena: inout ScratchArena) {
        let C = shape.channels, S = shape.spatial, B = shape.batch, rowsPer = stretchRows
        let partials = arena.take(2 * B * stretches * C, of: Double.self), exact = shape.twoValuesAChannel
        stretchSums(partials, T.self, inOrder: streaming(T.self), arena: &arena, { b, r0, rows, mean, m2, scratch in
            let first = x + (b * S + r0) * C
            ChannelsLastLayout.shift(first, rows: rows, columns: C, into: scratch.shift)
            T._columnSums(first, rows: rows, columns: C, stride: C, centre: scratch.shift, sums: mean, squares: m2,
                          partials: scratch.blockPartials)
            ChannelsLastLayout.stretchMoments(first, rows: rows, columns: C, shift: scratch.shift, mean: mean, m2: m2,
                                              again: exact)
        }, finish: { b, c0, n, parts in
            let pb = p + b * C, qb = q + b * C
            (pb + c0).update(from: parts + c0, count: n)
            (qb + c0).update(from: parts + C + c0, count: n)
            var count = Double(min(rowsPer, S))
            for k in 1..<stretches {
                let part = parts + 2 * C * k, rows = Double(min(rowsPer, S - k * rowsPer))
                let weights = Moments.mergeWeights(count, rows)
                var c = c0
                while c + 4 <= c0 + n {
                    let (mean, m2) = Moments.merged(mean: pb.lanes(c), m2: qb.lanes(c), with: part.lanes(c),
                                                    part.lanes(C + c), weights)
                    pb.storeLanes(mean, c); qb.storeLanes(m2, c)
                    c += 4
                }
                for c in c..<c0 + n {
                    (pb[c], qb[c]) = Moments.merged(mean: pb[c], m2: qb[c], with: part[c], part[C + c], weights)
                }
                count += rows
            }
        })
    }

    /// A stretch's shift k per channel: the mean of eight of its rows spread through it (all of a shorter
    /// stretch's), in T, as any value near the mean serves: the eight rows summed pairwise, a loop LLVM runs in
    /// T's lanes (in Float64 lanes, or with a division per channel, the shift cost a third of the stretch's sums).
    static func shift<T: NormalizationScalar>(_ x: UnsafePointer<T>, rows: Int, columns C: Int,
                                              into k: UnsafeMutablePointer<T>) {
        guard rows >= 8 else {
            let inverse = 1 / T(rows)
            for c in 0..<C {
                var total = x[c] * inverse
                for r in 1..<rows { total = total.addingProduct(x[r * C + c], inverse) }
                k[c] = total
            }
            return
        }
        @inline(__always) func row(_ j: Int) -> UnsafePointer<T> { x + j * rows / 8 * C }
        let r0 = row(0), r1 = row(1), r2 = row(2), r3 = row(3), r4 = row(4), r5 = row(5), r6 = row(6), r7 = row(7)
        @inline(__always) func pair(_ a: T, _ b: T) -> T { (a * 0.125).addingProduct(b, 0.125) }
        for c in 0..<C {  // each value an eighth first, so that no sum overflows T
            k[c] = (pair(r0[c], r1[c]) + pair(r2[c], r3[c])) + (pair(r4[c], r5[c]) + pair(r6[c], r7[c]))
        }
    }

    /// The mean square of a stretch's column below which its squares in Float32 lanes may have lost bits: squares
    /// below Float's normal range, 2^-126, keep fewer than 24 (values 1e-20 apart gave a channel norm alone 28 ulps
    /// of y and dx), and 2^-100 leaves 2^26 for the squares of one column to differ. Such a column (only values
    /// within about 1e-15 of each other) is summed again in Float64.
    static let underflowingSquares = 0x1p-100

    /// A stretch's mean and M2 per channel from its sums around the shift k (`mean` holds Σd, `m2` Σd² on entry):
    /// mean = k + Σd/n, M2 = Σd² - (Σd)²/n, four channels a step; a channel where k was not within a standard
    /// deviation of the mean ((Σd)²/n above half of Σd², or NaN), or whose squares overflowed T's lanes (|x - k|
    /// above about 1.8e19 in Float32, while Σd stays finite) or may have underflowed them (a mean square below
    /// `underflowingSquares`, unless Σd = Σd² = 0: a constant run), is summed again over the stretch, in Float64,
    /// around the mean found (`ColumnKernels.centredSums`); with `again`, every channel is.
    static func stretchMoments<T: NormalizationScalar>(
        _ x: UnsafePointer<T>, rows: Int, columns C: Int, shift k: UnsafePointer<T>,
        mean: UnsafeMutablePointer<Double>, m2: UnsafeMutablePointer<Double>, again everyChannel: Bool = false
    ) {
        let invN = 1 / Double(rows)
        func again(_ c: Int) {
            var centre = mean[c].isFinite ? mean[c] : 0, sum = 0.0, squares = 0.0
            ColumnKernels.centredSums(x + c, rows: rows, columns: 1, stride: C, centre: &centre, sums: &sum,
                                      squares: &squares)
            mean[c] = centre + sum * invN
            m2[c] = max(squares - sum * sum * invN, 0)
        }
        let tiny = underflowingSquares * Double(rows)
        var c = 0
        while c + 4 <= C {
            let d = mean.lanes(c), squares = m2.lanes(c), deviation = squares - d * d * invN
            mean.storeLanes(T._load4Wide(k, c) + d * invN, c)
            m2.storeLanes(deviation.replacing(with: 0, where: deviation .< 0), c)
            let underflowed = (squares .< SIMD4(repeating: tiny)) .& ((squares .!= 0) .| (d .!= 0))
            let kept = ShiftRule.keeps(m2: deviation, squares: squares) .& (squares .< .infinity) .& .!underflowed
            if everyChannel || !all(kept) { for l in 0..<4 where everyChannel || !kept[l] { again(c + l) } }
            c += 4
        }
        for c in c..<C {
            let d = mean[c], squares = m2[c], deviation = squares - d * d * invN
            mean[c] = Double(k[c]) + d * invN
            m2[c] = max(deviation, 0)
            let underflowed = squares < tiny && (squares != 0 || d != 0)
            let kept = ShiftRule.keeps(m2: deviation, squares: squares) && squares < .infinity && !underflowed
            if everyChannel || !kept { again(c) }
        }
    }

    func planeElements(_ plane: Int) -> (first: Int, stride: Int) {
        let C = shape.channels, b = plane / C
        return (b * shape.spatial * C + (plane - b * C), C)
    }

    var mapsPerPlane: Bool { false }

    func planeMoments<T: NormalizationScalar>(first: Int, count: Int, _ x: UnsafePointer<T>,
                                              p: UnsafeMutablePointer<Double>, q: UnsafeMutablePointer<Double>) {
        preconditionFailure("channels-last measures all planes in one sweep (mapsPerPlane is false)")
    }

    func mapPlanes<T: NormalizationScalar>(first: Int, count: Int, _ x: UnsafePointer<T>, _ y: UnsafeMutablePointer<T>,
                                           centres: UnsafePointer<Double>, scales: UnsafePointer<Double>,
                                           offsets: UnsafePointer<Double>) {
        preconditionFailure("channels-last maps every plane in one sweep")
    }

    /// out = A (x - p) + M, rows of C values at a time, a work item a block of a sample's rows: the first item of
    /// sample b to run computes its maps (`coefficients(b)`) and their constants in T (`MapConstants`: the centre
    /// rounded to T, its residue folded into the offset in Float64, as `_scaleShift` does), which the sample's
    /// other items wait for (`OncePerIndex`). If a plane's constants would lose precision in T (`_mapKeeps`),
    /// every value of its sample is mapped in Float64 instead, rounded once.
    func map<T: NormalizationScalar>(_ x: UnsafePointer<T>, _ y: UnsafeMutablePointer<T>, p: UnsafePointer<Double>,
                                     scale: UnsafePointer<Double>, offset: UnsafePointer<Double>,
                                     coefficients: (Int) -> Void, arena: inout ScratchArena) {
        let C = shape.channels, S = shape.spatial
        let prepared = MapConstants<T>(samples: shape.batch, channels: C, arena: &arena)
        let ready = OncePerIndex(count: shape.batch, arena: &arena)
        let cT = prepared.centre, sT = prepared.scale, oT = prepared.offset
        let rowsPerItem = mapRows, perSample = (S + rowsPerItem - 1) / rowsPerItem
        parallelFor(shape.batch * perSample, cost: rowsPerItem * C) { range, _ in
            for item in range {
                let b = item / perSample, r0 = (item - b * perSample) * rowsPerItem
                let constants = b * C
                ready.ensure(b) { b in
                    coefficients(b)
                    prepared.prepare(sample: b, constants..<constants + C, p: p, scale: scale, offset: offset)
                }
                var row = r0
                let end = min(S, r0 + rowsPerItem)
                if !prepared.keeps(sample: b) {
                    for row in r0..<end {
                        let at = (b * S + row) * C
                        for c in 0..<C {
                            let i = constants + c
                            y[at + c] = WideMap.value(x[at + c], centre: p[i], scale: scale[i], offset: offset[i])
                        }
                    }
                    continue
                }
                // Rows of 8 or 32 channels all in one call: such a row is one strip of columns, so memory is read in
                // order while the strip's constants serve every row of the item (eight rows a call, C = 32: 0.93x
                // the time of two at a time, and its setup, about 60 instructions a call, was still a quarter of
                // the map's: all in one, forward 0.96x, and 0.85x on 8 channels). Other rows of up to 32 channels
                // take several 8-lane strips or one value at a time, each strip walking the call's rows again:
                // eight rows a call (all in one, 16 channels: 1.015x).
                // Wider rows: walking a strip down several rows reads memory out of order, which costs input
                // coming from L3 or memory (four rows: [64, 128, 32, 32] 1.2x). Float rows of a multiple of 32
                // channels from 64 up go row by row, constants as operands (`_mapColumns`), all in one call; the
                // other wide rows, four rows a strip from 128 channels on cached input (0.93-0.98x the time of
                // two, eight 1.06x on [2, 512, 28, 28]), else two.
                let whole = C == 8 || C == 32 || (C >= 64 && C % 32 == 0 && T.self == Float.self)
                let block = whole ? rowsPerItem : (C <= 32 ? 8 : (C >= 128 && !streaming(T.self) ? 4 : 2))
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
    /// centre rounded to T and the plane's dy shift s (`dyShift`), stretches added in order, then
    /// T = Σ (dy - s) + S s and U = Σ (dy - s)(x - cf) - (p - cf) Σ (dy - s). A plane whose sums in T's lanes
    /// overflow is summed again in Float64. A sample of one stretch rounds its centres and finds its shifts in
    /// that stretch's work item: on the calling thread, before the sweep, they took [8, 256, 14, 14]'s backward
    /// 6-8 us on two threads. Those of longer samples are found there still: each of a sample's stretches finding
    /// them again read 8 rows more than its own (128 rows on [2, 512, 28, 28]: 1.02-1.04x the time).
    func gradientSums<T: NormalizationScalar>(_ x: UnsafePointer<T>, _ dy: UnsafePointer<T>, p: UnsafePointer<Double>,
                                              t: UnsafeMutablePointer<Double>, u: UnsafeMutablePointer<Double>,
                                              arena: inout ScratchArena) {
        let C = shape.channels, S = shape.spatial
        let partials = arena.take(2 * shape.batch * stretches * C, of: Double.self)
        let centre = arena.take(shape.planes, of: T.self), shift = arena.take(shape.planes, of: T.self)
        let own = stretches == 1, exact = shape.twoValuesAChannel  // (own: each sample's one work item prepares it)
        if !own {
            for b in 0..<shape.batch {
                ChannelsLastLayout.prepare(b, p: p, dy: dy, spatial: S, channels: C, centre: centre, shift: shift)
            }
        }
        let inOrder = gradientsInOrder(T.self)
        // (the finish's corrections, 32 a channel, are not counted in the cost of a loop of finishes, which runs
        // only for samples of several stretches: counted, they measured 1.02x the time on [2, 512, 28, 28])
        stretchSums(partials, T.self, inOrder: inOrder, arena: &arena, {
            b, r0, rows, sum, dot, scratch in
            if own {
                ChannelsLastLayout.prepare(b, p: p, dy: dy, spatial: S, channels: C, centre: centre, shift: shift)
            }
            let at = (b * S + r0) * C
            T._columnGradientSums(dy + at, x + at, rows: rows, columns: C, stride: C, centre: centre + b * C,
                                  dyShift: shift + b * C, sums: sum, dots: dot, partials: scratch.blockPartials)
        }, finish: { b, c0, n, parts in
            let tb = t + b * C, ub = u + b * C, pb = p + b * C, channels = c0..<c0 + n
            addStretches(parts, offset: 0, first: c0, count: n, into: tb)
            addStretches(parts, offset: C, first: c0, count: n, into: ub)
            for c in channels {  // the stretches summed dy - s: T = Σ (dy - s) + S s
                let i = b * C + c, shifted = tb[c]
                tb[c] = shifted + Double(S) * Double(shift[i])
                ub[c] = CentreResidue.dot(ub[c], sum: shifted, centre: pb[c], rounded: Double(centre[i]))
            }
            // overflowed T's lanes, or two values a channel (`twoValuesAChannel`): in Float64
            for c in channels where exact || !(tb[c].isFinite && ub[c].isFinite) {
                tb[c] = 0; ub[c] = 0
                var s = Double(shift[b * C + c])
                ColumnKernels.gradientSums(dy + b * S * C + c, x + b * S * C + c, rows: S, columns: 1, stride: C,
                                           centre: pb + c, dyShift: &s, sums: tb + c, dots: ub + c)
            }
        })
    }

    /// Sample b's centres `p` rounded to T and its dy shifts (`dyShift`), into its C slots of each.
    private static func prepare<T: NormalizationScalar>(_ b: Int, p: UnsafePointer<Double>, dy: UnsafePointer<T>,
                                                        spatial S: Int, channels C: Int,
                                                        centre: UnsafeMutablePointer<T>,
                                                        shift: UnsafeMutablePointer<T>) {
        let k = centre + b * C
        var c = 0
        while c + 4 <= C { T._store4Narrow((p + b * C).lanes(c), k, c); c += 4 }
        while c < C { k[c] = T(p[b * C + c]); c += 1 }
        dyShift(dy + b * S * C, rows: S, columns: C, into: shift + b * C)
    }

    /// A sample's dy shift per channel (`dy` at its first row) by `_earlyMean`'s rule on its first (up to) eight
    /// values, read a row at a time across 64 channels (each plane's values one by one, C apart, cost 25
    /// instructions a plane: 3% of a backward).
    private static func dyShift<T: NormalizationScalar>(_ dy: UnsafePointer<T>, rows S: Int, columns C: Int,
                                                        into shift: UnsafeMutablePointer<T>) {
        let first = min(8, S), scale = 1 / T(first), width = 64
        withUnsafeTemporaryAllocation(of: T.self, capacity: width) { spread in
            let deviation = spread.baseAddress!
            var c0 = 0
            while c0 < C {
                let n = min(width, C - c0), m = shift + c0, top = dy + c0
                for c in 0..<n { m[c] = top[c] * scale; deviation[c] = 0 }
                for r in 1..<first {
                    let row = top + r * C
                    for c in 0..<n { m[c] += row[c] * scale; deviation[c] += (row[c] - top[c]).magnitude * scale }
                }
                for c in 0..<n { m[c] = T._shift(mean: m[c], distance: deviation[c]) }
                c0 += n
            }
        }
    }

    /// dx = P dy + Q (x - p) + R, rows of C values at a time, a work item a block of a sample's rows: the first
    /// item of sample b to run has its P, Q, R made (`maps(b)`) and their constants in T (`CombineConstants`:
    /// about each plane's x mean p and dy mean T/S, `dySums` / S, the centres' residues folded into R, as
    /// `_combine` does), which the sample's other items wait for (`OncePerIndex`); or, where a plane's constants
    /// would lose precision in T, every value of its sample in Float64, as there (and every sample's with two
    /// values a channel, `twoValuesAChannel`: dx is then a cancellation that constants rounded to T would show).
    func combine<T: NormalizationScalar>(_ dy: UnsafePointer<T>, _ x: UnsafePointer<T>, _ dx: UnsafeMutablePointer<T>,
                                         p: UnsafePointer<Double>, dySums t: UnsafePointer<Double>,
                                         coefficients: UnsafePointer<Double>, maps: (Int) -> Void,
                                         arena: inout ScratchArena) {
        let planes = shape.planes, C = shape.channels, S = shape.spatial, exact = shape.twoValuesAChannel
        let P = coefficients, Q = P + planes, R = Q + planes
        let prepared = CombineConstants<T>(samples: shape.batch, channels: C, arena: &arena)
        let ready = OncePerIndex(count: shape.batch, arena: &arena)
        let cT = prepared.centre, dT = prepared.dyCentre, pT = prepared.p, qT = prepared.q, rT = prepared.r
        let rowsPerItem = mapRows, perSample = (S + rowsPerItem - 1) / rowsPerItem
        parallelFor(shape.batch * perSample, cost: 2 * rowsPerItem * C) { range, _ in
            for item in range {
                let b = item / perSample, r0 = (item - b * perSample) * rowsPerItem
                let constants = b * C, at = (b * S + r0) * C
                ready.ensure(b) { b in
                    maps(b)
                    prepared.prepare(sample: b, constants..<constants + C, centres: p, dySums: t, spatial: S, P: P,
                                     Q: Q, R: R, exact: exact)
                }
                if !prepared.keeps(sample: b) {
                    for row in r0..<min(S, r0 + rowsPerItem) {
                        let at = (b * S + row) * C
                        for c in 0..<C {
                            let i = constants + c, v = at + c
                            dx[v] = WideMap.gradient(dy[v], x[v], centre: p[i], p: P[i], q: Q[i], r: R[i])
                        }
                    }
                    continue
                }
                T._combineColumns(dy + at, x + at, dx + at, rows: min(S, r0 + rowsPerItem) - r0, columns: C,
                                  stride: C, centre: cT + constants, dyCentre: dT + constants, p: pT + constants,
                                  q: qT + constants, r: rT + constants)
            }
        }
    }
}
