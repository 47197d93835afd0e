//! Deltas: sparse updates to the rows of a `rows × dim` table, and the rules around them.
//!
//! - [`Hlc`]: a hybrid logical clock timestamp (tick on send, merge on receive).
//! - Rows map to slots in **contiguous ranges** ([`slot_rows`], [`slot_of_row`]): slot `s` owns
//!   rows `⌈s·R/1024⌉ .. ⌈(s+1)·R/1024⌉`, so each owner's part of a table is a few dense blocks
//!   (cache- and DMA-friendly, one contiguous device allocation per slot) rather than rows
//!   scattered by a hash.
//! - [`DeltaBatch`]: row ids and `count × dim` values for one slot, with a checksum chained to
//!   the previous batch; compose (same rows summed), invert (for rollback), magnitude metrics,
//!   and validation (dims, finite values, a magnitude bound).

use std::hash::Hasher as _;
use std::ops::Range;

use cluster::{SLOT_COUNT, Slot};
use serde::{Deserialize, Serialize};

/// A hybrid logical clock timestamp: wall time, a logical counter, and the issuing node.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Hlc {
    /// Milliseconds (the largest wall time seen).
    pub wall_ms: u64,
    /// Orders events within one millisecond.
    pub logical: u32,
    /// Breaks ties between nodes; in a delta frame, the producer, which keys its chain on each
    /// slot. At most [`MAX_HLC_NODE`] (48 bits: a frame carries no more, and JSON readers
    /// hold integers exactly up to 2^53).
    pub node: u64,
}

/// The largest HLC node a delta frame carries: 48 bits.
pub const MAX_HLC_NODE: u64 = (1 << 48) - 1;

impl Hlc {
    /// A clock for a node.
    pub fn new(node: u64) -> Self {
        Hlc {
            wall_ms: 0,
            logical: 0,
            node,
        }
    }

    /// Advances for a local event or a send; returns the new timestamp.
    pub fn tick(&mut self, now_ms: u64) -> Hlc {
        if now_ms > self.wall_ms {
            self.wall_ms = now_ms;
            self.logical = 0;
        } else {
            self.logical = self.logical.saturating_add(1);
        }
        *self
    }

    /// Merges a received timestamp; returns the new local timestamp (after both).
    pub fn merge(&mut self, remote: Hlc, now_ms: u64) -> Hlc {
        let wall = self.wall_ms.max(remote.wall_ms).max(now_ms);
        self.logical = if wall == self.wall_ms && wall == remote.wall_ms {
            self.logical.max(remote.logical).saturating_add(1)
        } else if wall == self.wall_ms {
            self.logical.saturating_add(1)
        } else if wall == remote.wall_ms {
            remote.logical.saturating_add(1)
        } else {
            0
        };
        self.wall_ms = wall;
        *self
    }
}

/// The rows of a `rows`-row table that slot `slot` owns.
pub fn slot_rows(rows: u64, slot: Slot) -> Range<u64> {
    let s = slot.index() as u128;
    let r = u128::from(rows);
    let n = SLOT_COUNT as u128;
    let start = (s * r).div_ceil(n) as u64;
    let end = ((s + 1) * r).div_ceil(n) as u64;
    start..end
}

/// The slot that owns `row` of a `rows`-row table (None when `row ≥ rows`).
pub fn slot_of_row(rows: u64, row: u64) -> Option<Slot> {
    if row >= rows {
        return None;
    }
    // The largest s with ⌈s·R/1024⌉ ≤ row is ⌊(row·1024 + 1024 − 1)/R⌋ − … computed directly:
    // s = ⌊(row·1024 + 1023) / R⌋ can overshoot by one at range ends; correct it.
    let n = SLOT_COUNT as u128;
    let mut s = ((u128::from(row) * n) / u128::from(rows)) as u64;
    while s > 0 && slot_rows(rows, Slot::new(s).ok()?).start > row {
        s -= 1;
    }
    while slot_rows(rows, Slot::new(s).ok()?).end <= row {
        s += 1;
    }
    Slot::new(s).ok()
}

