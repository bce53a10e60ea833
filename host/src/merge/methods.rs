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
//! - **SLERP**: spherical interpolation between two models by the angle of
//!   their flattened tensors; nearly parallel tensors fall back to linear.
//! - **ExPO** (Zheng et al. 2024): `target + alpha (target - source)`,
//!   extrapolating past the better model away from the weaker one.

use rand::{Rng, SeedableRng};

/// How much of each delta TIES keeps: the entries whose magnitude is at
/// least the `density`-quantile from the top.
pub fn magnitude_mask(delta: &[f32], density: f64) -> Vec<bool> {
    let n = delta.len();
    let keep = ((n as f64) * density).round() as usize;
    if keep >= n {
        return vec![true; n];
    }
    if keep == 0 {
        return vec![false; n];
    }
    let mut mags: Vec<f32> = delta.iter().map(|x| x.abs()).collect();
    // The keep-th largest magnitude is the threshold.
    let idx = n - keep;
    let (_, threshold, _) = mags.select_nth_unstable_by(idx, |a, b| a.total_cmp(b));
    let threshold = *threshold;
    // Ties at the threshold are broken by position so exactly `keep` stay.
    let mut above = delta.iter().filter(|x| x.abs() > threshold).count();
    delta
        .iter()
        .map(|x| {
            let m = x.abs();
            if m > threshold {
                true
            } else if m == threshold && above < keep {
                above += 1;
                true
            } else {
                false
            }
        })
        .collect()
}

