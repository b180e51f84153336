@testable import BCNSwift
import BCNSwiftC
import CBCNSwift
import Synchronization
import XCTest
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Calls of the team runners below, to see that a job really went to the team.
private let teamCalls = Atomic<Int>(0)

/// One thread's share of a team's parallel region.
private final class TeamMember {
    let fn: @convention(c) (UnsafeMutableRawPointer?) -> Void
    let data: UnsafeMutableRawPointer?
    init(_ fn: @convention(c) (UnsafeMutableRawPointer?) -> Void, _ data: UnsafeMutableRawPointer?) {
        self.fn = fn; self.data = data
    }
}

/// A parallel region as an OpenMP runtime runs one: fn(data) on the caller and on `threads - 1` new threads,
/// all joined before it returns.
private func runRegion(_ fn: @convention(c) (UnsafeMutableRawPointer?) -> Void, _ data: UnsafeMutableRawPointer?,
                       threads: Int) {
    teamCalls.add(1, ordering: .relaxed)
    var members: [pthread_t] = []
    for _ in 1..<max(threads, 1) {
        var thread = pthread_t()
        let member = Unmanaged.passRetained(TeamMember(fn, data)).toOpaque()
        let made = pthread_create(&thread, nil, { raw in
            let member = Unmanaged<TeamMember>.fromOpaque(raw!).takeRetainedValue()
            member.fn(member.data)
            return nil
        }, member)
        if made == 0 { members.append(thread) } else { Unmanaged<TeamMember>.fromOpaque(member).release() }
    }
    fn(data)
    for thread in members { pthread_join(thread, nil) }
}

/// `GOMP_parallel`'s contract: as many threads as asked.
private let exactTeam: BCNThreadTeam = { fn, data, threads, _ in runRegion(fn, data, threads: Int(threads)) }
/// More threads than asked: the extra ones must take no range (their slots would be out of bounds).
private let generousTeam: BCNThreadTeam = { fn, data, threads, _ in runRegion(fn, data, threads: Int(threads) + 3) }
/// A runtime in a nested region, which runs it on the caller alone.
private let soloTeam: BCNThreadTeam = { fn, data, _, _ in runRegion(fn, data, threads: 1) }
/// A runtime that runs the region on no thread at all: the caller must still do the work.
private let idleTeam: BCNThreadTeam = { _, _, _, _ in teamCalls.add(1, ordering: .relaxed) }

/// `parallelFor` on another runtime's team (`BCNThreads.callingThreadTeam`, `bcn_set_calling_thread_team`):
/// every index once, on slots below the call's count, and the same bits as bcnswift's own workers.
extension WorkerPoolTests {
    private func restoreThreads() {
        BCNThreads.callingThreadTeam = nil
        BCNThreads.count = 0
    }

    func testTeamVisitsEveryIndexOnceOnSlotsOfItsOwn() {
        defer { restoreThreads() }
        for team in [exactTeam, generousTeam, soloTeam, idleTeam] {
            BCNThreads.callingThreadTeam = team
            for threads in [2, 3, 8] {
                BCNThreads.count = threads
                let before = teamCalls.load(ordering: .relaxed)
                let counts = [1, 7, 1_000, 3_001]
                for count in counts { checkJob(count: count, cost: 1 << 12) }
                // one region per job large enough to run in parallel (the others run on the caller alone)
                let parallel = counts.filter { parallelSlots($0, cost: 1 << 12) > 1 }.count
                XCTAssertEqual(parallel, 2)
                XCTAssertEqual(teamCalls.load(ordering: .relaxed) - before, parallel, "threads \(threads)")
            }
        }
    }

    /// On a team of two, the calling thread claims ranges from the front and the other from the back, as on
    /// bcnswift's workers: the caller runs a prefix of the job, the team's other thread a suffix.
    func testTeamOfTwoSplitsAJobIntoTheCallersPrefixAndASuffix() {
        defer { restoreThreads() }
        BCNThreads.callingThreadTeam = exactTeam
        BCNThreads.count = 2
        checkCallerPrefixes(jobs: 200, pause: 20)  // the team's thread is made afresh for each region here
    }

    func testTeamIsTheCallingThreadsSettingAndTheABIReturnsThePrevious() {
        defer { restoreThreads() }
        XCTAssertNil(bcn_set_calling_thread_team(exactTeam))
        XCTAssertNotNil(BCNThreads.callingThreadTeam)
        let other = Thread { XCTAssertNil(BCNThreads.callingThreadTeam) }
        other.start()
        while !other.isFinished { usleep(100) }
        let previous = bcn_set_calling_thread_team(nil)
        XCTAssertNotNil(previous)
        XCTAssertNil(BCNThreads.callingThreadTeam)
    }

    func testResultsOnATeamEqualTheWorkersBitForBit() throws {
        defer { restoreThreads() }
        for (shape, groups) in [([4, 16, 64, 65], 4), ([64, 2048], 32), ([64, 256, 2, 2], 32)] {
            let C = shape[1]
            let x = (0..<shape.reduce(1, *)).map { Float(($0 * 37) % 101) * 0.03 + 0.5 }
            let dy = (0..<x.count).map { Float(($0 * 53) % 97) * 0.02 - 0.7 }
            var results: [[Float]] = []
            for team in [nil, exactTeam, generousTeam] {
                BCNThreads.count = 2
                BCNThreads.callingThreadTeam = team
                let before = teamCalls.load(ordering: .relaxed)
                let layer = try BatchChannelNorm<Float>(channels: C, groups: groups, estimate: false)
                let y = try layer.forward(x, shape: shape)
                let dx = try layer.backward(dy)
                if team != nil { XCTAssertGreaterThan(teamCalls.load(ordering: .relaxed), before, "\(shape)") }
                results.append(y + dx + layer.runningVar + layer.gradBnWeight + layer.gradWeight)
            }
            XCTAssertEqual(results[0], results[1], "\(shape)")
            XCTAssertEqual(results[0], results[2], "\(shape)")
        }
    }
}
