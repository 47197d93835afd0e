//! The CPU twin: a dense `rows × dim` f32 table in host memory, with the same operations the
//! CUDA path has (apply a sparse batch by scatter-add, gather rows), parallel by row range and
//! deterministic: each row receives its updates in batch order whatever the thread count, so
//! the result is bit-for-bit the sequential one.

use std::ops::Range;

pub use crate::slab::SLAB_BYTES;
use crate::slab::{Store, zeroed_shares};

/// Why an operation was refused: the table's own error, of which the CPU twin returns only
/// [`crate::Error::Row`] and [`crate::Error::Shape`].
pub type TableError = crate::Error;

/// Batches smaller than this are applied on the calling thread.
pub const PARALLEL_MIN_ROWS: usize = 4_096;

/// A dense table covering rows `first .. first + len` of a model (one slot's block).
#[derive(Clone, Debug, PartialEq)]
pub struct Table {
    first: u64,
    dim: usize,
    data: Store,
}

impl Table {
    /// A zeroed table for `rows` (a slot's range) of `dim` columns.
    pub fn zeros(rows: Range<u64>, dim: usize) -> Self {
        match Self::try_zeros(rows.clone(), dim) {
            Ok(t) => t,
            // As `vec!` would: the allocator's own failure path.
            Err(_) => Table {
                first: rows.start,
                dim,
                data: Store::Own(vec![
                    0.0;
                    (rows.end.saturating_sub(rows.start)) as usize * dim
                ]),
            },
        }
    }

    /// A zeroed table, or the bytes it would need when the allocator refuses them.
    pub fn try_zeros(rows: Range<u64>, dim: usize) -> Result<Self, u64> {
        let values = values_of(&rows, dim)?;
        let mut data = Vec::new();
        data.try_reserve_exact(values)
            .map_err(|_| (values as u64).saturating_mul(4))?;
        advise_huge_pages(&mut data);
        data.resize(values, 0.0);
        Ok(Table {
            first: rows.start,
            dim,
            data: Store::Own(data),
        })
    }

    /// Zeroed tables for each of `ranges`, all of `dim` columns. Tables below 4 MiB are cut
    /// from shared slabs of at most [`SLAB_BYTES`] backed by transparent huge pages, so that
    /// making many of them fresh costs a page fault per 2 MiB instead of per 4 KiB; a slab's
    /// memory is returned when the last of its tables is dropped. Larger tables, and groups
    /// too small to fill a huge page, are made each on its own as [`Table::try_zeros`].
    /// `Err(bytes)` as `try_zeros`.
    pub fn try_zeros_many(ranges: &[Range<u64>], dim: usize) -> Result<Vec<Self>, u64> {
        let mut out = Vec::with_capacity(ranges.len());
        // The small tables waiting for a slab: their ranges, values and bytes in all.
        let mut group: Vec<(Range<u64>, usize)> = Vec::new();
        let mut group_bytes = 0usize;
        let flush = |group: &mut Vec<(Range<u64>, usize)>,
                     group_bytes: &mut usize,
                     out: &mut Vec<Table>|
         -> Result<(), u64> {
            if *group_bytes < crate::slab::HUGE_PAGE_BYTES {
                for (rows, _) in group.drain(..) {
                    out.push(Table::try_zeros(rows, dim)?);
                }
            } else {
                let lens: Vec<usize> = group.iter().map(|(_, len)| *len).collect();
                let shares = zeroed_shares(&lens)?;
                out.extend(group.drain(..).zip(shares).map(|((rows, _), data)| Table {
                    first: rows.start,
                    dim,
                    data,
                }));
            }
            *group_bytes = 0;
            Ok(())
        };
        for rows in ranges {
            let values = values_of(rows, dim)?;
            let bytes = values.saturating_mul(4);
            if bytes >= HUGE_PAGES_MIN_BYTES {
                flush(&mut group, &mut group_bytes, &mut out)?;
                out.push(Self::try_zeros(rows.clone(), dim)?);
                continue;
            }
            if group_bytes + bytes > SLAB_BYTES {
                flush(&mut group, &mut group_bytes, &mut out)?;
            }
            group.push((rows.clone(), values));
            group_bytes += bytes;
        }
        flush(&mut group, &mut group_bytes, &mut out)?;
        Ok(out)
    }

    /// Replaces the values with `data`, which must have exactly `data().len()` values (the
    /// caller checks); a wrong length leaves the table unchanged.
    pub fn load(&mut self, data: &[f32]) {
        if data.len() == self.data.len() {
            self.data.copy_from_slice(data);
        }
    }

    /// The rows it covers.
    pub fn rows(&self) -> Range<u64> {
        self.first..self.first + (self.data.len() / self.dim.max(1)) as u64
    }

    /// Columns.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The raw data, row-major.
    pub fn data(&self) -> &[f32] {
        &self.data
    }

