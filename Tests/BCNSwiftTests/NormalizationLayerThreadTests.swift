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
}
