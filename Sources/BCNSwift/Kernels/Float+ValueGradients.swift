// The backward of rows of one-value planes ([B, C] Float input, S = 1, and short planes seen as such by
// `RowsValueView`) in Float32 lanes: eight values a step
// where the Float64 path (`NormalizationUnit.valueSums`, `valueGradients`) takes four. The Float32 transcription of
// those value methods' algebra, for the groups `RowRounding.acceptsGradient` and `acceptsGradientSums` let through;
// the group's sums run in Float32 lanes flushed to Float64 every 64 values, its constants come from Float64 (m, r,
// T, W: `SumGradient.terms`), and each value's dy₁ and x - μ go to a `FloatValueSink`.

extension Float {
    /// The constants of dy₁ = r w (dy - T/K) - r³ w W/K · e (e = ȳ - m) for each of an item's groups, six Floats a
    /// group: r w, T/K as two Floats, r³ w W/K, m as two Floats (so that dy - T/K and ȳ - m round relative to their
    /// own size, however far dy and ȳ sit from 0). One row of `groups` Floats per constant, constant i of group j at
    /// i·groups + j: four groups' constants are then six vector stores. (A group's six Floats side by side took 24
    /// scalar stores for four groups, and LLVM then computed the four groups' constants one lane at a time too.)
    struct GradientConstants {
        static let count = 6
        let base: UnsafeMutablePointer<Float>, groups: Int

        /// The table of `groups` groups in `storage` (`bytes(groups:)`).
        init(_ storage: UnsafeMutableRawPointer, groups: Int) {
            base = storage.bindMemory(to: Float.self, capacity: GradientConstants.count * groups)
            self.groups = groups
        }

        static func bytes(groups: Int) -> Int { 4 * count * groups }

        /// Group j's constants from its ΣT and W, the forward's m and r, and the weight w (`SumGradient.terms`,
        /// split into Floats).
        @inline(__always)
        func store(t: Double, w wg: Double, planes K: Int, m: Double, r: Double, weight w: Double, group j: Int) {
            let c = SumGradient.terms(t: t, w: wg, planes: K, m: m, r: r, weight: w)
            let meanT = Float._split(c.meanT), mean = Float._split(c.m), n = groups, g = base + j
            g[0] = Float(c.rw); g[n] = meanT.high; g[2 &* n] = meanT.low; g[3 &* n] = Float(c.r3wWK)
            g[4 &* n] = mean.high; g[5 &* n] = mean.low
        }

        /// `store` of groups j..<j+4, lane l for group j + l: the same numbers, computed in the same vector
        /// operations.
        @inline(__always)
        func store(t: SIMD4<Double>, w wg: SIMD4<Double>, planes K: Int, m: SIMD4<Double>, r: SIMD4<Double>,
                   weight w: SIMD4<Double>, groups j: Int) {
            let c = SumGradient.terms(t: t, w: wg, planes: K, m: m, r: r, weight: w)
            let meanT = Float._split(c.meanT), mean = Float._split(c.m), n = groups
            @inline(__always) func row(_ i: Int, _ v: SIMD4<Float>) {
                UnsafeMutableRawPointer(base + (i &* n &+ j)).storeBytes(of: v, as: SIMD4<Float>.self)
            }
            row(0, SIMD4<Float>(c.rw)); row(1, meanT.high); row(2, meanT.low); row(3, SIMD4<Float>(c.r3wWK))
            row(4, mean.high); row(5, mean.low)
        }

        /// Constant i of group j, in every lane.
        @inline(__always)
        func load(_ j: Int, _ i: Int) -> SIMD8<Float> { SIMD8(repeating: base[i &* groups &+ j]) }
    }

    /// The Float32 lane sums of one group's backward sums (`_valueGroupGradientSums`): T = Σ (dy - s), W =
    /// Σ (ȳ - m)(dy - s), Σ dy² and Σ (x - μ)², eight lanes each, with s the group's shift and m as two Floats.
    struct GradientLanes {
        var t, w, squares, centred: SIMD8<Float>

