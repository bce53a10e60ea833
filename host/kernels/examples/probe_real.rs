//! The accuracy of one real weight matrix's products on each kernel,
//! against the exact product of its stored values in f64: `cargo run
//! --release -p tessera-kernels --example probe_real FILE.gguf [TENSOR]`
//! (a Q4_1/Q5_0/Q5_1 tensor; default `blk.0.ffn_down.weight`). Two rows of
//! normal activations with every 97th value 30 times larger (real
//! activations have such outliers) go through the low-bit kernel on the
//! stored values, the packed Q8_0 kernel on a Q8_0 re-encoding, and
//! candle's own kernel for the format; each prints its largest error
//! relative to the largest exact output.

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use tessera_kernels::{lowbit, vnni};
fn main() {
    // An example's input is the person running it: panics name the problem.
    let path = std::env::args().nth(1).unwrap();
    let name = std::env::args().nth(2).unwrap_or("blk.0.ffn_down.weight".into());
    let mut f = std::fs::File::open(&path).unwrap();
    let c = gguf_file::Content::read(&mut f).unwrap();
    let qt = c.tensor(&mut f, &name, &Device::Cpu).unwrap();
    let (n, k) = qt.shape().dims2().unwrap();
    println!("{name} {:?} {n}x{k}", qt.dtype());
    let dense: Vec<f32> = qt
        .dequantize(&Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let m = 2;
    let mut x: Vec<f32> = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    for (i, v) in x.iter_mut().enumerate() {
        if i % 97 == 0 {
            *v *= 30.0;
        }
    }
    let exact: Vec<f64> = (0..m * n)
        .map(|o| {
            let (r, j) = (o / n, o % n);
            (0..k).map(|i| x[r * k + i] as f64 * dense[j * k + i] as f64).sum()
        })
        .collect();
    let err = |y: &[f32]| {
        let s = exact.iter().fold(0f64, |a, v| a.max(v.abs()));
        y.iter()
            .zip(&exact)
            .map(|(a, b)| (*a as f64 - b).abs())
            .fold(0f64, f64::max)
            / s
    };
    let fmt = match qt.dtype() {
        GgmlDType::Q4_1 => lowbit::Format::Q4_1,
        GgmlDType::Q5_0 => lowbit::Format::Q5_0,
        _ => lowbit::Format::Q5_1,
    };
    let low = lowbit::Packed::new(fmt, &qt.data().unwrap(), n, k).unwrap();
    let y1 = lowbit::matmul(&low, &x, m);
    let q8 = QTensor::quantize(&qt.dequantize(&Device::Cpu).unwrap(), GgmlDType::Q8_0).unwrap();
    let p8 = vnni::Packed::from_q8_0(&q8.data().unwrap(), n, k).unwrap();
    let y2 = vnni::matmul(&p8, &x, m);
    let mm = candle_core::quantized::QMatMul::from_qtensor(qt).unwrap();
    let xt = Tensor::from_vec(x.clone(), (m, k), &Device::Cpu).unwrap();
    let y3: Vec<f32> = candle_core::Module::forward(&mm, &xt)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    println!(
        "max rel err: lowbit {:.2e}  q8_0 copy {:.2e}  candle own {:.2e}",
        err(&y1),
        err(&y2),
        err(&y3)
    );
}
