//! The modules' allocator: free lists of small blocks in front of the system's `malloc`.
//!
//! A request allocates and frees the same small sizes over and over (header strings, keys,
//! vectors of pairs). wasi-libc's dlmalloc runs its general paths (bins, chunk headers,
//! coalescing) on each call; a free list pops and pushes in a handful of instructions.
//! A freed small block goes onto its class's list and is never handed back to `malloc`: what
//! a class's list holds is bounded by the most blocks of that class ever live at once (the
//! largest configuration parsed, the busiest request), and they are reused for every later
//! allocation of their class.
//!
//! A block's class depends only on its layout, so `dealloc` and `realloc` find the list its
//! `alloc` took it from. The VM runs one thread: the list heads are atomics only to be `Sync`
//! without `static mut` (on wasm32 without threads a relaxed atomic is a plain load or store).
#![allow(unsafe_code)]

use core::alloc::{GlobalAlloc, Layout};
use core::sync::atomic::{AtomicUsize, Ordering::Relaxed};
#[cfg(not(target_arch = "wasm32"))]
use std::alloc::System;
#[cfg(target_arch = "wasm32")]
use system::System;

/// Classes of 16-byte steps up to 256 bytes, then 512, 1024 and 2048.
const CLASSES: usize = 19;
const LARGEST: usize = 2048;
/// Every block is this aligned, so values holding a `u128` (aligned to 16 on wasm32, e.g. the
/// rate limiter's buckets) come from the lists too: at 8 they went to `malloc` on every
/// request. Above malloc's own 8, a list's refill goes through `aligned_alloc`, which only an
/// empty list pays. Larger alignments go to the system allocator directly.
const ALIGN: usize = 16;

pub struct Pools {
    heads: [AtomicUsize; CLASSES],
}

/// The class of a layout and the size of its blocks, or None for the system allocator.
fn class(layout: Layout) -> Option<(usize, usize)> {
    let size = layout.size();
    if size > LARGEST || layout.align() > ALIGN {
        return None;
    }
    if size <= 256 {
        let steps = size.div_ceil(16).max(1);
        return Some((steps - 1, steps * 16));
    }
    // 257..=2048: powers of two from 512.
    let block = size.next_power_of_two();
    Some((16 + (block.trailing_zeros() as usize - 9), block))
}

impl Pools {
    pub const fn new() -> Pools {
        Pools {
            heads: [const { AtomicUsize::new(0) }; CLASSES],
        }
    }

    fn head(&self, class: usize) -> &AtomicUsize {
        // `class` returns indices below CLASSES; the fallback is never taken.
        self.heads.get(class).unwrap_or(&self.heads[0])
    }
}

impl Default for Pools {
    fn default() -> Self {
        Pools::new()
    }
}

// Out of line: inlined into every allocating call site, the fast paths would cost each one
// more bytes than the call they save (3-7 KB per module).
// SAFETY: every block on a list came from `System` with the class's size and ALIGN, and is
// owned by the list alone until `alloc` hands it out again; its first word holds the next
// block's address (blocks are at least 16 bytes).
unsafe impl GlobalAlloc for Pools {
    #[inline(never)]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let from_system = match class(layout) {
            Some((c, block)) => {
                let head = self.head(c);
                let top = head.load(Relaxed);
                if top != 0 {
                    head.store(unsafe { (top as *const usize).read() }, Relaxed);
                    return top as *mut u8;
                }
                unsafe { Layout::from_size_align_unchecked(block, ALIGN) }
            }
            None => layout,
        };
        // One call site: the system allocator's code is inlined once.
        unsafe { System.alloc(from_system) }
    }

    #[inline(never)]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let Some((c, _)) = class(layout) else {
            return unsafe { System.dealloc(ptr, layout) };
        };
        let head = self.head(c);
        unsafe { (ptr as *mut usize).write(head.load(Relaxed)) };
        head.store(ptr as usize, Relaxed);
    }

    #[inline(never)]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let new = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        let (from, to) = (class(layout), class(new));
        if from.is_some() && from.map(|c| c.0) == to.map(|c| c.0) {
            // Same class: the block already has room.
            return ptr;
        }
        if from.is_none() && to.is_none() && layout.align() <= ALIGN {
            // Both large, in `malloc`'s alignment: `realloc` may grow in place.
            return unsafe { System.realloc(ptr, layout, new_size) };
        }
        let moved = unsafe { self.alloc(new) };
        if !moved.is_null() {
            unsafe {
                core::ptr::copy_nonoverlapping(ptr, moved, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
        }
        moved
    }
}

/// wasi-libc's `malloc` (dlmalloc), called the way std's `System` calls it on wasm32-wasip1:
/// the modules are `no_std`, so the lists' refills reach it directly.
#[cfg(target_arch = "wasm32")]
mod system {
    use core::alloc::{GlobalAlloc, Layout};

