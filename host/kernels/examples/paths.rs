//! Every kernel path this CPU has against candle's quantized matmul, for
//! decode-shaped (1-4 rows) and prompt-shaped (16-128 rows) products:
//! `cargo run --release -p tessera-kernels --example paths [n k]`. Prints
//! microseconds per product and multiply-adds per second, so that a CPU
//! without AVX-512 (where [`vnni::Simd::Avx2`] runs) can be compared with
//! candle's path on the same shapes.

use std::time::Instant;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use tessera_kernels::vnni::Simd;
use tessera_kernels::{lowbit, vnni};

fn time(f: impl Fn() -> usize) -> f64 {
    let _ = f();
    let t = Instant::now();
    let mut reps = 0;
    while t.elapsed().as_secs_f64() < 0.3 {
        std::hint::black_box(f());
        reps += 1;
    }
    t.elapsed().as_secs_f64() / reps as f64
}

fn main() {
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let (n, k) = match args[..] {
        [n, k] => (n, k),
        _ => (640, 2048),
    };
    let dev = Device::Cpu;
    println!("{n}x{k}, best path here: {:?}", Simd::best());
    let w = Tensor::randn(0f32, 1.0, (n, k), &dev).expect("randn");
    for m in [1, 4, 16, 128] {
        let x = Tensor::randn(0f32, 1.0, (m, k), &dev).expect("randn");
        let xs: Vec<f32> = x.flatten_all().expect("flat").to_vec1().expect("vec");
        let macs = (m * n * k) as f64;
        let report =
            |what: &str, s: f64| println!("m={m:3} {what:28} {:9.1} us {:6.1} GMAC/s", s * 1e6, macs / s / 1e9);
        for dtype in [GgmlDType::Q8_0, GgmlDType::Q4_1, GgmlDType::Q4K, GgmlDType::Q6K] {
            if dtype.block_size() > 32 && !k.is_multiple_of(dtype.block_size()) {
                continue;
            }
            let qt = QTensor::quantize(&w, dtype).expect("quantizes");
            let mm = QMatMul::from_qtensor(qt).expect("qmatmul");
            report(
                &format!("candle {dtype:?}"),
                time(|| mm.forward(&x).expect("forward").elem_count()),
            );
        }
        let q8 = QTensor::quantize(&w, GgmlDType::Q8_0).expect("q8");
        let packed = vnni::Packed::from_q8_0(&q8.data().expect("data"), n, k).expect("packs");
        let q41 = QTensor::quantize(&w, GgmlDType::Q4_1).expect("q4_1");
        let low = lowbit::Packed::new(lowbit::Format::Q4_1, &q41.data().expect("data"), n, k).expect("packs");
        let q50 = QTensor::quantize(&w, GgmlDType::Q5_0).expect("q5_0");
        let five = lowbit::Packed::new(lowbit::Format::Q5_0, &q50.data().expect("data"), n, k).expect("packs");
        for simd in Simd::here() {
            if simd == Simd::Portable && m > 4 {
                continue;
            }
            report(
                &format!("ours Q8_0 {simd:?}"),
                time(|| vnni::matmul_on(simd, &packed, &xs, m).len()),
            );
            report(
                &format!("ours Q4_1 {simd:?}"),
                time(|| lowbit::matmul_on(simd, &low, &xs, m).len()),
            );
            report(
                &format!("ours Q5_0 {simd:?}"),
                time(|| lowbit::matmul_on(simd, &five, &xs, m).len()),
            );
        }
    }
}