/// Why a delta was refused.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum DeltaError {
    /// Row ids and values disagree in length, or a dimension is zero.
    #[error("shape: {0}")]
    Shape(String),
    /// A row outside the table or outside the slot.
    #[error("row {row} is outside {range:?}")]
    RowOutOfRange {
        /// The row.
        row: u32,
        /// The rows allowed.
        range: Range<u64>,
    },
    /// NaN or an infinity.
    #[error("value {index} is not finite")]
    NotFinite {
        /// Its index among the values.
        index: usize,
    },
    /// A value beyond the model's magnitude bound.
    #[error("|value| {value} exceeds the bound {bound}")]
    TooLarge {
        /// The value.
        value: f32,
        /// The bound.
        bound: f32,
    },
    /// The checksum does not match the content, or the parent is not the previous batch.
    #[error("checksum chain broken: {0}")]
    Chain(String),
}

/// A sparse update of one slot's rows: `rows.len() × dim` values, row-major.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeltaBatch {
    /// Columns.
    pub dim: u32,
    /// Row ids (in the whole table).
    pub rows: Vec<u32>,
    /// Values, `rows.len() × dim`, row-major.
    pub values: Vec<f32>,
    /// When it was produced.
    pub ts: Hlc,
    /// The checksum of the previous batch of this producer for this slot (0 for the first).
    pub parent: u64,
    /// The checksum of this batch (over parent, dim, rows and value bits).
    pub checksum: u64,
}

/// The FNV-1a 64 offset basis: the starting value of [`fnv`].
pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// FNV-1a 64 of `bytes`, continuing from `h`.
pub fn fnv(mut h: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    h
}

/// A fast checksum over a sequence of 32-bit words, for delta contents and whole tables: XXH3
/// 64 (seed 0) of the words' little-endian bytes, fed as a stream, so how the words are split
/// between calls does not matter. It detects corruption; it is not a cryptographic hash.
#[derive(Clone)]
pub struct WordHash {
    state: twox_hash::XxHash3_64,
}

impl std::fmt::Debug for WordHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WordHash").finish_non_exhaustive()
    }
}

impl Default for WordHash {
    fn default() -> Self {
        WordHash {
            state: twox_hash::XxHash3_64::new(),
        }
    }
}

/// Words converted per step on the way to the hash.
const WORD_CHUNK: usize = 256;

impl WordHash {
    /// A fresh hash.
    pub fn new() -> Self {
        Self::default()
    }

    /// Absorbs one word.
    pub fn word(&mut self, w: u32) {
        self.state.write(&w.to_le_bytes());
    }

    fn absorb<W: Copy>(&mut self, words: &[W], word: impl Fn(W) -> u32) {
        let mut buf = [0u8; WORD_CHUNK * 4];
        for chunk in words.chunks(WORD_CHUNK) {
            for (dst, w) in buf.chunks_exact_mut(4).zip(chunk) {
                dst.copy_from_slice(&word(*w).to_le_bytes());
            }
            self.state.write(&buf[..chunk.len() * 4]);
        }
    }

    /// Absorbs words.
    pub fn u32s(&mut self, words: &[u32]) {
        self.absorb(words, |w| w);
    }

    /// Absorbs the bit patterns of floats.
    pub fn f32s(&mut self, values: &[f32]) {
        self.absorb(values, f32::to_bits);
    }

    /// Absorbs little-endian words (a trailing partial word is ignored).
    pub fn le_bytes(&mut self, bytes: &[u8]) {
        self.state.write(&bytes[..bytes.len() / 4 * 4]);
    }

    /// The checksum.
    pub fn finish(&self) -> u64 {
        self.state.finish()
    }
}

fn checksum_head(parent: u64, dim: u32) -> WordHash {
    let mut h = WordHash::new();
    h.u32s(&[parent as u32, (parent >> 32) as u32, dim]);
    h
}

/// The checksum of a batch's content chained to its parent: [`WordHash`] over the words
/// parent (low, high), dim, the row ids, then the value bits.
pub fn checksum(parent: u64, dim: u32, rows: &[u32], values: &[f32]) -> u64 {
    let mut h = checksum_head(parent, dim);
    h.u32s(rows);
    h.f32s(values);
    h.finish()
}

/// [`checksum`] over rows and values given as little-endian bytes (a frame's body).
pub fn checksum_le(parent: u64, dim: u32, rows: &[u8], values: &[u8]) -> u64 {
    let mut h = checksum_head(parent, dim);
    h.le_bytes(rows);
    h.le_bytes(values);
    h.finish()
}

