import BCNSwift
import CBCNSwift

/// Sets the process's worker threads for later calls; n <= 0 restores the default. Returns the process's count
/// now in force (a thread with its own setting keeps using that).
@_cdecl("bcn_set_num_threads")
public func bcn_set_num_threads(_ n: Int32) -> Int32 {
    BCNThreads.count = Int(max(n, 0))
    return Int32(clamping: BCNThreads.processCount)
}

/// The threads the calling thread's next call uses: its own setting if it has one, else the process's.
@_cdecl("bcn_get_num_threads")
public func bcn_get_num_threads() -> Int32 { Int32(clamping: BCNThreads.count) }

/// Sets the calling thread's own worker threads (n <= 0: none, back to the process's); returns the setting it
/// replaced, so that a caller can restore it.
@_cdecl("bcn_set_calling_thread_num_threads")
public func bcn_set_calling_thread_num_threads(_ n: Int32) -> Int32 {
    let previous = BCNThreads.callingThreadCount
    BCNThreads.callingThreadCount = Int(max(n, 0))
    return Int32(clamping: previous)
}

/// BCN_ABI_VERSION of this library (bcnswift.h).
@_cdecl("bcn_abi_version")
public func bcn_abi_version() -> Int32 { BCN_ABI_VERSION }

/// Sets the team the calling thread's later calls run their parallel work on (nil: bcnswift's own workers);
/// returns the team it replaced, so that a caller can restore it.
@_cdecl("bcn_set_calling_thread_team")
public func bcn_set_calling_thread_team(_ team: BCNThreadTeam?) -> BCNThreadTeam? {
    let previous = BCNThreads.callingThreadTeam
    BCNThreads.callingThreadTeam = team
    return previous
}
