import CBCNSwift
import XCTest

/// The C ABI as a C caller sees it, through bcnswift.h: every failure is a status code and a message, and writes
/// nothing; the statistics phases chained equal the single calls bit for bit.
private let bn = UInt32(BCN_BATCH_NORM), estimated = UInt32(BCN_ESTIMATED), cn = UInt32(BCN_CHANNEL_NORM)
private let training = UInt32(BCN_TRAINING), nanRaise = UInt32(BCN_NAN_RAISE)
private let unbiased = UInt32(BCN_UNBIASED_RUNNING_VAR), channelsLast = UInt32(BCN_CHANNELS_LAST)

final class CABITests: XCTestCase {
    struct Buffers {
        var x: [Float], y: [Float], w: [Float], b: [Float], rm: [Float], rv: [Float], gw: [Float], gb: [Float]
        var nbt: Int64 = 0
        var ctx: [Double]
        init(b: Int, c: Int, s: Int, g: Int) {
            x = (0..<(b * c * s)).map { Float(($0 * 37) % 23) * 0.25 + 1 }
            y = [Float](repeating: -7, count: b * c * s)
            w = [Float](repeating: 1, count: c); self.b = [Float](repeating: 0, count: c)
            rm = [Float](repeating: 0.5, count: c); rv = [Float](repeating: 2, count: c)
            gw = [Float](repeating: 1, count: max(g, 1)); gb = [Float](repeating: 0, count: max(g, 1))
            ctx = [Double](repeating: 0, count: 4096)
        }
    }

    /// Calls forward with the given sizes on buffers sized for (2, 4, 8, 2); returns status and message.
    func forward(flags: UInt32, batch: Int64 = 2, channels: Int64 = 4, spatial: Int64 = 8, groups: Int64 = 2,
                 eps: Double = 1e-5, bnEps: Double? = nil, momentum: Double = 0.1, contextLength: Int64 = 4096,
                 nullX: Bool = false, nullWeights: Bool = false, buffers: inout Buffers) -> (Int32, String) {
        var message = [CChar](repeating: 0, count: 256)
        let status = buffers.x.withUnsafeBufferPointer { x in
            buffers.y.withUnsafeMutableBufferPointer { y in
                buffers.rm.withUnsafeMutableBufferPointer { rm in
                    buffers.rv.withUnsafeMutableBufferPointer { rv in
                        buffers.ctx.withUnsafeMutableBufferPointer { ctx in
                            bcn_norm_forward_f32(flags, batch, channels, spatial, groups, eps, bnEps ?? eps, momentum,
                                                 nullX ? nil : x.baseAddress, y.baseAddress,
                                                 nullWeights ? nil : buffers.w, buffers.b, rm.baseAddress,
                                                 rv.baseAddress, &buffers.nbt, buffers.gw, buffers.gb,
                                                 ctx.baseAddress, contextLength, &message, 256)
                        }
                    }
                }
            }
        }
        return (status, String(cString: message))
    }

    func testValidCallSucceedsAndClearsMessage() {
        var buf = Buffers(b: 2, c: 4, s: 8, g: 2)
        let (status, message) = forward(flags: bn | estimated | cn | training, buffers: &buf)
        XCTAssertEqual(status, BCN_OK)
        XCTAssertEqual(message, "")
        XCTAssertEqual(buf.nbt, 1)
        XCTAssertNotEqual(buf.rm[0], 0.5)
    }