        /// The sums of the eight values from k, whose dy are `first`.
        @inline(__always)
        init(first: SIMD8<Float>, _ x: UnsafePointer<Float>, _ k: Int, _ c: ValueConstants, shift s: SIMD8<Float>,
             mean mh: SIMD8<Float>, _ ml: SIMD8<Float>) {
            let z = c.centred(x, k), e = (c.staged(centred: z, k) - mh) - ml
            t = first - s; w = e * t; squares = first * first; centred = z * z
        }

        /// Adds the eight values from k.
        @inline(__always)
        mutating func add(_ x: UnsafePointer<Float>, _ dy: UnsafePointer<Float>, _ k: Int, _ c: ValueConstants,
                          shift s: SIMD8<Float>, mean mh: SIMD8<Float>, _ ml: SIMD8<Float>) {
            let g = _load8(dy, k), d = g - s, z = c.centred(x, k), e = (c.staged(centred: z, k) - mh) - ml
            t += d; w.addProduct(e, d); squares.addProduct(g, g); centred.addProduct(z, z)
        }

        /// Every lane 0 (after a flush).
        @inline(__always)
        mutating func clear() { t = SIMD8(); w = t; squares = t; centred = t }

        /// The four sums over the lanes (`_hsum4`).
        @inline(__always)
        var total: SIMD4<Float> { _hsum4(t, w, squares, centred) }
    }

    /// ΣT = Σ dy, W = Σ (ȳ - m) dy, Σ dy² and Σ (x - μ)² of one group of K one-value planes from k0 (K a
    /// multiple of 8), with x - μ and ȳ = β + a (x - μ) from `c` (`ValueConstants`) and m as two Floats; the lanes
    /// summed in Float32 over at most 64 values (8 terms a lane), then in Float64. The squares are for the guard's
    /// ranges. T and W are summed about s, the group's first eight dy's `_shift` (as `_gradientSums` shifts dy):
    /// ΣT = Σ (dy - s) + K s and W = Σ (ȳ - m)(dy - s), which is W with m the mean of ȳ, so that a gradient far
    /// off 0 against its spread rounds to its spread (1000 times: 350 ulps of dx before).
    @inline(__always)
    static func _valueGroupGradientSums(_ x: UnsafePointer<Float>, _ dy: UnsafePointer<Float>, from k0: Int,
                                        count K: Int, _ c: ValueConstants, mean m: Double) -> SIMD4<Double> {
        let (high, low) = _split(m), mh = SIMD8(repeating: high), ml = SIMD8(repeating: low)
        // The first eight values outside the loop, so that its flush test is one bit test. One loop that
        // flushes every 64 values: nested loops per block, or a countdown to each flush, let LLVM's SLP
        // vectorizer split the lanes into halves and merge the reductions (23 instructions a step, not 17).
        let first = _load8(dy, k0), shift = _shift(first), sv = SIMD8(repeating: shift)
        var lanes = GradientLanes(first: first, x, k0, c, shift: sv, mean: mh, ml), i = 8, sums = SIMD4<Double>()
        while i < K {
            if i & 63 == 0 {
                sums += SIMD4<Double>(lanes.total)
                lanes.clear()
            }
            lanes.add(x, dy, k0 &+ i, c, shift: sv, mean: mh, ml)
            i &+= 8
        }
        return sums + SIMD4<Double>(lanes.total) + SIMD4(Double(K) * Double(shift), 0, 0, 0)
    }