impl DeltaBatch {
    /// Builds a batch and computes its checksum.
    pub fn new(
        dim: u32,
        rows: Vec<u32>,
        values: Vec<f32>,
        ts: Hlc,
        parent: u64,
    ) -> Result<Self, DeltaError> {
        if dim == 0 {
            return Err(DeltaError::Shape("dim 0".into()));
        }
        if values.len() != rows.len() * dim as usize {
            return Err(DeltaError::Shape(format!(
                "{} values for {} rows of dim {dim}",
                values.len(),
                rows.len()
            )));
        }
        let checksum = checksum(parent, dim, &rows, &values);
        Ok(DeltaBatch {
            dim,
            rows,
            values,
            ts,
            parent,
            checksum,
        })
    }

    /// The values of the i-th row.
    pub fn row(&self, i: usize) -> &[f32] {
        let d = self.dim as usize;
        &self.values[i * d..(i + 1) * d]
    }

    /// Checks the content against the checksum and the parent against the previous checksum.
    pub fn verify_chain(&self, previous: u64) -> Result<(), DeltaError> {
        if self.parent != previous {
            return Err(DeltaError::Chain(format!(
                "parent {:x}, previous {:x}",
                self.parent, previous
            )));
        }
        let c = checksum(self.parent, self.dim, &self.rows, &self.values);
        if c != self.checksum {
            return Err(DeltaError::Chain(format!(
                "content {c:x}, header {:x}",
                self.checksum
            )));
        }
        Ok(())
    }

    /// Checks rows against the slot's range and values against finiteness and a bound.
    pub fn validate(&self, range: &Range<u64>, bound: f32) -> Result<(), DeltaError> {
        for &r in &self.rows {
            if !range.contains(&u64::from(r)) {
                return Err(DeltaError::RowOutOfRange {
                    row: r,
                    range: range.clone(),
                });
            }
        }
        for (i, v) in self.values.iter().enumerate() {
            if !v.is_finite() {
                return Err(DeltaError::NotFinite { index: i });
            }
            if v.abs() > bound {
                return Err(DeltaError::TooLarge { value: *v, bound });
            }
        }
        Ok(())
    }

    /// Composes two batches of the same dim: rows present in both are summed; rows are sorted.
    /// The result's parent is `self`'s; its timestamp the later one.
    pub fn compose(&self, other: &DeltaBatch) -> Result<DeltaBatch, DeltaError> {
        if self.dim != other.dim {
            return Err(DeltaError::Shape(format!(
                "dims {} and {}",
                self.dim, other.dim
            )));
        }
        let d = self.dim as usize;
        let mut sums: std::collections::BTreeMap<u32, Vec<f32>> = std::collections::BTreeMap::new();
        for b in [self, other] {
            for (i, &r) in b.rows.iter().enumerate() {
                let acc = sums.entry(r).or_insert_with(|| vec![0.0; d]);
                for (a, v) in acc.iter_mut().zip(b.row(i)) {
                    *a += *v;
                }
            }
        }
        let rows: Vec<u32> = sums.keys().copied().collect();
        let values: Vec<f32> = sums.into_values().flatten().collect();
        DeltaBatch::new(self.dim, rows, values, self.ts.max(other.ts), self.parent)
    }

    /// The batch that undoes this one (values negated), chained to `parent`.
    pub fn invert(&self, parent: u64) -> DeltaBatch {
        let values: Vec<f32> = self.values.iter().map(|v| -v).collect();
        let checksum = checksum(parent, self.dim, &self.rows, &values);
        DeltaBatch {
            dim: self.dim,
            rows: self.rows.clone(),
            values,
            ts: self.ts,
            parent,
            checksum,
        }
    }

    /// The L2 norm of all values.
    pub fn l2(&self) -> f64 {
        self.values
            .iter()
            .map(|v| f64::from(*v) * f64::from(*v))
            .sum::<f64>()
            .sqrt()
    }

    /// The largest absolute value.
    pub fn max_abs(&self) -> f32 {
        self.values.iter().fold(0.0f32, |m, v| m.max(v.abs()))
    }
}

