//! The CPU fallback's hot ops (conv2d, matmul with its fusions, attention, group norm statistics) as
//! direct loops around the `gemm` crate, the GEMM candle's CPU matmul runs on.
//!
//! Hand-written because composing them from candle ops costs most of a UNet step in copies: candle's conv2d
//! makes an im2col copy, multiplies to (batch, h * w, cout) and copies that into NCHW; its group norm is
//! eight broadcasting passes, each allocating; the fusions the GPU kernels do (group norm and SiLU as the
//! conv loads its input, bias, activation and residual epilogues, heads read in place) were each another
//! pass. Here a conv is one im2col (in chunks of output rows, so memory stays bounded at any image size),
//! one GEMM writing NCHW, and one epilogue pass (in wasm, 3x3 convs run as Winograd F(2x2, 3x3) instead of
//! im2col: see [`WINOGRAD`]); attention multiplies each head where it lies. Same results
//! as the composed ops to rounding (the selfchecks and the model fixtures compare them).
//!
//! Only contiguous f32 tensors come here (the CPU fallback's only dtype); anything else is an error.

use candle_core::{CpuStorage, Device, Storage, Tensor as CTensor};
use gemm::Parallelism;
use rayon::prelude::*;

use super::Activation;
use crate::error::{Error, Result};

/// Elements an im2col chunk holds at most (16 MiB of f32).
const COL_CHUNK: usize = 4 << 20;
/// Query rows per attention task.
const ATTN_ROWS: usize = 64;

/// The threads the CPU path's loops split over. Natively candle's count (physical cores, or RAYON_NUM_THREADS);
/// in a browser candle sees one core, and the threads are rayon's pool: the threaded build's Web Workers
/// (pkg/threads/), or 1.
pub fn threads() -> usize {
    if cfg!(target_arch = "wasm32") { rayon::current_num_threads() } else { candle_core::utils::get_num_threads() }
}

/// A contiguous f32 CPU tensor's elements, borrowed.
pub(super) struct F32<'a> {
    guard: candle_core::StorageRef<'a>,
    start: usize,
    len: usize,
}

impl F32<'_> {
    pub(super) fn get(&self) -> &[f32] {
        match &*self.guard {
            Storage::Cpu(CpuStorage::F32(v)) => &v[self.start..self.start + self.len],
            _ => unreachable!("view() checked for f32 CPU storage"),
        }
    }
}

/// Borrows `t`'s elements; `t` must be contiguous f32 on the CPU.
pub(super) fn view(t: &CTensor) -> Result<F32<'_>> {
    let (guard, layout) = t.storage_and_layout();
    if !layout.is_contiguous() || !matches!(&*guard, Storage::Cpu(CpuStorage::F32(_))) {
        return Err(Error::Invalid(format!("the CPU fallback got a non-contiguous or non-f32 tensor {:?}", t.dims())));
    }
    Ok(F32 { guard, start: layout.start_offset(), len: t.elem_count() })
}

pub(super) fn tensor(data: Vec<f32>, shape: &[usize]) -> Result<CTensor> {
    Ok(CTensor::from_vec(data, shape, &Device::Cpu)?)
}

/// An f32 buffer written by several rayon tasks at disjoint places.
#[derive(Clone, Copy)]
struct Shared(*mut f32);
// SAFETY: every task writes its own elements of the buffer, which outlives the tasks (scoped by rayon).
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

impl Shared {
    /// The pointer (a method, so closures capture the whole `Shared`, which is `Send`, not the raw field).
    fn ptr(self) -> *mut f32 {
        self.0
    }
}

/// dst (m, n) = lhs (m, k) rhs (k, n), every operand with its own (row, column) strides in elements.
///
/// # Safety
/// The pointers with their strides must address valid memory for the shapes; dst must not overlap the others.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    (dst_rs, dst_cs): (usize, usize),
    accumulate: bool,
    lhs: *const f32,
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: *const f32,
    (rhs_rs, rhs_cs): (usize, usize),
    par: Parallelism,
) {
    // SAFETY: forwarded from the caller.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            dst_cs as isize,
            dst_rs as isize,
            accumulate,
            lhs,
            lhs_cs as isize,
            lhs_rs as isize,
            rhs,
            rhs_cs as isize,
            rhs_rs as isize,
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            par,
        )
    }
}

/// [`gemm`] in tasks along its larger dimension, on rayon's threads when there are several, each task a
/// single-threaded gemm (one task on one thread). gemm's own threads lose in wasm: on two threads a UNet
/// step's 1x1 and strided convs took twice their one-thread time (diagnostics CPU benchmark, by op), and its
/// matmuls only 1.2x less.
///
/// # Safety
/// As [`gemm`] (without accumulation).
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_par(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_st: (usize, usize),
    lhs: *const f32,
    lhs_st: (usize, usize),
    rhs: *const f32,
    rhs_st: (usize, usize),
) {
    let t = threads();
    // Split n (each task packs its own columns of rhs and all of lhs) or m (its own rows of lhs, all of rhs).
    let split_n = n >= m;
    let len = if split_n { n } else { m };
    let chunk = task_size(len, len, GEMM_SPLIT_MIN, 16);
    let tasks = len.div_ceil(chunk);
    let (dst, lhs, rhs) = (Shared(dst), Shared(lhs as *mut f32), Shared(rhs as *mut f32));
    let task = |i: usize| {
        let (o, c) = (i * chunk, chunk.min(len - i * chunk));
        // SAFETY: the caller's operands, narrowed to this task's columns (or rows), in bounds; each task
        // writes its own part of dst.
        unsafe {
            if split_n {
                gemm(
                    (m, c, k),
                    dst.ptr().add(o * dst_st.1),
                    dst_st,
                    false,
                    lhs.ptr(),
                    lhs_st,
                    rhs.ptr().add(o * rhs_st.1),
                    rhs_st,
                    Parallelism::None,
                )
            } else {
                gemm(
                    (c, n, k),
                    dst.ptr().add(o * dst_st.0),
                    dst_st,
                    false,
                    lhs.ptr().add(o * lhs_st.0),
                    lhs_st,
                    rhs.ptr(),
                    rhs_st,
                    Parallelism::None,
                )
            }
        }
    };
    if t > 1 && tasks > 1 {
        (0..tasks).into_par_iter().for_each(task);
    } else {
        (0..tasks).for_each(task);
    }
}

/// Rows (or columns) per task when `total` of them split into tasks of at most `cap` (an item's): about
/// four tasks per thread, a multiple of `granule`, at least `min`; on one thread one task per `cap`
/// (splitting gains nothing there; the unit tests split anyway, so that they check the tasks).
fn task_size(total: usize, cap: usize, min: usize, granule: usize) -> usize {
    match threads() {
        1 if !cfg!(test) => cap.max(1),
        t => total.div_ceil(4 * t).next_multiple_of(granule).max(min).min(cap.max(1)),
    }
}

/// The columns (or rows) of a [`gemm_par`] task at least (the unit tests take several tasks).
const GEMM_SPLIT_MIN: usize = if cfg!(test) { 16 } else { 64 };

/// e^x without a libm call, branch-free, so that loops over slices vectorize. In wasm `f32::exp` is a call
/// into compiler-builtins' scalar expf: it took 48% of a browser CPU step (Chromium's profiler, SD 1.5 at a
/// fifth of its widths, 256x256: attention's softmax). Cephes' expf: x = n ln 2 + r with |r| <= ln 2 / 2
/// (n rounded to nearest by the 1.5 * 2^23 trick, which needs no SSE4.1 or libm), e^r by its degree-6
/// polynomial, 2^n from the exponent bits. Relative error under 3e-7 (the test below); x is clamped to
/// [-87, 88], where e^x stays a normal f32 (softmax subtracts the row's max first, so its inputs are <= 0).
#[inline(always)]
fn exp(x: f32) -> f32 {
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding it leaves x rounded to an integer in the low bits
    let x = x.clamp(-87.0, 88.0);
    let t = x * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let p = 1.987_569_2e-4f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    let two_n = f32::from_bits((t.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127)) << 23);
    e * two_n
}

