//! Choosing a sequence's next token from its logits: greedily, or drawn at
//! a temperature from the whole vocabulary, its `top_k` most likely
//! tokens, its nucleus (`top_p`), or the nucleus of the top k.
//!
//! Why not candle's `LogitsProcessor`: it divides, exponentiates (scalar
//! `expf`), copies and builds a cumulative table over every logit for
//! every token, and sorts the whole vocabulary for `top_p`. With Gemma's
//! 262,144-token vocabulary that was about a tenth of a sixteen-sequence
//! decode step. Here a draw is one vector pass (weights and their sum),
//! then a scan that stops at the drawn token; `top_k` and `top_p` select
//! candidates in linear time and sort only those.
//!
//! The rules are candle's, so a request means what it meant: the nucleus
//! is the smallest set of most likely tokens whose probability (under the
//! temperature, over the whole vocabulary) reaches `top_p`; with `top_k`
//! as well, the nucleus is taken within the top k, and if the top k do not
//! reach `top_p` all k are kept. Each sequence owns its sampler and its
//! seeded generator, so what a sequence draws does not depend on what runs
//! beside it.

use rand::{rngs::StdRng, Rng, SeedableRng};

use crate::inference::GenParams;

/// How the next token is chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Rule {
    /// The most likely token (the first of equals).
    Greedy,
    /// A draw from `softmax(logits / temperature)`, restricted as asked.
    Draw {
        temperature: f32,
        top_k: Option<usize>,
        top_p: Option<f32>,
    },
}

/// A sequence's sampler: its rule and its seeded generator.
#[derive(Debug, Clone)]
pub(super) struct Sampler {
    rule: Rule,
    rng: StdRng,
}

/// Candidates gathered first for a nucleus; doubled while they fall short.
const FIRST_CANDIDATES: usize = 64;

impl Sampler {
    /// The sampler `params` ask for, seeded with `seed`.
    pub(super) fn new(seed: u64, params: &GenParams) -> Self {
        let temperature = params.temperature.unwrap_or(0.0);
        let rule = if temperature > 0.0 && temperature.is_finite() {
            Rule::Draw {
                temperature,
                top_k: params.top_k.map(|k| k as usize),
                // p outside (0, 1) keeps every token, as candle did.
                top_p: params.top_p.filter(|p| *p > 0.0 && *p < 1.0),
            }
        } else {
            Rule::Greedy
        };
        Sampler {
            rule,
            rng: StdRng::seed_from_u64(seed),
        }
    }

    /// The next token. Fails only on logits that are empty or not numbers.
    /// Takes the row by value: a draw turns it into weights in place.
    pub(super) fn sample(&mut self, logits: Vec<f32>) -> Result<u32, String> {
        let (best, max) = match tessera_kernels::math::max_index(&logits) {
            Err(i) => return Err(format!("the model produced a NaN logit (token {i})")),
            Ok(Some((_, max))) if max == f32::NEG_INFINITY => return Err("the model produced no finite logit".into()),
            Ok(None) => return Err("the model produced no logits".into()),
            Ok(Some(found)) => found,
        };
        let Rule::Draw {
            temperature,
            top_k,
            top_p,
        } = self.rule
        else {
            return Ok(best as u32);
        };
        let mut w = logits;
        let mut blocks = Vec::new();
        let total = tessera_kernels::math::exp_shifted(&mut w, max, 1.0 / temperature, &mut blocks);
        let top_k = top_k.filter(|k| *k < w.len());
        if top_k.is_none() && top_p.is_none() {
            return Ok(self.draw_all(&w, &blocks, total) as u32);
        }
        let cands = candidates(&w, total, top_k, top_p);
        let weights: Vec<f32> = cands.iter().map(|&i| w[i]).collect();
        let mass = weights.iter().sum();
        Ok(cands[self.draw(&weights, mass)] as u32)
    }

    /// Draws an index of `w` with probability proportional to its weight;
    /// `mass` is their total.
    fn draw(&mut self, w: &[f32], mass: f32) -> usize {
        let target = self.rng.random::<f32>() * mass;
        scan(w, target, 0).unwrap_or_else(|last| last)
    }

    /// [`Self::draw`] over a whole vocabulary: the block sums of
    /// [`tessera_kernels::math::exp_shifted`] find the block, one scan the
    /// token in it.
    fn draw_all(&mut self, w: &[f32], blocks: &[f32], total: f32) -> usize {
        let target = self.rng.random::<f32>() * total;
        let block = tessera_kernels::math::EXP_BLOCK;
        let mut acc = 0.0f32;
        let mut last = None;
        for (b, &sum) in blocks.iter().enumerate() {
            if sum <= 0.0 {
                continue;
            }
            let span = b * block..((b + 1) * block).min(w.len());
            // A block's own sum and its scan may round differently; a scan
            // that falls short lets the draw go on to the next block.
            if acc + sum > target {
                if let Ok(i) = scan(&w[span.clone()], target - acc, span.start) {
                    return i;
                }
            }
            acc += sum;
            last = Some(span);
        }
        // Rounding left the running sum just short of the target: the last
        // token with weight is the one the draw reached.
        last.and_then(|span| w[span.clone()].iter().rposition(|x| *x > 0.0).map(|i| span.start + i))
            .unwrap_or(0)
    }
}

/// The first index (plus `offset`) where the running sum of `w` passes
/// `target`; `Err(last index with weight)` if it never does.
fn scan(w: &[f32], target: f32, offset: usize) -> Result<usize, usize> {
    let mut acc = 0.0f32;
    let mut last = offset;
    for (i, &x) in w.iter().enumerate() {
        if x > 0.0 {
            last = offset + i;
            acc += x;
            if acc > target {
                return Ok(offset + i);
            }
        }
    }
    Err(last)
}

