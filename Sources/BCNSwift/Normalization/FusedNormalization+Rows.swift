/// The row path: inputs whose planes are short (S < `smallPlane`: [B, C] input, 2x2 or 3x3 maps).
///
/// There the per-plane model would keep several Float64 numbers per few input values (p, q, ȳ, the output map),
/// far more memory traffic than the input itself. Instead each row (sample) is handled as C·S contiguous values:
/// the batch statistics are column moments, and a channel group is K·S contiguous values of a row, normalized
/// in Float64 straight from the input (the backward works on Float64 copies of row slices). Per-channel
/// constants are expanded to one per value so every map is element-wise (RowKernels). Work is cut into column
/// blocks of whole channel groups (by rows too in the forward), and each unit is computed the same way whoever
/// runs it, so results are independent of the thread count.
///
/// The context keeps μ, 1/σ, a, m, r and w as in the plane path; the first C slots of ȳ hold β, and the
/// `.rows` flag says so. Since y₁ = a (x - μ) + β is recomputed, no per-plane number is stored.
extension FusedNormalization {
    /// Values per column block of the forward output: its slices of a, μ and β (12 KB) stay in L1.
    static let rowSegment = 512

    /// Channels per column block: whole groups, about 64 channels.
    static func rowBlock(unit: Int) -> Int { max(unit, (64 / unit) * unit) }

    /// `v` repeated `s` times per entry: per-channel constants laid out like a row's values.
    static func expand(_ v: UnsafePointer<Double>, count: Int, times s: Int, into out: UnsafeMutablePointer<Double>) {
        for c in 0..<count { for k in 0..<s { out[c * s + k] = v[c] } }
    }

    /// The output of the row path, once `batchNormStage` has filled μ and a (and w is in the context): each
    /// group's m and r from the moments of y₁ = a (x - μ) + β (computed in Float64 from x, never stored), then
    /// the output from y₁ again.
    static func rowsOutput<T: NormalizationScalar>(
        plan: NormalizationPlan, shape: NormalizationShape, x: UnsafePointer<T>, y: UnsafeMutablePointer<T>,
        state: NormalizationState<T>, layout: NormalizationContextLayout, ctx: UnsafeMutablePointer<Double>
    ) {
        let B = shape.batch, C = shape.channels, S = shape.spatial, width = C * S
        let mu = ctx + layout.mu, a = ctx + layout.a
        let beta = ctx + layout.yBar  // β per channel, in the slots ȳ has in the plane path
        if plan.batchNorm != nil, let bnBias = state.bnBias {
            for c in 0..<C { beta[c] = Double(bnBias[c]) }
        } else {
            for c in 0..<C { beta[c] = 0 }
        }
        // a, μ, β per value of a row
        let expanded = UnsafeMutableBufferPointer<Double>.allocate(capacity: 3 * width)
        defer { expanded.deallocate() }
        let aE = expanded.baseAddress!, muE = aE + width, betaE = muE + width
        expand(a, count: C, times: S, into: aE)
        expand(mu, count: C, times: S, into: muE)
        expand(beta, count: C, times: S, into: betaE)

        let cn = plan.channelNorm, G = plan.groups, bias = state.cnBias
        let m = ctx + layout.m, r = ctx + layout.r, w = ctx + layout.w
        // Work units are (column block, row), block-major: a thread's consecutive units share one block, whose
        // slices of the expanded a, μ, β (3 x 8 bytes per value) stay in L1 while it walks down the rows.
        // A block holds whole channel groups, about `rowSegment` values.
        let n = cn != nil ? width / G : width  // values per group (the whole row without a channel norm)
        let groupsPerBlock = cn != nil ? max(1, rowSegment / n) : 1
        let blockWidth = cn != nil ? groupsPerBlock * n : min(width, rowSegment)
        let blocks = cn != nil ? (G + groupsPerBlock - 1) / groupsPerBlock : (width + blockWidth - 1) / blockWidth
        parallelFor(blocks * B, cost: 3 * blockWidth) { units in
            for u in units {
                let block = u / B, b = u - block * B
                let xr = x + b * width, yr = y + b * width
                guard let cn, let bias else {  // batch norm alone: out = y₁
                    let lo = block * blockWidth, len = min(blockWidth, width - lo)
                    RowKernels.affineOutput(xr + lo, aE + lo, muE + lo, betaE + lo, len, mean: 0, scale: 1,
                                            offset: 0, into: yr + lo)
                    continue
                }
                // A group is n = K·S contiguous values of the row. The block's group moments first, then their
                // r, then the outputs: small groups would otherwise each wait on their own reduction, square
                // root and division before their output could start.
                let groups = block * groupsPerBlock..<min(G, (block + 1) * groupsPerBlock)
                let mb = m + b * G, rb = r + b * G
                for g in groups {
                    let lo = g * n
                    let moments = RowKernels.affineMoments(xr + lo, aE + lo, muE + lo, betaE + lo, n)
                    mb[g] = moments.mean
                    rb[g] = moments.variance
                }
                for g in groups { rb[g] = 1 / (rb[g] + cn.eps).squareRoot() }
                for g in groups {
                    let lo = g * n
                    RowKernels.affineOutput(xr + lo, aE + lo, muE + lo, betaE + lo, n, mean: mb[g],
                                            scale: rb[g] * w[g], offset: Double(bias[g]), into: yr + lo)
                }
            }
        }
    }