    fn check(&self, rows: &[u32], values: usize) -> Result<(), TableError> {
        if values != rows.len() * self.dim {
            return Err(TableError::Shape {
                values,
                rows: rows.len(),
                dim: self.dim,
            });
        }
        let range = self.rows();
        if let Some(&row) = rows.iter().find(|r| !range.contains(&u64::from(**r))) {
            return Err(TableError::Row { row, range });
        }
        Ok(())
    }

    /// Adds `values[i·dim..]` to row `rows[i]` for every i (a row may repeat). All or nothing:
    /// a bad row refuses the whole batch before anything is written.
    ///
    /// In parallel, the table is cut into `threads` contiguous row blocks; the batch's indices
    /// are bucketed by block once (a stable counting sort, so each bucket keeps batch order) and
    /// each thread applies its own bucket. The calling thread takes the first block.
    pub fn apply(
        &mut self,
        rows: &[u32],
        values: &[f32],
        threads: usize,
    ) -> Result<(), TableError> {
        self.check(rows, values.len())?;
        let dim = self.dim;
        let first = self.first;
        let threads = threads.max(1);
        if threads == 1 || rows.len() < PARALLEL_MIN_ROWS || self.data.len() < dim * threads {
            apply_all(&mut self.data, first, dim, rows, values);
            return Ok(());
        }
        let total_rows = self.data.len() / dim;
        let per = total_rows.div_ceil(threads);
        let block_of = |r: u32| ((u64::from(r) - first) as usize) / per;
        // Stable counting sort of batch indices by block.
        let mut starts = vec![0usize; threads + 1];
        for &r in rows {
            starts[block_of(r) + 1] += 1;
        }
        for b in 0..threads {
            starts[b + 1] += starts[b];
        }
        let mut fill = starts.clone();
        let mut order = vec![0u32; rows.len()];
        for (i, &r) in rows.iter().enumerate() {
            let b = block_of(r);
            order[fill[b]] = i as u32;
            fill[b] += 1;
        }
        let order = order.as_slice();
        let starts = starts.as_slice();
        std::thread::scope(|s| {
            let mut blocks = self.data.chunks_mut(per * dim).enumerate();
            let mine = blocks.next();
            for (b, block) in blocks {
                let block_first = first + (b * per) as u64;
                let bucket = &order[starts[b]..starts[b + 1]];
                s.spawn(move || apply_bucket(block, block_first, dim, rows, values, bucket));
            }
            if let Some((_, block)) = mine {
                apply_bucket(
                    block,
                    first,
                    dim,
                    rows,
                    values,
                    &order[starts[0]..starts[1]],
                );
            }
        });
        Ok(())
    }

    /// [`Table::apply`] on the calling thread with the values given as little-endian f32
    /// bytes (a frame's value section, at any alignment), so that they are added straight from
    /// where they were received. All or nothing, as `apply`.
    pub fn apply_le(&mut self, rows: &[u32], values: &[u8]) -> Result<(), TableError> {
        if !values.len().is_multiple_of(4) {
            return Err(TableError::Shape {
                values: values.len() / 4,
                rows: rows.len(),
                dim: self.dim,
            });
        }
        self.check(rows, values.len() / 4)?;
        apply_all(&mut self.data, self.first, self.dim, rows, values);
        Ok(())
    }

    /// Copies the given rows out, row-major.
    pub fn gather(&self, rows: &[u32]) -> Result<Vec<f32>, TableError> {
        self.check(rows, rows.len() * self.dim)?;
        let mut out = Vec::with_capacity(rows.len() * self.dim);
        for &r in rows {
            let at = (u64::from(r) - self.first) as usize * self.dim;
            out.extend_from_slice(&self.data[at..at + self.dim]);
        }
        Ok(out)
    }
}

/// Tables at least this large ask for transparent huge pages (4 MiB).
const HUGE_PAGES_MIN_BYTES: usize = 4 << 20;

/// How many values a table of `rows` × `dim` holds, or `Err(bytes)` (saturated) when that
/// does not fit in memory's address space.
fn values_of(rows: &Range<u64>, dim: usize) -> Result<usize, u64> {
    let len = rows.end.saturating_sub(rows.start);
    let values = len.checked_mul(dim as u64).ok_or(u64::MAX)?;
    usize::try_from(values).map_err(|_| values.saturating_mul(4))
}

/// Asks the kernel to back the vector's (still untouched) capacity with transparent huge
/// pages: random rows then cost far fewer TLB misses. Only a hint; ignored where unsupported.
fn advise_huge_pages(data: &mut Vec<f32>) {
    let bytes = data.capacity() * 4;
    if bytes >= HUGE_PAGES_MIN_BYTES {
        crate::slab::advise_huge_pages(data.as_mut_ptr().cast(), bytes);
    }
}