    /// `_valueGroupGradientSums` of the four groups of K ≤ 64 values from k0 (group l from k0 + l·K, mean m[l]),
    /// the same sums bit for bit: one Float32 partial a lane (so no flush), and what `_valueGroupGradientSums` does
    /// once a group (its shift, its m's two Floats, its four lane sums) done for the four in the same vector
    /// operations. Lane l of each result is group l's. Per group of 32 that work was
    /// about 140 instructions, against 60 for the values.
    @inline(__always)
    static func _valueQuadGradientSums(_ x: UnsafePointer<Float>, _ dy: UnsafePointer<Float>, from k0: Int,
                                       count K: Int, _ c: ValueConstants, means m: SIMD4<Double>)
        -> (t: SIMD4<Double>, w: SIMD4<Double>, squares: SIMD4<Double>, centred: SIMD4<Double>)
    {
        let k1 = k0 &+ K, k2 = k1 &+ K, k3 = k2 &+ K
        let (high, low) = _split(m)
        let f0 = _load8(dy, k0), f1 = _load8(dy, k1), f2 = _load8(dy, k2), f3 = _load8(dy, k3)
        let shift = _shift(f0, f1, f2, f3)
        // The four groups one after another: stepping together, their sixteen sums and twelve constants were
        // spilled from the registers in every step.
        @inline(__always)
        func lanes(_ first: SIMD8<Float>, _ k: Int, _ l: Int) -> GradientLanes {
            let s = SIMD8(repeating: shift[l]), mh = SIMD8(repeating: high[l]), ml = SIMD8(repeating: low[l])
            var lanes = GradientLanes(first: first, x, k, c, shift: s, mean: mh, ml), i = 8
            while i < K { lanes.add(x, dy, k &+ i, c, shift: s, mean: mh, ml); i &+= 8 }
            return lanes
        }
        let v0 = lanes(f0, k0, 0), v1 = lanes(f1, k1, 1), v2 = lanes(f2, k2, 2), v3 = lanes(f3, k3, 3)
        // 0 + sum, as `_valueGroupGradientSums`'s Float64 totals start (a -0 sum becomes +0)
        @inline(__always)
        func total(_ a: SIMD8<Float>, _ b: SIMD8<Float>, _ c: SIMD8<Float>, _ d: SIMD8<Float>) -> SIMD4<Double> {
            SIMD4<Double>() + SIMD4<Double>(_hsum4(a, b, c, d))
        }
        return (total(v0.t, v1.t, v2.t, v3.t) + Double(K) * SIMD4<Double>(shift), total(v0.w, v1.w, v2.w, v3.w),
                total(v0.squares, v1.squares, v2.squares, v3.squares),
                total(v0.centred, v1.centred, v2.centred, v3.centred))
    }

    /// `_valueItemGradientSums` of the first 4·`quads` groups of an item of groups of K ≤ 64 values
    /// (`_valueQuadGradientSums`): every group's sums, then the guards, cheaper than skipping the groups
    /// `RowRounding.acceptsGradient` shuts.
    @inline(never)
    static func _valueQuadsGradientSums(_ x: UnsafePointer<Float>, _ dy: UnsafePointer<Float>, quads: Int,
                                        size K: Int, _ c: ValueConstants, means: UnsafePointer<Double>,
                                        inverses: UnsafePointer<Double>, weights: UnsafePointer<Double>,
                                        betaReach: UnsafePointer<Double>, t: UnsafeMutablePointer<Double>,
                                        w: UnsafeMutablePointer<Double>) -> UInt64 {
        var kept: UInt64 = 0, j = 0, at = 0
        for _ in 0..<quads {
            let open = RowRounding.acceptsGradient(m: means.lanes(j), r: inverses.lanes(j), weight: weights.lanes(j),
                                                   beta: betaReach.lanes(j))
            let sums = _valueQuadGradientSums(x, dy, from: at, count: K, c, means: means.lanes(j))
            let keep = open .& RowRounding.acceptsGradientSums(count: K, t: sums.t, w: sums.w, squares: sums.squares,
                                                                centred: sums.centred)
            t.storeLanes(sums.t, j); w.storeLanes(sums.w, j)  // the caller overwrites the groups it does not keep
            kept |= RowRounding.bits(keep) << UInt64(j)
            j &+= 4; at &+= 4 &* K
        }
        return kept
    }

