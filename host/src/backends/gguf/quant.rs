//! Weight formats and kernels that multiply fast on the CPU.
//!
//! * **Format.** candle has SIMD dot products for Q4_0, Q8_0 and the
//!   K-quants, but only scalar code for Q4_1, Q5_0 and Q5_1, which the default
//!   pool's files use (SmolLM2 is Q4_1 throughout; Qwen and Gemma use Q5_0 for
//!   many matrices). Where the CPU has AVX-512 VNNI or AVX2 those are
//!   multiplied as stored by our own kernel ([`tessera_kernels::lowbit`]): a decode step
//!   reads every weight once, so 5-6 bits per weight instead of a Q8_0
//!   copy's 8.5 is that much less memory traffic. Elsewhere they are
//!   re-encoded once at load as Q8_0 for candle's SIMD path: every
//!   Q4_1/Q5_x value sits within 1/254 of its block's range of a Q8_0
//!   level, far below the models' own quantization error.
//! * **Batch independence.** Batched decoding promises each sequence the
//!   logits it would get alone, so a row's product must not depend on the
//!   other rows of the call. candle multiplies a single row of Q6_K by a
//!   different kernel (and float summation order) than several rows; a
//!   single row is therefore sent with a zero row beside it.
//! * **Kernel.** Q8_0 matrices go to our kernel ([`tessera_kernels::vnni`],
//!   AVX-512 VNNI or AVX2, whichever the CPU has): candle's own VNNI path
//!   needs input widths that are multiples of 256, which the default pool's
//!   hidden sizes are not, and its one-row-at-a-time AVX2 path was 70% of
//!   all inference time. Ours shares each weight load among up to four
//!   activation rows, so without AMX it also carries prompt passes.
//!   Q4_K and Q5_K go to the low-bit kernel too, as the Q4_1/Q5_1 blocks
//!   their sub-blocks are (4.75-5.75 bits per weight read for their
//!   4.5-5.5 stored): the 1.5B monolith's prompts ran about 1.35x as fast
//!   as on candle's kernel without AMX (benches/RESULTS.md). So does
//!   Q6_K, at 6.75 bits for its 6.5625, where candle walked the weights
//!   once per activation row (twice for one row, padded as above). Other
//!   CPUs and other devices stay on candle's `QMatMul`.
//! * **Prompts on tiles.** A prompt pass of 16 or more rows goes to the AMX
//!   bf16 tile kernel ([`tessera_kernels::amx::matmul_bf16`]) where the CPU
//!   and OS allow it, on a bf16 copy of the weights made at load (2 bytes
//!   per weight more; dequantizing on every pass cost as much as the
//!   products for 100-token prompts): Q8_0 matrices from their packing,
//!   the other formats from their exact values (decode keeps reading the
//!   stored format, which is fewer bytes). The output projection, which
//!   prompts multiply by their last row only, gets no copy. Decode steps
//!   always take the decode kernel ([`Linear::forward_decode`]), so a
//!   sequence's logits do not depend on its batch; a prompt's rows do not
//!   depend on each other on either kernel. The tile kernel rounds
//!   activations to bf16 where the decode kernels quantize them per 32 as
//!   Q8_0, so a prompt shorter than 16 tokens and a longer one run on
//!   different numerics (both within the llama.cpp parity fixtures'
//!   tolerance).

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Result, Tensor, D};

use tessera_kernels::{amx, lowbit, vnni};

/// Whether candle's CPU kernels for `dtype` are scalar-only.
fn is_slow(dtype: GgmlDType) -> bool {
    matches!(dtype, GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1)
}

/// `qt` in a format candle multiplies with SIMD, re-encoded if needed.
pub fn fast(qt: QTensor, device: &Device) -> Result<QTensor> {
    if !is_slow(qt.dtype()) {
        return Ok(qt);
    }
    let dense = qt.dequantize(device)?;
    QTensor::quantize(&dense, GgmlDType::Q8_0)
}