/// Applies every update of the batch to `data` (which starts at row `first`), in batch order.
fn apply_all<V: Values + ?Sized>(
    data: &mut [f32],
    first: u64,
    dim: usize,
    rows: &[u32],
    values: &V,
) {
    // The first rows are asked for up front, so that a batch shorter than the distance (a
    // frame of 64 rows, say) is prefetched whole, not only from the distance on.
    for &r in rows.iter().take(PREFETCH_AHEAD) {
        prefetch_row(data, (u64::from(r) - first) as usize * dim, dim);
    }
    for (i, &r) in rows.iter().enumerate() {
        if let Some(&ahead) = rows.get(i + PREFETCH_AHEAD) {
            prefetch_row(data, (u64::from(ahead) - first) as usize * dim, dim);
        }
        let at = (u64::from(r) - first) as usize * dim;
        add_row(&mut data[at..at + dim], values.row(i, dim));
    }
}

/// How many updates ahead the table row is prefetched: random rows are latency-bound, and
/// rows in flight hide it. On the 2-core development VM (`cargo bench -p gpu --bench apply`,
/// 64-float rows) 24–32 gave 12.0–12.6 GB/s on one thread against 10.7–11.2 with 8, and 64
/// or more fell to 10.2–10.5 (the loads then outrun what the core can hold in flight).
const PREFETCH_AHEAD: usize = 32;

