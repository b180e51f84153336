extension FusedNormalization {
    /// Gradient of the last `forward` that filled `context`: writes dx and *adds* parameter gradients.
    ///
    /// With T = Σ_s dy and U = Σ_s dy·(x - p) per plane, every gradient is closed form:
    /// - channel-norm stage (per sample b, group g; N = K·S, e = ȳ - m):
    ///   dbias_g += Σ T,  dw_g += r·W with W = Σ_c (a U + e T);
    ///   dy₁ = E dy + F (x - p) + H with E = r w, F = -r³ w W a / N, H = -r w ΣT / N - r³ w W e / N;
    /// - batch-norm stage (per channel; n = B·S): S₁ = Σ dy₁ = Σ_b (E T + H S),
    ///   S₂ = Σ dy₁ (x - μ) = Σ_b (E U + F q + (p - μ)(E T + H S));  dβ += S₁, dγ += S₂/σ;
    ///   with batch statistics dx = a [dy₁ - S₁/n - (x - μ) S₂/(σ² n)], otherwise dx = a dy₁ (a = γ/σ).
    /// So dx = P dy + Q (x - p) + R per plane: one more pass.
    ///
    /// - Parameters:
    ///   - x: the input of that forward, unchanged since.
    ///   - dx: may alias `dy`.
    /// - Throws: `.noForward` if `context` was not filled by a forward of this plan and shape.
    @_specialize(where T == Float)
    @_specialize(where T == Double)
    public static func backward<T: NormalizationScalar>(
        plan: NormalizationPlan, shape: NormalizationShape,
        x: UnsafePointer<T>, dy: UnsafePointer<T>, dx: UnsafeMutablePointer<T>,
        gradients: NormalizationGradients<T>, context: UnsafeBufferPointer<Double>
    ) throws(BCNError) {
        try plan.validate()
        try checkShape(plan: plan, shape: shape)
        let layout = NormalizationContextLayout(shape: shape, groups: plan.groups)
        guard let ctx = context.baseAddress, context.count >= layout.length, let flags = layout.readFlags(ctx),
              flags.contains(.batchNorm) == (plan.batchNorm != nil),
              flags.contains(.channelNorm) == (plan.channelNorm != nil) else {
            throw BCNError(.noForward, "no forward of this layer with input shape [\(shape.batch), \(shape.channels), \(shape.spatial)] ([B, C, S]) to differentiate")
        }
        if flags.contains(.rows) {
            rowsBackward(plan: plan, shape: shape, flags: flags, x: x, dy: dy, dx: dx, gradients: gradients,
                         layout: layout, ctx: ctx)
            return
        }
        let planes = shape.planes, groups = plan.groups
        let work = UnsafeMutableBufferPointer<Double>.allocate(capacity: 2 * planes + 2 * groups)
        defer { work.deallocate() }
        let t = work.baseAddress!, u = t + planes, scratch = u + planes  // scratch: dw[G], dbias[G]
        gradientSums(x: x, dy: dy, shape: shape, centre: ctx + layout.p, sum: t, dot: u)

        // E, F, H of the channel-norm stage, then P, Q, R of the whole layer, computed in place.
        let coef = UnsafeMutableBufferPointer<Double>.allocate(capacity: 3 * planes)
        defer { coef.deallocate() }
        let e = coef.baseAddress!, f = e + planes, h = f + planes
        channelNormBackward(shape: shape, groups: plan.groups, hasStage: flags.contains(.channelNorm),
                            layout: layout, ctx: ctx, t: t, u: u, e: e, f: f, h: h, gradients: gradients,
                            scratch: scratch)
        if flags.contains(.batchNorm) {
            batchNormBackward(shape: shape, through: flags.contains(.gradientThroughBatchStatistics),
                              layout: layout, ctx: ctx, t: t, u: u, e: e, f: f, h: h, gradients: gradients)
        }

        let p = UnsafePointer(ctx + layout.p)
        let chunks = PlaneChunks(shape)
        parallelFor(chunks.count, cost: 2 * min(shape.spatial, planeChunkLength)) { range in
            for i in range {
                let c = chunks.chunk(i)
                T._combine(dy + c.offset, x + c.offset, dx + c.offset, count: c.length,
                           centre: p[c.plane], p: e[c.plane], q: f[c.plane], r: h[c.plane])
            }
        }
    }

    /// T = Σ dy and U = Σ dy (x - p) of every plane; chunk partials added in fixed order.
    static func gradientSums<T: NormalizationScalar>(
        x: UnsafePointer<T>, dy: UnsafePointer<T>, shape: NormalizationShape, centre: UnsafePointer<Double>,
        sum: UnsafeMutablePointer<Double>, dot: UnsafeMutablePointer<Double>
    ) {
        let chunks = PlaneChunks(shape)
        if chunks.perPlane == 1 {
            let s = shape.spatial
            parallelFor(shape.planes, cost: 2 * s) { range in
                for i in range {
                    (sum[i], dot[i]) = T._gradientSums(dy + i * s, x + i * s, count: s, centre: centre[i])
                }
            }
            return
        }
        let parts = UnsafeMutableBufferPointer<(Double, Double)>.allocate(capacity: chunks.count)
        defer { parts.deallocate() }
        parallelFor(chunks.count, cost: 2 * planeChunkLength) { range in
            for i in range {
                let c = chunks.chunk(i)
                let r = T._gradientSums(dy + c.offset, x + c.offset, count: c.length, centre: centre[c.plane])
                parts.initializeElement(at: i, to: (r.sum, r.dot))
            }
        }
        for plane in 0..<shape.planes {
            var s = 0.0, d = 0.0
            for k in 0..<chunks.perPlane { let (a, b) = parts[plane * chunks.perPlane + k]; s += a; d += b }
            sum[plane] = s; dot[plane] = d
        }
    }

    /// dy₁ = E dy + F (x - p) + H per plane; adds dw, dbias. Without the stage, dy₁ = dy.
    static func channelNormBackward<T: NormalizationScalar>(
        shape: NormalizationShape, groups G: Int, hasStage: Bool, layout: NormalizationContextLayout,
        ctx: UnsafePointer<Double>, t: UnsafePointer<Double>, u: UnsafePointer<Double>,
        e: UnsafeMutablePointer<Double>, f: UnsafeMutablePointer<Double>, h: UnsafeMutablePointer<Double>,
        gradients: NormalizationGradients<T>, scratch: UnsafeMutablePointer<Double>
    ) {
        let B = shape.batch, C = shape.channels
        guard hasStage, G > 0 else {
            for i in 0..<shape.planes { e[i] = 1; f[i] = 0; h[i] = 0 }
            return
        }
        let K = C / G, invN = 1 / Double(K * shape.spatial)
        let yBar = ctx + layout.yBar, a = ctx + layout.a, m = ctx + layout.m, r = ctx + layout.r, w = ctx + layout.w
        let dw = scratch, dbias = scratch + G
        for g in 0..<G { dw[g] = 0; dbias[g] = 0 }
        for b in 0..<B {
            for g in 0..<G {
                let base = b * C + g * K, bg = b * G + g
                var tg = 0.0, wg = 0.0
                for k in 0..<K {
                    let i = base + k
                    tg += t[i]
                    wg += a[g * K + k] * u[i] + (yBar[i] - m[bg]) * t[i]
                }
                dbias[g] += tg
                dw[g] += r[bg] * wg
                let rw = r[bg] * w[g], r3wW = rw * r[bg] * r[bg] * wg * invN, hConst = -rw * tg * invN
                for k in 0..<K {
                    let i = base + k
                    e[i] = rw
                    f[i] = -r3wW * a[g * K + k]
                    h[i] = hConst - r3wW * (yBar[i] - m[bg])
                }
            }
        }
        accumulate(gradients.cnWeight, dw, G)
        accumulate(gradients.cnBias, dbias, G)
    }

    /// Turns dy₁'s (E, F, H) into dx's (P, Q, R) in place; adds dγ, dβ.
    static func batchNormBackward<T: NormalizationScalar>(
        shape: NormalizationShape, through: Bool, layout: NormalizationContextLayout, ctx: UnsafePointer<Double>,
        t: UnsafePointer<Double>, u: UnsafePointer<Double>,
        e: UnsafeMutablePointer<Double>, f: UnsafeMutablePointer<Double>, h: UnsafeMutablePointer<Double>,
        gradients: NormalizationGradients<T>
    ) {
        let B = shape.batch, C = shape.channels, S = Double(shape.spatial), n = Double(B) * S
        let p = ctx + layout.p, q = ctx + layout.q
        let mu = ctx + layout.mu, invSigma = ctx + layout.invSigma, a = ctx + layout.a
        let sums = UnsafeMutableBufferPointer<Double>.allocate(capacity: 2 * C)
        defer { sums.deallocate() }
        let s1 = sums.baseAddress!, s2 = s1 + C
        for c in 0..<C { s1[c] = 0; s2[c] = 0 }
        for b in 0..<B {
            for c in 0..<C {
                let i = b * C + c
                let sumDy1 = e[i] * t[i] + h[i] * S
                s1[c] += sumDy1
                s2[c] += e[i] * u[i] + f[i] * q[i] + (p[i] - mu[c]) * sumDy1
            }
        }
        // Per channel: k = S₂/(σ² n) and S₁/n (zero without batch statistics), so the plane loop has no division.
        let perChannel = UnsafeMutableBufferPointer<Double>.allocate(capacity: 2 * C)
        defer { perChannel.deallocate() }
        let kc = perChannel.baseAddress!, s1n = kc + C, invn = 1 / n
        for c in 0..<C {
            kc[c] = through ? s2[c] * invSigma[c] * invSigma[c] * invn : 0
            s1n[c] = through ? s1[c] * invn : 0
        }
        for b in 0..<B {
            for c in 0..<C {
                let i = b * C + c
                let fi = f[i] - kc[c], hi = h[i] - s1n[c] - (p[i] - mu[c]) * kc[c]
                e[i] *= a[c]; f[i] = a[c] * fi; h[i] = a[c] * hi
            }
        }
        for c in 0..<C { s2[c] *= invSigma[c] }
        accumulate(gradients.bnWeight, s2, C)
        accumulate(gradients.bnBias, s1, C)
    }

    static func accumulate<T: NormalizationScalar>(
        _ target: UnsafeMutablePointer<T>?, _ delta: UnsafePointer<Double>, _ count: Int
    ) {
        guard let target else { return }
        for i in 0..<count { target[i] = T(Double(target[i]) + delta[i]) }
    }
}