    #[link(name = "c")]
    extern "C" {
        fn malloc(size: usize) -> *mut u8;
        fn aligned_alloc(align: usize, size: usize) -> *mut u8;
        fn realloc(ptr: *mut u8, size: usize) -> *mut u8;
        fn free(ptr: *mut u8);
    }

    /// The alignment `malloc` guarantees on wasm32.
    const MIN_ALIGN: usize = 8;

    pub struct System;

    // SAFETY: each method passes its caller's contract on to wasi-libc's allocator, which
    // meets GlobalAlloc's for the layouts it is given (aligned_alloc above MIN_ALIGN).
    unsafe impl GlobalAlloc for System {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            if layout.align() <= MIN_ALIGN && layout.align() <= layout.size() {
                unsafe { malloc(layout.size()) }
            } else {
                unsafe { aligned_alloc(layout.align(), layout.size()) }
            }
        }

        unsafe fn dealloc(&self, ptr: *mut u8, _: Layout) {
            unsafe { free(ptr) }
        }

        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            if layout.align() <= MIN_ALIGN && layout.align() <= new_size {
                return unsafe { realloc(ptr, new_size) };
            }
            let new = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
            let moved = unsafe { self.alloc(new) };
            if !moved.is_null() {
                unsafe {
                    core::ptr::copy_nonoverlapping(ptr, moved, layout.size().min(new_size));
                    free(ptr);
                }
            }
            moved
        }
    }
}

#[cfg(target_arch = "wasm32")]
#[global_allocator]
static POOLS: Pools = Pools::new();

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(size: usize) -> Layout {
        Layout::from_size_align(size, 1).unwrap()
    }

    #[test]
    fn classes_cover_every_small_size_with_room() {
        let mut last = 0;
        let mut blocks = [0usize; CLASSES];
        for size in 0..=LARGEST {
            let (c, block) = class(layout(size)).unwrap();
            assert!(c < CLASSES && block >= size.max(1) && block >= 16, "{size}");
            assert!(c >= last, "classes grow with the size");
            assert!(
                blocks[c] == 0 || blocks[c] == block,
                "class {c}: one block size"
            );
            blocks[c] = block;
            last = c;
        }
        assert!(blocks.iter().all(|b| *b > 0), "every class is used");
        assert!(blocks.windows(2).all(|w| w[0] < w[1]), "{blocks:?}");
        for align in [2, 4, 8, 16] {
            let l = Layout::from_size_align(24, align).unwrap();
            let p = unsafe { Pools::new().alloc(l) };
            assert_eq!(p as usize % align, 0);
            unsafe { System.dealloc(p, Layout::from_size_align(32, ALIGN).unwrap()) };
        }
        assert_eq!(class(layout(LARGEST + 1)), None);
        assert!(
            class(Layout::from_size_align(64, 16).unwrap()).is_some(),
            "u128 values"
        );
        assert_eq!(class(Layout::from_size_align(64, 32).unwrap()), None);
    }

    #[test]
    fn a_freed_block_is_reused_by_its_class_only() {
        let pools = Pools::new();
        unsafe {
            let a = pools.alloc(layout(40));
            a.write_bytes(7, 40);
            pools.dealloc(a, layout(40));
            let other = pools.alloc(layout(100));
            assert_ne!(other, a, "another class takes its own block");
            let b = pools.alloc(layout(33));
            assert_eq!(b, a, "same class (48 bytes): the freed block");
            let c = pools.alloc(layout(48));
            assert_ne!(c, a, "the list is empty again");
            for (p, n) in [(b, 33), (c, 48), (other, 100)] {
                pools.dealloc(p, layout(n));
            }
        }
    }

    #[test]
    fn realloc_keeps_the_bytes_across_classes_and_into_the_system_allocator() {
        let pools = Pools::new();
        unsafe {
            let mut p = pools.alloc(layout(10));
            for i in 0..10u8 {
                p.add(usize::from(i)).write(i);
            }
            let mut size = 10;
            // Grown to 300 with every byte set, the next moves must keep all 300.
            for new in [16, 300, 5000, 9000, 20] {
                let q = pools.realloc(p, layout(size), new);
                // Same small class: the block has room. Large sizes are malloc's to move.
                if let (Some(from), Some(to)) = (class(layout(size)), class(layout(new))) {
                    if from.0 == to.0 {
                        assert_eq!(q, p, "{size} -> {new} stays in its block");
                    }
                }
                let kept = if size >= 300 {
                    size.min(new).min(300)
                } else {
                    size.min(new).min(10)
                };
                for i in 0..kept {
                    assert_eq!(q.add(i).read(), i as u8, "{size} -> {new}: byte {i}");
                }
                if new == 300 {
                    for i in 0..300 {
                        q.add(i).write(i as u8);
                    }
                }
                p = q;
                size = new;
            }
            pools.dealloc(p, layout(size));
        }
    }
}