/// The rows of a change that [`capture`] keeps, ready for `Producer::send` (row ids in the
/// whole table, the differences row-major), and what it left out.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Captured {
    /// The rows whose change is significant.
    pub rows: Vec<u32>,
    /// Their differences `new − old`, `rows.len() × dim`, row-major.
    pub values: Vec<f32>,
    /// Rows that changed, but by an L2 norm at or below the threshold: left out.
    pub below_threshold: usize,
    /// The L2 norm of the kept differences, all rows together.
    pub l2: f64,
}

/// Captures the change from `old` to `new`, two row-major copies of the rows `first_row ..` of a
/// `dim`-column table (the first step of the delta pipeline: observe old and new, extract the
/// sparse difference). A row is kept when its difference `new − old` has an L2 norm above
/// `min_l2`; with 0, every row that changed at all. Applied to `old`, the kept differences give
/// `new` up to one rounding per value (exactly where the two are within a factor of two of each
/// other); left-out rows stay as they were.
///
/// Refused, with nothing captured: a zero `dim`, sides of different lengths or not a whole
/// number of rows, rows past `u32::MAX`, a negative or non-finite threshold, and a value that
/// is not finite on either side or whose difference overflows (`DeltaError::NotFinite` with its
/// index).
pub fn capture(
    first_row: u32,
    dim: u32,
    old: &[f32],
    new: &[f32],
    min_l2: f32,
) -> Result<Captured, DeltaError> {
    let d = dim as usize;
    if d == 0 || old.len() != new.len() || !old.len().is_multiple_of(d) {
        return Err(DeltaError::Shape(format!(
            "old has {} values and new {}, which must be the same whole number of rows of dim {dim}",
            old.len(),
            new.len()
        )));
    }
    let n = old.len() / d;
    if u64::from(first_row) + n as u64 > u64::from(u32::MAX) + 1 {
        return Err(DeltaError::Shape(format!(
            "{n} rows from row {first_row} pass the largest row id"
        )));
    }
    if !(min_l2.is_finite() && min_l2 >= 0.0) {
        return Err(DeltaError::Shape(format!(
            "the threshold {min_l2} is not a finite number ≥ 0"
        )));
    }
    let mut out = Captured::default();
    let mut diff = vec![0.0f32; d];
    let mut sum = 0.0f64;
    for (i, (o, w)) in old.chunks_exact(d).zip(new.chunks_exact(d)).enumerate() {
        let mut sq = 0.0f64;
        for (k, ((x, y), out)) in o.iter().zip(w).zip(diff.iter_mut()).enumerate() {
            *out = y - x;
            if !out.is_finite() {
                return Err(DeltaError::NotFinite { index: i * d + k });
            }
            sq += f64::from(*out) * f64::from(*out);
        }
        if sq == 0.0 {
            continue;
        }
        if sq.sqrt() > f64::from(min_l2) {
            out.rows.push(first_row + i as u32);
            out.values.extend_from_slice(&diff);
            sum += sq;
        } else {
            out.below_threshold += 1;
        }
    }
    out.l2 = sum.sqrt();
    Ok(out)
}

#[cfg(test)]
mod tests {

    #[test]
    fn the_word_hash_is_xxh3_64_of_the_little_endian_words() {
        // The checksum is part of the wire frame and of checkpoints: pin it to the reference
        // XXH3-64 (seed 0) values, for inputs on each of XXH3's paths (empty, short, mid,
        // and the long, vectorised one).
        for (n, want) in [
            (0usize, 0x2d06_8005_38d3_94c2u64),
            (200, 0x20a8_7db9_07ce_74e4),
            (16_652, 0xd0ec_4d2d_4830_ed09),
        ] {
            let bytes: Vec<u8> = (0..n as u32)
                .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
                .collect();
            let mut h = WordHash::new();
            h.le_bytes(&bytes[..n / 8 * 4]);
            h.le_bytes(&bytes[n / 8 * 4..]);
            assert_eq!(h.finish(), want, "{n} bytes");
        }
    }

    #[test]
    fn the_word_hash_does_not_depend_on_how_words_are_fed() {
        let words: Vec<u32> = (0..103u32).map(|i| i.wrapping_mul(2_654_435_761)).collect();
        let mut whole = WordHash::new();
        whole.u32s(&words);
        for split in [0, 1, 2, 3, 5, 50, 102, 103] {
            let mut parts = WordHash::new();
            parts.u32s(&words[..split]);
            for w in &words[split..] {
                parts.word(*w);
            }
            assert_eq!(parts.finish(), whole.finish(), "split at {split}");
        }
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        let mut le = WordHash::new();
        le.le_bytes(&bytes);
        assert_eq!(le.finish(), whole.finish());
    }

