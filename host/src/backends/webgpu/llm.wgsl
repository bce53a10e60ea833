// The transformer kernels of the wgpu backend (see mod.rs). Every entry
// point shares one binding layout: `p` (the dispatch's parameters), three
// read-only inputs `a`, `b`, `c` and one output `o`; an entry point ignores
// the bindings it does not need. Activations are f32, row-major.

struct Params {
    n: u32,        // width of a row of the output (or of the input, for norms)
    k: u32,        // inner dimension of a product
    rows: u32,     // rows in this dispatch
    pos: u32,      // absolute position of row 0
    heads: u32,    // query heads
    kv_heads: u32, // key/value heads
    hd: u32,       // head dimension
    flags: u32,    // per-kernel switches (see each kernel)
    eps: f32,      // RMSNorm epsilon
    theta: f32,    // unused (the RoPE tables carry the base)
    scale: f32,    // attention scale
    window: u32,   // sliding-window length (0 = none)
    col0: u32,     // products: first output column of this slice of rows of b
    ldo: u32,      // products: output row stride (the whole matrix's n)
    row0: u32,     // rope, attention: first row of the buffers this dispatch works on
    pad1: u32,
};

@group(0) @binding(0) var<storage, read> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read> c: array<f32>;
@group(0) @binding(4) var<storage, read_write> o: array<f32>;
// Binding 2 seen as words, by `mm_q8` only (an entry point uses one view of
// a binding; the bits are never read as floats, which a GPU may flush).
@group(0) @binding(2) var<storage, read> bq: array<u32>;

// o[r, col0 + m] = sum_k a[r, k] * b[m, k]: a projection by a dense (f32)
// weight matrix `b` of n rows of k (a slice of the whole matrix's rows
// when it is larger than one binding may be). One invocation per output;
// x = m, y = r.
@compute @workgroup_size(64)
fn mm_f32(@builtin(global_invocation_id) id: vec3<u32>) {
    let m = id.x;
    let r = id.y;
    if (m >= p.n || r >= p.rows) { return; }
    var acc = 0.0;
    let xa = r * p.k;
    let wb = m * p.k;
    for (var i = 0u; i < p.k; i = i + 1u) {
        acc = acc + a[xa + i] * b[wb + i];
    }
    o[r * p.ldo + p.col0 + m] = acc;
}

// The same product for Q8_0 weights: `bq` holds the int8 values packed
// four to a word (little-endian), `c` one scale per block of 32 values
// along k. k is a multiple of 32.
@compute @workgroup_size(64)
fn mm_q8(@builtin(global_invocation_id) id: vec3<u32>) {
    let m = id.x;
    let r = id.y;
    if (m >= p.n || r >= p.rows) { return; }
    let xa = r * p.k;
    let blocks = p.k / 32u;
    var acc = 0.0;
    for (var blk = 0u; blk < blocks; blk = blk + 1u) {
        let base = (m * p.k + blk * 32u) / 4u;
        var part = 0.0;
        for (var w = 0u; w < 8u; w = w + 1u) {
            let word = bq[base + w];
            let x0 = xa + blk * 32u + w * 4u;
            part = part + a[x0] * f32(bitcast<i32>(word << 24u) >> 24u)
                        + a[x0 + 1u] * f32(bitcast<i32>(word << 16u) >> 24u)
                        + a[x0 + 2u] * f32(bitcast<i32>(word << 8u) >> 24u)
                        + a[x0 + 3u] * f32(bitcast<i32>(word) >> 24u);
        }
        acc = acc + part * c[m * blocks + blk];
    }
    o[r * p.ldo + p.col0 + m] = acc;
}

// o[i] += a[i % n]: a bias added to every row.
@compute @workgroup_size(64)
fn add_bias(@builtin(global_invocation_id) id: vec3<u32>) {
    let i = id.x + id.y * 65535u * 64u;
    if (i >= p.n * p.rows) { return; }
    o[i] = o[i] + a[i % p.n];
}

// o[i] += a[i]: the residual stream.
@compute @workgroup_size(64)
fn add(@builtin(global_invocation_id) id: vec3<u32>) {
    let i = id.x + id.y * 65535u * 64u;
    if (i >= p.n * p.rows) { return; }
    o[i] = o[i] + a[i];
}

// o[i] = silu(a[i]) * b[i] (flags 0) or gelu_tanh(a[i]) * b[i] (flags 1):
// the gated MLP's activation.
@compute @workgroup_size(64)
fn gate(@builtin(global_invocation_id) id: vec3<u32>) {
    let i = id.x + id.y * 65535u * 64u;
    if (i >= p.n * p.rows) { return; }
    let x = a[i];
    var g: f32;
    if (p.flags == 1u) {
        g = 0.5 * x * (1.0 + tanh(0.7978845608 * (x + 0.044715 * x * x * x)));
    } else {
        g = x / (1.0 + exp(-x));
    }
    o[i] = g * b[i];
}

