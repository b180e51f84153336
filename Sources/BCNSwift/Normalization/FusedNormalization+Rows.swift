/// The row path: input [B, C] (spatial size 1), where a plane is one value.
///
/// There the per-plane model would keep several Float64 numbers per input value (p, q, ȳ, the output map), which
/// costs far more memory traffic than the input itself. With S = 1, p = x and q = 0, so nothing per plane needs
/// storing: the batch statistics are column moments, and each row's channel groups are normalized in place.
/// Work is cut into column blocks of whole channel groups; each block's owner visits every row in order, so
/// results are independent of the thread count. The context keeps μ, 1/σ, a, m, r and w as in the plane path;
/// the first C slots of ȳ hold β instead (ȳ = a (x - μ) + β is recomputed), and the `.rows` flag says so.
extension FusedNormalization {
    /// Channels per column block: whole groups, about 64 channels.
    static func rowBlock(channels C: Int, unit: Int) -> Int {
        max(unit, (64 / unit) * unit)
    }

    static func rowsForward<T: NormalizationScalar>(
        plan: NormalizationPlan, shape: NormalizationShape, training: Bool,
        x: UnsafePointer<T>, y: UnsafeMutablePointer<T>, state: NormalizationState<T>,
        layout: NormalizationContextLayout, ctx: UnsafeMutablePointer<Double>,
        flags: inout NormalizationContextLayout.Flags
    ) -> RunningUpdate<T>? {
        let B = shape.batch, C = shape.channels
        let mu = ctx + layout.mu, invSigma = ctx + layout.invSigma, a = ctx + layout.a
        let beta = ctx + layout.yBar  // β per channel, in the slots ȳ has in the plane path
        flags.insert(.rows)
        var update: RunningUpdate<T>? = nil
        if let bn = plan.batchNorm, let bnBias = state.bnBias {
            var batch: UnsafeMutableBufferPointer<Moments>? = nil
            defer { batch?.deallocate() }
            if training {
                let m = UnsafeMutableBufferPointer<Moments>.allocate(capacity: C)
                columnMoments(x, batch: B, channels: C, into: m.baseAddress!)
                batch = m
            }
            update = channelNormalization(bn: bn, training: training, channels: C,
                                          batch: batch.map { UnsafePointer($0.baseAddress!) }, state: state,
                                          mu: mu, invSigma: invSigma, a: a, flags: &flags)
            for c in 0..<C { beta[c] = Double(bnBias[c]) }
        } else {
            for c in 0..<C { mu[c] = 0; invSigma[c] = 1; a[c] = 1; beta[c] = 0 }
        }

        guard let cn = plan.channelNorm, let weight = state.cnWeight, let bias = state.cnBias else {
            parallelFor(B, cost: C) { rows in  // y = a (x - μ) + β
                let buffer = UnsafeMutableBufferPointer<Double>.allocate(capacity: C)
                defer { buffer.deallocate() }
                let row = buffer.baseAddress!
                for b in rows {
                    RowKernels.widen(x + b * C, row, C)
                    RowKernels.affine(row, a, mu, beta, row, C)
                    RowKernels.narrow(row, y + b * C, C)
                }
            }
            return update
        }
        flags.insert(.channelNorm)
        let G = cn.groups, K = C / G, invK = 1 / Double(K)
        let m = ctx + layout.m, r = ctx + layout.r, w = ctx + layout.w
        for g in 0..<G { w[g] = Double(weight[g]) }
        parallelFor(B, cost: 3 * C) { rows in
            // y₁ = a (x - μ) + β of a whole row in Float64, so the group reductions run on the SIMD Double kernels
            let buffer = UnsafeMutableBufferPointer<Double>.allocate(capacity: C)
            defer { buffer.deallocate() }
            let y1 = buffer.baseAddress!
            for b in rows {
                RowKernels.widen(x + b * C, y1, C)
                RowKernels.affine(y1, a, mu, beta, y1, C)
                for g in 0..<G {
                    let c0 = g * K, group = y1 + c0
                    let centre = Double._sum(group, count: K) * invK  // the corrected two-pass moments
                    let (d, q) = Double._centredSums(group, count: K, centre: centre)
                    let mean = centre + d * invK, variance = max(q - d * d * invK, 0) * invK
                    let rg = 1 / (variance + cn.eps).squareRoot()
                    m[b * G + g] = mean
                    r[b * G + g] = rg
                    RowKernels.scaleShift(group, K, mean: mean, scale: rg * w[g], offset: Double(bias[g]))
                }
                RowKernels.narrow(y1, y + b * C, C)
            }
        }
        return update
    }

