//! Tuning of glibc's allocator for a long-running daemon whose memory comes in bursts.
//!
//! Mounting a layer parses its TOC (megabytes of short-lived strings) on whichever thread
//! serves the request. With glibc's default of up to 8 arenas per core, every such thread keeps
//! its own arena of freed-but-resident pages, and resident memory grows with each mount long
//! after the garbage is gone. Two arenas and a trim after each burst keep the daemon's resident
//! set close to what it actually holds (the inode tables). No-ops on other C libraries.

/// Limits glibc to two malloc arenas. Call once, early in `main`, before threads start.
pub fn limit_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; M_ARENA_MAX is valid on glibc.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
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
