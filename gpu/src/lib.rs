//! # gpu — devices and kernels
//!
//! Discovers what a node can hold tables in: always the CPU, plus CUDA devices when built with
//! the `cuda` feature and a driver is present. The CPU path is always built and is the reference
//! that GPU results are tested against.
//!
//! **Invariant:** the only crate in the workspace allowed `unsafe`; every `unsafe` block carries
//! a `SAFETY:` comment. **Boundary:** knows nothing of NATS, slots or models.
//!
//! Today: device discovery (the CPU) and the CPU twin (`cpu::Table`); CUDA kernels arrive with
//! the GPU issue behind the same operations.

pub mod cpu;

/// What kind of device a table can live on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
    /// A human-readable name.
    pub name: String,
    /// Total memory in bytes.
    pub memory_total_bytes: u64,
    /// Free memory in bytes when discovered.
    pub memory_free_bytes: u64,
}

/// The devices this process can use: the CPU always comes first.
pub fn discover() -> Vec<Device> {
    let (total, free) = host_memory().unwrap_or((0, 0));
    vec![Device {
        kind: DeviceKind::Cpu,
        name: format!(
            "cpu ({} threads)",
            std::thread::available_parallelism().map_or(1, |n| n.get())
        ),
        memory_total_bytes: total,
        memory_free_bytes: free,
    }]
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
    fn the_cpu_is_always_there() {
        let devices = super::discover();
        assert_eq!(devices[0].kind, super::DeviceKind::Cpu);
        assert!(devices[0].memory_total_bytes >= devices[0].memory_free_bytes);
    }
}