/// Replaces each x of `row` by e^(x * scale - max) and returns their sum (eight running sums: a reduction
/// that vectorizes; it differs from a sequential sum by rounding only). Two passes on purpose: fused into
/// one loop over chunks of eight, LLVM vectorizes it lane by lane (scalar loads and clamps gathered into
/// vectors), and in wasm the attention ran 25% slower (Chromium's profiler).
fn exp_sum(row: &mut [f32], scale: f32, max: f32) -> f32 {
    row.iter_mut().for_each(|x| *x = exp(*x * scale - max));
    let mut acc = [0f32; 8];
    let mut chunks = row.chunks_exact(8);
    for c in &mut chunks {
        for (a, x) in acc.iter_mut().zip(c) {
            *a += x;
        }
    }
    acc.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}

/// The largest of `row` (eight running maxima, compared as `>`: a reduction that vectorizes; NaNs are not
/// expected in attention scores).
fn row_max(row: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let mut chunks = row.chunks_exact(8);
    for c in &mut chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a = if x > *a { x } else { *a };
        }
    }
    acc.iter().chain(chunks.remainder()).fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m })
}

#[inline]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// A group norm's per-channel scale and shift `st` applied to `x`, then SiLU when asked.
#[inline]
fn normalized(x: f32, [s, t]: [f32; 2], silu: bool) -> f32 {
    let y = x * s + t;
    if silu { y * sigmoid(y) } else { y }
}

/// Channel `ch` of batch item `b` in the concatenation of x (cx channels) and `more` (cm), `hw` elements each.
fn channel_of<'a>(
    xd: &'a [f32],
    md: Option<&'a [f32]>,
    (cx, cm, hw): (usize, usize, usize),
    b: usize,
    ch: usize,
) -> &'a [f32] {
    if ch < cx {
        &xd[(b * cx + ch) * hw..][..hw]
    } else {
        let md = md.expect("channels past x are more's");
        &md[(b * cm + ch - cx) * hw..][..hw]
    }
}

/// erf(x) without a libm call, branch-free, so that GELU's loops vectorize (in wasm libm's erff was 2% of a
/// browser CPU step): Abramowitz and Stegun 7.1.26, 1 - t (a1 + t (a2 + ...)) e^(-x^2) with
/// t = 1 / (1 + p |x|), sign restored. Absolute error under 5e-7 in f32 (the test below): GELU uses
/// 1 + erf, so its relative error stays within 5e-7 too.
#[inline(always)]
fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let p = 1.061_405_4f32;
    let p = p * t - 1.453_152;
    let p = p * t + 1.421_413_7;
    let p = p * t - 0.284_496_74;
    let p = p * t + 0.254_829_6;
    (1.0 - p * t * exp(-a * a)).copysign(x)
}

#[inline]
fn gelu(x: f32) -> f32 {
    (erf(x * std::f32::consts::FRAC_1_SQRT_2) + 1.0) * 0.5 * x
}

#[inline]
fn apply(act: Option<Activation>, x: f32) -> f32 {
    match act {
        None => x,
        Some(Activation::Silu) => x * sigmoid(x),
        Some(Activation::Gelu) => gelu(x),
        Some(Activation::QuickGelu) => x * sigmoid(1.702 * x),
        Some(Activation::Relu) => x.max(0.0),
    }
}

/// Runs `f(index, chunk)` over `chunk`-sized pieces of `data`, on rayon's threads when there are several.
fn for_chunks(data: &mut [f32], chunk: usize, f: impl Fn(usize, &mut [f32]) + Sync + Send) {
    if threads() > 1 {
        data.par_chunks_mut(chunk).enumerate().for_each(|(i, c)| f(i, c));
    } else {
        data.chunks_mut(chunk).enumerate().for_each(|(i, c)| f(i, c));
    }
}

/// The bias row of batch item `b` in a flat bias tensor: `at` = (offset, batch stride), (0, 0) one row for all.
fn bias_row(bias: &[f32], at: (usize, usize), b: usize, n: usize) -> &[f32] {
    let off = at.0 + b * at.1;
    &bias[off..off + n]
}

/// Per (sample, group) mean and 1 / std of the channels of x then `more` (each (batch, c, ...)), as
/// (batch * groups) pairs.
pub fn group_stats(x: &CTensor, more: Option<&CTensor>, groups: usize, eps: f32) -> Result<Vec<[f32; 2]>> {
    let (xs, ms) = (view(x)?, more.map(view).transpose()?);
    let dims = x.dims();
    let (batch, cx) = (dims[0], dims[1]);
    let hw: usize = dims[2..].iter().product();
    let cm = more.map_or(0, |m| m.dims()[1]);
    let c = cx + cm;
    let per = c / groups;
    let (xd, md) = (xs.get(), ms.as_ref().map(|m| m.get()));
    let channel = |b: usize, ch: usize| channel_of(xd, md, (cx, cm, hw), b, ch);
    let one = |i: usize| -> [f32; 2] {
        let (b, g) = (i / groups, i % groups);
        let chans = g * per..(g + 1) * per;
        let n = (per * hw) as f64;
        let sum: f64 = chans.clone().map(|ch| channel(b, ch).iter().map(|&v| v as f64).sum::<f64>()).sum();
        let mean = sum / n;
        let var: f64 =
            chans.map(|ch| channel(b, ch).iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>()).sum::<f64>() / n;
        [mean as f32, (1.0 / (var + eps as f64).sqrt()) as f32]
    };
    Ok(if threads() > 1 {
        (0..batch * groups).into_par_iter().map(one).collect()
    } else {
        (0..batch * groups).map(one).collect()
    })
}

/// Group norm (with SiLU when asked) of x (batch, c, ...).
pub fn group_norm(x: &CTensor, groups: usize, gamma: &[f32], beta: &[f32], eps: f32, silu: bool) -> Result<CTensor> {
    let stats = group_stats(x, None, groups, eps)?;
    let dims = x.dims().to_vec();
    let c = dims[1];
    let hw: usize = dims[2..].iter().product();
    let xs = view(x)?;
    let xd = xs.get();
    let mut out = vec![0f32; xd.len()];
    for_chunks(&mut out, hw.max(1), |i, o| {
        let (b, ch) = (i / c, i % c);
        let [mean, rstd] = stats[b * groups + ch / (c / groups)];
        let st = [rstd * gamma[ch], beta[ch] - mean * rstd * gamma[ch]];
        for (o, &v) in o.iter_mut().zip(&xd[i * hw..]) {
            *o = normalized(v, st, silu);
        }
    });
    tensor(out, &dims)
}

/// What [`conv2d`] reads: x (batch, cx, h, w), optionally more channels, normalized as loaded.
pub struct ConvInput<'a> {
    pub x: &'a CTensor,
    pub more: Option<&'a CTensor>,
    /// Per (batch, channel) scale and shift of a group norm, and whether SiLU follows.
    pub norm: Option<(Vec<[f32; 2]>, bool)>,
    pub upsample: bool,
}

/// Per (batch, channel) scale and shift of a group norm from its statistics.
pub fn norm_affine(stats: &[f32], groups: usize, gamma: &[f32], beta: &[f32], batch: usize) -> Vec<[f32; 2]> {
    let c = gamma.len();
    (0..batch * c)
        .map(|i| {
            let (b, ch) = (i / c, i % c);
            let g = b * groups + ch / (c / groups);
            let (mean, rstd) = (stats[2 * g], stats[2 * g + 1]);
            let s = rstd * gamma[ch];
            [s, beta[ch] - mean * s]
        })
        .collect()
}

