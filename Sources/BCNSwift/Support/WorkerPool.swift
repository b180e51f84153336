import Synchronization
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// Persistent worker threads that join a `parallelFor` within a microsecond or two.
///
/// A forward pass has two parallel sweeps a few microseconds apart, and a training step calls it many times a
/// second; waking a sleeping thread costs ~5-10 µs each time, which on a 60 µs sweep is most of what a second
/// thread could save. So workers spin for `spinNanoseconds` after each job (only as many as there are spare
/// cores) before sleeping, each on its own condition variable so that a job wakes only the workers it uses.
///
/// Protocol (all atomics sequentially consistent):
/// - `state` packs a generation (high 32 bits) and the ranges claimed so far (low 32): from the front (low 16
///   bits) and from the back (the next 16). An odd generation means the job description is being written; an
///   even one publishes it.
/// - A worker increments `inFlight` before it reads the description or claims anything and decrements it when
///   done; it claims ranges by compare-and-swap on `state`, which fails once the generation has moved on.
/// - The caller and the even workers claim from the front, the odd workers from the back. With two threads each
///   runs about the same part of a job's ranges every time, so a call's second sweep over a tensor (a forward's
///   normalization after its moments, a backward's dx after its sums) finds the part it reads in its own core's
///   cache, as the first sweep left it. With one counter, whichever thread came first took the next range, and
///   the two sweeps split the tensor differently: two threads, forward+backward, [2, 512, 28, 28] ran 1.28x and
///   [8, 32, 32, 32] 1.15x the time they take now, eval [2, 512, 28, 28] 1.22x.
/// - The submitting thread claims ranges too; once none are left it waits for `inFlight == 0`. Then no worker
///   is running a range or can claim one, and the caller's closure (on its stack) may go away.
/// One job runs at a time: a caller that finds the pool busy (another thread's call, or a nested one) runs its
/// work on its own thread, which on a machine whose cores are already taken is the right thing anyway.
final class WorkerPool: @unchecked Sendable {
    static let shared = WorkerPool()

    /// How long an idle worker keeps polling for the next job before it sleeps.
    static let spinNanoseconds = 200_000

    /// The most workers a job uses (so at most 256 threads with the caller), whatever thread count was asked:
    /// more would only cost memory and thread creation, as results do not depend on the count.
    static let maxWorkers = 255

    /// A job's work on one range; the second argument is the slot of the thread running it: 0 for the caller,
    /// 1 + the worker's id for a worker, so always below the job's thread count (per-thread scratch).
    typealias Body = (Range<Int>, Int) -> Void