/// A quantized projection `x -> x W^T` on the fastest kernel for its format
/// and this CPU (see the module docs).
#[derive(Debug, Clone)]
pub enum Linear {
    /// candle's quantized matmul; single rows padded to `min_rows`.
    Candle {
        mm: QMatMul,
        min_rows: usize,
        prompt: Prompt,
    },
    /// Q8_0 weights repacked for the VNNI kernel.
    Vnni { w: Arc<vnni::Packed>, prompt: Prompt },
    /// Q4_1/Q5_0/Q5_1 weights repacked at their own width, Q4_K/Q5_K as
    /// the Q4_1/Q5_1 blocks of their sub-blocks, Q6_K as blocks of two
    /// 16-value halves.
    LowBit { w: Arc<lowbit::Packed>, prompt: Prompt },
}

/// The [`lowbit`] kernel's name for a stored format it reads.
fn low_bit(dtype: GgmlDType) -> Option<lowbit::Format> {
    match dtype {
        GgmlDType::Q4_1 => Some(lowbit::Format::Q4_1),
        GgmlDType::Q5_0 => Some(lowbit::Format::Q5_0),
        GgmlDType::Q5_1 => Some(lowbit::Format::Q5_1),
        GgmlDType::Q4K => Some(lowbit::Format::Q4K),
        GgmlDType::Q5K => Some(lowbit::Format::Q5K),
        GgmlDType::Q6K => Some(lowbit::Format::Q6K),
        _ => None,
    }
}

/// A bf16 tile copy of `qt`'s exact values for prompt passes.
fn exact_tiles(qt: &QTensor, device: &Device, n: usize, k: usize) -> Result<Prompt> {
    let dense: Vec<f32> = qt.dequantize(device)?.flatten_all()?.to_vec1()?;
    Ok(amx::Bf16Packed::from_f32(&dense, n, k).map(Arc::new))
}

/// The same weights as bf16 tiles for prompt passes, where the CPU has
/// them (`None` elsewhere, and for matrices only ever multiplied by one
/// row, such as the output projection).
type Prompt = Option<Arc<amx::Bf16Packed>>;

impl Linear {
    /// `qt` re-encoded if its format is slow, on the VNNI kernel where it
    /// applies.
    pub fn new(qt: QTensor, device: &Device) -> Result<Self> {
        Self::choose(qt, device, vnni::available(), true)
    }

    /// As [`Linear::new`] for a matrix that only ever sees one row at a
    /// time (no bf16 copy for prompts).
    pub fn decode_only(qt: QTensor, device: &Device) -> Result<Self> {
        Self::choose(qt, device, vnni::available(), false)
    }

    /// As [`Linear::new`], with the kernel choices given (tests compare
    /// them): `vnni` for the decode kernel, `prompts` for a bf16 copy that
    /// prompt passes use where the CPU has AMX.
    pub fn choose(qt: QTensor, device: &Device, vnni: bool, prompts: bool) -> Result<Self> {
        let (n, k) = qt.shape().dims2()?;
        let tiles = prompts && device.is_cpu() && amx::bf16_available() && vnni::fits(n, k);
        if let Some(format) = low_bit(qt.dtype()).filter(|_| vnni && device.is_cpu()) {
            if let Some(packed) = lowbit::Packed::new(format, &qt.data()?, n, k) {
                let prompt = if tiles { exact_tiles(&qt, device, n, k)? } else { None };
                return Ok(Linear::LowBit {
                    w: Arc::new(packed),
                    prompt,
                });
            }
        }
        let qt = fast(qt, device)?;
        if vnni && device.is_cpu() && qt.dtype() == GgmlDType::Q8_0 && vnni::fits(n, k) {
            if let Some(packed) = vnni::Packed::from_q8_0(&qt.data()?, n, k) {
                let prompt = match tiles {
                    true => amx::Bf16Packed::from_packed(&packed).map(Arc::new),
                    false => None,
                };
                return Ok(Linear::Vnni {
                    w: Arc::new(packed),
                    prompt,
                });
            }
        }
        let min_rows = if device.is_cpu() && qt.dtype() == GgmlDType::Q6K {
            2
        } else {
            1
        };
        let prompt = if tiles { exact_tiles(&qt, device, n, k)? } else { None };
        Ok(Linear::Candle {
            mm: QMatMul::from_qtensor(qt)?,
            min_rows,
            prompt,
        })
    }

