// Tessera's merge kernels (see merge/gpu.rs and merge/methods.rs, whose
// `combine`, `Keep::apply` and `uniform` these mirror line for line).
//
// `data` holds one chunk of every input tensor, `header.stride` floats
// apart: the base first (when flags bit 0 is set), then each model.
// `header.offset` is the chunk's first position in the whole tensor, so
// position-dependent rules (TIES ties, DARE's coins) see global indices.

// Header and Rule mirror the #[repr(C)] structs in gpu.rs byte for byte.
struct Header {
    n: u32,
    models: u32,
    offset: u32,
    flags: u32,
    lambda: f32,
    stride: u32,
    pad0: u32,
    pad1: u32,
}

struct Rule {
    weight: f32,
    kind: u32,
    threshold: f32,
    ties_until: u32,
    key_lo: u32,
    key_hi: u32,
    density: f32,
    scale: f32,
}

@group(0) @binding(0) var<storage, read> header: Header;
@group(0) @binding(1) var<storage, read> rules: array<Rule>;
@group(0) @binding(2) var<storage, read> data: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

const HAS_BASE: u32 = 1u;
const ELECT_SIGN: u32 = 2u;
const NORMALIZE: u32 = 4u;

fn mix32(v: u32) -> u32 {
    var x = v;
    x ^= x >> 16u;
    x *= 0x7feb352du;
    x ^= x >> 15u;
    x *= 0x846ca68bu;
    x ^= x >> 16u;
    return x;
}

// Model i's delta at chunk position j after its sparsification rule.
fn kept(i: u32, j: u32, b: f32) -> f32 {
    let first = select(0u, 1u, (header.flags & HAS_BASE) != 0u);
    let d = data[(first + i) * header.stride + j] - b;
    let r = rules[i];
    let g = header.offset + j;
    if (r.kind == 1u) {
        let m = abs(d);
        if (m > r.threshold || (m == r.threshold && g < r.ties_until)) {
            return d;
        }
        return 0.0;
    }
    if (r.kind == 2u) {
        let h = mix32(mix32(g ^ r.key_lo) ^ r.key_hi);
        let u = f32(h >> 8u) * (1.0 / 16777216.0);
        if (u < r.density) {
            return d * r.scale;
        }
        return 0.0;
    }
    return d;
}

@compute @workgroup_size(256)
fn combine(@builtin(global_invocation_id) gid: vec3<u32>) {
    let j = gid.x;
    if (j >= header.n) {
        return;
    }
    var b = 0.0;
    if ((header.flags & HAS_BASE) != 0u) {
        b = data[j];
    }
    var total = 0.0;
    for (var i = 0u; i < header.models; i++) {
        total += rules[i].weight * kept(i, j, b);
    }
    let positive = total >= 0.0;
    let elect = (header.flags & ELECT_SIGN) != 0u;
    var sum = 0.0;
    var div = 0.0;
    for (var i = 0u; i < header.models; i++) {
        let x = rules[i].weight * kept(i, j, b);
        if (!elect || (x != 0.0 && (x > 0.0) == positive)) {
            sum += x;
            div += rules[i].weight;
        }
    }
    if ((header.flags & NORMALIZE) != 0u) {
        if (abs(div) < 1e-8) {
            div = 1.0;
        }
        sum /= div;
    }
    out[j] = b + header.lambda * sum;
}

var<workgroup> partial: array<vec3<f32>, 256>;

// (a.a, b.b, a.b) of the first two tensors, one sum per workgroup.
@compute @workgroup_size(256)
fn dots(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(workgroup_id) wid: vec3<u32>,
) {
    let j = gid.x;
    var v = vec3<f32>(0.0, 0.0, 0.0);
    if (j < header.n) {
        let a = data[j];
        let c = data[header.stride + j];
        v = vec3<f32>(a * a, c * c, a * c);
    }
    partial[lid.x] = v;
    workgroupBarrier();
    for (var s = 128u; s > 0u; s >>= 1u) {
        if (lid.x < s) {
            partial[lid.x] += partial[lid.x + s];
        }
        workgroupBarrier();
    }
    if (lid.x == 0u) {
        out[wid.x * 3u] = partial[0].x;
        out[wid.x * 3u + 1u] = partial[0].y;
        out[wid.x * 3u + 2u] = partial[0].z;
    }
}
