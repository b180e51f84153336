import BCNSwiftTestSupport
import CBCNSwift
import XCTest

/// The statistics phases of the C ABI: chained on one batch they are the single calls, bit for bit; over a batch
/// split between "processes" (merged in order) they are the single calls on the whole batch, to rounding; and
/// every misuse is a status that writes nothing.
private let training = UInt32(BCN_TRAINING)

final class CABIPhaseTests: XCTestCase {
    var rng = SplitMix64(seed: 0x9A5E)

    /// One process's share: a [B, C, S] input in the flags' memory format, its parameters and buffers.
    struct Shard {
        let flags: UInt32, batch: Int64, channels: Int64, spatial: Int64, groups: Int64
        var x: [Double], dy: [Double]
        var w: [Double], b: [Double], cw: [Double], cb: [Double], rm: [Double], rv: [Double]
        var nbt: Int64 = 3
        var ctx: [Double]
        var count: Int { x.count }
    }

    func shard(_ flags: UInt32, _ B: Int, _ C: Int, _ S: Int, _ G: Int) -> Shard {
        let n = B * C * S
        let x = (0..<n).map { _ in rng.normal(1.5, 2) }, dy = (0..<n).map { _ in rng.normal(0.2, 1) }
        let w = (0..<C).map { Double($0 % 5) * 0.1 + 0.7 }, b = (0..<C).map { Double($0 % 3) * 0.2 - 0.1 }
        return Shard(flags: flags, batch: Int64(B), channels: Int64(C), spatial: Int64(S), groups: Int64(G),
                     x: x, dy: dy, w: w, b: b, cw: (0..<G).map { 1 + Double($0) * 0.1 },
                     cb: (0..<G).map { Double($0) * 0.05 }, rm: [Double](repeating: 0.3, count: C),
                     rv: [Double](repeating: 1.7, count: C),
                     ctx: [Double](repeating: 0, count: Int(bcn_context_length(Int64(B), Int64(C), Int64(G)))))
    }

    /// The same shard's rows b0..<b1 (in either memory format a sample is a contiguous C·S block).
    func rows(_ s: Shard, _ b0: Int, _ b1: Int) -> Shard {
        let block = Int(s.channels * s.spatial)
        var part = s
        part.x = Array(s.x[(b0 * block)..<(b1 * block)]); part.dy = Array(s.dy[(b0 * block)..<(b1 * block)])
        part = Shard(flags: s.flags, batch: Int64(b1 - b0), channels: s.channels, spatial: s.spatial,
                     groups: s.groups, x: part.x, dy: part.dy, w: s.w, b: s.b, cw: s.cw, cb: s.cb, rm: s.rm,
                     rv: s.rv, nbt: s.nbt,
                     ctx: [Double](repeating: 0, count: Int(bcn_context_length(Int64(b1 - b0), s.channels, s.groups))))
        return part
    }

    func forward(_ s: inout Shard) -> (Int32, [Double]) {
        var y = [Double](repeating: 0, count: s.count)
        let status = bcn_norm_forward_f64(s.flags, s.batch, s.channels, s.spatial, s.groups, 1e-5, 1e-5, 0.1, s.x,
                                          &y, s.w, s.b, &s.rm, &s.rv, &s.nbt, s.cw, s.cb, &s.ctx,
                                          Int64(s.ctx.count), nil, 0)
        return (status, y)
    }

    func moments(_ s: inout Shard) -> (Int32, [Double]) {
        var m = [Double](repeating: -1, count: 3 * Int(s.channels))
        let status = bcn_norm_moments_f64(s.flags, s.batch, s.channels, s.spatial, s.groups, s.x, &m, &s.ctx,
                                          Int64(s.ctx.count), nil, 0)
        return (status, m)
    }

    func finish(_ s: inout Shard, _ moments: [Double]?) -> (Int32, [Double]) {
        var y = [Double](repeating: 0, count: s.count)
        var message = [CChar](repeating: 0, count: 256)
        let status = bcn_norm_finish_f64(s.flags, s.batch, s.channels, s.spatial, s.groups, 1e-5, 1e-5, 0.1, s.x,
                                         &y, s.w, s.b, &s.rm, &s.rv, &s.nbt, s.cw, s.cb, moments, &s.ctx,
                                         Int64(s.ctx.count), &message, 256)
        return (status, y)
    }

