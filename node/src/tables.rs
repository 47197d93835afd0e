//! Where this node's model tables live: the device book (which device each model's tables were
//! placed on, how many bytes each device was given, which devices were lost), the default
//! placement weight derived from device memory, and the fault switch that simulates a lost
//! device.
//!
//! - **Placement on a node**: the tables of one model on this node (one per slot it owns) go to
//!   one device, chosen by [`gpu::choose`] over the devices not lost, with the bytes already
//!   given to each device counted. CUDA devices are preferred; the CPU twin takes what fits
//!   nowhere else. A [`DeviceLease`] holds the bytes until it is dropped.
//! - **Lost devices**: each device has a generation; a lease remembers the generation it was
//!   taken at, and its tables count as lost once the device's generation moved on. A lost CUDA
//!   device is never chosen again by this process. The CPU is the fallback of last resort: a
//!   loss there (only the fault switch can cause one) loses the tables, never the CPU itself.
//! - **The fault switch**: `<c>.admin.<node>.fault` with `{"fault": "device-lost", "device":
//!   "cpu:0"}` marks a device lost (as a driver error would). Served only when the node's
//!   config has `fault_injection = true`; otherwise, and for anything malformed, the reply is
//!   a typed error and `tessel_faults_refused_total` counts it.
//! - **Device threads**: a device other than the CPU gets [`DEVICE_THREADS`] threads of its
//!   own, started on first use, that run its tables' applies and checkpoint exports
//!   ([`DeviceLease::threads`]). An apply
//!   there waits for the device; on a runtime thread under `block_in_place` it handed the
//!   runtime's worker to another thread on every call, and on 16 cores that churn cost the node
//!   about five cores (docs/benchmarks.md). On the CPU an apply runs inline, where it is cheap.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;
use cluster::Weight;
use futures::StreamExt;
use gpu::{Device, DeviceKind, Requirements, Unfit};
use serde_json::{Value, json};
use tracing::{info, warn};

use crate::metrics::Metrics;

/// A device's id inside this process: `cpu:0`, `cuda:1`.
pub fn device_id(d: &Device) -> String {
    format!("{}:{}", d.kind.as_str(), d.ordinal)
}

/// Bytes in a GiB.
const GIB: u64 = 1 << 30;

/// The placement weight of a node that does not set `capacity`: whole GiB of the largest CUDA
/// device's total memory, or of host memory when there is no CUDA device, clamped to the
/// weight range (a node whose memory cannot be read weighs 1).
pub fn default_weight(devices: &[Device]) -> Weight {
    let largest = |kind: DeviceKind| {
        devices
            .iter()
            .filter(|d| d.kind == kind)
            .map(|d| d.memory_total_bytes)
            .max()
    };
    let bytes = largest(DeviceKind::Cuda)
        .or_else(|| largest(DeviceKind::Cpu))
        .unwrap_or(0);
    let gib = (bytes / GIB).clamp(1, u64::from(Weight::MAX));
    Weight::new(gib).unwrap_or(Weight::ONE)
}

#[derive(Debug, Default)]
struct Book {
    /// Bytes given out per device.
    assigned: Vec<u64>,
    /// Devices this process no longer chooses (lost CUDA devices).
    unusable: Vec<bool>,
}

/// Threads of a device that run its tables' blocking operations: as many as the applies the
/// gpu crate lets one device have in flight (more would wait there anyway).
pub const DEVICE_THREADS: usize = gpu::APPLIES_IN_FLIGHT_PER_DEVICE;

/// Operations queued for one device's threads at most (a slot has one at a time, and a node
/// at most 1,024 slots per model); a full queue makes the caller wait.
const DEVICE_QUEUE: usize = 1_024;

/// An operation for a device's threads.
type Job = Box<dyn FnOnce() + Send>;

/// A fixed set of threads fed by a bounded queue (see [`DEVICE_THREADS`]). The threads end
/// when the queue's sender is dropped.
#[derive(Debug)]
pub struct Workers {
    jobs: tokio::sync::mpsc::Sender<Job>,
}

