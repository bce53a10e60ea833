//! The bounded-allocation oracle: a global allocator for fuzz targets that
//! fails every allocation that would take the process past a budget.
//!
//! A failed allocation makes Rust abort ("memory allocation of N bytes
//! failed"), which libFuzzer reports as a crash with the input that caused
//! it. So a parser that believes a length field and reserves a terabyte is
//! a finding, whatever memory the fuzzing machine has, as in wasmtime's
//! `oom` target. The budget is far above what any input of the fuzzer's
//! maximum length legitimately needs (a few hundred kilobytes of file
//! becomes at most a few megabytes of parsed values).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Bytes the whole process may hold at once under [`Limited`].
pub const BUDGET_BYTES: usize = 1 << 30;

/// The allocator: [`System`], refusing past [`BUDGET_BYTES`] live.
pub struct Limited;

static LIVE: AtomicUsize = AtomicUsize::new(0);

/// Bytes held now through [`Limited`].
pub fn live_bytes() -> usize {
    LIVE.load(Ordering::Relaxed)
}

fn reserve(n: usize) -> bool {
    let before = LIVE.fetch_add(n, Ordering::Relaxed);
    if before.saturating_add(n) > BUDGET_BYTES {
        LIVE.fetch_sub(n, Ordering::Relaxed);
        return false;
    }
    true
}

// SAFETY: every method forwards to `System` with the caller's layout; the
// counter only decides whether to forward, and is given back exactly what
// was taken when the memory is freed or the allocation fails.
unsafe impl GlobalAlloc for Limited {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !reserve(layout.size()) {
            return std::ptr::null_mut();
        }
        let p = unsafe { System.alloc(layout) };
        if p.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !reserve(layout.size()) {
            return std::ptr::null_mut();
        }
        let p = unsafe { System.alloc_zeroed(layout) };
        if p.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let old = layout.size();
        if new_size > old && !reserve(new_size - old) {
            return std::ptr::null_mut();
        }
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if p.is_null() {
            if new_size > old {
                LIVE.fetch_sub(new_size - old, Ordering::Relaxed);
            }
        } else if new_size < old {
            LIVE.fetch_sub(old - new_size, Ordering::Relaxed);
        }
        p
    }
}