    /// Moments of each column of a [B, C] matrix, by the corrected two-pass algorithm, in blocks of columns so
    /// that every row is read contiguously.
    static func columnMoments<T: NormalizationScalar>(
        _ x: UnsafePointer<T>, batch B: Int, channels C: Int, into out: UnsafeMutablePointer<Moments>
    ) {
        let width = 64, blocks = (C + width - 1) / width, invB = 1 / Double(B)
        parallelFor(blocks, cost: 2 * B * width) { range in
            let scratch = UnsafeMutableBufferPointer<Double>.allocate(capacity: 3 * width)
            defer { scratch.deallocate() }
            let centre = scratch.baseAddress!, dev = centre + width, sq = dev + width
            for block in range {
                let c0 = block * width, n = min(width, C - c0)
                scratch.initialize(repeating: 0)
                for b in 0..<B {
                    let row = x + b * C + c0
                    for k in 0..<n { centre[k] += Double(row[k]) }
                }
                for k in 0..<n { centre[k] *= invB }  // the provisional centre
                for b in 0..<B {
                    let row = x + b * C + c0
                    for k in 0..<n {
                        let e = Double(row[k]) - centre[k]
                        dev[k] += e; sq[k].addProduct(e, e)
                    }
                }
                for k in 0..<n {
                    let d = dev[k]
                    out.advanced(by: c0 + k).initialize(to: Moments(count: Double(B), mean: centre[k] + d * invB,
                                                                    m2: max(sq[k] - d * d * invB, 0)))
                }
            }
        }
    }

