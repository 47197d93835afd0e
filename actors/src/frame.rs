//! The delta wire frame: a versioned binary layout, decoded with bounds checks and without
//! copying the values.
//!
//! ```text
//! offset size  field            (all integers little-endian)
//!  0     4     magic            "TSDL"
//!  4     1     version          1
//!  5     1     dtype            0 = f32 (1 = f16, 2 = bf16: reserved, refused for now)
//!  6     2     hlc.node_hi      bits 32..48 of hlc.node (0 from producers before it)
//!  8     2     slot             0..1024
//! 10     1     model_len        1..=64
//! 11     1     reserved         0
//! 12     4     dim              1..=65536
//! 16     4     count            rows in the batch, ≤ MAX_ROWS_PER_FRAME
//! 20     8     hlc.wall_ms
//! 28     4     hlc.logical
//! 32     4     hlc.node         bits 0..32 (the producer: keys its chain on each slot)
//! 36     8     parent checksum
//! 44     8     checksum         over parent, dim, rows and value bits (see delta::checksum)
//! 52     n     model name       model_len bytes of [A-Za-z0-9_-]
//! 52+n   p     padding          zeros, to a multiple of 4
//! ...    4·c   row ids          u32 each
//! ...    4·c·d values           f32 each, row-major
//! ```
//! The frame's length must be exactly the header, the name, the padding, the rows and the
//! values: anything shorter is truncated, anything longer is refused.

use crate::delta::{DeltaBatch, Hlc, MAX_HLC_NODE, checksum_le};

/// The magic bytes.
pub const MAGIC: &[u8; 4] = b"TSDL";
/// The layout version this code writes and reads.
pub const VERSION: u8 = 1;
/// Fixed header size.
pub const HEADER_LEN: usize = 52;
/// Most rows in one frame.
pub const MAX_ROWS_PER_FRAME: u32 = 1 << 20;
/// Largest dimension.
pub const MAX_DIM: u32 = 65_536;
/// Largest frame.
pub const MAX_FRAME_BYTES: usize = 64 << 20;

/// Why a frame was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Shorter than its header says.
    #[error("truncated: {len} bytes, {need} needed")]
    Truncated {
        /// Bytes present.
        len: usize,
        /// Bytes needed.
        need: usize,
    },
    /// Longer than its header says.
    #[error("{extra} bytes after the frame")]
    Trailing {
        /// The excess.
        extra: usize,
    },
    /// Not a delta frame.
    #[error("bad magic")]
    Magic,
    /// Another layout version.
    #[error("unsupported frame version {0}")]
    Version(u8),
    /// A dtype this node does not read.
    #[error("unsupported dtype {0}")]
    Dtype(u8),
    /// A field out of range.
    #[error("invalid field: {0}")]
    Field(String),
    /// Over a limit.
    #[error("too large: {0}")]
    TooLarge(String),
}

/// A decoded frame, borrowing the bytes it came from.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Frame<'a> {
    /// The model.
    pub model: &'a str,
    /// The slot.
    pub slot: u16,
    /// Columns.
    pub dim: u32,
    /// Rows in the batch.
    pub count: u32,
    /// Timestamp.
    pub ts: Hlc,
    /// Parent checksum.
    pub parent: u64,
    /// Checksum.
    pub checksum: u64,
    rows: &'a [u8],
    values: &'a [u8],
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

