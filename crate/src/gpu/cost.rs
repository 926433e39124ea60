//! What a stretch of work costs, device-independently: dispatches, bytes bound for reading and writing,
//! FLOPs, per op family, and (where the device has timestamp queries) GPU time per op family. Off unless a
//! benchmark turns it on ([`GpuContext::cost_begin`] .. [`GpuContext::cost_end`]); off, a dispatch pays one
//! relaxed atomic load.

use std::collections::{BTreeMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::Serialize;

use super::context::GpuContext;
use super::tensor::Tensor;
use crate::error::{Error, Result};

/// The cost of one op family (the launcher's op name: `matmul`, `conv2d`, `attention`, ...).
#[derive(Clone, Debug, Default, Serialize)]
pub struct OpCost {
    pub dispatches: u64,
    /// Bytes of every buffer the dispatches bind read-only (what they may read).
    pub bytes_read: u64,
    /// Bytes of every buffer the dispatches write.
    pub bytes_written: u64,
    /// Multiply-adds count two; launchers of compute-bound kernels report them (elementwise work is not
    /// counted).
    pub flops: u64,
    /// GPU time from timestamp queries around each dispatch, when the device has them.
    pub gpu_ms: Option<f64>,
}

/// What [`GpuContext::cost_end`] returns.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CostReport {
    pub dispatches: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub flops: u64,
    /// The least any schedule of these ops could move: every buffer first read from outside the window
    /// (weights, inputs) once, and every byte written once and read back once.
    pub bytes_min: u64,
    /// Sum of the dispatches' GPU times (timestamps), when measured.
    pub gpu_ms: Option<f64>,
    pub by_op: BTreeMap<String, OpCost>,
}

impl CostReport {
    /// Bytes moved over the minimum: 1.0 when every activation is written once and read once.
    pub fn bytes_over_min(&self) -> f64 {
        (self.bytes_read + self.bytes_written) as f64 / self.bytes_min.max(1) as f64
    }
}

impl std::fmt::Display for CostReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mb = |b: u64| b as f64 / 1e6;
        writeln!(
            f,
            "{} dispatches, {:.1} MB read, {:.1} MB written ({:.2}x the minimum {:.1} MB), {:.2} GFLOP",
            self.dispatches,
            mb(self.bytes_read),
            mb(self.bytes_written),
            self.bytes_over_min(),
            mb(self.bytes_min),
            self.flops as f64 / 1e9
        )?;
        writeln!(
            f,
            "  {:<20} {:>10} {:>12} {:>12} {:>10} {:>10}",
            "op", "dispatches", "MB read", "MB written", "GFLOP", "GPU ms"
        )?;
        for (op, c) in &self.by_op {
            let ms = c.gpu_ms.map(|m| format!("{m:.3}")).unwrap_or_else(|| "-".into());
            writeln!(
                f,
                "  {op:<20} {:>10} {:>12.1} {:>12.1} {:>10.2} {:>10}",
                c.dispatches,
                mb(c.bytes_read),
                mb(c.bytes_written),
                c.flops as f64 / 1e9,
                ms
            )?;
        }
        Ok(())
    }
}

/// Timestamp queries: one pair per dispatch, resolved when the window ends.
const MAX_TIMED: u32 = 2048;

struct Window {
    report: CostReport,
    /// Buffers written in the window (later reads of them are not reads from outside).
    written: HashSet<wgpu::Buffer>,
    /// Buffers read from outside the window, counted once each in `bytes_min`.
    outside: HashSet<wgpu::Buffer>,
    timing: Option<Timing>,
}

pub(crate) struct Timing {
    pub set: wgpu::QuerySet,
    /// The op of each timed dispatch, in query-pair order.
    pub ops: Vec<&'static str>,
}

#[derive(Default)]
pub(crate) struct CostTracker {
    on: AtomicBool,
    window: Mutex<Option<Window>>,
}

impl CostTracker {
    fn window(&self) -> std::sync::MutexGuard<'_, Option<Window>> {
        self.window.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts one dispatch of `op`; returns the timestamp-query pair to write around it, if timing.
    pub fn record(
        &self,
        op: &'static str,
        inputs: &[&Tensor],
        outputs: &[&Tensor],
    ) -> Result<Option<(wgpu::QuerySet, u32)>> {
        if !self.on.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let mut guard = self.window();
        let Some(w) = guard.as_mut() else { return Ok(None) };
        let mut read = 0;
        for t in inputs {
            read += t.byte_len();
            let b = t.gpu_buffer()?;
            if !w.written.contains(b) && w.outside.insert(b.clone()) {
                w.report.bytes_min += t.byte_len();
            }
        }
        let mut written = 0;
        for t in outputs {
            written += t.byte_len();
            w.written.insert(t.gpu_buffer()?.clone());
        }
        w.report.bytes_min += 2 * written;
        let r = &mut w.report;
        r.dispatches += 1;
        r.bytes_read += read;
        r.bytes_written += written;
        let c = r.by_op.entry(op.to_string()).or_default();
        c.dispatches += 1;
        c.bytes_read += read;
        c.bytes_written += written;
        Ok(match &mut w.timing {
            Some(t) if (t.ops.len() as u32) < MAX_TIMED => {
                t.ops.push(op);
                Some((t.set.clone(), 2 * (t.ops.len() as u32 - 1)))
            }
            _ => None,
        })
    }

