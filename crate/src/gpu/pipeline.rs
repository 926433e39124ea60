//! Compute pipelines, compiled once per kernel and specialization and cached.
//!
//! A kernel is one `.wgsl` file (or a few concatenated: a shared core plus an op's loaders). It is specialized
//! by a preamble of named constants (`const TILE_M: u32 = 64u;`) and by the activation type (`alias act = f32;`
//! or `f16` with `enable f16;`). The preamble text, with the kernel's name, is the cache key.

use std::collections::HashMap;
use std::fmt::Write;
use std::sync::Mutex;

use super::Ref;

/// One kernel: its WGSL sources, its entry point and its binding signature.
#[derive(Clone, Copy, Debug)]
pub struct Kernel {
    pub name: &'static str,
    /// Concatenated in order after the preamble.
    pub sources: &'static [&'static str],
    pub entry: &'static str,
    /// Read-only storage bindings (1..=inputs, after the uniform at binding 0).
    pub inputs: u32,
    /// Read-write storage bindings (after the inputs).
    pub outputs: u32,
}

/// A value of a specialization constant.
#[derive(Clone, Copy, Debug)]
pub enum Const {
    U32(u32),
    F32(f32),
    Bool(bool),
}

/// How a kernel is specialized: the activation type and named constants.
#[derive(Clone, Debug, Default)]
pub struct Spec {
    /// Activations are f16 (needs shader-f16); otherwise f32.
    pub f16: bool,
    pub consts: Vec<(&'static str, Const)>,
    /// Extra type aliases, e.g. ("src", "f32").
    pub aliases: Vec<(&'static str, String)>,
    /// Extra `enable` directives (e.g. "wgpu_cooperative_matrix"), for kernels that only run where the
    /// device has them.
    pub enables: Vec<&'static str>,
    /// WGSL written out for this specialization (e.g. an entry point unrolled over named variables).
    pub code: Vec<String>,
}

impl Spec {
    pub fn new(f16: bool) -> Self {
        Self { f16, ..Default::default() }
    }

    pub fn code(mut self, wgsl: String) -> Self {
        self.code.push(wgsl);
        self
    }

    pub fn enable(mut self, extension: &'static str) -> Self {
        self.enables.push(extension);
        self
    }

    pub fn alias(mut self, name: &'static str, ty: impl Into<String>) -> Self {
        self.aliases.push((name, ty.into()));
        self
    }

    pub fn u32(mut self, name: &'static str, v: u32) -> Self {
        self.consts.push((name, Const::U32(v)));
        self
    }

    pub fn f32(mut self, name: &'static str, v: f32) -> Self {
        self.consts.push((name, Const::F32(v)));
        self
    }

    pub fn flag(mut self, name: &'static str, v: bool) -> Self {
        self.consts.push((name, Const::Bool(v)));
        self
    }

    fn preamble(&self) -> String {
        let mut s = String::new();
        for e in &self.enables {
            let _ = writeln!(s, "enable {e};");
        }
        if self.f16 {
            s.push_str("enable f16;\nalias act = f16;\nalias act4 = vec4<f16>;\n");
        } else {
            s.push_str("alias act = f32;\nalias act4 = vec4<f32>;\n");
        }
        for (name, ty) in &self.aliases {
            let _ = writeln!(s, "alias {name} = {ty};");
        }
        for (name, v) in &self.consts {
            let _ = match v {
                Const::U32(v) => writeln!(s, "const {name}: u32 = {v}u;"),
                Const::F32(v) => writeln!(s, "const {name}: f32 = {v:?};"),
                Const::Bool(v) => writeln!(s, "const {name}: bool = {v};"),
            };
        }
        for code in &self.code {
            s.push_str(code);
        }
        s
    }
}

/// A kernel's WGSL as specialized for a launch ([`crate::gpu::GpuContext::record_sources`]).
#[derive(Clone, Debug)]
pub struct KernelSource {
    pub name: &'static str,
    pub entry: &'static str,
    pub source: String,
}

/// A compiled kernel and the layout of its bind group.
pub struct Pipeline {
    pub pipeline: wgpu::ComputePipeline,
    pub layout: wgpu::BindGroupLayout,
}

/// See the module documentation.
pub struct PipelineCache {
    pipelines: Mutex<HashMap<String, Ref<Pipeline>>>,
    layouts: Mutex<HashMap<(u32, u32), wgpu::BindGroupLayout>>,
    has_f16: bool,
    params_in_storage: bool,
}

/// Every kernel's parameters, as the WGSL sources declare them.
const PARAMS_UNIFORM: &str = "@group(0) @binding(0) var<uniform> p: Params;";

impl PipelineCache {
    /// `params_in_storage` binds the kernels' parameters as a read-only storage buffer instead of a uniform
    /// buffer: for Mesa's lavapipe, which recompiles a shader whose loops read uniforms with those values
    /// inlined at every dispatch whose uniforms changed, and keeps every such variant until the pipeline is
    /// destroyed (measured: 7 ms and 1.25 MB per convolution dispatch, so hundreds of MB per image).
    pub fn new(has_f16: bool, params_in_storage: bool) -> Self {
        Self { pipelines: Mutex::default(), layouts: Mutex::default(), has_f16, params_in_storage }
    }

    /// What identifies `kernel` specialized by `spec` among the pipelines.
    pub fn key(kernel: &Kernel, spec: &Spec) -> String {
        format!("{}\n{}", kernel.name, spec.preamble())
    }

    /// The WGSL of `kernel` specialized by `spec`, as compiled.
    pub fn source(&self, kernel: &Kernel, spec: &Spec) -> String {
        let mut source = spec.preamble();
        for part in kernel.sources {
            source.push_str(part);
            source.push('\n');
        }
        if self.params_in_storage {
            debug_assert!(
                source.contains(PARAMS_UNIFORM),
                "{}: parameters not declared as {PARAMS_UNIFORM}",
                kernel.name
            );
            source = source.replace(PARAMS_UNIFORM, "@group(0) @binding(0) var<storage, read> p: Params;");
        }
        source
    }

    /// The pipeline for `kernel` specialized by `spec`, compiled on first use.
    ///
    /// The cache is not locked while a pipeline compiles, so threads sharing a context compile theirs side by
    /// side: the native kernel tests (two threads on one context, lavapipe compiling on the CPU, Mesa's shader
    /// cache cold as in CI) took 160 s with the lock held through compilation and 122 s without, one run each
    /// on the 2-core VM. Two threads asking for the same new pipeline may both compile it; the first stored is
    /// kept.
    pub fn get(&self, device: &wgpu::Device, kernel: &Kernel, spec: &Spec) -> Ref<Pipeline> {
        debug_assert!(!spec.f16 || self.has_f16, "f16 kernels are only requested on shader-f16 devices");
        let key = Self::key(kernel, spec);
        if let Some(p) = self.pipelines.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
            return p.clone();
        }
        let source = self.source(kernel, spec);
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some(kernel.name),
            source: wgpu::ShaderSource::Wgsl(source.into()),
        });
        let layout = self.layout(device, kernel.inputs, kernel.outputs);
        let pipeline_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some(kernel.name),
            bind_group_layouts: &[Some(&layout)],
            immediate_size: 0,
        });
        let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(kernel.name),
            layout: Some(&pipeline_layout),
            module: &module,
            entry_point: Some(kernel.entry),
            compilation_options: Default::default(),
            cache: None,
        });
        let p = Ref::new(Pipeline { pipeline, layout });
        self.pipelines.lock().unwrap_or_else(|p| p.into_inner()).entry(key).or_insert(p).clone()
    }

    fn layout(&self, device: &wgpu::Device, inputs: u32, outputs: u32) -> wgpu::BindGroupLayout {
        let mut layouts = self.layouts.lock().unwrap_or_else(|p| p.into_inner());
        layouts
            .entry((inputs, outputs))
            .or_insert_with(|| {
                let storage = |binding: u32, read_only: bool| wgpu::BindGroupLayoutEntry {
                    binding,
                    visibility: wgpu::ShaderStages::COMPUTE,
                    ty: wgpu::BindingType::Buffer {
                        ty: wgpu::BufferBindingType::Storage { read_only },
                        has_dynamic_offset: false,
                        min_binding_size: None,
                    },
                    count: None,
                };
                let mut entries = vec![wgpu::BindGroupLayoutEntry {
                    binding: 0,
                    visibility: wgpu::ShaderStages::COMPUTE,
                    ty: wgpu::BindingType::Buffer {
                        // The parameters' slot in the batch's arena is a dynamic offset, so that one bind
                        // group serves every dispatch over the same buffers (gpu/bindings.rs).
                        ty: if self.params_in_storage {
                            wgpu::BufferBindingType::Storage { read_only: true }
                        } else {
                            wgpu::BufferBindingType::Uniform
                        },
                        has_dynamic_offset: true,
                        min_binding_size: None,
                    },
                    count: None,
                }];
                entries.extend((0..inputs).map(|i| storage(1 + i, true)));
                entries.extend((0..outputs).map(|i| storage(1 + inputs + i, false)));
                device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                    label: Some("latent-gen kernel"),
                    entries: &entries,
                })
            })
            .clone()
    }
}