impl<'a> Frame<'a> {
    /// Decodes and checks the layout (not the checksum: see [`Frame::verify`]).
    pub fn decode(b: &'a [u8]) -> Result<Frame<'a>, FrameError> {
        if b.len() > MAX_FRAME_BYTES {
            return Err(FrameError::TooLarge(format!("{} bytes", b.len())));
        }
        if b.len() < HEADER_LEN {
            return Err(FrameError::Truncated {
                len: b.len(),
                need: HEADER_LEN,
            });
        }
        if &b[0..4] != MAGIC {
            return Err(FrameError::Magic);
        }
        if b[4] != VERSION {
            return Err(FrameError::Version(b[4]));
        }
        if b[5] != 0 {
            return Err(FrameError::Dtype(b[5]));
        }
        let slot = u16_at(b, 8);
        if usize::from(slot) >= cluster::SLOT_COUNT {
            return Err(FrameError::Field(format!("slot {slot}")));
        }
        let name_len = usize::from(b[10]);
        if !(1..=64).contains(&name_len) {
            return Err(FrameError::Field(format!("model name length {name_len}")));
        }
        let dim = u32_at(b, 12);
        if !(1..=MAX_DIM).contains(&dim) {
            return Err(FrameError::Field(format!("dim {dim}")));
        }
        let count = u32_at(b, 16);
        if count > MAX_ROWS_PER_FRAME {
            return Err(FrameError::TooLarge(format!("{count} rows")));
        }
        let name_end = HEADER_LEN + name_len;
        let rows_at = name_end.div_ceil(4) * 4;
        let rows_len = count as usize * 4;
        let values_len = (count as usize)
            .checked_mul(dim as usize)
            .and_then(|n| n.checked_mul(4))
            .ok_or_else(|| FrameError::TooLarge("values".into()))?;
        let need = rows_at + rows_len + values_len;
        if b.len() < need {
            return Err(FrameError::Truncated { len: b.len(), need });
        }
        if b.len() > need {
            return Err(FrameError::Trailing {
                extra: b.len() - need,
            });
        }
        let model = std::str::from_utf8(&b[HEADER_LEN..name_end])
            .ok()
            .filter(|m| {
                m.bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
            })
            .ok_or_else(|| FrameError::Field("model name".into()))?;
        Ok(Frame {
            model,
            slot,
            dim,
            count,
            ts: Hlc {
                wall_ms: u64_at(b, 20),
                logical: u32_at(b, 28),
                node: u64::from(u32_at(b, 32)) | u64::from(u16_at(b, 6)) << 32,
            },
            parent: u64_at(b, 36),
            checksum: u64_at(b, 44),
            rows: &b[rows_at..rows_at + rows_len],
            values: &b[rows_at + rows_len..need],
        })
    }

    /// The row ids.
    pub fn rows(&self) -> impl ExactSizeIterator<Item = u32> + '_ {
        self.rows
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
    }

    /// All values, row-major.
    pub fn values(&self) -> impl ExactSizeIterator<Item = f32> + '_ {
        self.values
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
    }

    /// The values of the i-th row.
    pub fn row_values(&self, i: usize) -> impl ExactSizeIterator<Item = f32> + '_ {
        let d = self.dim as usize * 4;
        let end = ((i + 1) * d).min(self.values.len());
        let start = (i * d).min(end);
        self.values[start..end]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
    }

    /// The raw value bytes (little-endian f32, row-major), e.g. for a device copy.
    pub fn value_bytes(&self) -> &'a [u8] {
        self.values
    }

    /// Whether the checksum matches the content.
    pub fn verify(&self) -> bool {
        checksum_le(self.parent, self.dim, self.rows, self.values) == self.checksum
    }

    /// Copies into an owned batch.
    pub fn to_batch(&self) -> DeltaBatch {
        DeltaBatch {
            dim: self.dim,
            rows: self.rows().collect(),
            values: self.values().collect(),
            ts: self.ts,
            parent: self.parent,
            checksum: self.checksum,
        }
    }
}

