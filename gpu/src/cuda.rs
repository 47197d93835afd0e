//! CUDA devices (feature `cuda`): discovery, the scatter-add and gather kernels (CUDA C compiled
//! with NVRTC at first use on each device and cached), and tables in device memory.
//!
//! **Invariant:** nothing here panics into the caller. cudarc loads `libcuda` and `libnvrtc`
//! lazily and panics when they are missing, so every entry point first probes for the library
//! and then runs the driver calls under `catch_unwind` as a second guard.
//!
//! Streams: each table has a compute stream (kernels, and the table's own memory) and a copy
//! stream (host-to-device staging copies). A batch goes host → pinned staging slot → device
//! staging slot (copy stream) → scatter-add (compute stream); with two slots, the copy of batch
//! k+1 runs while batch k is applied. cudarc records an event on every buffer a stream reads or
//! writes, and makes the other stream wait on it, so slot reuse is ordered for us.

use std::collections::HashMap;
use std::ops::Range;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Instant;

use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DriverError,
    HostSlice, LaunchConfig, PinnedHostSlice, PushKernelArg, sys,
};

use crate::bench::{BenchConfig, BenchRow, random_rows};
use crate::table::{Error, TableConfig};
use crate::{APPLIES_IN_FLIGHT_PER_DEVICE, Device, DeviceKind};

/// The kernels, as CUDA C. `grouped_add`: the batch's distinct rows, each once, with the range
/// of its updates in the staged values (`idx[u + b] .. idx[u + b + 1]`, in batch order). Thread
/// (x, y) of a block adds column x (then x + blockDim.x, …) of distinct row
/// `blockIdx.x * blockDim.y + y`, so consecutive threads touch consecutive columns of one row
/// (coalesced), and it adds that row's updates one after another in batch order: the same
/// float additions in the same order as the CPU twin, so the tables agree bit for bit (no
/// atomics, whose order of addition is not fixed). `gather` reads rows the same way.
const KERNELS_CU: &str = r#"
extern "C" __global__ void tessel_grouped_add(
    float* __restrict__ table, const unsigned int* __restrict__ idx,
    const float* __restrict__ values, unsigned long long first, unsigned int u, unsigned int dim)
{
    for (unsigned long long b = (unsigned long long)blockIdx.x * blockDim.y + threadIdx.y;
         b < u; b += (unsigned long long)gridDim.x * blockDim.y) {
        float* dst = table + ((unsigned long long)idx[b] - first) * dim;
        const unsigned int lo = idx[u + b], hi = idx[u + b + 1];
        for (unsigned int c = threadIdx.x; c < dim; c += blockDim.x) {
            float acc = dst[c];
            for (unsigned int j = lo; j < hi; ++j) {
                acc += values[(unsigned long long)j * dim + c];
            }
            dst[c] = acc;
        }
    }
}

extern "C" __global__ void tessel_gather(
    const float* __restrict__ table, const unsigned int* __restrict__ rows,
    float* __restrict__ out, unsigned long long first, unsigned int n, unsigned int dim)
{
    for (unsigned long long b = (unsigned long long)blockIdx.x * blockDim.y + threadIdx.y;
         b < n; b += (unsigned long long)gridDim.x * blockDim.y) {
        const float* src = table + ((unsigned long long)rows[b] - first) * dim;
        float* dst = out + b * dim;
        for (unsigned int c = threadIdx.x; c < dim; c += blockDim.x) {
            dst[c] = src[c];
        }
    }
}
"#;

/// Most blocks a launch uses; larger batches loop (grid-stride).
const MAX_BLOCKS: u32 = 1 << 16;

/// Floats per chunk of pinned staging when loading or exporting a whole table (16 MiB).
const TRANSFER_CHUNK_VALUES: usize = 4 << 20;

/// Whether the CUDA driver library can be loaded (the names cudarc itself tries).
pub fn driver_present() -> bool {
    // SAFETY: this only tries to dlopen the candidate library names and drops what it opened;
    // loading libcuda runs its initialisers, which is what using CUDA at all requires.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Whether the NVRTC library can be loaded.
pub fn nvrtc_present() -> bool {
    // SAFETY: as for `driver_present`, with libnvrtc.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// Runs `f`, turning a panic inside cudarc into an error.
fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T, Error>) -> Result<T, Error> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => Err(Error::Driver(format!(
            "{what}: the CUDA library panicked: {}",
            panic_text(p.as_ref())
        ))),
    }
}

/// A driver error as a table error: out of memory and lost devices get their own kinds.
fn driver(what: &str, device: &str, bytes: u64, e: DriverError) -> Error {
    use sys::cudaError_enum as E;
    match e.0 {
        E::CUDA_ERROR_OUT_OF_MEMORY => Error::OutOfMemory {
            device: device.to_string(),
            bytes,
        },
        E::CUDA_ERROR_ILLEGAL_ADDRESS
        | E::CUDA_ERROR_LAUNCH_FAILED
        | E::CUDA_ERROR_ECC_UNCORRECTABLE
        | E::CUDA_ERROR_HARDWARE_STACK_ERROR
        | E::CUDA_ERROR_ILLEGAL_INSTRUCTION
        | E::CUDA_ERROR_CONTEXT_IS_DESTROYED => Error::DeviceLost,
        _ => Error::Driver(format!("{what}: {e}")),
    }
}