/// The tokens a draw may pick under `top_k` and `top_p`, most likely
/// first (ties by lower id). `w` are the weights, `total` their sum.
fn candidates(w: &[f32], total: f32, top_k: Option<usize>, top_p: Option<f32>) -> Vec<usize> {
    let by_weight = |a: &usize, b: &usize| w[*b].total_cmp(&w[*a]).then(a.cmp(b));
    let limit = top_k.unwrap_or(w.len()).max(1);
    let mut take = match top_p {
        Some(_) => FIRST_CANDIDATES.min(limit),
        None => limit,
    };
    loop {
        let mut idx: Vec<usize> = (0..w.len()).collect();
        if take < idx.len() {
            idx.select_nth_unstable_by(take, by_weight);
            idx.truncate(take);
        }
        idx.sort_unstable_by(by_weight);
        let Some(p) = top_p else {
            return idx;
        };
        // Keep tokens while the probability before them is below p.
        let mut cum = 0.0f32;
        let mut keep = 0;
        for &i in &idx {
            if cum >= p {
                break;
            }
            cum += w[i] / total;
            keep += 1;
        }
        if cum >= p || take >= limit || take >= w.len() {
            // Within the top k and short of p: all k stay, as candle did.
            idx.truncate(if cum >= p { keep } else { idx.len() });
            return idx;
        }
        take = (take * 2).min(limit);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_k: Option<u32>, top_p: Option<f32>) -> GenParams {
        GenParams {
            temperature: Some(temperature),
            top_k,
            top_p,
            ..GenParams::default()
        }
    }

    #[test]
    fn greedy_takes_the_first_largest_and_rejects_nan() {
        let mut s = Sampler::new(0, &GenParams::default());
        assert_eq!(s.sample(vec![0.5, 2.0, 2.0, -1.0]), Ok(1));
        assert!(s.sample(vec![0.5, f32::NAN]).is_err());
        assert!(s.sample(Vec::new()).is_err());
        assert!(s.sample(vec![f32::NEG_INFINITY; 3]).is_err());
    }

    /// Draw frequencies follow softmax(logits / t) within sampling error,
    /// and a seed repeats its draws.
    #[test]
    fn draws_follow_the_distribution_and_repeat_with_their_seed() {
        // 700 tokens: the draw crosses blocks of the weights' partial sums.
        let logits: Vec<f32> = (0..700).map(|i| (i % 7) as f32 * 0.9 - (i as f32) * 0.004).collect();
        let t = 0.8;
        let z: f64 = logits.iter().map(|l| ((l / t) as f64).exp()).sum();
        let mut counts = vec![0usize; logits.len()];
        let mut s = Sampler::new(7, &params(t, None, None));
        let n = 40_000;
        for _ in 0..n {
            counts[s.sample(logits.clone()).unwrap() as usize] += 1;
        }
        for (i, c) in counts.iter().enumerate() {
            let p = ((logits[i] / t) as f64).exp() / z;
            let sd = (p * (1.0 - p) / n as f64).sqrt();
            let got = *c as f64 / n as f64;
            assert!((got - p).abs() < 5.0 * sd + 1e-4, "token {i}: {got} vs {p}");
        }
        let mut a = Sampler::new(3, &params(t, None, None));
        let mut b = Sampler::new(3, &params(t, None, None));
        let xs: Vec<u32> = (0..100).map(|_| a.sample(logits.clone()).unwrap()).collect();
        let ys: Vec<u32> = (0..100).map(|_| b.sample(logits.clone()).unwrap()).collect();
        assert_eq!(xs, ys);
    }

    /// top-k and top-p keep exactly the tokens a full sort would keep,
    /// including when the nucleus is larger than the first candidates.
    #[test]
    fn top_k_and_top_p_keep_what_a_full_sort_keeps() {
        // 1000 tokens with a flat tail: a nucleus of 0.9 spans hundreds.
        let logits: Vec<f32> = (0..1000)
            .map(|i| if i % 97 == 0 { 3.0 } else { -((i % 13) as f32) * 0.05 })
            .collect();
        let mut w = logits.clone();
        let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let total = tessera_kernels::math::exp_shifted(&mut w, max, 1.0, &mut Vec::new());
        let mut order: Vec<usize> = (0..w.len()).collect();
        order.sort_by(|a, b| w[*b].total_cmp(&w[*a]).then(a.cmp(b)));
        for (k, p) in [
            (None, Some(0.9)),
            (Some(5), None),
            (Some(300), Some(0.5)),
            (Some(20), Some(0.99)),
            (None, Some(0.01)),
        ] {
            let got = candidates(&w, total, k, p);
            let mut want: Vec<usize> = order.iter().take(k.unwrap_or(w.len())).cloned().collect();
            if let Some(p) = p {
                let mut cum = 0.0;
                let keep = want
                    .iter()
                    .take_while(|&&i| {
                        let before = cum;
                        cum += w[i] / total;
                        before < p
                    })
                    .count();
                want.truncate(keep);
            }
            assert_eq!(got, want, "top_k {k:?}, top_p {p:?}");
        }
        // Draws never leave the candidates.
        let mut s = Sampler::new(1, &params(1.0, Some(3), None));
        for _ in 0..200 {
            let t = s.sample(logits.clone()).unwrap() as usize;
            assert!(order[..3].contains(&t), "drew {t}");
        }
    }
}
