//! One table API over every device kind: [`Table`] holds a model block's `rows × dim` f32
//! values on the CPU (the twin in [`crate::cpu`]) or, with the `cuda` feature, on a CUDA device.
//!
//! **Invariant:** every operation validates its whole input before touching the table, so an
//! error (bad row, bad shape, batch larger than the staging buffers, out of memory, device lost)
//! leaves the table as it was. A table whose device was lost (or marked lost by the fault switch
//! [`Table::inject_device_lost`]) refuses every later operation with [`Error::DeviceLost`]; its
//! owner rebuilds it elsewhere from a checkpoint and the delta stream.

use std::ops::Range;

use crate::{Device, DeviceKind, cpu};

/// Why a table operation was refused. The table is unchanged in every case.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A row outside the table.
    #[error("row {row} outside {range:?}")]
    Row {
        /// The row.
        row: u32,
        /// The table's rows.
        range: Range<u64>,
    },
    /// Values and rows (or the table's dim) disagree.
    #[error("{values} values for {rows} rows of dim {dim}")]
    Shape {
        /// Values given.
        values: usize,
        /// Rows given.
        rows: usize,
        /// The table's dim.
        dim: usize,
    },
    /// A batch larger than the staging buffers hold.
    #[error("a batch of {rows} rows is larger than the staging limit of {max_rows} rows")]
    BatchTooLarge {
        /// Rows in the batch.
        rows: usize,
        /// The limit, [`TableConfig::max_batch_rows`].
        max_rows: usize,
    },
    /// The device cannot hold the allocation.
    #[error("out of memory on {device}: {bytes} bytes requested")]
    OutOfMemory {
        /// The device's name.
        device: String,
        /// Bytes the failed allocation asked for.
        bytes: u64,
    },
    /// The device is gone (or the fault switch says so); the table can no longer be used.
    #[error("device lost")]
    DeviceLost,
    /// The device kind cannot be used by this process (no driver, no device, feature off).
    #[error("device unavailable: {0}")]
    Unavailable(String),
    /// Any other driver or compiler failure.
    #[error("driver error: {0}")]
    Driver(String),
}

/// Limits and tuning of a table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableConfig {
    /// Threads the CPU twin applies a batch with.
    pub cpu_threads: usize,
    /// Most rows one batch (apply or gather) may carry: the size of each staging buffer.
    pub max_batch_rows: usize,
}

impl Default for TableConfig {
    fn default() -> Self {
        TableConfig {
            cpu_threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            max_batch_rows: 1 << 20,
        }
    }
}

enum Inner {
    Cpu(cpu::Table),
    #[cfg(feature = "cuda")]
    Cuda(Box<crate::cuda::CudaTable>),
}

/// A `rows × dim` f32 table on one device.
pub struct Table {
    inner: Inner,
    device: Device,
    config: TableConfig,
    lost: bool,
}

impl std::fmt::Debug for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Table")
            .field("device", &self.device.name)
            .field("rows", &self.rows())
            .field("dim", &self.dim())
            .field("lost", &self.lost)
            .finish()
    }
}

/// Checks a batch against a table of `range` and `dim`: shape, size limit, rows in range.
pub(crate) fn validate(
    rows: &[u32],
    values: usize,
    range: &Range<u64>,
    dim: usize,
    max_batch_rows: usize,
) -> Result<(), Error> {
    if rows.len().checked_mul(dim) != Some(values) {
        return Err(Error::Shape {
            values,
            rows: rows.len(),
            dim,
        });
    }
    if rows.len() > max_batch_rows {
        return Err(Error::BatchTooLarge {
            rows: rows.len(),
            max_rows: max_batch_rows,
        });
    }
    if let Some(&row) = rows.iter().find(|r| !range.contains(&u64::from(**r))) {
        return Err(Error::Row {
            row,
            range: range.clone(),
        });
    }
    Ok(())
}