    /// The projection for a decode step: always the decode kernel (VNNI or
    /// candle), whatever the number of rows, so that a sequence's logits do
    /// not depend on how many others share its batch.
    pub fn forward_decode(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Linear::Candle { mm, min_rows, .. } => candle_rows(mm, *min_rows, x),
            Linear::Vnni { w, .. } => packed(w.cols(), w.rows(), x, |xs, m| vnni::matmul(w, xs, m)),
            Linear::LowBit { w, .. } => packed(w.cols(), w.rows(), x, |xs, m| lowbit::matmul(w, xs, m)),
        }
    }
}

/// The most rows candle's decode kernels take in one call: from 32 rows
/// candle 0.11 multiplies Q4_K on its own AMX tiles, whose sums differ from
/// its few-row kernel's, so a larger decode batch is multiplied in groups.
const CANDLE_DECODE_ROWS: usize = 16;

/// candle's product, single rows padded to `min_rows` (see the module docs),
/// at most [`CANDLE_DECODE_ROWS`] rows per call.
fn candle_rows(mm: &QMatMul, min_rows: usize, x: &Tensor) -> Result<Tensor> {
    let k = x.dim(D::Minus1)?;
    let rows = x.elem_count() / k.max(1);
    if rows > CANDLE_DECODE_ROWS {
        let flat = x.reshape((rows, k))?;
        let mut parts = Vec::with_capacity(rows.div_ceil(CANDLE_DECODE_ROWS));
        for start in (0..rows).step_by(CANDLE_DECODE_ROWS) {
            let n = CANDLE_DECODE_ROWS.min(rows - start);
            parts.push(candle_rows(mm, min_rows, &flat.narrow(0, start, n)?)?);
        }
        let y = Tensor::cat(&parts, 0)?;
        let mut dims = x.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = y.dim(1)?;
        }
        return y.reshape(dims);
    }
    if rows >= min_rows {
        return mm.forward(x);
    }
    let mut dims = x.dims().to_vec();
    let padded = x.reshape((rows, k))?.pad_with_zeros(0, 0, min_rows - rows)?;
    let y = mm.forward(&padded)?.narrow(0, 0, rows)?;
    if let Some(last) = dims.last_mut() {
        *last = y.dim(1)?;
    }
    y.reshape(dims)
}

/// `x W^T` for a `rows x cols` matrix through `kernel` (rows of `x`, their
/// count -> outputs), keeping `x`'s leading dims.
fn packed(cols: usize, rows: usize, x: &Tensor, kernel: impl Fn(&[f32], usize) -> Vec<f32>) -> Result<Tensor> {
    let mut dims = x.dims().to_vec();
    let k = dims.pop().unwrap_or(0);
    if k != cols {
        candle_core::bail!("projection expects {cols} inputs, got shape {:?}", x.dims());
    }
    let m = dims.iter().product::<usize>();
    let xs: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    dims.push(rows);
    Tensor::from_vec(kernel(&xs, m), dims, x.device())
}

/// Rows of activations in `x` (all dims but the last).
fn rows_of(x: &Tensor) -> Result<usize> {
    let k = x.dim(D::Minus1)?;
    Ok(x.elem_count() / k.max(1))
}