    /// Moments of each channel over its B·S values (the batch statistics), by the corrected two-pass
    /// algorithm, in column blocks so that every row is read contiguously.
    static func columnMoments<T: NormalizationScalar>(
        _ x: UnsafePointer<T>, shape: NormalizationShape, into out: UnsafeMutablePointer<Moments>
    ) {
        let B = shape.batch, C = shape.channels, S = shape.spatial
        let channelsPerBlock = rowBlock(unit: 1), blocks = (C + channelsPerBlock - 1) / channelsPerBlock
        let n = Double(B * S), invN = 1 / n
        parallelFor(blocks, cost: 2 * B * S * channelsPerBlock) { range in
            let span = channelsPerBlock * S
            let scratch = UnsafeMutableBufferPointer<Double>.allocate(capacity: 4 * span)
            defer { scratch.deallocate() }
            let acc = scratch.baseAddress!, centre = acc + span, dev = centre + span, sq = dev + span
            for block in range {
                let c0 = block * channelsPerBlock, channels = min(channelsPerBlock, C - c0), len = channels * S
                for k in 0..<len { acc[k] = 0; dev[k] = 0; sq[k] = 0 }
                for b in 0..<B {
                    let row = x + (b * C + c0) * S
                    for k in 0..<len { acc[k] += Double(row[k]) }
                }
                for c in 0..<channels {  // the provisional centre of each channel, for each of its S positions
                    var t = 0.0
                    for k in 0..<S { t += acc[c * S + k] }
                    for k in 0..<S { centre[c * S + k] = t * invN }
                }
                for b in 0..<B {
                    let row = x + (b * C + c0) * S
                    for k in 0..<len {
                        let e = Double(row[k]) - centre[k]
                        dev[k] += e; sq[k].addProduct(e, e)
                    }
                }
                for c in 0..<channels {
                    var d = 0.0, q = 0.0
                    for k in 0..<S { d += dev[c * S + k]; q += sq[c * S + k] }
                    out.advanced(by: c0 + c).initialize(
                        to: Moments(count: n, mean: centre[c * S] + d * invN, m2: max(q - d * d * invN, 0)))
                }
            }
        }
    }

