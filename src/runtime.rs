//! Process-level tuning for long CPU runs.
//!
//! A training step allocates and frees many tensors of tens to hundreds of MiB (activations,
//! gradients, the `[vocab, hidden]` embedding gradient). glibc serves every allocation above
//! its mmap threshold (at most 32 MiB) with a fresh `mmap` and gives it back with `munmap`
//! on free, so each step pays for zeroing new pages, page faults and cross-core TLB
//! shoot-downs: about 30% of the `perf` samples of the benchmark student's steps (docs/benchmarks.md).
//! [`keep_freed_memory`] tells glibc to serve large blocks from the heap and not to return
//! freed memory to the system, so the next step reuses the same pages. Peak resident memory
//! is unchanged in kind (it is the high-water mark of live tensors); measurements are in
//! docs/benchmarks.md.

/// Makes glibc malloc keep freed memory for reuse instead of unmapping it (see the module
/// docs). Call once at the start of `main`, before other threads start. Returns whether the
/// settings were applied: always false on targets other than Linux with glibc, and when the
/// environment variable `FIRSTKD_SYSTEM_MALLOC` is set (to compare, or to let `MALLOC_*_`
/// variables decide).
pub fn keep_freed_memory() -> bool {
    wanted(std::env::var_os("FIRSTKD_SYSTEM_MALLOC").as_deref()) && tune()
}

/// Whether to tune, given the value of `FIRSTKD_SYSTEM_MALLOC` (set at all = no).
fn wanted(system_malloc: Option<&std::ffi::OsStr>) -> bool {
    system_malloc.is_none()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn tune() -> bool {
    // SAFETY: mallopt only changes glibc's allocator parameters; it takes the arena lock
    // itself and is documented as callable at any time.
    unsafe {
        // No mmap-served blocks: large tensors come from the heap and are reused.
        let no_mmap = libc::mallopt(libc::M_MMAP_MAX, 0) == 1;
        // Never trim the heap top back to the system between steps.
        let no_trim = libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX) == 1;
        no_mmap && no_trim
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune() -> bool {
    false
}

#[cfg(test)]
mod tests {
    #[test]
    fn firstkd_system_malloc_opts_out() {
        assert!(super::wanted(None));
        assert!(!super::wanted(Some(std::ffi::OsStr::new("1"))));
        assert!(!super::wanted(Some(std::ffi::OsStr::new(""))));
    }

    #[test]
    fn tuning_applies_on_glibc_and_large_blocks_still_work() {
        let applied = super::tune();
        assert_eq!(
            applied,
            cfg!(all(target_os = "linux", target_env = "gnu")),
            "mallopt result"
        );
        // A block far above the old mmap threshold is served, written and freed normally.
        let mut big = vec![0u8; 96 << 20];
        big[(96 << 20) - 1] = 7;
        assert_eq!(big.iter().map(|&b| b as u64).sum::<u64>(), 7);
    }
}