    func merge(_ sets: [[Double]], channels: Int64, width: Int) -> (Int32, [Double]) {
        var merged = [Double](repeating: -1, count: width * Int(channels))
        let flat = sets.flatMap { $0 }
        let status = width == 3 ? bcn_moments_merge(Int64(sets.count), channels, flat, &merged, nil, 0)
                                : bcn_sums_merge(Int64(sets.count), channels, flat, &merged, nil, 0)
        return (status, merged)
    }

    /// (dx, [dγ | dβ | dw | dbias]) of the single backward, or of the phases with `sums` (nil: this shard's own).
    func backward(_ s: inout Shard, phased: Bool, sums: [Double]? = nil) -> (Int32, [Double], [Double]) {
        var dx = [Double](repeating: 0, count: s.count)
        var g = [Double](repeating: 0, count: 2 * Int(s.channels) + 2 * Int(s.groups))
        let C = Int(s.channels), G = Int(s.groups)
        let status: Int32 = g.withUnsafeMutableBufferPointer { gp in
            let p = gp.baseAddress!
            if !phased {
                return bcn_norm_backward_f64(s.flags & ~training, s.batch, s.channels, s.spatial, s.groups, s.x, s.dy,
                                             &dx, p, p + C, p + 2 * C, p + 2 * C + G, s.ctx, Int64(s.ctx.count), nil, 0)
            }
            var local = [Double](repeating: -1, count: 2 * C)
            let a = bcn_norm_backward_sums_f64(s.flags, s.batch, s.channels, s.spatial, s.groups, s.x, s.dy, &local,
                                               &s.ctx, Int64(s.ctx.count), nil, 0)
            if a != BCN_OK { return a }
            return bcn_norm_backward_finish_f64(s.flags, s.batch, s.channels, s.spatial, s.groups, s.x, s.dy, &dx,
                                                p, p + C, p + 2 * C, p + 2 * C + G, sums ?? local, &s.ctx,
                                                Int64(s.ctx.count), nil, 0)
        }
        return (status, dx, g)
    }

    func localSums(_ s: inout Shard) -> [Double] {
        var local = [Double](repeating: 0, count: 2 * Int(s.channels))
        XCTAssertEqual(bcn_norm_backward_sums_f64(s.flags, s.batch, s.channels, s.spatial, s.groups, s.x, s.dy,
                                                  &local, &s.ctx, Int64(s.ctx.count), nil, 0), BCN_OK)
        return local
    }

    static let layouts: [(String, UInt32, Int)] = [("rows S=1", 0, 1), ("rows S=6", 0, 6), ("planes", 0, 20),
                                                   ("channels-last", UInt32(BCN_CHANNELS_LAST), 20),
                                                   ("channels-last S=3", UInt32(BCN_CHANNELS_LAST), 3)]
    static let stages: [(String, UInt32)] = [
        ("BCN batch", UInt32(BCN_BATCH_NORM | BCN_CHANNEL_NORM | BCN_UNBIASED_RUNNING_VAR)),
        ("BCN estimated", UInt32(BCN_BATCH_NORM | BCN_CHANNEL_NORM | BCN_ESTIMATED)),
        ("BN", UInt32(BCN_BATCH_NORM | BCN_UNBIASED_RUNNING_VAR)), ("CN", UInt32(BCN_CHANNEL_NORM)),
    ]

    /// Also on 9 samples of planes of 2 and 3 values, which a single call measures plane by plane (keeping the
    /// planes' moments for its phase (c)) and phase (a) alone could measure by columns, in another order.
    func testPhasesChainedAreTheSingleCallsBitForBit() {
        let layouts = Self.layouts.map { ($0.0, $0.1, $0.2, 3) }
            + [("rows S=2, B=9", 0, 2, 9), ("rows S=3, B=9", 0, 3, 9)]
        for (layout, format, S, B) in layouts {
            for (stage, flags) in Self.stages {
                for mode in [training, 0] {
                    let what = "\(layout), \(stage), \(mode == 0 ? "eval" : "training")"
                    var single = shard(flags | format | mode, B, 8, S, 4), phased = single
                    let (s1, y1) = forward(&single)
                    let (a, m) = moments(&phased)
                    let (b, merged) = merge([m], channels: 8, width: 3)
                    let (c, y2) = finish(&phased, merged)
                    XCTAssertEqual([s1, a, b, c], [BCN_OK, BCN_OK, BCN_OK, BCN_OK], what)
                    XCTAssertEqual(m, merged, "\(what): one set merges to itself")
                    XCTAssertEqual(y1, y2, what)
                    XCTAssertEqual(single.rm, phased.rm, what); XCTAssertEqual(single.rv, phased.rv, what)
                    XCTAssertEqual(single.nbt, phased.nbt, what)
                    let (d1, dx1, g1) = backward(&single, phased: false)
                    let (d2, dx2, g2) = backward(&phased, phased: true)
                    XCTAssertEqual([d1, d2], [BCN_OK, BCN_OK], what)
                    XCTAssertEqual(dx1, dx2, what); XCTAssertEqual(g1, g2, what)
                }
            }
        }
    }