    pub fn flops(&self, op: &'static str, flops: u64) {
        if !self.on.load(Ordering::Relaxed) {
            return;
        }
        if let Some(w) = self.window().as_mut() {
            w.report.flops += flops;
            w.report.by_op.entry(op.to_string()).or_default().flops += flops;
        }
    }
}

impl GpuContext {
    /// Starts counting what dispatches cost; with `timing`, also times each dispatch with timestamp
    /// queries where the device has them (each dispatch then runs in its own compute pass). Flushes first,
    /// so that earlier work is not timed. No-op on the CPU fallback.
    pub fn cost_begin(&self, timing: bool) -> Result<()> {
        let Ok(s) = self.shared() else { return Ok(()) };
        self.flush()?;
        let timing = (timing && s.device.features().contains(wgpu::Features::TIMESTAMP_QUERY)).then(|| Timing {
            set: s.device.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("latent-gen cost"),
                ty: wgpu::QueryType::Timestamp,
                count: 2 * MAX_TIMED,
            }),
            ops: Vec::new(),
        });
        *s.cost.window() =
            Some(Window { report: CostReport::default(), written: HashSet::new(), outside: HashSet::new(), timing });
        s.cost.on.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Counts `flops` for `op` in the open window, if any (launchers of compute-bound kernels call it).
    pub(crate) fn count_flops(&self, op: &'static str, flops: u64) {
        if let Ok(s) = self.shared() {
            s.cost.flops(op, flops);
        }
    }

    /// Ends the window: waits for the GPU, reads the timestamps back and returns the report (empty on the
    /// CPU fallback or without a window).
    pub async fn cost_end(&self) -> Result<CostReport> {
        let Ok(s) = self.shared() else { return Ok(CostReport::default()) };
        s.cost.on.store(false, Ordering::Relaxed);
        let Some(mut w) = s.cost.window().take() else { return Ok(CostReport::default()) };
        if let Some(t) = w.timing.take().filter(|t| !t.ops.is_empty()) {
            let ticks = self.read_timestamps(&t).await?;
            let period = s.queue.get_timestamp_period() as f64;
            let mut total = 0.0;
            for (op, pair) in t.ops.iter().zip(ticks.chunks_exact(2)) {
                let ms = pair[1].saturating_sub(pair[0]) as f64 * period / 1e6;
                total += ms;
                *w.report.by_op.entry(op.to_string()).or_default().gpu_ms.get_or_insert(0.0) += ms;
            }
            w.report.gpu_ms = Some(total);
        }
        Ok(w.report)
    }

    async fn read_timestamps(&self, t: &Timing) -> Result<Vec<u64>> {
        let s = self.shared()?;
        let n = 2 * t.ops.len() as u64;
        let usage = wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC;
        let resolve = s.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("latent-gen timestamps"),
            size: 8 * n,
            usage,
            mapped_at_creation: false,
        });
        let read = s.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("latent-gen timestamps readback"),
            size: 8 * n,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        {
            let mut batch = s.batch.lock().unwrap_or_else(|p| p.into_inner());
            let encoder = batch.encoder(&s.device);
            encoder.resolve_query_set(&t.set, 0..n as u32, &resolve, 0);
            encoder.copy_buffer_to_buffer(&resolve, 0, &read, 0, 8 * n);
        }
        self.flush()?;
        let (tx, rx) = futures_channel::oneshot::channel();
        read.slice(..).map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        self.poll_wait()?;
        rx.await
            .map_err(|_| Error::Gpu("the device was lost while reading timestamps".into()))?
            .map_err(|e| Error::Gpu(format!("reading timestamps: {e}")))?;
        let bytes = read.slice(..).get_mapped_range().map_err(|e| Error::Readback(e.to_string()))?.to_vec();
        let ticks: Vec<u64> = bytemuck::pod_collect_to_vec(&bytes);
        read.unmap();
        Ok(ticks)
    }
}
