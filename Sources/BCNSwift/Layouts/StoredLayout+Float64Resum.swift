/// Planes whose gradient sums in Float32 lanes lose what the backward needs of them, summed again in Float64.
///
/// T = Σ dy and U = Σ (dy - s)(x - p) are summed in T's lanes, s a shift near dy's mean, with a rounding of about
/// ε Σ |dy - s| |x - p|. Two kinds of plane lose more than the backward can afford:
///
/// - **Wide planes.** The batch-norm stage's weight gradient takes S₂ = Σ dy₁ (x - μ) = U + (p - μ) T per plane, of the
///   size of Σ |dy| |x - μ|, about σ Σ |dy| where the values lie within a few σ of μ. One value far from the rest (an
///   outlier, whose dy is small) pulls p off μ, and every other |x - p| becomes about |p - μ|, at least d/√S for a
///   plane of deviation d: the rounding of U outgrows S₂ (measured: one value of 5e4 with dy 1e-3 among values of
///   spread 5 in eval, running variance 25, left the batch norm's weight gradient 25-270 ulps of its scale off, planes
///   and channels-last). With batch statistics d/σ is at most √B (the batch's variance holds every plane's), so only a
///   batch of more than 16 samples (all processes' under synchronized statistics) can hold such planes; with running
///   statistics (eval, and estimate mode) it has no bound. A plane whose variance exceeds `widePlaneRatio` σ² is summed
///   again. Planes within 4σ never are; running statistics far narrower than the data (stale, or from other data) make
///   every plane wide, and cost a pass in Float64 lanes. σ includes eps (the context keeps 1/σ, and the backward does
///   not know eps): a channel whose variance lies far below eps is measured against √eps, and misses planes up to 4√eps
///   wide (running variance 1e-8, eps 1e-5, an outlier's plane at 12 times the data's variance: 7-30 ulps).
/// - **Underflowing planes.** A product (dy - s)(x - p) below Float's normal range, 2^-126, keeps fewer bits than
///   Float has: x of spread 1e-15 with dy about 1e-28 (eps 1e-32, below the batch's variance) left the weight
///   gradients 2e4-2e5 ulps of their scale off and dx 4e3-1e4; subnormal x (about 1e-41) with dy about 1, 0.6-3e-5
///   of the batch norm's weight gradient's scale. A plane whose |U| lies below `underflowingDot` (2^-96, some 2^30
///   above where such products lose bits, for planes of up to 2^30 values and sums that cancel) is summed again.
///   U = 0 is taken as it stands where no product can have flushed to 0: x constant (q = 0), dy constant in the
///   plane (every dy - s is zero) with dy's mean and x's deviation far from underflowing, or dy summing to 0 (all
///   zeros, where a ReLU cut every gradient) about x whose deviation is above 2^-20.
///
/// The sums again are about what the backward takes them to be about. Where means made from the planes' p are
/// subtracted (batch statistics, the channel norm's group mean), the lanes' U behaves as a sum about the plane's
/// true mean, each p's rounding cancelling against the means' (where T is about the same over the planes a mean
/// covers): so U = Σ (dy - T/S)(x - p), which is that, exactly (about 0 instead, a plane of dy 1e5 off zero lost
/// 1e5 ulps of the weight gradient to the rounding of p). Where only running statistics meet U (a batch norm
/// alone, in eval or estimate mode), U = Σ dy (x - p) itself, exact about the p the rest of the backward uses.
/// Double input, summed in Float64 already, needs none of this.
let widePlaneRatio = 16.0
let underflowingDot = 0x1p-96

