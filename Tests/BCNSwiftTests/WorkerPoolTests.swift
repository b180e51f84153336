@testable import BCNSwift
import BCNSwiftTestSupport
import Dispatch
import Foundation
import Synchronization
import XCTest

/// White-box tests of `parallelFor` on the worker pool: every index is visited exactly once, by back-to-back
/// jobs (workers still spinning), jobs after the workers went to sleep, and jobs from several threads at once
/// (one holds the pool, the others run alone). Run under `--sanitize=thread` too.
final class WorkerPoolTests: XCTestCase {
    var rng = SplitMix64(seed: 0x9001)

    /// Runs one job over `count` items and checks that each index was visited once, and that every range ran
    /// on a slot below `parallelSlots` that no other range held at the same time (per-thread scratch is safe).
    func checkJob(count: Int, cost: Int, file: StaticString = #filePath, line: UInt = #line) {
        let visits = UnsafeMutableBufferPointer<Int>.allocate(capacity: count)
        defer { visits.deallocate() }
        visits.initialize(repeating: 0)
        let slots = parallelSlots(count, cost: cost)
        let held = UnsafeMutablePointer<Atomic<Bool>>.allocate(capacity: slots)
        for i in 0..<slots { (held + i).initialize(to: Atomic(false)) }
        defer { held.deinitialize(count: slots); held.deallocate() }
        let clashes = Atomic<Int>(0)
        parallelFor(count, cost: cost) { range, slot in
            guard slot >= 0, slot < slots,
                  held[slot].compareExchange(expected: false, desired: true, ordering: .acquiringAndReleasing).exchanged
            else { clashes.add(1, ordering: .relaxed); return }
            for i in range { visits[i] += 1 }
            held[slot].store(false, ordering: .releasing)
        }
        XCTAssertEqual(clashes.load(ordering: .relaxed), 0, "slot out of range or shared", file: file, line: line)
        XCTAssertTrue(visits.allSatisfy { $0 == 1 }, "count \(count), cost \(cost)", file: file, line: line)
    }

    func testBackToBackJobsVisitEveryIndexOnce() {
        defer { BCNThreads.count = 0 }
        for threads in [2, 3, 16, 2] {  // the last after workers beyond its count exist (and sleep)
            BCNThreads.count = threads
            for _ in 0..<2_000 {
                checkJob(count: Int.random(in: 1...3_000, using: &rng), cost: 1 << 12)
            }
        }
    }

    /// With two threads the caller claims ranges from the front and the worker from the back, so each runs one
    /// contiguous part of the job (a prefix and a suffix), and two sweeps of a call over the same tensor give
    /// each thread about the same part: what keeps the first sweep's data in the second's cache.
    func testTwoThreadsSplitAJobIntoAPrefixAndASuffix() {
        defer { BCNThreads.count = 0 }
        BCNThreads.count = 2
        checkCallerPrefixes(jobs: 500)
    }

    /// Runs `jobs` jobs on the current threads and checks that the indices the calling thread ran form a prefix of
    /// each job and the other threads' a suffix, and that another thread ran some. `pause`: microseconds each range
    /// waits (time for threads that start late). On a loaded machine a worker may get no core for all of `jobs`
    /// short jobs, so until one has run a range the jobs go on, for up to 10 seconds.
    func checkCallerPrefixes(jobs: Int, pause: UInt32 = 0, file: StaticString = #filePath, line: UInt = #line) {
        let caller = pthread_self()
        var sawOther = false
        let deadline = DispatchTime.now().uptimeNanoseconds + 10_000_000_000
        var job = 0
        while job < jobs || (!sawOther && DispatchTime.now().uptimeNanoseconds < deadline) {
            defer { job += 1 }
            let count = 64 + job % 200
            let onCaller = UnsafeMutableBufferPointer<Int>.allocate(capacity: count)
            defer { onCaller.deallocate() }
            onCaller.initialize(repeating: -1)
            parallelFor(count, cost: 1 << 12) { range, _ in
                let mine = pthread_equal(pthread_self(), caller) != 0
                for i in range { onCaller[i] = mine ? 1 : 0 }
                if pause > 0 { usleep(pause) }
            }
            XCTAssertFalse(onCaller.contains(-1), "job \(job): an index was not visited", file: file, line: line)
            let split = onCaller.firstIndex { $0 != 1 } ?? count
            XCTAssertTrue(onCaller[split...].allSatisfy { $0 == 0 }, "job \(job): \(Array(onCaller))", file: file,
                          line: line)
            sawOther = sawOther || split < count
        }
        XCTAssertTrue(sawOther, "no other thread took a range", file: file, line: line)
    }

