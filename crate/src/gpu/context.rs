//! The GPU context: adapter, device, queue, the limits and features actually enabled, the buffer pool, the
//! pipeline cache and the command batch. Getting a device ([`GpuContext::new`]) is separate from using one
//! ([`GpuContext::from_adapter`]), so tests and embedders can hand in their own.

use std::sync::{Arc, Mutex};

use serde::Serialize;

use super::Ref;
use super::batch::Batch;
use super::bindings::BindGroupCache;
use super::cost::CostTracker;
use super::pipeline::PipelineCache;
use super::pipeline::{KernelSource, Spec};
use super::pool::{BufferPool, PoolStats};
use crate::error::{Error, Result};

/// Optional features the runtime enables when the adapter has them.
const WANTED_FEATURES: wgpu::Features =
    wgpu::Features::SHADER_F16.union(wgpu::Features::SUBGROUP).union(wgpu::Features::TIMESTAMP_QUERY);

/// Choices made when creating a device.
#[derive(Clone, Copy, Debug)]
pub struct ContextOptions {
    /// Enable shader-f16 where the adapter has it (default). Off, the device behaves like one without it:
    /// every kernel runs its f32 path.
    pub f16: bool,
    /// Caps on the adapter's maxStorageBufferBindingSize and maxBufferSize: the device is created as a
    /// smaller GPU's would be (e.g. 128 MiB / 256 MiB, WebGPU's defaults and many phones'), so that every
    /// code path for small limits runs, and is validated, on any machine.
    pub max_binding: Option<u64>,
    pub max_buffer: Option<u64>,
    /// Use cooperative matrices (tensor cores; wgpu's experimental feature, native Vulkan and Metal) for f16
    /// GEMMs where the adapter has them (default). Off, every GEMM runs the portable kernels.
    pub coop: bool,
    /// Kernel variants (benchmarks compare them; everything else runs the defaults).
    pub tuning: Tuning,
}

impl Default for ContextOptions {
    fn default() -> Self {
        Self { f16: true, max_binding: None, max_buffer: None, coop: true, tuning: Tuning::default() }
    }
}

/// Variants of the portable kernels whose speed depends on the GPU (register file, latency hiding): the
/// defaults are what every caller gets; `latent-gen`'s `--attention-queries`, `--no-prefetch`,
/// `--double-buffer` and `--split-k` pick the others, so that one benchmark run on a GPU compares them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Tuning {
    /// Queries per invocation of the portable attention kernel, 1 or 2 (kernels/attention.wgsl): two halve
    /// the key and value reads per query and double the registers each invocation holds.
    pub attention_queries: u32,
    /// The portable GEMM reads the next k step's tiles into registers while it computes the current one
    /// (kernels/gemm.wgsl); off, it reads each step's tiles at the start of that step, as it did before.
    pub gemm_prefetch: bool,
    /// The portable GEMM keeps two workgroup tiles of each operand and alternates between them: one barrier
    /// per k step instead of two, for twice the workgroup memory (only tiles that fit the device's limit
    /// take it: the 64x64 tile needs 16 KiB, the 128x128 one 32 KiB). The next step's elements go through
    /// registers as with `gemm_prefetch`, which it implies.
    pub gemm_double_buffer: bool,
    /// Split-K: a GEMM (matmul, linear layer, conv) that would run on fewer workgroups than this, with k long
    /// enough, cuts k into chunks summed by workgroups of their own, then adds them in a second pass
    /// (kernels/gemm_reduce.wgsl). Where a big GPU has more cores than such a GEMM has output tiles (SD's 8x8
    /// latents at 512x512: 40 tiles) the cores would otherwise idle; on a small GPU it is only the extra pass.
    /// 0 (the default): never.
    pub split_k_below: u32,
}

impl Default for Tuning {
    fn default() -> Self {
        Self { attention_queries: 1, gemm_prefetch: true, gemm_double_buffer: false, split_k_below: 0 }
    }
}

impl Tuning {
    /// The variants the diagnostics page compares, by name, the defaults first: each differs from the
    /// defaults in one choice. Split-K at two thresholds, as WebGPU does not say how many cores a GPU has
    /// (a laptop's has 8 to 32, a big discrete one 100 or more).
    pub fn variants() -> Vec<(&'static str, Tuning)> {
        let d = Tuning::default();
        vec![
            ("defaults", d),
            ("double-buffer", Tuning { gemm_double_buffer: true, ..d }),
            ("split-k-128", Tuning { split_k_below: 128, ..d }),
            ("split-k-512", Tuning { split_k_below: 512, ..d }),
            ("attention-queries-2", Tuning { attention_queries: 2, ..d }),
            ("no-prefetch", Tuning { gemm_prefetch: false, ..d }),
        ]
    }