impl Workers {
    /// Starts `threads` threads named `<name>-<i>`.
    pub fn start(name: &str, threads: usize, queue: usize) -> std::io::Result<Workers> {
        let (jobs, rx) = tokio::sync::mpsc::channel::<Job>(queue.max(1));
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || {
                    loop {
                        // One thread waits in the queue at a time; the others wait for the lock.
                        let job = match rx.lock() {
                            Ok(mut rx) => rx.blocking_recv(),
                            Err(_) => None,
                        };
                        let Some(job) = job else { break };
                        // A panicking job drops its reply, which its caller sees; the thread
                        // stays.
                        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                    }
                })?;
        }
        Ok(Workers { jobs })
    }

    /// Runs `f` on one of the threads and waits for it without holding a runtime thread;
    /// `None` when it did not finish there (it panicked, or the threads are gone).
    pub async fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> Option<R> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = tx.send(f());
        });
        self.jobs.send(job).await.ok()?;
        rx.await.ok()
    }
}

/// The devices of this node and what was placed on them.
#[derive(Debug)]
pub struct DeviceBook {
    devices: Vec<Device>,
    generations: Vec<AtomicU64>,
    book: Mutex<Book>,
    metrics: Arc<Metrics>,
    /// Each device's threads (see [`Workers`]), started on first use (on the CPU only when
    /// asked for); `None` where they could not start.
    threads: Vec<OnceLock<Option<Workers>>>,
}

/// Why a model's tables could not be placed on this node.
#[derive(Debug, thiserror::Error)]
pub enum PlaceError {
    /// No device satisfies the requirements.
    #[error(transparent)]
    Unfit(#[from] Unfit),
    /// The book's lock was poisoned by a panic elsewhere.
    #[error("device book unavailable")]
    Poisoned,
}

impl DeviceBook {
    /// A book over `devices` (as [`gpu::discover`] returns them: the CPU first).
    pub fn new(devices: Vec<Device>, metrics: Arc<Metrics>) -> Arc<Self> {
        let n = devices.len();
        Arc::new(DeviceBook {
            generations: (0..n).map(|_| AtomicU64::new(0)).collect(),
            threads: (0..n).map(|_| OnceLock::new()).collect(),
            book: Mutex::new(Book {
                assigned: vec![0; n],
                unusable: vec![false; n],
            }),
            devices,
            metrics,
        })
    }

    /// The devices.
    pub fn devices(&self) -> &[Device] {
        &self.devices
    }

    /// Bytes given out per device, in device order.
    pub fn assigned(&self) -> Vec<u64> {
        self.book
            .lock()
            .map(|b| b.assigned.clone())
            .unwrap_or_default()
    }

    /// The index of the device with this id (`cpu:0`, `cuda:1`).
    pub fn find(&self, id: &str) -> Option<usize> {
        self.devices.iter().position(|d| device_id(d) == id)
    }

    /// Places a table of `req` on the best usable device (see [`gpu::choose`]); the bytes count
    /// against that device until the lease is dropped.
    pub fn place(self: &Arc<Self>, req: &Requirements) -> Result<DeviceLease, PlaceError> {
        let mut book = self.book.lock().map_err(|_| PlaceError::Poisoned)?;
        // Lost devices are offered with nothing free, so their reason says so.
        let offered: Vec<Device> = self
            .devices
            .iter()
            .zip(&book.unusable)
            .map(|(d, lost)| {
                let mut d = d.clone();
                if *lost {
                    d.name = format!("{} (lost)", d.name);
                    d.memory_free_bytes = 0;
                }
                d
            })
            .collect();
        let index = gpu::choose(&offered, req, &book.assigned)?;
        Ok(self.lease(&mut book, index, req.table_bytes))
    }

    /// Places a table on the CPU twin whatever the book says (the fallback when a chosen device
    /// could not allocate); the CPU table itself still refuses what host memory cannot hold.
    pub fn place_on_cpu(self: &Arc<Self>, bytes: u64) -> Result<DeviceLease, PlaceError> {
        let mut book = self.book.lock().map_err(|_| PlaceError::Poisoned)?;
        let index = self
            .devices
            .iter()
            .position(|d| d.kind == DeviceKind::Cpu)
            .ok_or_else(|| PlaceError::Unfit(Unfit::Nowhere(vec!["no CPU device".into()])))?;
        Ok(self.lease(&mut book, index, bytes))
    }

    fn lease(self: &Arc<Self>, book: &mut Book, index: usize, bytes: u64) -> DeviceLease {
        book.assigned[index] = book.assigned[index].saturating_add(bytes);
        DeviceLease {
            book: self.clone(),
            index,
            bytes,
            generation: self.generations[index].load(Ordering::Acquire),
        }
    }

