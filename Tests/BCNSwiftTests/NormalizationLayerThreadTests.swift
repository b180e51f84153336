import BCNSwift
import BCNSwiftTestSupport
import Dispatch
import Synchronization
import XCTest

/// One layer shared by threads (which Swift 6's language mode refuses, but Swift 5's accepts without a word):
/// its calls take turns, so each computes what it would alone, and no update is lost. Before the turns, a fifth
/// of 1200 outputs came out wrong, counts of batches were lost, and a call could free the context another was
/// using.
final class NormalizationLayerThreadTests: XCTestCase {
    static let seed: UInt64 = 0x7A125

    func testThreadsSharingOneLayerTakeTurns() throws {
        var rng = SplitMix64(seed: Self.seed)
        let shape = [2, 16, 3, 3], count = 288, threads = 4, rounds = 150
        let x = (0..<count).map { _ in Float(rng.normal(1.5, 2)) }
        let dy = (0..<count).map { _ in Float(rng.normal(0.2, 1)) }
        // with batch statistics a training output depends on its input alone, not on the running buffers, so
        // every call's y and dx (all of the same x) must be the lone layer's
        let alone = try BatchChannelNorm<Float>(channels: 16, groups: 4, estimate: false)
        let y = try alone.forward(x, shape: shape), dx = try alone.backward(dy)
        let shared = try BatchChannelNorm<Float>(channels: 16, groups: 4, estimate: false)
        let wrong = Mutex((outputs: 0, errors: [String]()))
        nonisolated(unsafe) let layer = shared  // shared on purpose: what a Swift 5 caller can write
        DispatchQueue.concurrentPerform(iterations: threads) { _ in
            for _ in 0..<rounds {
                do throws(BCNError) {
                    let mine = try layer.forward(x, shape: shape), grad = try layer.backward(dy)
                    if mine != y || grad != dx { wrong.withLock { $0.outputs += 1 } }
                    if layer.state.runningMean.count != 16 { wrong.withLock { $0.outputs += 1 } }
                } catch {
                    wrong.withLock { $0.errors.append(error.message) }
                }
            }
        }
        wrong.withLock { result in
            XCTAssertEqual(result.outputs, 0, "seed \(Self.seed): outputs that differ from the lone layer's")
            XCTAssertEqual(result.errors, [], "seed \(Self.seed)")
        }
        XCTAssertEqual(shared.numBatchesTracked, Int64(threads * rounds), "a lost update of the count")
    }

    /// `state` and `load` take turns with the other calls too: a state taken while another thread trains is one
    /// the layer passed through (its running mean, variance and count from the same forward), and one taken while
    /// another thread loads two states in turn is one of them, never a mix.
    func testStateAndLoadTakeTurnsWithTheOtherCalls() throws {
        var rng = SplitMix64(seed: Self.seed)
        // many channels, so that a forward takes a while to copy its new running mean and variance back
        let C = 1 << 12, shape = [2, 1 << 12], steps = 40
        let x = (0..<(2 * C)).map { _ in Float(rng.normal(1.5, 2)) }
        let alone = try BatchNorm<Float>(channels: C)
        var states = [(alone.runningMean[C - 1], alone.runningVar[C - 1])]
        for _ in 0..<steps {
            _ = try alone.forward(x, shape: shape)
            states.append((alone.runningMean[C - 1], alone.runningVar[C - 1]))
        }
        let passed = states
        let trainedLayer = try BatchNorm<Float>(channels: C)
        let done = Atomic(false), torn = Mutex([String]())
        nonisolated(unsafe) let training = trainedLayer
        DispatchQueue.concurrentPerform(iterations: 2) { thread in
            if thread == 0 {
                for _ in 0..<steps { _ = try? training.forward(x, shape: shape) }
                done.store(true, ordering: .releasing)
                return
            }
            repeat {
                let state = training.state, k = Int(state.numBatchesTracked)
                guard k >= 0, k <= steps, state.runningMean[C - 1] == passed[k].0,
                      state.runningVar[C - 1] == passed[k].1 else {
                    torn.withLock { $0.append("count \(k): \(state.runningMean[C - 1]), \(state.runningVar[C - 1])") }
                    continue
                }
            } while !done.load(ordering: .acquiring)
        }
        torn.withLock { XCTAssertEqual($0, [], "seed \(Self.seed): states no forward left") }
        XCTAssertEqual(trainedLayer.numBatchesTracked, Int64(steps))

        // states of fresh arrays, loaded one after another while another thread takes the state: the k-th holds
        // k + 1 in every array and counts k batches; each load frees the arrays of the one before
        let large = 1 << 16, loads = 5000
        @Sendable func numbered(_ k: Int) -> NormalizationLayerState<Float> {
            func v() -> [Float] { [Float](repeating: Float(k + 1), count: large) }
            return NormalizationLayerState(bnWeight: v(), bnBias: v(), runningMean: v(), runningVar: v(),
                                           numBatchesTracked: Int64(k), weight: [], bias: [])
        }
        let loaded = try BatchNorm<Float>(channels: large)
        try loaded.load(numbered(0))
        let finished = Atomic(false), mixed = Atomic(0)
        nonisolated(unsafe) let layer = loaded
        DispatchQueue.concurrentPerform(iterations: 2) { thread in
            if thread == 0 {
                for k in 1..<loads { try? layer.load(numbered(k)) }
                finished.store(true, ordering: .releasing)
                return
            }
            repeat {
                let state = layer.state, v = Float(state.numBatchesTracked + 1)
                if state.bnWeight[0] != v || state.bnBias[0] != v || state.runningMean[0] != v
                    || state.runningVar[0] != v {
                    mixed.add(1, ordering: .relaxed)
                }
            } while !finished.load(ordering: .acquiring)
        }
        XCTAssertEqual(mixed.load(ordering: .relaxed), 0, "states that mix two loaded ones")
        XCTAssertEqual(loaded.state, numbered(loads - 1))
    }
}