impl Table {
    /// A zeroed table for `rows` (a slot's range) of `dim` columns on `device`. Refuses a zero
    /// `dim` (`Shape`), memory the device cannot give (`OutOfMemory`), and a device kind this
    /// process cannot use (`Unavailable`).
    pub fn create(
        device: &Device,
        rows: Range<u64>,
        dim: usize,
        config: TableConfig,
    ) -> Result<Self, Error> {
        if dim == 0 || rows.end < rows.start {
            return Err(Error::Shape {
                values: 0,
                rows: rows.end.saturating_sub(rows.start) as usize,
                dim,
            });
        }
        let bytes = (rows.end - rows.start)
            .saturating_mul(dim as u64)
            .saturating_mul(4);
        // Linux overcommits: an allocation larger than free memory may succeed and then be
        // killed while zeroing, so the CPU refuses what its free memory cannot hold.
        if device.kind == DeviceKind::Cpu
            && device.memory_free_bytes > 0
            && bytes > device.memory_free_bytes
        {
            return Err(Error::OutOfMemory {
                device: device.name.clone(),
                bytes,
            });
        }
        let inner = match device.kind {
            DeviceKind::Cpu => Inner::Cpu(cpu::Table::try_zeros(rows, dim).map_err(|bytes| {
                Error::OutOfMemory {
                    device: device.name.clone(),
                    bytes,
                }
            })?),
            DeviceKind::Cuda => cuda_table(device, rows, dim, &config)?,
        };
        Ok(Table {
            inner,
            device: device.clone(),
            config,
            lost: false,
        })
    }

    /// The host table `table` on `device`: on the CPU it becomes the table itself (no copy,
    /// no second allocation); on a CUDA device it is copied up (see [`Table::create`] and
    /// [`Table::load`]), and handed back with the error if that fails, so the caller can place
    /// it elsewhere.
    pub fn from_host(
        device: &Device,
        table: cpu::Table,
        config: TableConfig,
    ) -> Result<Self, (Error, cpu::Table)> {
        if device.kind == DeviceKind::Cpu {
            return Ok(Table {
                inner: Inner::Cpu(table),
                device: device.clone(),
                config,
                lost: false,
            });
        }
        Table::copy_of(device, &table, config).map_err(|e| (e, table))
    }

    /// A copy of the host table `table` on `device` (see [`Table::create`] and
    /// [`Table::load`]); the host table stays as it is.
    pub fn copy_of(
        device: &Device,
        table: &cpu::Table,
        config: TableConfig,
    ) -> Result<Self, Error> {
        let mut t = Table::create(device, table.rows(), table.dim(), config)?;
        t.load(table.data())?;
        Ok(t)
    }

    /// The device the table lives on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The table's limits.
    pub fn config(&self) -> &TableConfig {
        &self.config
    }

    /// The rows it covers.
    pub fn rows(&self) -> Range<u64> {
        match &self.inner {
            Inner::Cpu(t) => t.rows(),
            #[cfg(feature = "cuda")]
            Inner::Cuda(t) => t.rows(),
        }
    }

    /// Columns.
    pub fn dim(&self) -> usize {
        match &self.inner {
            Inner::Cpu(t) => t.dim(),
            #[cfg(feature = "cuda")]
            Inner::Cuda(t) => t.dim(),
        }
    }

    /// The fault switch: every later operation returns [`Error::DeviceLost`], as if the device
    /// had gone away. For tests of the owner's fallback.
    pub fn inject_device_lost(&mut self) {
        self.lost = true;
    }

    /// Whether the device was lost (or marked lost).
    pub fn is_lost(&self) -> bool {
        self.lost
    }

    fn alive(&self) -> Result<(), Error> {
        if self.lost {
            Err(Error::DeviceLost)
        } else {
            Ok(())
        }
    }

    /// Records a lost device so later calls refuse at once.
    fn note(&mut self, r: Result<(), Error>) -> Result<(), Error> {
        if r == Err(Error::DeviceLost) {
            self.lost = true;
        }
        r
    }

    /// Replaces the whole table with `data` (row-major, `rows × dim` values), e.g. from a
    /// checkpoint.
    pub fn load(&mut self, data: &[f32]) -> Result<(), Error> {
        self.alive()?;
        let len = (self.rows().end - self.rows().start) as usize;
        if data.len() != len * self.dim() {
            return Err(Error::Shape {
                values: data.len(),
                rows: len,
                dim: self.dim(),
            });
        }
        let r = match &mut self.inner {
            Inner::Cpu(t) => {
                t.load(data);
                Ok(())
            }
            #[cfg(feature = "cuda")]
            Inner::Cuda(t) => t.load(data),
        };
        self.note(r)
    }