/// The CUDA devices, or why there are none to use.
pub(crate) fn discover() -> Result<Vec<Device>, String> {
    if !driver_present() {
        return Err("no CUDA driver library (libcuda) found".into());
    }
    let found = guarded("discovery", || {
        let d = |what: &str, e: DriverError| Error::Driver(format!("{what}: {e}"));
        cudarc::driver::result::init().map_err(|e| d("cuInit", e))?;
        let count = CudaContext::device_count().map_err(|e| d("cuDeviceGetCount", e))?;
        let mut out = Vec::new();
        for ordinal in 0..usize::try_from(count).unwrap_or(0) {
            let ctx = CudaContext::new(ordinal).map_err(|e| d("cuCtx", e))?;
            let name = ctx.name().map_err(|e| d("cuDeviceGetName", e))?;
            let (major, minor) = ctx
                .compute_capability()
                .map_err(|e| d("compute capability", e))?;
            let (free, total) = ctx.mem_get_info().map_err(|e| d("cuMemGetInfo", e))?;
            out.push(Device {
                kind: DeviceKind::Cuda,
                ordinal,
                name,
                memory_total_bytes: total as u64,
                memory_free_bytes: free as u64,
                compute_capability: Some((
                    u32::try_from(major).unwrap_or(0),
                    u32::try_from(minor).unwrap_or(0),
                )),
            });
        }
        Ok(out)
    });
    found.map_err(|e| e.to_string())
}

/// The compiled kernels of one device.
struct Kernels {
    grouped_add: CudaFunction,
    gather: CudaFunction,
}

/// Kernels by device ordinal: compiled with NVRTC at first use, then shared.
fn kernels(ctx: &Arc<CudaContext>) -> Result<Arc<Kernels>, Error> {
    static CACHE: OnceLock<Mutex<HashMap<usize, Arc<Kernels>>>> = OnceLock::new();
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    let mut map = cache.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(k) = map.get(&ctx.ordinal()) {
        return Ok(k.clone());
    }
    if !nvrtc_present() {
        return Err(Error::Unavailable(
            "no NVRTC library (libnvrtc) found to compile the kernels".into(),
        ));
    }
    let ptx =
        cudarc::nvrtc::compile_ptx(KERNELS_CU).map_err(|e| Error::Driver(format!("NVRTC: {e}")))?;
    let module = ctx
        .load_module(ptx)
        .map_err(|e| Error::Driver(format!("cuModuleLoad: {e}")))?;
    let function = |name: &str| {
        module
            .load_function(name)
            .map_err(|e| Error::Driver(format!("{name}: {e}")))
    };
    let k = Arc::new(Kernels {
        grouped_add: function("tessel_grouped_add")?,
        gather: function("tessel_gather")?,
    });
    map.insert(ctx.ordinal(), k.clone());
    Ok(k)
}

/// The launch shape for `n` batch rows of `dim`: x over columns (a warp at least), y over rows.
fn launch_config(n: usize, dim: usize) -> LaunchConfig {
    let x = (dim.next_power_of_two()).clamp(32, 256) as u32;
    let y = 256 / x;
    let blocks = (n as u64)
        .div_ceil(u64::from(y))
        .clamp(1, u64::from(MAX_BLOCKS)) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (x, y, 1),
        shared_mem_bytes: 0,
    }
}

/// One slot of batch staging: pinned host buffers and their device twins. For a batch of `n`
/// updates, `*_rows` holds up to `n` distinct rows and then their `n + 1` offsets.
struct Slot {
    host_rows: PinnedHostSlice<u32>,
    host_values: PinnedHostSlice<f32>,
    dev_rows: CudaSlice<u32>,
    dev_values: CudaSlice<f32>,
}

impl Slot {
    /// Whether it holds a batch of `rows` updates and `values` values.
    fn holds(&self, rows: usize, values: usize) -> bool {
        self.host_rows.len() > 2 * rows && self.host_values.len() >= values
    }

    /// Pinned bytes (the device twins hold as many).
    fn bytes(&self) -> u64 {
        (self.host_rows.len() * 4 + self.host_values.len() * 4) as u64
    }
}

/// The staging of one `apply_many`: two slots, so the copy of one batch overlaps the apply of
/// the one before.
#[derive(Default)]
pub(crate) struct Staging {
    slots: Vec<Slot>,
    next: usize,
}

impl Staging {
    fn bytes(&self) -> u64 {
        self.slots.iter().map(Slot::bytes).sum()
    }
}

/// Most pinned bytes of idle staging kept per device between applies (64 MiB); staging that
/// would go over it is freed after its apply.
const STAGING_IDLE_MAX_BYTES: u64 = 64 << 20;

/// The staging of one device: idle stagings, and how many are out.
#[derive(Default)]
struct DeviceStaging {
    idle: Vec<Staging>,
    out: usize,
}

/// Staging by device ordinal, shared by every table of the device. Pinning host memory costs
/// far more than the copy of a small batch, and a node holds one table per slot (up to 1,024):
/// staging per table pinned two buffers per slot. A table takes a staging for one
/// `apply_many` and gives it back once the apply has synchronised, so no copy or kernel still
/// uses it; at most [`APPLIES_IN_FLIGHT_PER_DEVICE`] are out at once.
fn staging_pool() -> &'static (Mutex<HashMap<usize, DeviceStaging>>, Condvar) {
    static POOL: OnceLock<(Mutex<HashMap<usize, DeviceStaging>>, Condvar)> = OnceLock::new();
    POOL.get_or_init(|| (Mutex::new(HashMap::new()), Condvar::new()))
}

/// A staging for one apply on device `ordinal`, waiting while the device has its most out.
fn take_staging(ordinal: usize) -> Staging {
    let (lock, freed) = staging_pool();
    let mut pool = lock.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        let device = pool.entry(ordinal).or_default();
        if device.out < APPLIES_IN_FLIGHT_PER_DEVICE {
            device.out += 1;
            return device.idle.pop().unwrap_or_default();
        }
        pool = freed.wait(pool).unwrap_or_else(|p| p.into_inner());
    }
}

