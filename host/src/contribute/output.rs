//! The trained model folder, its contributor card, and adding it to a pool.
//!
//! The folder is a Hugging Face directory the pool loads with
//! `backend = "hf"`: `model.safetensors` (f32, LoRA merged in: a small
//! update would vanish in f16 rounding), `config.json`, `tokenizer.json`
//! and `tokenizer_config.json` from the base. With `--adapter`, the LoRA
//! adapter stays apart instead (`adapter.safetensors` + `adapter.toml`
//! naming the base and its sha256; see [`crate::backends::gguf::adapter`]). Next to it:
//! `contributor.toml` (the card, the weights' sha256 and how they were
//! trained), `loss.svg` and `train-log.jsonl`.

use std::path::{Path, PathBuf};

use plotters::prelude::*;

use super::train::{TrainOptions, TrainReport};
use super::{model::TrainModel, write_atomic, ContributeError};
use crate::backends::gguf::adapter::{AdapterConfig, ADAPTER, ADAPTER_CONFIG};
use crate::model_folder::{ContributorFile, TrainMethod, TrainingFacts, CARD, WEIGHTS};
use crate::pool::{BackendKind, MemberConfig, PoolConfig};

fn io(path: &Path, e: impl std::fmt::Display) -> ContributeError {
    ContributeError::Io(format!("{}: {e}", path.display()))
}

/// Writes the model folder; returns the weights' sha256.
pub(crate) fn write_model(
    opts: &TrainOptions,
    model: &TrainModel,
    report: &TrainReport,
    data_sha: &str,
) -> Result<String, ContributeError> {
    let out = &opts.out;
    let file_name = if opts.adapter { ADAPTER } else { WEIGHTS };
    let tensors = if opts.adapter {
        let (tensors, scale) = model.lora();
        let (rank, targets) = match &opts.method {
            TrainMethod::Lora { rank, targets, .. } => (*rank, targets.clone()),
            TrainMethod::Full => (0, Vec::new()),
        };
        let base_weights = opts.base_dir.join(WEIGHTS);
        let config = AdapterConfig {
            base_dir: opts.base_dir.canonicalize().map_err(|e| io(&opts.base_dir, e))?,
            base_sha256: crate::files::sha256_file(&base_weights).map_err(|e| io(&base_weights, e))?,
            scale,
            rank,
            targets,
        };
        let text = toml::to_string(&config).map_err(|e| ContributeError::Io(format!("{ADAPTER_CONFIG}: {e}")))?;
        write_atomic(&out.join(ADAPTER_CONFIG), text.as_bytes())?;
        tensors
    } else {
        model.merged_weights()?
    };
    let tmp = crate::files::tmp_path(&out.join(file_name));
    candle_core::safetensors::save(&tensors, &tmp)?;
    std::fs::rename(&tmp, out.join(file_name)).map_err(|e| io(out, e))?;
    for name in ["tokenizer.json", "tokenizer_config.json"] {
        let bytes = std::fs::read(opts.base_dir.join(name)).map_err(|e| io(&opts.base_dir.join(name), e))?;
        write_atomic(&out.join(name), &bytes)?;
    }
    let cfg_path = opts.base_dir.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| io(&cfg_path, e))?;
    let mut config: serde_json::Value = serde_json::from_str(&text).map_err(|e| io(&cfg_path, e))?;
    config["torch_dtype"] = "float32".into();
    let text = serde_json::to_vec_pretty(&config).map_err(|e| io(&cfg_path, e))?;
    write_atomic(&out.join("config.json"), &text)?;

    let sha = crate::files::sha256_file(&out.join(file_name)).map_err(|e| io(out, e))?;
    let id = out
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "contributed".into());
    let mut card = opts.card.clone();
    if card.source.is_empty() {
        card.source = format!(
            "fine-tuned from {} on {} with `tessera contribute train`",
            opts.base_name,
            opts.data.display()
        );
    }
    let file = ContributorFile {
        id,
        sha256: sha.clone(),
        card,
        merge: None,
        training: Some(TrainingFacts {
            base: opts.base_name.clone(),
            data: opts.data.display().to_string(),
            data_sha256: data_sha.to_string(),
            examples: report.examples,
            method: opts.method.clone(),
            steps: report.steps_done,
            examples_per_step: opts.batch * opts.accumulate,
            lr: opts.lr,
            seed: opts.seed,
            first_loss: report.log.first().map(|s| s.loss).unwrap_or(f64::NAN),
            final_loss: report.log.last().map(|s| s.loss).unwrap_or(f64::NAN),
            trainable_params: report.trainable_params,
            top_layers: opts.top_layers,
        }),
    };
    let text = toml::to_string(&file).map_err(|e| ContributeError::Io(format!("{CARD}: {e}")))?;
    write_atomic(&out.join(CARD), text.as_bytes())?;
    plot_loss(report, &out.join("loss.svg")).map_err(|e| ContributeError::Io(format!("loss.svg: {e}")))?;
    Ok(sha)
}