    /// The variant of [`Tuning::variants`] called `name`.
    pub fn named(name: &str) -> Option<Tuning> {
        Self::variants().into_iter().find(|(n, _)| *n == name).map(|(_, t)| t)
    }

    /// This tuning's name in [`Tuning::variants`], if it is one of them.
    pub fn name(&self) -> Option<&'static str> {
        Self::variants().into_iter().find(|(_, t)| t == self).map(|(n, _)| n)
    }

    /// Within the kernels' ranges: one or two attention queries per invocation.
    fn clamped(self) -> Tuning {
        Tuning { attention_queries: self.attention_queries.clamp(1, 2), ..self }
    }
}

/// The cooperative matrix configuration the f16 GEMMs use: `size` x `size` x `size` fragments of f16 inputs
/// with f32 accumulators, on subgroups of exactly `subgroup` invocations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct CoopConfig {
    pub size: u32,
    pub subgroup: u32,
}

impl CoopConfig {
    /// What every kernel on these fragments is specialized with: f16 activations, the extension, the aliases
    /// coop_a / coop_b / coop_c (f16 A and B, f32 accumulator) and the constants S (fragment side) and SG
    /// (subgroup size).
    pub fn spec(self) -> Spec {
        let s = self.size;
        let ty = |t: &str, role: &str| format!("coop_mat{s}x{s}<{t}, {role}>");
        Spec::new(true)
            .enable("wgpu_cooperative_matrix")
            .alias("coop_a", ty("f16", "A"))
            .alias("coop_b", ty("f16", "B"))
            .alias("coop_c", ty("f32", "C"))
            .u32("S", s)
            .u32("SG", self.subgroup)
    }
}

/// The configuration [`CoopConfig`] the adapter offers, if any: f16 x f16 -> f32 at 16 (NVIDIA, AMD) or 8
/// (Apple, lavapipe), and one subgroup size (the kernels assign fragments to subgroups by their id).
fn coop_config(adapter: &wgpu::Adapter) -> Option<CoopConfig> {
    if !adapter.features().contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX | wgpu::Features::SUBGROUP) {
        return None;
    }
    let info = adapter.get_info();
    let subgroup = info.subgroup_min_size;
    if subgroup == 0 || subgroup != info.subgroup_max_size {
        return None;
    }
    let props = adapter.cooperative_matrix_properties();
    [16, 8]
        .into_iter()
        .find(|&s| {
            props.iter().any(|c| {
                (c.m_size, c.n_size, c.k_size) == (s, s, s)
                    && c.ab_type == wgpu::CooperativeScalarType::F16
                    && c.cr_type == wgpu::CooperativeScalarType::F32
            })
        })
        .map(|size| CoopConfig { size, subgroup })
}

/// What the adapter is and what the device was created with, in a form that prints and serializes.
#[derive(Clone, Debug, Serialize)]
pub struct AdapterSummary {
    pub name: String,
    pub backend: String,
    pub device_type: String,
    pub driver: String,
    pub driver_info: String,
    pub shader_f16: bool,
    pub subgroups: bool,
    pub timestamp_query: bool,
    pub max_buffer_size: u64,
    pub max_storage_buffer_binding_size: u64,
    pub max_compute_workgroup_storage_size: u32,
    pub max_compute_invocations_per_workgroup: u32,
    pub max_compute_workgroups_per_dimension: u32,
    pub max_storage_buffers_per_shader_stage: u32,
    /// The adapter's cooperative matrix configurations (native Vulkan/Metal only), as "MxNxK a->c".
    pub cooperative_matrix: Vec<String>,
    /// The configuration the f16 GEMMs run on, when enabled.
    pub coop: Option<CoopConfig>,
    /// The kernel variants this device runs.
    pub tuning: Tuning,
}

