// What both attention kernels (attention.wgsl, attention_coop.wgsl) read: parameters and bindings.

struct Params {
    lq: u32,
    lk: u32,
    heads: u32,
    scale: f32,
    sq: u32,     // row (token) stride of q in elements
    sk: u32,     // row stride of k
    sv: u32,     // row stride of v
    so: u32,     // row stride of out
    bq: u32,     // batch stride of q
    bk: u32,     // batch stride of k
    bv: u32,     // batch stride of v
    bo: u32,     // batch stride of out
    qo: u32,     // first element of q (its columns inside a wider tensor)
    ko: u32,     // first element of k
    vo: u32,     // first element of v
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> q: array<act>;          // (batch, lq, heads * D) from qo, strided
@group(0) @binding(2) var<storage, read> k: array<act>;          // (batch, lk, heads * D), strided
@group(0) @binding(3) var<storage, read> v: array<act>;          // (batch, lk, heads * D), strided
@group(0) @binding(4) var<storage, read_write> out: array<act>;  // (batch, lq, heads * D), strided