    /// Every group of one item (`groups` groups of K one-value planes from x and dy, one row's stretch; the
    /// constants from its first channel; the forward's m and r, the weights and the groups' largest |β| from its
    /// first group) that `RowRounding.acceptsGradient` lets through: `_valueGroupGradientSums`, its ΣT and W into
    /// `t[j]` and `w[j]` where `RowRounding.acceptsGradientSums` keeps them. Returns the groups it kept (bit j for
    /// group j). Groups of up to 64 values go four at a time (`_valueQuadsGradientSums`), the rest one at a time
    /// (`_valueGroupsGradientSums`); each out of line, as `_valueItemMoments` is. (A test for K ≤ 64 inside the
    /// one-at-a-time kernel made its groups of 128 values 20% slower.)
    @inline(__always)
    static func _valueItemGradientSums(_ x: UnsafePointer<Float>, _ dy: UnsafePointer<Float>, groups: Int, size K: Int,
                                       _ c: ValueConstants, means: UnsafePointer<Double>,
                                       inverses: UnsafePointer<Double>, weights: UnsafePointer<Double>,
                                       betaReach: UnsafePointer<Double>, t: UnsafeMutablePointer<Double>,
                                       w: UnsafeMutablePointer<Double>) -> UInt64 {
        let j = K <= 64 ? groups & ~3 : 0, at = j &* K
        var kept: UInt64 = 0
        if j > 0 {
            kept = _valueQuadsGradientSums(x, dy, quads: j >> 2, size: K, c, means: means, inverses: inverses,
                                           weights: weights, betaReach: betaReach, t: t, w: w)
        }
        if j < groups {
            kept |= _valueGroupsGradientSums(x + at, dy + at, groups: groups &- j, size: K, c.advanced(by: at),
                                             means: means + j, inverses: inverses + j, weights: weights + j,
                                             betaReach: betaReach + j, t: t + j, w: w + j) << UInt64(j)
        }
        return kept
    }

    /// `_valueItemGradientSums` one group at a time, but for the guards of four whole groups.
    @inline(never)
    static func _valueGroupsGradientSums(_ x: UnsafePointer<Float>, _ dy: UnsafePointer<Float>, groups: Int,
                                         size K: Int, _ c: ValueConstants, means: UnsafePointer<Double>,
                                         inverses: UnsafePointer<Double>, weights: UnsafePointer<Double>,
                                         betaReach: UnsafePointer<Double>, t: UnsafeMutablePointer<Double>,
                                         w: UnsafeMutablePointer<Double>) -> UInt64 {
        var kept: UInt64 = 0, j = 0, at = 0
        // Four groups at a time where they are whole: the guards of four in the same vector operations
        while groups &- j >= 4 {
            let open = RowRounding.acceptsGradient(m: means.lanes(j), r: inverses.lanes(j), weight: weights.lanes(j),
                                                   beta: betaReach.lanes(j))
            var sums = (SIMD4<Double>(), SIMD4<Double>(), SIMD4<Double>(), SIMD4<Double>())
            if open[0] { sums.0 = _valueGroupGradientSums(x, dy, from: at, count: K, c, mean: means[j]) }
            if open[1] { sums.1 = _valueGroupGradientSums(x, dy, from: at &+ K, count: K, c, mean: means[j &+ 1]) }
            if open[2] {
                sums.2 = _valueGroupGradientSums(x, dy, from: at &+ 2 &* K, count: K, c, mean: means[j &+ 2])
            }
            if open[3] {
                sums.3 = _valueGroupGradientSums(x, dy, from: at &+ 3 &* K, count: K, c, mean: means[j &+ 3])
            }
            let tg = SIMD4(sums.0[0], sums.1[0], sums.2[0], sums.3[0])
            let wg = SIMD4(sums.0[1], sums.1[1], sums.2[1], sums.3[1])
            let keep = open .& RowRounding.acceptsGradientSums(
                count: K, t: tg, w: wg, squares: SIMD4(sums.0[2], sums.1[2], sums.2[2], sums.3[2]),
                centred: SIMD4(sums.0[3], sums.1[3], sums.2[3], sums.3[3]))
            t.storeLanes(tg, j); w.storeLanes(wg, j)  // the caller overwrites the groups it does not keep
            kept |= RowRounding.bits(keep) << UInt64(j)
            j &+= 4; at &+= 4 &* K
        }
        while j < groups {
            let m = means[j]
            if RowRounding.acceptsGradient(m: m, r: inverses[j], weight: weights[j], beta: betaReach[j]) {
                let sums = _valueGroupGradientSums(x, dy, from: at, count: K, c, mean: m)
                if RowRounding.acceptsGradientSums(count: K, sums) {
                    t[j] = sums[0]; w[j] = sums[1]; kept |= 1 << UInt64(j)
                }
            }
            j &+= 1; at &+= K
        }
        return kept
    }

