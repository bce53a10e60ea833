//! Throughput of the Q8_0 kernels on one prefill-shaped product:
//! `cargo run --release -p tessera-kernels --example gemm [m n k]`.
//! Prints achieved int8 tera-operations per second for the VNNI and AMX
//! paths (two operations per multiply-add).

use std::time::Instant;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use tessera_kernels::{amx, vnni};

/// A product over packed weights: (weights, rows, row count) -> outputs.
type Kernel<'a> = dyn Fn(&vnni::Packed, &[f32], usize) -> Vec<f32> + 'a;

fn main() {
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let (m, n, k) = match args[..] {
        [m, n, k] => (m, n, k),
        _ => (512, 1536, 576),
    };
    let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).expect("randn");
    let qt = QTensor::quantize(&w, GgmlDType::Q8_0).expect("quantizes");
    let packed = vnni::Packed::from_q8_0(&qt.data().expect("data"), n, k).expect("packs");
    let x: Vec<f32> = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu)
        .expect("randn")
        .flatten_all()
        .expect("flat")
        .to_vec1()
        .expect("vec");
    println!("m={m} n={n} k={k} amx available: {}", amx::available());
    let ops = 2.0 * (m * n * k) as f64;
    let only = std::env::var("ONLY").ok();
    let bf16 = amx::Bf16Packed::from_packed(&packed);
    let on_bf16 = |_: &vnni::Packed, x: &[f32], m: usize| match &bf16 {
        Some(w) => amx::matmul_bf16(w, x, m),
        None => vnni::matmul(&packed, x, m),
    };
    let kernels: [(&str, &Kernel); 3] = [
        ("vnni", &vnni::matmul),
        ("amx int8", &amx::matmul),
        ("amx bf16", &on_bf16),
    ];
    for (name, f) in kernels {
        if only.as_deref().is_some_and(|o| o != name) {
            continue;
        }
        let _ = f(&packed, &x, m);
        let reps = 200;
        let t = Instant::now();
        for _ in 0..reps {
            std::hint::black_box(f(&packed, &x, m));
        }
        let s = t.elapsed().as_secs_f64() / reps as f64;
        println!("{name}: {:.3} ms  {:.3} TOPS", s * 1e3, ops / s / 1e12);
    }
}