/// The epilogue of a conv or matmul: bias, activation, residual.
pub struct Epilogue<'a> {
    pub bias: Option<&'a [f32]>,
    pub bias_at: (usize, usize),
    pub act: Option<Activation>,
    pub residual: Option<&'a [f32]>,
}

/// 2-D convolution over `input` with weight (cout, cin * kh * kw), zero padding (before, after), stride.
pub fn conv2d(
    input: &ConvInput<'_>,
    weight: &[f32],
    cout: usize,
    (kh, kw): (usize, usize),
    (p0, p1): (usize, usize),
    stride: usize,
    epi: &Epilogue<'_>,
) -> Result<CTensor> {
    let xs = view(input.x)?;
    let ms = input.more.map(view).transpose()?;
    let (xd, md) = (xs.get(), ms.as_ref().map(|m| m.get()));
    let &[batch, cx, hx, wx] = input.x.dims() else {
        return Err(Error::Invalid(format!("conv2d input {:?} is not 4-D", input.x.dims())));
    };
    let cm = input.more.map_or(0, |m| m.dims()[1]);
    let cin = cx + cm;
    let up = if input.upsample { 2 } else { 1 };
    let (h, w) = (hx * up, wx * up);
    let ho = (h + p0 + p1 - kh) / stride + 1;
    let wo = (w + p0 + p1 - kw) / stride + 1;
    let (k, n) = (cin * kh * kw, ho * wo);
    let mut out = vec![0f32; batch * cout * n];
    let channel = |b: usize, ch: usize| channel_of(xd, md, (cx, cm, hx * wx), b, ch);
    if WINOGRAD && kh == 3 && kw == 3 && stride == 1 && p0 == 1 && p1 == 1 && cin.min(cout) >= WINOGRAD_MIN {
        let src = Source { channel: &channel, norm: input.norm.as_ref(), cin, hx, wx, up };
        winograd3x3(&src, batch, weight, cout, &mut out, (ho, wo));
        epilogue_rows(&mut out, n, cout, epi);
        return tensor(out, &[batch, cout, ho, wo]);
    }
    let direct = kh == 1 && kw == 1 && stride == 1 && p0 == 0 && p1 == 0 && up == 1;
    let direct = direct && input.norm.is_none() && input.more.is_none();
    let rows_per_chunk = (COL_CHUNK / (k * wo).max(1)).clamp(1, ho);
    let mut col = Scratch::take(if direct { 0 } else { k * rows_per_chunk * wo });
    for b in 0..batch {
        let out_b = &mut out[b * cout * n..][..cout * n];
        if direct {
            // SAFETY: W (cout, k), x[b] (k, n) and out[b] (cout, n) are contiguous and in bounds.
            unsafe {
                gemm_par(
                    (cout, n, k),
                    out_b.as_mut_ptr(),
                    (n, 1),
                    weight.as_ptr(),
                    (k, 1),
                    xd[b * cx * n..].as_ptr(),
                    (n, 1),
                )
            };
            continue;
        }
        for y0 in (0..ho).step_by(rows_per_chunk) {
            let rows = rows_per_chunk.min(ho - y0);
            let cols = rows * wo;
            let col = &mut col[..k * cols];
            // One task per input channel: its kh * kw rows of the column matrix.
            for_chunks(col, kh * kw * cols, |ch, dst| {
                let src = channel(b, ch);
                // The source rows this chunk reads, normalized once when the conv normalizes its input.
                let first = ((y0 * stride) as isize - p0 as isize).max(0) as usize / up;
                let last = (((y0 + rows - 1) * stride + kh) as isize - p0 as isize).clamp(1, h as isize) as usize;
                let last = (last - 1) / up;
                let normed: Vec<f32>;
                let (src, base) = match &input.norm {
                    Some((a, silu)) if first <= last => {
                        normed = src[first * wx..(last + 1) * wx]
                            .iter()
                            .map(|&v| normalized(v, a[b * cin + ch], *silu))
                            .collect();
                        (&normed[..], first)
                    }
                    _ => (src, 0),
                };
                for (tap, dst) in dst.chunks_mut(cols).enumerate() {
                    let (ky, kx) = (tap / kw, tap % kw);
                    for (dy, drow) in dst.chunks_mut(wo).enumerate() {
                        let iy = ((y0 + dy) * stride + ky) as isize - p0 as isize;
                        if iy < 0 || iy >= h as isize {
                            drow.fill(0.0);
                            continue;
                        }
                        let srow = &src[(iy as usize / up - base) * wx..][..wx];
                        if stride == 1 && up == 1 {
                            // ix = ox + kx - p0 lies inside the row for ox in lo..hi.
                            let lo = p0.saturating_sub(kx).min(wo);
                            let hi = (w + p0).saturating_sub(kx).clamp(lo, wo);
                            drow[..lo].fill(0.0);
                            drow[hi..].fill(0.0);
                            let s0 = lo + kx - p0;
                            drow[lo..hi].copy_from_slice(&srow[s0..s0 + hi - lo]);
                            continue;
                        }
                        for (ox, d) in drow.iter_mut().enumerate() {
                            let ix = (ox * stride + kx) as isize - p0 as isize;
                            *d = if ix < 0 || ix >= w as isize { 0.0 } else { srow[ix as usize / up] };
                        }
                    }
                }
            });
            // SAFETY: W (cout, k), col (k, cols) contiguous; out[b]'s columns y0 * wo .. + cols of its cout rows.
            unsafe {
                gemm_par(
                    (cout, cols, k),
                    out_b[y0 * wo..].as_mut_ptr(),
                    (n, 1),
                    weight.as_ptr(),
                    (k, 1),
                    col.as_ptr(),
                    (cols, 1),
                )
            };
        }
    }
    epilogue_rows(&mut out, n, cout, epi);
    tensor(out, &[batch, cout, ho, wo])
}

/// Whether 3x3 convs run as Winograd F(2x2, 3x3): in wasm, where the GEMM (gemm's simd128 kernels: 4 lanes,
/// no FMA) is about 3x slower than natively on one thread, cutting its multiplications 2.25x makes the browser's
/// CPU path 8-24% faster per UNet step (the diagnostics page's CPU benchmark, runs interleaved: 1.85-1.90 s,
/// 2.06-2.48 s with im2col); natively, on the AVX2 GEMM, its transforms cost what it saves (SD 1.5 at 256x256
/// on 2 threads: 2.8 s, 2.35-2.67 s with im2col; with the transforms vectorized, its 3x3 convs 1.33-1.43 s
/// against 1.24-1.37 s), so it stays off. The unit tests run both paths.
const WINOGRAD: bool = cfg!(any(target_arch = "wasm32", test));
/// Channels in and out from which a 3x3 conv runs as Winograd (below, its transforms cost more than the
/// multiplications they save).
const WINOGRAD_MIN: usize = 16;
/// Elements of a Winograd chunk's transformed input, and of a block of transformed weights or products, at
/// most (8 and 4 MiB of f32; the unit tests take several chunks and blocks at small sizes).
#[cfg(not(test))]
const WINOGRAD_CHUNK: (usize, usize) = (2 << 20, 1 << 20);
#[cfg(test)]
const WINOGRAD_CHUNK: (usize, usize) = (1 << 14, 1 << 12);

/// A conv's input channels as [`conv2d`] reads them.
struct Source<'a> {
    channel: &'a (dyn Fn(usize, usize) -> &'a [f32] + Sync),
    norm: Option<&'a (Vec<[f32; 2]>, bool)>,
    cin: usize,
    hx: usize,
    wx: usize,
    up: usize,
}