/// DARE's random drop: keeps each entry with probability `density` and
/// rescales kept ones by `1 / density`. `seed` makes it reproducible.
pub fn dare_drop(delta: &mut [f32], density: f64, seed: u64) {
    if density >= 1.0 {
        return;
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let scale = (1.0 / density) as f32;
    for x in delta.iter_mut() {
        if rng.random::<f64>() < density {
            *x *= scale;
        } else {
            *x = 0.0;
        }
    }
}

/// `sum w_i x_i`, divided by `sum w_i` when `normalize`.
pub fn linear(models: &[&[f32]], weights: &[f64], normalize: bool) -> Vec<f32> {
    let n = models[0].len();
    let total: f64 = weights.iter().sum();
    let div = if normalize && total.abs() > 1e-12 { total } else { 1.0 };
    (0..n)
        .map(|j| {
            let s: f64 = models.iter().zip(weights).map(|(m, w)| w * m[j] as f64).sum();
            (s / div) as f32
        })
        .collect()
}

/// Combines deltas (already sparsified): with `elect_sign`, TIES's sign
/// election and disjoint merge; `normalize` divides by the weights that
/// contributed. Returns `base + lambda * merged delta`.
pub fn combine_deltas(
    base: &[f32],
    deltas: &[Vec<f32>],
    weights: &[f64],
    elect_sign: bool,
    normalize: bool,
    lambda: f64,
) -> Vec<f32> {
    (0..base.len())
        .map(|j| {
            let sign = if elect_sign {
                let s: f64 = deltas.iter().zip(weights).map(|(d, w)| w * d[j] as f64).sum();
                s.signum()
            } else {
                0.0
            };
            let mut sum = 0.0f64;
            let mut div = 0.0f64;
            for (d, w) in deltas.iter().zip(weights) {
                let x = w * d[j] as f64;
                let agrees = !elect_sign || (x != 0.0 && x.signum() == sign);
                if agrees {
                    sum += x;
                    div += w;
                }
            }
            if normalize {
                if div.abs() < 1e-8 {
                    div = 1.0;
                }
                sum /= div;
            }
            (base[j] as f64 + lambda * sum) as f32
        })
        .collect()
}

/// Spherical interpolation at `t` from `a` (t = 0) to `b` (t = 1).
pub fn slerp(a: &[f32], b: &[f32], t: f64) -> Vec<f32> {
    let norm = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let (na, nb) = (norm(a), norm(b));
    let dot = if na > 1e-12 && nb > 1e-12 {
        a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum::<f64>() / (na * nb)
    } else {
        1.0
    };
    let (s0, s1) = if dot.abs() > 0.9995 {
        (1.0 - t, t)
    } else {
        let theta = dot.clamp(-1.0, 1.0).acos();
        let sin = theta.sin();
        (((1.0 - t) * theta).sin() / sin, (t * theta).sin() / sin)
    };
    a.iter()
        .zip(b)
        .map(|(x, y)| (s0 * *x as f64 + s1 * *y as f64) as f32)
        .collect()
}

/// `target + alpha (target - source)`.
pub fn expo(target: &[f32], source: &[f32], alpha: f64) -> Vec<f32> {
    target
        .iter()
        .zip(source)
        .map(|(t, s)| (*t as f64 + alpha * (*t as f64 - *s as f64)) as f32)
        .collect()
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

    #[test]
    fn linear_soup_is_the_weighted_mean() {
        close(&linear(&[&[1.0, 2.0], &[3.0, 6.0]], &[1.0, 3.0], true), &[2.5, 5.0]);
        close(&linear(&[&[1.0, 2.0], &[3.0, 6.0]], &[1.0, 3.0], false), &[10.0, 20.0]);
    }

    #[test]
    fn task_arithmetic_adds_weighted_deltas() {
        let base = [1.0, 1.0, 1.0];
        let d = vec![vec![1.0, 0.0, -1.0], vec![0.5, 2.0, 1.0]];
        close(
            &combine_deltas(&base, &d, &[1.0, 0.5], false, false, 1.0),
            &[2.25, 2.0, 0.5],
        );
    }

    #[test]
    fn ties_trims_elects_a_sign_and_averages_the_agreeing() {
        // Hand-worked: deltas a = [3, -1, 0.5, -4], b = [-1, -2, 0.2, 2].
        let a = [3.0f32, -1.0, 0.5, -4.0];
        let b = [-1.0f32, -2.0, 0.2, 2.0];
        // density 0.5 keeps the two largest magnitudes of each.
        assert_eq!(magnitude_mask(&a, 0.5), vec![true, false, false, true]);
        assert_eq!(magnitude_mask(&b, 0.5), vec![false, true, false, true]);
        let trim =
            |d: &[f32], m: Vec<bool>| -> Vec<f32> { d.iter().zip(m).map(|(x, k)| if k { *x } else { 0.0 }).collect() };
        let deltas = vec![trim(&a, magnitude_mask(&a, 0.5)), trim(&b, magnitude_mask(&b, 0.5))];
        // a' = [3, 0, 0, -4], b' = [0, -2, 0, 2]; weights 1, 1.
        // signs: + , - , 0 , - (sum -2): entry 3 keeps only a's -4.
        let merged = combine_deltas(&[0.0; 4], &deltas, &[1.0, 1.0], true, true, 1.0);
        close(&merged, &[3.0, -2.0, 0.0, -4.0]);
        // Weights 0.5 and 2 without normalisation: weighted a' = [1.5, 0,
        // 0, -2], b' = [0, -4, 0, 4]; the sign of entry 3 flips to b's.
        let merged = combine_deltas(&[10.0; 4], &deltas, &[0.5, 2.0], true, false, 1.0);
        close(&merged, &[11.5, 6.0, 10.0, 14.0]);
    }

    #[test]
    fn magnitude_mask_keeps_exactly_the_share_with_ties() {
        let d = [1.0f32, 1.0, 1.0, 1.0];
        assert_eq!(magnitude_mask(&d, 0.5).iter().filter(|k| **k).count(), 2);
        assert!(magnitude_mask(&d, 1.0).iter().all(|k| *k));
        assert!(magnitude_mask(&d, 0.0).iter().all(|k| !*k));
    }

    #[test]
    fn dare_keeps_the_expected_share_and_preserves_the_mean() {
        let mut d = vec![1.0f32; 100_000];
        dare_drop(&mut d, 0.3, 7);
        let kept = d.iter().filter(|x| **x != 0.0).count() as f64 / d.len() as f64;
        assert!((kept - 0.3).abs() < 0.01, "{kept}");
        let mean = d.iter().map(|x| *x as f64).sum::<f64>() / d.len() as f64;
        assert!((mean - 1.0).abs() < 0.03, "rescaled by 1/density: {mean}");
        assert!(d.iter().all(|x| *x == 0.0 || (*x - 1.0 / 0.3).abs() < 1e-5));
        let mut again = vec![1.0f32; 100_000];
        dare_drop(&mut again, 0.3, 7);
        assert_eq!(d, again, "seeded");
    }

    #[test]
    fn slerp_interpolates_on_the_sphere() {
        // Orthogonal unit vectors: halfway is at 45 degrees, norm 1.
        let mid = slerp(&[1.0, 0.0], &[0.0, 1.0], 0.5);
        close(
            &mid,
            &[std::f32::consts::FRAC_1_SQRT_2, std::f32::consts::FRAC_1_SQRT_2],
        );
        close(&slerp(&[1.0, 0.0], &[0.0, 1.0], 0.0), &[1.0, 0.0]);
        close(&slerp(&[1.0, 0.0], &[0.0, 1.0], 1.0), &[0.0, 1.0]);
        // Parallel tensors: plain linear interpolation.
        close(&slerp(&[1.0, 2.0], &[2.0, 4.0], 0.5), &[1.5, 3.0]);
    }

    #[test]
    fn expo_extrapolates_away_from_the_source() {
        close(&expo(&[2.0, -1.0], &[1.0, 1.0], 0.5), &[2.5, -2.0]);
    }
}