    func testEveryBadArgumentIsAStatusAndWritesNothing() {
        let all = bn | estimated | cn | training
        let cases: [(String, Int32, (inout Buffers) -> (Int32, String))] = [
            ("x must not be null", BCN_ERR_INVALID_ARGUMENT, { self.forward(flags: all, nullX: true, buffers: &$0) }),
            ("batch must be positive", BCN_ERR_INVALID_ARGUMENT, { self.forward(flags: all, batch: 0, buffers: &$0) }),
            ("channels must be positive", BCN_ERR_INVALID_ARGUMENT,
             { self.forward(flags: all, channels: -3, buffers: &$0) }),
            ("spatial must be positive", BCN_ERR_INVALID_ARGUMENT,
             { self.forward(flags: all, spatial: -1, buffers: &$0) }),
            ("too large", BCN_ERR_INVALID_ARGUMENT,
             { self.forward(flags: all, batch: 1 << 40, channels: 1 << 20, spatial: 1 << 20, buffers: &$0) }),
            ("too large", BCN_ERR_INVALID_ARGUMENT,
             { self.forward(flags: all, batch: Int64.max, channels: Int64.max, buffers: &$0) }),
            ("divisible", BCN_ERR_INVALID_ARGUMENT, { self.forward(flags: all, groups: 3, buffers: &$0) }),
            ("groups must be positive, got -2", BCN_ERR_INVALID_ARGUMENT,
             { self.forward(flags: all, groups: -2, buffers: &$0) }),
            ("eps", BCN_ERR_INVALID_ARGUMENT, { self.forward(flags: all, eps: 0, buffers: &$0) }),
            ("eps", BCN_ERR_INVALID_ARGUMENT, { self.forward(flags: all, eps: .nan, buffers: &$0) }),
            // which of the two: the messages name the stage
            ("the batch-norm stage's eps must be a positive finite number, got 0.0", BCN_ERR_INVALID_ARGUMENT,
             { self.forward(flags: all, bnEps: 0, buffers: &$0) }),
            ("the channel-norm stage's eps must be a positive finite number, got -1.0", BCN_ERR_INVALID_ARGUMENT,
             { self.forward(flags: all, eps: -1, bnEps: 1e-5, buffers: &$0) }),
            ("momentum", BCN_ERR_INVALID_ARGUMENT, { self.forward(flags: all, momentum: 2, buffers: &$0) }),
            ("unknown flag", BCN_ERR_INVALID_ARGUMENT, { self.forward(flags: all | (1 << 20), buffers: &$0) }),
            ("neither", BCN_ERR_INVALID_ARGUMENT, { self.forward(flags: training, buffers: &$0) }),
            ("context holds 3", BCN_ERR_INVALID_ARGUMENT, { self.forward(flags: all, contextLength: 3, buffers: &$0) }),
            ("context_length", BCN_ERR_INVALID_ARGUMENT,
             { self.forward(flags: all, contextLength: -5, buffers: &$0) }),
            ("bn_weight must not be null: the plan has a batch-norm stage", BCN_ERR_INVALID_ARGUMENT,
             { self.forward(flags: all, nullWeights: true, buffers: &$0) }),
            ("Expected more than 1 value per channel", BCN_ERR_DEGENERATE,
             { self.forward(flags: bn | cn | training, batch: 1, spatial: 1, groups: 1, buffers: &$0) }),
            ("NaN or infinity (channel 1 of sample 0)", BCN_ERR_NONFINITE, { buffers in
                buffers.x[9] = .nan  // plane (0, 1) of [2, 4, 8]: the rows layout (S < 16); planes: below
                return self.forward(flags: all | nanRaise, buffers: &buffers)
            }),
            ("NaN or infinity (channel 1 of sample 0)", BCN_ERR_NONFINITE, { buffers in
                buffers.x[1] = .infinity  // position 0, channel 1 of [2, 8, 4] channels-last
                return self.forward(flags: all | nanRaise | channelsLast, buffers: &buffers)
            }),
            ("NaN or infinity (channel 2 of sample 1)", BCN_ERR_NONFINITE, { buffers in
                buffers.x[4 + 2] = -.infinity  // [2, 4] rows
                return self.forward(flags: all | nanRaise, spatial: 1, buffers: &buffers)
            }),
        ]
        for (expected, code, call) in cases {
            var buf = Buffers(b: 2, c: 4, s: 8, g: 2)
            let context = buf.ctx
            let (status, message) = call(&buf)
            XCTAssertEqual(status, code, "\(expected): \(message)")
            XCTAssertTrue(message.contains(expected), "expected '\(expected)' in '\(message)'")
            XCTAssertEqual(buf.rm, [Float](repeating: 0.5, count: 4), expected)
            XCTAssertEqual(buf.rv, [Float](repeating: 2, count: 4), expected)
            XCTAssertEqual(buf.nbt, 0, expected)
            XCTAssertEqual(buf.y, [Float](repeating: -7, count: 64), expected)
            XCTAssertEqual(buf.ctx, context, "\(expected): the context changed")
        }
    }

