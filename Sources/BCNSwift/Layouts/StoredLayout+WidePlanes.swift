/// Planes spread far wider than their channel's σ, whose Float32 gradient sums are taken again in Float64.
///
/// The batch-norm stage's weight gradient takes S₂ = Σ dy₁ (x - μ) = U + (p - μ) T per plane, from U = Σ dy (x - p)
/// summed in T's lanes, whose rounding is about ε Σ |dy| |x - p|. S₂ itself is of the size of Σ |dy| |x - μ|, about
/// σ Σ |dy| where the values lie within a few σ of μ. A plane of values near μ but one (an outlier, whose dy is
/// small) pulls p off μ: every |x - p| is then of the plane's deviation d, not of σ, and the rounding of U is d/σ
/// times the size of S₂ (measured: one value of 5e4 with dy 1e-3 among values of spread 5 in eval, running
/// variance 25, left the batch norm's weight gradient 50-270 ulps of its scale off, planes and channels-last).
/// With batch statistics d/σ is at most about √B (the batch's variance holds every plane's); with running
/// statistics (eval, and estimate mode) it has no bound. So a plane whose variance exceeds `widePlaneRatio` σ² of
/// its channel has its T and U summed again in Float64, where the same magnification costs nothing visible.
/// Ordinary planes (within 4σ) never meet it; Double input, summed in Float64 already, never does.
let widePlaneRatio = 16.0

extension StoredLayout {
    /// T and U of the planes wider than `widePlaneRatio` σ² in Float64 (a plane's q/S · (1/σ)² against it), in
    /// place of their sums in T's lanes. Only for T = Float and a plan with a batch-norm stage (σ, `invSigma`,
    /// from the forward's context: the batch's, or the running statistics' in eval and estimate mode).
    func resumWidePlanes<T: NormalizationScalar>(plan: NormalizationPlan, _ x: UnsafePointer<T>,
                                                 _ dy: UnsafePointer<T>, context ctx: NormalizationContext,
                                                 t: UnsafeMutablePointer<Double>, u: UnsafeMutablePointer<Double>) {
        guard T.self == Float.self, plan.batchNorm != nil else { return }
        let C = shape.channels, bound = widePlaneRatio * Double(shape.spatial), q = ctx.q, invSigma = ctx.invSigma
        var zero = 0.0
        func resum(_ plane: Int) {
            let (first, stride) = planeElements(plane)
            t[plane] = 0; u[plane] = 0
            ColumnKernels.gradientSums(dy + first, x + first, rows: shape.spatial, columns: 1, stride: stride,
                                       centre: ctx.p + plane, dyShift: &zero, sums: t + plane, dots: u + plane)
        }
        @inline(__always) func wide(_ plane: Int, _ c: Int) -> Bool {
            q[plane] * (invSigma[c] * invSigma[c]) > bound  // (NaN: not wide)
        }
        // four channels a step: [8, 256, 14, 14]'s backward +0.8% instructions (+0.55% channels-last, callgrind)
        for b in 0..<shape.batch {
            let at = b &* C
            var c = 0
            while c &+ 4 <= C {
                let s = invSigma.lanes(c)
                if any(q.lanes(at &+ c) * (s * s) .> SIMD4(repeating: bound)) {
                    for k in c..<c &+ 4 where wide(at &+ k, k) { resum(at &+ k) }
                }
                c &+= 4
            }
            while c < C { if wide(at &+ c, c) { resum(at &+ c) }; c &+= 1 }
        }
    }
}