/// A 3x3 conv, stride 1, padding 1, as Winograd F(2x2, 3x3) (Lavin and Gray, 2015): each 2x2 output tile
/// from a 4x4 input tile through 16 products of (cout, cin) x (cin, tiles) matrices instead of 36, so 2.25x
/// fewer multiplications than im2col's GEMM, for a few transforms per tile. The tiles of all `batch` items
/// share the products (the weights are transformed once for them, and the products are wider), in chunks of
/// whole items, or of tile rows of one item when an item does not fit, so memory stays bounded at any size;
/// written into `out` (batch, cout, ho * wo) without the epilogue.
fn winograd3x3(src: &Source<'_>, batch: usize, weight: &[f32], cout: usize, out: &mut [f32], (ho, wo): (usize, usize)) {
    let cin = src.cin;
    let (h, w) = (src.hx * src.up, src.wx * src.up);
    let (tiles_y, tiles_x) = (ho.div_ceil(2), wo.div_ceil(2));
    let hw = ho * wo;
    // Each chunk: (batch item, first tile row, tile rows) segments, their tiles one after the other.
    let budget = (WINOGRAD_CHUNK.0 / (16 * cin)).max(1);
    let chunks: Vec<Vec<(usize, usize, usize)>> = if budget >= tiles_y * tiles_x {
        let items = budget / (tiles_y * tiles_x);
        (0..batch).step_by(items).map(|b0| (b0..batch.min(b0 + items)).map(|b| (b, 0, tiles_y)).collect()).collect()
    } else {
        let rows = (budget / tiles_x).clamp(1, tiles_y);
        (0..batch)
            .flat_map(|b| (0..tiles_y).step_by(rows).map(move |ty0| vec![(b, ty0, rows.min(tiles_y - ty0))]))
            .collect()
    };
    let most = chunks.iter().map(|c| c.iter().map(|s| s.2).sum::<usize>()).max().unwrap_or(0);
    let mut v = Scratch::take(cin * 16 * most * tiles_x);
    let (mut u, mut m) = (Scratch::take(0), Scratch::take(0));
    for segments in &chunks {
        let tc = segments.iter().map(|s| s.2).sum::<usize>() * tiles_x;
        let v = &mut v[..cin * 16 * tc];
        // The input transformed, V = B^T d B per tile, laid out (cin, 16, tiles).
        for_chunks(v, 16 * tc, |ch, v| {
            let mut t0 = 0;
            for &(b, ty0, trows) in segments {
                // The rows 2 * ty0 - 1 .. 2 * (ty0 + trows) + 1 of the (padded, upsampled, normalized) channel.
                let (pw, ph) = (2 * tiles_x + 2, 2 * trows + 2);
                let mut plane = vec![0f32; pw * ph];
                let mut e = vec![0f32; 4 * pw];
                let data = (src.channel)(b, ch);
                let norm = src.norm.map(|(a, silu)| (a[b * cin + ch], *silu));
                for (r, prow) in plane.chunks_mut(pw).enumerate() {
                    let iy = (2 * ty0 + r) as isize - 1;
                    if iy < 0 || iy >= h as isize {
                        continue;
                    }
                    let srow = &data[(iy as usize / src.up) * src.wx..][..src.wx];
                    let dst = &mut prow[1..=w];
                    if src.up == 1 {
                        dst.copy_from_slice(srow);
                    } else {
                        dst.chunks_exact_mut(2).zip(srow).for_each(|(d, &x)| d.fill(x));
                    }
                    // One loop per case, without branches inside: they vectorize (SiLU's exp included).
                    match norm {
                        Some((st, true)) => dst.iter_mut().for_each(|p| *p = normalized(*p, st, true)),
                        Some((st, false)) => dst.iter_mut().for_each(|p| *p = normalized(*p, st, false)),
                        None => {}
                    }
                }
                // B^T d B for each tile: B^T's row combinations over whole rows of the plane, then the column
                // combinations of a row of tiles, each of the 16 positions a contiguous run of tiles in v.
                for ty in 0..trows {
                    let rows: [&[f32]; 4] = std::array::from_fn(|r| &plane[(2 * ty + r) * pw..][..pw]);
                    winograd_rows_in(rows, four_runs(&mut e, pw, pw));
                    let t = t0 + ty * tiles_x;
                    for (r, er) in e.chunks_exact(pw).enumerate() {
                        winograd_cols_in(er, four_runs(&mut v[4 * r * tc + t..], tc, tiles_x));
                    }
                }
                t0 += trows * tiles_x;
            }
        });
        let v = &*v;
        // Output channels in blocks: their transformed weights and products stay small.
        let block = (WINOGRAD_CHUNK.1 / (16 * cin.max(tc))).clamp(1, cout);
        for co0 in (0..cout).step_by(block) {
            let cb = block.min(cout - co0);
            u.resize(cb * 16 * cin);
            m.resize(cb * 16 * tc);
            // The weights transformed, U = G g G^T, laid out (cb, 16, cin): each output channel's (cin, 9)
            // weights transposed to (9, cin), then G's combinations as loops over cin, which vectorize.
            for_chunks(&mut u[..cb * 16 * cin], 16 * cin, |co, u| {
                let mut g = vec![0f32; 9 * cin];
                for (ci, w9) in weight[(co0 + co) * cin * 9..][..cin * 9].chunks_exact(9).enumerate() {
                    for (kk, &x) in w9.iter().enumerate() {
                        g[kk * cin + ci] = x;
                    }
                }
                // G g: rows g0, (g0 + g1 + g2) / 2, (g0 - g1 + g2) / 2, g2 (each a row of 3 taps, as
                // (3, cin)); then the same on the columns of each.
                let tap = |r: usize, c: usize| &g[(3 * r + c) * cin..][..cin];
                let mut gg = vec![0f32; 12 * cin];
                for c in 0..3 {
                    let (a, m, z) = (tap(0, c), tap(1, c), tap(2, c));
                    winograd_g(a, m, z, four_runs(&mut gg[c * cin..], 3 * cin, cin));
                }
                for r in 0..4 {
                    let row = &gg[3 * r * cin..][..3 * cin];
                    let (a, m, z) = (&row[..cin], &row[cin..2 * cin], &row[2 * cin..]);
                    winograd_g(a, m, z, four_runs(&mut u[4 * r * cin..], cin, cin));
                }
            });
            // M_xi (cb, tiles) = U_xi (cb, cin) V_xi (cin, tiles) for the 16 positions xi, into (cb, 16, tiles).
            let (u, m) = (&u[..cb * 16 * cin], &mut m[..cb * 16 * tc]);
            let dst = Shared(m.as_mut_ptr());
            let product = |xi: usize| {
                // SAFETY: U_xi, V_xi and M_xi are in bounds with these strides; each xi writes its own columns
                // of M.
                unsafe {
                    gemm(
                        (cb, tc, cin),
                        dst.ptr().add(xi * tc),
                        (16 * tc, 1),
                        false,
                        u[xi * cin..].as_ptr(),
                        (16 * cin, 1),
                        v[xi * tc..].as_ptr(),
                        (16 * tc, 1),
                        Parallelism::None,
                    )
                }
            };
            if threads() > 1 {
                (0..16).into_par_iter().for_each(product);
            } else {
                (0..16).for_each(product);
            }
            // Y = A^T m A: rows m0 + m1 + m2, m1 - m2 - m3; then the same on the columns.
            let m = &*m;
            let mut t0 = 0;
            for &(b, ty0, trows) in segments {
                for_chunks(&mut out[(b * cout + co0) * hw..][..cb * hw], hw, |co, plane| {
                    let mc = &m[co * 16 * tc..][..16 * tc];
                    for ty in 0..trows {
                        let t = t0 + ty * tiles_x;
                        let mt: [&[f32]; 16] = std::array::from_fn(|xi| &mc[xi * tc + t..][..tiles_x]);
                        let oy = 2 * (ty0 + ty);
                        winograd_row_out::<0>(&mt, &mut plane[oy * wo..][..wo]);
                        if oy + 1 < ho {
                            winograd_row_out::<1>(&mt, &mut plane[(oy + 1) * wo..][..wo]);
                        }
                    }
                });
                t0 += trows * tiles_x;
            }
        }
    }
}

