//! # gpu — devices and kernels
//!
//! Discovers what a node can hold tables in: always the CPU, plus CUDA devices when built with
//! the `cuda` feature and a driver is present. The CPU path is always built and is the reference
//! that GPU results are tested against.
//!
//! **Invariant:** the only crate in the workspace allowed `unsafe`; every `unsafe` block carries
//! a `SAFETY:` comment. **Invariant:** discovery never panics: no driver, no device or a driver
//! error gives the CPU alone and a reason. **Boundary:** knows nothing of NATS, slots or models.
//!
//! Modules: [`cpu`] (the CPU twin), [`table`] (one table API over every device kind),
//! [`placement`] (does a model fit a device), [`bench`] (kernel benchmarks), `slab` (huge-page
//! slabs that small CPU tables are cut from), [`host`] (giving the C allocator's free memory
//! back), and `cuda` (CUDA discovery, kernels and tables; only with the `cuda` feature).

pub mod bench;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod host;
pub mod placement;
mod slab;
pub mod table;

pub use placement::{Dtype, Requirements, Unfit, check, choose};
pub use table::{Error, Table, TableConfig};

/// Most `apply_many` calls in flight on one CUDA device (8); more wait for one to finish. Past
/// a few threads the driver serialises them anyway (`tessel bench gpu`: 64-row windows went
/// from 27 µs on one thread to 138 µs each on 16), and each call in flight holds a staging.
pub const APPLIES_IN_FLIGHT_PER_DEVICE: usize = 8;

/// What kind of device a table can live on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeviceKind {
    /// Host memory.
    Cpu,
    /// A CUDA device.
    Cuda,
}

impl DeviceKind {
    /// `cpu` or `cuda`, as records and `tessel devices --json` print it.
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceKind::Cpu => "cpu",
            DeviceKind::Cuda => "cuda",
        }
    }
}

/// A device a node found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Device {
    /// Its kind.
    pub kind: DeviceKind,
    /// Its number among the devices of its kind (the CUDA ordinal; 0 for the CPU).
    pub ordinal: usize,
    /// A human-readable name.
    pub name: String,
    /// Total memory in bytes.
    pub memory_total_bytes: u64,
    /// Free memory in bytes when discovered.
    pub memory_free_bytes: u64,
    /// CUDA compute capability (major, minor); `None` for the CPU.
    pub compute_capability: Option<(u32, u32)>,
}

impl Device {
    /// The compute capability as records print it (`"9.0"`), `None` for the CPU.
    pub fn compute_capability_string(&self) -> Option<String> {
        self.compute_capability
            .map(|(major, minor)| format!("{major}.{minor}"))
    }
}

/// The CPU as a device: host memory from `/proc/meminfo` (zeros when it cannot be read).
pub fn cpu_device() -> Device {
    let (total, free) = host_memory().unwrap_or((0, 0));
    Device {
        kind: DeviceKind::Cpu,
        ordinal: 0,
        name: format!(
            "cpu ({} threads)",
            std::thread::available_parallelism().map_or(1, |n| n.get())
        ),
        memory_total_bytes: total,
        memory_free_bytes: free,
        compute_capability: None,
    }
}

/// The devices this process can use: the CPU always comes first.
pub fn discover() -> Vec<Device> {
    discover_report().0
}

/// The devices this process can use (the CPU first) and, when no CUDA device is among them,
/// why: the `cuda` feature is off, the driver library is missing, the driver reports no device,
/// or a driver call failed. Never panics.
pub fn discover_report() -> (Vec<Device>, Option<String>) {
    let mut devices = vec![cpu_device()];
    let reason = cuda_devices(&mut devices);
    (devices, reason)
}

#[cfg(feature = "cuda")]
fn cuda_devices(devices: &mut Vec<Device>) -> Option<String> {
    match cuda::discover() {
        Ok(found) if found.is_empty() => Some("the CUDA driver reports no device".into()),
        Ok(found) => {
            devices.extend(found);
            None
        }
        Err(reason) => Some(reason),
    }
}

#[cfg(not(feature = "cuda"))]
fn cuda_devices(_devices: &mut Vec<Device>) -> Option<String> {
    Some("built without the `cuda` feature".into())
}

/// Total and available host memory from `/proc/meminfo`, when it can be read.
fn host_memory() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with(name))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    };
    Some((field("MemTotal:")?, field("MemAvailable:")?))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_cpu_is_always_there_and_first() {
        let (devices, reason) = super::discover_report();
        assert_eq!(devices[0].kind, super::DeviceKind::Cpu);
        assert_eq!(devices[0].compute_capability, None);
        assert!(devices[0].memory_total_bytes >= devices[0].memory_free_bytes);
        assert!(
            devices[1..]
                .iter()
                .all(|d| d.kind == super::DeviceKind::Cuda)
        );
        // A reason exactly when no CUDA device was found.
        assert_eq!(reason.is_some(), devices.len() == 1);
    }
}
