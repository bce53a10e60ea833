//! The merge methods, tensor by tensor, on flat `f32` slices.
//!
//! Each function merges one tensor of every model (same shape, flattened).
//! "Task vector" (delta) means `model - base`. Conventions follow the
//! papers and mergekit's documented behaviour:
//!
//! - **linear** (model soups, Wortsman et al. 2022): `sum w_i x_i / sum w_i`
//!   (the division only with `normalize`).
//! - **task arithmetic** (Ilharco et al. 2023): `base + sum w_i d_i`.
//! - **TIES** (Yadav et al. 2023): keep each delta's `density` fraction of
//!   largest magnitudes, elect a sign per parameter from the sum of the
//!   weighted deltas, add only the weighted deltas that agree with it and
//!   (with `normalize`) divide by the weights that contributed.
//! - **DARE** (Yu et al. 2024): drop each delta entry with probability
//!   `1 - density` and rescale survivors by `1 / density`, then task
//!   arithmetic; **DARE-TIES** uses TIES's sign election after the drop.
//!   (mergekit 0.1.5 instead rescales each sparsified delta to keep its L1
//!   norm exactly; both keep the delta's expected size. The drops are
//!   random in both, so the mergekit fixtures compare DARE at density 1.)
//! - **SLERP**: spherical interpolation between two models by the angle of
//!   their flattened tensors; nearly parallel tensors fall back to linear.
//! - **ExPO** (Zheng et al. 2024): `target + alpha (target - source)`,
//!   extrapolating past the better model away from the weaker one.

//!
//! Every method reduces to two primitives, so that each compute backend
//! ([`super::compute`]: the CPU here, wgpu shaders in [`super::gpu`])
//! implements only those and they give the same results:
//!
//! - [`combine`]: per parameter, sparsify each model's delta by its [`Keep`]
//!   rule, weight it, optionally elect a sign, sum, optionally normalise,
//!   scale and add to the base. Linear soups (no base), task arithmetic,
//!   TIES, DARE, DARE-TIES, ExPO (`lambda = 1 + alpha`) and SLERP's final
//!   mix (weights from the angle) are all this one loop.
//! - dot products (SLERP's norms and angle).
//!
//! The only data-dependent choices are made where both backends make them
//! the same way: TIES's magnitude threshold is found on the CPU (a
//! selection, [`Keep::magnitude`]) and handed over as a number, and DARE's
//! drops come from a counter-based hash of the seed and the position
//! ([`uniform`]) rather than a sequential generator, so a GPU thread can
//! draw parameter `j`'s coin without drawing the `j - 1` before it.

/// How one model's delta is sparsified before it is combined.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Keep {
    /// Every entry.
    All,
    /// TIES's trim: entries whose magnitude is above `threshold`, and those
    /// equal to it at positions below `ties_until` (so exactly the chosen
    /// share survives even when magnitudes tie).
    Magnitude {
        /// The smallest kept magnitude.
        threshold: f32,
        /// Entries of magnitude `threshold` are kept at positions `< ties_until`.
        ties_until: u32,
    },
    /// DARE's drop: each entry kept with probability `density` (a coin
    /// from [`uniform`] of `seed` and the position) and rescaled by
    /// `1 / density`.
    Random {
        /// The coin's seed.
        seed: u64,
        /// Keep probability, in (0, 1].
        density: f32,
    },
}

impl Keep {
    /// TIES's rule for `delta` keeping its `density` share of largest
    /// magnitudes (ties broken by position).
    pub fn magnitude(delta: &[f32], density: f64) -> Keep {
        let n = delta.len();
        let keep = ((n as f64) * density).round() as usize;
        if keep >= n {
            return Keep::All;
        }
        if keep == 0 {
            return Keep::Magnitude {
                threshold: f32::INFINITY,
                ties_until: 0,
            };
        }
        let mut mags: Vec<f32> = delta.iter().map(|x| x.abs()).collect();
        // The keep-th largest magnitude is the threshold.
        let (_, threshold, _) = mags.select_nth_unstable_by(n - keep, |a, b| a.total_cmp(b));
        let threshold = *threshold;
        let above = delta.iter().filter(|x| x.abs() > threshold).count();
        // Tied entries fill the remaining places in position order.
        let mut missing = keep - above;
        let mut ties_until = 0;
        for (j, x) in delta.iter().enumerate() {
            if missing == 0 {
                break;
            }
            if x.abs() == threshold {
                missing -= 1;
                ties_until = j + 1;
            }
        }
        Keep::Magnitude {
            threshold,
            ties_until: ties_until as u32,
        }
    }