extension StoredLayout {
    /// T and U in Float64 of the planes above, in place of their sums in T's lanes (only for T = Float): wide
    /// planes (q/S · invSigma² above `widePlaneRatio`, σ from the forward's context: the batch's, or the running
    /// statistics'; with a batch-norm stage only) and underflowing ones. `through`: the forward used batch
    /// statistics in training.
    func resumInFloat64<T: NormalizationScalar>(plan: NormalizationPlan, through: Bool, _ x: UnsafePointer<T>,
                                                _ dy: UnsafePointer<T>, context ctx: NormalizationContext,
                                                t: UnsafeMutablePointer<Double>, u: UnsafeMutablePointer<Double>) {
        guard T.self == Float.self else { return }
        let screen = ResumScreen(ctx, shape: shape, batchNorm: plan.batchNorm != nil, t: t, u: u)
        // one screen of every plane on this thread (callgrind, backward instructions: [8, 256, 14, 14] +0.9%,
        // channels-last too; [2, 32, 8, 8] +0.9%); only where it finds planes, a pass over the blocks that hold
        // them, in parallel, so that one sample's blocks take every thread. (Running statistics far narrower than
        // the data make every plane wide: eval's forward and backward then take 1.3-1.5 times as long on
        // [8, 256, 14, 14], [2, 64, 56, 56] and [1, 256, 28, 28], both layouts; 2-4 times, in one scalar pass.)
        let blocks = screen.blocksPerSample, items = shape.batch &* blocks
        var candidates = 0
        for i in 0..<items { screen.block(i / blocks, i % blocks) { _, n in candidates &+= n } }
        guard candidates > 0 else { return }
        let about = plan.batchNorm != nil && !through && plan.channelNorm == nil
        parallelFor(items, cost: max(1, candidates / items) &* shape.spatial) { range, _ in
            for i in range {
                screen.block(i / blocks, i % blocks) { first, n in
                    resum(first, count: n, x, dy, context: ctx, screen: screen, aboutStoredMeans: about, t: t, u: u)
                }
            }
        }
    }

    /// Of `count` planes (at most `ResumScreen.block`, adjacent channels of one sample) from `first`, those wide or
    /// underflowing (`ResumScreen.lost`), summed again in Float64: T = Σ dy, and U = Σ dy (x - p) with
    /// `aboutStoredMeans`, else Σ (dy - T/S)(x - p). In Float64 lanes: along a plane where its values are
    /// contiguous; across the channels, a row of the block's at a time, where they are not (channels-last: each
    /// line of memory read once for its sixteen channels).
    private func resum<T: NormalizationScalar>(
        _ first: Int, count: Int, _ x: UnsafePointer<T>, _ dy: UnsafePointer<T>, context ctx: NormalizationContext,
        screen: ResumScreen, aboutStoredMeans: Bool, t: UnsafeMutablePointer<Double>, u: UnsafeMutablePointer<Double>
    ) {
        let S = shape.spatial, n = Double(S)
        var lost = 0  // bit k: plane first + k
        for k in 0..<count where screen.lost(first &+ k) { lost |= 1 << k }
        guard lost != 0 else { return }
        func store(_ k: Int, sum: Double, dot: Double, off: Double) {
            guard lost & (1 << k) != 0 else { return }
            t[first &+ k] = sum
            u[first &+ k] = aboutStoredMeans ? dot : dot - sum / n * off
        }
        let (start, stride) = planeElements(first)
        if stride != 1 && count == ResumScreen.block {  // channels-last: sixteen adjacent columns, row by row
            let p = UnsafePointer(ctx.p) + first
            let k0 = p.lanes(0), k1 = p.lanes(4), k2 = p.lanes(8), k3 = p.lanes(12)
            var s0 = SIMD4<Double>(), s1 = s0, s2 = s0, s3 = s0, d0 = s0, d1 = s0, d2 = s0, d3 = s0
            var o0 = s0, o1 = s0, o2 = s0, o3 = s0
            for r in 0..<S {
                let g = dy + (start &+ r &* stride), v = x + (start &+ r &* stride)
                let g0 = T._load4Wide(g, 0), e0 = T._load4Wide(v, 0) - k0
                let g1 = T._load4Wide(g, 4), e1 = T._load4Wide(v, 4) - k1
                let g2 = T._load4Wide(g, 8), e2 = T._load4Wide(v, 8) - k2
                let g3 = T._load4Wide(g, 12), e3 = T._load4Wide(v, 12) - k3
                s0 += g0; d0.addProduct(g0, e0); o0 += e0
                s1 += g1; d1.addProduct(g1, e1); o1 += e1
                s2 += g2; d2.addProduct(g2, e2); o2 += e2
                s3 += g3; d3.addProduct(g3, e3); o3 += e3
            }
            func stores(_ j: Int, _ s: SIMD4<Double>, _ d: SIMD4<Double>, _ o: SIMD4<Double>) {
                for l in 0..<4 { store(4 &* j &+ l, sum: s[l], dot: d[l], off: o[l]) }
            }
            stores(0, s0, d0, o0); stores(1, s1, d1, o1); stores(2, s2, d2, o2); stores(3, s3, d3, o3)
            return
        }
        for k in 0..<count where lost & (1 << k) != 0 {  // one plane at a time (`first`'s stride is theirs)
            let at = planeElements(first &+ k).first, p = ctx.p[first &+ k]
            let (sum, dot, off) = Self.planeSums(dy + at, x + at, count: S, stride: stride, centre: p)
            store(k, sum: sum, dot: dot, off: off)
        }
    }

