import BCNSwift
import BCNSwiftTestSupport
import Foundation  // JSONEncoder, for the Codable round trip (the library itself stays free of Foundation)
import XCTest

/// `NormalizationLayer.state` and `load(_:)`: a state taken from a trained layer and loaded into a fresh one (also
/// through JSON) makes that layer compute what the first one does, bit for bit; a state the plan cannot hold is
/// refused and changes nothing.
final class NormalizationLayerStateTests: XCTestCase {
    static let seed: UInt64 = 0x57A7E
    var rng = SplitMix64(seed: seed)

    /// Values around a mean far from 0 (2.5), so that no stage sees a centred input.
    func input(_ count: Int) -> [Double] { (0..<count).map { _ in rng.normal(2.5, 1.5) } }

    /// Random parameters, then `steps` training forwards and backwards: every array of the state differs from a
    /// fresh layer's, and the count of batches has moved.
    func trained<T: NormalizationScalar>(_ layer: NormalizationLayer<T>, shape: [Int], steps: Int = 3) throws {
        for c in layer.bnWeight.indices {
            layer.bnWeight[c] = T(Double.random(in: 0.5...1.5, using: &rng)); layer.bnBias[c] = T(rng.normal(0.3, 0.5))
        }
        for g in layer.weight.indices {
            layer.weight[g] = T(Double.random(in: 0.5...1.5, using: &rng)); layer.bias[g] = T(rng.normal(0.3, 0.5))
        }
        let count = shape.reduce(1, *)
        for _ in 0..<steps {
            _ = try layer.forward(input(count).map { T($0) }, shape: shape)
            _ = try layer.backward(input(count).map { T($0) })
        }
    }

    func layers<T: NormalizationScalar>(_: T.Type) throws -> [() throws -> NormalizationLayer<T>] {
        [{ try BatchChannelNorm<T>(channels: 8, groups: 4, estimate: true) },
         { try BatchChannelNorm<T>(channels: 8, groups: 2, momentum: nil, estimate: false) },
         { try BatchChannelNorm<T>(channels: 8, groups: 4, varianceCentre: .runningMean) },
         { try BatchNorm<T>(channels: 8) },
         { try EstimatedBatchNorm<T>(channels: 8) },
         { try ChannelNorm<T>(channels: 8, groups: 4) }]
    }

    func checkRoundTrip<T: NormalizationScalar>(_ type: T.Type) throws {
        let shape = [3, 8, 2, 3], count = shape.reduce(1, *), why = "seed \(Self.seed), \(T.self)"
        for make in try layers(T.self) {
            let source = try make(), target = try make()
            try trained(source, shape: shape)
            let state = source.state
            XCTAssertNotEqual(state, target.state, why)
            let decoded = try JSONDecoder().decode(NormalizationLayerState<T>.self,
                                                   from: JSONEncoder().encode(state))
            XCTAssertEqual(decoded, state, "JSON round trip, \(why)")
            try target.load(decoded)
            XCTAssertEqual(target.state, state, why)
            // the same outputs and buffers, training then eval, bit for bit
            for training in [true, false] {
                source.training = training; target.training = training
                let x = input(count).map { T($0) }, dy = input(count).map { T($0) }
                XCTAssertEqual(try target.forward(x, shape: shape), try source.forward(x, shape: shape), why)
                XCTAssertEqual(try target.backward(dy), try source.backward(dy), why)
                XCTAssertEqual(target.state, source.state, "after a forward, training \(training), \(why)")
            }
        }
    }

    func testAStateLoadedIntoAFreshLayerComputesTheSame() throws {
        try checkRoundTrip(Float.self)
        try checkRoundTrip(Double.self)
    }

    func testAStateIsACopy() throws {
        let layer = try BatchChannelNorm<Double>(channels: 4, groups: 2)
        let before = layer.state
        try trained(layer, shape: [2, 4, 3])
        XCTAssertEqual(before.runningMean, [0, 0, 0, 0])
        XCTAssertEqual(before.numBatchesTracked, 0)
        XCTAssertNotEqual(layer.state.runningMean, before.runningMean)
    }

    func testAStateThePlanCannotHoldIsRefusedAndChangesNothing() throws {
        let layer = try BatchChannelNorm<Float>(channels: 4, groups: 2)
        try trained(layer, shape: [2, 4, 3])
        let kept = layer.state
        var wrong: [(String, NormalizationLayerState<Float>, BCNError.Kind)] = []
        for (name, path) in [("bnWeight", \NormalizationLayerState<Float>.bnWeight), ("bnBias", \.bnBias),
                             ("runningMean", \.runningMean), ("runningVar", \.runningVar), ("weight", \.weight),
                             ("bias", \.bias)] {
            var state = kept
            state[keyPath: path].append(1.5)
            wrong.append((name, state, .shapeMismatch))
            state[keyPath: path] = []
            wrong.append((name, state, .shapeMismatch))
        }
        var negative = kept
        negative.numBatchesTracked = -1
        wrong.append(("numBatchesTracked", negative, .invalidArgument))
        for (name, state, kind) in wrong {
            XCTAssertThrowsError(try layer.load(state), name) { error in
                XCTAssertEqual((error as? BCNError)?.kind, kind, name)
                XCTAssertTrue((error as? BCNError)?.message.contains(name) ?? false, "\(error)")
            }
            XCTAssertEqual(layer.state, kept, name)
        }
        // A stage the plan does not have holds no values: a channel norm's state has no batch-norm arrays
        let channelNorm = try ChannelNorm<Float>(channels: 4, groups: 2)
        XCTAssertThrowsError(try channelNorm.load(kept)) { error in
            XCTAssertEqual((error as? BCNError)?.kind, .shapeMismatch)
        }
        XCTAssertEqual(channelNorm.state.runningMean, [])
    }
}
