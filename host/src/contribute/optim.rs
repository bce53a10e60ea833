//! AdamW with a warm-up + cosine learning-rate schedule and global
//! gradient-norm clipping.
//!
//! Written here rather than taken from candle-nn because a resumable run
//! needs the optimizer's moment estimates in its checkpoints, and
//! candle-nn's `AdamW` keeps them private. The update is the decoupled one
//! of Loshchilov & Hutter (2019): `p -= lr * (m_hat / (sqrt(v_hat) + eps) +
//! wd * p)`.

use std::collections::{BTreeMap, HashMap};

use candle_core::{Tensor, Var};

/// AdamW's hyper-parameters (the usual defaults).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamWConfig {
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator guard.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// Optimizer state: one pair of moment tensors per parameter and the step.
pub struct AdamW {
    cfg: AdamWConfig,
    /// Steps taken so far.
    pub step: u64,
    /// First and second moments by parameter name.
    pub moments: BTreeMap<String, (Tensor, Tensor)>,
}

impl AdamW {
    /// Fresh state (zero moments) for `params`.
    pub fn new(cfg: AdamWConfig, params: &BTreeMap<String, Var>) -> candle_core::Result<Self> {
        let mut moments = BTreeMap::new();
        for (name, v) in params {
            moments.insert(name.clone(), (v.zeros_like()?, v.zeros_like()?));
        }
        Ok(Self { cfg, step: 0, moments })
    }

    /// Applies one update with learning rate `lr` from `grads` (by
    /// parameter name; a parameter without a gradient is left alone).
    pub fn apply(
        &mut self,
        params: &BTreeMap<String, Var>,
        grads: &HashMap<String, Tensor>,
        lr: f64,
    ) -> candle_core::Result<()> {
        self.step += 1;
        let c = self.cfg;
        let bias1 = 1.0 - c.beta1.powi(self.step as i32);
        let bias2 = 1.0 - c.beta2.powi(self.step as i32);
        for (name, var) in params {
            let (Some(g), Some((m, v))) = (grads.get(name), self.moments.get_mut(name)) else {
                continue;
            };
            let m_new = ((&*m * c.beta1)? + (g * (1.0 - c.beta1))?)?;
            let v_new = ((&*v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let m_hat = (&m_new / bias1)?;
            let v_hat = (&v_new / bias2)?;
            let step = (m_hat / (v_hat.sqrt()? + c.eps)?)?;
            let p = var.as_tensor();
            let decayed = (p * (1.0 - lr * c.weight_decay))?;
            var.set(&(decayed - (step * lr)?)?)?;
            *m = m_new;
            *v = v_new;
        }
        Ok(())
    }
}

/// Scales `grads` so their global L2 norm is at most `max_norm`; returns
/// the norm before clipping.
pub fn clip(grads: &mut HashMap<String, Tensor>, max_norm: f64) -> candle_core::Result<f64> {
    let mut sq = 0.0f64;
    for g in grads.values() {
        sq += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    }
    let norm = sq.sqrt();
    if max_norm > 0.0 && norm > max_norm {
        let k = max_norm / (norm + 1e-6);
        for g in grads.values_mut() {
            *g = (&*g * k)?;
        }
    }
    Ok(norm)
}

/// The learning rate for 0-based step `step` of `total`: linear warm-up to
/// `peak` over `warmup` steps, then cosine decay to `peak * min_ratio`.
pub fn schedule(step: u64, total: u64, warmup: u64, peak: f64, min_ratio: f64) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / span).min(1.0);
    let floor = peak * min_ratio;
    floor + 0.5 * (peak - floor) * (1.0 + (std::f64::consts::PI * progress).cos())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn schedule_warms_up_then_decays() {
        assert!((schedule(0, 100, 10, 1.0, 0.1) - 0.1).abs() < 1e-12);
        assert!((schedule(9, 100, 10, 1.0, 0.1) - 1.0).abs() < 1e-12);
        assert!((schedule(10, 100, 10, 1.0, 0.1) - 1.0).abs() < 1e-12);
        let mid = schedule(55, 100, 10, 1.0, 0.1);
        assert!((mid - 0.55).abs() < 1e-9, "{mid}");
        assert!((schedule(100, 100, 10, 1.0, 0.1) - 0.1).abs() < 1e-12);
        // No warm-up: starts at the peak.
        assert!((schedule(0, 10, 0, 2.0, 0.0) - 2.0).abs() < 1e-12);
    }

    #[test]
    fn adamw_matches_hand_computation() {
        // One parameter p = 1.0, gradient 0.5, lr 0.1, wd 0.01: after one
        // step m_hat = 0.5, v_hat = 0.25, so p = 1*(1-0.001) - 0.1*0.5/(0.5+eps).
        let dev = Device::Cpu;
        let mut params = BTreeMap::new();
        params.insert("p".to_string(), Var::new(&[1.0f32], &dev).unwrap());
        let cfg = AdamWConfig {
            weight_decay: 0.01,
            ..Default::default()
        };
        let mut opt = AdamW::new(cfg, &params).unwrap();
        let mut grads = HashMap::new();
        grads.insert("p".to_string(), Tensor::new(&[0.5f32], &dev).unwrap());
        opt.apply(&params, &grads, 0.1).unwrap();
        let p = params["p"].as_tensor().to_vec1::<f32>().unwrap()[0];
        assert!((p - (0.999 - 0.1)).abs() < 1e-6, "{p}");
        // A second identical gradient: moments stay at the gradient, the
        // step is again lr * 1.
        opt.apply(&params, &grads, 0.1).unwrap();
        let p2 = params["p"].as_tensor().to_vec1::<f32>().unwrap()[0];
        assert!((p2 - (p * 0.999 - 0.1)).abs() < 1e-5, "{p2}");
    }

    #[test]
    fn clipping_bounds_the_global_norm() {
        let dev = Device::Cpu;
        let mut grads = HashMap::new();
        grads.insert("a".to_string(), Tensor::new(&[3.0f32], &dev).unwrap());
        grads.insert("b".to_string(), Tensor::new(&[4.0f32], &dev).unwrap());
        let norm = clip(&mut grads, 1.0).unwrap();
        assert!((norm - 5.0).abs() < 1e-6);
        let a = grads["a"].to_vec1::<f32>().unwrap()[0];
        assert!((a - 0.6).abs() < 1e-5, "{a}");
    }
}