    /// A batch split between two "processes" whose moments and sums are merged in order: each half's output
    /// and input gradient equal the whole batch's, both hold the same buffers, and their parameter gradients
    /// add up to the whole batch's.
    func testSplitBatchEqualsWholeBatch() {
        for (layout, format, S) in Self.layouts {
            for (stage, flags) in Self.stages where flags & UInt32(BCN_BATCH_NORM) != 0 {
                let what = "\(layout), \(stage)"
                var whole = shard(flags | format | training, 5, 8, S, 4)
                var first = rows(whole, 0, 2), second = rows(whole, 2, 5)
                let (_, y) = forward(&whole)
                let (_, m1) = moments(&first), (_, m2) = moments(&second)
                let (_, merged) = merge([m1, m2], channels: 8, width: 3)
                let (f1, y1) = finish(&first, merged), (f2, y2) = finish(&second, merged)
                XCTAssertEqual([f1, f2], [BCN_OK, BCN_OK], what)
                XCTAssertLessThan(maxScaledError(y1 + y2, y), 1e-12, "\(what): outputs")
                XCTAssertEqual(first.rm, second.rm, what); XCTAssertEqual(first.rv, second.rv, what)
                XCTAssertLessThan(maxScaledError(first.rm + first.rv, whole.rm + whole.rv), 1e-13, "\(what): buffers")
                XCTAssertEqual(first.nbt, whole.nbt, what)
                let (_, dx, g) = backward(&whole, phased: false)
                let (_, sums) = merge([localSums(&first), localSums(&second)], channels: 8, width: 2)
                let (b1, dx1, g1) = backward(&first, phased: true, sums: sums)
                let (b2, dx2, g2) = backward(&second, phased: true, sums: sums)
                XCTAssertEqual([b1, b2], [BCN_OK, BCN_OK], what)
                XCTAssertLessThan(maxScaledError(dx1 + dx2, dx), 1e-12, "\(what): dx")
                XCTAssertLessThan(maxScaledError(zip(g1, g2).map { $0 + $1 }, g), 1e-12, "\(what): parameter gradients")
            }
        }
    }