    /// DARE's rule with keep probability `density` and coin seed `seed`.
    pub fn random(seed: u64, density: f64) -> Keep {
        if density >= 1.0 {
            Keep::All
        } else {
            Keep::Random {
                seed,
                density: density as f32,
            }
        }
    }

    /// Entry `j` (value `d`) after the rule: `d`, `0`, or `d / density`.
    pub fn apply(&self, j: usize, d: f32) -> f32 {
        match *self {
            Keep::All => d,
            Keep::Magnitude { threshold, ties_until } => {
                let m = d.abs();
                if m > threshold || (m == threshold && j < ties_until as usize) {
                    d
                } else {
                    0.0
                }
            }
            Keep::Random { seed, density } => {
                if uniform(seed, j as u32) < density {
                    d * (1.0 / density)
                } else {
                    0.0
                }
            }
        }
    }
}

/// One round of a 32-bit integer hash with good avalanche (the
/// "lowbias32" multiply-xorshift constants).
pub fn mix32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^= x >> 16;
    x
}

/// The coin of DARE's drop at position `j`: a number in [0, 1) that
/// depends only on `seed` and `j`, exactly representable in `f32` (24
/// bits), computed with 32-bit integer arithmetic so that a shader gets
/// the same number.
pub fn uniform(seed: u64, j: u32) -> f32 {
    let (lo, hi) = (seed as u32, (seed >> 32) as u32);
    let h = mix32(mix32(j ^ mix32(lo)) ^ hi);
    (h >> 8) as f32 * (1.0 / 16_777_216.0)
}

/// One combination: the first primitive (see the module docs).
#[derive(Debug, Clone)]
pub struct Combine<'a> {
    /// The base the deltas are taken from and added back to; `None` is a
    /// base of zeros (the models' values themselves are combined).
    pub base: Option<&'a [f32]>,
    /// One tensor of every model, flattened, all the base's length.
    pub models: Vec<&'a [f32]>,
    /// One sparsification rule per model.
    pub keep: Vec<Keep>,
    /// One weight per model.
    pub weights: Vec<f64>,
    /// TIES's sign election: only weighted deltas that agree in sign with
    /// their sum are added.
    pub elect_sign: bool,
    /// Divide the sum by the weights that contributed.
    pub normalize: bool,
    /// Scale of the combined delta.
    pub lambda: f64,
}

/// [`Combine`] on the CPU: the reference the other backends match. Large
/// tensors are split across the machine's cores (each parameter is
/// independent, so the result does not depend on the split).
pub fn combine(job: &Combine) -> Vec<f32> {
    let n = job
        .base
        .map_or_else(|| job.models.first().map_or(0, |m| m.len()), |b| b.len());
    let mut out = vec![0.0f32; n];
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
    // Below ~64k parameters a thread costs more than it saves.
    let per = n.div_ceil(threads.min(n / 65_536 + 1).max(1)).max(1);
    std::thread::scope(|s| {
        for (k, part) in out.chunks_mut(per).enumerate() {
            s.spawn(move || combine_range(job, k * per, part));
        }
    });
    out
}

/// Parameters `start..start + out.len()` of [`combine`].
fn combine_range(job: &Combine, start: usize, out: &mut [f32]) {
    let mut wd = vec![0.0f64; job.models.len()];
    for (o, j) in out.iter_mut().zip(start..) {
        let b = job.base.map_or(0.0, |b| b[j]);
        let mut total = 0.0f64;
        for (i, m) in job.models.iter().enumerate() {
            wd[i] = job.weights[i] * job.keep[i].apply(j, m[j] - b) as f64;
            total += wd[i];
        }
        let sign = total.signum();
        let mut sum = 0.0f64;
        let mut div = 0.0f64;
        for (x, w) in wd.iter().zip(&job.weights) {
            if !job.elect_sign || (*x != 0.0 && x.signum() == sign) {
                sum += x;
                div += w;
            }
        }
        if job.normalize {
            if div.abs() < 1e-8 {
                div = 1.0;
            }
            sum /= div;
        }
        *o = (b as f64 + job.lambda * sum) as f32;
    }
}