    /// The whole table, row-major (for a checkpoint). CUDA tables copy out through pinned
    /// host staging.
    pub fn export(&self) -> Result<Vec<f32>, Error> {
        self.alive()?;
        match &self.inner {
            Inner::Cpu(t) => Ok(t.data().to_vec()),
            #[cfg(feature = "cuda")]
            Inner::Cuda(t) => t.export(),
        }
    }

    /// Adds `values[i·dim..]` to row `rows[i]` for every i (a row may repeat). All or nothing.
    pub fn apply(&mut self, rows: &[u32], values: &[f32]) -> Result<(), Error> {
        self.apply_many(&[(rows, values)])
    }

    /// Applies several batches in order. Every batch is validated before any is applied, so an
    /// error leaves the table unchanged. On a CUDA device the host-to-device copy of batch k+1
    /// overlaps the scatter-add of batch k; the call returns once all are applied.
    pub fn apply_many(&mut self, batches: &[(&[u32], &[f32])]) -> Result<(), Error> {
        self.alive()?;
        let (range, dim) = (self.rows(), self.dim());
        for (rows, values) in batches {
            validate(rows, values.len(), &range, dim, self.config.max_batch_rows)?;
        }
        let threads = self.config.cpu_threads;
        let r = match &mut self.inner {
            Inner::Cpu(t) => {
                for (rows, values) in batches {
                    t.apply(rows, values, threads)?;
                }
                Ok(())
            }
            #[cfg(feature = "cuda")]
            Inner::Cuda(t) => t.apply_many(batches),
        };
        self.note(r)
    }

    /// Copies the given rows out, row-major.
    pub fn gather(&self, rows: &[u32]) -> Result<Vec<f32>, Error> {
        self.alive()?;
        let (range, dim) = (self.rows(), self.dim());
        validate(
            rows,
            rows.len() * dim,
            &range,
            dim,
            self.config.max_batch_rows,
        )?;
        match &self.inner {
            Inner::Cpu(t) => Ok(t.gather(rows)?),
            #[cfg(feature = "cuda")]
            Inner::Cuda(t) => t.gather(rows),
        }
    }
}

#[cfg(feature = "cuda")]
fn cuda_table(
    device: &Device,
    rows: Range<u64>,
    dim: usize,
    config: &TableConfig,
) -> Result<Inner, Error> {
    Ok(Inner::Cuda(Box::new(crate::cuda::CudaTable::create(
        device, rows, dim, config,
    )?)))
}

