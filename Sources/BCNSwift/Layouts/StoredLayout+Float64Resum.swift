/// Planes whose gradient sums in Float32 lanes lose what the backward needs of them, summed again in Float64.
///
/// U = Σ dy (x - p) is summed in T's lanes with a rounding of about ε Σ |dy| |x - p|. Two kinds of plane lose
/// more than the backward can afford, and are rare enough that summing them again costs nothing visible:
///
/// - **Wide planes.** The batch-norm stage's weight gradient takes S₂ = Σ dy₁ (x - μ) = U + (p - μ) T per plane,
///   of the size of Σ |dy| |x - μ|, about σ Σ |dy| where the values lie within a few σ of μ. A plane of values near
///   μ but one (an outlier, whose dy is small) pulls p off μ: every |x - p| is then of the plane's deviation d,
///   not of σ, and the rounding of U is d/σ times the size of S₂ (measured: one value of 5e4 with dy 1e-3 among
///   values of spread 5 in eval, running variance 25, left the batch norm's weight gradient 25-270 ulps of its
///   scale off, planes and channels-last). With batch statistics d/σ is at most about √B (the batch's variance
///   holds every plane's); with running statistics (eval, and estimate mode) it has no bound. So a plane whose
///   variance exceeds `widePlaneRatio` σ² of its channel is summed again. Ordinary planes (within 4σ) never are.
/// - **Underflowing planes.** A product dy (x - p) below Float's normal range, 2^-126, keeps fewer bits than Float
///   has: x of spread 1e-15 with dy about 1e-28 (eps 1e-32, below the batch's variance) left the weight gradients
///   2e4-2e5 ulps of their scale off and dx 4e3-1e4; subnormal x (about 1e-41) with dy about 1, 0.6-3e-5 of the
///   batch norm's weight gradient's scale. A plane whose |U| lies below `underflowingDot` (2^-96, some 2^30 above
///   where products of such sums lose bits, for planes of up to 2^30 values and sums that cancel) is summed again,
///   unless U = 0 where it must be: a constant plane (q = 0: x - p = 0) or dy all zeros (T = 0). (Not q > 0 alone:
///   the forward's q of subnormal values may underflow to 0 too.)
///
/// Double input, summed in Float64 already, needs neither.
let widePlaneRatio = 16.0
let underflowingDot = 0x1p-96

extension StoredLayout {
    /// T and U in Float64 of the planes above (a plane's q/S · (1/σ)² against `widePlaneRatio`, with a batch-norm
    /// stage: σ, `invSigma`, from the forward's context, the batch's or the running statistics'; its |U| against
    /// `underflowingDot`), in place of their sums in T's lanes. Only for T = Float.
    func resumInFloat64<T: NormalizationScalar>(plan: NormalizationPlan, _ x: UnsafePointer<T>, _ dy: UnsafePointer<T>,
                                                context ctx: NormalizationContext, t: UnsafeMutablePointer<Double>,
                                                u: UnsafeMutablePointer<Double>) {
        guard T.self == Float.self else { return }
        let C = shape.channels, q = UnsafePointer(ctx.q), invSigma = UnsafePointer(ctx.invSigma)
        let batchNorm = plan.batchNorm != nil
        // (with no batch-norm stage no plane is wide: a bound no q/S · 0 exceeds)
        let bound = batchNorm ? widePlaneRatio * Double(shape.spatial) : .infinity
        // four channels a step, screened by the bounds alone; `resum` sorts out the exceptions. Callgrind, backward
        // instructions: [8, 256, 14, 14] +0.8%, channels-last too; [2, 32, 8, 8] +0.7%
        let wide = SIMD4(repeating: bound), tiny = SIMD4(repeating: underflowingDot * underflowingDot)
        let none = SIMD4<Double>()
        for b in 0..<shape.batch {
            let at = b &* C
            var c = 0
            while c &+ 4 <= C {
                let s = batchNorm ? invSigma.lanes(c) : none, us = u.lanes(at &+ c)
                if any((q.lanes(at &+ c) * (s * s) .> wide) .| (us * us .< tiny)) {
                    resum(at &+ c, count: 4, x, dy, context: ctx, bound: batchNorm ? bound : nil, t: t, u: u)
                }
                c &+= 4
            }
            if c < C { resum(at &+ c, count: C &- c, x, dy, context: ctx, bound: batchNorm ? bound : nil, t: t, u: u) }
        }
    }

    /// Of `count` planes from `first` (of one sample), those wide (q/S · (1/σ)² above `bound`, nil without a
    /// batch-norm stage) or underflowing, summed again in Float64. Apart from the screen, to leave its registers
    /// free.
    @inline(never)
    private func resum<T: NormalizationScalar>(_ first: Int, count: Int, _ x: UnsafePointer<T>, _ dy: UnsafePointer<T>,
                                               context ctx: NormalizationContext, bound: Double?,
                                               t: UnsafeMutablePointer<Double>, u: UnsafeMutablePointer<Double>) {
        let C = shape.channels
        var zero = 0.0
        for plane in first..<first + count {
            let q = ctx.q[plane], a = abs(u[plane]), invSigma = ctx.invSigma[plane % C]
            // (NaN: neither wide nor underflowing)
            let wide = bound.map { q * (invSigma * invSigma) > $0 } ?? false
            guard wide || (a < underflowingDot && (a != 0 || (t[plane] != 0 && q > 0))) else { continue }
            let (start, stride) = planeElements(plane)
            t[plane] = 0; u[plane] = 0
            ColumnKernels.gradientSums(dy + start, x + start, rows: shape.spatial, columns: 1, stride: stride,
                                       centre: ctx.p + plane, dyShift: &zero, sums: t + plane, dots: u + plane)
        }
    }
}
