import Synchronization
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// The scratch memory of one engine call: a single block, sized up front and carved into typed regions.
///
/// A call adds up what it needs (O(B·C) numbers plus a small block per thread), takes one block, and hands out
/// regions from it in order; nothing else is allocated while it computes. A phase's own regions go back when it
/// ends (`phase`), for the next phase of the call to reuse. The block goes back to a one-slot cache when
/// the call ends, so a stream of calls on similar shapes allocates nothing at all. A block larger than
/// `cacheLimit` bytes is freed instead of cached, so one huge call does not pin its scratch.
struct ScratchArena: ~Copyable {
    /// Bytes a cached block may hold at most.
    static let cacheLimit = 16 << 20

    private static let cached = Atomic<Int>(0)  // address of a block (its first 8 bytes: its size), or 0
    private static let alignment = 64

    private let block: UnsafeMutableRawPointer
    private let capacity: Int
    /// What the call reserved (its bytes, plus the first line): debug builds hold its regions to it, whatever the
    /// capacity of the block (a cached block may be larger, and would hide a region the sizing left out).
    private let reserved: Int
    private var used: Int
    /// Regions that did not fit the block (a sizing mistake: debug builds stop at it, release builds stay safe).
    private var overflow: [UnsafeMutableRawPointer] = []

    /// A block of at least `bytes` bytes (plus room to align each region).
    /// - Throws: `.outOfMemory` when the block cannot be allocated: before the call writes anything, as every
    ///   failure (`UnsafeMutableRawPointer.allocate` would stop the process instead).
    init(bytes: Int) throws(BCNError) {
        let (need, overflow) = bytes.addingReportingOverflow(Self.alignment)
        let taken = Self.cached.exchange(0, ordering: .acquiringAndReleasing)
        if !overflow, taken != 0, let block = UnsafeMutableRawPointer(bitPattern: taken),
           block.load(as: Int.self) >= need {
            self.block = block
            capacity = block.load(as: Int.self)
        } else {
            if taken != 0 { free(UnsafeMutableRawPointer(bitPattern: taken)) }
            let size = max(need, 4096)
            var memory: UnsafeMutableRawPointer?
            guard !overflow, posix_memalign(&memory, Self.alignment, size) == 0, let memory else {
                throw BCNError(.outOfMemory, "could not allocate \(bytes) bytes of scratch memory for this call")
            }
            block = memory
            block.storeBytes(of: size, as: Int.self)
            capacity = size
        }
        used = Self.alignment  // the first line holds the size
        reserved = need
    }

    deinit {
        for region in overflow { region.deallocate() }
        if capacity <= Self.cacheLimit,
           Self.cached.compareExchange(expected: 0, desired: Int(bitPattern: block),
                                       ordering: .acquiringAndReleasing).exchanged {
            return
        }
        free(block)
    }

    /// Bytes to reserve for `count` values of `T`, rounded up to the alignment of every region.
    static func bytes<T>(_ count: Int, of _: T.Type) -> Int {
        (count * MemoryLayout<T>.stride + alignment - 1) / alignment * alignment
    }

    /// Runs one phase of the call on this arena, then hands back every region the phase took, for the next
    /// phase to reuse: a call's phases run one after another, and what one leaves for the next lies in regions
    /// taken before it.
    mutating func phase(_ body: (inout ScratchArena) -> Void) {
        let start = used
        body(&self)
        used = start
    }

    /// The next `count` values of `T`, uninitialized, 64-byte aligned. A region beyond the size reserved up
    /// front trips an assertion in debug builds, where the tests run, even when the block (a larger one from the
    /// cache) has room; one beyond the block gets memory of its own.
    mutating func take<T>(_ count: Int, of _: T.Type) -> UnsafeMutablePointer<T> {
        let size = Self.bytes(count, of: T.self)
        assert(used + size <= reserved, "ScratchArena: regions exceed the size reserved up front")
        guard used + size <= capacity else {
            let region = UnsafeMutableRawPointer.allocate(byteCount: max(size, 1), alignment: Self.alignment)
            overflow.append(region)
            return region.bindMemory(to: T.self, capacity: max(count, 1))
        }
        let region = (block + used).bindMemory(to: T.self, capacity: max(count, 1))
        used += size
        return region
    }
}