fn plot_loss(report: &TrainReport, path: &Path) -> Result<(), String> {
    let points: Vec<(f64, f64)> = report.log.iter().map(|s| (s.step as f64, s.loss)).collect();
    let max_y = points.iter().map(|p| p.1).filter(|y| y.is_finite()).fold(0.1, f64::max) * 1.1;
    let max_x = points.len().max(2) as f64;
    let root = SVGBackend::new(path, (800, 450)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let mut chart = ChartBuilder::on(&root)
        .caption("Training loss", ("sans-serif", 18))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(1.0..max_x, 0.0..max_y)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc("optimizer step")
        .y_desc("loss per trained token (nats)")
        .draw()
        .map_err(|e| e.to_string())?;
    chart
        .draw_series(LineSeries::new(points, &BLUE))
        .map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())
}

/// Adds the model folder `model_dir` to the pool file `pool_file` (created
/// from the default pool if it does not exist) as member `id` (default: the
/// card's). Checks the weights against the card's sha256 first. The pool
/// file is replaced atomically. Returns the member id.
pub fn add_to_pool(pool_file: &Path, model_dir: &Path, id: Option<&str>) -> Result<String, ContributeError> {
    add_to_pool_as(pool_file, model_dir, id, None)
}

/// [`add_to_pool`], the member's weights re-encoded to `quantize` when the
/// pool loads it (see [`crate::pool::MemberConfig::quantize`]).
pub fn add_to_pool_as(
    pool_file: &Path,
    model_dir: &Path,
    id: Option<&str>,
    quantize: Option<crate::pool::Quantize>,
) -> Result<String, ContributeError> {
    let card_path = model_dir.join(CARD);
    let text = std::fs::read_to_string(&card_path).map_err(|e| {
        io(
            &card_path,
            format!("{e} (is this a folder written by `tessera contribute train`?)"),
        )
    })?;
    let file: ContributorFile =
        toml::from_str(&text).map_err(|e| ContributeError::Io(format!("{}: {e}", card_path.display())))?;
    // An adapter folder's own weights are its adapter; the base it needs
    // is checked when the pool loads it.
    let file_name = if crate::backends::gguf::adapter::is_adapter(model_dir) {
        ADAPTER
    } else {
        WEIGHTS
    };
    let weights = model_dir.join(file_name);
    let sha = crate::files::sha256_file(&weights).map_err(|e| io(&weights, e))?;
    if sha != file.sha256 {
        return Err(ContributeError::Io(format!(
            "{}: sha256 {sha} does not match the card's {}: the weights changed after training",
            weights.display(),
            file.sha256
        )));
    }
    let existing = if pool_file.exists() {
        std::fs::read_to_string(pool_file).map_err(|e| io(pool_file, e))?
    } else {
        crate::pool::DEFAULT_POOL_TOML.to_string()
    };
    let pool =
        PoolConfig::from_toml(&existing).map_err(|e| ContributeError::Io(format!("{}: {e}", pool_file.display())))?;
    let id = id.unwrap_or(&file.id).to_string();
    if pool.members.iter().any(|m| m.id == id) {
        return Err(ContributeError::Options(format!(
            "{} already has a member `{id}`: pass --id with another name",
            pool_file.display()
        )));
    }
    let dir: PathBuf = model_dir.canonicalize().map_err(|e| io(model_dir, e))?;
    let member = MemberConfig {
        id: id.clone(),
        backend: BackendKind::Hf,
        path: dir,
        sha256: sha,
        sha256_file: Some(file_name.into()),
        card: file.card,
        fetch: None,
        remote: None,
        quantize,
    };
    let added = toml::to_string(&PoolConfig { members: vec![member] })
        .map_err(|e| ContributeError::Io(format!("writing the member: {e}")))?;
    let text = format!("{}\n\n{added}", existing.trim_end());
    PoolConfig::from_toml(&text).map_err(|e| ContributeError::Io(format!("the new pool does not parse: {e}")))?;
    write_atomic(pool_file, text.as_bytes())?;
    Ok(id)
}
