import BCNSwift
import BCNSwiftTestSupport
import XCTest

/// Every gradient of the Swift layer (dx and the four parameter gradients) against central finite differences
/// of the plain Float64 reference, on every layout: rows, planes and channels-last.
final class GradientTests: XCTestCase {
    var rng = SplitMix64(seed: 0x6EAD)

    /// [B, C, S] channels-first values in channels-last order ([B, S, C]) and back.
    func toLast(_ v: [Double], _ B: Int, _ C: Int, _ S: Int) -> [Double] {
        var out = v
        for b in 0..<B { for c in 0..<C { for s in 0..<S { out[(b * S + s) * C + c] = v[(b * C + c) * S + s] } } }
        return out
    }

    func toFirst(_ v: [Double], _ B: Int, _ C: Int, _ S: Int) -> [Double] {
        var out = v
        for b in 0..<B { for c in 0..<C { for s in 0..<S { out[(b * C + c) * S + s] = v[(b * S + s) * C + c] } } }
        return out
    }

    func check(shape: [Int], format: MemoryFormat, estimate: Bool, file: StaticString = #filePath,
               line: UInt = #line) throws {
        let B = shape[0], C = shape[1], S = shape.dropFirst(2).reduce(1, *), G = 2
        let layer = try BatchChannelNorm<Double>(channels: C, groups: G, estimate: estimate)
        var ref = ReferenceBCN(channels: C, groups: G, kind: estimate ? .estimated(aroundRunningMean: false) : .batch,
                               unbiased: !estimate)
        for c in 0..<C {
            let g = Double.random(in: 0.5...1.5, using: &rng), b = rng.normal(0.3, 0.5)
            layer.bnWeight[c] = g; layer.bnBias[c] = b; ref.gamma[c] = g; ref.beta[c] = b
        }
        for g in 0..<G {
            let w = Double.random(in: 0.5...1.5, using: &rng), b = rng.normal(0.3, 0.5)
            layer.weight[g] = w; layer.bias[g] = b; ref.w[g] = w; ref.b[g] = b
        }
        let x = (0..<(B * C * S)).map { i in rng.normal(1.0 + Double((i / S) % C), 2) }
        let w = (0..<x.count).map { _ in rng.normal(0.3, 1) }  // loss = Σ w·y, so dy = w
        let last = format == .channelsLast
        _ = try layer.forward(last ? toLast(x, B, C, S) : x, shape: shape, format: format)
        let dxRaw = try layer.backward(last ? toLast(w, B, C, S) : w)
        let dx = last ? toFirst(dxRaw, B, C, S) : dxRaw

        // With estimates the gradient stops at the (updated) running statistics: differentiate eval there.
        var frozen = ref
        _ = frozen.forward(x, batch: B, spatial: S, training: true)
        let training = !estimate, base = estimate ? frozen : ref
        func loss(_ r: ReferenceBCN, _ xv: [Double]) -> Double {
            var r = r
            return zip(r.forward(xv, batch: B, spatial: S, training: training), w).reduce(0) { $0 + $1.0 * $1.1 }
        }
        let h = 1e-6
        func derivative(_ perturb: (inout ReferenceBCN, inout [Double], Double) -> Void) -> Double {
            var rp = base, xp = x, rm = base, xm = x
            perturb(&rp, &xp, h); perturb(&rm, &xm, -h)
            return (loss(rp, xp) - loss(rm, xm)) / (2 * h)
        }
        let what = "\(shape) \(format) estimate \(estimate)"
        func expectClose(_ a: Double, _ fd: Double, _ name: String) {
            XCTAssertEqual(a, fd, accuracy: 2e-6 * max(1, abs(fd)), "\(what): \(name)", file: file, line: line)
        }
        for i in stride(from: 0, to: x.count, by: max(1, x.count / 23)) {
            expectClose(dx[i], derivative { _, xv, d in xv[i] += d }, "dx[\(i)]")
        }
        for c in 0..<C {
            expectClose(layer.gradBnWeight[c], derivative { r, _, d in r.gamma[c] += d }, "dγ[\(c)]")
            expectClose(layer.gradBnBias[c], derivative { r, _, d in r.beta[c] += d }, "dβ[\(c)]")
        }
        for g in 0..<G {
            expectClose(layer.gradWeight[g], derivative { r, _, d in r.w[g] += d }, "dw[\(g)]")
            expectClose(layer.gradBias[g], derivative { r, _, d in r.b[g] += d }, "dbias[\(g)]")
        }
    }

    func testEveryGradientOnEveryLayout() throws {
        for estimate in [false, true] {
            try check(shape: [3, 4, 5], format: .channelsFirst, estimate: estimate)      // rows
            try check(shape: [5, 4], format: .channelsFirst, estimate: estimate)         // rows, S = 1
            try check(shape: [2, 4, 4, 5], format: .channelsFirst, estimate: estimate)   // planes
            try check(shape: [2, 4, 4, 5], format: .channelsLast, estimate: estimate)    // channels-last
            try check(shape: [3, 4, 3], format: .channelsLast, estimate: estimate)       // channels-last, short
        }
    }
}
