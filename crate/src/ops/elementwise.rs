//! Elementwise ops: broadcasting add/mul/sub, SiLU, GELU (erf), QuickGELU, GEGLU, scale-and-shift.

use bytemuck::{Pod, Zeroable};

use super::{act_dtype, check_act};
use crate::error::{Result, shape_err};
use crate::gpu::{GpuContext, Kernel, Spec, Tensor};

const BINARY: Kernel =
    Kernel { name: "binary", sources: &[include_str!("../kernels/binary.wgsl")], entry: "main", inputs: 2, outputs: 1 };

const UNARY: Kernel = Kernel {
    name: "unary",
    sources: &[include_str!("../kernels/common.wgsl"), include_str!("../kernels/unary.wgsl")],
    entry: "main",
    inputs: 1,
    outputs: 1,
};

const LINCOMB: Kernel = Kernel {
    name: "lincomb",
    sources: &[include_str!("../kernels/lincomb.wgsl")],
    entry: "main",
    inputs: 4,
    outputs: 1,
};

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct LincombParams {
    n: u32,
    terms: u32,
    _pad: [u32; 2],
    off: [u32; 4],
    c: [f32; 4],
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct BinaryParams {
    n: u32,
    _pad: [u32; 3],
    shape: [u32; 4],
    sa: [u32; 4],
    sb: [u32; 4],
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct UnaryParams {
    n: u32,
    half: u32,
    alpha: f32,
    beta: f32,
}

/// A binary elementwise operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinaryOp {
    Add = 0,
    Mul = 1,
    Sub = 2,
}

/// An activation applied elementwise.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    Silu = 0,
    /// GELU with the exact erf (PyTorch's default, diffusers' "gelu").
    Gelu = 1,
    /// x * sigmoid(1.702 x), CLIP's "quick_gelu".
    QuickGelu = 2,
    Relu = 5,
}

/// The broadcast shape of `a` and `b` (numpy rules), or None.
pub fn broadcast_shape(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let r = a.len().max(b.len());
    let mut out = vec![0; r];
    for i in 0..r {
        let da = if i + a.len() >= r { a[i + a.len() - r] } else { 1 };
        let db = if i + b.len() >= r { b[i + b.len() - r] } else { 1 };
        out[i] = match (da, db) {
            (x, y) if x == y => x,
            (1, y) => y,
            (x, 1) => x,
            _ => return None,
        };
    }
    Some(out)
}

/// Strides (in elements) of `shape` when broadcast to `out` (rank <= 4), left-padded to rank 4.
fn broadcast_strides(shape: &[usize], out: &[usize]) -> [u32; 4] {
    let mut strides = [0u32; 4];
    let mut stride = 1usize;
    for i in (0..shape.len()).rev() {
        let oi = 4 - (shape.len() - i);
        strides[oi] = if shape[i] == 1 && out[out.len() - (shape.len() - i)] != 1 { 0 } else { stride as u32 };
        stride *= shape[i];
    }
    strides
}

/// `a op b` with broadcasting, up to rank 4.
pub fn binary(ctx: &GpuContext, op: BinaryOp, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let name = match op {
        BinaryOp::Add => "add",
        BinaryOp::Mul => "mul",
        BinaryOp::Sub => "sub",
    };
    check_act(name, &[a, b])?;
    let Some(shape) = broadcast_shape(a.shape(), b.shape()) else {
        return shape_err(name, format!("shapes {:?} and {:?} do not broadcast", a.shape(), b.shape()));
    };
    if shape.len() > 4 {
        return shape_err(name, format!("rank {} is above 4 ({:?}, {:?})", shape.len(), a.shape(), b.shape()));
    }
    if ctx.is_cpu() {
        return super::cpu::binary(op, a, b);
    }
    let out = Tensor::empty(ctx, name, &shape, a.dtype())?;
    let mut padded = [1u32; 4];
    for (i, &d) in shape.iter().enumerate() {
        padded[4 - shape.len() + i] = d as u32;
    }
    let n = out.numel() as u32;
    let params = BinaryParams {
        n,
        _pad: [0; 3],
        shape: padded,
        sa: broadcast_strides(a.shape(), &shape),
        sb: broadcast_strides(b.shape(), &shape),
    };
    let spec = Spec::new(act_dtype(a)?).u32("OP", op as u32);
    let groups = crate::gpu::grid_1d(ctx, n.div_ceil(256));
    ctx.dispatch(name, &BINARY, &spec, bytemuck::bytes_of(&params), &[a, b], &[&out], groups)?;
    Ok(out)
}