/// The runs `s[i * stride..][..len]` for i = 0..4, each borrowed alone (`len <= stride`).
fn four_runs(s: &mut [f32], stride: usize, len: usize) -> [&mut [f32]; 4] {
    let (r0, rest) = s.split_at_mut(stride);
    let (r1, rest) = rest.split_at_mut(stride);
    let (r2, r3) = rest.split_at_mut(stride);
    [&mut r0[..len], &mut r1[..len], &mut r2[..len], &mut r3[..len]]
}

/// B^T's combinations of four values: d0 - d2, d1 + d2, d2 - d1, d1 - d3.
#[inline(always)]
fn winograd_bt(d0: f32, d1: f32, d2: f32, d3: f32) -> [f32; 4] {
    [d0 - d2, d1 + d2, d2 - d1, d1 - d3]
}

/// B^T's row combinations of four rows of the plane, element by element.
fn winograd_rows_in([d0, d1, d2, d3]: [&[f32]; 4], [e0, e1, e2, e3]: [&mut [f32]; 4]) {
    for i in 0..e0.len().min(d0.len()).min(d1.len()).min(d2.len()).min(d3.len()) {
        [e0[i], e1[i], e2[i], e3[i]] = winograd_bt(d0[i], d1[i], d2[i], d3[i]);
    }
}

/// B's column combinations for a row of tiles: tile t's are those of e[2t .. 2t + 4], into o0[t] .. o3[t].
/// Separate outputs, so the loop vectorizes.
fn winograd_cols_in(e: &[f32], [o0, o1, o2, o3]: [&mut [f32]; 4]) {
    let n = o0.len();
    let pairs = e[..2 * n].chunks_exact(2).zip(e[2..2 * n + 2].chunks_exact(2));
    for ((((a, b), o0), o1), (o2, o3)) in pairs.zip(o0).zip(o1.iter_mut()).zip(o2.iter_mut().zip(o3.iter_mut())) {
        [*o0, *o1, *o2, *o3] = winograd_bt(a[0], a[1], b[0], b[1]);
    }
}

/// G's combinations of three vectors: a, (a + m + z) / 2, (a - m + z) / 2, z.
fn winograd_g(a: &[f32], m: &[f32], z: &[f32], [o0, o1, o2, o3]: [&mut [f32]; 4]) {
    for i in 0..a.len().min(m.len()).min(z.len()).min(o0.len()).min(o1.len()).min(o2.len()).min(o3.len()) {
        o0[i] = a[i];
        o1[i] = 0.5 * (a[i] + m[i] + z[i]);
        o2[i] = 0.5 * (a[i] - m[i] + z[i]);
        o3[i] = z[i];
    }
}

/// Output row I (0 or 1) of A^T m A for a row of tiles into `out` (its width, 2 per tile, the last tile
/// cut when odd): A^T's rows are m0 + m1 + m2 and m1 - m2 - m3, and the same on the columns. `m` holds the
/// 16 positions (4 r + c) for the tiles.
fn winograd_row_out<const I: usize>(m: &[&[f32]; 16], out: &mut [f32]) {
    let full = out.len() / 2;
    let tiles = full + out.len() % 2;
    let m: [&[f32]; 16] = std::array::from_fn(|xi| &m[xi][..tiles]);
    let a = |c: usize, t: usize| {
        if I == 0 { m[c][t] + m[4 + c][t] + m[8 + c][t] } else { m[4 + c][t] - m[8 + c][t] - m[12 + c][t] }
    };
    for (t, pair) in out.chunks_exact_mut(2).enumerate() {
        let (a0, a1, a2, a3) = (a(0, t), a(1, t), a(2, t), a(3, t));
        pair[0] = a0 + a1 + a2;
        pair[1] = a1 - a2 - a3;
    }
    if tiles > full {
        out[2 * full] = a(0, full) + a(1, full) + a(2, full);
    }
}

/// A work buffer kept between ops (per thread), so the large temporaries of every conv do not cost fresh
/// pages each time. Its contents are whatever the last user left: users overwrite what they read.
struct Scratch(Vec<f32>);

thread_local! {
    static SCRATCH: std::cell::RefCell<Vec<Vec<f32>>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Scratch {
    fn resize(&mut self, len: usize) {
        self.0.resize(len, 0.0);
    }

    /// The largest kept buffer (or a new one), `len` long (none for 0).
    fn take(len: usize) -> Self {
        if len == 0 {
            return Self(Vec::new());
        }
        let mut v = SCRATCH.with_borrow_mut(|kept| kept.pop()).unwrap_or_default();
        v.resize(len, 0.0);
        Self(v)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let v = std::mem::take(&mut self.0);
        if v.capacity() == 0 {
            return;
        }
        SCRATCH.with_borrow_mut(|kept| {
            if kept.len() < 4 {
                kept.push(v);
                kept.sort_by_key(|v| v.capacity());
            }
        });
    }
}

impl std::ops::Deref for Scratch {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.0
    }
}

impl std::ops::DerefMut for Scratch {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.0
    }
}

/// Applies `epi` to `out` laid out as (batch, channels, len): the bias is per (batch, channel).
fn epilogue_rows(out: &mut [f32], len: usize, channels: usize, epi: &Epilogue<'_>) {
    if epi.bias.is_none() && epi.act.is_none() && epi.residual.is_none() {
        return;
    }
    for_chunks(out, len, |i, row| {
        let (b, c) = (i / channels, i % channels);
        let bias = epi.bias.map_or(0.0, |bias| bias_row(bias, epi.bias_at, b, channels)[c]);
        let res = epi.residual.map(|r| &r[i * len..][..len]);
        for (j, v) in row.iter_mut().enumerate() {
            *v = apply(epi.act, *v + bias) + res.map_or(0.0, |r| r[j]);
        }
    });
}

/// Options of [`matmul`] the CPU honours (the GPU's [`super::MatmulOpts`] in slices).
pub struct Matmul<'a> {
    pub trans_a: bool,
    pub trans_b: bool,
    pub trans_c: bool,
    pub geglu: bool,
    /// gamma, beta, eps of a layer norm of A's rows.
    pub layer_norm: Option<(&'a [f32], &'a [f32], f32)>,
    pub epi: Epilogue<'a>,
}

/// Rows of A per [`matmul`] task at least (each task packs all of B for its rows, so tasks of few rows would
/// spend a larger share on packing; the unit tests take several tasks at small sizes).
const MATMUL_ROWS: usize = if cfg!(test) { 3 } else { 64 };