    /// Each value's dy₁ and x - μ for every group of one item in `groups` (bit j for group j), with group j's
    /// constants from `constants`, handed to `sink` eight values at a time:
    /// values first + k of the tensor, channels c0 + k. x - μ and ȳ as in `ValueConstants`, then
    /// dy₁ = r w ((dy - T/K high) - T/K low) - r³ w W/K · ((ȳ - m high) - m low).
    @inline(never)
    static func _valueItemGradients<Sink: FloatValueSink>(
        _ x: UnsafePointer<Float>, _ dy: UnsafePointer<Float>, first: Int, channel c0: Int, size K: Int,
        _ c: ValueConstants, constants g: GradientConstants, groups: UInt64, into sink: Sink
    ) {
        var rest = groups
        while rest != 0 {
            let j = rest.trailingZeroBitCount
            let rw = g.load(j, 0), th = g.load(j, 1), tl = g.load(j, 2), r3wWK = g.load(j, 3)
            let mh = g.load(j, 4), ml = g.load(j, 5)
            var k = j &* K
            let end = k &+ K
            while k < end {
                let z = c.centred(x, k), e = (c.staged(centred: z, k) - mh) - ml
                let dy1 = rw * ((_load8(dy, k) - th) - tl) - r3wWK * e
                sink.lanes(first &+ k, c0 &+ k, dy1, z)
                k &+= 8
            }
            rest &= rest &- 1
        }
    }
}

/// What the Float32 backward of one-value planes does with each value's dy₁: `lanes` for values i..<i+8 of the
/// tensor (channels c..<c+8), with z = x - μ of the batch-norm stage; `prepare` as a panel (channels c0..<c0+n)
/// begins, and `flush` after its every eighth sample and its last (sinks that sum over samples keep Float32
/// partials until then).
protocol FloatValueSink {
    func lanes(_ i: Int, _ c: Int, _ dy1: SIMD8<Float>, _ z: SIMD8<Float>)
    func prepare(first c0: Int, count n: Int)
    func flush(first c0: Int, count n: Int)
    /// The sink that work items running in thread slot `slot` use: sinks with partials give each slot its own.
    func slot(_ slot: Int) -> Self
}

extension FloatValueSink {
    /// Nothing to fill or flush: sinks that keep no per-panel constants or partials.
    func prepare(first c0: Int, count n: Int) {}
    func flush(first c0: Int, count n: Int) {}
    func slot(_ slot: Int) -> Self { self }
}

extension Float {
    /// The batch-norm stage's a, S₁/n and k per channel (`BatchNormStage.dxTerms`), rounded to Float32 once a
    /// call, for dx = a ((dy₁ - S₁/n) - (x - μ) k).
    struct InputGradientConstants {
        let a, s1n, k: UnsafeMutablePointer<Float>

        /// Room for the constants of `count` channels in `storage` (3·count Floats), to be filled by `fill`.
        init(count n: Int, storage: UnsafeMutablePointer<Float>) {
            a = storage; s1n = storage + n; k = s1n + n
        }

        /// The constants of channels c0..<c0+n from the Float64 a, S₁/n and k.
        func fill(first c0: Int, count n: Int, a a64: UnsafePointer<Double>, s1n s64: UnsafePointer<Double>,
                  k k64: UnsafePointer<Double>) {
            for c in c0..<c0 &+ n { a[c] = Float(a64[c]); s1n[c] = Float(s64[c]); k[c] = Float(k64[c]) }
        }
    }
}