/// `(a . a, b . b, a . b)` in `f64` on the CPU.
pub fn dots(a: &[f32], b: &[f32]) -> (f64, f64, f64) {
    a.iter().zip(b).fold((0.0, 0.0, 0.0), |(aa, bb, ab), (x, y)| {
        let (x, y) = (*x as f64, *y as f64);
        (aa + x * x, bb + y * y, ab + x * y)
    })
}

/// SLERP's two mixing weights at `t` for tensors with dot products
/// `(a . a, b . b, a . b)`: nearly parallel (or zero) tensors fall back to
/// linear interpolation.
pub fn slerp_weights((aa, bb, ab): (f64, f64, f64), t: f64) -> (f64, f64) {
    let (na, nb) = (aa.sqrt(), bb.sqrt());
    let cos = if na > 1e-12 && nb > 1e-12 { ab / (na * nb) } else { 1.0 };
    if cos.abs() > 0.9995 {
        (1.0 - t, t)
    } else {
        let theta = cos.clamp(-1.0, 1.0).acos();
        let sin = theta.sin();
        (((1.0 - t) * theta).sin() / sin, (t * theta).sin() / sin)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &[f32], b: &[f32]) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-6, "{a:?} vs {b:?}");
        }
    }

    fn job<'a>(base: Option<&'a [f32]>, models: Vec<&'a [f32]>, weights: &[f64]) -> Combine<'a> {
        Combine {
            base,
            keep: vec![Keep::All; models.len()],
            models,
            weights: weights.to_vec(),
            elect_sign: false,
            normalize: false,
            lambda: 1.0,
        }
    }

    fn mask(k: Keep, d: &[f32]) -> Vec<bool> {
        d.iter().enumerate().map(|(j, x)| k.apply(j, *x) != 0.0).collect()
    }

    #[test]
    fn without_a_base_combine_is_a_weighted_sum_or_mean() {
        let (a, b) = ([1.0f32, 2.0], [3.0f32, 6.0]);
        close(&combine(&job(None, vec![&a, &b], &[1.0, 3.0])), &[10.0, 20.0]);
        let mut mean = job(None, vec![&a, &b], &[1.0, 3.0]);
        mean.normalize = true;
        close(&combine(&mean), &[2.5, 5.0]);
    }

    #[test]
    fn with_a_base_combine_adds_weighted_deltas() {
        let base = [1.0f32, 1.0, 1.0];
        let (a, b) = ([2.0f32, 1.0, 0.0], [1.5f32, 3.0, 2.0]);
        close(
            &combine(&job(Some(&base), vec![&a, &b], &[1.0, 0.5])),
            &[2.25, 2.0, 0.5],
        );
        // ExPO is lambda = 1 + alpha over the weaker model as base.
        let mut expo = job(Some(&[1.0, 1.0]), vec![&[2.0, -1.0]], &[1.0]);
        expo.lambda = 1.5;
        close(&combine(&expo), &[2.5, -2.0]);
    }

    #[test]
    fn ties_trims_elects_a_sign_and_averages_the_agreeing() {
        // Hand-worked: deltas a = [3, -1, 0.5, -4], b = [-1, -2, 0.2, 2].
        let a = [3.0f32, -1.0, 0.5, -4.0];
        let b = [-1.0f32, -2.0, 0.2, 2.0];
        // density 0.5 keeps the two largest magnitudes of each.
        let (ka, kb) = (Keep::magnitude(&a, 0.5), Keep::magnitude(&b, 0.5));
        assert_eq!(mask(ka, &a), vec![true, false, false, true]);
        assert_eq!(mask(kb, &b), vec![false, true, false, true]);
        // a' = [3, 0, 0, -4], b' = [0, -2, 0, 2]; weights 1, 1.
        // signs: + , - , 0 , - (sum -2): entry 3 keeps only a's -4.
        let zero = [0.0f32; 4];
        let mut ties = job(Some(&zero), vec![&a, &b], &[1.0, 1.0]);
        ties.keep = vec![ka, kb];
        ties.elect_sign = true;
        ties.normalize = true;
        close(&combine(&ties), &[3.0, -2.0, 0.0, -4.0]);
        // Weights 0.5 and 2 without normalisation: weighted a' = [1.5, 0,
        // 0, -2], b' = [0, -4, 0, 4]; the sign of entry 3 flips to b's.
        let ten = [10.0f32; 4];
        let (a10, b10): (Vec<f32>, Vec<f32>) = (
            a.iter().map(|x| x + 10.0).collect(),
            b.iter().map(|x| x + 10.0).collect(),
        );
        let mut ties = job(Some(&ten), vec![&a10, &b10], &[0.5, 2.0]);
        ties.keep = vec![ka, kb];
        ties.elect_sign = true;
        close(&combine(&ties), &[11.5, 6.0, 10.0, 14.0]);
    }

    #[test]
    fn magnitude_keeps_exactly_the_share_with_ties_in_position_order() {
        let d = [1.0f32, -1.0, 1.0, 1.0];
        assert_eq!(mask(Keep::magnitude(&d, 0.5), &d), vec![true, true, false, false]);
        let d = [0.5f32, 1.0, -2.0, 1.0, 1.0];
        assert_eq!(mask(Keep::magnitude(&d, 0.6), &d), vec![false, true, true, true, false]);
        assert_eq!(Keep::magnitude(&d, 1.0), Keep::All);
        assert!(mask(Keep::magnitude(&d, 0.01), &d).iter().all(|k| !*k));
    }

    #[test]
    fn dare_keeps_the_expected_share_and_preserves_the_mean() {
        let k = Keep::random(7, 0.3);
        let d: Vec<f32> = (0..100_000).map(|j| k.apply(j, 1.0)).collect();
        let kept = d.iter().filter(|x| **x != 0.0).count() as f64 / d.len() as f64;
        assert!((kept - 0.3).abs() < 0.01, "{kept}");
        let mean = d.iter().map(|x| *x as f64).sum::<f64>() / d.len() as f64;
        assert!((mean - 1.0).abs() < 0.03, "rescaled by 1/density: {mean}");
        assert!(d.iter().all(|x| *x == 0.0 || (*x - 1.0 / 0.3).abs() < 1e-5));
        // Another seed drops other entries; the same seed the same ones.
        let other: Vec<f32> = (0..100_000).map(|j| Keep::random(8, 0.3).apply(j, 1.0)).collect();
        let same = d
            .iter()
            .zip(&other)
            .filter(|(x, y)| (**x != 0.0) == (**y != 0.0))
            .count();
        assert!(same < 62_000, "independent coins agree on ~58%: {same}");
        assert_eq!(d, (0..100_000).map(|j| k.apply(j, 1.0)).collect::<Vec<_>>());
        assert_eq!(Keep::random(7, 1.0), Keep::All);
    }

    #[test]
    fn the_coin_is_uniform_and_exact_in_f32() {
        let n = 200_000u32;
        let mut buckets = [0u32; 10];
        for j in 0..n {
            let u = uniform(0x1234_5678_9abc_def0, j);
            assert!((0.0..1.0).contains(&u));
            buckets[(u * 10.0) as usize] += 1;
        }
        for b in buckets {
            assert!((b as f64 - 20_000.0).abs() < 800.0, "{buckets:?}");
        }
    }

    #[test]
    fn slerp_weights_follow_the_angle() {
        // Orthogonal unit vectors: halfway is at 45 degrees, norm 1.
        let (s0, s1) = slerp_weights(dots(&[1.0, 0.0], &[0.0, 1.0]), 0.5);
        assert!((s0 - std::f64::consts::FRAC_1_SQRT_2).abs() < 1e-9);
        assert!((s1 - std::f64::consts::FRAC_1_SQRT_2).abs() < 1e-9);
        let (s0, s1) = slerp_weights(dots(&[1.0, 0.0], &[0.0, 1.0]), 0.0);
        assert!((s0 - 1.0).abs() < 1e-9 && s1.abs() < 1e-9);
        // Parallel tensors: plain linear interpolation.
        assert_eq!(slerp_weights(dots(&[1.0, 2.0], &[2.0, 4.0]), 0.25), (0.75, 0.25));
        assert_eq!(dots(&[1.0, 2.0], &[3.0, -1.0]), (5.0, 10.0, 1.0));
    }
}
