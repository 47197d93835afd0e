//! Does a model fit a device, and which device should take it: pure functions over
//! [`Device`] descriptions, used by the node's placement.
//!
//! **Invariant:** no I/O; the same devices and requirements always give the same answer.

use crate::{Device, DeviceKind};

/// The element type of a model's table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dtype {
    /// 32-bit float: every device.
    F32,
    /// bfloat16: the CPU, and CUDA devices of compute capability 8.0 or higher.
    Bf16,
}

impl Dtype {
    /// Bytes per value.
    pub fn bytes(self) -> u64 {
        match self {
            Dtype::F32 => 4,
            Dtype::Bf16 => 2,
        }
    }

    /// `f32` or `bf16`.
    pub fn as_str(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::Bf16 => "bf16",
        }
    }
}

/// Lowest CUDA compute capability with bf16 arithmetic.
pub const BF16_MIN_CAPABILITY: (u32, u32) = (8, 0);

/// What a model's table needs from a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Requirements {
    /// Bytes of the table (rows × dim × dtype bytes, plus any staging the caller counts).
    pub table_bytes: u64,
    /// Element type.
    pub dtype: Dtype,
}

impl Requirements {
    /// The requirements of a `rows × dim` table of `dtype`.
    pub fn for_table(rows: u64, dim: u64, dtype: Dtype) -> Self {
        Requirements {
            table_bytes: rows.saturating_mul(dim).saturating_mul(dtype.bytes()),
            dtype,
        }
    }
}

/// Why a model does not fit.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Unfit {
    /// The device cannot compute in the dtype.
    #[error("{device}: {dtype} needs compute capability {}.{} or higher, it has {has}", BF16_MIN_CAPABILITY.0, BF16_MIN_CAPABILITY.1)]
    Dtype {
        /// The device's name.
        device: String,
        /// The dtype asked for.
        dtype: &'static str,
        /// The device's capability, printed.
        has: String,
    },
    /// Not enough free memory.
    #[error("{device}: needs {needed_bytes} bytes, {free_bytes} free")]
    Memory {
        /// The device's name.
        device: String,
        /// Bytes needed.
        needed_bytes: u64,
        /// Bytes free (after what is already assigned to it).
        free_bytes: u64,
    },
    /// No device satisfies the requirements: one reason per device.
    #[error("fits no device: {}", .0.join("; "))]
    Nowhere(Vec<String>),
}

/// Whether `device` can hold a table with `req`, with all its free memory.
pub fn check(device: &Device, req: &Requirements) -> Result<(), Unfit> {
    check_with_free(device, req, device.memory_free_bytes)
}

fn check_with_free(device: &Device, req: &Requirements, free_bytes: u64) -> Result<(), Unfit> {
    if req.dtype == Dtype::Bf16 && device.kind == DeviceKind::Cuda {
        let ok = device
            .compute_capability
            .is_some_and(|cc| cc >= BF16_MIN_CAPABILITY);
        if !ok {
            return Err(Unfit::Dtype {
                device: device.name.clone(),
                dtype: req.dtype.as_str(),
                has: device
                    .compute_capability_string()
                    .unwrap_or_else(|| "none".into()),
            });
        }
    }
    if free_bytes < req.table_bytes {
        return Err(Unfit::Memory {
            device: device.name.clone(),
            needed_bytes: req.table_bytes,
            free_bytes,
        });
    }
    Ok(())
}

