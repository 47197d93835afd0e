//! Where a CPU table's values live: a vector of their own, or a share of a *slab*, one zeroed
//! allocation aligned to a huge page that several small tables are cut from.
//!
//! Why slabs: a table below a huge page (a slot of a 1 GiB model is 1 MiB) cannot be backed by
//! one on its own, so making many of them fresh costs a page fault per 4 KiB. Cut from a slab
//! advised for transparent huge pages, they cost one per 2 MiB, and random rows miss the TLB
//! far less. The price: a slab's memory is returned only when the last of its tables is
//! dropped, so a slab holds at most [`SLAB_BYTES`] longer than its tables need.
//!
//! **Invariant:** the shares of one slab are disjoint ranges, each owned by exactly one
//! [`Store`]; a share is read through `&Store` and written through `&mut Store` only, so the
//! borrow rules of the owning table are the borrow rules of its range.

use std::alloc::Layout;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::Arc;

/// A transparent huge page on x86-64 and most aarch64 kernels.
pub(crate) const HUGE_PAGE_BYTES: usize = 2 << 20;

/// The most one slab holds (and so the most memory one live table can keep from being
/// returned): 16 huge pages.
pub const SLAB_BYTES: usize = 32 << 20;

/// Each share starts on a cache line (16 f32).
const SHARE_ALIGN_VALUES: usize = 16;

/// One zeroed allocation of `layout`, freed when its last share is dropped.
pub(crate) struct Slab {
    ptr: NonNull<f32>,
    layout: Layout,
}

// SAFETY: a slab is plain memory with no thread affinity. Its shares are disjoint ranges, each
// reached only through the one `Store` that owns it (see the module's invariant), so moving or
// sharing the handle between threads creates no aliased access.
unsafe impl Send for Slab {}
// SAFETY: as for `Send`: `&Slab` gives no access to the memory by itself.
unsafe impl Sync for Slab {}

impl Drop for Slab {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from `std::alloc::alloc` with `layout` (see `zeroed_shares`) and
        // is freed once, here, when the last share (holding the last `Arc`) is gone.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr().cast(), self.layout) }
    }
}

/// A table's values.
pub(crate) enum Store {
    /// A vector of their own.
    Own(Vec<f32>),
    /// `len` values of `slab` from value `at`.
    Shared {
        /// The slab; kept alive by its shares.
        slab: Arc<Slab>,
        /// First value of the share.
        at: usize,
        /// Values in the share.
        len: usize,
    },
}

impl Deref for Store {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        match self {
            Store::Own(v) => v,
            Store::Shared { slab, at, len } => {
                // SAFETY: `[at, at + len)` lies inside the slab (checked when the share was cut
                // in `zeroed_shares`), the slab outlives `self` (it holds an `Arc`), its memory
                // was initialised (zeroed) before any share was handed out, and no `&mut` to the
                // range exists while `&self` is borrowed (the module's invariant).
                unsafe { std::slice::from_raw_parts(slab.ptr.as_ptr().add(*at), *len) }
            }
        }
    }
}

impl DerefMut for Store {
    fn deref_mut(&mut self) -> &mut [f32] {
        match self {
            Store::Own(v) => v,
            Store::Shared { slab, at, len } => {
                // SAFETY: as in `deref`, and `&mut self` is the only way to this range, so the
                // slice is the only reference to it for its lifetime.
                unsafe { std::slice::from_raw_parts_mut(slab.ptr.as_ptr().add(*at), *len) }
            }
        }
    }
}

impl Clone for Store {
    /// A copy of its own: two shares of one range would alias.
    fn clone(&self) -> Self {
        Store::Own(self.to_vec())
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Store::Own(v) => write!(f, "Own({} values)", v.len()),
            Store::Shared { at, len, .. } => write!(f, "Shared({len} values at {at})"),
        }
    }
}

