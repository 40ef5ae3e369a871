//! The CPU's worker threads (rayon's global pool, which every CPU kernel forks from): how many, and
//! running a command's work on them.

use crate::error::{Error, Result};

/// Most `--threads`: far past any machine's cores (a pool larger than the cores only waits its turn),
/// and short of what would try to start tens of thousands of OS threads.
pub const MAX_THREADS: usize = 1024;

/// Sizes the pool (`--threads`) and starts it. Must run before anything parallel has started the
/// pool; candle reads the same variable for its own pools and reports.
pub fn set_count(threads: usize) -> Result<()> {
    if !(1..=MAX_THREADS).contains(&threads) {
        return Err(Error::flag("--threads", format!("{threads}: expected 1 to {MAX_THREADS}")));
    }
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    // Started now rather than at the first parallel loop, where a system that cannot start this
    // many threads (a process limit) makes rayon panic.
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .map_err(|e| Error::flag("--threads", format!("{threads}: cannot start that many threads ({e})")))
}

/// Runs `f` on one of the pool's threads, and returns its result. A parallel loop started from a
/// thread outside the pool is handed to the pool while the caller sleeps on a condition variable
/// until it ends: one wake-up through the kernel per GEMV, about 120 per decoded token of a
/// 30-layer model, 10 % of CPU decode (BENCHMARKS.md). Started from a pool thread, the loop forks
/// in place and that thread does its share.
pub fn run_on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    // `scope` called from outside the pool runs its closure on a pool thread.
    rayon::scope(|_| f())
}

#[cfg(test)]
mod tests {
    #[test]
    fn run_on_pool_runs_on_a_pool_thread() {
        assert!(rayon::current_thread_index().is_none(), "the test harness's thread is not the pool's");
        assert!(super::run_on_pool(|| rayon::current_thread_index().is_some()));
        assert_eq!(super::run_on_pool(|| 6 * 7), 42);
    }
}