    /// Marks device `index` lost as seen by a lease of `generation`: every table placed on it
    /// before now is lost, and a CUDA device is not chosen again. Returns whether this call did
    /// it (several tables noticing the same loss mark it once).
    fn lose(&self, index: usize, generation: u64) -> bool {
        let Some(g) = self.generations.get(index) else {
            return false;
        };
        // Under the book's lock, so that no placement sees the new generation on a device not
        // yet marked unusable.
        let mut book = self.book.lock().ok();
        let first = g
            .compare_exchange(
                generation,
                generation + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok();
        if first {
            Metrics::inc(&self.metrics.devices_lost_total);
            let d = &self.devices[index];
            if d.kind != DeviceKind::Cpu
                && let Some(book) = book.as_mut()
            {
                book.unusable[index] = true;
            }
            warn!(device = %device_id(d), name = %d.name, "device lost: its tables are rebuilt from checkpoints and the delta stream");
        }
        first
    }

    /// The fault switch: marks the device with this id lost, as a driver error would.
    pub fn inject_device_lost(&self, id: &str) -> Result<(), FaultError> {
        let index = self
            .find(id)
            .ok_or_else(|| FaultError::NoSuchDevice(id.to_string()))?;
        let generation = self.generations[index].load(Ordering::Acquire);
        self.lose(index, generation);
        Ok(())
    }
}

/// Bytes of one device given to one model's tables on this node; returned when dropped.
#[derive(Debug)]
pub struct DeviceLease {
    book: Arc<DeviceBook>,
    index: usize,
    bytes: u64,
    generation: u64,
}

impl DeviceLease {
    /// The device.
    pub fn device(&self) -> &Device {
        &self.book.devices[self.index]
    }

    /// The device's id (`cpu:0`).
    pub fn id(&self) -> String {
        device_id(self.device())
    }

    /// Whether the device was lost since the lease was taken: its tables are gone.
    pub fn is_lost(&self) -> bool {
        self.book.generations[self.index].load(Ordering::Acquire) != self.generation
    }

    /// Reports that a table on the device met a device loss.
    pub fn lose(&self) {
        self.book.lose(self.index, self.generation);
    }

    /// The device's own threads for blocking operations: `None` on the CPU unless `on_cpu`
    /// (its operations run inline), or when they could not be started (then `block_in_place`
    /// is the fallback).
    pub fn threads(&self, on_cpu: bool) -> Option<&Workers> {
        let d = self.device();
        if d.kind == DeviceKind::Cpu && !on_cpu {
            return None;
        }
        self.book.threads.get(self.index)?.get_or_init(|| {
            let name = format!("tessel-{}{}", d.kind.as_str(), d.ordinal);
            match Workers::start(&name, DEVICE_THREADS, DEVICE_QUEUE) {
                Ok(w) => {
                    info!(device = %device_id(d), threads = DEVICE_THREADS, "the device's apply threads started");
                    Some(w)
                }
                Err(e) => {
                    warn!(device = %device_id(d), error = %e, "cannot start the device's threads; applies block a runtime thread instead");
                    None
                }
            }
        })
        .as_ref()
    }
}

impl Drop for DeviceLease {
    fn drop(&mut self) {
        if let Ok(mut book) = self.book.book.lock() {
            book.assigned[self.index] = book.assigned[self.index].saturating_sub(self.bytes);
        }
    }
}

/// Puts a model's slot tables on this node (restored as CPU twins, all of `dim` columns) on one
/// device: the one the book chooses for their rows × dim × 4 bytes, counted against what the
/// node's other models hold. On the CPU the restored tables become the live ones (no copy).
/// When the chosen device cannot allocate or load them, or nothing fits by the book, they go to
/// the CPU twin, which refuses only what host memory cannot hold.
pub fn load_tables(
    book: &Arc<DeviceBook>,
    model: &str,
    dim: usize,
    restored: Vec<gpu::cpu::Table>,
    config: gpu::TableConfig,
) -> anyhow::Result<(DeviceLease, Vec<gpu::Table>)> {
    let rows: u64 = restored.iter().map(|t| t.rows().end - t.rows().start).sum();
    let req = Requirements::for_table(rows, dim as u64, gpu::Dtype::F32);
    let lease = match book.place(&req) {
        Ok(lease) => lease,
        Err(e) => {
            warn!(%model, error = %e, "no device fits by the book; trying the CPU twin");
            book.place_on_cpu(req.table_bytes)?
        }
    };
    let on_host = |device: &gpu::Device, restored: Vec<gpu::cpu::Table>| {
        restored
            .into_iter()
            .map(|t| gpu::Table::from_host(device, t, config).map_err(|(e, _)| e))
            .collect::<Result<Vec<_>, _>>()
    };
    if lease.device().kind == DeviceKind::Cpu {
        let tables = on_host(lease.device(), restored)?;
        return Ok((lease, tables));
    }
    // Copied up; the host copies stay until every table is on the device, so that a failure
    // part-way (a lost device) can still fall back to them.
    let built: Result<Vec<gpu::Table>, gpu::Error> = restored
        .iter()
        .map(|cpu| gpu::Table::copy_of(lease.device(), cpu, config))
        .collect();
    match built {
        Ok(tables) => Ok((lease, tables)),
        Err(e) => {
            warn!(%model, device = %lease.id(), error = %e, "cannot place the tables; using the CPU twin");
            if matches!(e, gpu::Error::DeviceLost | gpu::Error::Driver(_)) {
                lease.lose();
            }
            drop(lease);
            let host = book.place_on_cpu(req.table_bytes)?;
            let tables = on_host(host.device(), restored)?;
            Ok((host, tables))
        }
    }
}

/// The fault subject of a node: `<c>.admin.<node>.fault`.
pub fn fault_subject(cluster: &str, node: &str) -> String {
    format!("{cluster}.admin.{node}.fault")
}

/// Why a fault request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FaultError {
    /// The node's config does not enable fault injection.
    #[error("fault injection is disabled on this node (config fault_injection = false)")]
    Disabled,
    /// Not a JSON object of the expected shape.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// A fault this node does not simulate.
    #[error("unknown fault {0:?}; the only fault is \"device-lost\"")]
    UnknownFault(String),
    /// No device with that id.
    #[error("no device {0:?} on this node")]
    NoSuchDevice(String),
}

impl FaultError {
    /// The reply's `kind`.
    pub fn kind(&self) -> &'static str {
        match self {
            FaultError::Disabled => "disabled",
            FaultError::BadRequest(_) => "bad_request",
            FaultError::UnknownFault(_) => "unknown_fault",
            FaultError::NoSuchDevice(_) => "no_such_device",
        }
    }
}