    func testJobsAfterWorkersSleep() {
        defer { BCNThreads.count = 0 }
        BCNThreads.count = 2
        for _ in 0..<5 {
            checkJob(count: 1_000, cost: 1 << 12)
            usleep(3_000)  // longer than the workers spin
        }
    }

    func testConcurrentSubmitters() {
        defer { BCNThreads.count = 0 }
        BCNThreads.count = 2
        let failures = Atomic<Int>(0)
        DispatchQueue.concurrentPerform(iterations: 4) { submitter in
            for job in 0..<500 {
                let count = 100 + (job * 37 + submitter * 11) % 900
                let visits = UnsafeMutableBufferPointer<Int>.allocate(capacity: count)
                visits.initialize(repeating: 0)
                parallelFor(count, cost: 1 << 12) { range, _ in
                    for i in range { visits[i] += 1 }
                }
                if !visits.allSatisfy({ $0 == 1 }) { failures.add(1, ordering: .relaxed) }
                visits.deallocate()
            }
        }
        XCTAssertEqual(failures.load(ordering: .relaxed), 0)
    }
}

extension WorkerPoolTests {
    /// A thread count far beyond the pool's cap still visits every index once (with at most 256 threads).
    func testHugeThreadCountIsCapped() {
        defer { BCNThreads.count = 0 }
        BCNThreads.count = 100_000
        XCTAssertEqual(BCNThreads.count, 256)  // held and reported as the cap
        BCNThreads.withCallingThreadCount(1_000) { XCTAssertEqual(BCNThreads.count, 256) }
        for _ in 0..<20 { checkJob(count: 50_000, cost: 1 << 12) }
        #if os(Linux)
        // 255 workers at most, plus this process's other threads (XCTest's, Dispatch's): far below 50,000.
        let threads = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/task").count) ?? 0
        XCTAssertGreaterThan(threads, 1)
        XCTAssertLessThanOrEqual(threads, 255 + 64)
        #endif
    }
}

extension WorkerPoolTests {
    /// A calling thread's own count overrides the process's for that thread alone, decides how many slots a
    /// job gets, and `withCallingThreadCount` restores the setting it replaced, also when the body throws.
    func testCallingThreadCountIsThisThreadsAlone() throws {
        struct Failure: Error {}
        defer { BCNThreads.count = 0; BCNThreads.callingThreadCount = 0 }
        BCNThreads.count = 2
        XCTAssertEqual(BCNThreads.callingThreadCount, 0)
        XCTAssertEqual(parallelSlots(1_000, cost: 1 << 12), 2)
        BCNThreads.withCallingThreadCount(1) {
            XCTAssertEqual(BCNThreads.count, 1)
            XCTAssertEqual(parallelSlots(1_000, cost: 1 << 12), 1)
            checkJob(count: 1_000, cost: 1 << 12)
            final class Seen: Sendable { let count = Atomic<Int>(-1) }
            let seen = Seen(), done = DispatchSemaphore(value: 0)
            Thread {  // another thread: the process's count
                seen.count.store(BCNThreads.count, ordering: .relaxed)
                done.signal()
            }.start()
            done.wait()
            XCTAssertEqual(seen.count.load(ordering: .relaxed), 2)
            BCNThreads.withCallingThreadCount(3) { XCTAssertEqual(BCNThreads.count, 3) }
            XCTAssertEqual(BCNThreads.count, 1)
        }
        XCTAssertEqual(BCNThreads.count, 2)
        XCTAssertThrowsError(try BCNThreads.withCallingThreadCount(1) { throw Failure() })
        XCTAssertEqual(BCNThreads.callingThreadCount, 0)
        // a body of layer calls throws BCNError, typed, as the calls do (with rethrows it became `any Error`, and
        // this `do throws(BCNError)` did not compile)
        do throws(BCNError) {
            let layer = try BatchChannelNorm<Float>(channels: 4, groups: 2)
            _ = try BCNThreads.withCallingThreadCount(2) { () throws(BCNError) -> [Float] in
                try layer.forward([1, 2, 3], shape: [1, 3])
            }
            XCTFail("three channels in a four-channel layer")
        } catch {
            XCTAssertEqual(error.kind, .shapeMismatch)
        }
        XCTAssertEqual(BCNThreads.callingThreadCount, 0)
        BCNThreads.callingThreadCount = -4  // negative: no setting
        XCTAssertEqual(BCNThreads.callingThreadCount, 0)
    }
}