/// Gives a staging back after its apply: kept for the next one when it is reusable (`Some`:
/// the apply succeeded) and the device's idle staging stays within its budget, else freed.
fn give_staging(ordinal: usize, staging: Option<Staging>) {
    let (lock, freed) = staging_pool();
    let mut pool = lock.lock().unwrap_or_else(|p| p.into_inner());
    let device = pool.entry(ordinal).or_default();
    device.out = device.out.saturating_sub(1);
    if let Some(staging) = staging {
        let held: u64 = device.idle.iter().map(Staging::bytes).sum();
        if held + staging.bytes() <= STAGING_IDLE_MAX_BYTES {
            device.idle.push(staging);
        }
    }
    drop(pool);
    freed.notify_one();
}

/// Copies the first `n` elements of pinned `src` into `dst` on `stream`, asynchronously.
fn htod_prefix<T: cudarc::driver::DeviceRepr>(
    stream: &Arc<CudaStream>,
    src: &PinnedHostSlice<T>,
    n: usize,
    dst: &mut CudaSlice<T>,
) -> Result<(), DriverError> {
    if n == 0 {
        return Ok(());
    }
    debug_assert!(n <= src.len() && n <= dst.len());
    stream.context().bind_to_thread()?;
    // SAFETY: `stream_synced_slice` makes `stream` wait for earlier host writes' event and
    // records the pinned buffer's event when `_src_done` drops, after the copy is enqueued, so
    // the next host write (through `as_mut_slice`, which waits on that event) cannot race it.
    let (host, _src_done) = unsafe { src.stream_synced_slice(stream) };
    let (ptr, _dst_done) = dst.device_ptr_mut(stream);
    // SAFETY: `ptr` points at `dst`, at least `n` elements long (checked by the callers, who
    // size slots before use); `host[..n]` is pinned memory kept alive by `src` until its event
    // completes (cudarc's drop of a pinned slice synchronises that event).
    unsafe { cudarc::driver::result::memcpy_htod_async(ptr, &host[..n], stream.cu_stream()) }
}

/// Values below which a staging copy stays on the calling thread (4 MiB).
const PARALLEL_COPY_MIN_VALUES: usize = 1 << 20;

/// `dst.copy_from_slice(src)` on up to `threads` threads: one thread's memcpy into pinned
/// memory is slower than the host-to-device copy it feeds.
fn parallel_copy(dst: &mut [f32], src: &[f32], threads: usize) {
    if threads <= 1 || src.len() < PARALLEL_COPY_MIN_VALUES {
        dst.copy_from_slice(src);
        return;
    }
    let per = src.len().div_ceil(threads);
    std::thread::scope(|s| {
        for (d, c) in dst.chunks_mut(per).zip(src.chunks(per)) {
            s.spawn(move || d.copy_from_slice(c));
        }
    });
}

/// Whether `rows` (all inside `first .. first + len_rows`) names a row more than once. `seen`
/// is a bitset of the table's rows, grown here on first use, all clear on entry and on return.
fn repeats(rows: &[u32], first: u64, len_rows: u64, seen: &mut Vec<u64>) -> bool {
    let words = len_rows.div_ceil(64) as usize;
    if seen.len() < words {
        seen.resize(words, 0);
    }
    let bit = |r: u32| {
        let i = u64::from(r).saturating_sub(first) as usize;
        (i / 64, 1u64 << (i % 64))
    };
    let mut marked = rows.len();
    for (k, &r) in rows.iter().enumerate() {
        let (w, b) = bit(r);
        if seen[w] & b != 0 {
            marked = k;
            break;
        }
        seen[w] |= b;
    }
    for &r in &rows[..marked] {
        let (w, b) = bit(r);
        seen[w] &= !b;
    }
    marked < rows.len()
}

/// A batch regrouped for `tessel_grouped_add`: its distinct rows, the offsets of each one's
/// updates (`offsets[k] .. offsets[k + 1]`, `distinct + 1` of them), and for each staged
/// update the index of the batch update it copies, each row's in batch order.
#[derive(Debug, PartialEq)]
struct Grouping {
    rows: Vec<u32>,
    offsets: Vec<u32>,
    order: Vec<u32>,
}

fn group(rows: &[u32]) -> Grouping {
    // (row, index) keys: sorting them puts each row's updates together, in batch order.
    let mut keys: Vec<u64> = rows
        .iter()
        .enumerate()
        .map(|(i, &r)| (u64::from(r) << 32) | i as u64)
        .collect();
    keys.sort_unstable();
    let mut g = Grouping {
        rows: Vec::new(),
        offsets: Vec::new(),
        order: Vec::with_capacity(keys.len()),
    };
    for (k, key) in keys.iter().enumerate() {
        let row = (key >> 32) as u32;
        if g.rows.last() != Some(&row) {
            g.rows.push(row);
            g.offsets.push(k as u32);
        }
        g.order.push(*key as u32);
    }
    g.offsets.push(keys.len() as u32);
    g
}

/// A table in a CUDA device's memory.
pub struct CudaTable {
    device: Device,
    ctx: Arc<CudaContext>,
    compute: Arc<CudaStream>,
    copy: Arc<CudaStream>,
    kernels: Arc<Kernels>,
    data: CudaSlice<f32>,
    first: u64,
    len_rows: u64,
    dim: usize,
    max_batch_rows: usize,
    /// Threads that copy a batch's values into pinned staging.
    copy_threads: usize,
    /// One bit per table row, all clear between batches: finds a batch's repeated rows.
    seen: Vec<u64>,
}