    func testPhaseMisuseIsAStatusThatWritesNothing() {
        let flags = UInt32(BCN_BATCH_NORM | BCN_CHANNEL_NORM) | training
        var s = shard(flags, 2, 8, 5, 4)
        let rm = s.rm, nbt = s.nbt
        // finish before moments: the context holds none
        XCTAssertEqual(finish(&s, [Double](repeating: 1, count: 24)).0, BCN_ERR_NO_FORWARD)
        // moments of a float32 input do not continue into a float64 finish
        let x32 = s.x.map(Float.init)
        XCTAssertEqual(bcn_norm_moments_f32(flags, 2, 8, 5, 4, x32, nil, &s.ctx, Int64(s.ctx.count), nil, 0), BCN_OK)
        XCTAssertEqual(finish(&s, [Double](repeating: 1, count: 24)).0, BCN_ERR_NO_FORWARD)
        XCTAssertEqual(s.rm, rm); XCTAssertEqual(s.nbt, nbt)
        // moments without the channel-norm stage record no groups: a finish with it does not continue them, and
        // the message says what to run, in the C ABI's names
        XCTAssertEqual(bcn_norm_moments_f64(UInt32(BCN_BATCH_NORM) | training, 2, 8, 5, 4, s.x, nil, &s.ctx,
                                            Int64(s.ctx.count), nil, 0), BCN_OK)
        var message = [CChar](repeating: 0, count: 256)
        var y = [Double](repeating: 0, count: s.count)
        XCTAssertEqual(bcn_norm_finish_f64(flags, 2, 8, 5, 4, 1e-5, 1e-5, 0.1, s.x, &y, s.w, s.b, &s.rm, &s.rv,
                                           &s.nbt, s.cw, s.cb, [Double](repeating: 1, count: 24), &s.ctx,
                                           Int64(s.ctx.count), &message, 256), BCN_ERR_NO_FORWARD)
        let said = String(cString: message)
        XCTAssertTrue(said.contains("groups") && said.contains("bcn_norm_moments_"), said)
        XCTAssertEqual(s.rm, rm); XCTAssertEqual(s.nbt, nbt)
        let (a, m) = moments(&s)
        XCTAssertEqual(a, BCN_OK)
        // training needs the moments; moments of one value in all are degenerate for batch statistics
        XCTAssertEqual(finish(&s, nil).0, BCN_ERR_INVALID_ARGUMENT)
        var one = m
        for c in 0..<8 { one[3 * c] = 1; one[3 * c + 2] = 0 }
        XCTAssertEqual(finish(&s, one).0, BCN_ERR_DEGENERATE)
        var broken = m
        broken[3] = 7  // channel 1's count differs from channel 0's
        XCTAssertEqual(finish(&s, broken).0, BCN_ERR_INVALID_ARGUMENT)
        XCTAssertEqual(s.rm, rm); XCTAssertEqual(s.nbt, nbt)
        // merges refuse sets that are not moments, writing nothing
        var negative = m
        negative[0] = -1
        let (status, merged) = merge([m, negative], channels: 8, width: 3)
        XCTAssertEqual(status, BCN_ERR_INVALID_ARGUMENT)
        XCTAssertEqual(merged, [Double](repeating: -1, count: 24))
        var endless = m
        endless[0] = .infinity  // a count of values must be a whole number
        XCTAssertEqual(merge([m, endless], channels: 8, width: 3).0, BCN_ERR_INVALID_ARGUMENT)
        var huge = m
        for c in 0..<8 { huge[3 * c] = 1e308 }  // whole numbers, but two of them add up past Double's range
        let (overflow, untouched) = merge([huge, huge], channels: 8, width: 3)
        XCTAssertEqual(overflow, BCN_ERR_INVALID_ARGUMENT)
        XCTAssertEqual(untouched, [Double](repeating: -1, count: 24))
        // a review: counts of 1e160 with equal means merged to a NaN M2 (the weight nₐ·n_b/n overflowed), and
        // the running update took it with BCN_OK; counts are refused past 2^53, what a double counts exactly
        for c in 0..<8 { huge[3 * c] = 1e160 }
        XCTAssertEqual(merge([huge, huge], channels: 8, width: 3).0, BCN_ERR_INVALID_ARGUMENT)
        for c in 0..<8 { huge[3 * c] = 0x1p52 }  // 2^53 in all: merged, M2 finite
        let (exact, sum) = merge([huge, huge], channels: 8, width: 3)
        XCTAssertEqual(exact, BCN_OK)
        XCTAssertEqual(sum[0], 0x1p53)
        XCTAssertTrue(sum[2].isFinite)
        huge[0] = 0x1p52 + 2
        XCTAssertEqual(merge([huge, huge], channels: 8, width: 3).0, BCN_ERR_INVALID_ARGUMENT)
        // a review: 2^53 + 1 rounds to 2^53 when added, so each count is tested before it is
        var single = m
        for c in 0..<8 { huge[3 * c] = 0x1p53; single[3 * c] = 1 }
        XCTAssertEqual(merge([huge, single], channels: 8, width: 3).0, BCN_ERR_INVALID_ARGUMENT)
        XCTAssertEqual(bcn_moments_merge(0, 8, m, &negative, nil, 0), BCN_ERR_INVALID_ARGUMENT)
        XCTAssertEqual(bcn_moments_merge(Int64.max, Int64.max, m, &negative, nil, 0), BCN_ERR_INVALID_ARGUMENT)
        // an empty set contributes nothing
        var empty = [Double](repeating: 0, count: 24)
        XCTAssertEqual(merge([empty, m], channels: 8, width: 3).1, m)
        empty[1] = 5  // a mean without values is still nothing
        XCTAssertEqual(merge([m, empty], channels: 8, width: 3).1, m)
        // the backward: its finish needs its own phase (a), and the batch's sums with batch statistics
        XCTAssertEqual(finish(&s, m).0, BCN_OK)
        var dx = [Double](repeating: 9, count: s.count)
        XCTAssertEqual(bcn_norm_needs_gradient_sums(flags, 2, 8, 5, 4, s.ctx, Int64(s.ctx.count)), 1)
        XCTAssertEqual(bcn_norm_backward_finish_f64(flags, 2, 8, 5, 4, s.x, s.dy, &dx, nil, nil, nil, nil, nil,
                                                    &s.ctx, Int64(s.ctx.count), nil, 0), BCN_ERR_NO_FORWARD)
        let sums = localSums(&s)
        XCTAssertEqual(bcn_norm_backward_finish_f64(flags, 2, 8, 5, 4, s.x, s.dy, &dx, nil, nil, nil, nil, nil,
                                                    &s.ctx, Int64(s.ctx.count), nil, 0), BCN_ERR_INVALID_ARGUMENT)
        XCTAssertEqual(dx, [Double](repeating: 9, count: s.count))
        XCTAssertEqual(bcn_norm_backward_finish_f64(flags, 2, 8, 5, 4, s.x, s.dy, &dx, nil, nil, nil, nil, sums,
                                                    &s.ctx, Int64(s.ctx.count), nil, 0), BCN_OK)
        // estimated statistics need no sums
        var est = shard(flags | UInt32(BCN_ESTIMATED), 2, 8, 5, 4)
        _ = forward(&est)
        XCTAssertEqual(bcn_norm_needs_gradient_sums(est.flags, 2, 8, 5, 4, est.ctx, Int64(est.ctx.count)), 0)
        XCTAssertEqual(bcn_norm_needs_gradient_sums(est.flags, 2, 8, 6, 4, est.ctx, Int64(est.ctx.count)),
                       -BCN_ERR_NO_FORWARD)
    }