    #[test]
    fn the_word_hash_sees_every_bit_and_the_length() {
        let words: Vec<u32> = (0..64u32).collect();
        let base = {
            let mut h = WordHash::new();
            h.u32s(&words);
            h.finish()
        };
        let mut seen = std::collections::HashSet::new();
        for i in 0..words.len() {
            for bit in 0..32 {
                let mut w = words.clone();
                w[i] ^= 1 << bit;
                let mut h = WordHash::new();
                h.u32s(&w);
                assert!(seen.insert(h.finish()), "collision at word {i} bit {bit}");
                assert_ne!(h.finish(), base);
            }
        }
        let mut longer = WordHash::new();
        longer.u32s(&words);
        longer.word(0);
        assert_ne!(longer.finish(), base);
    }
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn hlc_orders_send_and_receive() {
        let mut a = Hlc::new(1);
        let mut b = Hlc::new(2);
        let t1 = a.tick(100);
        let t2 = a.tick(100);
        assert!(t2 > t1);
        // b's clock is behind: merging a's timestamp moves it past it.
        let t3 = b.merge(t2, 50);
        assert!(t3 > t2);
        let t4 = b.tick(50);
        assert!(t4 > t3);
    }

    #[test]
    fn compose_sums_repeated_rows_and_invert_undoes() {
        let a =
            DeltaBatch::new(2, vec![5, 1], vec![1.0, 2.0, 3.0, 4.0], Hlc::default(), 0).unwrap();
        let b = DeltaBatch::new(2, vec![1], vec![10.0, 20.0], Hlc::default(), a.checksum).unwrap();
        let c = a.compose(&b).unwrap();
        assert_eq!(c.rows, vec![1, 5]);
        assert_eq!(c.values, vec![13.0, 24.0, 1.0, 2.0]);
        let undo = c.compose(&c.invert(0)).unwrap();
        assert!(undo.values.iter().all(|v| *v == 0.0));
        assert!(b.verify_chain(a.checksum).is_ok());
        assert!(b.verify_chain(0).is_err());
        let mut tampered = b.clone();
        tampered.values[0] = 11.0;
        assert!(tampered.verify_chain(a.checksum).is_err());
    }

    #[test]
    fn validation() {
        let range = 0..10;
        let ok = DeltaBatch::new(1, vec![3], vec![1.0], Hlc::default(), 0).unwrap();
        assert!(ok.validate(&range, 100.0).is_ok());
        for (rows, v) in [
            (vec![10], 1.0),
            (vec![3], f32::NAN),
            (vec![3], f32::INFINITY),
            (vec![3], 1e9),
        ] {
            let b = DeltaBatch::new(1, rows, vec![v], Hlc::default(), 0).unwrap();
            assert!(b.validate(&range, 100.0).is_err());
        }
        assert!(DeltaBatch::new(2, vec![1], vec![1.0], Hlc::default(), 0).is_err());
        assert!(DeltaBatch::new(0, vec![], vec![], Hlc::default(), 0).is_err());
    }

