//! Weight formats candle computes fast on the CPU.
//!
//! candle has SIMD dot products for Q4_0, Q8_0 and the K-quants, but only
//! scalar code for Q4_1, Q5_0 and Q5_1, which the default pool's files use
//! (SmolLM2 is Q4_1 throughout; Qwen and Gemma use Q5_0 for many matrices).
//! Profiling showed those scalar loops taking over half of all decode time.
//! Such tensors are re-encoded once at load as Q8_0: every Q4_1/Q5_x value
//! sits within 1/254 of its block's range of a Q8_0 level, far below the
//! models' own quantization error, and the matmul then runs on AVX2. The
//! price is memory: those tensors grow from 5-6 to 8.5 bits per weight.

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Result};

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

/// A matmul over `qt`, re-encoded first if its format is slow.
pub fn matmul(qt: QTensor, device: &Device) -> Result<QMatMul> {
    QMatMul::from_qtensor(fast(qt, device)?)
}
