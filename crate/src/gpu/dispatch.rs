//! Recording one kernel launch into the current batch.

use super::context::GpuContext;
use super::pipeline::{Kernel, KernelSource, PipelineCache, Spec};
use super::tensor::Tensor;
use crate::error::{Error, Result};

/// The workgroup grid for `n` workgroups laid out in x then y (WebGPU caps each dimension, 65535 by default).
/// Kernels recover the linear id as `wid.y * nwg.x + wid.x`.
pub fn grid_1d(ctx: &GpuContext, n: u32) -> [u32; 3] {
    let max = ctx.limits().max_compute_workgroups_per_dimension.max(1);
    if n <= max { [n, 1, 1] } else { [max, n.div_ceil(max), 1] }
}

impl GpuContext {
    /// Records `kernel` with `params` (its uniform struct) over `inputs` (read-only) and `outputs`.
    #[allow(clippy::too_many_arguments)]
    pub fn dispatch(
        &self,
        op: &'static str,
        kernel: &Kernel,
        spec: &Spec,
        params: &[u8],
        inputs: &[&Tensor],
        outputs: &[&Tensor],
        groups: [u32; 3],
    ) -> Result<()> {
        debug_assert_eq!(inputs.len() as u32, kernel.inputs, "{}: inputs", kernel.name);
        debug_assert_eq!(outputs.len() as u32, kernel.outputs, "{}: outputs", kernel.name);
        if spec.f16 && !self.has_f16() {
            return Err(Error::MissingFeature { op, feature: "shader-f16" });
        }
        let max = self.limits().max_compute_workgroups_per_dimension;
        if let Some(&g) = groups.iter().find(|&&g| g > max) {
            let shapes: Vec<_> = inputs.iter().map(|t| t.shape().to_vec()).collect();
            return Err(Error::Limit {
                op,
                what: "a workgroup grid dimension",
                needed: g as u64,
                limit: max as u64,
                shape: format!("inputs {shapes:?}"),
            });
        }
        if groups.contains(&0) {
            return Ok(());
        }
        let shared = self.shared()?;
        let timed = shared.cost.record(op, inputs, outputs)?;
        // A view planning for another adapter never dispatches: its kernels are for that adapter.
        if self.plan_only() || shared.dry_run.load(std::sync::atomic::Ordering::Relaxed) {
            if let Some(sources) = self.sources.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
                sources.entry(PipelineCache::key(kernel, spec)).or_insert_with(|| KernelSource {
                    name: kernel.name,
                    entry: kernel.entry,
                    source: shared.pipelines.source(kernel, spec),
                });
            }
            return Ok(());
        }
        let device = &shared.device;
        let pipeline = shared.pipelines.get(device, kernel, spec);
        let mut batch = shared.batch.lock().unwrap_or_else(|p| p.into_inner());
        let (arena, offset, size) = batch.push_uniform(device, &shared.queue, params);
        let mut buffers = vec![(&arena, size)];
        for t in inputs.iter().chain(outputs) {
            buffers.push((t.gpu_buffer()?, t.byte_len().max(4)));
        }
        let bind_group = shared.bind_groups.get(device, kernel.name, &pipeline.layout, &buffers);
        let pass = match &timed {
            Some((set, index)) => batch.timed_pass(device, set, *index),
            None => batch.pass(device),
        };
        pass.set_pipeline(&pipeline.pipeline);
        pass.set_bind_group(0, &bind_group, &[offset as u32]);
        pass.dispatch_workgroups(groups[0], groups[1], groups[2]);
        Ok(())
    }
}
