//! A pool of storage buffers. A freed tensor's buffer goes back to the pool and the next tensor of the same
//! size class reuses it, so a denoising loop allocates its activations once and then recycles them.
//!
//! Reuse inside one command batch is safe: commands run in the order they were recorded, so an op that
//! reads the old tensor runs before the op that overwrites the recycled buffer. Uploads are the exception
//! (queue writes land before the batch's commands), which is why `Tensor::upload` flushes first.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard};

use serde::Serialize;

use super::Ref;

/// Usage of every tensor buffer: bound as storage, filled by upload, read back by copy.
pub(crate) const TENSOR_USAGE: wgpu::BufferUsages =
    wgpu::BufferUsages::STORAGE.union(wgpu::BufferUsages::COPY_SRC).union(wgpu::BufferUsages::COPY_DST);

/// Memory held by the pool's buffers.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct PoolStats {
    /// Bytes in buffers owned by live tensors.
    pub live_bytes: u64,
    /// Bytes in freed buffers waiting for reuse.
    pub free_bytes: u64,
    /// The largest `live_bytes + free_bytes` seen: GPU memory this process allocated for tensors at its peak.
    pub peak_bytes: u64,
    /// The largest `live_bytes` seen: what the tensors alive at once needed (the floor under `peak_bytes`).
    pub peak_live_bytes: u64,
    /// Buffers created since the pool was made (reuses are not counted).
    pub created: u64,
}

#[derive(Default)]
struct Inner {
    /// Free buffers by size class, each keyed by its creation number: a request takes the oldest free
    /// buffer of its class, so the same sequence of allocations gets the same buffers whatever order they
    /// were freed in, and a repeated generation finds its bind groups cached (gpu/bindings.rs).
    free: BTreeMap<u64, BTreeMap<u64, wgpu::Buffer>>,
    /// Creation numbers of the buffers on loan.
    ids: HashMap<wgpu::Buffer, u64>,
    stats: PoolStats,
}

/// See the module documentation.
#[derive(Default)]
pub struct BufferPool {
    inner: Mutex<Inner>,
}

impl BufferPool {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A buffer of at least `bytes` bytes (callers have checked `bytes` against the device's limits).
    pub(crate) fn alloc(self: &Ref<Self>, device: &wgpu::Device, bytes: u64, max: u64) -> PooledBuffer {
        let size = size_class(bytes, max);
        let mut inner = self.lock();
        // The oldest free buffer of the smallest class that holds the request, up to twice its size: a
        // larger idle buffer serves before a new one is made, which keeps the VAE's many shapes from each
        // holding buffers of their own.
        let class = inner.free.range(size..=size.saturating_mul(2)).find(|(_, l)| !l.is_empty()).map(|(c, _)| *c);
        let reused = class.and_then(|c| inner.free.get_mut(&c).and_then(BTreeMap::pop_first).map(|r| (c, r)));
        let buffer = match reused {
            Some((class, (id, b))) => {
                inner.stats.free_bytes -= class;
                inner.ids.insert(b.clone(), id);
                b
            }
            None => {
                inner.stats.created += 1;
                let b = device.create_buffer(&wgpu::BufferDescriptor {
                    label: None,
                    size,
                    usage: TENSOR_USAGE,
                    mapped_at_creation: false,
                });
                let id = inner.stats.created;
                inner.ids.insert(b.clone(), id);
                b
            }
        };
        inner.stats.live_bytes += buffer.size();
        let total = inner.stats.live_bytes + inner.stats.free_bytes;
        inner.stats.peak_bytes = inner.stats.peak_bytes.max(total);
        inner.stats.peak_live_bytes = inner.stats.peak_live_bytes.max(inner.stats.live_bytes);
        PooledBuffer { buffer: Some(buffer), pool: self.clone() }
    }

    fn release(&self, buffer: wgpu::Buffer) {
        let size = buffer.size();
        let mut inner = self.lock();
        inner.stats.live_bytes -= size;
        inner.stats.free_bytes += size;
        let id = inner.ids.remove(&buffer).unwrap_or(u64::MAX);
        inner.free.entry(size).or_default().insert(id, buffer);
    }

    pub(crate) fn stats(&self) -> PoolStats {
        self.lock().stats
    }

    /// Drops every free buffer.
    pub(crate) fn trim(&self) {
        let mut inner = self.lock();
        inner.free.clear();
        inner.stats.free_bytes = 0;
    }
}

/// Rounds a request up to its size class: multiples of 256 bytes up to 64 KiB, then eight classes per
/// power of two (at most 12.5% unused), never above `max`.
fn size_class(bytes: u64, max: u64) -> u64 {
    let bytes = bytes.max(16).next_multiple_of(256);
    if bytes <= 65536 {
        return bytes;
    }
    let step = 1u64 << (63 - bytes.leading_zeros() - 3);
    let class = bytes.next_multiple_of(step);
    if class > max { bytes } else { class }
}

/// A buffer on loan from the pool; dropping it returns the buffer for reuse.
pub struct PooledBuffer {
    buffer: Option<wgpu::Buffer>,
    pool: Ref<BufferPool>,
}

impl PooledBuffer {
    pub fn buffer(&self) -> &wgpu::Buffer {
        self.buffer.as_ref().expect("a pooled buffer is present until dropped")
    }
}

impl Drop for PooledBuffer {
    fn drop(&mut self) {
        if let Some(b) = self.buffer.take() {
            self.pool.release(b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::size_class;

    #[test]
    fn size_classes_round_up_by_at_most_an_eighth() {
        assert_eq!(size_class(1, 1 << 30), 256);
        assert_eq!(size_class(65536, 1 << 30), 65536);
        assert_eq!(size_class(65537, 1 << 30), 65536 + 8192);
        for bytes in [100_000u64, 1 << 20, (1 << 20) + 1, 123_456_789] {
            let c = size_class(bytes, 1 << 40);
            assert!(c >= bytes && c as f64 <= bytes as f64 * 1.125 + 256.0, "{bytes} -> {c}");
        }
        assert_eq!(size_class(1000 * 1024, 1000 * 1024), 1000 * 1024);
    }
}