impl CudaTable {
    /// A zeroed `rows × dim` table on `device`.
    pub(crate) fn create(
        device: &Device,
        rows: Range<u64>,
        dim: usize,
        config: &TableConfig,
    ) -> Result<Self, Error> {
        if !driver_present() {
            return Err(Error::Unavailable(
                "no CUDA driver library (libcuda) found".into(),
            ));
        }
        guarded("create", || {
            let count = cudarc::driver::result::init()
                .and_then(|()| CudaContext::device_count())
                .map_err(|e| Error::Unavailable(format!("CUDA: {e}")))?;
            if device.ordinal >= usize::try_from(count).unwrap_or(0) {
                return Err(Error::Unavailable(format!(
                    "no CUDA device {} (the driver reports {count})",
                    device.ordinal
                )));
            }
            let ctx = CudaContext::new(device.ordinal)
                .map_err(|e| Error::Unavailable(format!("CUDA device {}: {e}", device.ordinal)))?;
            let len_rows = rows.end - rows.start;
            let values = len_rows
                .checked_mul(dim as u64)
                .and_then(|v| usize::try_from(v).ok())
                .ok_or(Error::OutOfMemory {
                    device: device.name.clone(),
                    bytes: u64::MAX,
                })?;
            let bytes = values as u64 * 4;
            let kernels = kernels(&ctx)?;
            let compute = ctx
                .new_stream()
                .map_err(|e| driver("stream", &device.name, 0, e))?;
            let copy = ctx
                .new_stream()
                .map_err(|e| driver("stream", &device.name, 0, e))?;
            let data = compute
                .alloc_zeros::<f32>(values.max(1))
                .map_err(|e| driver("alloc", &device.name, bytes, e))?;
            compute
                .synchronize()
                .map_err(|e| driver("alloc", &device.name, bytes, e))?;
            Ok(CudaTable {
                device: device.clone(),
                ctx,
                compute,
                copy,
                kernels,
                data,
                first: rows.start,
                len_rows,
                dim,
                max_batch_rows: config.max_batch_rows,
                copy_threads: config.cpu_threads.max(1),
                seen: Vec::new(),
            })
        })
    }

    pub(crate) fn rows(&self) -> Range<u64> {
        self.first..self.first + self.len_rows
    }

    pub(crate) fn dim(&self) -> usize {
        self.dim
    }

    fn values(&self) -> usize {
        self.len_rows as usize * self.dim
    }