impl PartialEq for Store {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

/// Zeroed stores of `lens[i]` values each, cut from one slab (the caller keeps the total near
/// [`SLAB_BYTES`]); `Err(bytes)` when the allocator refuses the slab.
pub(crate) fn zeroed_shares(lens: &[usize]) -> Result<Vec<Store>, u64> {
    let mut starts = Vec::with_capacity(lens.len());
    let mut total = 0usize;
    for &len in lens {
        starts.push(total);
        total = len
            .checked_next_multiple_of(SHARE_ALIGN_VALUES)
            .and_then(|l| total.checked_add(l))
            .ok_or(u64::MAX)?;
    }
    let bytes = total.checked_mul(4).ok_or(u64::MAX)?;
    if bytes == 0 {
        return Ok(lens.iter().map(|_| Store::Own(Vec::new())).collect());
    }
    let size = bytes
        .checked_next_multiple_of(HUGE_PAGE_BYTES)
        .ok_or(u64::MAX)?;
    let layout = Layout::from_size_align(size, HUGE_PAGE_BYTES).map_err(|_| bytes as u64)?;
    // SAFETY: `layout` has a non-zero size (bytes > 0).
    let raw = unsafe { std::alloc::alloc(layout) };
    let ptr = NonNull::new(raw.cast::<f32>()).ok_or(bytes as u64)?;
    advise_huge_pages(raw, size);
    // SAFETY: the first `bytes` bytes lie inside the allocation; zeroing them initialises every
    // value a share can reach (each share ends at or before `total`).
    unsafe { std::ptr::write_bytes(raw, 0, bytes) };
    let slab = Arc::new(Slab { ptr, layout });
    Ok(lens
        .iter()
        .zip(starts)
        .map(|(&len, at)| Store::Shared {
            slab: slab.clone(),
            at,
            len,
        })
        .collect())
}

/// Asks the kernel to back the whole huge pages inside `[start, start + bytes)`, memory of one
/// allocation of the caller's that nothing has touched yet, with transparent huge pages. Only
/// a hint; ignored where unsupported.
pub(crate) fn advise_huge_pages(start: *mut u8, bytes: usize) {
    #[cfg(target_os = "linux")]
    {
        let first = (start as usize).next_multiple_of(HUGE_PAGE_BYTES);
        let end = (start as usize).saturating_add(bytes) / HUGE_PAGE_BYTES * HUGE_PAGE_BYTES;
        if end > first {
            // SAFETY: [first, end) lies inside the caller's allocation; MADV_HUGEPAGE changes
            // only how the kernel backs those pages, never their contents or mapping.
            unsafe {
                libc::madvise(first as *mut libc::c_void, end - first, libc::MADV_HUGEPAGE);
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (start, bytes);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_are_zeroed_disjoint_and_outlive_each_other() {
        let mut shares = zeroed_shares(&[1_000, 0, 17, 4_096]).unwrap();
        assert_eq!(
            shares.iter().map(|s| s.len()).collect::<Vec<_>>(),
            [1_000, 0, 17, 4_096]
        );
        assert!(shares.iter().all(|s| s.iter().all(|&v| v == 0.0)));
        for (i, s) in shares.iter_mut().enumerate() {
            s.fill(i as f32 + 1.0);
        }
        // Writing one share leaves the others as they were.
        for (i, s) in shares.iter().enumerate() {
            assert!(s.iter().all(|&v| v == i as f32 + 1.0), "share {i}");
        }
        // Each share starts on a cache line.
        for s in &shares {
            assert_eq!(s.as_ptr() as usize % 64, 0);
        }
        // Dropping some shares leaves the rest readable (the slab lives on).
        let last = shares.pop().unwrap();
        drop(shares);
        assert!(last.iter().all(|&v| v == 4.0));
        // A clone is a copy of its own.
        let mut copy = last.clone();
        copy[0] = -1.0;
        assert_eq!(last[0], 4.0);
        assert!(matches!(copy, Store::Own(_)));
        assert_ne!(copy, last);
    }

    #[test]
    fn nothing_to_share_allocates_nothing() {
        let shares = zeroed_shares(&[0, 0]).unwrap();
        assert!(
            shares
                .iter()
                .all(|s| matches!(s, Store::Own(v) if v.is_empty()))
        );
        assert!(zeroed_shares(&[]).unwrap().is_empty());
    }
}
