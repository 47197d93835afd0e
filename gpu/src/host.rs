//! The host allocator: giving back the free memory it keeps.

/// Asks the C allocator to return the free memory it keeps to the system, and says whether it
/// released any. On glibc this is `malloc_trim(0)`: it walks every arena and releases each
/// whole free page (with `madvise`), not only the top of each heap. Elsewhere (musl, other
/// systems) there is nothing to ask: `false`.
///
/// Why a node needs it: glibc keeps what a thread frees in that thread's arena and, on its
/// own, gives back only the top of each heap. A burst of deltas (each received frame's
/// payload copied, each window gathered, all freed once applied) leaves the burst's
/// high-water mark resident, interleaved with the tables and other live allocations.
///
/// The call locks each arena while it walks it, so callers run it when the process is quiet
/// and off the async runtime.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn release_free_memory() -> bool {
    // SAFETY: `malloc_trim` takes no pointer and has no precondition; glibc serialises it with
    // every other allocator call through the arenas' own locks.
    unsafe { libc::malloc_trim(0) == 1 }
}

/// See the glibc version: no such call here.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn release_free_memory() -> bool {
    false
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    use super::*;

    #[test]
    fn memory_freed_between_live_allocations_is_given_back() {
        // 64 MiB in 16 KiB blocks (below glibc's mmap threshold, so on a heap), each followed by
        // a small block that stays: freeing the large ones leaves free pages the heap's top
        // cannot return on its own.
        let mut large = Vec::new();
        let mut small = Vec::new();
        for i in 0..4096u32 {
            let mut block = vec![0u8; 16 << 10];
            block[0] = i as u8;
            large.push(block);
            small.push(vec![i as u8; 64]);
        }
        drop(std::hint::black_box(large));
        assert!(release_free_memory(), "nothing was released");
        drop(std::hint::black_box(small));
    }
}