/// Hints the CPU to start loading `data[at..at + dim]` (a no-op off x86-64).
#[inline(always)]
fn prefetch_row(data: &[f32], at: usize, dim: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        // 16 floats per 64-byte cache line.
        let mut k = 0;
        while k < dim {
            let p = data.as_ptr().wrapping_add(at + k) as *const i8;
            // SAFETY: a prefetch is a hint that never faults and reads nothing observable;
            // SSE is part of the x86-64 baseline.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p) };
            k += 16;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (data, at, dim);
}

/// Applies the updates `bucket` (batch indices, in batch order) to `block`, which starts at row
/// `block_first`; every index in `bucket` names a row inside the block.
fn apply_bucket(
    block: &mut [f32],
    block_first: u64,
    dim: usize,
    rows: &[u32],
    values: &[f32],
    bucket: &[u32],
) {
    for &i in bucket.iter().take(PREFETCH_AHEAD) {
        let at = (u64::from(rows[i as usize]) - block_first) as usize * dim;
        prefetch_row(block, at, dim);
    }
    for (k, &i) in bucket.iter().enumerate() {
        if let Some(&ahead) = bucket.get(k + PREFETCH_AHEAD) {
            let at = (u64::from(rows[ahead as usize]) - block_first) as usize * dim;
            prefetch_row(block, at, dim);
        }
        let i = i as usize;
        let at = (u64::from(rows[i]) - block_first) as usize * dim;
        add_row(&mut block[at..at + dim], values.row(i, dim));
    }
}

/// A batch's delta values: f32s, or their little-endian bytes (a frame's value section, at
/// any alignment), so that a frame can be applied straight from where it was received.
trait Values {
    /// The values of the batch's i-th row (the caller has checked the shape).
    fn row(&self, i: usize, dim: usize) -> &Self;
    /// `dst += self`, element by element (over the shorter of the two), written so that the
    /// compiler emits vector adds.
    fn add_to(&self, dst: &mut [f32]);
}

impl Values for [f32] {
    fn row(&self, i: usize, dim: usize) -> &Self {
        &self[i * dim..(i + 1) * dim]
    }

    #[inline(always)]
    fn add_to(&self, dst: &mut [f32]) {
        let n = dst.len().min(self.len());
        for (d, s) in dst[..n].iter_mut().zip(&self[..n]) {
            *d += *s;
        }
    }
}

impl Values for [u8] {
    fn row(&self, i: usize, dim: usize) -> &Self {
        &self[i * dim * 4..(i + 1) * dim * 4]
    }

    #[inline(always)]
    fn add_to(&self, dst: &mut [f32]) {
        for (d, b) in dst.iter_mut().zip(self.chunks_exact(4)) {
            *d += f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
    }
}

/// `dst += src`; on x86-64 CPUs with AVX2 (detected once, at run time) the same loop is
/// compiled for 8-wide vectors.
#[inline(always)]
fn add_row<V: Values + ?Sized>(dst: &mut [f32], src: &V) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports AVX2 (checked just above), the only requirement of
        // `add_row_avx2`'s target feature; the function itself is safe code.
        unsafe { add_row_avx2(dst, src) };
        return;
    }
    src.add_to(dst);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn add_row_avx2<V: Values + ?Sized>(dst: &mut [f32], src: &V) {
    src.add_to(dst);
}

/// Whether the CPU has AVX2 (cached by the standard library's detection).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn has_avx2() -> bool {
    std::arch::is_x86_feature_detected!("avx2")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apply_gather_and_refusals() {
        let mut t = Table::zeros(100..110, 2);
        t.apply(&[101, 101, 109], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 1)
            .unwrap();
        assert_eq!(
            t.gather(&[101, 109, 100]).unwrap(),
            vec![4.0, 6.0, 5.0, 6.0, 0.0, 0.0]
        );
        assert!(matches!(
            t.apply(&[110], &[1.0, 1.0], 1),
            Err(TableError::Row { .. })
        ));
        assert!(matches!(
            t.apply(&[100], &[1.0], 1),
            Err(TableError::Shape { .. })
        ));
        assert!(t.gather(&[99]).is_err());
    }

    #[test]
    fn applying_little_endian_bytes_is_bit_for_bit_applying_floats() {
        let rows: Vec<u32> = (0..3_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) % 700) + 300)
            .collect();
        let values: Vec<f32> = (0..rows.len() * 12)
            .map(|i| ((i % 89) as f32).cos() * 1e-2 - 0.003)
            .collect();
        // Misaligned on purpose: a frame's value section sits anywhere in the message.
        let mut bytes = vec![0u8];
        bytes.extend(values.iter().flat_map(|v| v.to_le_bytes()));
        let mut a = Table::zeros(300..1_000, 12);
        let mut b = a.clone();
        a.apply(&rows, &values, 1).unwrap();
        b.apply_le(&rows, &bytes[1..]).unwrap();
        assert!(
            a.data()
                .iter()
                .zip(b.data())
                .all(|(x, y)| x.to_bits() == y.to_bits())
        );
        // The same refusals, and nothing written.
        let before = b.clone();
        assert!(matches!(
            b.apply_le(&[1_000], &bytes[1..49]),
            Err(TableError::Row { .. })
        ));
        assert!(matches!(
            b.apply_le(&[300], &bytes[1..48]),
            Err(TableError::Shape { .. })
        ));
        assert!(matches!(
            b.apply_le(&[300], &bytes[1..3]),
            Err(TableError::Shape { .. })
        ));
        assert_eq!(b, before);
    }

    #[test]
    fn tables_made_together_are_the_tables_made_alone() {
        // Small tables share slabs (two slabs' worth here), a large one is made alone, and an
        // empty range is an empty table.
        let dim = 64;
        let mut ranges: Vec<Range<u64>> = (0..40u64).map(|i| i * 4_096..(i + 1) * 4_096).collect();
        ranges.push(1 << 30..(1 << 30) + 20_000);
        ranges.push(7..7);
        let mut many = Table::try_zeros_many(&ranges, dim).unwrap();
        assert_eq!(many.len(), ranges.len());
        for (t, r) in many.iter().zip(&ranges) {
            assert_eq!(t, &Table::zeros(r.clone(), dim));
        }
        // Each is a table of its own: writing one leaves its neighbours zero.
        let rows: Vec<u32> = vec![4_096, 8_191];
        let values = vec![1.5f32; rows.len() * dim];
        many[1].apply(&rows, &values, 1).unwrap();
        let mut alone = Table::zeros(4_096..8_192, dim);
        alone.apply(&rows, &values, 1).unwrap();
        assert_eq!(many[1], alone);
        assert!(
            many[0]
                .data()
                .iter()
                .chain(many[2].data())
                .all(|&v| v == 0.0)
        );
        // A group too small to fill a huge page is made table by table.
        let few = Table::try_zeros_many(&[0..10, 10..20], 4).unwrap();
        assert_eq!(few, [Table::zeros(0..10, 4), Table::zeros(10..20, 4)]);
        assert!(few.iter().all(|t| matches!(t.data, Store::Own(_))));
        assert!(matches!(many[0].data, Store::Shared { .. }));
        assert!(matches!(many[40].data, Store::Own(_)));
        // Dropping some keeps the others (their slab lives on).
        let kept = many.split_off(30);
        drop(many);
        assert!(kept[0].data().iter().all(|&v| v == 0.0));
        assert_eq!(kept[0].rows(), 30 * 4_096..31 * 4_096);
    }

    #[test]
    fn parallel_is_bit_for_bit_sequential() {
        let rows: Vec<u32> = (0..20_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) % 5_000) + 1_000)
            .collect();
        let values: Vec<f32> = (0..rows.len() * 8)
            .map(|i| ((i % 97) as f32).sin() * 1e-3 + 0.1)
            .collect();
        let mut a = Table::zeros(1_000..6_000, 8);
        let mut b = a.clone();
        a.apply(&rows, &values, 1).unwrap();
        b.apply(&rows, &values, 4).unwrap();
        assert!(
            a.data()
                .iter()
                .zip(b.data())
                .all(|(x, y)| x.to_bits() == y.to_bits())
        );
    }
}
