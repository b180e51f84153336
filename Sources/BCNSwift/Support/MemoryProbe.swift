#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// Throws `.outOfMemory` unless the system would map `bytes` bytes now.
///
/// Swift arrays and `allocate(capacity:)` stop the process when memory runs out, where every bcnswift call
/// promises an error instead; code about to make large ones asks here first. The answer is the kernel's, to an
/// anonymous mapping of that size, which is how malloc gets blocks this large: an address-space limit
/// (`ulimit -v`) or a size beyond the machine says no, but a kernel that overcommits may say yes and fail later,
/// when the pages are touched. (mmap, not malloc: LLVM removes a malloc whose block is only freed, and takes its
/// address for non-null.)
func requireMemory(_ bytes: Int, for what: @autoclosure () -> String) throws(BCNError) {
    guard bytes > 0 else { return }
    let region = mmap(nil, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
    guard let region, region != MAP_FAILED else {
        throw BCNError(.outOfMemory, "could not allocate \(bytes) bytes for \(what())")
    }
    munmap(region, bytes)
}

/// `requireMemory` for the arrays a call returns or keeps (an output, a gradient, a buffer's new array), each part
/// in bytes (`arrayBytes`), asked only from 16 MB up. The probe's two system calls cost 3-6 us: under 0.5% of a
/// call on that much data (a copy of 16 MB takes about 1.5 ms here), but 3-5% of a call on 1 MB. Below it, a
/// process without room for one more such block has little left to recover with.
func requireArrayMemory(_ parts: Int..., for what: @autoclosure () -> String) throws(BCNError) {
    var total = 0
    for part in parts {
        let (sum, overflow) = total.addingReportingOverflow(part)
        total = overflow ? .max : sum
    }
    if total >= 16 << 20 { try requireMemory(total, for: what()) }
}

/// Bytes of `count` values of type T, for `requireArrayMemory` (Int.max where that overflows: no system maps it).
func arrayBytes<T>(_ count: Int, of _: T.Type) -> Int {
    let (bytes, overflow) = count.multipliedReportingOverflow(by: MemoryLayout<T>.stride)
    return overflow ? .max : bytes
}