/// Largest fault request accepted.
pub const MAX_FAULT_REQUEST_BYTES: usize = 1024;

/// Handles one fault request: `{"ok": {"fault", "device"}}` or `{"error": {"kind", "message"}}`
/// (counted in `tessel_faults_refused_total`).
pub fn handle_fault(book: &DeviceBook, enabled: bool, payload: &[u8]) -> Value {
    let r = (|| {
        if !enabled {
            return Err(FaultError::Disabled);
        }
        if payload.len() > MAX_FAULT_REQUEST_BYTES {
            return Err(FaultError::BadRequest(format!(
                "{} bytes; the limit is {MAX_FAULT_REQUEST_BYTES}",
                payload.len()
            )));
        }
        let v: Value =
            serde_json::from_slice(payload).map_err(|e| FaultError::BadRequest(e.to_string()))?;
        let (Some(fault), Some(device)) = (v["fault"].as_str(), v["device"].as_str()) else {
            return Err(FaultError::BadRequest(
                "expected {\"fault\": \"device-lost\", \"device\": \"cpu:0\"}".into(),
            ));
        };
        if fault != "device-lost" {
            return Err(FaultError::UnknownFault(fault.chars().take(64).collect()));
        }
        book.inject_device_lost(device)?;
        Ok(json!({"ok": {"fault": fault, "device": device}}))
    })();
    r.unwrap_or_else(|e| {
        Metrics::inc(&book.metrics.faults_refused_total);
        json!({"error": {"kind": e.kind(), "message": e.to_string()}})
    })
}

