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

/// `requireMemory` for the arrays a call returns or keeps (an output, a gradient, a buffer's copy), asked only
/// from 1 MB up: malloc maps blocks that large itself, and an input that size can leave no room for its output.
/// Below that, a heap without room for one more small block leaves the process nothing to recover with, and two
/// system calls a call would weigh on small layers.
func requireArrayMemory(_ bytes: Int, for what: @autoclosure () -> String) throws(BCNError) {
    if bytes >= 1 << 20 { try requireMemory(bytes, for: what()) }
}
