//! The CPU twin: a dense `rows × dim` f32 table in host memory, with the same operations the
//! CUDA path has (apply a sparse batch by scatter-add, gather rows), parallel by row range and
//! deterministic: each row receives its updates in batch order whatever the thread count, so
//! the result is bit-for-bit the sequential one.

use std::ops::Range;

/// Why an operation was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    /// A row outside the table.
    #[error("row {row} outside {range:?}")]
    Row {
        /// The row.
        row: u32,
        /// The table's rows.
        range: Range<u64>,
    },
    /// Values and rows disagree.
    #[error("{values} values for {rows} rows of dim {dim}")]
    Shape {
        /// Values given.
        values: usize,
        /// Rows given.
        rows: usize,
        /// The table's dim.
        dim: usize,
    },
}

/// Batches smaller than this are applied on the calling thread.
pub const PARALLEL_MIN_ROWS: usize = 4_096;

/// A dense table covering rows `first .. first + len` of a model (one slot's block).
#[derive(Clone, Debug, PartialEq)]
pub struct Table {
    first: u64,
    dim: usize,
    data: Vec<f32>,
}

impl Table {
    /// A zeroed table for `rows` (a slot's range) of `dim` columns.
    pub fn zeros(rows: Range<u64>, dim: usize) -> Self {
        let len = (rows.end.saturating_sub(rows.start)) as usize;
        Table {
            first: rows.start,
            dim,
            data: vec![0.0; len * dim],
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
            apply_range(&mut self.data, first, dim, rows, values);
            return Ok(());
        }
        // Split the table into `threads` contiguous row blocks; each thread applies, in batch
        // order, the updates that fall in its block.
        let total_rows = self.data.len() / dim;
        let per = total_rows.div_ceil(threads);
        std::thread::scope(|s| {
            let mut rest = self.data.as_mut_slice();
            let mut start = first;
            while !rest.is_empty() {
                let take = (per * dim).min(rest.len());
                let (block, tail) = rest.split_at_mut(take);
                rest = tail;
                let block_first = start;
                start += (take / dim) as u64;
                s.spawn(move || apply_range(block, block_first, dim, rows, values));
            }
        });
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

/// Applies the updates whose rows fall in `block` (which starts at row `block_first`).
fn apply_range(block: &mut [f32], block_first: u64, dim: usize, rows: &[u32], values: &[f32]) {
    let block_rows = (block.len() / dim) as u64;
    for (i, &r) in rows.iter().enumerate() {
        let r = u64::from(r);
        if r < block_first || r >= block_first + block_rows {
            continue;
        }
        let at = (r - block_first) as usize * dim;
        let dst = &mut block[at..at + dim];
        let src = &values[i * dim..(i + 1) * dim];
        for (d, s) in dst.iter_mut().zip(src) {
            *d += *s;
        }
    }
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
