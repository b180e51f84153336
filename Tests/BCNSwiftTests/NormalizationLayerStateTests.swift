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

    /// Every value's bits (widened exactly to Double): equal where IEEE equality would also take -0 for +0.
    func bits<T: NormalizationScalar>(_ values: [T]) -> [UInt64] { values.map { Double($0).bitPattern } }

    func bits<T: NormalizationScalar>(_ s: NormalizationLayerState<T>) -> [[UInt64]] {
        [bits(s.bnWeight), bits(s.bnBias), bits(s.runningMean), bits(s.runningVar), [UInt64(s.numBatchesTracked)],
         bits(s.weight), bits(s.bias)]
    }

    func gradients<T: NormalizationScalar>(_ layer: NormalizationLayer<T>) -> [[UInt64]] {
        [bits(layer.gradBnWeight), bits(layer.gradBnBias), bits(layer.gradWeight), bits(layer.gradBias)]
    }

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
            XCTAssertEqual(bits(decoded), bits(state), "JSON round trip, \(why)")
            try target.load(decoded)
            XCTAssertEqual(bits(target.state), bits(state), why)
            target.zeroGradients(); source.zeroGradients()
            // the same outputs, gradients and buffers, training then eval, bit for bit
            for training in [true, false] {
                source.training = training; target.training = training
                let x = input(count).map { T($0) }, dy = input(count).map { T($0) }
                XCTAssertEqual(bits(try target.forward(x, shape: shape)), bits(try source.forward(x, shape: shape)),
                               why)
                XCTAssertEqual(bits(try target.backward(dy)), bits(try source.backward(dy)), why)
                XCTAssertEqual(gradients(target), gradients(source), why)
                XCTAssertEqual(bits(target.state), bits(source.state), "after a forward, training \(training), \(why)")
            }
        }
    }

    func testAStateLoadedIntoAFreshLayerComputesTheSame() throws {
        try checkRoundTrip(Float.self)
        try checkRoundTrip(Double.self)
    }

    /// A state taken before more training brings the layer back to where it was: the same buffers, and the same
    /// outputs as a fresh layer loaded with it.
    func testLoadingAnEarlierStateUndoesLaterTraining() throws {
        let shape = [2, 4, 3], layer = try BatchChannelNorm<Double>(channels: 4, groups: 2)
        try trained(layer, shape: shape)
        let earlier = layer.state
        try trained(layer, shape: shape, steps: 2)
        XCTAssertNotEqual(bits(layer.state), bits(earlier))
        try layer.load(earlier)
        XCTAssertEqual(bits(layer.state), bits(earlier), "seed \(Self.seed)")
        let fresh = try BatchChannelNorm<Double>(channels: 4, groups: 2)
        try fresh.load(earlier)
        let x = input(24)
        XCTAssertEqual(bits(try layer.forward(x, shape: shape)), bits(try fresh.forward(x, shape: shape)))
        XCTAssertEqual(bits(layer.state), bits(fresh.state))
    }

    /// `load` between a forward and its backward: the backward differentiates that forward, with the parameters
    /// it used, as a layer that loaded nothing does; the loaded parameters serve the next forward.
    func testABackwardAfterALoadDifferentiatesTheForwardBeforeIt() throws {
        let shape = [3, 8, 5], count = 120
        let layer = try BatchChannelNorm<Float>(channels: 8, groups: 4)
        let twin = try BatchChannelNorm<Float>(channels: 8, groups: 4)
        try trained(layer, shape: shape)
        try twin.load(layer.state)
        let other = try BatchChannelNorm<Float>(channels: 8, groups: 4)
        try trained(other, shape: shape)
        layer.zeroGradients()
        let x = input(count).map { Float($0) }, dy = input(count).map { Float($0) }
        _ = try layer.forward(x, shape: shape)
        _ = try twin.forward(x, shape: shape)
        try layer.load(other.state)
        XCTAssertEqual(bits(try layer.backward(dy)), bits(try twin.backward(dy)), "seed \(Self.seed)")
        XCTAssertEqual(gradients(layer), gradients(twin))
        XCTAssertEqual(bits(layer.state), bits(other.state))
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
        // A cumulative average (momentum nil) advances the count, so it must stay below 2^63 - 1; a momentum
        // keeps a count there as it is
        let cumulative = try BatchChannelNorm<Float>(channels: 4, groups: 2, momentum: nil)
        var full = cumulative.state
        full.numBatchesTracked = .max
        XCTAssertThrowsError(try cumulative.load(full)) { error in
            XCTAssertEqual((error as? BCNError)?.message, "numBatchesTracked must count batches (0 to 2^63 - 2 for a "
                           + "cumulative average), got 9223372036854775807")
        }
        XCTAssertEqual(cumulative.numBatchesTracked, 0)
        full.bnWeight = kept.bnWeight
        try layer.load(full)
        XCTAssertEqual(layer.numBatchesTracked, .max)
        try layer.load(kept)
        // A stage the plan does not have holds no values: a channel norm's state has no batch-norm arrays
        let channelNorm = try ChannelNorm<Float>(channels: 4, groups: 2)
        XCTAssertThrowsError(try channelNorm.load(kept)) { error in
            XCTAssertEqual((error as? BCNError)?.kind, .shapeMismatch)
        }
        XCTAssertEqual(channelNorm.state.runningMean, [])
    }

    /// Only a cumulative average (momentum nil) advances the count a training forward weighs by, so only its count
    /// must stay below 2^63 - 1: a layer with a momentum, or without a batch-norm stage, loads 2^63 - 1.
    func testOnlyACumulativeAverageRefusesTheLargestCount() throws {
        let layers: [(NormalizationLayer<Float>, Bool)] = [
            (try ChannelNorm<Float>(channels: 4, groups: 2), false),
            (try BatchNorm<Float>(channels: 4), false),
            (try BatchNorm<Float>(channels: 4, momentum: nil), true),
            (try BatchChannelNorm<Float>(channels: 4, groups: 2, momentum: nil, estimate: false), true),
        ]
        for (layer, cumulative) in layers {
            try trained(layer, shape: [2, 4, 3], steps: 1)
            var state = layer.state
            state.numBatchesTracked = .max
            if cumulative {
                XCTAssertThrowsError(try layer.load(state), "\(layer.plan)") { error in
                    XCTAssertEqual((error as? BCNError)?.kind, .invalidArgument)
                }
                state.numBatchesTracked = .max - 1
            }
            try layer.load(state)
            XCTAssertEqual(bits(layer.state), bits(state), "\(layer.plan)")
        }
    }
}
