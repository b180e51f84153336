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
