//! Guard pages for the buffers of kernel tests (emulated CUDA launches, the CPU kernels' raw-pointer
//! loops): while a thread is inside `scope()`, each heap block it allocates ends where an
//! inaccessible page begins (inside `scope_front()`, starts where one ends), and a freed block
//! becomes inaccessible itself. A kernel that reads or writes past a buffer's end (before its start),
//! or into a buffer already freed, faults at that access, and the fault handler names the kernel,
//! block and thread before the process dies: on host memory, the part of
//! compute-sanitizer's memcheck that matters most for indexing bugs. Not caught: accesses on the side
//! a scope does not guard (a block's other end has slack up to a page), and within the 16-byte grain
//! past its end.
//!
//! Electric Fence's scheme as a Rust global allocator (`GuardedAlloc`; the test binary declares it).
//! Hand-written: the guard-page allocators on crates.io (forge-alloc's `GuardPage`, for one) manage a
//! region for explicit use; none is a global allocator that guards one thread's allocations for a
//! scope (what lets candle's tensors land between guard pages) or names the launch that faulted.
//! Guarded blocks come from one reserved range of address space, bumped and never reused, so a freed
//! block stays unmapped; outside a scope, and for what the range cannot serve, `System` allocates.
//! Linux only; elsewhere `scope` guards nothing (the emulator's tests still run).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

/// The global allocator that guards the blocks a thread allocates inside `scope()`.
pub struct GuardedAlloc;

/// Which end of its pages a guarded block is placed against.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    /// Not guarding.
    Off,
    /// Ends where an unmapped page begins: accesses past the end fault.
    End,
    /// Starts where an unmapped page ends: accesses before the start fault.
    Front,
}

thread_local! {
    static SIDE: Cell<Side> = const { Cell::new(Side::Off) };
}

/// While the returned value lives, this thread's heap blocks end against an unmapped page.
pub fn scope() -> Scope {
    enter(Side::End)
}

/// As `scope`, but blocks start right after an unmapped page, to catch accesses before a buffer.
pub fn scope_front() -> Scope {
    enter(Side::Front)
}

fn enter(side: Side) -> Scope {
    imp::install_fault_handler();
    Scope { outer: SIDE.with(|s| s.replace(side)), _thread: std::marker::PhantomData }
}

/// Guarding this thread's allocations until dropped (`scope`); scopes nest, and the value stays on
/// its thread (not `Send`), whose setting it restores.
pub struct Scope {
    outer: Side,
    _thread: std::marker::PhantomData<*const ()>,
}

impl Drop for Scope {
    fn drop(&mut self) {
        SIDE.with(|s| s.set(self.outer));
    }
}

/// Whether guarding works on this machine: the address range is reserved and a guarded block can
/// be mapped (false off Linux, or where the reservation was refused).
pub fn active() -> bool {
    let _s = scope();
    let b = Box::new(0u8);
    imp::owns(&*b as *const u8 as usize)
}

/// Whether this thread's allocations are being guarded now (never off Linux).
pub fn in_scope() -> bool {
    cfg!(target_os = "linux") && guarding()
}

/// Whether `addr` lies in a guarded block (or in the guard's range, freed).
pub fn guarded(addr: usize) -> bool {
    imp::owns(addr)
}

fn side() -> Side {
    SIDE.try_with(Cell::get).unwrap_or(Side::Off)
}

fn guarding() -> bool {
    side() != Side::Off
}

/// Blocks are rounded up to 16 bytes (a GPU's buffers start at least that aligned, and kernels load
/// 16-byte vectors), so an access up to 15 bytes past a block's requested end goes unnoticed.
const GRAIN: usize = 16;

/// A guarded block for `layout`, when this thread is in a scope and the range can serve it.
fn guarded_alloc(layout: Layout) -> Option<*mut u8> {
    match side() {
        Side::Off => None,
        s => imp::alloc(rounded(layout), layout.align(), s == Side::Front),
    }
}

fn rounded(layout: Layout) -> usize {
    layout.size().max(1).next_multiple_of(layout.align().max(GRAIN))
}