/// Serves this node's fault subject until the task is dropped.
pub async fn serve_faults(
    client: async_nats::Client,
    cluster: &str,
    node: &str,
    book: Arc<DeviceBook>,
    enabled: bool,
) -> Result<tokio::task::JoinHandle<()>, async_nats::SubscribeError> {
    let mut sub = client.subscribe(fault_subject(cluster, node)).await?;
    if enabled {
        warn!(%node, "fault injection is enabled: devices can be marked lost on request");
    }
    Ok(tokio::spawn(async move {
        while let Some(msg) = sub.next().await {
            let answer = handle_fault(&book, enabled, &msg.payload);
            if answer.get("ok").is_some() {
                info!(request = %String::from_utf8_lossy(&msg.payload), "fault injected");
            }
            if let Some(reply) = msg.reply {
                let _ = client.publish(reply, Bytes::from(answer.to_string())).await;
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn device_threads_run_every_job_and_at_most_their_number_at_once() {
        use std::sync::atomic::AtomicUsize;
        let workers = Arc::new(Workers::start("test-dev", 3, 4).unwrap());
        let (now, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let jobs = (0..40u64).map(|i| {
            let (workers, now, most) = (workers.clone(), now.clone(), most.clone());
            tokio::spawn(async move {
                workers
                    .run(move || {
                        let n = now.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(n, Ordering::SeqCst);
                        std::thread::sleep(std::time::Duration::from_millis(2));
                        now.fetch_sub(1, Ordering::SeqCst);
                        (i, std::thread::current().name().map(str::to_string))
                    })
                    .await
            })
        });
        let done = futures::future::join_all(jobs).await;
        let mut seen = Vec::new();
        for d in done {
            let (i, name) = d.unwrap().expect("every job runs");
            assert!(name.unwrap().starts_with("test-dev-"));
            seen.push(i);
        }
        seen.sort_unstable();
        assert_eq!(seen, (0..40).collect::<Vec<_>>());
        let most = most.load(Ordering::SeqCst);
        assert!((1..=3).contains(&most), "{most} jobs at once on 3 threads");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_job_answers_none_and_its_thread_stays() {
        let workers = Workers::start("test-panic", 1, 1).unwrap();
        let r: Option<u32> = workers.run(|| panic!("a job that panics")).await;
        assert_eq!(r, None);
        assert_eq!(workers.run(|| 7).await, Some(7));
    }

    fn dev(kind: DeviceKind, ordinal: usize, total: u64) -> Device {
        Device {
            kind,
            ordinal,
            name: format!("{}{ordinal}", kind.as_str()),
            memory_total_bytes: total,
            memory_free_bytes: total,
            compute_capability: (kind == DeviceKind::Cuda).then_some((9, 0)),
        }
    }

    fn book(devices: Vec<Device>) -> Arc<DeviceBook> {
        DeviceBook::new(devices, Arc::new(Metrics::default()))
    }

    fn req(bytes: u64) -> Requirements {
        Requirements {
            table_bytes: bytes,
            dtype: gpu::Dtype::F32,
        }
    }

    #[test]
    fn the_default_weight_is_gib_of_the_largest_cuda_device_else_of_the_host() {
        let cpu = dev(DeviceKind::Cpu, 0, 64 * GIB);
        assert_eq!(default_weight(std::slice::from_ref(&cpu)).get(), 64);
        let gpus = vec![
            cpu.clone(),
            dev(DeviceKind::Cuda, 0, 80 * GIB),
            dev(DeviceKind::Cuda, 1, 24 * GIB),
        ];
        assert_eq!(default_weight(&gpus).get(), 80);
        // Unknown memory, less than a GiB, or more than the range: clamped.
        assert_eq!(default_weight(&[dev(DeviceKind::Cpu, 0, 0)]).get(), 1);
        assert_eq!(default_weight(&[]).get(), 1);
        assert_eq!(default_weight(&[dev(DeviceKind::Cpu, 0, GIB / 2)]).get(), 1);
        assert_eq!(
            default_weight(&[dev(DeviceKind::Cuda, 0, u64::MAX)]).get(),
            Weight::MAX
        );
    }

    #[test]
    fn leases_spread_count_and_return_bytes() {
        let b = book(vec![
            dev(DeviceKind::Cpu, 0, 100),
            dev(DeviceKind::Cuda, 0, 10),
            dev(DeviceKind::Cuda, 1, 10),
        ]);
        let a = b.place(&req(6)).unwrap();
        let c = b.place(&req(6)).unwrap();
        assert_eq!((a.id().as_str(), c.id().as_str()), ("cuda:0", "cuda:1"));
        // Both GPUs have 4 left: the CPU takes the next.
        let d = b.place(&req(6)).unwrap();
        assert_eq!(d.id(), "cpu:0");
        assert_eq!(b.assigned(), vec![6, 6, 6]);
        drop(a);
        assert_eq!(b.assigned(), vec![6, 0, 6]);
        assert!(matches!(b.place(&req(1_000)), Err(PlaceError::Unfit(_))));
        drop((c, d));
        assert_eq!(b.assigned(), vec![0, 0, 0]);
    }

    #[test]
    fn a_lost_cuda_device_is_skipped_and_its_leases_are_lost() {
        let b = book(vec![
            dev(DeviceKind::Cpu, 0, 100),
            dev(DeviceKind::Cuda, 0, 50),
        ]);
        let on_gpu = b.place(&req(10)).unwrap();
        let on_cpu = b.place_on_cpu(10).unwrap();
        assert_eq!(on_gpu.id(), "cuda:0");
        assert!(!on_gpu.is_lost());
        on_gpu.lose();
        on_gpu.lose(); // once
        assert_eq!(b.metrics.devices_lost_total.load(Ordering::Relaxed), 1);
        assert!(on_gpu.is_lost());
        assert!(!on_cpu.is_lost());
        // The GPU has room but is lost: the CPU twin takes the rebuild.
        let again = b.place(&req(10)).unwrap();
        assert_eq!(again.id(), "cpu:0");
        assert!(!again.is_lost());
        // Nothing fits on a lost device, and the reason says it is lost.
        match b.place(&req(1_000)) {
            Err(PlaceError::Unfit(Unfit::Nowhere(r))) => {
                assert!(r.iter().any(|x| x.contains("(lost)")), "{r:?}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_lost_cpu_loses_its_tables_but_stays_the_fallback() {
        let b = book(vec![dev(DeviceKind::Cpu, 0, 100)]);
        let old = b.place(&req(10)).unwrap();
        b.inject_device_lost("cpu:0").unwrap();
        assert!(old.is_lost());
        let new = b.place(&req(10)).unwrap();
        assert_eq!(new.id(), "cpu:0");
        assert!(!new.is_lost());
    }

    #[test]
    fn tables_load_on_the_cpu_twin_when_the_chosen_device_cannot_hold_them() {
        // A CUDA device this process cannot use (no driver, feature off, or no such ordinal):
        // the book chooses it, the allocation fails, and the CPU twin takes the tables.
        let b = book(vec![gpu::cpu_device(), dev(DeviceKind::Cuda, 99, 1 << 30)]);
        let mut a = gpu::cpu::Table::zeros(0..2, 3);
        a.load(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let mut c = gpu::cpu::Table::zeros(2..3, 3);
        c.load(&[7.0, 8.0, 9.0]);
        let cfg = gpu::TableConfig::default();
        let (lease, tables) = load_tables(&b, "m", 3, vec![a.clone(), c.clone()], cfg).unwrap();
        assert_eq!(lease.id(), "cpu:0");
        assert_eq!(b.assigned(), vec![36, 0]);
        assert_eq!(tables[0].export().unwrap(), a.data());
        assert_eq!(tables[1].export().unwrap(), c.data());
        assert_eq!(tables[1].rows(), 2..3);
        drop(lease);
        assert_eq!(b.assigned(), vec![0, 0]);
    }

    #[test]
    fn the_fault_switch_refuses_with_typed_errors() {
        let b = book(vec![dev(DeviceKind::Cpu, 0, 100)]);
        let lease = b.place(&req(1)).unwrap();
        let ok = br#"{"fault":"device-lost","device":"cpu:0"}"#;
        let kind = |v: Value| v["error"]["kind"].as_str().unwrap_or("ok").to_string();
        assert_eq!(kind(handle_fault(&b, false, ok)), "disabled");
        assert!(!lease.is_lost());
        assert_eq!(kind(handle_fault(&b, true, b"nope")), "bad_request");
        assert_eq!(
            kind(handle_fault(&b, true, br#"{"fault":1}"#)),
            "bad_request"
        );
        assert_eq!(
            kind(handle_fault(
                &b,
                true,
                br#"{"fault":"melt","device":"cpu:0"}"#
            )),
            "unknown_fault"
        );
        assert_eq!(
            kind(handle_fault(
                &b,
                true,
                br#"{"fault":"device-lost","device":"cuda:7"}"#
            )),
            "no_such_device"
        );
        let big = vec![b' '; MAX_FAULT_REQUEST_BYTES + 1];
        assert_eq!(kind(handle_fault(&b, true, &big)), "bad_request");
        assert_eq!(b.metrics.faults_refused_total.load(Ordering::Relaxed), 6);
        assert!(!lease.is_lost());
        let v = handle_fault(&b, true, ok);
        assert_eq!(v["ok"]["device"], "cpu:0", "{v}");
        assert!(lease.is_lost());
    }
}