impl std::fmt::Display for AdapterSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "adapter: {} ({}, {})", self.name, self.backend, self.device_type)?;
        writeln!(f, "driver: {} {}", self.driver, self.driver_info)?;
        writeln!(
            f,
            "features: shader-f16 {}, subgroups {}, timestamp-query {}",
            yes_no(self.shader_f16),
            yes_no(self.subgroups),
            yes_no(self.timestamp_query)
        )?;
        writeln!(f, "maxBufferSize: {}", self.max_buffer_size)?;
        writeln!(f, "maxStorageBufferBindingSize: {}", self.max_storage_buffer_binding_size)?;
        writeln!(f, "maxComputeWorkgroupStorageSize: {}", self.max_compute_workgroup_storage_size)?;
        writeln!(f, "maxComputeInvocationsPerWorkgroup: {}", self.max_compute_invocations_per_workgroup)?;
        writeln!(f, "maxComputeWorkgroupsPerDimension: {}", self.max_compute_workgroups_per_dimension)?;
        write!(f, "maxStorageBuffersPerShaderStage: {}", self.max_storage_buffers_per_shader_stage)?;
        if !self.cooperative_matrix.is_empty() {
            write!(f, "\ncooperative matrix: {}", self.cooperative_matrix.join(", "))?;
            match self.coop {
                Some(c) => write!(f, " (f16 GEMMs on {0}x{0} fragments, subgroups of {1})", c.size, c.subgroup)?,
                None => write!(f, " (not used)")?,
            }
        }
        if self.tuning != Tuning::default() {
            let t = self.tuning;
            write!(
                f,
                "\nkernel variants: attention queries per invocation {}, GEMM prefetch {}, GEMM double buffering {}, \
                 split-K below {} workgroups",
                t.attention_queries,
                yes_no(t.gemm_prefetch),
                yes_no(t.gemm_double_buffer),
                t.split_k_below
            )?;
        }
        Ok(())
    }
}

fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

/// Shared state behind a [`GpuContext`]; tensors keep the pool alive through it.
pub(crate) struct Shared {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub pool: Ref<BufferPool>,
    pub pipelines: PipelineCache,
    pub bind_groups: BindGroupCache,
    pub batch: Mutex<Batch>,
    pub cost: CostTracker,
    /// Dispatches are checked, their outputs allocated and their cost counted, but nothing is recorded.
    pub dry_run: std::sync::atomic::AtomicBool,
    /// The first error wgpu reported outside an error scope; taken (and returned) at the next sync point.
    pub uncaptured: Arc<Mutex<Option<String>>>,
    /// Why the device was lost, once it was: every later sync point returns [`Error::DeviceLost`].
    pub lost: Arc<Mutex<Option<String>>>,
}

/// A device ready for latent-gen's kernels, or the CPU fallback ([`GpuContext::cpu`]) on which every op runs
/// on candle's CPU backend. Cheap to clone.
#[derive(Clone)]
pub struct GpuContext {
    backend: Backend,
    summary: Ref<AdapterSummary>,
    /// A view that plans kernels for another adapter ([`GpuContext::planning_for`]): dry runs only.
    plan_only: bool,
    /// While recording ([`GpuContext::record_sources`]): the WGSL of every kernel this view (and its clones)
    /// asked for in a dry run, by pipeline.
    pub(crate) sources: Ref<Mutex<Option<SourceMap>>>,
}

type SourceMap = std::collections::BTreeMap<String, KernelSource>;

#[derive(Clone)]
enum Backend {
    Gpu(Ref<Shared>),
    Cpu,
}

impl GpuContext {
    /// Finds the high-performance adapter and creates a device on it.
    pub async fn new() -> Result<Self> {
        Self::with_options(ContextOptions::default()).await
    }

    /// [`GpuContext::new`] with options.
    pub async fn with_options(options: ContextOptions) -> Result<Self> {
        let instance = wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
        let adapter = instance
            .request_adapter(&wgpu::RequestAdapterOptions {
                power_preference: wgpu::PowerPreference::HighPerformance,
                ..Default::default()
            })
            .await
            .map_err(|e| Error::NoAdapter(format!("{e}. {}", no_adapter_hint())))?;
        Self::from_adapter(&adapter, options).await
    }

