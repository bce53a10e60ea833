//! The host side of the `training` import: grants and budgets first, then
//! the [`Trainer`](crate::inference::train::Trainer) does the work.
//!
//! Training is the most expensive thing a module can ask for (a run of a
//! 135M member holds about 1.5 GB and takes seconds per step), so every
//! limit is checked before anything is computed where it can be: runs and
//! steps are counted up front (a run that asks for more steps than remain
//! traps at once, as a generation asking for more tokens than remain
//! would), while tokens and wall time are spent as the run goes and stop it
//! between steps. The request's deadline bounds everything, and a request
//! that ends mid-run (deadline, cancellation, a trap elsewhere) sets the
//! run's cancel flag through a drop guard, so the blocking job stops at its
//! next step instead of computing for nobody.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::convert::input_in;
use super::host::RequestState;
use crate::bindings::{training as t, types as w};
use crate::inference::train::{
    Objective, Preference, SampleGroup, SftItem, TrainBase, TrainFailed, TrainLimits, TrainParams, TrainStop,
};
use crate::Error;

/// Sets the flag when dropped: the request stopped waiting for the run.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

fn objective_in(o: t::Objective) -> Objective {
    match o {
        t::Objective::Sft(v) => Objective::Sft(
            v.into_iter()
                .map(|e| SftItem {
                    input: input_in(e.input),
                    target: e.target,
                })
                .collect(),
        ),
        t::Objective::Dpo(v) => Objective::Dpo(
            v.into_iter()
                .map(|p| Preference {
                    input: input_in(p.input),
                    chosen: p.chosen,
                    rejected: p.rejected,
                })
                .collect(),
        ),
        t::Objective::Grpo(v) => Objective::Grpo(
            v.into_iter()
                .map(|g| SampleGroup {
                    input: input_in(g.input),
                    samples: g.samples.into_iter().map(|s| (s.text, s.reward)).collect(),
                })
                .collect(),
        ),
    }
}

fn objective_name(o: &t::Objective) -> &'static str {
    match o {
        t::Objective::Sft(_) => "sft",
        t::Objective::Dpo(_) => "dpo",
        t::Objective::Grpo(_) => "grpo",
    }
}