    /// (Σ dy, Σ dy (x - p), Σ (x - p)) in Float64 over `count` values `stride` apart, p = `centre`: in lanes of
    /// four consecutive values where `stride` is 1.
    private static func planeSums<T: NormalizationScalar>(_ dy: UnsafePointer<T>, _ x: UnsafePointer<T>, count n: Int,
                                                          stride: Int, centre p: Double) -> (Double, Double, Double) {
        var sum = 0.0, dot = 0.0, off = 0.0, i = 0
        if stride == 1 {
            let k = SIMD4(repeating: p)
            var s = SIMD4<Double>(), d = s, o = s
            while i &+ 4 <= n {
                let g = T._load4Wide(dy, i), e = T._load4Wide(x, i) - k
                s += g; d.addProduct(g, e); o += e
                i &+= 4
            }
            sum = Lanes.reduce(s); dot = Lanes.reduce(d); off = Lanes.reduce(o)
        }
        while i < n {
            let g = Double(dy[i &* stride]), e = Double(x[i &* stride]) - p
            sum += g; dot.addProduct(g, e); off += e
            i &+= 1
        }
        return (sum, dot, off)
    }
}

/// Which planes `resumInFloat64` sums again: the bounds on the forward's context and the lanes' T and U.
struct ResumScreen {
    /// Channels a block (`block`): a work item of the sums again, and in channels-last a row's sixteen values.
    static let block = 16
    let q, invSigma: UnsafePointer<Double>
    let t, u: UnsafePointer<Double>
    let channels: Int, spatial: Double, batchNorm: Bool

    init(_ ctx: NormalizationContext, shape: NormalizationShape, batchNorm: Bool, t: UnsafePointer<Double>,
         u: UnsafePointer<Double>) {
        q = UnsafePointer(ctx.q); invSigma = UnsafePointer(ctx.invSigma); self.t = t; self.u = u
        channels = shape.channels; spatial = Double(shape.spatial); self.batchNorm = batchNorm
    }

    /// Blocks of `block` channels a sample (the last may hold fewer).
    var blocksPerSample: Int { (channels + ResumScreen.block - 1) / ResumScreen.block }

    /// Of block j of sample b (channels 16j up to 16j + 16): calls `body(first plane, count)` for its whole fours
    /// where some plane among them may be lost (four channels a step, by the bounds alone: `lost` decides), and for
    /// the channels beyond the last whole four of the sample, which only the last block holds, where one of them is
    /// lost.
    @inline(__always)
    func block(_ b: Int, _ j: Int, _ body: (Int, Int) -> Void) {
        let C = channels, at = b &* C, c0 = j &* ResumScreen.block, c1 = min(C, c0 &+ ResumScreen.block)
        let fours = min(c1, C &- C % 4)  // (the sample's last whole four ends in the last block)
        let bound = SIMD4(repeating: widePlaneRatio * spatial)
        let tiny = SIMD4(repeating: underflowingDot * underflowingDot)
        var c = c0
        while c &+ 4 <= fours {
            let s = invSigma.lanes(c), scale = batchNorm ? s * s : SIMD4(), us = u.lanes(at &+ c)
            if any((q.lanes(at &+ c) * scale .> bound) .| (us * us .< tiny)) {
                body(at &+ c0, fours &- c0)
                break
            }
            c &+= 4
        }
        if fours < c1, (fours..<c1).contains(where: { lost(at &+ $0) }) { body(at &+ fours, c1 &- fours) }
    }

    /// Whether plane i is wide (with a batch-norm stage) or underflowing. NaN: neither. U = 0 stands where no
    /// product can have flushed to 0: x constant (q = 0); dy constant in the plane (every dy - s is 0), told by
    /// dy's mean and x's deviation far from underflow; or dy summing to 0 (all zeros, as where a ReLU cut every
    /// gradient) about x far from it.
    func lost(_ i: Int) -> Bool {
        let q = q[i], a = abs(u[i]), dyMean = t[i] / spatial, s = invSigma[i % channels]
        let tiny = underflowingDot * underflowingDot, deviation = q / spatial
        let flushed = a != 0 || (q > 0 && (dyMean == 0 ? deviation < 0x1p-40 : dyMean * dyMean * deviation < tiny))
        return (batchNorm && q * (s * s) > widePlaneRatio * spatial) || (a < underflowingDot && flushed)
    }
}