    /// A non-finite value under BCN_NAN_RAISE, in every layout (planes need S >= 16) and mode: the call fails
    /// with its position and writes nothing, neither the output nor the buffers nor the context.
    func testNonFiniteInputFailsInEveryLayoutAndModeWritingNothing() {
        let modes: [(String, UInt32)] = [
            ("batch statistics", bn | cn | training), ("estimates", bn | estimated | cn | training), ("eval", bn | cn),
            ("channel norm alone", cn), ("batch norm alone", bn | training),
        ]
        // (name, S, flags, index of x[1, 2, 13]) for [2, 4, S] in C order or channels-last
        let layouts: [(String, Int, UInt32, Int)] = [
            ("planes", 20, 0, (1 * 4 + 2) * 20 + 13), ("planes of one chunk's tail", 21, 0, (1 * 4 + 2) * 21 + 20),
            ("channels-last", 20, channelsLast, (1 * 20 + 13) * 4 + 2), ("rows", 8, 0, (1 * 4 + 2) * 8 + 5),
            ("one-value rows", 1, 0, 1 * 4 + 2),
        ]
        for (mode, flags) in modes {
            for (layout, S, layoutFlag, at) in layouts {
                for bad in [Float.nan, .infinity, -.infinity] {
                    let what = "\(mode), \(layout), \(bad)"
                    var buf = Buffers(b: 2, c: 4, s: S, g: 2)
                    buf.x[at] = bad
                    let context = buf.ctx
                    let (status, message) = forward(flags: flags | nanRaise | layoutFlag, spatial: Int64(S),
                                                    buffers: &buf)
                    XCTAssertEqual(status, BCN_ERR_NONFINITE, "\(what): \(message)")
                    XCTAssertTrue(message.contains("NaN or infinity (channel 2 of sample 1)"), "\(what): \(message)")
                    XCTAssertEqual(buf.y, [Float](repeating: -7, count: 8 * S), what)
                    XCTAssertEqual(buf.rm, [Float](repeating: 0.5, count: 4), what)
                    XCTAssertEqual(buf.rv, [Float](repeating: 2, count: 4), what)
                    XCTAssertEqual(buf.nbt, 0, what)
                    XCTAssertEqual(buf.ctx, context, "\(what): the context changed")
                }
            }
        }
    }

    func testMessageIsTruncatedSafely() {
        var message = [CChar](repeating: 65, count: 8)
        let status = bcn_norm_forward_f32(0, 0, 0, 0, 0, 0, 0, 0, nil, nil, nil, nil, nil, nil, nil, nil, nil, nil, 0,
                                          &message, 8)
        XCTAssertNotEqual(status, BCN_OK)
        XCTAssertEqual(message[7], 0)
        XCTAssertEqual(String(cString: message).count, 7)
        XCTAssertNotEqual(bcn_norm_forward_f64(0, 1, 1, 1, 0, 1, 1, 0, nil, nil, nil, nil, nil, nil, nil, nil, nil,
                                               nil, 0, nil, 0), BCN_OK)  // null message buffer: still just a status
    }

    func testBackwardRefusesAForeignContext() {
        var buf = Buffers(b: 2, c: 4, s: 8, g: 2)
        XCTAssertEqual(forward(flags: bn | cn | training, buffers: &buf).0, BCN_OK)
        var dx = [Float](repeating: 0, count: 64)
        var message = [CChar](repeating: 0, count: 256)
        // same buffers, another shape: the header does not match
        let status = bcn_norm_backward_f32(bn | cn, 4, 4, 4, 2, buf.x, buf.y, &dx, nil, nil, nil, nil, buf.ctx,
                                           Int64(buf.ctx.count), &message, 256)
        XCTAssertEqual(status, BCN_ERR_NO_FORWARD, String(cString: message))
        // another memory format
        XCTAssertEqual(bcn_norm_backward_f32(bn | cn | channelsLast, 2, 4, 8, 2, buf.x, buf.y, &dx, nil, nil, nil,
                                             nil, buf.ctx, Int64(buf.ctx.count), &message, 256), BCN_ERR_NO_FORWARD)
        // another element type: a float64 backward would read the float32 input as garbage
        var x64 = buf.x.map(Double.init), dy64 = buf.y.map(Double.init), dx64 = [Double](repeating: 7, count: 64)
        let context = buf.ctx
        XCTAssertEqual(bcn_norm_backward_f64(bn | cn, 2, 4, 8, 2, &x64, &dy64, &dx64, nil, nil, nil, nil, buf.ctx,
                                             Int64(buf.ctx.count), &message, 256), BCN_ERR_NO_FORWARD)
        XCTAssertTrue(String(cString: message).contains("float64 input"), String(cString: message))
        XCTAssertEqual(bcn_norm_backward_sums_f64(bn | cn, 2, 4, 8, 2, &x64, &dy64, nil, &buf.ctx,
                                                  Int64(buf.ctx.count), &message, 256), BCN_ERR_NO_FORWARD)
        XCTAssertEqual(dx64, [Double](repeating: 7, count: 64))
        XCTAssertEqual(buf.ctx, context, "a refused phase wrote the context")
        // whether the backward needs the batch's sums reads no input: either element type answers
        XCTAssertEqual(bcn_norm_needs_gradient_sums(bn | cn, 2, 4, 8, 2, buf.ctx, Int64(buf.ctx.count)), 1)
        var garbage = [Double](repeating: .nan, count: 4096)
        XCTAssertEqual(bcn_norm_backward_f32(bn | cn, 2, 4, 8, 2, buf.x, buf.y, &dx, nil, nil, nil, nil, &garbage,
                                             4096, &message, 256), BCN_ERR_NO_FORWARD)
        // a context shorter than this shape's: refused as the forward refuses it
        XCTAssertEqual(bcn_norm_backward_f32(bn | cn, 2, 4, 8, 2, buf.x, buf.y, &dx, nil, nil, nil, nil, buf.ctx,
                                             10, &message, 256), BCN_ERR_INVALID_ARGUMENT)
        XCTAssertTrue(String(cString: message).hasPrefix("context holds 10 values"), String(cString: message))
        XCTAssertEqual(dx, [Float](repeating: 0, count: 64))
        XCTAssertEqual(bcn_norm_backward_f32(bn | cn, 2, 4, 8, 2, buf.x, buf.y, &dx, nil, nil, nil, nil, buf.ctx,
                                             Int64(buf.ctx.count), &message, 256), BCN_OK)
    }