pub fn add(ctx: &GpuContext, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    binary(ctx, BinaryOp::Add, a, b)
}

pub fn mul(ctx: &GpuContext, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    binary(ctx, BinaryOp::Mul, a, b)
}

pub fn sub(ctx: &GpuContext, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    binary(ctx, BinaryOp::Sub, a, b)
}

fn unary(
    ctx: &GpuContext,
    name: &'static str,
    x: &Tensor,
    out_shape: &[usize],
    code: u32,
    params: UnaryParams,
) -> Result<Tensor> {
    check_act(name, &[x])?;
    if ctx.is_cpu() {
        return match code {
            0 => super::cpu::activation(x, Activation::Silu),
            1 => super::cpu::activation(x, Activation::Gelu),
            2 => super::cpu::activation(x, Activation::QuickGelu),
            3 => super::cpu::geglu(x),
            4 => super::cpu::affine(x, params.alpha, params.beta),
            5 => super::cpu::activation(x, Activation::Relu),
            _ => super::cpu::soft_clamp(x, params.alpha),
        };
    }
    let out = Tensor::empty(ctx, name, out_shape, x.dtype())?;
    let spec = Spec::new(act_dtype(x)?).u32("OP", code);
    let groups = crate::gpu::grid_1d(ctx, params.n.div_ceil(256));
    ctx.dispatch(name, &UNARY, &spec, bytemuck::bytes_of(&params), &[x], &[&out], groups)?;
    Ok(out)
}

/// Applies `act` elementwise.
pub fn activation(ctx: &GpuContext, x: &Tensor, act: Activation) -> Result<Tensor> {
    let name = match act {
        Activation::Silu => "silu",
        Activation::Gelu => "gelu",
        Activation::QuickGelu => "quick_gelu",
        Activation::Relu => "relu",
    };
    let params = UnaryParams { n: x.numel() as u32, half: 0, alpha: 0.0, beta: 0.0 };
    unary(ctx, name, x, x.shape(), act as u32, params)
}

pub fn silu(ctx: &GpuContext, x: &Tensor) -> Result<Tensor> {
    activation(ctx, x, Activation::Silu)
}

pub fn gelu(ctx: &GpuContext, x: &Tensor) -> Result<Tensor> {
    activation(ctx, x, Activation::Gelu)
}

pub fn quick_gelu(ctx: &GpuContext, x: &Tensor) -> Result<Tensor> {
    activation(ctx, x, Activation::QuickGelu)
}

/// GEGLU: splits the last dimension in halves h, g and returns h * gelu(g) (diffusers' `GEGLU`).
pub fn geglu(ctx: &GpuContext, x: &Tensor) -> Result<Tensor> {
    let last = x.dim(-1);
    if x.rank() == 0 || !last.is_multiple_of(2) {
        return shape_err("geglu", format!("the last dimension must be even, got {:?}", x.shape()));
    }
    let mut shape = x.shape().to_vec();
    *shape.last_mut().expect("rank >= 1") = last / 2;
    let params = UnaryParams { n: (x.numel() / 2) as u32, half: (last / 2) as u32, alpha: 0.0, beta: 0.0 };
    unary(ctx, "geglu", x, &shape, 3, params)
}