    proptest! {
        #[test]
        fn a_capture_applied_to_old_gives_new(
            dim in 1u32..9,
            seed in any::<u64>(),
            rows in 0usize..40,
            min_l2 in prop_oneof![Just(0.0f32), 0.0f32..2.0],
        ) {
            // old and new share some rows exactly, differ slightly in others and a lot in the
            // rest; the kept differences, added to old, give new up to one rounding per value,
            // and every row left out changed by at most the threshold.
            let d = dim as usize;
            let mut x = seed | 1;
            let mut next = || { x ^= x << 13; x ^= x >> 7; x ^= x << 17; x };
            let old: Vec<f32> = (0..rows * d).map(|_| (next() % 2001) as f32 / 100.0 - 10.0).collect();
            let mut new = old.clone();
            for r in 0..rows {
                let kind = next() % 3;
                for v in &mut new[r * d..(r + 1) * d] {
                    match kind {
                        0 => {}
                        1 => *v += (next() % 11) as f32 / 1000.0,
                        _ => *v = (next() % 4001) as f32 / 10.0 - 200.0,
                    }
                }
            }
            let c = capture(7, dim, &old, &new, min_l2).unwrap();
            prop_assert_eq!(c.values.len(), c.rows.len() * d);
            let mut applied = old.clone();
            for (i, &r) in c.rows.iter().enumerate() {
                let at = (r - 7) as usize * d;
                for (a, v) in applied[at..at + d].iter_mut().zip(&c.values[i * d..(i + 1) * d]) {
                    *a += *v;
                }
            }
            let mut left_out_changed = 0;
            for r in 0..rows {
                let (a, o, w) = (&applied[r * d..(r + 1) * d], &old[r * d..(r + 1) * d], &new[r * d..(r + 1) * d]);
                if c.rows.contains(&(7 + r as u32)) {
                    // fl(x + fl(w − x)) − w = w·δ₂ + (w − x)·δ₁·(1 + δ₂), |δ| ≤ ε/2.
                    for ((&a, &x), &w) in a.iter().zip(o).zip(w) {
                        prop_assert!((a - w).abs() <= f32::EPSILON * (w.abs() + x.abs()),
                            "row {}: {} for {}", r, a, w);
                    }
                } else {
                    prop_assert_eq!(a, o);
                    let l2 = o.iter().zip(w).map(|(x, y)| f64::from(y - x).powi(2)).sum::<f64>().sqrt();
                    prop_assert!(l2 <= f64::from(min_l2), "row {} left out with a change of {}", r, l2);
                    if l2 > 0.0 { left_out_changed += 1; }
                }
            }
            prop_assert_eq!(c.below_threshold, left_out_changed);
        }
    }

    #[test]
    fn a_capture_refuses_bad_shapes_thresholds_and_values() {
        let two = [1.0f32, 2.0];
        assert!(matches!(
            capture(0, 0, &two, &two, 0.0),
            Err(DeltaError::Shape(_))
        ));
        assert!(matches!(
            capture(0, 2, &two, &two[..1], 0.0),
            Err(DeltaError::Shape(_))
        ));
        assert!(matches!(
            capture(0, 3, &two, &two, 0.0),
            Err(DeltaError::Shape(_))
        ));
        assert!(matches!(
            capture(u32::MAX, 1, &two, &two, 0.0),
            Err(DeltaError::Shape(_))
        ));
        assert_eq!(
            capture(u32::MAX, 2, &two, &two, 0.0).map(|c| c.rows.len()),
            Ok(0)
        );
        for t in [-1.0, f32::NAN, f32::INFINITY] {
            assert!(matches!(
                capture(0, 2, &two, &two, t),
                Err(DeltaError::Shape(_))
            ));
        }
        assert_eq!(
            capture(0, 2, &two, &[1.0, f32::NAN], 0.0),
            Err(DeltaError::NotFinite { index: 1 })
        );
        // A difference that overflows f32 is refused, not sent as an infinity.
        assert_eq!(
            capture(0, 1, &[-3e38], &[3e38], 0.0),
            Err(DeltaError::NotFinite { index: 0 })
        );
        // Identical sides capture nothing; a change at or below the threshold is counted.
        let c = capture(10, 2, &[1.0, 2.0, 3.0, 4.0], &[1.0, 2.0, 3.0, 4.5], 0.5).unwrap();
        assert_eq!((c.rows.len(), c.below_threshold, c.l2), (0, 1, 0.0));
        let c = capture(10, 2, &[1.0, 2.0, 3.0, 4.0], &[1.0, 2.0, 3.0, 4.5], 0.25).unwrap();
        assert_eq!(
            (c.rows, c.values, c.below_threshold, c.l2),
            (vec![11], vec![0.0, 0.5], 0, 0.5)
        );
    }
    proptest! {
        #[test]
        fn slots_partition_the_rows(rows in 1u64..5_000_000, probe in any::<u64>()) {
            // Ranges are contiguous, in order, and cover every row exactly once.
            let mut next = 0;
            for s in Slot::all() {
                let r = slot_rows(rows, s);
                prop_assert_eq!(r.start, next);
                next = r.end;
            }
            prop_assert_eq!(next, rows);
            let row = probe % rows;
            let s = slot_of_row(rows, row).unwrap();
            prop_assert!(slot_rows(rows, s).contains(&row));
            prop_assert!(slot_of_row(rows, rows).is_none());
        }
    }
}