    /// Creates a device on `adapter` with the adapter's own limits (not WebGPU's 128/256 MiB defaults) and
    /// shader-f16, subgroups and timestamp queries where the adapter has them.
    pub async fn from_adapter(adapter: &wgpu::Adapter, options: ContextOptions) -> Result<Self> {
        let mut features = adapter.features() & WANTED_FEATURES;
        if !options.f16 {
            features.remove(wgpu::Features::SHADER_F16);
        }
        let coop =
            if options.coop && features.contains(wgpu::Features::SHADER_F16) { coop_config(adapter) } else { None };
        if coop.is_some() {
            features |= wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX;
        }
        let mut limits = adapter.limits();
        if let Some(cap) = options.max_binding {
            limits.max_storage_buffer_binding_size = limits.max_storage_buffer_binding_size.min(cap);
        }
        if let Some(cap) = options.max_buffer {
            limits.max_buffer_size = limits.max_buffer_size.min(cap);
        }
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("latent-gen"),
                required_features: features,
                required_limits: limits.clone(),
                memory_hints: wgpu::MemoryHints::Performance,
                // SAFETY: the only experimental feature requested is cooperative matrices, and only when the
                // adapter reports an f16 x f16 -> f32 configuration the GEMM kernels are written for; their
                // results are checked against candle (selfcheck) like every other kernel's.
                experimental_features: if coop.is_some() {
                    unsafe { wgpu::ExperimentalFeatures::enabled() }
                } else {
                    wgpu::ExperimentalFeatures::disabled()
                },
                ..Default::default()
            })
            .await
            .map_err(|e| Error::RequestDevice(e.to_string()))?;
        let info = adapter.get_info();
        let summary = AdapterSummary {
            name: info.name,
            backend: format!("{:?}", info.backend),
            device_type: format!("{:?}", info.device_type),
            driver: info.driver,
            driver_info: info.driver_info,
            shader_f16: features.contains(wgpu::Features::SHADER_F16),
            subgroups: features.contains(wgpu::Features::SUBGROUP),
            timestamp_query: features.contains(wgpu::Features::TIMESTAMP_QUERY),
            max_buffer_size: limits.max_buffer_size,
            max_storage_buffer_binding_size: limits.max_storage_buffer_binding_size,
            max_compute_workgroup_storage_size: limits.max_compute_workgroup_storage_size,
            max_compute_invocations_per_workgroup: limits.max_compute_invocations_per_workgroup,
            max_compute_workgroups_per_dimension: limits.max_compute_workgroups_per_dimension,
            max_storage_buffers_per_shader_stage: limits.max_storage_buffers_per_shader_stage,
            cooperative_matrix: adapter
                .cooperative_matrix_properties()
                .iter()
                .map(|c| format!("{}x{}x{} {:?}->{:?}", c.m_size, c.n_size, c.k_size, c.ab_type, c.cr_type))
                .collect(),
            coop,
            tuning: options.tuning.clamped(),
        };
        Ok(Self::from_device(device, queue, summary))
    }

    fn from_device(device: wgpu::Device, queue: wgpu::Queue, summary: AdapterSummary) -> Self {
        let uncaptured = Arc::new(Mutex::new(None::<String>));
        let slot = uncaptured.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            let mut slot = slot.lock().unwrap_or_else(|p| p.into_inner());
            if slot.is_none() {
                *slot = Some(e.to_string());
            }
        }));
        let lost = Arc::new(Mutex::new(None::<String>));
        let slot = lost.clone();
        device.set_device_lost_callback(move |reason, msg| {
            let why = match reason {
                wgpu::DeviceLostReason::Destroyed => "the device was destroyed".to_string(),
                _ if msg.is_empty() => "reason unknown".to_string(),
                _ => msg,
            };
            *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
        });
        // Kernel parameters go in a storage buffer on lavapipe (see PipelineCache::new), a uniform buffer
        // elsewhere.
        let params_in_storage = summary.driver == "llvmpipe";
        let limits = device.limits();
        let align = if params_in_storage {
            limits.min_storage_buffer_offset_alignment.max(limits.min_uniform_buffer_offset_alignment)
        } else {
            limits.min_uniform_buffer_offset_alignment
        };
        let shared = Shared {
            pool: Ref::new(BufferPool::new()),
            pipelines: PipelineCache::new(summary.shader_f16, params_in_storage),
            bind_groups: BindGroupCache::default(),
            batch: Mutex::new(Batch::new(align, params_in_storage)),
            cost: CostTracker::default(),
            dry_run: Default::default(),
            uncaptured,
            lost,
            device,
            queue,
        };
        Self {
            backend: Backend::Gpu(Ref::new(shared)),
            summary: Ref::new(summary),
            plan_only: false,
            sources: Ref::default(),
        }
    }

    /// The CPU fallback: tensors live in memory and ops run on candle's CPU backend (f32 throughout; f16
    /// and quantized weights are converted on upload).
    pub fn cpu() -> Self {
        // "No limit", as the largest integer a JS number holds exactly (the summary goes to the page as JSON).
        const UNLIMITED: u64 = (1 << 53) - 1;
        let summary = AdapterSummary {
            name: "CPU (candle)".into(),
            backend: "Cpu".into(),
            device_type: "Cpu".into(),
            driver: String::new(),
            driver_info: String::new(),
            shader_f16: false,
            subgroups: false,
            timestamp_query: false,
            max_buffer_size: UNLIMITED,
            max_storage_buffer_binding_size: UNLIMITED,
            max_compute_workgroup_storage_size: 0,
            max_compute_invocations_per_workgroup: 0,
            max_compute_workgroups_per_dimension: u32::MAX,
            max_storage_buffers_per_shader_stage: u32::MAX,
            cooperative_matrix: Vec::new(),
            coop: None,
            tuning: Tuning::default(),
        };
        Self { backend: Backend::Cpu, summary: Ref::new(summary), plan_only: false, sources: Ref::default() }
    }

    /// Whether this is the CPU fallback.
    pub fn is_cpu(&self) -> bool {
        matches!(self.backend, Backend::Cpu)
    }

    /// The GPU state, or an error naming the misuse on the CPU fallback.
    pub(crate) fn shared(&self) -> Result<&Shared> {
        match &self.backend {
            Backend::Gpu(s) => Ok(s),
            Backend::Cpu => Err(Error::Invalid("a GPU-only operation was asked of the CPU fallback".into())),
        }
    }

    /// The adapter, its limits and the features enabled on the device.
    pub fn summary(&self) -> &AdapterSummary {
        &self.summary
    }

    /// The cooperative matrix configuration the f16 GEMMs run on, if the device has one enabled.
    pub fn coop(&self) -> Option<CoopConfig> {
        self.summary.coop
    }

    /// Whether kernels may use f16 arithmetic and f16 activations.
    pub fn has_f16(&self) -> bool {
        self.summary.shader_f16
    }

    /// The wgpu device (None on the CPU fallback), for embedders that draw with it (e.g. the preview canvas).
    pub fn device(&self) -> Option<&wgpu::Device> {
        self.shared().ok().map(|s| &s.device)
    }

    /// The wgpu queue (None on the CPU fallback).
    pub fn queue(&self) -> Option<&wgpu::Queue> {
        self.shared().ok().map(|s| &s.queue)
    }

    /// Bytes held in live tensors, in the pool, and the peak of the live bytes (zeros on the CPU fallback).
    pub fn pool_stats(&self) -> PoolStats {
        self.shared().map(|s| s.pool.stats()).unwrap_or_default()
    }

    /// Returns pooled (free) buffers to the driver.
    pub fn trim_pool(&self) {
        if let Ok(s) = self.shared() {
            s.bind_groups.clear();
            s.pool.trim();
        }
    }

    /// Bind groups created so far (each is made once per kernel layout and buffers, then reused).
    pub fn bind_groups_created(&self) -> u64 {
        self.shared().map(|s| s.bind_groups.created()).unwrap_or(0)
    }

    /// In a dry run, kernels are checked, their outputs allocated from the pool and their cost counted, but
    /// nothing is dispatched: what a real-size model needs in memory and dispatches, on any machine, in
    /// seconds (results are garbage). No-op on the CPU fallback and on a planning view (always dry).
    pub fn set_dry_run(&self, on: bool) {
        // A planning view is always dry; the flag belongs to the device, which other views may be using.
        if self.plan_only {
            return;
        }
        if let Ok(s) = self.shared() {
            s.dry_run.store(on, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// A view of this context that specializes kernels as for another adapter, described by `summary` (its
    /// limits, shader-f16, cooperative matrices), and never dispatches them: everything run through it is a
    /// dry run ([`set_dry_run`](Self::set_dry_run); buffers are allocated, results are garbage), so nothing
    /// made for that adapter reaches this device. With [`record_sources`](Self::record_sources), the tests
    /// compile (with naga) the kernels a GPU they do not have would run, e.g. on 16x16 cooperative matrices
    /// where lavapipe has only 8x8.
    pub fn planning_for(&self, summary: AdapterSummary) -> GpuContext {
        GpuContext {
            backend: self.backend.clone(),
            summary: Ref::new(summary),
            plan_only: true,
            sources: Ref::default(),
        }
    }

    /// A view of this device that runs the kernel variants `tuning` (its tensors, pool and caches are
    /// this context's): how the diagnostics page compares variants on one device.
    pub fn with_tuning(&self, tuning: Tuning) -> GpuContext {
        let summary = AdapterSummary { tuning: tuning.clamped(), ..(*self.summary).clone() };
        GpuContext { summary: Ref::new(summary), ..self.clone() }
    }

    /// Whether this is a [`planning_for`](Self::planning_for) view.
    pub(crate) fn plan_only(&self) -> bool {
        self.plan_only
    }

    /// Starts recording the source of every kernel dispatched in a dry run or through a planning view (see
    /// [`take_sources`]).
    ///
    /// [`take_sources`]: Self::take_sources
    pub fn record_sources(&self) {
        *self.sources.lock().unwrap_or_else(|p| p.into_inner()) = Some(Default::default());
    }

    /// Stops recording and returns the kernels recorded, one per distinct pipeline.
    pub fn take_sources(&self) -> Vec<KernelSource> {
        let recorded = self.sources.lock().unwrap_or_else(|p| p.into_inner()).take();
        recorded.map(|m| m.into_values().collect()).unwrap_or_default()
    }

    /// Submits the recorded commands now. Ops record into one batch; reading a tensor back flushes implicitly.
    pub fn flush(&self) -> Result<()> {
        let Ok(s) = self.shared() else { return Ok(()) };
        s.batch.lock().unwrap_or_else(|p| p.into_inner()).flush(&s.device, &s.queue);
        self.take_uncaptured()
    }

    /// Flushes and waits until the GPU has finished everything submitted (natively; in the browser the
    /// returned future resolves when the queue is idle). Immediate on the CPU fallback.
    pub async fn sync(&self) -> Result<()> {
        let Ok(s) = self.shared() else { return Ok(()) };
        self.flush()?;
        let (tx, rx) = futures_channel::oneshot::channel();
        s.queue.on_submitted_work_done(move || {
            let _ = tx.send(());
        });
        self.poll_wait()?;
        rx.await.map_err(|_| Error::Gpu("the device was lost while waiting for the queue".into()))?;
        self.take_uncaptured()
    }

    /// Natively blocks until submitted work is done; a no-op in the browser (the event loop polls).
    pub(crate) fn poll_wait(&self) -> Result<()> {
        #[cfg(not(target_arch = "wasm32"))]
        self.shared()?.device.poll(wgpu::PollType::wait_indefinitely()).map_err(|e| Error::Gpu(e.to_string()))?;
        Ok(())
    }

    /// Why the device was lost, if it was (None on the CPU fallback and while the device works).
    pub fn device_lost(&self) -> Option<String> {
        self.shared().ok().and_then(|s| s.lost.lock().unwrap_or_else(|p| p.into_inner()).clone())
    }

    /// Destroys the device, as a driver reset would lose it: for testing what users see then.
    pub fn destroy_device(&self) {
        if let Ok(s) = self.shared() {
            s.device.destroy();
        }
    }

    /// Returns the first uncaptured wgpu error since the last call (or the device's loss), as an error value.
    pub(crate) fn take_uncaptured(&self) -> Result<()> {
        if let Some(why) = self.device_lost() {
            return Err(Error::DeviceLost(why));
        }
        let Ok(s) = self.shared() else { return Ok(()) };
        let mut slot = s.uncaptured.lock().unwrap_or_else(|p| p.into_inner());
        match slot.take() {
            Some(msg) => Err(Error::Gpu(msg)),
            None => Ok(()),
        }
    }

    /// The device's limits that ops check before dispatching.
    pub(crate) fn limits(&self) -> &AdapterSummary {
        &self.summary
    }
}

fn no_adapter_hint() -> &'static str {
    if cfg!(target_arch = "wasm32") {
        "This browser has no usable WebGPU: use a recent Chrome or Edge (or enable WebGPU in Firefox or Safari)"
    } else {
        "Install a Vulkan driver (on Debian without a GPU: apt-get install mesa-vulkan-drivers libvulkan1)"
    }
}