unsafe impl GlobalAlloc for GuardedAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        match guarded_alloc(layout) {
            Some(p) => p,
            // SAFETY: forwarded as the caller gave it.
            None => unsafe { System.alloc(layout) },
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // Guarded pages are fresh mappings: zero.
        match guarded_alloc(layout) {
            Some(p) => p,
            // SAFETY: forwarded as the caller gave it.
            None => unsafe { System.alloc_zeroed(layout) },
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if imp::owns(ptr as usize) {
            imp::free(ptr as usize, rounded(layout));
        } else {
            // SAFETY: a block `System` allocated, as the caller gives it back.
            unsafe { System.dealloc(ptr, layout) }
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if !guarding() && !imp::owns(ptr as usize) {
            // SAFETY: a block `System` allocated, resized as the caller asks.
            return unsafe { System.realloc(ptr, layout, new_size) };
        }
        // SAFETY: the caller guarantees `new_size` with `layout.align()` is a valid layout.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        // SAFETY: as for `alloc`; the old block holds `layout.size()` bytes, the new at least
        // `min(layout.size(), new_size)`, and they are distinct.
        unsafe {
            let new = self.alloc(new_layout);
            if !new.is_null() {
                std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
            new
        }
    }
}

#[cfg(target_os = "linux")]
mod imp {
    use std::sync::atomic::{AtomicUsize, Ordering};

    const PAGE: usize = 4096;
    /// Address space reserved for guarded blocks (never memory: pages are mapped per block). A whole
    /// test binary's guarded blocks took 5.1 GB of it (2026-12-02); what it cannot serve, `System`
    /// allocates unguarded.
    const RANGE: usize = 1 << 36;

    /// Start of the reserved range (0: not reserved yet; 1: the reservation failed).
    static BASE: AtomicUsize = AtomicUsize::new(0);
    /// Bytes of the range handed out so far.
    static USED: AtomicUsize = AtomicUsize::new(0);
    /// Guarded blocks alive now. Each is a mapping of its own between two of the range's (freed ones
    /// merge back), so the process holds about twice as many mappings; past `MAX_LIVE` blocks are
    /// served unguarded, leaving `vm.max_map_count` (65530 by default) room for `System`'s own
    /// mappings. Without the cap a test run could use them all, after which even a small `System`
    /// allocation fails ("memory allocation of 7168 bytes failed", twice in ~50 runs, 2026-12-04).
    static LIVE: AtomicUsize = AtomicUsize::new(0);
    const MAX_LIVE: usize = 20_000;

    fn base() -> Option<usize> {
        match BASE.load(Ordering::Acquire) {
            0 => {}
            1 => return None,
            b => return Some(b),
        }
        // SAFETY: a fresh private mapping with no access; nothing else refers to it.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), RANGE, libc::PROT_NONE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE, -1, 0) };
        let mine = if p == libc::MAP_FAILED { 1 } else { p as usize };
        match BASE.compare_exchange(0, mine, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => (mine != 1).then_some(mine),
            Err(theirs) => {
                if mine != 1 {
                    // SAFETY: our own reservation, which lost the race and which nothing uses.
                    unsafe { libc::munmap(p, RANGE) };
                }
                (theirs != 1).then_some(theirs)
            }
        }
    }

    pub(super) fn owns(addr: usize) -> bool {
        let b = BASE.load(Ordering::Acquire);
        b > 1 && addr >= b && addr < b + RANGE
    }

    /// Maps `size` bytes (a multiple of GRAIN) ending where an unmapped page begins, or with
    /// `front` starting where one ends.
    pub(super) fn alloc(size: usize, align: usize, front: bool) -> Option<*mut u8> {
        if align > PAGE {
            return None;
        }
        let b = base()?;
        if LIVE.fetch_add(1, Ordering::Relaxed) >= MAX_LIVE {
            LIVE.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        let pages = size.div_ceil(PAGE) * PAGE;
        // An unmapped page before each block, never handed out; the next block's is the one after.
        let off = USED.fetch_add(PAGE + pages, Ordering::Relaxed);
        if off + PAGE + pages + PAGE > RANGE {
            LIVE.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        let start = b + off + PAGE;
        // SAFETY: these pages lie in our reservation and no block has been given them.
        let ok = unsafe { libc::mprotect(start as *mut libc::c_void, pages, libc::PROT_READ | libc::PROT_WRITE) } == 0;
        if !ok {
            LIVE.fetch_sub(1, Ordering::Relaxed);
            report_refusal(off);
        }
        ok.then_some(if front { start } else { start + pages - size } as *mut u8)
    }

    /// The kernel refused to map a guarded block (ENOMEM: most likely `vm.max_map_count`, each live
    /// block being a mapping of its own): said once on stderr, since what follows (unguarded blocks,
    /// or a failed allocation when the process is out of mappings) is otherwise unexplained. A test
    /// run once died here with "memory allocation of 7168 bytes failed" and no other word
    /// (2026-12-04, not reproduced in 45 runs since). Writes without allocating.
    fn report_refusal(used: usize) {
        static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        if SAID.swap(true, Ordering::Relaxed) {
            return;
        }
        let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
        let mut line = Line { buf: [0; 512], len: 0 };
        let _ = std::fmt::Write::write_fmt(
            &mut line,
            format_args!(
                "memory guard: mprotect refused a guarded block (errno {errno}) after {} MB of the range; blocks fall back to unguarded\n",
                used >> 20
            ),
        );
        // SAFETY: writes our own buffer's initialised bytes to stderr.
        unsafe { libc::write(2, line.buf.as_ptr().cast(), line.len) };
    }

    /// Returns a guarded block's pages to the system and makes them inaccessible again (the range
    /// stays reserved and is never handed out twice). `mprotect` back to the range's own protection
    /// lets the kernel merge the pages into their neighbours' mapping: a fresh mapping per freed
    /// block would not merge, and the process would run out of mappings (`vm.max_map_count`).
    pub(super) fn free(ptr: usize, size: usize) {
        let pages = size.div_ceil(PAGE) * PAGE;
        // A block starts its pages (front, or a whole number of pages) or ends them.
        let start = if ptr % PAGE == 0 { ptr } else { ptr + size - pages } as *mut libc::c_void;
        // SAFETY: the block's own pages (where `alloc` placed it), which its owner gave back.
        unsafe {
            libc::madvise(start, pages, libc::MADV_DONTNEED);
            libc::mprotect(start, pages, libc::PROT_NONE);
        }
        LIVE.fetch_sub(1, Ordering::Relaxed);
    }

    extern "C" {
        /// The launch in progress, as "kernel K block (x,y,z) thread (x,y,z)" (emu.cpp).
        fn expanse_emu_where(buf: *mut libc::c_char, len: usize) -> usize;
    }

    static PREVIOUS: std::sync::OnceLock<(libc::sigaction, libc::sigaction)> = std::sync::OnceLock::new();

    pub(super) fn install_fault_handler() {
        PREVIOUS.get_or_init(|| {
            // SAFETY: sigaction with a handler that only writes to stderr and reinstates the
            // previous action; the previous actions are read into zeroed structs.
            unsafe {
                let mut act: libc::sigaction = std::mem::zeroed();
                act.sa_sigaction = on_fault as *const () as usize;
                act.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
                libc::sigemptyset(&mut act.sa_mask);
                let (mut segv, mut bus) = (std::mem::zeroed(), std::mem::zeroed());
                libc::sigaction(libc::SIGSEGV, &act, &mut segv);
                libc::sigaction(libc::SIGBUS, &act, &mut bus);
                (segv, bus)
            }
        });
    }

    /// A fault in the guarded range: one line on stderr naming the access and the launch, then the
    /// previous action is reinstated and the access faults again under it (std's handler, or death
    /// by SIGSEGV). Writes with `write(2)` into a stack buffer; the emulator's `where` formats with
    /// snprintf, which is not async-signal-safe, but the process is dying of this fault anyway.
    extern "C" fn on_fault(sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
        // SAFETY: the kernel passes a valid siginfo for a SA_SIGINFO handler of SIGSEGV/SIGBUS.
        let addr = unsafe { (*info).si_addr() } as usize;
        if owns(addr) {
            let mut line = Line { buf: [0; 512], len: 0 };
            let mut at = [0u8; 200];
            // SAFETY: `at` is writable for its length; the callee writes a NUL-terminated string.
            let n = unsafe { expanse_emu_where(at.as_mut_ptr().cast(), at.len()) }.min(at.len());
            let at = std::str::from_utf8(&at[..n]).unwrap_or("?");
            let at = if at.is_empty() { "host code (no emulated launch running)" } else { at };
            let _ = std::fmt::Write::write_fmt(
                &mut line,
                format_args!(
                    "memory guard: {at} touched {addr:#x}, in a guard page beside a buffer or in a freed buffer ({} bytes into its page)\n",
                    addr % PAGE
                ),
            );
            // SAFETY: writes our own buffer's initialised bytes to stderr.
            unsafe { libc::write(2, line.buf.as_ptr().cast(), line.len) };
        }
        if let Some((segv, bus)) = PREVIOUS.get() {
            let prev = if sig == libc::SIGBUS { bus } else { segv };
            // SAFETY: reinstates the action that was in place before ours.
            unsafe { libc::sigaction(sig, prev, std::ptr::null_mut()) };
        }
    }

    /// A line formatted without allocating (inside a signal handler).
    struct Line {
        buf: [u8; 512],
        len: usize,
    }

    impl std::fmt::Write for Line {
        fn write_str(&mut self, s: &str) -> std::fmt::Result {
            let n = s.len().min(self.buf.len() - self.len);
            self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
            self.len += n;
            Ok(())
        }
    }
}

#[cfg(not(target_os = "linux"))]
mod imp {
    pub(super) fn install_fault_handler() {}
    pub(super) fn owns(_: usize) -> bool {
        false
    }
    pub(super) fn alloc(_: usize, _: usize, _: bool) -> Option<*mut u8> {
        None
    }
    pub(super) fn free(_: usize, _: usize) {}
}