    fn err(&self, what: &str, bytes: u64) -> impl Fn(DriverError) -> Error + '_ {
        let what = what.to_string();
        move |e| driver(&what, &self.device.name, bytes, e)
    }

    /// Makes slot `i` of `staging` hold at least `n` rows of this table's `dim` (growing to a
    /// power of two, at most the limit).
    fn ensure_slot(&self, staging: &mut Staging, i: usize, n: usize) -> Result<(), Error> {
        if staging
            .slots
            .get(i)
            .is_some_and(|s| s.holds(n, n * self.dim))
        {
            return Ok(());
        }
        let rows = n
            .next_power_of_two()
            .max(1024)
            .min(self.max_batch_rows.max(n));
        let values = rows * self.dim;
        let index = 2 * rows + 1;
        let bytes = (index * 4 + values * 4) as u64;
        let e = |e| driver("staging", &self.device.name, bytes, e);
        // SAFETY: pinned memory is uninitialised; only the prefix a batch writes is copied,
        // so nothing uninitialised is read.
        let host_rows = unsafe { self.ctx.alloc_pinned::<u32>(index) }.map_err(e)?;
        // SAFETY: as above.
        let host_values = unsafe { self.ctx.alloc_pinned::<f32>(values) }.map_err(e)?;
        // SAFETY: device staging is uninitialised; kernels read only the prefix the copy
        // stream writes before them (ordered by cudarc's events).
        let dev_rows = unsafe { self.copy.alloc::<u32>(index) }.map_err(e)?;
        // SAFETY: as above.
        let dev_values = unsafe { self.copy.alloc::<f32>(values) }.map_err(e)?;
        let slot = Slot {
            host_rows,
            host_values,
            dev_rows,
            dev_values,
        };
        if i < staging.slots.len() {
            staging.slots[i] = slot;
        } else {
            staging.slots.push(slot);
        }
        Ok(())
    }

    /// Applies validated batches, overlapping the copy of one with the apply of the previous,
    /// through staging shared by the device's tables.
    pub(crate) fn apply_many(&mut self, batches: &[(&[u32], &[f32])]) -> Result<(), Error> {
        let mut staging = take_staging(self.device.ordinal);
        let applied = self.apply_staged(&mut staging, batches);
        // After an error the staging may still be in use by the device: it is dropped (cudarc
        // waits for its events) rather than shared again.
        give_staging(self.device.ordinal, applied.is_ok().then_some(staging));
        applied
    }

    /// `apply_many` through the given staging (grown as needed).
    fn apply_staged(
        &mut self,
        staging: &mut Staging,
        batches: &[(&[u32], &[f32])],
    ) -> Result<(), Error> {
        guarded("apply", || {
            let largest = batches.iter().map(|(r, _)| r.len()).max().unwrap_or(0);
            // Allocate both slots first so an allocation failure leaves the table untouched.
            for i in 0..2 {
                self.ensure_slot(staging, i, largest)?;
            }
            let (first, dim) = (self.first, self.dim as u32);
            for (rows, values) in batches {
                let n = rows.len();
                if n == 0 {
                    continue;
                }
                let i = staging.next;
                staging.next ^= 1;
                let slot = &mut staging.slots[i];
                let dim_values = dim as usize;
                // `as_mut_slice` waits until the slot's previous copy has left the buffer.
                let err = |e| driver("staging", &self.device.name, 0, e);
                let index = slot.host_rows.as_mut_slice().map_err(err)?;
                let host_values =
                    &mut slot.host_values.as_mut_slice().map_err(err)?[..values.len()];
                let distinct = if repeats(rows, self.first, self.len_rows, &mut self.seen) {
                    // Each row once, its updates side by side in batch order.
                    let g = group(rows);
                    index[..g.rows.len()].copy_from_slice(&g.rows);
                    index[g.rows.len()..2 * g.rows.len() + 1].copy_from_slice(&g.offsets);
                    for (out, &at) in host_values.chunks_exact_mut(dim_values).zip(&g.order) {
                        let at = at as usize * dim_values;
                        out.copy_from_slice(&values[at..at + dim_values]);
                    }
                    g.rows.len()
                } else {
                    index[..n].copy_from_slice(rows);
                    for (k, o) in index[n..2 * n + 1].iter_mut().enumerate() {
                        *o = k as u32;
                    }
                    parallel_copy(host_values, values, self.copy_threads);
                    n
                };
                htod_prefix(
                    &self.copy,
                    &slot.host_rows,
                    2 * distinct + 1,
                    &mut slot.dev_rows,
                )
                .map_err(err)?;
                htod_prefix(
                    &self.copy,
                    &slot.host_values,
                    values.len(),
                    &mut slot.dev_values,
                )
                .map_err(err)?;
                let u32_distinct = distinct as u32;
                let mut launch = self.compute.launch_builder(&self.kernels.grouped_add);
                launch
                    .arg(&mut self.data)
                    .arg(&slot.dev_rows)
                    .arg(&slot.dev_values)
                    .arg(&first)
                    .arg(&u32_distinct)
                    .arg(&dim);
                // SAFETY: the arguments match `tessel_grouped_add`'s signature in order and
                // type; every row was checked to lie in the table; the index holds `distinct`
                // rows and `distinct + 1` offsets, the last equal to `n`, and `n` rows of `dim`
                // values are staged; cudarc orders the launch after the copy stream's writes.
                unsafe { launch.launch(launch_config(distinct, dim_values)) }.map_err(err)?;
            }
            self.compute
                .synchronize()
                .and_then(|()| self.ctx.check_err())
                .map_err(|e| driver("apply", &self.device.name, 0, e))
        })
    }

    /// Copies rows out with the gather kernel.
    pub(crate) fn gather(&self, rows: &[u32]) -> Result<Vec<f32>, Error> {
        guarded("gather", || {
            if rows.is_empty() {
                return Ok(Vec::new());
            }
            let n = rows.len();
            let bytes = (n * self.dim * 4) as u64;
            let dev_rows = self
                .compute
                .clone_htod(rows)
                .map_err(self.err("gather", 0))?;
            let mut out = self
                .compute
                .alloc_zeros::<f32>(n * self.dim)
                .map_err(self.err("gather", bytes))?;
            let (first, n32, dim) = (self.first, n as u32, self.dim as u32);
            let mut launch = self.compute.launch_builder(&self.kernels.gather);
            launch
                .arg(&self.data)
                .arg(&dev_rows)
                .arg(&mut out)
                .arg(&first)
                .arg(&n32)
                .arg(&dim);
            // SAFETY: arguments match `tessel_gather` in order and type; rows were checked to
            // lie in the table and `out` holds `n × dim` values.
            unsafe { launch.launch(launch_config(n, self.dim)) }.map_err(self.err("gather", 0))?;
            self.compute.clone_dtoh(&out).map_err(self.err("gather", 0))
        })
    }

    /// Replaces the table with `data` (checked to be `rows × dim` long): a slot-sized table
    /// straight from `data`, a larger one through a pinned chunk.
    pub(crate) fn load(&mut self, data: &[f32]) -> Result<(), Error> {
        guarded("load", || {
            if data.is_empty() {
                return Ok(());
            }
            if data.len() <= TRANSFER_CHUNK_VALUES {
                // Slot-sized (a restore): straight from pageable memory, no pinned buffer.
                let fresh = self
                    .compute
                    .clone_htod(data)
                    .map_err(self.err("load", (data.len() * 4) as u64))?;
                self.compute.synchronize().map_err(self.err("load", 0))?;
                self.data = fresh;
                return Ok(());
            }
            let chunk = TRANSFER_CHUNK_VALUES;
            // SAFETY: uninitialised pinned memory; each chunk is written before it is copied.
            let mut pinned = unsafe { self.ctx.alloc_pinned::<f32>(chunk) }
                .map_err(self.err("load", (chunk * 4) as u64))?;
            // Stage into a fresh device buffer, so a failure midway leaves the table unchanged.
            let mut fresh = self
                .compute
                .alloc_zeros::<f32>(self.values().max(1))
                .map_err(self.err("load", (self.values() * 4) as u64))?;
            for (k, part) in data.chunks(chunk).enumerate() {
                let err = |e| driver("load", &self.device.name, 0, e);
                pinned.as_mut_slice().map_err(err)?[..part.len()].copy_from_slice(part);
                let mut dst = fresh.slice_mut(k * chunk..k * chunk + part.len());
                let (ptr, _done) = dst.device_ptr_mut(&self.compute);
                // SAFETY: as in `htod_prefix`: the pinned event is waited on by the stream and
                // recorded after the copy; `dst` holds exactly `part.len()` values.
                let (host, _src_done) = unsafe { pinned.stream_synced_slice(&self.compute) };
                // SAFETY: `ptr` is `dst`'s device pointer, `host[..part.len()]` is in bounds.
                unsafe {
                    cudarc::driver::result::memcpy_htod_async(
                        ptr,
                        &host[..part.len()],
                        self.compute.cu_stream(),
                    )
                }
                .map_err(err)?;
            }
            self.compute.synchronize().map_err(self.err("load", 0))?;
            self.data = fresh;
            Ok(())
        })
    }

    /// The whole table: a slot-sized table (at most one transfer chunk, as at every
    /// checkpoint) is copied straight out, since pinning a buffer costs more than such a copy;
    /// a larger one goes through a pinned chunk.
    pub(crate) fn export(&self) -> Result<Vec<f32>, Error> {
        guarded("export", || {
            let total = self.values();
            if total == 0 {
                return Ok(Vec::new());
            }
            if total <= TRANSFER_CHUNK_VALUES {
                return self
                    .compute
                    .clone_dtoh(&self.data.slice(0..total))
                    .map_err(self.err("export", 0));
            }
            let chunk = TRANSFER_CHUNK_VALUES;
            // SAFETY: uninitialised pinned memory, written by each copy before it is read.
            // Not write-combined: the host reads it back.
            let mut pinned = unsafe { self.ctx.alloc_pinned_with_flags::<f32>(chunk, 0) }
                .map_err(self.err("export", (chunk * 4) as u64))?;
            let mut out = Vec::with_capacity(total);
            let mut at = 0;
            while at < total {
                let len = chunk.min(total - at);
                let src = self.data.slice(at..at + len);
                {
                    let (ptr, _src_done) = src.device_ptr(&self.compute);
                    // SAFETY: the stream waits for earlier host reads of `pinned`, and its
                    // event is recorded when `_dst_done` drops, after the copy is enqueued;
                    // `as_slice` below waits on it.
                    let (host, _dst_done) =
                        unsafe { pinned.stream_synced_mut_slice(&self.compute) };
                    // SAFETY: only `len` values are copied: the last chunk is shorter than
                    // the pinned buffer, and copying the whole buffer would read past the
                    // table (the driver refuses that as an invalid value).
                    unsafe {
                        cudarc::driver::result::memcpy_dtoh_async(
                            &mut host[..len],
                            ptr,
                            self.compute.cu_stream(),
                        )
                    }
                    .map_err(self.err("export", 0))?;
                }
                // `as_slice` waits for the copy.
                out.extend_from_slice(&pinned.as_slice().map_err(self.err("export", 0))?[..len]);
                at += len;
            }
            Ok(out)
        })
    }
}

