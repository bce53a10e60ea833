//! The fast tier's model double: a scripted [`Models`] with no weights, so
//! that containment, budgets, limits and the server's routing and status
//! mapping are tested in seconds, without the 850 MB pool.
//!
//! Members: `echo` (generates, scores, next-token; answers at once),
//! `slow` (generates one token per 20 ms and stops when its sink says so or
//! its deadline passes, like a real member; asked for text containing
//! "hold", it first waits silently until its deadline, as a generation
//! queued behind others does) and `embedder` (embeds). Every
//! call is counted, so a test can prove that a refused request never
//! reached a member.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use tessera::inference::{
    CallCtx, Embedded, FinishReason, GenParams, Generation, InferenceError, Input, ModelCard, Models, Scored, TextSink,
    TokenLogprob, Usage, DEFAULT_MAX_TOKENS,
};
use tessera::policy::Policy;
use tessera::{Paths, Runtime};

/// Counters a test reads.
#[derive(Default)]
pub struct Counts {
    /// Calls that reached a member.
    pub calls: AtomicU64,
    /// Tokens the `slow` member generated, over all calls.
    pub slow_tokens: AtomicU64,
    /// `slow` generations that ended (finished, stopped or past deadline).
    pub slow_ended: AtomicU64,
    /// `slow` generations dropped unfinished by their caller.
    pub slow_dropped: AtomicU64,
}

/// Counts a `slow` generation dropped before it ended.
struct Unfinished(Arc<Counts>, bool);

impl Drop for Unfinished {
    fn drop(&mut self) {
        if !self.1 {
            self.0.slow_dropped.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// Whether `input` asks the `slow` member to hold before its first token.
fn holds(input: &Input) -> bool {
    match input {
        Input::Prompt(p) => p.contains("hold"),
        Input::Chat(m) => m.iter().any(|m| m.content.contains("hold")),
    }
}

/// The double.
pub struct Scripted {
    /// Its counters.
    pub counts: Arc<Counts>,
}

fn card(id: &str, caps: &[&str]) -> ModelCard {
    ModelCard {
        id: id.into(),
        contributor: "test double".into(),
        description: format!("scripted member `{id}`"),
        domains: vec!["general".into()],
        architecture: "scripted".into(),
        parameters: 1,
        context_length: 8192,
        license: "test".into(),
        capabilities: caps.iter().map(|c| c.parse().expect("a capability")).collect(),
    }
}

impl Scripted {
    /// A fresh double.
    pub fn new() -> Self {
        Scripted {
            counts: Arc::new(Counts::default()),
        }
    }

    fn slow(
        &self,
        ctx: CallCtx,
        params: GenParams,
        hold: bool,
        mut sink: Option<TextSink>,
    ) -> BoxFuture<'static, Result<Generation, InferenceError>> {
        let counts = self.counts.clone();
        Box::pin(async move {
            let mut unfinished = Unfinished(counts.clone(), false);
            if hold {
                tokio::time::sleep_until(ctx.deadline.into()).await;
            }
            let max = params.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS);
            let mut text = String::new();
            let mut n = 0;
            let mut result = Ok(());
            while n < max {
                if Instant::now() >= ctx.deadline {
                    result = Err(InferenceError::Deadline);
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
                n += 1;
                counts.slow_tokens.fetch_add(1, Ordering::SeqCst);
                text.push('x');
                if let Some(s) = sink.as_mut() {
                    if !s("x") {
                        break;
                    }
                }
            }
            counts.slow_ended.fetch_add(1, Ordering::SeqCst);
            unfinished.1 = true;
            result.map(|_| Generation {
                model: "slow".into(),
                text,
                finish: FinishReason::Length,
                usage: Usage {
                    prompt_tokens: 1,
                    completion_tokens: n,
                    cached_tokens: 0,
                },
            })
        })
    }
}

impl Models for Scripted {
    fn cards(&self) -> Vec<ModelCard> {
        vec![
            card("echo", &["generate", "score", "next-token"]),
            card("slow", &["generate"]),
            card("embedder", &["embed"]),
        ]
    }

    fn generate(
        &self,
        ctx: CallCtx,
        model: &str,
        input: Input,
        params: GenParams,
    ) -> BoxFuture<'static, Result<Generation, InferenceError>> {
        self.counts.calls.fetch_add(1, Ordering::SeqCst);
        if let Err(e) = params.validate().and_then(|_| input.check_size(0)) {
            return Box::pin(async move { Err(e) });
        }
        match model {
            "slow" => self.slow(ctx, params, holds(&input), None),
            "echo" => {
                let text = match &input {
                    Input::Prompt(p) => p.chars().take(32).collect(),
                    Input::Chat(m) => m
                        .last()
                        .map(|m| m.content.chars().take(32).collect())
                        .unwrap_or_default(),
                };
                Box::pin(async move {
                    Ok(Generation {
                        model: "echo".into(),
                        text,
                        finish: FinishReason::Eos,
                        usage: Usage {
                            prompt_tokens: 3,
                            completion_tokens: 2,
                            cached_tokens: 0,
                        },
                    })
                })
            }
            other => {
                let e = InferenceError::UnknownModel(other.into());
                Box::pin(async move { Err(e) })
            }
        }
    }

    fn generate_stream(
        &self,
        ctx: CallCtx,
        model: &str,
        input: Input,
        params: GenParams,
        mut sink: TextSink,
    ) -> BoxFuture<'static, Result<Generation, InferenceError>> {
        if model == "slow" {
            self.counts.calls.fetch_add(1, Ordering::SeqCst);
            return self.slow(ctx, params, holds(&input), Some(sink));
        }
        let call = self.generate(ctx, model, input, params);
        Box::pin(async move {
            let g = call.await?;
            sink(&g.text);
            Ok(g)
        })
    }