/// Batched C = A B with the fusions of [`Matmul`]: A (.., m, k) or (.., k, m), B (.., k, n) or (.., n, k),
/// either without batch dimensions shared by the other's batch. `out_shape` is the result's.
///
/// In tasks of A's rows, on rayon's threads when there are several: each normalizes its rows, multiplies
/// them and applies the epilogue while they are in cache. (gemm's own threads split the columns of B, and
/// the UNet's matmuls have few: in wasm on two threads they ran 1.2x faster than on one, 1.7x this way.)
pub fn matmul(a: &CTensor, b: &CTensor, o: &Matmul<'_>, batch: usize, out_shape: &[usize]) -> Result<CTensor> {
    let (ad, bd) = (a.dims(), b.dims());
    let (ra, ca) = (ad[ad.len() - 2], ad[ad.len() - 1]);
    let (rb, cb) = (bd[bd.len() - 2], bd[bd.len() - 1]);
    let (m, k) = if o.trans_a { (ca, ra) } else { (ra, ca) };
    let n = if o.trans_b { rb } else { cb };
    let a_skip = if ad.len() > 2 { ra * ca } else { 0 };
    let b_skip = if bd.len() > 2 { rb * cb } else { 0 };
    if o.layer_norm.is_some() && o.trans_a {
        return Err(Error::Invalid("the CPU fallback normalizes the rows of an untransposed A only".into()));
    }
    let (av, bv) = (view(a)?, view(b)?);
    let (ad, bd) = (av.get(), bv.get());
    let a_st = if o.trans_a { (1, m) } else { (k, 1) };
    let b_st = if o.trans_b { (1, k) } else { (n, 1) };
    let c_st = if o.trans_c { (1, m) } else { (n, 1) };
    // A GEGLU's product is a temporary per task: (rows, n) for (rows, n / 2) of the result.
    let cols = if o.geglu { n / 2 } else { n };
    let mut out = vec![0f32; batch * m * cols];
    // Items of `rows` rows each: a shared B stacks the batch's rows into one item.
    let (items, rows) = if b_skip == 0 && !o.trans_a && !o.trans_c { (1, batch * m) } else { (batch, m) };
    let chunk = task_size(items * rows, rows, MATMUL_ROWS, 1);
    let per_item = rows.div_ceil(chunk);
    let dst = Shared(out.as_mut_ptr());
    let epi = &o.epi;
    let task = |t: usize| {
        let (i, r0) = (t / per_item, (t % per_item) * chunk);
        let rc = chunk.min(rows - r0);
        let a_off = i * a_skip + if o.trans_a { r0 } else { r0 * k };
        let mut normed = Scratch::take(if o.layer_norm.is_some() { rc * k } else { 0 });
        let a_rows = match o.layer_norm {
            Some((g, beta, eps)) => {
                for (src, dst) in ad[a_off..][..rc * k].chunks(k).zip(normed.chunks_mut(k)) {
                    layer_norm_row(src, dst, Some((g, beta)), eps);
                }
                &normed[..]
            }
            None => &ad[a_off..],
        };
        // The first global row of this task (batch item = global row / m).
        let g0 = i * rows + r0;
        let mut temp = Scratch::take(if o.geglu { rc * n } else { 0 });
        let c = if o.geglu {
            temp.as_mut_ptr()
        } else if o.trans_c {
            // SAFETY: in bounds: item i's (n, m) block, columns r0..
            unsafe { dst.ptr().add(i * m * n + r0) }
        } else {
            // SAFETY: in bounds: rows g0 .. g0 + rc of (items * rows, n).
            unsafe { dst.ptr().add(g0 * n) }
        };
        // SAFETY: A's rows (or columns, transposed) r0 .. r0 + rc of item i, B of item i, and C's rows (or
        // columns) r0 .. r0 + rc are in bounds for these strides; no other task writes this task's part of C.
        unsafe {
            gemm(
                (rc, n, k),
                c,
                if o.geglu { (n, 1) } else { c_st },
                false,
                a_rows.as_ptr(),
                a_st,
                bd[i * b_skip..].as_ptr(),
                b_st,
                Parallelism::None,
            )
        };
        if o.trans_c {
            return;
        }
        for j in 0..rc {
            let r = g0 + j;
            let bias = epi.bias.map(|bias| bias_row(bias, epi.bias_at, r / m, n));
            if o.geglu {
                let p = &temp[j * n..][..n];
                // SAFETY: row r of the (batch * m, n / 2) result is this task's.
                let row = unsafe { std::slice::from_raw_parts_mut(dst.ptr().add(r * cols), cols) };
                let (x, g) = p.split_at(cols);
                // Zipped slices, no branch inside: the loops vectorize (erf and exp included).
                match bias {
                    Some(bias) => {
                        let (bx, bg) = bias.split_at(cols);
                        for (((v, &x), &g), (&bx, &bg)) in row.iter_mut().zip(x).zip(g).zip(bx.iter().zip(bg)) {
                            *v = (x + bx) * gelu(g + bg);
                        }
                    }
                    None => row.iter_mut().zip(x).zip(g).for_each(|((v, &x), &g)| *v = x * gelu(g)),
                }
            } else if bias.is_some() || epi.act.is_some() || epi.residual.is_some() {
                // SAFETY: row r of the (batch * m, n) result is this task's.
                let row = unsafe { std::slice::from_raw_parts_mut(dst.ptr().add(r * n), n) };
                let res = epi.residual.map(|res| &res[r * n..][..n]);
                for (jj, v) in row.iter_mut().enumerate() {
                    *v = apply(epi.act, *v + bias.map_or(0.0, |b| b[jj])) + res.map_or(0.0, |r| r[jj]);
                }
            }
        }
    };
    let tasks = items * per_item;
    if threads() > 1 && tasks > 1 {
        (0..tasks).into_par_iter().for_each(task);
    } else {
        (0..tasks).for_each(task);
    }
    if o.trans_c {
        // (batch, n, m): the bias is per row.
        epilogue_rows(&mut out, m, n, epi);
    }
    tensor(out, out_shape)
}

/// Layer norm of `src` into `dst` (the same length), with an optional affine. Mean and variance in f64.
fn layer_norm_row(src: &[f32], dst: &mut [f32], affine: Option<(&[f32], &[f32])>, eps: f32) {
    let len = src.len();
    let mean = src.iter().map(|&v| v as f64).sum::<f64>() / len as f64;
    let var = src.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / len as f64;
    let (mean, rstd) = (mean as f32, (1.0 / (var + eps as f64).sqrt()) as f32);
    for (j, (o, &v)) in dst.iter_mut().zip(src).enumerate() {
        let y = (v - mean) * rstd;
        *o = match affine {
            Some((g, b)) => y * g[j] + b[j],
            None => y,
        };
    }
}

/// One of attention's operands: (batch, tokens, width) with the heads in `hd` columns from `col`.
pub struct Heads<'a> {
    pub t: &'a CTensor,
    pub col: usize,
}

