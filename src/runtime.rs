//! Process-level tuning for long CPU runs, and [`guarded`] for third-party decoders that
//! panic on malformed input.
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
        // Never trim the heap top back to the system between steps. -1 (SIZE_MAX inside
        // glibc) turns trimming off; i32::MAX, the largest positive value, still trimmed a
        // top above 2 GiB: 4.3 GiB given back and faulted in again within one step of the
        // 0.5B student (`strace -e brk`; docs/benchmarks.md).
        let no_trim = libc::mallopt(libc::M_TRIM_THRESHOLD, -1) == 1;
        // One arena: worker threads' arenas are 64 MiB heaps that glibc shrinks and unmaps
        // as they empty, which brought the page faults and shoot-downs back (about half the
        // system time of `train_bench 8 kd`; docs/benchmarks.md).
        let one_arena = libc::mallopt(libc::M_ARENA_MAX, 1) == 1;
        no_mmap && no_trim && one_arena
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune() -> bool {
    false
}

/// Peak resident memory of this process so far, in bytes (`getrusage` `ru_maxrss`); `None`
/// where the platform does not report it.
pub fn peak_rss_bytes() -> Option<u64> {
    peak_rss()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn peak_rss() -> Option<u64> {
    // SAFETY: getrusage writes into the zeroed struct we own.
    unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        (libc::getrusage(libc::RUSAGE_SELF, &mut usage) == 0)
            .then(|| (usage.ru_maxrss.max(0) as u64) * 1024)
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn peak_rss() -> Option<u64> {
    None
}

/// "peak resident memory 1.23 GiB", or an empty string where it is unknown.
pub fn peak_rss_line() -> String {
    match peak_rss_bytes() {
        Some(b) => format!(
            "peak resident memory {:.2} GiB",
            b as f64 / (1u64 << 30) as f64
        ),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn peak_rss_grows_with_a_touched_allocation() {
        let Some(before) = super::peak_rss_bytes() else {
            return;
        };
        assert!(before > 0);
        // black_box: without it the optimiser may remove the unread allocation (seen in a
        // release build on 2026-12-04), and the peak does not move.
        let big = std::hint::black_box(vec![1u8; 256 << 20]);
        let after = super::peak_rss_bytes().unwrap();
        assert_eq!(std::hint::black_box(&big)[(256 << 20) - 1], 1);
        assert!(after >= before.max(256 << 20), "{before} -> {after}");
        assert!(super::peak_rss_line().starts_with("peak resident memory "));
        drop(big);
    }

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

std::thread_local! {
    static GUARDED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Installs (once) a panic hook that is silent for panics inside [`guarded`] and hands every
/// other panic to the hook that was there before (the default one, or a fuzzer's).
fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !GUARDED.with(std::cell::Cell::get) {
                previous(info);
            }
        }));
    });
}

/// Runs `f`, turning a panic inside it into `Err(message)`. For third-party decoders that
/// assert instead of returning an error on some malformed input (the Arrow schema embedded
/// in a Parquet footer, found by the `store_files` fuzz target): the caller reports the file
/// as damaged instead of the process dying.
pub fn guarded<T>(f: impl FnOnce() -> T) -> std::result::Result<T, String> {
    install_panic_hook();
    let was = GUARDED.with(|g| g.replace(true));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    GUARDED.with(|g| g.set(was));
    result.map_err(|payload| {
        payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".to_string())
    })
}