/// `n` distinct row ids below `rows` (a power of two, at least `n`), in a scattered order: an
/// odd stride is a bijection modulo a power of two.
fn distinct_rows(n: usize, rows: u64, seed: u64) -> Vec<u32> {
    (0..n as u64)
        .map(|i| (seed.wrapping_add(i.wrapping_mul(0x9e37_79b9)) % rows) as u32)
        .collect()
}

/// Seconds `f` takes, after synchronising `stream`.
fn timed(stream: &Arc<CudaStream>, f: impl FnOnce() -> Result<(), Error>) -> Result<f64, Error> {
    stream
        .synchronize()
        .map_err(|e| Error::Driver(e.to_string()))?;
    let t0 = Instant::now();
    f()?;
    stream
        .synchronize()
        .map_err(|e| Error::Driver(e.to_string()))?;
    Ok(t0.elapsed().as_secs_f64())
}

/// The CUDA benchmarks on `device` (see [`crate::bench`]).
pub(crate) fn bench(device: &Device, cfg: BenchConfig) -> Result<Vec<BenchRow>, Error> {
    guarded("bench", || {
        let dim = 128usize;
        let batch = 1usize << 20;
        let table_rows: u64 = if cfg.quick { 1 << 21 } else { 1 << 23 };
        let reps = if cfg.quick { 3 } else { 10 };
        let config = TableConfig {
            max_batch_rows: batch,
            ..TableConfig::default()
        };
        let mut t = CudaTable::create(device, 0..table_rows, dim, &config)?;
        let ids = distinct_rows(batch, table_rows, 0x2545_f491_4f6c_dd1d);
        let values: Vec<f32> = (0..batch * dim).map(|i| (i % 7) as f32 * 1e-3).collect();
        let row_bytes = (dim * 4) as f64;
        let mut out = Vec::new();

        // Device-to-device memcpy of a buffer the size of one batch's values (512 MiB).
        let src = t
            .compute
            .alloc_zeros::<f32>(batch * dim)
            .map_err(t.err("bench", (batch * dim * 4) as u64))?;
        let mut dst = t
            .compute
            .alloc_zeros::<f32>(batch * dim)
            .map_err(t.err("bench", (batch * dim * 4) as u64))?;
        let mut best = f64::MAX;
        for _ in 0..reps {
            let s = timed(&t.compute, || {
                t.compute
                    .memcpy_dtod(&src, &mut dst)
                    .map_err(|e| Error::Driver(e.to_string()))
            })?;
            best = best.min(s);
        }
        let d2d = 2.0 * (batch * dim * 4) as f64 / best / 1e9;
        out.push(BenchRow::new(
            "cuda d2d memcpy (read + write)",
            d2d,
            "GB/s",
            None,
        ));

        // Scatter-add alone: the batch already on the device.
        // The bench holds its own staging, sized for its batches (the shared idle staging
        // keeps at most `STAGING_IDLE_MAX_BYTES`); the warm-up fills it.
        let mut staging = Staging::default();
        t.apply_staged(&mut staging, &[(&ids, &values)])?;
        let kernels = t.kernels.clone();
        // Distinct rows, so the index is the rows then the offsets 0..=n.
        let index: Vec<u32> = ids.iter().copied().chain(0..=batch as u32).collect();
        let dev_index = t.compute.clone_htod(&index).map_err(t.err("bench", 0))?;
        let dev_values = t.compute.clone_htod(&values).map_err(t.err("bench", 0))?;
        let (first, n32, dim32) = (0u64, batch as u32, dim as u32);
        let mut best = f64::MAX;
        for _ in 0..reps {
            let s = timed(&t.compute, || {
                let mut launch = t.compute.launch_builder(&kernels.grouped_add);
                launch
                    .arg(&mut t.data)
                    .arg(&dev_index)
                    .arg(&dev_values)
                    .arg(&first)
                    .arg(&n32)
                    .arg(&dim32);
                // SAFETY: arguments match `tessel_grouped_add`; the rows are distinct and
                // below `table_rows`, the index holds them and `batch + 1` offsets, and
                // `dev_values` holds `batch × dim` values.
                unsafe { launch.launch(launch_config(batch, dim)) }
                    .map(|_| ())
                    .map_err(|e| Error::Driver(e.to_string()))
            })?;
            best = best.min(s);
        }
        let scatter = batch as f64 * (3.0 * row_bytes + 4.0) / best / 1e9;
        out.push(BenchRow::new(
            "cuda scatter-add, 1M rows × dim 128",
            scatter,
            "GB/s",
            Some(("cuda d2d memcpy", d2d)),
        ));

        // Pinned host-to-device memcpy of one batch's bytes.
        // SAFETY: uninitialised pinned memory, only copied from (its bytes are not used).
        let pinned = unsafe { t.ctx.alloc_pinned::<f32>(batch * (dim + 1)) }
            .map_err(t.err("bench", (batch * (dim + 1) * 4) as u64))?;
        let mut dev = t
            .copy
            .alloc_zeros::<f32>(batch * (dim + 1))
            .map_err(t.err("bench", 0))?;
        let mut best = f64::MAX;
        for _ in 0..reps {
            let s = timed(&t.copy, || {
                t.copy
                    .memcpy_htod(&pinned, &mut dev)
                    .map_err(|e| Error::Driver(e.to_string()))
            })?;
            best = best.min(s);
        }
        let batch_bytes = (batch * (dim + 1) * 4) as f64;
        let h2d = batch_bytes / best / 1e9;
        out.push(BenchRow::new("cuda pinned h2d memcpy", h2d, "GB/s", None));

        // The feed: batches from pageable host memory through the double-buffered pipeline.
        let feed_batches = 4;
        let list: Vec<(&[u32], &[f32])> = (0..feed_batches)
            .map(|_| (ids.as_slice(), values.as_slice()))
            .collect();
        let mut best = f64::MAX;
        for _ in 0..reps.min(3) {
            let t0 = Instant::now();
            t.apply_staged(&mut staging, &list)?;
            best = best.min(t0.elapsed().as_secs_f64());
        }
        let feed = feed_batches as f64 * batch_bytes / best / 1e9;
        out.push(BenchRow::new(
            "cuda feed (h2d + apply), 4 batches",
            feed,
            "GB/s",
            Some(("cuda pinned h2d memcpy", h2d)),
        ));
        drop(t);
        out.extend(small_windows(device, cfg)?);
        Ok(out)
    })
}

