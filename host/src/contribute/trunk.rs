//! The frozen trunk of a top-layers fine-tune, on the inference kernels.
//!
//! Training the LoRA adapters of the last few layers only (`--top-layers`)
//! leaves every layer below them frozen: nothing there needs a gradient,
//! so those layers are a plain forward pass, the same one a prompt's
//! prefill runs. The trainer's own model is f32 and differentiable, which
//! is the right tool above the trunk and a slow one below it; the
//! inference model ([`crate::backends::gguf::llama`]) runs the same layers
//! on the quantized weights with the int8 (VNNI) or bf16 (AMX) prompt
//! kernels, several times faster on a CPU. So the trunk's output (the
//! residual stream entering the first trained layer) comes from the
//! pool member's GGUF file, and the trainer starts from it.
//!
//! This is the QLoRA arrangement (Dettmers et al., 2023: adapters trained
//! over a quantized frozen base): the trained layers see the activations
//! the quantized member produces, which is also what the member computes
//! when it answers. The numbers differ from the f32 trunk's by the weights'
//! and activations' rounding; `tests/all/contribute.rs` measures how much.

use std::fs::File;
use std::path::Path;

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};

use super::data::Example;
use crate::backends::gguf::llama::{KvState, Llama};

/// The first layers of a llama-family GGUF member, run forward only.
pub struct Trunk {
    model: Llama,
    layers: usize,
    /// The tokens every example starts with (the chat template's head:
    /// system prompt and the user turn's opening, often a third of a short
    /// example), their rows and the trunk's caches after them: computed
    /// once, since causal attention makes them the same in every example.
    prefix: Option<(Vec<u32>, Tensor, KvState)>,
}

impl Trunk {
    /// Loads `gguf` (a `llama` or `qwen2` file) for a trunk of its first
    /// `layers` layers over sequences of at most `positions` tokens.
    pub fn load(gguf: &Path, layers: usize, positions: usize) -> Result<Self, String> {
        let shown = gguf.display().to_string();
        let mut file = File::open(gguf).map_err(|e| format!("{shown}: {e}"))?;
        let content =
            gguf_file::Content::read(&mut file).map_err(|e| format!("{shown}: not a readable GGUF file: {e}"))?;
        let arch = crate::backends::gguf::architecture(&content, &shown)?;
        if !matches!(arch.as_str(), "llama" | "qwen2") {
            return Err(format!(
                "{shown}: architecture `{arch}` has no trunk (llama and qwen2 do)"
            ));
        }
        let model = Llama::from_gguf(&arch, &content, &mut file, positions.max(1), &Device::Cpu)
            .map_err(|e| format!("{shown}: {e}"))?;
        Ok(Self {
            model,
            layers,
            prefix: None,
        })
    }

    /// Runs the tokens all of `examples` start with once, for reuse by
    /// [`Trunk::hidden`]. The shared run stops one token short of the
    /// shortest example's inputs, so every example keeps a token of its own.
    pub fn share_prefix(&mut self, examples: &[Example]) -> candle_core::Result<()> {
        let Some(first) = examples.first() else {
            return Ok(());
        };
        let mut n = first.ids.len();
        for e in examples {
            n = n.min(e.ids.len().saturating_sub(2));
            n = first.ids.iter().zip(&e.ids).take(n).take_while(|(a, b)| a == b).count();
        }
        self.prefix = None;
        if n > 0 {
            let ids = first.ids[..n].to_vec();
            let (rows, state) = self
                .model
                .hidden_after(&Vec::new(), &ids, 0, self.layers, &Device::Cpu)?;
            self.prefix = Some((ids, rows, state));
        }
        Ok(())
    }

    /// How many tokens [`Trunk::share_prefix`] found common.
    pub fn shared_tokens(&self) -> usize {
        self.prefix.as_ref().map_or(0, |p| p.0.len())
    }

    /// The residual stream entering layer `layers` for each example's
    /// inputs (its tokens but the last), rows padded with zeros to `len`
    /// per example: `[examples * len, hidden]`, the layout
    /// [`super::model::TrainModel::nll_sum`] takes. Padding rows follow
    /// every real row and are masked out of the loss, and causal attention
    /// keeps them from reaching a real one.
    pub fn hidden(&self, examples: &[&Example], len: usize) -> candle_core::Result<Tensor> {
        let device = Device::Cpu;
        let mut rows = Vec::with_capacity(examples.len() * 3);
        for e in examples {
            let n = e.ids.len().saturating_sub(1).min(len);
            let ids = &e.ids[..n];
            match &self.prefix {
                Some((p, head, state)) if ids.len() > p.len() && ids.starts_with(p) => {
                    rows.push(head.clone());
                    rows.push(
                        self.model
                            .hidden_after(state, &ids[p.len()..], p.len(), self.layers, &device)?
                            .0,
                    );
                }
                _ if n > 0 => rows.push(self.model.hidden_after(&Vec::new(), ids, 0, self.layers, &device)?.0),
                _ => {}
            }
            if len > n {
                rows.push(Tensor::zeros(
                    (len - n, self.model.hidden_size()),
                    candle_core::DType::F32,
                    &device,
                )?);
            }
        }
        Tensor::cat(&rows, 0)
    }
}
