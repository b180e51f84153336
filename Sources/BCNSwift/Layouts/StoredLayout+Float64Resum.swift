/// Planes whose gradient sums in Float32 lanes lose what the backward needs of them, summed again in Float64.
///
/// T = Σ dy and U = Σ (dy - s)(x - p) are summed in T's lanes, s a shift near dy's mean, with a rounding of about
/// ε Σ |dy - s| |x - p|. Two kinds of plane lose more than the backward can afford:
///
/// - **Wide planes.** The batch-norm stage's weight gradient takes S₂ = Σ dy₁ (x - μ) = U + (p - μ) T per plane,
///   of the size of Σ |dy| |x - μ|, about σ Σ |dy| where the values lie within a few σ of μ. One value far from
///   the rest (an outlier, whose dy is small) pulls p off μ, and every other |x - p| becomes about |p - μ|, at
///   least d/√S for a plane of deviation d: the rounding of U outgrows S₂ (measured: one value of 5e4 with dy 1e-3
///   among values of spread 5 in eval, running variance 25, left the batch norm's weight gradient 25-270 ulps of
///   its scale off, planes and channels-last). With batch statistics d/σ is at most √B (the batch's variance holds
///   every plane's), so only batches of more than 16 samples can hold such planes; with running statistics (eval,
///   and estimate mode) it has no bound. A plane whose variance exceeds `widePlaneRatio` σ² is summed again.
///   Ordinary planes (within 4σ) never are. σ includes eps (the context keeps 1/σ, and the backward does not know
///   eps): a channel whose variance lies far below eps is measured against √eps, and misses planes up to 4√eps
///   wide (running variance 1e-8, eps 1e-5, an outlier's plane at 12 times the data's variance: 7-30 ulps).
/// - **Underflowing planes.** A product (dy - s)(x - p) below Float's normal range, 2^-126, keeps fewer bits than
///   Float has: x of spread 1e-15 with dy about 1e-28 (eps 1e-32, below the batch's variance) left the weight
///   gradients 2e4-2e5 ulps of their scale off and dx 4e3-1e4; subnormal x (about 1e-41) with dy about 1, 0.6-3e-5
///   of the batch norm's weight gradient's scale. A plane whose |U| lies below `underflowingDot` (2^-96, some 2^30
///   above where such products lose bits, for planes of up to 2^30 values and sums that cancel) is summed again.
///   U = 0 is taken as it stands where no product can have flushed to 0: x constant (q = 0), dy all zeros (T = 0),
///   or dy's mean and x's deviation far from underflowing (dy constant in the plane makes every dy - s zero).
///
/// The sums again are about what the backward takes them to be about. Where means made from the planes' p are
/// subtracted (batch statistics, the channel norm's group mean), the lanes' U behaves as a sum about the plane's
/// true mean, each p's rounding cancelling against the means': so U = Σ (dy - T/S)(x - p), which is that, exactly
/// (about 0 instead, a plane of dy 1e5 off zero lost 1e5 ulps of the weight gradient to the rounding of p). Where
/// only running statistics meet U (a batch norm alone, in eval or estimate mode), U = Σ dy (x - p) itself.
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
        let C = shape.channels, B = shape.batch, q = UnsafePointer(ctx.q), invSigma = UnsafePointer(ctx.invSigma)
        let batchNorm = plan.batchNorm != nil, about = batchNorm && !through && plan.channelNorm == nil
        let bound = SIMD4(repeating: widePlaneRatio * Double(shape.spatial))
        let tiny = SIMD4(repeating: underflowingDot * underflowingDot)
        // four channels a step, their σ² once for every sample; the screen takes the bounds alone, `resum` the
        // exceptions. Callgrind, backward instructions: [8, 256, 14, 14] +0.6%, channels-last too; [2, 32, 8, 8]
        // +0.8%
        var c = 0
        while c &+ 4 <= C {
            let s = invSigma.lanes(c), scale = batchNorm ? s * s : SIMD4()  // (no batch-norm stage: none wide)
            for b in 0..<B {
                let at = b &* C &+ c, us = u.lanes(at)
                if any((q.lanes(at) * scale .> bound) .| (us * us .< tiny)) {
                    resum(at, count: 4, x, dy, context: ctx, batchNorm: batchNorm, aboutStoredMeans: about,
                          t: t, u: u)
                }
            }
            c &+= 4
        }
        if c < C {
            for b in 0..<B {
                resum(b &* C &+ c, count: C &- c, x, dy, context: ctx, batchNorm: batchNorm, aboutStoredMeans: about,
                      t: t, u: u)
            }
        }
    }

    /// Of `count` planes from `first` (of one sample), those wide (only with a `batchNorm` stage) or underflowing,
    /// summed again in Float64: T = Σ dy, and U = Σ dy (x - p) with `aboutStoredMeans`, else
    /// Σ (dy - T/S)(x - p). Apart from the screen, to leave its registers free.
    @inline(never)
    private func resum<T: NormalizationScalar>(
        _ first: Int, count: Int, _ x: UnsafePointer<T>, _ dy: UnsafePointer<T>, context ctx: NormalizationContext,
        batchNorm: Bool, aboutStoredMeans: Bool, t: UnsafeMutablePointer<Double>, u: UnsafeMutablePointer<Double>
    ) {
        let C = shape.channels, S = shape.spatial, n = Double(S)
        for plane in first..<first + count {
            let q = ctx.q[plane], a = abs(u[plane]), dyMean = t[plane] / n, s = ctx.invSigma[plane % C]
            // (NaN: neither wide nor underflowing; U = 0 stands where x or dy is constant, or dy all zeros)
            let wide = batchNorm && q * (s * s) > widePlaneRatio * n, tiny = underflowingDot * underflowingDot
            let flushed = a != 0 || (q > 0 && dyMean != 0 && dyMean * dyMean * (q / n) < tiny)
            guard wide || (a < underflowingDot && flushed) else { continue }
            let (start, stride) = planeElements(plane), p = ctx.p[plane]
            var sum = 0.0, dot = 0.0, off = 0.0  // Σ dy, Σ dy (x - p), Σ (x - p)
            for r in 0..<S {
                let g = Double(dy[start &+ r &* stride]), d = Double(x[start &+ r &* stride]) - p
                sum += g; dot.addProduct(g, d); off += d
            }
            t[plane] = sum
            u[plane] = aboutStoredMeans ? dot : dot - sum / n * off
        }
    }
}