/// The index of the device that should take a table with `req`, given the bytes already
/// assigned to each device (missing entries count as 0). CUDA devices are preferred; among the
/// devices of the preferred kind that fit, the one with the most free memory after its
/// assignments wins (ties: the lower index), which spreads tables across devices. The CPU is
/// chosen only when no CUDA device fits.
pub fn choose(
    devices: &[Device],
    req: &Requirements,
    assigned_bytes_per_device: &[u64],
) -> Result<usize, Unfit> {
    let mut reasons = Vec::new();
    let mut best: Option<(bool, u64, usize)> = None;
    for (i, d) in devices.iter().enumerate() {
        let assigned = assigned_bytes_per_device.get(i).copied().unwrap_or(0);
        let free = d.memory_free_bytes.saturating_sub(assigned);
        match check_with_free(d, req, free) {
            Ok(()) => {
                let key = (d.kind == DeviceKind::Cuda, free - req.table_bytes);
                if best.is_none_or(|(c, f, _)| key > (c, f)) {
                    best = Some((key.0, key.1, i));
                }
            }
            Err(e) => reasons.push(e.to_string()),
        }
    }
    match best {
        Some((_, _, i)) => Ok(i),
        None if devices.is_empty() => Err(Unfit::Nowhere(vec!["no devices".into()])),
        None => Err(Unfit::Nowhere(reasons)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn dev(kind: DeviceKind, free: u64, cc: Option<(u32, u32)>) -> Device {
        Device {
            kind,
            ordinal: 0,
            name: format!("{}-{free}", kind.as_str()),
            memory_total_bytes: free,
            memory_free_bytes: free,
            compute_capability: cc,
        }
    }

    #[test]
    fn bf16_needs_capability_8() {
        let req = Requirements::for_table(1000, 10, Dtype::Bf16);
        assert_eq!(req.table_bytes, 20_000);
        let old = dev(DeviceKind::Cuda, GIB, Some((7, 5)));
        let new = dev(DeviceKind::Cuda, GIB, Some((8, 0)));
        let cpu = dev(DeviceKind::Cpu, GIB, None);
        assert!(matches!(check(&old, &req), Err(Unfit::Dtype { .. })));
        assert_eq!(check(&new, &req), Ok(()));
        assert_eq!(check(&cpu, &req), Ok(()));
        let f32_req = Requirements::for_table(1000, 10, Dtype::F32);
        assert_eq!(check(&old, &f32_req), Ok(()));
    }

    #[test]
    fn memory_must_fit() {
        let d = dev(DeviceKind::Cuda, 100, Some((9, 0)));
        let req = Requirements {
            table_bytes: 101,
            dtype: Dtype::F32,
        };
        assert!(matches!(check(&d, &req), Err(Unfit::Memory { .. })));
        let req = Requirements {
            table_bytes: 100,
            dtype: Dtype::F32,
        };
        assert_eq!(check(&d, &req), Ok(()));
    }

    #[test]
    fn choose_spreads_across_devices_and_prefers_cuda() {
        let devices = vec![
            dev(DeviceKind::Cpu, 64 * GIB, None),
            dev(DeviceKind::Cuda, 10 * GIB, Some((9, 0))),
            dev(DeviceKind::Cuda, 10 * GIB, Some((9, 0))),
        ];
        let req = Requirements {
            table_bytes: 4 * GIB,
            dtype: Dtype::F32,
        };
        let mut assigned = vec![0u64; 3];
        let mut picks = Vec::new();
        for _ in 0..4 {
            let i = choose(&devices, &req, &assigned).unwrap();
            assigned[i] += req.table_bytes;
            picks.push(i);
        }
        // Two per GPU, alternating; then the GPUs are full and the CPU takes the next.
        assert_eq!(picks, vec![1, 2, 1, 2]);
        assert_eq!(choose(&devices, &req, &assigned), Ok(0));
    }

    #[test]
    fn a_model_that_fits_nowhere_says_why() {
        let devices = vec![
            dev(DeviceKind::Cpu, GIB, None),
            dev(DeviceKind::Cuda, 100 * GIB, Some((7, 0))),
        ];
        let req = Requirements {
            table_bytes: 2 * GIB,
            dtype: Dtype::Bf16,
        };
        match choose(&devices, &req, &[]) {
            Err(Unfit::Nowhere(reasons)) => {
                assert_eq!(reasons.len(), 2);
                assert!(reasons[0].contains("free"), "{reasons:?}");
                assert!(reasons[1].contains("compute capability"), "{reasons:?}");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(choose(&[], &req, &[]), Err(Unfit::Nowhere(_))));
    }
}