    /// The backward of `rowsForward`. With S = 1: T = dy and U = 0 per plane and q = 0, so the channel-norm
    /// backward is dy₁ = r w dy - r w ΣT/K - r³ w W e/K per value (e = ȳ - m, W = Σ e dy over the group).
    /// Sweep 1 keeps each group's ΣT and W and accumulates the batch-norm sums S₁ = Σ_b dy₁ and
    /// S₂ = Σ_b dy₁ (x - μ) per channel; sweep 2 recomputes dy₁ in Float64 and writes
    /// dx = a [dy₁ - S₁/n - (x - μ) S₂/(σ² n)] (batch statistics) or a dy₁, element by element, so dx may be dy.
    static func rowsBackward<T: NormalizationScalar>(
        plan: NormalizationPlan, shape: NormalizationShape, flags: NormalizationContextLayout.Flags,
        x: UnsafePointer<T>, dy: UnsafePointer<T>, dx: UnsafeMutablePointer<T>,
        gradients: NormalizationGradients<T>, layout: NormalizationContextLayout, ctx: UnsafePointer<Double>
    ) {
        let B = shape.batch, C = shape.channels
        let mu = ctx + layout.mu, invSigma = ctx + layout.invSigma, a = ctx + layout.a, beta = ctx + layout.yBar
        let m = ctx + layout.m, r = ctx + layout.r, w = ctx + layout.w
        let hasCN = flags.contains(.channelNorm), hasBN = flags.contains(.batchNorm)
        let through = flags.contains(.gradientThroughBatchStatistics)
        let G = hasCN ? plan.groups : 0, K = hasCN ? C / G : 1, invK = 1 / Double(K)
        let width = rowBlock(channels: C, unit: K), blocks = (C + width - 1) / width, invB = 1 / Double(B)
        let perBlockGroups = hasCN ? width / K : 0
        parallelFor(blocks, cost: 4 * B * width) { range in
            // per channel of the block: s1, s2, the row's dy and y₁ in Float64; per (row, group): ΣT and W;
            // per group: dw, dbias
            let scratch = UnsafeMutableBufferPointer<Double>.allocate(
                capacity: 6 * width + 2 * B * perBlockGroups + 2 * max(perBlockGroups, 1))
            defer { scratch.deallocate() }
            let s1 = scratch.baseAddress!, s2 = s1 + width, gd = s2 + width, y1 = gd + width, xd = y1 + width
            let ob = xd + width
            let sums = ob + width, dwBlock = sums + 2 * B * perBlockGroups, dbBlock = dwBlock + max(perBlockGroups, 1)
            for block in range {
                let c0 = block * width, n = min(width, C - c0), g0 = hasCN ? c0 / K : 0, groups = hasCN ? n / K : 0
                for k in 0..<n { s1[k] = 0; s2[k] = 0 }
                for j in 0..<groups { dwBlock[j] = 0; dbBlock[j] = 0 }

                /// Loads the block's slice of row b in Float64: gd = dy, xd = x, and y₁ = a (x - μ) + β.
                func load(_ b: Int) {
                    RowKernels.widen(dy + b * C + c0, gd, n)
                    RowKernels.widen(x + b * C + c0, xd, n)
                    if hasCN { RowKernels.affine(xd, a + c0, mu + c0, beta + c0, y1, n) }
                }
                /// (r w, -r w ΣT/K, r³ w W/K, m) of group j of row b: dy₁ = rw dy + hc - r3 (y₁ - m).
                func coefficients(_ b: Int, _ j: Int) -> (Double, Double, Double, Double) {
                    guard hasCN else { return (1, 0, 0, 0) }
                    let g = g0 + j, bg = b * G + g, rg = r[bg], rw = rg * w[g]
                    let tg = sums[2 * (b * perBlockGroups + j)], wg = sums[2 * (b * perBlockGroups + j) + 1]
                    return (rw, -rw * tg * invK, rw * rg * rg * wg * invK, m[bg])
                }

                for b in 0..<B {
                    load(b)
                    for j in 0..<groups {  // ΣT and W = Σ dy (y₁ - m) by the SIMD kernel, m as its centre
                        let bg = b * G + g0 + j
                        let (tg, wg) = Double._gradientSums(gd + j * K, y1 + j * K, count: K, centre: m[bg])
                        sums[2 * (b * perBlockGroups + j)] = tg
                        sums[2 * (b * perBlockGroups + j) + 1] = wg
                        dbBlock[j] += tg; dwBlock[j] += r[bg] * wg
                    }
                    guard hasBN else { continue }
                    for j in 0..<(hasCN ? groups : 1) {
                        let (rw, hc, r3, mean) = coefficients(b, j)
                        let lo = hasCN ? j * K : 0, len = hasCN ? K : n
                        RowKernels.accumulate(g: gd + lo, y1: (hasCN ? y1 : gd) + lo, x: xd + lo, mu: mu + c0 + lo,
                                              rw: rw, hc: hc, r3: r3, mean: mean, s1: s1 + lo, s2: s2 + lo, len)
                    }
                }
                for j in 0..<groups {
                    if let p = gradients.cnWeight { p[g0 + j] = T(Double(p[g0 + j]) + dwBlock[j]) }
                    if let p = gradients.cnBias { p[g0 + j] = T(Double(p[g0 + j]) + dbBlock[j]) }
                }
                if hasBN {
                    for k in 0..<n {
                        let c = c0 + k
                        if let p = gradients.bnWeight { p[c] = T(Double(p[c]) + s2[k] * invSigma[c]) }
                        if let p = gradients.bnBias { p[c] = T(Double(p[c]) + s1[k]) }
                        s1[k] = through ? s1[k] * invB : 0                                   // S₁/n
                        s2[k] = through ? s2[k] * invSigma[c] * invSigma[c] * invB : 0       // S₂/(σ² n)
                    }
                }
                for b in 0..<B {  // dy₁ again, then dx; row by row after reading dy, so dx may be dy
                    load(b)
                    for j in 0..<(hasCN ? groups : 1) {
                        let (rw, hc, r3, mean) = coefficients(b, j)
                        let lo = hasCN ? j * K : 0, len = hasCN ? K : n
                        RowKernels.finish(g: gd + lo, y1: (hasCN ? y1 : gd) + lo, x: xd + lo, mu: mu + c0 + lo,
                                          a: hasBN ? a + c0 + lo : nil, s1: s1 + lo, s2: s2 + lo, rw: rw, hc: hc,
                                          r3: r3, mean: mean, out: ob + lo, len)
                    }
                    RowKernels.narrow(ob, dx + b * C + c0, n)
                }
            }
        }
    }
}
