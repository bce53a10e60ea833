//! Decode-shaped products (1-4 rows) on a matrix stored as Q4_1 / Q5_0:
//! at its own width ([`tessera_kernels::lowbit`]) against the Q8_0 copy
//! the VNNI kernel reads; then Q4_K / Q5_K / Q6_K on the same kernel against
//! candle's own K-quant kernels, for 1, 4 and 64 rows (a prompt chunk).
//! `cargo run --release -p tessera-kernels --example lowbit [n k]`. Prints
//! microseconds per product and the weight bytes read per second.

use std::time::Instant;

use candle_core::quantized::QMatMul;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Module, Tensor};
use tessera_kernels::{lowbit, vnni};

fn time(reps: usize, f: impl Fn() -> Vec<f32>) -> f64 {
    let _ = f();
    let t = Instant::now();
    for _ in 0..reps {
        std::hint::black_box(f());
    }
    t.elapsed().as_secs_f64() / reps as f64
}

/// One line: each side's time per product, the weight bytes it read per
/// second, and the second's time over the first's.
fn report(what: &str, (a_name, a, a_bytes): (&str, f64, usize), (b_name, b, b_bytes): (&str, f64, usize)) {
    let side = |name: &str, secs: f64, bytes: usize| {
        format!(
            "{name} {:.1} us ({:.1} GB/s of {} MB)",
            secs * 1e6,
            bytes as f64 / secs / 1e9,
            bytes >> 20
        )
    };
    println!(
        "{what}: {}, {}: {:.2}x",
        side(a_name, a, a_bytes),
        side(b_name, b, b_bytes),
        b / a
    );
}

fn main() {
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let (n, k) = match args[..] {
        [n, k] => (n, k),
        _ => (49152, 576),
    };
    let dev = Device::Cpu;
    let w = Tensor::randn(0f32, 1.0, (n, k), &dev).expect("randn");
    for (dtype, format) in [
        (GgmlDType::Q4_1, lowbit::Format::Q4_1),
        (GgmlDType::Q5_0, lowbit::Format::Q5_0),
    ] {
        let qt = QTensor::quantize(&w, dtype).expect("quantizes");
        let low = lowbit::Packed::new(format, &qt.data().expect("data"), n, k).expect("packs");
        let q8 = QTensor::quantize(&qt.dequantize(&dev).expect("dequantizes"), GgmlDType::Q8_0).expect("q8");
        let wide = vnni::Packed::from_q8_0(&q8.data().expect("data"), n, k).expect("packs");
        let wide_bytes = n * k / 32 * (32 + 4);
        for m in [1, 4] {
            let x: Vec<f32> = Tensor::randn(0f32, 1.0, (m, k), &dev)
                .expect("randn")
                .flatten_all()
                .expect("flat")
                .to_vec1()
                .expect("vec");
            let reps = 200;
            let a = time(reps, || lowbit::matmul(&low, &x, m));
            let b = time(reps, || vnni::matmul(&wide, &x, m));
            report(
                &format!("{format:?} {n}x{k} m={m}"),
                ("own width", a, low.bytes()),
                ("Q8_0 copy", b, wide_bytes),
            );
        }
    }
    if !k.is_multiple_of(256) {
        println!("(K-quants need a width of whole 256-value super-blocks: {k} is not)");
        return;
    }
    for (dtype, format) in [
        (GgmlDType::Q4K, lowbit::Format::Q4K),
        (GgmlDType::Q5K, lowbit::Format::Q5K),
        (GgmlDType::Q6K, lowbit::Format::Q6K),
    ] {
        let qt = QTensor::quantize(&w, dtype).expect("quantizes");
        let stored = qt.storage_size_in_bytes();
        let low = lowbit::Packed::new(format, &qt.data().expect("data"), n, k).expect("packs");
        let candle = QMatMul::from_qtensor(qt).expect("qmatmul");
        for m in [1, 4, 64] {
            let xt = Tensor::randn(0f32, 1.0, (m, k), &dev).expect("randn");
            let x: Vec<f32> = xt.flatten_all().expect("flat").to_vec1().expect("vec");
            let reps = if m == 64 { 20 } else { 200 };
            let a = time(reps, || lowbit::matmul(&low, &x, m));
            let b = time(reps, || {
                candle
                    .forward(&xt)
                    .expect("forward")
                    .flatten_all()
                    .expect("flat")
                    .to_vec1()
                    .expect("vec")
            });
            report(
                &format!("{format:?} {n}x{k} m={m}"),
                ("lowbit", a, low.bytes()),
                ("candle", b, stored),
            );
        }
    }
}