    /// Where one worker sleeps: its own condition variable, so a job wakes only the workers it may use (after
    /// `set_num_threads(16)` then `(2)`, the fourteen others stay asleep).
    final class Sleeper: @unchecked Sendable {
        let id: Int
        let sleeping = Atomic<Bool>(false)
        let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
        let wake = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)
        init(id: Int) {
            self.id = id
            pthread_mutex_init(mutex, nil)
            pthread_cond_init(wake, nil)
        }
    }

    private let state = Atomic<UInt64>(0)
    private let inFlight = Atomic<Int>(0)
    private let busy = Atomic<Bool>(false)
    private var workers: [Sleeper] = []  // touched only by the thread holding `busy`
    private let cores: Int
    // The job description, valid while the generation is even and unchanged.
    private let jobBody = Atomic<Int>(0)     // address of a `Body` on the submitting thread's stack
    private let jobCount = Atomic<Int>(0)
    private let jobGrain = Atomic<Int>(0)
    private let jobRanges = Atomic<Int>(0)
    private let jobWorkers = Atomic<Int>(0)  // workers 0..<jobWorkers may join

    private init() {
        let n = Int(sysconf(Int32(_SC_NPROCESSORS_ONLN)))
        cores = n > 0 ? n : 1
        // A forked child has none of the parent's threads: start from an empty pool there.
        pthread_atfork(nil, nil, { WorkerPool.shared.resetAfterFork() })
    }

    private func resetAfterFork() {
        workers = []  // their threads did not survive the fork; their sleepers are never touched again
        inFlight.store(0, ordering: .sequentiallyConsistent)
        busy.store(false, ordering: .sequentiallyConsistent)
    }

    /// Runs `body` over `0..<count` in ranges of `grain` on the calling thread and up to `threads - 1` workers.
    /// `count` must be below 2³¹; a grain that would make more than 65535 ranges (the counters' width) is widened.
    func run(count: Int, grain: Int, threads: Int, _ body: Body) {
        let grain = max(grain, (count + 0xfffe) / 0xffff), ranges = (count + grain - 1) / grain
        guard busy.compareExchange(expected: false, desired: true, ordering: .sequentiallyConsistent).exchanged
        else {
            var i = 0
            while i < count { body(i..<min(i + grain, count), 0); i += grain }
            return
        }
        defer { busy.store(false, ordering: .sequentiallyConsistent) }
        let helpers = min(threads - 1, Self.maxWorkers)
        while workers.count < helpers { spawn(Sleeper(id: workers.count)) }

        withoutActuallyEscaping(body) { body in
            var job: Body = body
            withUnsafeMutablePointer(to: &job) { job in
                let generation = UInt64(self.generation() & ~1)
                state.store((generation &+ 1) << 32, ordering: .sequentiallyConsistent)  // writing
                jobBody.store(Int(bitPattern: job), ordering: .sequentiallyConsistent)
                jobCount.store(count, ordering: .sequentiallyConsistent)
                jobGrain.store(grain, ordering: .sequentiallyConsistent)
                jobRanges.store(ranges, ordering: .sequentiallyConsistent)
                jobWorkers.store(helpers, ordering: .sequentiallyConsistent)
                let published = UInt32(truncatingIfNeeded: generation &+ 2)
                state.store(UInt64(published) << 32, ordering: .sequentiallyConsistent)
                // A worker sets `sleeping` before its last look at `state`, and this reads it after the
                // store above: either the worker saw the new generation or it is woken here.
                for sleeper in workers[..<helpers] where sleeper.sleeping.load(ordering: .sequentiallyConsistent) {
                    pthread_mutex_lock(sleeper.mutex)
                    pthread_cond_signal(sleeper.wake)
                    pthread_mutex_unlock(sleeper.mutex)
                }
                claimAndRun(generation: published, count: count, grain: grain, ranges: ranges, slot: 0, body: job)
                while inFlight.load(ordering: .sequentiallyConsistent) != 0 {}
            }
        }
    }

    /// Claims ranges of the job of `generation` until none are left or the generation has moved on: from the
    /// front on an even slot, from the back on an odd one (see the protocol above).
    private func claimAndRun(generation: UInt32, count: Int, grain: Int, ranges: Int, slot: Int,
                             body: UnsafePointer<Body>) {
        let fromBack = slot & 1 == 1, step: UInt64 = fromBack ? 1 << 16 : 1
        var s = state.load(ordering: .sequentiallyConsistent)
        while UInt32(truncatingIfNeeded: s >> 32) == generation {
            let front = Int(s & 0xffff), back = Int(s >> 16 & 0xffff)
            if front + back >= ranges { return }
            let (exchanged, current) = state.compareExchange(expected: s, desired: s + step,
                                                             ordering: .sequentiallyConsistent)
            if exchanged {
                let start = (fromBack ? ranges - 1 - back : front) * grain
                body.pointee(start..<min(start + grain, count), slot)
                s = state.load(ordering: .sequentiallyConsistent)
            } else {
                s = current
            }
        }
    }

    private func spawn(_ sleeper: Sleeper) {
        workers.append(sleeper)
        var attributes = pthread_attr_t()
        pthread_attr_init(&attributes)
        pthread_attr_setdetachstate(&attributes, Int32(PTHREAD_CREATE_DETACHED))
        var thread = pthread_t()
        // If no thread can be made, jobs still complete: the caller claims whatever no worker takes.
        _ = pthread_create(&thread, &attributes, { argument in
            let sleeper = Unmanaged<Sleeper>.fromOpaque(argument!).takeRetainedValue()
            WorkerPool.shared.work(sleeper)  // never returns
        }, Unmanaged.passRetained(sleeper).toOpaque())
        pthread_attr_destroy(&attributes)
    }

    private static func now() -> Int {
        var t = timespec()
        clock_gettime(CLOCK_MONOTONIC, &t)
        return t.tv_sec * 1_000_000_000 + t.tv_nsec
    }

    /// The generation in `state` now.
    private func generation() -> UInt32 {
        UInt32(truncatingIfNeeded: state.load(ordering: .sequentiallyConsistent) >> 32)
    }

    /// Waits until a job newer than `seen` is published (an even generation other than `seen`) and returns its
    /// generation: polling first if this worker may spin, then asleep on its own condition variable.
    private func waitForJob(after seen: UInt32, _ sleeper: Sleeper, spins: Bool) -> UInt32 {
        func published(_ g: UInt32) -> Bool { g != seen && g & 1 == 0 }
        var current = generation()
        if published(current) { return current }
        if spins {
            var deadline = 0, polls = 0
            while !published(current) {
                polls &+= 1
                if polls & 255 == 0 {
                    let t = Self.now()
                    if deadline == 0 { deadline = t + Self.spinNanoseconds } else if t > deadline { break }
                }
                current = generation()
            }
            if published(current) { return current }
        }
        pthread_mutex_lock(sleeper.mutex)
        sleeper.sleeping.store(true, ordering: .sequentiallyConsistent)
        current = generation()
        while !published(current) {
            pthread_cond_wait(sleeper.wake, sleeper.mutex)
            current = generation()
        }
        sleeper.sleeping.store(false, ordering: .sequentiallyConsistent)
        pthread_mutex_unlock(sleeper.mutex)
        return current
    }

    private func work(_ sleeper: Sleeper) -> Never {
        let id = sleeper.id
        // Workers beyond the spare cores would only steal time from the ones doing work: they never spin.
        let spins = id + 2 <= cores
        var seen = generation() & ~1
        while true {
            let generation = waitForJob(after: seen, sleeper, spins: spins)
            seen = generation
            inFlight.add(1, ordering: .sequentiallyConsistent)
            // The description is read only if the generation is still the one seen after `inFlight` went up:
            // the submitter cannot be rewriting it then (it waits for inFlight == 0 before its next job).
            let body = jobBody.load(ordering: .sequentiallyConsistent)
            let count = jobCount.load(ordering: .sequentiallyConsistent)
            let grain = jobGrain.load(ordering: .sequentiallyConsistent)
            let ranges = jobRanges.load(ordering: .sequentiallyConsistent)
            let allowed = jobWorkers.load(ordering: .sequentiallyConsistent)
            if self.generation() == generation && id < allowed, let job = UnsafePointer<Body>(bitPattern: body) {
                claimAndRun(generation: generation, count: count, grain: grain, ranges: ranges, slot: id + 1,
                            body: job)
            }
            inFlight.subtract(1, ordering: .sequentiallyConsistent)
        }
    }
}