    func testContextLengthAndThreads() {
        // header + p, q, t, u per plane + μ, 1/σ, a, β per channel + m, r per (sample, group) + w per group
        let header: Int64 = 10, planes: Int64 = 4 * 2 * 4, channels: Int64 = 4 * 4, groups: Int64 = 2 * 2 * 2 + 2
        XCTAssertEqual(bcn_context_length(2, 4, 2), header + planes + channels + groups)
        XCTAssertEqual(bcn_context_length(0, 4, 2), header + channels + 2)  // an empty batch (phases of a process)
        XCTAssertEqual(bcn_context_length(-1, 4, 2), -1)
        XCTAssertEqual(bcn_context_length(Int64.max, Int64.max, 1), -1)
        XCTAssertEqual(bcn_abi_version(), BCN_ABI_VERSION)
        let n = bcn_get_num_threads()
        XCTAssertEqual(bcn_set_num_threads(3), 3)
        XCTAssertEqual(bcn_set_calling_thread_num_threads(1), 0)  // returns the setting it replaced (0: none)
        XCTAssertEqual(bcn_get_num_threads(), 1)  // this thread's own count wins
        XCTAssertEqual(bcn_set_num_threads(4), 4)  // the process's, whatever this thread's own is
        XCTAssertEqual(bcn_get_num_threads(), 1)
        XCTAssertEqual(bcn_set_num_threads(3), 3)
        XCTAssertEqual(bcn_set_calling_thread_num_threads(-2), 1)  // negative: none, as 0
        XCTAssertEqual(bcn_get_num_threads(), 3)
        XCTAssertEqual(bcn_set_calling_thread_num_threads(0), 0)
        XCTAssertEqual(bcn_set_num_threads(0), n)
    }

    func testWeightStandardizationStatuses() {
        let w: [Float] = [1, 2, 3, 4, 5, 6]
        var out = [Float](repeating: 9, count: 6)
        var message = [CChar](repeating: 0, count: 128)
        let both = UInt32(BCN_WS_UNBIASED | BCN_WS_EPS_IN_SQRT)
        XCTAssertEqual(bcn_ws_forward_f32(both, 2, 3, 1e-5, w, &out, &message, 128), BCN_OK)
        XCTAssertEqual(bcn_ws_forward_f32(UInt32(BCN_WS_UNBIASED), 6, 1, 1e-5, w, &out, &message, 128),
                       BCN_ERR_DEGENERATE)  // fan-in 1, unbiased
        XCTAssertEqual(bcn_ws_forward_f32(both, -2, 3, 1e-5, w, &out, &message, 128), BCN_ERR_INVALID_ARGUMENT)
        XCTAssertEqual(bcn_ws_forward_f32(both, 2, 3, 0, w, &out, &message, 128), BCN_ERR_INVALID_ARGUMENT)
        XCTAssertEqual(bcn_ws_forward_f32(8, 2, 3, 1e-5, w, &out, &message, 128), BCN_ERR_INVALID_ARGUMENT)
        XCTAssertEqual(bcn_ws_forward_f32(both, 2, 3, 1e-5, nil, &out, &message, 128), BCN_ERR_INVALID_ARGUMENT)
        XCTAssertEqual(bcn_ws_backward_f32(both, 2, 3, 1e-5, w, nil, &out, &message, 128), BCN_ERR_INVALID_ARGUMENT)
    }
}
