//! Tuning of glibc's allocator for a long-running daemon whose memory comes in bursts.
//!
//! Mounting a layer parses its TOC (megabytes of short-lived strings) on whichever thread
//! serves the request. With glibc's default of up to 8 arenas per core, every such thread keeps
//! its own arena of freed-but-resident pages, and resident memory grows with each mount long
//! after the garbage is gone. Two arenas and a trim after each burst keep the daemon's resident
//! set close to what it actually holds (the inode tables).
//!
//! The mmap threshold is fixed as well: glibc raises it dynamically up to 32 MiB whenever a
//! large block is freed, after which large zeroed buffers (each FUSE thread's 16 MiB request
//! buffer) come from the heap and are memset, i.e. become resident; measured, that was 86 MiB
//! of a 100 MiB peak. With a fixed threshold they stay untouched mappings, resident only as far
//! as requests fill them. No-ops on other C libraries.

/// Largest allocation served from the heap; bigger ones are their own mappings.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: libc::c_int = 256 << 10;

/// Two malloc arenas and a fixed mmap threshold. Call once, early in `main`, before threads start.
pub fn tune() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; both are valid on glibc.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
    }
}

/// Returns free heap pages to the kernel (after a burst of short-lived allocations).
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases memory the allocator already considers free.
    unsafe {
        libc::malloc_trim(0);
    }
}
