import Synchronization
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// Another runtime's thread team, on which `parallelFor` can run its ranges instead of bcnswift's workers: a
/// function with the contract of `GOMP_parallel(fn, data, num_threads, flags)`, the entry point that libgomp,
/// LLVM's libomp and Intel's libiomp5 all export. It runs `fn(data)` on up to `num_threads` threads, the calling
/// thread among them, and returns once every one has returned.
///
/// Why: PyTorch's CPU operations run on an OpenMP team whose threads keep polling for a while after each
/// operation. bcnswift's own workers would compete with them for the same cores; the team's threads, still
/// polling after the convolution before, start on a kernel's ranges at once.
public typealias BCNThreadTeam = @convention(c) (
    @convention(c) (UnsafeMutableRawPointer?) -> Void, UnsafeMutableRawPointer?, UInt32, UInt32) -> Void

extension BCNThreads {
    /// Holds each thread's `callingThreadTeam` as a pointer; nil when the process has no thread-specific key
    /// left (then there is no team, and calls use bcnswift's workers).
    private static let callingThreadTeamKey: pthread_key_t? = {
        var key = pthread_key_t()
        return pthread_key_create(&key, nil) == 0 ? key : nil
    }()

    /// The team this thread's calls run their parallel work on (nil, the default: bcnswift's workers), with
    /// `count` threads. Other threads never see it.
    public static var callingThreadTeam: BCNThreadTeam? {
        get {
            guard let key = callingThreadTeamKey, let raw = pthread_getspecific(key) else { return nil }
            return unsafeBitCast(raw, to: BCNThreadTeam.self)
        }
        set {
            guard let key = callingThreadTeamKey else { return }
            _ = pthread_setspecific(key, newValue.map { unsafeBitCast($0, to: UnsafeRawPointer.self) })
        }
    }
}

/// One `parallelFor` on a team: its body, and the counters its threads claim ranges and slots from.
private final class TeamJob {
    let body: UnsafePointer<WorkerPool.Body>
    let count: Int, grain: Int, threads: Int, ranges: Int
    /// The thread that runs the job: the one the runtime's region returns to.
    let caller = pthread_self()
    /// Ranges claimed from the front (low 32 bits) and from the back (high 32 bits).
    let claimed = Atomic<UInt64>(0)
    let slots = Atomic<Int>(0)

    init(body: UnsafePointer<WorkerPool.Body>, count: Int, grain: Int, threads: Int) {
        self.body = body; self.count = count; self.grain = grain; self.threads = threads
        ranges = (count + grain - 1) / grain
    }

    /// The next range from the front (the calling thread) or from the back (the team's others), nil when none is
    /// left: as on bcnswift's workers (`WorkerPool`), each sweep of a call then gives the caller and another
    /// thread of a team of two about the same part of the tensor, still in that core's cache.
    func claim(fromBack: Bool) -> Range<Int>? {
        var s = claimed.load(ordering: .relaxed)
        while true {
            let front = Int(s & 0xffff_ffff), back = Int(s >> 32)
            if front + back >= ranges { return nil }
            let (exchanged, current) = claimed.compareExchange(expected: s, desired: s + (fromBack ? 1 << 32 : 1),
                                                               ordering: .relaxed)
            if exchanged {
                let start = (fromBack ? ranges - 1 - back : front) * grain
                return start..<min(start + grain, count)
            }
            s = current
        }
    }
}

/// What each thread of the team runs: take the next slot (so scratch indexed by it is private, whichever of the
/// runtime's threads arrive), then claim ranges until none are left, from the front on the calling thread and
/// from the back on the others. A thread beyond the slots asked for (a runtime that gave more than
/// `num_threads`) takes no range; the others take its share.
private let teamEntry: @convention(c) (UnsafeMutableRawPointer?) -> Void = { raw in
    guard let raw else { return }
    let job = Unmanaged<TeamJob>.fromOpaque(raw).takeUnretainedValue()
    let slot = job.slots.wrappingAdd(1, ordering: .relaxed).oldValue
    guard slot < job.threads else { return }
    let fromBack = pthread_equal(pthread_self(), job.caller) == 0
    while let range = job.claim(fromBack: fromBack) { job.body.pointee(range, slot) }
}

/// Runs `body` over `0..<count` in ranges of `grain` on `team` with up to `threads` threads. The runtime's
/// return is its barrier: every range its threads took has run, and its writes are visible. Whatever no thread
/// took (a runtime that ran `fn` on no thread at all) then runs here, on slot 0, which no thread holds any more.
func runOnTeam(_ team: BCNThreadTeam, count: Int, grain: Int, threads: Int, _ body: WorkerPool.Body) {
    withoutActuallyEscaping(body) { body in
        var held: WorkerPool.Body = body
        withUnsafePointer(to: &held) { pointer in
            let job = TeamJob(body: pointer, count: count, grain: grain, threads: threads)
            withExtendedLifetime(job) {
                team(teamEntry, Unmanaged.passUnretained(job).toOpaque(), UInt32(threads), 0)
                while let range = job.claim(fromBack: false) { body(range, 0) }
            }
        }
    }
}
