//! How the process asks glibc's allocator to give memory back.
//!
//! Each scrypt run (`auth::token::hash_secret`) allocates one 16 MiB buffer. glibc serves
//! blocks that large with `mmap` and unmaps them when freed, but only until the first such
//! free: then it raises its threshold above the block, and later buffers come from the
//! freeing thread's arena, where they stay resident. Tokio's blocking threads each get an
//! arena of their own, so a process that had checked a few dozen new tokens kept 200 MiB
//! or more. A fixed threshold turns that raise off: every buffer of 1 MiB or more is
//! mapped for its run and returned to the system when it ends (the page faults cost about
//! a tenth of the hash itself).

/// Blocks at least this large are mapped on their own and unmapped when freed.
pub const MMAP_THRESHOLD: usize = 1024 * 1024;

/// Sets the allocator's fixed threshold. Call it once, first thing in `main`, before other
/// threads allocate. Elsewhere than glibc it does nothing.
pub fn return_large_blocks() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let threshold = libc::c_int::try_from(MMAP_THRESHOLD).unwrap_or(libc::c_int::MAX);
        // SAFETY: mallopt only changes the allocator's parameters; glibc documents it as
        // safe to call at any time, and it takes no pointers.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, threshold);
        }
    }
}