impl t::Host for RequestState {
    async fn train(
        &mut self,
        base: String,
        objective: t::Objective,
        params: t::TrainParams,
    ) -> wasmtime::Result<Result<t::TrainReport, w::Error>> {
        let _busy = self.host_calls.enter();
        self.charge_calls(1)?;
        if self.train_spent.runs >= self.grant.train_runs {
            return Err(self.violate(Error::budget("train-runs", self.grant.train_runs as u64)));
        }
        let steps_left = self.grant.train_steps.saturating_sub(self.train_spent.steps);
        if params.steps > steps_left {
            // Asking for more than remains is the module's plan breaking the
            // operator's limit: the request ends, as for tokens.
            return Err(self.violate(Error::budget("train-steps", self.grant.train_steps as u64)));
        }
        let start_from = match self.trained.iter().find(|m| m.member.id == base) {
            Some(held) => TrainBase::Trained(held.folder.clone()),
            None => {
                if !self.check_model(&base)? {
                    return Ok(Err(w::Error::UnknownModel(base)));
                }
                if self.merged.iter().any(|m| m.id == base) {
                    return Ok(Err(w::Error::InvalidParams(format!(
                        "`{base}` is a merged member, which cannot be trained: train a pool member \
                         or one trained in this request"
                    ))));
                }
                TrainBase::Member(base.clone())
            }
        };
        // A trained member is the base's weights in f32, so a held one of the
        // same base predicts the next; the first is always allowed (the
        // trainer's gate bounds it host-wide).
        let largest = self.trained.iter().map(|m| m.member.bytes).max().unwrap_or(0);
        if largest > 0 && self.held_merge_bytes() + largest > self.grant.merge_memory_bytes {
            return Ok(Err(w::Error::InvalidParams(format!(
                "merged and trained members held take {} MiB and another would pass this request's \
                 merge memory of {} MiB: `release` one first",
                self.held_merge_bytes() >> 20,
                self.grant.merge_memory_bytes >> 20
            ))));
        }
        let Some(trainer) = self.trainer.clone() else {
            return Ok(Err(w::Error::Unsupported("this host does not train members".into())));
        };
        let what = objective_name(&objective);
        let shown = format!("{base} ({what}, {} steps)", params.steps);
        let objective = objective_in(objective);
        let params = TrainParams {
            steps: params.steps,
            batch: params.batch,
            lr: params.lr,
            lora_rank: params.lora_rank,
            max_len: params.max_len,
            seed: params.seed,
            beta: params.beta,
            clip_range: params.clip_range,
        };
        let cancel = Arc::new(AtomicBool::new(false));
        let _stop_when_gone = CancelOnDrop(cancel.clone());
        let spent = Arc::new(AtomicU64::new(0));
        // Under a quota, a trained token is charged TRAIN_TOKEN_WEIGHT times:
        // the run may train what is left of it, divided so.
        let budget_left = self.grant.train_tokens.saturating_sub(self.train_spent.tokens);
        let quota_left = self
            .quota_room(0)?
            .map(|room| room / crate::request::TRAIN_TOKEN_WEIGHT);
        let by_quota = quota_left.is_some_and(|q| q < budget_left);
        let limits = TrainLimits {
            tokens: quota_left.map_or(budget_left, |q| q.min(budget_left)),
            time: self.grant.train_time.saturating_sub(self.train_spent.time),
            deadline: self.deadline,
            cancel,
            spent: spent.clone(),
        };
        self.train_spent.runs += 1;
        let id = format!("trained-{}-{}", self.requester, self.train_spent.runs);
        let started = Instant::now();
        let ran = self
            .until_deadline(trainer.train(id.clone(), start_from, objective, params, limits))
            .await;
        let took = started.elapsed();
        self.train_spent.time += took;
        // The tokens trained are charged and count against the budget
        // whatever the outcome: a run that failed or was stopped did that
        // work. (One cut by the deadline may finish a pass after this.)
        // (A trainer that reports its tokens without counting them as it
        // goes is held to its report.)
        let reported = match &ran {
            Ok(Ok(t)) => t.outcome.tokens,
            _ => 0,
        };
        let trained_tokens = spent.load(Ordering::Relaxed).max(reported);
        self.train_spent.tokens = self.train_spent.tokens.saturating_add(trained_tokens);
        self.usage.train_tokens += trained_tokens;
        let tokens = u32::try_from(trained_tokens).unwrap_or(u32::MAX);
        let result = ran?;
        match result {
            Ok(trained) => {
                let o = trained.outcome.clone();
                self.train_spent.steps = self.train_spent.steps.saturating_add(o.steps);
                self.record_call("train", &shown, tokens, 0, took, "ok")?;
                self.trained.push(trained);
                self.models = self.overlay();
                self.granted.insert(id.clone());
                Ok(Ok(t::TrainReport {
                    model: id,
                    steps: o.steps,
                    tokens: o.tokens,
                    first_loss: o.first_loss,
                    last_loss: o.last_loss,
                    millis: o.millis,
                }))
            }
            Err(TrainFailed::Invalid(why)) => {
                self.record_call("train", &shown, tokens, 0, took, "invalid-params")?;
                Ok(Err(w::Error::InvalidParams(why)))
            }
            Err(TrainFailed::Host(why)) => {
                self.record_call("train", &shown, tokens, 0, took, "inference-failed")?;
                Ok(Err(w::Error::InferenceFailed(why)))
            }
            Err(TrainFailed::Stopped(stop)) => {
                let _ = self.record_call("train", &shown, tokens, 0, took, "budget-exhausted");
                Err(match stop {
                    TrainStop::Tokens if by_quota => self.violate(Error::budget(
                        super::host::QUOTA_BUDGET,
                        self.grant.charge_limit.unwrap_or(0),
                    )),
                    TrainStop::Tokens => self.violate(Error::budget("train-tokens", self.grant.train_tokens)),
                    TrainStop::Time => self.violate(Error::budget(
                        "train-ms",
                        u64::try_from(self.grant.train_time.as_millis()).unwrap_or(u64::MAX),
                    )),
                    TrainStop::Deadline => self.deadline_trap(),
                })
            }
        }
    }

    async fn release(&mut self, model: String) -> wasmtime::Result<Result<(), w::Error>> {
        let _busy = self.host_calls.enter();
        self.charge_calls(1)?;
        let Some(at) = self.trained.iter().position(|m| m.member.id == model) else {
            return Ok(Err(w::Error::UnknownModel(model)));
        };
        // The folder goes with the last handle: now, unless it was kept.
        self.trained.remove(at);
        self.granted.remove(&model);
        self.models = self.overlay();
        self.record_call("train-release", &model, 0, 0, Duration::ZERO, "ok")?;
        Ok(Ok(()))
    }

    async fn keep(&mut self, model: String, name: String) -> wasmtime::Result<Result<(), w::Error>> {
        let _busy = self.host_calls.enter();
        self.charge_calls(1)?;
        let Some(held) = self.trained.iter().find(|m| m.member.id == model).cloned() else {
            return Ok(Err(w::Error::UnknownModel(model)));
        };
        let Some(trainer) = self.trainer.clone() else {
            return Ok(Err(w::Error::Unsupported("this host does not train members".into())));
        };
        if self.pool.cards().iter().any(|c| c.id == name) {
            return Ok(Err(w::Error::InvalidParams(format!(
                "`{}` is already a member of the pool: choose another name",
                name.chars().take(64).collect::<String>()
            ))));
        }
        use crate::inference::weights::KeepRefused;
        match trainer.keep(&name, &held, &self.grant.module) {
            Ok(()) => {
                self.record_call("train-keep", &format!("{model} as {name}"), 0, 0, Duration::ZERO, "ok")?;
                Ok(Ok(()))
            }
            Err(KeepRefused::NotAllowed(why)) => Ok(Err(w::Error::Unsupported(why))),
            Err(KeepRefused::Invalid(why)) => Ok(Err(w::Error::InvalidParams(why))),
            Err(KeepRefused::Host(why)) => Ok(Err(w::Error::InferenceFailed(why))),
        }
    }
}