impl Linear {
    /// The projection for part of a prompt chunk of `chunk_rows` rows: the
    /// kernel is the one the whole chunk would take ([`Module::forward`]),
    /// whatever number of its rows `x` holds. A prompt whose beginning came
    /// from the prefix cache runs only its remaining rows, and they must
    /// take the kernel they would have taken in the full chunk for the
    /// logits to be the same as without the cache (rows do not depend on
    /// each other on either kernel).
    pub fn forward_chunk(&self, x: &Tensor, chunk_rows: usize) -> Result<Tensor> {
        match self {
            Linear::Candle { prompt: Some(w), .. }
            | Linear::Vnni { prompt: Some(w), .. }
            | Linear::LowBit { prompt: Some(w), .. }
                if chunk_rows >= amx::MIN_ROWS =>
            {
                packed(w.cols(), w.rows(), x, |xs, m| amx::matmul_bf16(w, xs, m))
            }
            _ => self.forward_decode(x),
        }
    }
}

impl Module for Linear {
    /// The projection for a prompt pass: 16 or more rows go to the bf16
    /// tiles where the CPU has them, fewer to the decode kernel.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_chunk(x, rows_of(x)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_kernels_give_the_same_products() {
        let dev = Device::Cpu;
        for (seed, (rows, cols, dtype)) in [
            (64, 576, GgmlDType::Q8_0),
            (32, 640, GgmlDType::Q4_1),
            (48, 896, GgmlDType::Q5_0),
            (64, 512, GgmlDType::Q4K),
            (32, 768, GgmlDType::Q5K),
            (48, 512, GgmlDType::Q6K),
        ]
        .into_iter()
        .enumerate()
        {
            let seed = seed as u32 * 8;
            let w = normal(&[rows, cols], seed, &dev);
            let q = || QTensor::quantize(&w, dtype).expect("quantizes");
            let plain = Linear::choose(q(), &dev, false, false).expect("plain");
            let fast = Linear::new(q(), &dev).expect("fast");
            assert!(matches!(plain, Linear::Candle { .. }));
            if vnni::available() {
                let own_width = dtype != GgmlDType::Q8_0;
                assert!(
                    matches!(fast, Linear::Vnni { .. }) && !own_width
                        || matches!(fast, Linear::LowBit { .. }) && own_width,
                    "{rows}x{cols} {dtype:?} not on its VNNI kernel"
                );
            }
            // Against the exact product of the stored values in f32: both
            // kernels quantize activations as Q8_0 per 32 (about 0.5% of the
            // largest output here) or, for K-quants, as Q8_K per 256, whose
            // larger step costs about 1.4x that; the plain path re-encodes
            // slow formats as Q8_0, which adds as much error again. A bound
            // of 1% for every fast path failed once in CI on fresh random
            // data; over 200 seeds the largest errors were 1.3% (Q5_0) and
            // 1.6% (Q5_K) for the fast path, 1.8% for the plain one, so the
            // bounds below leave a margin, and the data is seeded.
            let k_quant = matches!(dtype, GgmlDType::Q4K | GgmlDType::Q5K | GgmlDType::Q6K);
            let (plain_tol, fast_tol) = (3e-2, if k_quant { 2e-2 } else { 1.5e-2 });
            let exact = q().dequantize(&dev).expect("dequantizes");
            for (i, shape) in [vec![1, cols], vec![2, 3, cols]].into_iter().enumerate() {
                let x = normal(&shape, seed + 1 + i as u32, &dev);
                let want = x.broadcast_matmul(&exact.t().expect("t")).expect("matmul");
                let scale = want
                    .abs()
                    .expect("abs")
                    .max_all()
                    .expect("max")
                    .to_scalar::<f32>()
                    .expect("scalar")
                    .max(1.0);
                for (name, l, tol) in [("plain", &plain, plain_tol), ("fast", &fast, fast_tol)] {
                    let y = l.forward(&x).expect("forward");
                    assert_eq!(y.dims(), want.dims());
                    let err = (y - &want)
                        .expect("sub")
                        .abs()
                        .expect("abs")
                        .max_all()
                        .expect("max")
                        .to_scalar::<f32>()
                        .expect("scalar");
                    assert!(err <= tol * scale, "{dtype:?} {name}: {err} of {scale}");
                }
            }
        }
    }

    /// Seeded standard-normal values shaped `dims` (Box-Muller over a
    /// multiplicative hash of the index), so a tolerance checked once holds
    /// on every run.
    fn normal(dims: &[usize], seed: u32, dev: &Device) -> Tensor {
        let uniform = |i: u32| {
            let h = i.wrapping_mul(2_654_435_761) ^ seed.wrapping_mul(0x9E37_79B9);
            let h = (h ^ (h >> 15)).wrapping_mul(0x2C1B_3C6D);
            ((h ^ (h >> 12)) >> 8) as f32 / 16_777_216.0
        };
        let n: usize = dims.iter().product();
        let values: Vec<f32> = (0..n as u32)
            .map(|i| {
                let (u, v) = (uniform(2 * i).max(1e-7), uniform(2 * i + 1));
                (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
            })
            .collect();
        Tensor::from_vec(values, dims, dev).expect("shape")
    }

    /// Batched decoding relies on this: a row's product must not depend on
    /// which other rows share the call (per phase: decode steps on the
    /// decode kernel, prompt passes of 16+ rows on the prompt kernel).
    #[test]
    fn rows_do_not_depend_on_their_batch() {
        let dev = Device::Cpu;
        for (rows, cols, dtype) in [
            (64, 576, GgmlDType::Q8_0),
            (64, 896, GgmlDType::Q5_0),
            (64, 576, GgmlDType::Q4_1),
            (64, 512, GgmlDType::Q4K),
            (64, 512, GgmlDType::Q6K),
        ] {
            let w = Tensor::randn(0f32, 1.0, (rows, cols), &dev).expect("randn");
            let l = Linear::new(QTensor::quantize(&w, dtype).expect("quantizes"), &dev).expect("linear");
            let x = Tensor::randn(0f32, 1.0, (40, cols), &dev).expect("randn");
            // Decode steps: 40 sequences together (past candle's switch to
            // its tile kernel at 32 rows), each alone.
            let x17 = x.narrow(0, 0, 17).expect("rows");
            let together: Vec<Vec<f32>> = l.forward_decode(&x).expect("forward").to_vec2().expect("vec");
            for (i, row) in together.iter().enumerate() {
                let alone: Vec<Vec<f32>> = l
                    .forward_decode(&x.narrow(0, i, 1).expect("row"))
                    .expect("forward")
                    .to_vec2()
                    .expect("vec");
                assert_eq!(&alone[0], row, "{rows}x{cols} {dtype:?} decode row {i}");
            }
            // Prompt passes: a row's result is the same in a 17-row pass as
            // in a 40-row one (on the tiles where the CPU has them).
            let short: Vec<Vec<f32>> = l.forward(&x17).expect("forward").to_vec2().expect("vec");
            let long: Vec<Vec<f32>> = l.forward(&x).expect("forward").to_vec2().expect("vec");
            assert_eq!(&long[..17], &short[..], "{rows}x{cols} {dtype:?} prompt rows");
        }
    }

    #[test]
    fn odd_shapes_stay_on_candle() {
        let dev = Device::Cpu;
        for (rows, cols, dtype) in [
            (8, 512, GgmlDType::Q6K),
            (8, 576, GgmlDType::Q8_0),
            (8, 512, GgmlDType::Q4K),
        ] {
            let w = Tensor::randn(0f32, 1.0, (rows, cols), &dev).expect("randn");
            let l = Linear::new(QTensor::quantize(&w, dtype).expect("quantizes"), &dev).expect("linear");
            assert!(matches!(l, Linear::Candle { .. }), "{rows}x{cols} {dtype:?}");
        }
    }
}
