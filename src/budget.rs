//! A memory budget for work on one thread that input controls (rendering a chat template): while a
//! budget is open, the `expanse` binary's allocator counts the bytes the thread holds, and a request
//! past the budget ends the process with exit 2 and one line naming the work. minijinja's `~`, `+`
//! and `*` allocate without a hook (a string doubled in a loop reaches any size in a few dozen
//! steps), so the allocator is the one place every allocation of a render passes.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

/// The `expanse` binary's global allocator: `System`, checked against this thread's open budget.
/// Test binaries use their own allocators, where budgets count nothing.
pub struct BudgetedAlloc;

thread_local! {
    /// Bytes this thread may hold beyond what it held when its budget opened; None: no budget.
    static LEFT: Cell<Option<Account>> = const { Cell::new(None) };
    /// The line written when the budget is exceeded (pointer and length into the open `Budget`).
    static MESSAGE: Cell<(*const u8, usize)> = const { Cell::new((std::ptr::null(), 0)) };
}

/// An open budget's state: `left` of `limit` bytes still free.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Account {
    left: usize,
    limit: usize,
}

impl Account {
    /// After allocating `bytes`, or None when that passes the budget.
    fn charge(self, bytes: usize) -> Option<Account> {
        Some(Account { left: self.left.checked_sub(bytes)?, ..self })
    }

    /// After freeing `bytes`; memory held before the budget opened gives no credit past its limit.
    fn credit(self, bytes: usize) -> Account {
        Account { left: self.left.saturating_add(bytes).min(self.limit), ..self }
    }
}

/// While this lives, the current thread may hold at most `bytes` more than it held when it opened
/// (in the `expanse` binary; elsewhere nothing is counted). Budgets do not nest: opening one closes
/// any other until it is dropped.
pub struct Budget {
    /// Kept alive for the allocator, which writes it (it cannot format a message while allocating).
    _line: Box<[u8]>,
    outer: (Option<Account>, (*const u8, usize)),
}

/// Opens a budget of `bytes`; `message` is the error line written (with `error: ` and a newline)
/// when it is exceeded.
pub fn open(bytes: usize, message: &str) -> Budget {
    let line: Box<[u8]> = format!("error: {message}\n").into_bytes().into_boxed_slice();
    let outer = (LEFT.with(Cell::get), MESSAGE.with(Cell::get));
    MESSAGE.with(|m| m.set((line.as_ptr(), line.len())));
    LEFT.with(|l| l.set(Some(Account { left: bytes, limit: bytes })));
    Budget { _line: line, outer }
}

impl Drop for Budget {
    fn drop(&mut self) {
        LEFT.with(|l| l.set(self.outer.0));
        MESSAGE.with(|m| m.set(self.outer.1));
    }
}

/// Counts an allocation of `bytes` against this thread's budget; past it, ends the process.
fn charge(bytes: usize) {
    // `try_with`: an allocation during the thread's teardown finds no budget, not a panic.
    let _ = LEFT.try_with(|l| {
        if let Some(a) = l.get() {
            match a.charge(bytes) {
                Some(a) => l.set(Some(a)),
                None => exceeded(),
            }
        }
    });
}

fn credit(bytes: usize) {
    let _ = LEFT.try_with(|l| {
        if let Some(a) = l.get() {
            l.set(Some(a.credit(bytes)));
        }
    });
}

/// Writes the budget's line and ends the process with exit 2 (bad input). Nothing here may
/// allocate, and unwinding out of an allocator is undefined behaviour: hence `write` and `_exit`.
fn exceeded() -> ! {
    let (ptr, len) = MESSAGE.with(Cell::get);
    #[cfg(unix)]
    // SAFETY: `ptr` and `len` describe the line the open `Budget` owns (it outlives every allocation
    // it counts); write(2) only reads them, and _exit ends the process without running any code of
    // this one.
    unsafe {
        libc::write(2, ptr.cast(), len);
        libc::_exit(2)
    }
    #[cfg(not(unix))]
    {
        let _ = (ptr, len);
        std::process::abort()
    }
}

// SAFETY: every call is forwarded to `System` unchanged; the budget only counts sizes (or ends the
// process before the call is made).
unsafe impl GlobalAlloc for BudgetedAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        charge(layout.size());
        // SAFETY: forwarded as the caller gave it.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        charge(layout.size());
        // SAFETY: forwarded as the caller gave it.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        credit(layout.size());
        // SAFETY: forwarded as the caller gave it.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // Charged before the call, so a request past the budget never reaches the system.
        match new_size.checked_sub(layout.size()) {
            Some(grow) => charge(grow),
            None => credit(layout.size() - new_size),
        }
        // SAFETY: forwarded as the caller gave it.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_account_charges_credits_and_refuses_past_its_limit() {
        let a = Account { left: 100, limit: 100 };
        let a = a.charge(60).unwrap();
        assert_eq!(a.left, 40);
        assert_eq!(a.charge(41), None, "past the budget");
        assert_eq!(a.credit(30).left, 70);
        assert_eq!(a.credit(500).left, 100, "frees of older memory give no credit past the limit");
    }

    #[test]
    fn budgets_close_when_dropped_and_restore_the_outer_one() {
        assert_eq!(LEFT.with(Cell::get), None);
        let outer = open(1000, "outer");
        let inner = open(10, "inner");
        assert_eq!(LEFT.with(Cell::get).map(|a| a.limit), Some(10));
        drop(inner);
        assert_eq!(LEFT.with(Cell::get).map(|a| a.limit), Some(1000));
        drop(outer);
        assert_eq!(LEFT.with(Cell::get), None);
    }
}
