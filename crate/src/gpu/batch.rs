//! Command batching: ops record dispatches into one open compute pass of one encoder, with their uniform
//! parameters in one arena buffer; `flush` writes the arena and submits everything at once. A model forward
//! is thus a few submissions with no readback in between.

/// Bytes reserved for one dispatch's uniform parameters (rounded up to the device's offset alignment).
const MAX_PARAMS: u64 = 256;
/// Dispatches per arena; a batch that records more flushes and starts over in the same arena, which is safe
/// because queue writes are ordered after the submissions before them.
const ARENA_SLOTS: u64 = 2048;

pub(crate) struct Batch {
    encoder: Option<wgpu::CommandEncoder>,
    pass: Option<wgpu::ComputePass<'static>>,
    arena: Option<wgpu::Buffer>,
    uniforms: Vec<u8>,
    slot_size: u64,
    usage: wgpu::BufferUsages,
    /// Dispatches recorded since the last flush.
    pub dispatches: usize,
}

impl Batch {
    /// `align`: the offset alignment of the parameters' binding; `storage`: the arena is bound as a storage
    /// buffer rather than a uniform one.
    pub fn new(align: u32, storage: bool) -> Self {
        let usage = if storage { wgpu::BufferUsages::STORAGE } else { wgpu::BufferUsages::UNIFORM };
        Self {
            usage: usage | wgpu::BufferUsages::COPY_DST,
            encoder: None,
            pass: None,
            arena: None,
            uniforms: Vec::new(),
            slot_size: MAX_PARAMS.next_multiple_of(align as u64),
            dispatches: 0,
        }
    }

    /// Reserves a uniform slot holding `params` and returns (arena, offset, size) to bind. Flushes first
    /// when the arena is full.
    pub fn push_uniform(
        &mut self,
        device: &wgpu::Device,
        queue: &wgpu::Queue,
        params: &[u8],
    ) -> (wgpu::Buffer, u64, u64) {
        assert!(params.len() as u64 <= MAX_PARAMS, "kernel parameters exceed {MAX_PARAMS} bytes");
        if self.uniforms.len() as u64 >= self.slot_size * ARENA_SLOTS {
            self.flush(device, queue);
        }
        let arena = self
            .arena
            .get_or_insert_with(|| {
                device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("latent-gen uniforms"),
                    size: self.slot_size * ARENA_SLOTS,
                    usage: self.usage,
                    mapped_at_creation: false,
                })
            })
            .clone();
        let offset = self.uniforms.len() as u64;
        self.uniforms.extend_from_slice(params);
        self.uniforms.resize((offset + self.slot_size) as usize, 0);
        let size = (params.len() as u64).next_multiple_of(16).max(16);
        (arena, offset, size)
    }

    /// The open compute pass, opening an encoder and a pass as needed.
    pub fn pass(&mut self, device: &wgpu::Device) -> &mut wgpu::ComputePass<'static> {
        if self.pass.is_none() {
            let encoder = self.encoder.get_or_insert_with(|| {
                device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("latent-gen") })
            });
            let pass = encoder
                .begin_compute_pass(&wgpu::ComputePassDescriptor { label: None, timestamp_writes: None })
                .forget_lifetime();
            self.pass = Some(pass);
        }
        self.dispatches += 1;
        self.pass.as_mut().expect("opened above")
    }

    /// A new compute pass of its own for one dispatch, with timestamps written at its start and end (queries
    /// `index` and `index + 1` of `set`): how [`super::cost`] times each dispatch.
    pub fn timed_pass(
        &mut self,
        device: &wgpu::Device,
        set: &wgpu::QuerySet,
        index: u32,
    ) -> &mut wgpu::ComputePass<'static> {
        self.pass = None;
        let encoder = self.encoder.get_or_insert_with(|| {
            device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("latent-gen") })
        });
        let writes = wgpu::ComputePassTimestampWrites {
            query_set: set,
            beginning_of_pass_write_index: Some(index),
            end_of_pass_write_index: Some(index + 1),
        };
        let pass = encoder
            .begin_compute_pass(&wgpu::ComputePassDescriptor { label: None, timestamp_writes: Some(writes) })
            .forget_lifetime();
        self.dispatches += 1;
        self.pass.insert(pass)
    }

    /// The encoder with no pass open, for copies.
    pub fn encoder(&mut self, device: &wgpu::Device) -> &mut wgpu::CommandEncoder {
        self.pass = None;
        self.encoder.get_or_insert_with(|| {
            device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("latent-gen") })
        })
    }

    /// Writes the uniform arena and submits the recorded commands.
    pub fn flush(&mut self, _device: &wgpu::Device, queue: &wgpu::Queue) {
        self.pass = None;
        let Some(encoder) = self.encoder.take() else {
            return;
        };
        if let (Some(arena), false) = (&self.arena, self.uniforms.is_empty()) {
            queue.write_buffer(arena, 0, &self.uniforms);
        }
        self.uniforms.clear();
        self.dispatches = 0;
        queue.submit([encoder.finish()]);
    }
}
