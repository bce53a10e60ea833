//! A decode step's weight traffic, without a model: the projections of a
//! Qwen2.5-1.5B-shaped stack (28 layers; Q4_K with Q6_K `attn_v` and
//! `ffn_down` in every other layer, as the Q4_K_M file keeps them) each
//! in its own memory, multiplied by one activation row in layer order,
//! against one matrix as large as all of them. The gap between the two is
//! what per-matrix calls cost a real decode step.
//! `cargo run --release -p tessera-kernels --example stream [layers reps]`.

use std::time::Instant;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use tessera_kernels::lowbit::{self, Format, Packed};

fn pack(dev: &Device, n: usize, k: usize, q6: bool) -> (Format, Vec<u8>) {
    let w = Tensor::randn(0f32, 1.0, (n, k), dev).expect("randn");
    let (dtype, format) = if q6 {
        (GgmlDType::Q6K, Format::Q6K)
    } else {
        (GgmlDType::Q4K, Format::Q4K)
    };
    let qt = QTensor::quantize(&w, dtype).expect("quantizes");
    (format, qt.data().expect("data").to_vec())
}

fn main() {
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let (layers, reps) = match args[..] {
        [l, r] => (l, r),
        _ => (28, 20),
    };
    let dev = Device::Cpu;
    let (h, kv, ff) = (1536, 256, 8960);
    // (outputs, inputs, Q6_K in even layers)
    let shapes = [
        (h, h, false),
        (kv, h, false),
        (kv, h, true),
        (h, h, false),
        (ff, h, false),
        (ff, h, false),
        (h, ff, true),
    ];
    let q4: Vec<_> = shapes.iter().map(|&(n, k, _)| pack(&dev, n, k, false)).collect();
    let q6: Vec<_> = shapes
        .iter()
        .map(|&(n, k, six)| six.then(|| pack(&dev, n, k, true)))
        .collect();
    let mut stack = Vec::new();
    for l in 0..layers {
        for (i, &(n, k, _)) in shapes.iter().enumerate() {
            let (format, bytes) = match &q6[i] {
                Some(b) if l % 2 == 0 => b,
                _ => &q4[i],
            };
            stack.push(Packed::new(*format, bytes, n, k).expect("packs"));
        }
    }
    let total: usize = stack.iter().map(Packed::bytes).sum();
    let xs: Vec<Vec<f32>> = [h, ff]
        .iter()
        .map(|&k| (0..k).map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0).collect())
        .collect();
    let x_for = |k: usize| if k == h { &xs[0] } else { &xs[1] };
    let step = || {
        for w in &stack {
            std::hint::black_box(lowbit::matmul(w, x_for(w.cols()), 1));
        }
    };
    step();
    let t = Instant::now();
    for _ in 0..reps {
        step();
    }
    let per = t.elapsed().as_secs_f64() / reps as f64;
    // Each shape's share, timed matrix by matrix.
    let mut spent = vec![0f64; shapes.len()];
    let mut read = vec![0usize; shapes.len()];
    for _ in 0..reps {
        for (i, w) in stack.iter().enumerate() {
            let t = Instant::now();
            std::hint::black_box(lowbit::matmul(w, x_for(w.cols()), 1));
            spent[i % shapes.len()] += t.elapsed().as_secs_f64();
            read[i % shapes.len()] += w.bytes();
        }
    }
    for (i, (n, k, _)) in shapes.iter().enumerate() {
        println!(
            "  {n}x{k}: {:.2} ms per step, {:.1} GB/s",
            spent[i] / reps as f64 * 1e3,
            read[i] as f64 / spent[i] / 1e9
        );
    }
    println!(
        "stack: {} matrices, {} MB: {:.2} ms per step, {:.1} GB/s",
        stack.len(),
        total >> 20,
        per * 1e3,
        total as f64 / per / 1e9
    );
    // One matrix of about the same bytes, for the ceiling.
    let rows = (total / (h / 256 * 144 + 64)).next_multiple_of(256);
    let (format, bytes) = pack(&dev, 256, h, false);
    let mut big_bytes = Vec::with_capacity(bytes.len() * rows / 256);
    for _ in 0..rows / 256 {
        big_bytes.extend_from_slice(&bytes);
    }
    let big = Packed::new(format, &big_bytes, rows / 256 * 256, h).expect("packs");
    drop(big_bytes);
    let _ = lowbit::matmul(&big, &xs[0], 1);
    let t = Instant::now();
    for _ in 0..reps {
        std::hint::black_box(lowbit::matmul(&big, &xs[0], 1));
    }
    let per = t.elapsed().as_secs_f64() / reps as f64;
    println!(
        "one matrix: {} MB: {:.2} ms per product, {:.1} GB/s",
        big.bytes() >> 20,
        per * 1e3,
        big.bytes() as f64 / per / 1e9
    );
}