    /// The update alone from a shard's moments leaves the buffers where a training forward leaves them, bit for
    /// bit, for every running-buffer convention; in Float32 too.
    func testRunningUpdateAloneIsTheForwardsUpdate() {
        let conventions: [(String, UInt32)] = [
            ("PyTorch", UInt32(BCN_UNBIASED_RUNNING_VAR)), ("labml", UInt32(BCN_ESTIMATED)),
            ("authors' EstBN", UInt32(BCN_ESTIMATED | BCN_VARIANCE_AROUND_RUNNING_MEAN)),
            ("cumulative", UInt32(BCN_CUMULATIVE_AVERAGE | BCN_UNBIASED_RUNNING_VAR)),
        ]
        for (name, convention) in conventions {
            for (layout, format, S) in Self.layouts {
                let flags = UInt32(BCN_BATCH_NORM | BCN_CHANNEL_NORM) | convention | format | training
                var forwarded = shard(flags, 3, 8, S, 4), updated = forwarded
                XCTAssertEqual(forward(&forwarded).0, BCN_OK)
                let (a, m) = moments(&updated)
                XCTAssertEqual(bcn_running_update_f64(flags, 8, 0.1, m, &updated.rm, &updated.rv, &updated.nbt, nil, 0),
                               BCN_OK)
                XCTAssertEqual(a, BCN_OK)
                XCTAssertEqual(updated.rm, forwarded.rm, "\(name), \(layout)")
                XCTAssertEqual(updated.rv, forwarded.rv, "\(name), \(layout)")
                XCTAssertEqual(updated.nbt, forwarded.nbt, "\(name), \(layout)")
                // Float32 buffers: the forward's rounding of the Float64 update
                let x32 = updated.x.map { Float($0) }
                var y32 = [Float](repeating: 0, count: x32.count), ctx = updated.ctx
                var rm1 = [Float](repeating: 0.3, count: 8), rv1 = [Float](repeating: 1.7, count: 8), n1: Int64 = 3
                var rm2 = rm1, rv2 = rv1, n2 = n1
                let w = [Float](repeating: 1, count: 8), g = [Float](repeating: 1, count: 4)
                XCTAssertEqual(bcn_norm_forward_f32(flags, 3, 8, Int64(S), 4, 1e-5, 1e-5, 0.1, x32, &y32, w, w, &rm1,
                                                    &rv1, &n1, g, g, &ctx, Int64(ctx.count), nil, 0), BCN_OK)
                var m32 = [Double](repeating: 0, count: 24)
                XCTAssertEqual(bcn_norm_moments_f32(flags, 3, 8, Int64(S), 4, x32, &m32, &ctx, Int64(ctx.count),
                                                    nil, 0), BCN_OK)
                XCTAssertEqual(bcn_running_update_f32(flags, 8, 0.1, m32, &rm2, &rv2, &n2, nil, 0), BCN_OK)
                XCTAssertEqual(rm1, rm2, "\(name), \(layout), Float")
                XCTAssertEqual(rv1, rv2, "\(name), \(layout), Float")
                XCTAssertEqual(n1, n2)
            }
        }
    }