/// softmax(Q K^T * scale) V per head, each head multiplied where it lies in q, k and v; the result is
/// (batch, lq, heads * d).
pub fn attention(
    q: Heads<'_>,
    k: Heads<'_>,
    v: Heads<'_>,
    heads: usize,
    hd: usize,
    scale: f32,
    causal: bool,
) -> Result<CTensor> {
    let (qv, kv, vv) = (view(q.t)?, view(k.t)?, view(v.t)?);
    let (qd, kd, vd) = (qv.get(), kv.get(), vv.get());
    let (b, lq, wq) = q.t.dims3()?;
    let (_, lk, wk) = k.t.dims3()?;
    let wv = v.t.dims3()?.2;
    let d = hd / heads;
    let mut out = vec![0f32; b * lq * hd];
    let dst = Shared(out.as_mut_ptr());
    let chunks = lq.div_ceil(ATTN_ROWS);
    let task = |t: usize| {
        let (bh, c) = (t / chunks, t % chunks);
        let (bi, h) = (bh / heads, bh % heads);
        let r0 = c * ATTN_ROWS;
        let rows = ATTN_ROWS.min(lq - r0);
        let mut s = vec![0f32; rows * lk];
        let qp = &qd[(bi * lq + r0) * wq + q.col + h * d..];
        let kp = &kd[bi * lk * wk + k.col + h * d..];
        let vp = &vd[bi * lk * wv + v.col + h * d..];
        // SAFETY: Q's rows (rows, d) at stride wq, K^T (d, lk) read with strides (1, wk), S (rows, lk): all
        // in bounds (the launcher checked the shapes).
        unsafe {
            gemm(
                (rows, lk, d),
                s.as_mut_ptr(),
                (lk, 1),
                false,
                qp.as_ptr(),
                (wq, 1),
                kp.as_ptr(),
                (1, wk),
                Parallelism::None,
            )
        };
        // The rows' exponentials, unnormalized: the output rows are divided by their sums instead (d columns
        // each rather than lk).
        let mut inv = [0f32; ATTN_ROWS];
        for ((i, row), inv) in s.chunks_mut(lk).enumerate().zip(&mut inv) {
            let valid = if causal { (r0 + i + 1).min(lk) } else { lk };
            let max = row_max(&row[..valid]) * scale;
            *inv = 1.0 / exp_sum(&mut row[..valid], scale, max);
            row[valid..].fill(0.0);
        }
        let o = (bi * lq + r0) * hd + h * d;
        // SAFETY: this task's output block, rows r0.. of batch bi and columns h * d .. + d, is written by no
        // other task; V (lk, d) at stride wv is in bounds.
        unsafe {
            gemm(
                (rows, d, lk),
                dst.ptr().add(o),
                (hd, 1),
                false,
                s.as_ptr(),
                (lk, 1),
                vp.as_ptr(),
                (wv, 1),
                Parallelism::None,
            );
            for (i, &inv) in inv[..rows].iter().enumerate() {
                std::slice::from_raw_parts_mut(dst.ptr().add(o + i * hd), d).iter_mut().for_each(|x| *x *= inv);
            }
        }
    };
    if threads() > 1 {
        (0..b * heads * chunks).into_par_iter().for_each(task);
    } else {
        (0..b * heads * chunks).for_each(task);
    }
    tensor(out, &[b, lq, hd])
}

#[cfg(test)]
mod tests {
    //! Each op against the same computation composed of candle ops, at shapes that take every path (im2col in
    //! several chunks, strides, asymmetric padding, upsampling, concatenation, normalization, shared and
    //! batched operands, heads at column offsets, causal masks).
    use super::*;
    use candle_core::D;