#[cfg(not(feature = "cuda"))]
fn cuda_table(
    _device: &Device,
    _rows: Range<u64>,
    _dim: usize,
    _config: &TableConfig,
) -> Result<Inner, Error> {
    Err(Error::Unavailable(
        "built without the `cuda` feature".into(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpu_table(rows: Range<u64>, dim: usize, max_batch_rows: usize) -> Table {
        let config = TableConfig {
            cpu_threads: 2,
            max_batch_rows,
        };
        Table::create(&crate::cpu_device(), rows, dim, config).unwrap()
    }

    #[test]
    fn load_apply_gather_export() {
        let mut t = cpu_table(10..13, 2, 16);
        t.load(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
        t.apply(&[12, 10, 12], &[1.0, 1.0, 2.0, 2.0, 3.0, 3.0])
            .unwrap();
        assert_eq!(t.gather(&[12, 10]).unwrap(), vec![9.0, 10.0, 3.0, 4.0]);
        assert_eq!(t.export().unwrap(), vec![3.0, 4.0, 3.0, 4.0, 9.0, 10.0]);
        assert_eq!(t.device().kind, DeviceKind::Cpu);
    }

    #[test]
    fn a_host_table_becomes_a_cpu_table_as_it_is_and_comes_back_from_an_unusable_device() {
        let mut host = cpu::Table::zeros(4..6, 2);
        host.load(&[1.0, 2.0, 3.0, 4.0]);
        let expected = host.clone();
        let allocation = host.data().as_ptr();
        let t = Table::from_host(&crate::cpu_device(), host, TableConfig::default()).unwrap();
        assert_eq!((t.rows(), t.dim()), (4..6, 2));
        assert_eq!(t.export().unwrap(), expected.data());
        // On the CPU the host table is the table: the same allocation, no copy.
        match &t.inner {
            Inner::Cpu(inner) => assert_eq!(inner.data().as_ptr(), allocation),
            #[cfg(feature = "cuda")]
            Inner::Cuda(_) => panic!("a CPU device made a CUDA table"),
        }
        // A CUDA device this process cannot use refuses it and hands the table back whole.
        let mut cuda = crate::cpu_device();
        cuda.kind = DeviceKind::Cuda;
        cuda.ordinal = 99;
        match Table::from_host(&cuda, expected.clone(), TableConfig::default()) {
            Ok(_) => panic!("an unusable device took the table"),
            Err((_, back)) => assert_eq!(back, expected),
        }
    }

    #[test]
    fn bad_input_leaves_the_table_unchanged() {
        let mut t = cpu_table(0..4, 2, 3);
        t.load(&[1.0; 8]).unwrap();
        let before = t.export().unwrap();
        assert!(matches!(
            t.apply(&[0, 4], &[1.0; 4]),
            Err(Error::Row { row: 4, .. })
        ));
        assert!(matches!(t.apply(&[0], &[1.0; 3]), Err(Error::Shape { .. })));
        assert_eq!(
            t.apply(&[0, 1, 2, 3], &[1.0; 8]),
            Err(Error::BatchTooLarge {
                rows: 4,
                max_rows: 3
            })
        );
        // A good batch followed by a bad one: neither is applied.
        let good: (&[u32], &[f32]) = (&[0], &[5.0, 5.0]);
        let bad: (&[u32], &[f32]) = (&[9], &[5.0, 5.0]);
        assert!(t.apply_many(&[good, bad]).is_err());
        assert!(matches!(t.load(&[0.0; 7]), Err(Error::Shape { .. })));
        assert!(matches!(t.gather(&[7]), Err(Error::Row { .. })));
        assert_eq!(t.export().unwrap(), before);
    }

    #[test]
    fn the_fault_switch_loses_the_device() {
        let mut t = cpu_table(0..4, 1, 8);
        t.apply(&[1], &[1.0]).unwrap();
        t.inject_device_lost();
        assert!(t.is_lost());
        assert_eq!(t.apply(&[1], &[1.0]), Err(Error::DeviceLost));
        assert_eq!(t.gather(&[1]), Err(Error::DeviceLost));
        assert_eq!(t.export(), Err(Error::DeviceLost));
        assert_eq!(t.load(&[0.0; 4]), Err(Error::DeviceLost));
    }

    #[test]
    fn a_table_larger_than_free_memory_is_out_of_memory() {
        let mut small = crate::cpu_device();
        small.memory_free_bytes = 1_000;
        let r = Table::create(&small, 0..100, 3, TableConfig::default());
        assert!(
            matches!(r, Err(Error::OutOfMemory { bytes: 1_200, .. })),
            "{r:?}"
        );
        assert!(Table::create(&small, 0..100, 2, TableConfig::default()).is_ok());
    }

    #[test]
    fn zero_dim_is_refused() {
        let r = Table::create(&crate::cpu_device(), 0..4, 0, TableConfig::default());
        assert!(matches!(r, Err(Error::Shape { .. })));
    }

    #[test]
    fn a_cuda_table_without_a_cuda_device_is_a_typed_error() {
        // Whatever the build, this machine's discovery decides; here (no driver) it is refused.
        let fake = Device {
            kind: DeviceKind::Cuda,
            ordinal: 0,
            name: "no such device".into(),
            memory_total_bytes: 1 << 30,
            memory_free_bytes: 1 << 30,
            compute_capability: Some((9, 0)),
        };
        let (found, _) = crate::discover_report();
        if found.iter().any(|d| d.kind == DeviceKind::Cuda) {
            eprintln!("skipped: a CUDA device is present");
            return;
        }
        let r = Table::create(&fake, 0..4, 2, TableConfig::default());
        assert!(matches!(r, Err(Error::Unavailable(_))), "{r:?}");
    }
}