    fn score(
        &self,
        ctx: CallCtx,
        _: &str,
        prompt: Input,
        continuations: Vec<String>,
    ) -> BoxFuture<'static, Result<Vec<Scored>, InferenceError>> {
        self.counts.calls.fetch_add(1, Ordering::SeqCst);
        // One prompt "token" per byte, as the embedder counts. A prompt
        // that says "hold" is worked on until the call's deadline; one that
        // says "expire" waited in the queue past it and never ran.
        let prompt_tokens = prompt.counted_bytes() as u32;
        let hold = holds(&prompt);
        let expired = matches!(&prompt, Input::Prompt(p) if p.contains("expire"));
        Box::pin(async move {
            if expired {
                return Err(InferenceError::Expired);
            }
            if hold {
                tokio::time::sleep_until(ctx.deadline.into()).await;
                return Err(InferenceError::Deadline);
            }
            Ok(continuations
                .iter()
                .map(|c| Scored {
                    logprob: -(c.len() as f64),
                    tokens: c.len() as u32,
                    prompt_tokens,
                    cached_tokens: 0,
                })
                .collect())
        })
    }

    fn next_token(
        &self,
        _: CallCtx,
        _: &str,
        _: Input,
        _: u32,
    ) -> BoxFuture<'static, Result<Vec<TokenLogprob>, InferenceError>> {
        self.counts.calls.fetch_add(1, Ordering::SeqCst);
        Box::pin(async { Ok(vec![]) })
    }

    fn embed(&self, _: CallCtx, _: &str, texts: Vec<String>) -> BoxFuture<'static, Result<Embedded, InferenceError>> {
        self.counts.calls.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            Ok(Embedded {
                // One "token" per byte: unlike words, so tests can tell
                // the backend's count from a count made by the server.
                tokens: texts.iter().map(|t| t.len() as u64).sum(),
                vectors: texts.iter().map(|_| vec![1.0, 0.0]).collect(),
            })
        })
    }
}

/// A runtime over a fresh double (and the double's counters), with its own
/// scratch state and registry directories; modules are the installed ones.
pub fn runtime(tag: &str, policy: Policy) -> (Runtime, Arc<Counts>) {
    let mut paths = Paths::from_env();
    paths.state = crate::common::scratch(&format!("{tag}-state"));
    paths.registry = crate::common::scratch(&format!("{tag}-registry"));
    let double = Scripted::new();
    let counts = double.counts.clone();
    let rt = Runtime::with_models(paths, Arc::new(double), policy, Vec::new()).expect("runtime over the double");
    (rt, counts)
}