    fn rand(shape: &[usize], seed: u64) -> CTensor {
        let n: usize = shape.iter().product();
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let data: Vec<f32> = (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect();
        CTensor::from_vec(data, shape, &Device::Cpu).unwrap()
    }

    fn close(got: &CTensor, want: &CTensor, what: &str) {
        assert_eq!(got.dims(), want.dims(), "{what}");
        let (g, w) = (
            got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            want.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        let scale = w.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
        let err = g.iter().zip(&w).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(err <= 2e-5 * scale, "{what}: max error {err} (scale {scale})");
    }

    fn gn_ref(x: &CTensor, groups: usize, gamma: &CTensor, beta: &CTensor, silu: bool) -> CTensor {
        let dims = x.dims().to_vec();
        let g = x.reshape((dims[0], groups, ())).unwrap();
        let mean = g.mean_keepdim(D::Minus1).unwrap();
        let centered = g.broadcast_sub(&mean).unwrap();
        let var = centered.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        let normed =
            centered.broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap()).unwrap().reshape(dims.as_slice()).unwrap();
        let c = dims[1];
        let out = normed
            .broadcast_mul(&gamma.reshape((1, c, 1, 1)).unwrap())
            .unwrap()
            .broadcast_add(&beta.reshape((1, c, 1, 1)).unwrap())
            .unwrap();
        if silu { candle_nn::ops::silu(&out).unwrap() } else { out }
    }

    #[test]
    fn erf_is_within_5e_7_of_f64_erf() {
        let mut worst = (0f64, 0f32);
        for i in -8 * 4096..=8 * 4096 {
            let x = i as f32 / 4096.0;
            let err = (erf(x) as f64 - candle_core::cpu::erf::erf_f64(x as f64)).abs();
            if err > worst.0 {
                worst = (err, x);
            }
        }
        assert!(worst.0 < 5e-7, "absolute error {:e} at x = {}", worst.0, worst.1);
        assert!(erf(0.0).abs() < 1e-7 && erf(-0.5) == -erf(0.5));
        assert_eq!((erf(-1000.0), erf(1000.0)), (-1.0, 1.0));
    }

    #[test]
    fn exp_is_within_3e_7_of_f64_exp() {
        // Every 1/1024 from -87 to 88 and every power-of-two-spaced point near 0, against f64's exp.
        let mut xs: Vec<f32> = (-87 * 1024..=88 * 1024).map(|i| i as f32 / 1024.0).collect();
        xs.extend((0..40).flat_map(|e| [1.0f32 / (1u64 << e) as f32, -1.0 / (1u64 << e) as f32]));
        let mut worst = (0f64, 0f32);
        for &x in &xs {
            let want = (x as f64).exp();
            let rel = ((exp(x) as f64 - want) / want).abs();
            if rel > worst.0 {
                worst = (rel, x);
            }
        }
        assert!(worst.0 < 3e-7, "relative error {:e} at x = {}", worst.0, worst.1);
        // Out of range: clamped, finite, never NaN or infinite.
        assert_eq!(exp(-1000.0), exp(-87.0));
        assert!(exp(1000.0).is_finite() && exp(1000.0) == exp(88.0));
        assert!(exp(f32::NEG_INFINITY) > 0.0);
        // exp_sum: the values and their sum.
        let mut row: Vec<f32> = (0..37).map(|i| i as f32 * 0.25 - 4.0).collect();
        let want: Vec<f64> = row.iter().map(|&x| (x as f64 * 0.5 - 1.0).exp()).collect();
        let sum = exp_sum(&mut row, 0.5, 1.0);
        for (g, w) in row.iter().zip(&want) {
            assert!(((*g as f64 - w) / w).abs() < 3e-7, "{g} vs {w}");
        }
        assert!((sum as f64 - want.iter().sum::<f64>()).abs() < 1e-6 * sum as f64, "sum {sum}");
    }

    #[test]
    fn conv2d_matches_candle() {
        // (batch, cx, more channels, side, cout, kernel, stride, pads, upsample, norm)
        let cases = [
            (2, 64, 0, 128, 8, 3, 1, (1, 1), false, false), // im2col in 3 chunks (8 channels out: no Winograd)
            (1, 6, 0, 17, 5, 3, 2, (0, 1), false, false),   // the VAE encoder's downsampler
            (2, 8, 0, 9, 4, 3, 1, (1, 1), true, false),     // upsample then conv
            (2, 6, 10, 7, 5, 3, 1, (1, 1), false, true),    // norm + SiLU over a concatenation
            (2, 8, 0, 6, 4, 1, 1, (0, 0), false, false),    // 1x1: no im2col
            (2, 8, 0, 4, 40, 1, 1, (0, 0), false, false),   // 1x1, more channels out than pixels: tasks of rows
            (1, 8, 8, 5, 4, 1, 1, (0, 0), false, true),     // 1x1 over a normalized concatenation
            (2, 16, 0, 20, 16, 3, 1, (1, 1), false, false), // Winograd in 4 chunks of tile rows
            (3, 16, 0, 10, 16, 3, 1, (1, 1), false, false), // Winograd in chunks of 2 and 1 whole items
            (1, 24, 0, 7, 17, 3, 1, (1, 1), false, false),  // Winograd, odd sides (partial tiles)
            (2, 8, 10, 5, 16, 3, 1, (1, 1), true, true),    // Winograd over a normalized concatenation, upsampled
        ];
        for (i, &(b, cx, cm, side, cout, k, stride, (p0, p1), up, norm)) in cases.iter().enumerate() {
            let x = rand(&[b, cx, side, side], 10 + i as u64);
            let more = (cm > 0).then(|| rand(&[b, cm, side, side], 20 + i as u64));
            let cin = cx + cm;
            let w = rand(&[cout, cin, k, k], 30 + i as u64);
            let bias = rand(&[b * cout + 3], 40 + i as u64);
            let (gamma, beta) = (rand(&[cin], 50 + i as u64), rand(&[cin], 60 + i as u64));
            let mut full = match &more {
                Some(m) => CTensor::cat(&[&x, m], 1).unwrap(),
                None => x.clone(),
            };
            let groups = 2;
            let stats = norm.then(|| group_stats(&x, more.as_ref(), groups, 1e-5).unwrap());
            if norm {
                full = gn_ref(&full, groups, &gamma, &beta, true);
            }
            if up {
                full = full.upsample_nearest2d(2 * side, 2 * side).unwrap();
            }
            let conv = full
                .pad_with_zeros(2, p0, p1)
                .unwrap()
                .pad_with_zeros(3, p0, p1)
                .unwrap()
                .conv2d(&w, 0, stride, 1, 1)
                .unwrap();
            let rows: Vec<CTensor> = (0..b).map(|j| bias.narrow(0, 3 + j * cout, cout).unwrap()).collect();
            let rows = CTensor::stack(&rows, 0).unwrap().reshape((b, cout, 1, 1)).unwrap();
            let out_dims = conv.dims().to_vec();
            let residual = rand(&out_dims, 70 + i as u64);
            let want = (candle_nn::ops::silu(&conv.broadcast_add(&rows).unwrap()).unwrap() + &residual).unwrap();
            let flat_stats: Vec<f32> = stats.iter().flatten().flatten().copied().collect();
            let (gv, bv) = (view(&gamma).unwrap(), view(&beta).unwrap());
            let input = ConvInput {
                x: &x,
                more: more.as_ref(),
                norm: norm.then(|| (norm_affine(&flat_stats, groups, gv.get(), bv.get(), b), true)),
                upsample: up,
            };
            let (wv, biasv, rv) = (view(&w).unwrap(), view(&bias).unwrap(), view(&residual).unwrap());
            let epi = Epilogue {
                bias: Some(biasv.get()),
                bias_at: (3, cout),
                act: Some(Activation::Silu),
                residual: Some(rv.get()),
            };
            let got = conv2d(&input, wv.get(), cout, (k, k), (p0, p1), stride, &epi).unwrap();
            close(&got, &want, &format!("conv case {i}"));
        }
    }

    #[test]
    fn group_norm_matches_candle() {
        let x = rand(&[2, 12, 5, 7], 1);
        let (g, b) = (rand(&[12], 2), rand(&[12], 3));
        let (gv, bv) = (view(&g).unwrap(), view(&b).unwrap());
        for silu in [false, true] {
            let got = group_norm(&x, 4, gv.get(), bv.get(), 1e-5, silu).unwrap();
            close(&got, &gn_ref(&x, 4, &g, &b, silu), "group norm");
        }
    }

    #[test]
    fn matmul_matches_candle() {
        let (m, k, n) = (7, 12, 10);
        for (ta, tb, tc, geglu, ln, batched_b) in [
            (false, true, false, false, false, false),
            (false, true, false, true, true, false),
            (true, false, false, false, false, true),
            (false, false, true, false, false, true),
            (false, true, true, false, true, false),
        ] {
            let what =
                format!("matmul trans_a {ta} trans_b {tb} trans_c {tc} geglu {geglu} ln {ln} batched B {batched_b}");
            let a = rand(&if ta { [2, k, m] } else { [2, m, k] }, 5);
            let bshape: Vec<usize> = match (batched_b, tb) {
                (true, true) => vec![2, n, k],
                (true, false) => vec![2, k, n],
                (false, true) => vec![n, k],
                (false, false) => vec![k, n],
            };
            let b = rand(&bshape, 6);
            let (gamma, beta) = (rand(&[k], 7), rand(&[k], 8));
            let bias = rand(&[2 * n], 9);
            let mut ar = if ta { a.transpose(1, 2).unwrap() } else { a.clone() };
            if ln {
                ar = candle_nn::ops::layer_norm(&ar.contiguous().unwrap(), &gamma, &beta, 1e-5).unwrap();
            }
            let br = if tb { b.transpose(D::Minus2, D::Minus1).unwrap() } else { b.clone() };
            let rows = CTensor::stack(&[bias.narrow(0, 0, n).unwrap(), bias.narrow(0, n, n).unwrap()], 0)
                .unwrap()
                .unsqueeze(1)
                .unwrap();
            let mut want = ar
                .contiguous()
                .unwrap()
                .broadcast_matmul(&br.contiguous().unwrap())
                .unwrap()
                .broadcast_add(&rows)
                .unwrap();
            let act = (!geglu).then_some(Activation::Gelu);
            if geglu {
                let h = n / 2;
                want = (want.narrow(2, 0, h).unwrap() * want.narrow(2, h, h).unwrap().gelu_erf().unwrap()).unwrap();
            } else {
                want = want.gelu_erf().unwrap();
            }
            if tc {
                want = want.transpose(1, 2).unwrap().contiguous().unwrap();
            }
            let residual = (!geglu && !ln).then(|| rand(want.dims(), 11));
            if let Some(r) = &residual {
                want = (want + r).unwrap();
            }
            let (gv, bv, biasv) = (view(&gamma).unwrap(), view(&beta).unwrap(), view(&bias).unwrap());
            let rv = residual.as_ref().map(|r| view(r).unwrap());
            let o = Matmul {
                trans_a: ta,
                trans_b: tb,
                trans_c: tc,
                geglu,
                layer_norm: ln.then(|| (gv.get(), bv.get(), 1e-5)),
                epi: Epilogue { bias: Some(biasv.get()), bias_at: (0, n), act, residual: rv.as_ref().map(|r| r.get()) },
            };
            let got = matmul(&a, &b, &o, 2, want.dims()).unwrap();
            close(&got, &want, &what);
        }
    }

    #[test]
    fn attention_matches_candle() {
        let (b, lq, lk, heads, d) = (2, 70, 70, 3, 8);
        let hd = heads * d;
        // q inside a wider (q | k | v) tensor, k and v separate.
        let qkv = rand(&[b, lq, 3 * hd], 12);
        let (k, v) = (rand(&[b, lk, hd], 13), rand(&[b, lk, hd], 14));
        let split =
            |t: &CTensor, l: usize| t.reshape((b, l, heads, d)).unwrap().transpose(1, 2).unwrap().contiguous().unwrap();
        for causal in [false, true] {
            let q = qkv.narrow(2, hd, hd).unwrap();
            let mut s =
                (split(&q, lq).matmul(&split(&k, lk).t().unwrap().contiguous().unwrap()).unwrap() * 0.3).unwrap();
            if causal {
                let mask: Vec<f32> =
                    (0..lq).flat_map(|i| (0..lk).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 })).collect();
                s = s.broadcast_add(&CTensor::from_vec(mask, (lq, lk), &Device::Cpu).unwrap()).unwrap();
            }
            let o = candle_nn::ops::softmax_last_dim(&s).unwrap().matmul(&split(&v, lk)).unwrap();
            let want = o.transpose(1, 2).unwrap().reshape((b, lq, hd)).unwrap();
            let got = attention(
                Heads { t: &qkv, col: hd },
                Heads { t: &k, col: 0 },
                Heads { t: &v, col: 0 },
                heads,
                hd,
                0.3,
                causal,
            )
            .unwrap();
            close(&got, &want, &format!("attention causal {causal}"));
        }
    }
}
