import Synchronization
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// The number of worker threads bcnswift uses; 0 means the default: `BCNSWIFT_NUM_THREADS` if set, else all
/// cores.
///
/// Work is always cut into the same pieces whatever this number is (see `parallelFor`), so results are bitwise
/// identical for any thread count; only the wall time changes. A call uses at most `maximum` (256) threads, and
/// a larger count asked for is held (and reported) as that.
///
/// There are two settings: one for the process (`count`'s setter) and one per calling thread
/// (`callingThreadCount`), which overrides it for the calls that thread makes. The second is for a caller that
/// runs inside another thread pool: PyTorch's intra-op threads keep polling after each parallel operation, so
/// bcnswift's workers would compete with them for the same cores (see docs/PYTORCH.md). Such a caller can also
/// lend its pool's threads (`callingThreadTeam`, ThreadTeam.swift): then the count is its team's size.
public enum BCNThreads {
    /// The most threads a call uses: the caller and `WorkerPool.maxWorkers` workers. Every setting is clamped to it.
    public static let maximum = WorkerPool.maxWorkers + 1

    private static let requested = Atomic<Int>(0)
    private static let cores: Int = {
        let n = Int(sysconf(Int32(_SC_NPROCESSORS_ONLN)))
        return n > 0 ? n : 1
    }()
    /// Holds each thread's `callingThreadCount` as a pointer's bit pattern (nil: 0, no setting); nil when the
    /// process has no thread-specific key left (PTHREAD_KEYS_MAX), and then there is no per-thread setting.
    private static let callingThreadKey: pthread_key_t? = {
        var key = pthread_key_t()
        return pthread_key_create(&key, nil) == 0 ? key : nil
    }()

    /// Threads used by the next call from this thread: `callingThreadCount` when it is set, else the value set
    /// for the process, else `BCNSWIFT_NUM_THREADS`, else the core count. Setting it sets the process's value
    /// (0 restores the default).
    public static var count: Int {
        get {
            let local = callingThreadCount
            return local > 0 ? local : processCount
        }
        set { requested.store(min(max(0, newValue), maximum), ordering: .relaxed) }
    }

    /// The process's count, which a thread without its own setting uses: the value set, else
    /// `BCNSWIFT_NUM_THREADS`, else the core count.
    public static var processCount: Int {
        let n = requested.load(ordering: .relaxed)
        return n > 0 ? n : defaultCount
    }

    /// This thread's own thread count, which overrides the process's for the calls this thread makes; 0 (the
    /// default) means none. Other threads, including bcnswift's workers, never see it.
    ///
    /// It belongs to the OS thread, not to a Swift task: the cooperative pool runs other tasks on the same thread
    /// and may resume a task on another one. In async code set it only through `withCallingThreadCount` around
    /// synchronous work, which restores the thread's setting before any other task can run there.
    public static var callingThreadCount: Int {
        get { callingThreadKey.map { Int(bitPattern: pthread_getspecific($0)) } ?? 0 }
        set {
            guard let key = callingThreadKey else { return }  // see callingThreadKey
            _ = pthread_setspecific(key, UnsafeRawPointer(bitPattern: min(max(0, newValue), maximum)))
        }
    }

    /// Runs `body` with this thread's count set to `n` (0: none), then restores the setting it replaced. It throws
    /// what `body` throws, typed: a body of layer calls throws `BCNError`, as they do.
    public static func withCallingThreadCount<R, E: Error>(_ n: Int, _ body: () throws(E) -> R) throws(E) -> R {
        let saved = callingThreadCount
        callingThreadCount = n
        defer { callingThreadCount = saved }
        return try body()
    }

    /// Fixes this thread's count at the process's, when the thread has no count of its own, until `unpin`: a
    /// call sizes its per-thread scratch (`parallelSlots`) and then runs its loops (`parallelFor`) with the same
    /// count, however another thread changes the process's in between. (A count raised between the two handed
    /// out slots beyond the scratch: calls made while another thread toggled the count between 1 and 16 gave
    /// wrong results, 40 calls in 280.) Returns whether it pinned. Without a thread-specific key left
    /// (`callingThreadKey`) it cannot pin, and the count is read as it is.
    static func pin() -> Bool {
        guard callingThreadCount == 0 else { return false }
        callingThreadCount = processCount
        return true
    }

    /// Undoes `pin` (given what it returned).
    static func unpin(_ pinned: Bool) {
        if pinned { callingThreadCount = 0 }
    }

    /// `BCNSWIFT_NUM_THREADS` when it is a positive integer, else all online cores.
    public static let defaultCount: Int = {
        if let raw = getenv("BCNSWIFT_NUM_THREADS"), let n = Int(String(cString: raw)), n > 0 { return min(n, maximum) }
        return min(cores, maximum)
    }()
}

/// Below this many element visits a call runs on the calling thread: waking workers costs more than it saves.
let parallelThreshold = 1 << 16

/// How many threads `parallelFor(count, cost:)` may run `body` on: its slots are `0..<parallelSlots(count, cost:)`.
/// Sizes per-thread scratch before the call.
func parallelSlots(_ count: Int, cost: Int) -> Int {
    let threads = min(BCNThreads.count, max(count, 1))
    if threads <= 1 || count.multipliedReportingOverflow(by: max(cost, 1)).partialValue < parallelThreshold {
        return 1
    }
    return threads
}

/// Runs `body` over `0..<count`, cut into contiguous ranges, on up to `BCNThreads.count` threads.
///
/// Threads (the caller and `WorkerPool`'s workers) claim ranges from shared counters (the caller from the front,
/// a worker from the back: see `WorkerPool`), so a worker that wakes late simply takes fewer. `body` must make
/// each index's result depend on that index alone (write to its own slot); then the result is independent of
/// which thread ran which range, which is what makes the thread count invisible in the output. Its second
/// argument is the running thread's slot, below `parallelSlots(count, cost:)`: scratch indexed by it is private
/// to the range being run.
/// - Parameters:
///   - count: number of work items.
///   - cost: approximate element visits per item, used only to decide whether threads are worth waking.
func parallelFor(_ count: Int, cost: Int, _ body: (Range<Int>, Int) -> Void) {
    if count <= 0 { return }
    let threads = parallelSlots(count, cost: cost)
    if threads <= 1 {
        body(0..<count, 0)
        return
    }
    // About 8 ranges per thread, none under ~16K element visits.
    let grain = max(1, count / (threads * 8), (1 << 14) / max(cost, 1))
    if let team = BCNThreads.callingThreadTeam {
        runOnTeam(team, count: count, grain: grain, threads: threads, body)
        return
    }
    // The pool indexes in 32 bits; larger counts (far beyond any real tensor's planes) go in segments.
    var base = 0
    while base < count {
        let segment = min(count - base, 1 << 30)
        WorkerPool.shared.run(count: segment, grain: grain, threads: threads) { r, slot in
            body(base + r.lowerBound..<base + r.upperBound, slot)
        }
        base += segment
    }
}