/// Encodes a batch for a model's slot.
pub fn encode(model: &str, slot: u16, batch: &DeltaBatch) -> Result<Vec<u8>, FrameError> {
    let name = model.as_bytes();
    if !(1..=64).contains(&name.len())
        || !name
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || *c == b'-' || *c == b'_')
    {
        return Err(FrameError::Field(format!("model name {model:?}")));
    }
    let count = u32::try_from(batch.rows.len()).map_err(|_| FrameError::TooLarge("rows".into()))?;
    if count > MAX_ROWS_PER_FRAME || batch.values.len() != batch.rows.len() * batch.dim as usize {
        return Err(FrameError::Field(
            "rows and values disagree or too many rows".into(),
        ));
    }
    let rows_at = (HEADER_LEN + name.len()).div_ceil(4) * 4;
    let mut b = Vec::with_capacity(rows_at + batch.rows.len() * 4 + batch.values.len() * 4);
    if batch.ts.node > MAX_HLC_NODE {
        return Err(FrameError::Field(format!(
            "hlc node {} above 2^48",
            batch.ts.node
        )));
    }
    b.extend_from_slice(MAGIC);
    b.push(VERSION);
    b.push(0);
    b.extend_from_slice(&((batch.ts.node >> 32) as u16).to_le_bytes());
    b.extend_from_slice(&slot.to_le_bytes());
    b.push(name.len() as u8);
    b.push(0);
    b.extend_from_slice(&batch.dim.to_le_bytes());
    b.extend_from_slice(&count.to_le_bytes());
    b.extend_from_slice(&batch.ts.wall_ms.to_le_bytes());
    b.extend_from_slice(&batch.ts.logical.to_le_bytes());
    b.extend_from_slice(&(batch.ts.node as u32).to_le_bytes());
    b.extend_from_slice(&batch.parent.to_le_bytes());
    b.extend_from_slice(&batch.checksum.to_le_bytes());
    b.extend_from_slice(name);
    b.resize(rows_at, 0);
    for r in &batch.rows {
        b.extend_from_slice(&r.to_le_bytes());
    }
    for v in &batch.values {
        b.extend_from_slice(&v.to_le_bytes());
    }
    if b.len() > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge(format!("{} bytes", b.len())));
    }
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn batch(rows: Vec<u32>, dim: u32) -> DeltaBatch {
        let values = (0..rows.len() * dim as usize)
            .map(|i| i as f32 * 0.5)
            .collect();
        DeltaBatch::new(
            dim,
            rows,
            values,
            Hlc {
                wall_ms: 7,
                logical: 1,
                node: 3,
            },
            42,
        )
        .unwrap()
    }

    #[test]
    fn round_trip() {
        let b = batch(vec![9, 2, 9], 3);
        let bytes = encode("emb", 17, &b).unwrap();
        let f = Frame::decode(&bytes).unwrap();
        assert_eq!((f.model, f.slot, f.dim, f.count), ("emb", 17, 3, 3));
        assert!(f.verify());
        assert_eq!(f.to_batch(), b);
        assert_eq!(f.row_values(1).collect::<Vec<_>>(), vec![1.5, 2.0, 2.5]);
        // Every truncation and any extra byte is refused.
        for cut in 0..bytes.len() {
            assert!(Frame::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut long = bytes.clone();
        long.push(0);
        assert!(matches!(
            Frame::decode(&long),
            Err(FrameError::Trailing { extra: 1 })
        ));
        let mut tampered = bytes.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert!(!Frame::decode(&tampered).unwrap().verify());
    }

    #[test]
    fn the_producer_takes_48_bits_and_older_readers_see_its_low_32() {
        let mut b = batch(vec![1], 2);
        b.ts.node = 0x1234_89ab_cdef;
        let bytes = encode("m", 0, &b).unwrap();
        assert_eq!(Frame::decode(&bytes).unwrap().ts.node, 0x1234_89ab_cdef);
        // The low 32 bits where version 1 always had the node, the high 16 in the two bytes
        // that were flags (0), which no reader checked.
        assert_eq!(bytes[32..36], 0x89ab_cdefu32.to_le_bytes());
        assert_eq!(bytes[6..8], 0x1234u16.to_le_bytes());
        // A frame from an earlier producer (zeros there) reads as the same 32-bit producer.
        let mut older = bytes.clone();
        older[6..8].copy_from_slice(&[0, 0]);
        assert_eq!(Frame::decode(&older).unwrap().ts.node, 0x89ab_cdef);
        // More than a frame holds is refused, not cut.
        b.ts.node = MAX_HLC_NODE + 1;
        assert!(matches!(encode("m", 0, &b), Err(FrameError::Field(_))));
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 20_000, ..ProptestConfig::default() })]

        /// Fuzz: arbitrary bytes never panic the decoder.
        #[test]
        fn garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = Frame::decode(&bytes).map(|f| (f.verify(), f.rows().count(), f.values().count()));
        }

        /// Fuzz: a valid frame with random bytes flipped never panics, and a decode that
        /// succeeds has consistent lengths.
        #[test]
        fn mutated_frames_never_panic(rows in prop::collection::vec(0u32..1000, 0..20), dim in 1u32..8, flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6)) {
            let mut bytes = encode("m", 1, &batch(rows, dim)).unwrap();
            for (i, v) in flips {
                let at = i.index(bytes.len());
                bytes[at] = v;
            }
            if let Ok(f) = Frame::decode(&bytes) {
                prop_assert_eq!(f.rows().count(), f.count as usize);
                prop_assert_eq!(f.values().count(), f.count as usize * f.dim as usize);
            }
        }
    }
}
