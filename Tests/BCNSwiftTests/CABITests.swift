import BCNSwiftC
import XCTest

/// The C ABI as a C caller sees it: every failure is a status code and a message, and writes nothing.
// Flag bits as bcnswift.h defines them.
private let bn: UInt32 = 1, estimated: UInt32 = 2, cn: UInt32 = 32, training: UInt32 = 128

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
                 eps: Double = 1e-5, momentum: Double = 0.1, contextLength: Int64 = 4096,
                 nullX: Bool = false, nullWeights: Bool = false, buffers: inout Buffers) -> (Int32, String) {
        var message = [CChar](repeating: 0, count: 256)
        let status = buffers.x.withUnsafeBufferPointer { x in
            buffers.y.withUnsafeMutableBufferPointer { y in
                buffers.rm.withUnsafeMutableBufferPointer { rm in
                    buffers.rv.withUnsafeMutableBufferPointer { rv in
                        buffers.ctx.withUnsafeMutableBufferPointer { ctx in
                            bcn_norm_forward_f32(flags, batch, channels, spatial, groups, eps, eps, momentum,
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
        XCTAssertEqual(status, 0)
        XCTAssertEqual(message, "")
        XCTAssertEqual(buf.nbt, 1)
        XCTAssertNotEqual(buf.rm[0], 0.5)
    }

    func testEveryBadArgumentIsAStatusAndWritesNothing() {
        let all = bn | estimated | cn | training
        let cases: [(String, Int32, (inout Buffers) -> (Int32, String))] = [
            ("x must not be null", 1, { self.forward(flags: all, nullX: true, buffers: &$0) }),
            ("batch must be positive", 1, { self.forward(flags: all, batch: 0, buffers: &$0) }),
            ("channels must be positive", 1, { self.forward(flags: all, channels: -3, buffers: &$0) }),
            ("spatial must be positive", 1, { self.forward(flags: all, spatial: -1, buffers: &$0) }),
            ("too large", 1, { self.forward(flags: all, batch: 1 << 40, channels: 1 << 20, spatial: 1 << 20, buffers: &$0) }),
            ("too large", 1, { self.forward(flags: all, batch: Int64.max, channels: Int64.max, buffers: &$0) }),
            ("divisible", 1, { self.forward(flags: all, groups: 3, buffers: &$0) }),
            ("groups must be positive, got -2", 1, { self.forward(flags: all, groups: -2, buffers: &$0) }),
            ("eps", 1, { self.forward(flags: all, eps: 0, buffers: &$0) }),
            ("eps", 1, { self.forward(flags: all, eps: .nan, buffers: &$0) }),
            ("momentum", 1, { self.forward(flags: all, momentum: 2, buffers: &$0) }),
            ("unknown flag", 1, { self.forward(flags: all | (1 << 20), buffers: &$0) }),
            ("neither", 1, { self.forward(flags: training, buffers: &$0) }),
            ("context holds 3", 1, { self.forward(flags: all, contextLength: 3, buffers: &$0) }),
            ("context_length", 1, { self.forward(flags: all, contextLength: -5, buffers: &$0) }),
            ("must not be null", 1, { self.forward(flags: all, nullWeights: true, buffers: &$0) }),
            ("Expected more than 1 value per channel", 3,
             { self.forward(flags: bn | cn | training, batch: 1, spatial: 1, groups: 1, buffers: &$0) }),
        ]
        for (expected, code, call) in cases {
            var buf = Buffers(b: 2, c: 4, s: 8, g: 2)
            let (status, message) = call(&buf)
            XCTAssertEqual(status, code, "\(expected): \(message)")
            XCTAssertTrue(message.contains(expected), "expected '\(expected)' in '\(message)'")
            XCTAssertEqual(buf.rm, [Float](repeating: 0.5, count: 4), expected)
            XCTAssertEqual(buf.rv, [Float](repeating: 2, count: 4), expected)
            XCTAssertEqual(buf.nbt, 0, expected)
            XCTAssertEqual(buf.y, [Float](repeating: -7, count: 64), expected)
        }
    }

    func testMessageIsTruncatedSafely() {
        var message = [CChar](repeating: 65, count: 8)
        let status = bcn_norm_forward_f32(0, 0, 0, 0, 0, 0, 0, 0, nil, nil, nil, nil, nil, nil, nil, nil, nil, nil, 0,
                                          &message, 8)
        XCTAssertNotEqual(status, 0)
        XCTAssertEqual(message[7], 0)
        XCTAssertEqual(String(cString: message).count, 7)
        XCTAssertNotEqual(bcn_norm_forward_f64(0, 1, 1, 1, 0, 1, 1, 0, nil, nil, nil, nil, nil, nil, nil, nil, nil,
                                               nil, 0, nil, 0), 0)  // null message buffer: still just a status
    }

    func testBackwardRefusesAForeignContext() {
        var buf = Buffers(b: 2, c: 4, s: 8, g: 2)
        XCTAssertEqual(forward(flags: bn | cn | training, buffers: &buf).0, 0)
        var dx = [Float](repeating: 0, count: 64)
        var message = [CChar](repeating: 0, count: 256)
        // same buffers, another shape: the header does not match
        let status = bcn_norm_backward_f32(bn | cn, 4, 4, 4, 2, buf.x, buf.y, &dx, nil, nil, nil, nil, buf.ctx,
                                           Int64(buf.ctx.count), &message, 256)
        XCTAssertEqual(status, 5, String(cString: message))
        var garbage = [Double](repeating: .nan, count: 4096)
        XCTAssertEqual(bcn_norm_backward_f32(bn | cn, 2, 4, 8, 2, buf.x, buf.y, &dx, nil, nil, nil, nil, &garbage,
                                             4096, &message, 256), 5)
        XCTAssertEqual(bcn_norm_backward_f32(bn | cn, 2, 4, 8, 2, buf.x, buf.y, &dx, nil, nil, nil, nil, buf.ctx,
                                             10, &message, 256), 5)
        XCTAssertEqual(dx, [Float](repeating: 0, count: 64))
        XCTAssertEqual(bcn_norm_backward_f32(bn | cn, 2, 4, 8, 2, buf.x, buf.y, &dx, nil, nil, nil, nil, buf.ctx,
                                             Int64(buf.ctx.count), &message, 256), 0)
    }

    func testContextLengthAndThreads() {
        let header: Int64 = 8, planes: Int64 = 3 * 2 * 4, channels: Int64 = 3 * 4, groups: Int64 = 2 * 2 * 2 + 2
        XCTAssertEqual(bcn_context_length(2, 4, 2), header + planes + channels + groups)
        XCTAssertEqual(bcn_context_length(0, 4, 2), -1)
        XCTAssertEqual(bcn_context_length(Int64.max, Int64.max, 1), -1)
        XCTAssertEqual(bcn_abi_version(), 1)
        let n = bcn_get_num_threads()
        XCTAssertEqual(bcn_set_num_threads(3), 3)
        XCTAssertEqual(bcn_set_num_threads(0), n)
    }

    func testWeightStandardizationStatuses() {
        let w: [Float] = [1, 2, 3, 4, 5, 6]
        var out = [Float](repeating: 9, count: 6)
        var message = [CChar](repeating: 0, count: 128)
        XCTAssertEqual(bcn_ws_forward_f32(3, 2, 3, 1e-5, w, &out, &message, 128), 0)
        XCTAssertEqual(bcn_ws_forward_f32(1, 6, 1, 1e-5, w, &out, &message, 128), 3)  // fan-in 1, unbiased
        XCTAssertEqual(bcn_ws_forward_f32(3, -2, 3, 1e-5, w, &out, &message, 128), 1)
        XCTAssertEqual(bcn_ws_forward_f32(3, 2, 3, 0, w, &out, &message, 128), 1)
        XCTAssertEqual(bcn_ws_forward_f32(8, 2, 3, 1e-5, w, &out, &message, 128), 1)  // unknown flag
        XCTAssertEqual(bcn_ws_forward_f32(3, 2, 3, 1e-5, nil, &out, &message, 128), 1)
        XCTAssertEqual(bcn_ws_backward_f32(3, 2, 3, 1e-5, w, nil, &out, &message, 128), 1)
    }
}