    func testRunningUpdateRefusalsWriteNothing() {
        var s = shard(UInt32(BCN_BATCH_NORM | BCN_UNBIASED_RUNNING_VAR) | training, 2, 8, 5, 4)
        let (_, m) = moments(&s)
        let rm = s.rm, rv = s.rv, nbt = s.nbt
        var message = [CChar](repeating: 0, count: 256)
        var runningMean = s.rm, runningVar = s.rv, count = s.nbt
        func update(_ flags: UInt32, _ channels: Int64 = 8, _ momentum: Double = 0.1, moments: [Double]) -> Int32 {
            bcn_running_update_f64(flags, channels, momentum, moments, &runningMean, &runningVar, &count, &message, 256)
        }
        XCTAssertEqual(update(UInt32(BCN_CHANNEL_NORM), moments: m), BCN_ERR_INVALID_ARGUMENT)
        XCTAssertTrue(String(cString: message).contains("batch-norm"), String(cString: message))
        XCTAssertEqual(update(UInt32(BCN_BATCH_NORM), 0, moments: m), BCN_ERR_INVALID_ARGUMENT)
        XCTAssertEqual(update(UInt32(BCN_BATCH_NORM), 8, 1.5, moments: m), BCN_ERR_INVALID_ARGUMENT)
        XCTAssertEqual(update(UInt32(BCN_BATCH_NORM), 8, .nan, moments: m), BCN_ERR_INVALID_ARGUMENT)
        XCTAssertEqual(update(1 << 30, moments: m), BCN_ERR_INVALID_ARGUMENT)
        var one = m
        for c in 0..<8 { one[3 * c] = 1; one[3 * c + 2] = 0 }
        XCTAssertEqual(update(UInt32(BCN_BATCH_NORM | BCN_UNBIASED_RUNNING_VAR), moments: one), BCN_ERR_DEGENERATE)
        var nan = m
        nan[4] = .nan
        XCTAssertEqual(update(UInt32(BCN_BATCH_NORM | BCN_NAN_RAISE), moments: nan), BCN_ERR_NONFINITE)
        XCTAssertEqual(bcn_running_update_f64(UInt32(BCN_BATCH_NORM), 8, 0.1, nil, &runningMean, &runningVar,
                                              &count, nil, 0), BCN_ERR_INVALID_ARGUMENT)
        XCTAssertEqual(bcn_running_update_f64(UInt32(BCN_BATCH_NORM), 8, 0.1, m, &runningMean, nil, &count, nil, 0),
                       BCN_ERR_INVALID_ARGUMENT)
        XCTAssertEqual(runningMean, rm); XCTAssertEqual(runningVar, rv); XCTAssertEqual(count, nbt)
        // one value per channel is fine for biased estimates
        XCTAssertEqual(update(UInt32(BCN_BATCH_NORM | BCN_ESTIMATED), moments: one), BCN_OK)
        XCTAssertEqual(count, nbt + 1)
        XCTAssertNotEqual(runningMean, rm)
    }

    func testNonFiniteMomentsPhaseWritesNothing() {
        var s = shard(UInt32(BCN_BATCH_NORM | BCN_CHANNEL_NORM | BCN_NAN_RAISE) | training, 2, 8, 20, 4)
        s.x[5 * 20 + 3] = Double.nan
        let ctx = s.ctx
        let (status, m) = moments(&s)
        XCTAssertEqual(status, BCN_ERR_NONFINITE)
        XCTAssertEqual(m, [Double](repeating: -1, count: 24))
        XCTAssertEqual(s.ctx, ctx)
    }
}