    /// The backward of `rowsForward`. With N = K·S values per group, the channel-norm backward is
    /// dy₁ = r w dy - r w ΣT/N - r³ w W/N (y₁ - m) per value (W = Σ (y₁ - m) dy over the group): the plane form
    /// E dy + F (x - p) + H with a (x - p) + ȳ - m = y₁ - m. Sweep 1 keeps each group's ΣT and W and accumulates
    /// the batch-norm sums S₁ = Σ dy₁ and S₂ = Σ dy₁ (x - μ) per channel; sweep 2 recomputes dy₁ and writes
    /// dx = a [dy₁ - S₁/n - (x - μ) S₂/(σ² n)] (batch statistics, n = B·S) or a dy₁, row by row after reading
    /// dy, so dx may be dy.
    static func rowsBackward<T: NormalizationScalar>(
        plan: NormalizationPlan, shape: NormalizationShape, flags: NormalizationContextLayout.Flags,
        x: UnsafePointer<T>, dy: UnsafePointer<T>, dx: UnsafeMutablePointer<T>,
        gradients: NormalizationGradients<T>, layout: NormalizationContextLayout, ctx: UnsafePointer<Double>
    ) {
        let B = shape.batch, C = shape.channels, S = shape.spatial
        let mu = ctx + layout.mu, invSigma = ctx + layout.invSigma, a = ctx + layout.a, beta = ctx + layout.yBar
        let m = ctx + layout.m, r = ctx + layout.r, w = ctx + layout.w
        let hasCN = flags.contains(.channelNorm), hasBN = flags.contains(.batchNorm)
        let through = flags.contains(.gradientThroughBatchStatistics)
        let G = hasCN ? plan.groups : 0, K = hasCN ? C / G : 1, N = K * S, invN = 1 / Double(N)
        let channelsPerBlock = rowBlock(unit: K), blocks = (C + channelsPerBlock - 1) / channelsPerBlock
        let invn = 1 / Double(B * S), span = channelsPerBlock * S, groupsPerBlock = hasCN ? channelsPerBlock / K : 0
        parallelFor(blocks, cost: 4 * B * span) { range in
            // per value of the block's columns: a, μ, β expanded; s1, s2; the row's dy, x, y₁ and output in
            // Float64. Per (row, group): ΣT and W. Per group: dw, dbias.
            let scratch = UnsafeMutableBufferPointer<Double>.allocate(
                capacity: 9 * span + 2 * B * groupsPerBlock + 2 * max(groupsPerBlock, 1))
            defer { scratch.deallocate() }
            let aE = scratch.baseAddress!, muE = aE + span, betaE = muE + span, s1 = betaE + span, s2 = s1 + span
            let gd = s2 + span, xd = gd + span, y1 = xd + span, ob = y1 + span
            let sums = ob + span, dwBlock = sums + 2 * B * groupsPerBlock
            let dbBlock = dwBlock + max(groupsPerBlock, 1)
            for block in range {
                let c0 = block * channelsPerBlock, channels = min(channelsPerBlock, C - c0), len = channels * S
                let g0 = hasCN ? c0 / K : 0, groups = hasCN ? channels / K : 0
                expand(a + c0, count: channels, times: S, into: aE)
                expand(mu + c0, count: channels, times: S, into: muE)
                expand(beta + c0, count: channels, times: S, into: betaE)
                for k in 0..<len { s1[k] = 0; s2[k] = 0 }
                for j in 0..<groups { dwBlock[j] = 0; dbBlock[j] = 0 }

                /// The block's slice of row b in Float64: gd = dy, xd = x, y₁ = a (x - μ) + β.
                func load(_ b: Int) {
                    RowKernels.widen(dy + (b * C + c0) * S, gd, len)
                    RowKernels.widen(x + (b * C + c0) * S, xd, len)
                    if hasCN { RowKernels.affine(xd, aE, muE, betaE, y1, len) }
                }
                /// (r w, -r w ΣT/N, r³ w W/N, m) of group j of row b: dy₁ = rw dy + hc - r3 (y₁ - m).
                func coefficients(_ b: Int, _ j: Int) -> (Double, Double, Double, Double) {
                    guard hasCN else { return (1, 0, 0, 0) }
                    let g = g0 + j, bg = b * G + g, rg = r[bg], rw = rg * w[g]
                    let tg = sums[2 * (b * groupsPerBlock + j)], wg = sums[2 * (b * groupsPerBlock + j) + 1]
                    return (rw, -rw * tg * invN, rw * rg * rg * wg * invN, m[bg])
                }

                for b in 0..<B {
                    load(b)
                    for j in 0..<groups {  // ΣT and W = Σ dy (y₁ - m) by the SIMD kernel, m as its centre
                        let bg = b * G + g0 + j
                        let (tg, wg) = Double._gradientSums(gd + j * N, y1 + j * N, count: N, centre: m[bg])
                        sums[2 * (b * groupsPerBlock + j)] = tg
                        sums[2 * (b * groupsPerBlock + j) + 1] = wg
                        dbBlock[j] += tg; dwBlock[j] += r[bg] * wg
                    }
                    guard hasBN else { continue }
                    for j in 0..<(hasCN ? groups : 1) {
                        let (rw, hc, r3, mean) = coefficients(b, j)
                        let lo = hasCN ? j * N : 0, count = hasCN ? N : len
                        RowKernels.accumulate(g: gd + lo, y1: (hasCN ? y1 : gd) + lo, x: xd + lo, mu: muE + lo,
                                              rw: rw, hc: hc, r3: r3, mean: mean, s1: s1 + lo, s2: s2 + lo, count)
                    }
                }
                accumulate(gradients.cnWeight.map { $0 + g0 }, dwBlock, groups)
                accumulate(gradients.cnBias.map { $0 + g0 }, dbBlock, groups)
                if hasBN {
                    for c in 0..<channels {  // per channel: S₁, S₂ over its S positions, then spread again
                        var t1 = 0.0, t2 = 0.0
                        for k in 0..<S { t1 += s1[c * S + k]; t2 += s2[c * S + k] }
                        let ch = c0 + c
                        if let p = gradients.bnWeight { p[ch] = T(Double(p[ch]) + t2 * invSigma[ch]) }
                        if let p = gradients.bnBias { p[ch] = T(Double(p[ch]) + t1) }
                        let k1 = through ? t1 * invn : 0                                       // S₁/n
                        let k2 = through ? t2 * invSigma[ch] * invSigma[ch] * invn : 0         // S₂/(σ² n)
                        for k in 0..<S { s1[c * S + k] = k1; s2[c * S + k] = k2 }
                    }
                }
                for b in 0..<B {
                    load(b)
                    for j in 0..<(hasCN ? groups : 1) {
                        let (rw, hc, r3, mean) = coefficients(b, j)
                        let lo = hasCN ? j * N : 0, count = hasCN ? N : len
                        RowKernels.finish(g: gd + lo, y1: (hasCN ? y1 : gd) + lo, x: xd + lo, mu: muE + lo,
                                          a: hasBN ? aE + lo : nil, s1: s1 + lo, s2: s2 + lo, rw: rw, hc: hc,
                                          r3: r3, mean: mean, out: ob + lo, count)
                    }
                    RowKernels.narrow(ob, dx + (b * C + c0) * S, len)
                }
            }
        }
    }
}