/// Small windows as a node applies them: slot-sized tables (1,024 rows × 64), one batch of 64
/// rows per `apply_many` (copy up, scatter-add, synchronise): on one thread over 16 tables, on
/// one thread over 1,024 tables (as many as a node holds for a model it owns whole, each with
/// its own streams: whether an apply's cost grows with the tables on the device), and on every
/// core, each thread with 16 tables of its own. Reports the per-apply latency and the
/// windows/s.
fn small_windows(device: &Device, cfg: BenchConfig) -> Result<Vec<BenchRow>, Error> {
    let (rows, dim, batch) = (1024u64, 64usize, 64usize);
    let applies = if cfg.quick { 500 } else { 4000 };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let config = TableConfig {
        max_batch_rows: 4096,
        ..TableConfig::default()
    };
    let values: Vec<f32> = (0..batch * dim).map(|i| (i % 5) as f32 * 1e-3).collect();
    let mut out = Vec::new();
    for (threads, tables_per_thread) in [(1, 16u64), (1, 1024), (cores, 16)] {
        let mut tables = Vec::new();
        for k in 0..tables_per_thread * threads as u64 {
            tables.push(CudaTable::create(
                device,
                k * rows..(k + 1) * rows,
                dim,
                &config,
            )?);
        }
        let t0 = Instant::now();
        let per_thread: Vec<Result<Vec<f64>, Error>> = std::thread::scope(|s| {
            let handles: Vec<_> = tables
                .chunks_mut(tables_per_thread as usize)
                .enumerate()
                .map(|(k, mine)| {
                    let values = &values;
                    s.spawn(move || {
                        let mut lat = Vec::with_capacity(applies);
                        for i in 0..applies {
                            let t = &mut mine[i % mine.len()];
                            let base = t.first as u32;
                            let ids = random_rows(batch, rows, (k * applies + i) as u64 + 1);
                            let ids: Vec<u32> = ids.iter().map(|r| base + r).collect();
                            let a = Instant::now();
                            t.apply_many(&[(&ids, values)])?;
                            lat.push(a.elapsed().as_secs_f64() * 1e6);
                        }
                        Ok(lat)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|p| Err(Error::Driver(panic_text(p.as_ref()))))
                })
                .collect()
        });
        let wall = t0.elapsed().as_secs_f64();
        let mut lat = Vec::new();
        for l in per_thread {
            lat.extend(l?);
        }
        lat.sort_by(f64::total_cmp);
        let pct = |p: f64| lat[((lat.len() - 1) as f64 * p).round() as usize];
        let what = format!(
            "cuda apply of a 64-row window, {threads} thread(s) over {} tables",
            tables_per_thread * threads as u64
        );
        out.push(BenchRow::new(&format!("{what}, p50"), pct(0.5), "µs", None));
        out.push(BenchRow::new(
            &format!("{what}, p99"),
            pct(0.99),
            "µs",
            None,
        ));
        out.push(BenchRow::new(
            &format!("{what}, windows/s"),
            lat.len() as f64 / wall,
            "1/s",
            None,
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_inside_the_cuda_library_becomes_an_error() {
        let r: Result<(), Error> = guarded("probe", || panic!("Unable to dynamically load"));
        match r {
            Err(Error::Driver(text)) => assert!(text.contains("Unable to dynamically load")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_tables_of_a_device_share_their_staging() {
        // Runs where a CUDA device is present (scripts/gpu-check.sh), passes trivially elsewhere.
        let Some(device) = discover().ok().and_then(|d| d.into_iter().next()) else {
            return;
        };
        let config = TableConfig {
            max_batch_rows: 4096,
            ..TableConfig::default()
        };
        let tables = 64u64;
        for k in 0..tables {
            let mut t = CudaTable::create(&device, k * 100..(k + 1) * 100, 64, &config).unwrap();
            let rows = [k as u32 * 100 + 7];
            t.apply_many(&[(&rows, &[1.5; 64])]).unwrap();
            assert_eq!(t.gather(&rows).unwrap(), vec![1.5; 64]);
            assert_eq!(t.export().unwrap().iter().sum::<f32>(), 1.5 * 64.0);
        }
        let pool = staging_pool().0.lock().unwrap();
        let idle = pool
            .get(&device.ordinal)
            .map_or(&[][..], |d| d.idle.as_slice());
        assert!(!idle.is_empty(), "applied staging goes back to the pool");
        assert!(
            (idle.len() as u64) < tables,
            "one staging per table: {}",
            idle.len()
        );
        assert!(idle.iter().map(Staging::bytes).sum::<u64>() <= STAGING_IDLE_MAX_BYTES);
    }

    #[test]
    fn repeats_finds_a_repeated_row_and_leaves_the_bitset_clear() {
        let mut seen = Vec::new();
        assert!(!repeats(&[100, 163, 164, 227], 100, 128, &mut seen));
        assert!(seen.iter().all(|&w| w == 0));
        assert!(repeats(&[100, 163, 164, 163, 227], 100, 128, &mut seen));
        assert!(seen.iter().all(|&w| w == 0), "cleared after a repeat too");
        assert!(!repeats(&[], 100, 128, &mut seen));
        assert_eq!(seen.len(), 2);
    }

    #[test]
    fn grouping_keeps_each_rows_updates_in_batch_order() {
        let g = group(&[7, 3, 7, 9, 3, 7]);
        assert_eq!(g.rows, vec![3, 7, 9]);
        assert_eq!(g.offsets, vec![0, 2, 5, 6]);
        assert_eq!(g.order, vec![1, 4, 0, 2, 5, 3]);
        let none = group(&[]);
        assert_eq!(
            (none.rows.len(), none.offsets, none.order.len()),
            (0, vec![0], 0)
        );
    }

    /// What `tessel_grouped_add` does, on the host: each distinct row's updates in order.
    fn grouped_add_on_host(
        table: &mut [f32],
        first: u64,
        dim: usize,
        rows: &[u32],
        values: &[f32],
    ) {
        let g = group(rows);
        for (k, &row) in g.rows.iter().enumerate() {
            let at = (u64::from(row) - first) as usize * dim;
            for c in 0..dim {
                let mut acc = table[at + c];
                for &j in &g.order[g.offsets[k] as usize..g.offsets[k + 1] as usize] {
                    acc += values[j as usize * dim + c];
                }
                table[at + c] = acc;
            }
        }
    }

    #[test]
    fn the_grouped_add_is_bit_for_bit_the_cpu_twin() {
        // Many repeats of few rows, values of mixed magnitude: any change of the order of
        // additions shows in the low bits.
        let (first, len, dim) = (1_000u64, 50u64, 3usize);
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let rows: Vec<u32> = (0..2_000).map(|_| (first + next() % len) as u32).collect();
        let values: Vec<f32> = (0..rows.len() * dim)
            .map(|_| {
                let v = (next() % 2_000_001) as f32 / 1_000.0 - 1_000.0;
                v * if next() % 3 == 0 { 1e-4 } else { 1.0 }
            })
            .collect();
        let mut cpu = crate::cpu::Table::zeros(first..first + len, dim);
        cpu.apply(&rows, &values, 1).unwrap();
        let mut host = vec![0.0f32; len as usize * dim];
        grouped_add_on_host(&mut host, first, dim, &rows, &values);
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&host), bits(cpu.data()));
        // And the order matters: summing the same updates in another order differs somewhere.
        let mut reversed = vec![0.0f32; len as usize * dim];
        let rev_rows: Vec<u32> = rows.iter().rev().copied().collect();
        let rev_values: Vec<f32> = values.chunks(dim).rev().flatten().copied().collect();
        grouped_add_on_host(&mut reversed, first, dim, &rev_rows, &rev_values);
        assert_ne!(bits(&reversed), bits(cpu.data()));
    }

    #[test]
    fn a_device_has_at_most_its_limit_of_applies_in_flight() {
        use std::sync::atomic::{AtomicBool, Ordering};
        // Empty stagings need no device: this is the pool's bookkeeping alone.
        let ordinal = 9_999;
        let out: Vec<Staging> = (0..APPLIES_IN_FLIGHT_PER_DEVICE)
            .map(|_| take_staging(ordinal))
            .collect();
        let got = AtomicBool::new(false);
        std::thread::scope(|s| {
            let waiter = s.spawn(|| {
                let staging = take_staging(ordinal);
                got.store(true, Ordering::SeqCst);
                staging
            });
            std::thread::sleep(std::time::Duration::from_millis(50));
            assert!(!got.load(Ordering::SeqCst), "one more than the limit waits");
            let mut out = out.into_iter();
            give_staging(ordinal, out.next());
            let extra = waiter.join().unwrap();
            assert!(got.load(Ordering::SeqCst));
            give_staging(ordinal, Some(extra));
            // A failed apply drops its staging (the `skip`) and gives back only its place.
            give_staging(ordinal, None);
            for staging in out.skip(1) {
                give_staging(ordinal, Some(staging));
            }
        });
        let pool = staging_pool().0.lock().unwrap();
        let device = &pool[&ordinal];
        assert_eq!(device.out, 0);
        assert_eq!(device.idle.len(), APPLIES_IN_FLIGHT_PER_DEVICE - 1);
    }

    #[test]
    fn launch_shapes_cover_the_columns_with_whole_warps() {
        let c = launch_config(1 << 20, 128);
        assert_eq!(c.block_dim, (128, 2, 1));
        assert_eq!(c.grid_dim.0, MAX_BLOCKS);
        let c = launch_config(3, 1);
        assert_eq!(c.block_dim, (32, 8, 1));
        assert_eq!(c.grid_dim.0, 1);
        let c = launch_config(10, 1000);
        assert_eq!(c.block_dim, (256, 1, 1));
        assert_eq!(c.grid_dim.0, 10);
    }
}