pub fn relu(ctx: &GpuContext, x: &Tensor) -> Result<Tensor> {
    activation(ctx, x, Activation::Relu)
}

/// tanh(x / limit) * limit: a smooth clamp to (-limit, limit).
pub fn soft_clamp(ctx: &GpuContext, x: &Tensor, limit: f32) -> Result<Tensor> {
    let params = UnaryParams { n: x.numel() as u32, half: 0, alpha: limit, beta: 0.0 };
    unary(ctx, "soft_clamp", x, x.shape(), 6, params)
}

/// x * alpha + beta.
pub fn affine(ctx: &GpuContext, x: &Tensor, alpha: f32, beta: f32) -> Result<Tensor> {
    let params = UnaryParams { n: x.numel() as u32, half: 0, alpha, beta };
    unary(ctx, "affine", x, x.shape(), 4, params)
}

/// One term of [`lincomb`]: coefficient * tensor, read from element `offset` on.
#[derive(Clone, Copy, Debug)]
pub struct Term<'a> {
    pub tensor: &'a Tensor,
    pub offset: usize,
    pub coef: f32,
}

impl<'a> Term<'a> {
    pub fn new(coef: f32, tensor: &'a Tensor) -> Self {
        Self { tensor, offset: 0, coef }
    }

    /// The `index`-th of `parts` equal parts along the first dimension (e.g. one half of a CFG batch).
    pub fn part(coef: f32, tensor: &'a Tensor, index: usize, parts: usize) -> Self {
        Self { tensor, offset: tensor.numel() / parts * index, coef }
    }
}

/// `sum(coef * tensor[offset..offset + numel(shape)])` over 1 to 4 terms, shaped `shape`.
pub fn lincomb(ctx: &GpuContext, shape: &[usize], terms: &[Term<'_>]) -> Result<Tensor> {
    const OP: &str = "lincomb";
    if terms.is_empty() || terms.len() > 4 {
        return shape_err(OP, format!("takes 1 to 4 terms, got {}", terms.len()));
    }
    let tensors: Vec<&Tensor> = terms.iter().map(|t| t.tensor).collect();
    check_act(OP, &tensors)?;
    let n: usize = shape.iter().product();
    if let Some(t) = terms.iter().find(|t| t.offset + n > t.tensor.numel()) {
        return shape_err(
            OP,
            format!("{n} elements from offset {} overrun {:?} (output {shape:?})", t.offset, t.tensor.shape()),
        );
    }
    if ctx.is_cpu() {
        return super::cpu::lincomb(shape, terms);
    }
    let out = Tensor::empty(ctx, OP, shape, tensors[0].dtype())?;
    let mut params = LincombParams { n: n as u32, terms: terms.len() as u32, _pad: [0; 2], off: [0; 4], c: [0.0; 4] };
    for (i, t) in terms.iter().enumerate() {
        params.off[i] = t.offset as u32;
        params.c[i] = t.coef;
    }
    let inputs: Vec<&Tensor> = (0..4).map(|i| tensors[i.min(tensors.len() - 1)]).collect();
    let spec = Spec::new(act_dtype(tensors[0])?);
    let groups = crate::gpu::grid_1d(ctx, (n as u32).div_ceil(256));
    ctx.dispatch(OP, &LINCOMB, &spec, bytemuck::bytes_of(&params), &inputs, &[&out], groups)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcasting_follows_numpy() {
        assert_eq!(broadcast_shape(&[2, 3, 4], &[4]), Some(vec![2, 3, 4]));
        assert_eq!(broadcast_shape(&[2, 1, 4], &[3, 1]), Some(vec![2, 3, 4]));
        assert_eq!(broadcast_shape(&[2, 3], &[4]), None);
        assert_eq!(broadcast_strides(&[3, 1], &[2, 3, 4]), [0, 0, 1, 0]);
        assert_eq!(broadcast_strides(&[2, 3, 4], &[2, 3, 4]), [0, 12, 4, 1]);
    }
}
