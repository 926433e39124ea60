//! Bind groups, made once per (layout, buffers, bound sizes) and reused. A denoising loop dispatches the
//! same kernels over the same pooled buffers every step, so nearly every dispatch after the first step finds
//! its bind group here. Creating one per dispatch instead made the native GPU path's memory grow without
//! bound on Mesa's lavapipe (about 64 MB per UNet step of the tiny model, which the driver only returned
//! when the device was dropped); the uniform parameters' slot is a dynamic offset, so it is not part of the
//! key.
//!
//! The cache holds its buffers alive, like the buffer pool's free list does: both are emptied together by
//! `GpuContext::trim_pool`, and the cache is also emptied when it grows past `MAX_ENTRIES` (a workload that
//! keeps making new buffers).

use std::collections::HashMap;
use std::sync::Mutex;

/// Entries kept before the cache starts over.
const MAX_ENTRIES: usize = 16384;

/// What identifies a bind group: the layout, then each binding's buffer and bound size (binding 0: the
/// uniform arena and the parameters' size).
#[derive(Clone, PartialEq, Eq, Hash)]
struct Key {
    layout: wgpu::BindGroupLayout,
    buffers: Vec<(wgpu::Buffer, u64)>,
}

#[derive(Default)]
pub(crate) struct BindGroupCache {
    groups: Mutex<HashMap<Key, wgpu::BindGroup>>,
    created: std::sync::atomic::AtomicU64,
}

impl BindGroupCache {
    /// The bind group over `buffers` (binding i: buffers[i] from offset 0, `size` bytes) for `layout`.
    pub fn get(
        &self,
        device: &wgpu::Device,
        label: &str,
        layout: &wgpu::BindGroupLayout,
        buffers: &[(&wgpu::Buffer, u64)],
    ) -> wgpu::BindGroup {
        let key = Key { layout: layout.clone(), buffers: buffers.iter().map(|(b, n)| ((*b).clone(), *n)).collect() };
        let mut groups = self.groups.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(g) = groups.get(&key) {
            return g.clone();
        }
        if groups.len() >= MAX_ENTRIES {
            groups.clear();
        }
        let entries: Vec<wgpu::BindGroupEntry<'_>> = buffers
            .iter()
            .enumerate()
            .map(|(i, (buffer, size))| wgpu::BindGroupEntry {
                binding: i as u32,
                resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer,
                    offset: 0,
                    size: wgpu::BufferSize::new(*size),
                }),
            })
            .collect();
        let group =
            device.create_bind_group(&wgpu::BindGroupDescriptor { label: Some(label), layout, entries: &entries });
        self.created.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        groups.insert(key, group.clone());
        group
    }

    /// Bind groups created so far (reuses not counted).
    pub fn created(&self) -> u64 {
        self.created.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Drops every cached bind group (and with them their hold on the buffers).
    pub fn clear(&self) {
        self.groups.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}
