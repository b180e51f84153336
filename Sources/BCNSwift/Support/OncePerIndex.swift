import Synchronization
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// Work done once per index inside a `parallelFor`, by the first thread that needs it: the per-sample constants
/// of a sweep whose work items are blocks of a sample's rows, computed in the sweep instead of in a parallel loop
/// of their own before it (a second hand-off, and a loop too short to split evenly between threads).
///
/// The first thread to ask for index i runs `prepare(i)`; a thread that asks while it runs waits for it, at most
/// one preparation. With two threads, which claim a loop's ranges from opposite ends, they meet in one sample at
/// most; more threads share the ends (the pool's even slots claim from the front, odd ones from the back; a
/// ThreadTeam's all but the caller from the back) and meet in more. A batch of one sample has all its items wait
/// for the first: as before, when its units' coefficients (too few to share out) ran on the calling thread before
/// the sweep. What `prepare` wrote is visible to every thread `ensure` returns to (release, then acquire). Which
/// thread prepares changes nothing it computes: results stay independent of the thread count.
struct OncePerIndex {
    private static let idle = 0, running = 1, done = 2
    private let states: UnsafeMutablePointer<Atomic<Int>>

    /// `count` indices, none prepared yet.
    init(count: Int, arena: inout ScratchArena) {
        let words = arena.take(count, of: Int.self)  // Atomic<Int> has Int's size and alignment
        states = UnsafeMutableRawPointer(words).bindMemory(to: Atomic<Int>.self, capacity: max(count, 1))
        for i in 0..<count { (states + i).initialize(to: Atomic(Self.idle)) }
    }

    /// Arena bytes of `init(count:arena:)`.
    static func bytes(count: Int) -> Int { ScratchArena.bytes(count, of: Int.self) }

    /// Returns once `prepare(i)` has run, running it here if no thread has begun it.
    @inline(__always)
    func ensure(_ i: Int, _ prepare: (Int) -> Void) {
        let state = states + i
        if state.pointee.load(ordering: .acquiring) == Self.done { return }
        if state.pointee.compareExchange(expected: Self.idle, desired: Self.running, ordering: .acquiring).exchanged {
            prepare(i)
            state.pointee.store(Self.done, ordering: .releasing)
            return
        }
        var polls = 0
        while state.pointee.load(ordering: .acquiring) != Self.done {
            polls &+= 1
            if polls & 1023 == 0 { sched_yield() }  // the preparing thread may have lost its core
        }
    }
}
