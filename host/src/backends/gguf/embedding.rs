//! The token embedding, kept as the file stores it.
//!
//! A forward pass reads one embedding row per token: a few rows out of tens
//! or hundreds of thousands. Dequantizing the whole matrix at load, as a
//! dense table, cost a pool more memory than any other weight (Qwen2.5's
//! 151,936 x 896 and Gemma 3's 262,144 x 640 vocabularies, 272 and 335 MB
//! as f16) and a third of its load time (the f32 table built first, then
//! rounded). Here the quantized blocks stay as they are, about half that
//! size for Q8_0, and only the rows a pass asks for are dequantized, to f32
//! as llama.cpp's row lookup does (the dense table rounded them to f16).

use std::sync::Arc;

use candle_core::quantized::{ggml_file, QTensor};
use candle_core::{Device, Result, Tensor};

/// A `rows x cols` embedding matrix in its GGML format; clones share it.
#[derive(Clone)]
pub struct Embedding {
    /// Held on the CPU whatever device the model runs on: rows are
    /// gathered from its bytes.
    weights: Arc<QTensor>,
    rows: usize,
    cols: usize,
    row_bytes: usize,
}

impl std::fmt::Debug for Embedding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Embedding({:?}, {}x{})", self.weights.dtype(), self.rows, self.cols)
    }
}

impl Embedding {
    /// Wraps `weights`, which must live on the CPU and hold whole blocks
    /// per row.
    pub fn new(weights: QTensor) -> Result<Self> {
        let (rows, cols) = weights.shape().dims2()?;
        let dtype = weights.dtype();
        if !matches!(weights.device(), Device::Cpu) {
            candle_core::bail!("the token embedding must be loaded on the CPU");
        }
        if cols % dtype.block_size() != 0 {
            candle_core::bail!(
                "token embedding rows of {cols} values do not hold whole {dtype:?} blocks of {}",
                dtype.block_size()
            );
        }
        let row_bytes = cols / dtype.block_size() * dtype.type_size();
        Ok(Embedding {
            weights: Arc::new(weights),
            rows,
            cols,
            row_bytes,
        })
    }

    /// The rows of `ids` (any shape; flattened), dequantized to f32, as an
    /// `[ids, cols]` tensor on `device`.
    pub fn rows(&self, ids: &Tensor, device: &Device) -> Result<Tensor> {
        let ids = ids.flatten_all()?.to_vec1::<u32>()?;
        let data = self.weights.data()?;
        let mut picked = Vec::with_capacity(ids.len() * self.row_bytes);
        for &id in &ids {
            let at = id as usize * self.row_bytes;
            match data.get(at..at + self.row_bytes) {
                Some(row) if (id as usize) < self.rows => picked.extend_from_slice(row),
                _ => candle_core::bail!("token id {id} is outside the embedding's {} rows", self.rows),
            }
        }
        if ids.is_empty() {
            return Tensor::zeros((0, self.cols), candle_core::DType::F32, device);
        }
        let q = ggml_file::qtensor_from_ggml(self.weights.dtype(), &picked, vec![ids.len(), self.cols], &Device::Cpu)?;
        q.dequantize(&Device::Cpu)?.to_device(device)
    }

    /// Bytes the embedding holds.
    pub fn bytes(&self) -> usize {
        self.rows * self.row_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::GgmlDType;

    /// Rows looked up equal the same rows of the whole matrix dequantized,
    /// for a block format and a plain one; an id past the end is an error.
    #[test]
    fn rows_are_the_dequantized_rows() {
        let dev = Device::Cpu;
        // Q4_K blocks hold 256 values, the others 32 or 1.
        for (dtype, cols) in [(GgmlDType::Q8_0, 64), (GgmlDType::Q4K, 256), (GgmlDType::F16, 64)] {
            let w = Tensor::randn(0f32, 1.0, (40, cols), &dev).expect("randn");
            let q = QTensor::quantize(&w, dtype).expect("quantizes");
            let whole = q.dequantize(&dev).expect("dequantizes");
            let e = Embedding::new(q).expect("wraps");
            let ids = Tensor::new(&[[3u32, 0], [39, 3]], &dev).expect("ids");
            let got = e.rows(&ids, &dev).expect("rows").to_vec2::<f32>().expect("vec");
            let want = whole
                .index_select(&Tensor::new(&[3u32, 0, 39, 3], &dev).expect("ids"), 0)
                .and_then(|t| t.to_vec2::<f32>())
                .expect("select");
            assert_eq!(got, want, "{dtype:?}");
            let err = e.rows(&Tensor::new(&[40u32], &dev).expect("ids"), &dev).unwrap_err();
            assert!(err.to_string().contains("outside the embedding's 40 rows"), "{err}");
        }
    }
}