var<workgroup> partial: array<f32, 64>;

// o[r, :] = a[r, :] / rms(a[r, :]) * b: RMSNorm, one workgroup per row
// (of p.n values; p.k is the stride between rows, so that the heads of a
// query can be normalised one by one with n = hd, k = hd).
@compute @workgroup_size(64)
fn rmsnorm(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let r = wg.x + wg.y * 65535u;
    if (r >= p.rows) { return; }
    let base = r * p.k;
    var s = 0.0;
    for (var i = lid.x; i < p.n; i = i + 64u) {
        let x = a[base + i];
        s = s + x * x;
    }
    partial[lid.x] = s;
    workgroupBarrier();
    for (var step = 32u; step > 0u; step = step / 2u) {
        if (lid.x < step) {
            partial[lid.x] = partial[lid.x] + partial[lid.x + step];
        }
        workgroupBarrier();
    }
    let inv = inverseSqrt(partial[0] / f32(p.n) + p.eps);
    for (var i = lid.x; i < p.n; i = i + 64u) {
        o[base + i] = a[base + i] * inv * b[i];
    }
}

// Rotary position embedding in place on `o` (rows of `heads` heads of
// `hd`), with the angles' cosines `a` and sines `b` from tables the host
// computed ([positions, hd/2]): GPUs compute sin and cos accurately only
// near zero, and the angles of late positions are hundreds of radians.
// flags 0: pairs (i, i + hd/2) (rotate-half, Qwen2 and Gemma); flags 1:
// adjacent pairs (2i, 2i + 1) (llama as llama.cpp stores it). One
// invocation per (pair, head, row).
@compute @workgroup_size(64)
fn rope(@builtin(global_invocation_id) id: vec3<u32>) {
    let half = p.hd / 2u;
    let pair = id.x;
    let hr = id.y;
    let h = hr % p.heads;
    let r = hr / p.heads;
    if (pair >= half || r >= p.rows) { return; }
    let t = (p.pos + r) * half + pair;
    let cs = a[t];
    let sn = b[t];
    let base = ((p.row0 + r) * p.heads + h) * p.hd;
    var i0: u32;
    var i1: u32;
    if (p.flags == 1u) {
        i0 = base + 2u * pair;
        i1 = i0 + 1u;
    } else {
        i0 = base + pair;
        i1 = i0 + half;
    }
    let x0 = o[i0];
    let x1 = o[i1];
    o[i0] = x0 * cs - x1 * sn;
    o[i1] = x0 * sn + x1 * cs;
}

// Causal attention of query rows `a` ([rows, heads * hd], row r at
// position pos + r) over the cached keys `b` and values `c` ([positions,
// kv_heads * hd], filled up to pos + rows). One workgroup per (head, row):
// its 64 invocations share the head's dimensions (up to 4 each, so hd <=
// 256), reduce each key's score together and keep an online softmax; a
// window > 0 sees only the last `window` positions. (A first version ran
// one invocation per head over every key and dimension; on llvmpipe it
// drifted from the CPU path once keys x head_dim passed 32,768, by up to
// 25 nats. Its cause was not found; this form agrees at every length.)
var<workgroup> scores: array<f32, 64>;

@compute @workgroup_size(64)
fn attention(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let h = wg.x;
    let r = wg.y;
    if (h >= p.heads || r >= p.rows) { return; }
    let group = p.heads / p.kv_heads;
    let kvh = h / group;
    let kvw = p.kv_heads * p.hd;
    let qb = ((p.row0 + r) * p.heads + h) * p.hd;
    let last = p.pos + r;
    var first = 0u;
    if (p.window > 0u && last + 1u > p.window) {
        first = last + 1u - p.window;
    }
    let me = lid.x;
    var acc = array<f32, 4>(0.0, 0.0, 0.0, 0.0);
    var mx = -3.4e38;
    var l = 0.0;
    for (var t = first; t <= last; t = t + 1u) {
        let kb = t * kvw + kvh * p.hd;
        var part = 0.0;
        for (var d = me; d < p.hd; d = d + 64u) {
            part = part + a[qb + d] * b[kb + d];
        }
        scores[me] = part;
        workgroupBarrier();
        for (var step = 32u; step > 0u; step = step / 2u) {
            if (me < step) {
                scores[me] = scores[me] + scores[me + step];
            }
            workgroupBarrier();
        }
        let s = scores[0] * p.scale;
        workgroupBarrier();
        let m2 = max(mx, s);
        let corr = exp(mx - m2);
        let e = exp(s - m2);
        l = l * corr + e;
        for (var j = 0u; j < 4u; j = j + 1u) {
            let d = me + j * 64u;
            if (d < p.hd) {
                acc[j] = acc[j] * corr + e * c[kb + d];
            }
        }
        mx = m2;
    }
    for (var j = 0u; j < 4u; j = j + 1u) {
        let d = me + j * 64u;
        if (d < p.hd) {
            o[qb + d] = acc[j] / l;
        }
    }
}
