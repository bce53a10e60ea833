//! `POST /v1/chat/completions` and `POST /v1/completions`: a member or a
//! system answers, whole or streamed.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Extension, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use crate::inference::{CallCtx, GenParams, Input};
use crate::registry::tenants::TenantPolicy;
use crate::sandbox::Module;
use crate::{Error, ProvenanceEvent, RunRequest};

use admission::Admitted;

use super::*;

/// What a chat or completion asks, whichever route it came by.
pub(crate) struct Ask {
    chat: bool,
    model: String,
    pub(crate) input: Input,
    params: GenParams,
    config: std::collections::BTreeMap<String, String>,
    stream: bool,
    include_usage: bool,
}

impl Ask {
    pub(crate) fn new(chat: bool, model: String, input: Input, sampling: &openai::Sampling) -> Result<Self, ApiError> {
        // The input rule every face applies, before anything is queued:
        // the pool would refuse it too, but only after admission.
        input
            .check_size(0)
            .map_err(|e| ApiError::invalid(if chat { "messages" } else { "prompt" }, &e.to_string()))?;
        Ok(Ask {
            chat,
            model,
            input,
            params: sampling.params()?,
            config: sampling.config(),
            stream: sampling.stream,
            include_usage: sampling.include_usage(),
        })
    }
}

pub(crate) async fn respond(st: Arc<AppState>, caller: Caller, ask: Result<Ask, ApiError>) -> Response {
    match ask {
        Ok(ask) => answer(st, caller, ask).await,
        Err(e) => e.into_response(),
    }
}

pub(crate) async fn chat(
    State(st): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> Response {
    let ask = parse::<openai::ChatRequest>(&body)
        .and_then(|req| Ask::new(true, req.model.clone(), Input::Chat(req.messages()?), &req.sampling));
    respond(st, caller, ask).await
}

pub(crate) async fn completions(
    State(st): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> Response {
    let ask = parse::<openai::CompletionRequest>(&body)
        .and_then(|req| Ask::new(false, req.model.clone(), Input::Prompt(req.prompt()?), &req.sampling));
    respond(st, caller, ask).await
}

/// Who answers a request.
pub(crate) enum Target {
    Member(String),
    System(Arc<Module>),
}

pub(crate) async fn resolve(
    st: &Arc<AppState>,
    caller: &Caller,
    policy: &TenantPolicy,
    model: &str,
    need: crate::inference::Capability,
) -> Result<Target, ApiError> {
    if let Some(card) = st.rt.cards().into_iter().find(|c| c.id == model) {
        if !TenantPolicy::allows(&policy.members, model) || !st.rt.policy_allows(model) {
            return Err(ApiError::forbidden(&format!("this key may not use member `{model}`")));
        }
        if !card.can(need) {
            return Err(ApiError::invalid(
                "model",
                &format!(
                    "member `{model}` cannot `{need}` (it can: {}): pick another member from /v1/models",
                    card.capability_names(", ")
                ),
            ));
        }
        return Ok(Target::Member(model.to_string()));
    }
    if let Some(f) = st.rt.pool_failures().iter().find(|f| f.member() == Some(model)) {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "member_unavailable",
            &format!("member `{model}` is unavailable: {f}"),
        ));
    }
    if need != crate::inference::Capability::Generate {
        return Err(ApiError::not_found(
            "model_not_found",
            &format!("no member `{model}` that can `{need}`: see /v1/models"),
        ));
    }
    match st.system(model).await? {
        Some(_) if !TenantPolicy::allows(&policy.modules, model) => {
            Err(ApiError::forbidden(&format!("this key may not use system `{model}`")))
        }
        Some(m) => {
            if let Some(left) = st.breaker.check(&breaker_key(caller, &m.sha256)) {
                let mut e = ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "module_error",
                    "module_quarantined",
                    &format!(
                        "system `{model}` kept failing on this key's requests and is quarantined for it for {left} s \
                         (other keys are not affected): check the request's parameters, or ask its publisher to fix it"
                    ),
                );
                e.retry_after = Some(left);
                return Err(e);
            }
            Ok(Target::System(m))
        }
        None => Err(ApiError::not_found(
            "model_not_found",
            &format!("no member or system `{model}`: GET /v1/models lists them"),
        )),
    }
}

/// The breaker's record of `caller` running the module with `sha256`.
pub(crate) fn breaker_key(caller: &Caller, sha256: &str) -> String {
    format!("{}/{sha256}", caller.name())
}

pub(crate) fn member_provenance(member: &str, usage: &crate::inference::Usage, ms: u64) -> Value {
    json!({
        "members": [member],
        "events": [ProvenanceEvent::HostCall {
            call: "generate".into(), model: member.into(), prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens, cached_tokens: usage.cached_tokens, start_ms: 0, ms,
            outcome: "ok".into(),
        }],
    })
}

pub(crate) fn system_provenance(out: &crate::RunOutcome) -> Value {
    let mut members: Vec<&str> = Vec::new();
    for e in &out.provenance {
        if let ProvenanceEvent::HostCall { model, .. } = e {
            if !members.contains(&model.as_str()) {
                members.push(model);
            }
        }
    }
    json!({
        "members": members,
        "events": out.provenance,
        "annotations": out.annotations,
        "usage": out.usage,
        "attribution": out.attribution,
    })
}

pub(crate) fn finish_name(f: crate::inference::FinishReason) -> &'static str {
    match f {
        crate::inference::FinishReason::Length => "length",
        _ => "stop",
    }
}

pub(crate) async fn answer(st: Arc<AppState>, caller: Caller, ask: Ask) -> Response {
    let deadline = st.deadline();
    let policy = AppState::policy_of(&caller.0);
    let target = match resolve(
        &st,
        &caller,
        &policy,
        &ask.model,
        crate::inference::Capability::Generate,
    )
    .await
    {
        Ok(t) => t,
        Err(e) => return e.into_response(),
    };
    let admitted = match st.admit(&caller.0, deadline).await {
        Ok(a) => a,
        Err(e) => return e.into_response(),
    };
    let ask = match within_quota(ask, &target, admitted.tokens_left) {
        Ok(a) => a,
        Err(e) => return e.into_response(),
    };
    if ask.stream {
        return stream(st, caller, policy, target, ask, admitted, deadline).await;
    }
    // The work runs in a task of its own, which holds the admission place
    // and bills the tenant when it ends. If the client goes away, this
    // handler is dropped and `_stop` raises `cancel`: a member stops
    // decoding at its next token and a module at its next epoch tick, and
    // what was used until then is still charged; work that has not started
    // (queued behind other requests) is dropped ([`while_wanted`]).
    let cancel = Arc::new(AtomicBool::new(false));
    let _stop = CancelOnDrop(cancel.clone());
    let chat = ask.chat;
    let model = ask.model.clone();
    let st2 = st.clone();
    let tokens_left = admitted.tokens_left;
    let work = tokio::spawn(async move {
        let _admitted = admitted;
        let flag = cancel.clone();
        let sink: crate::inference::TextSink = Box::new(move |_: &str| !flag.load(Ordering::Relaxed));
        let sink = matches!(target, Target::Member(_)).then_some(sink);
        let until = Until {
            deadline,
            cancel,
            tokens_left,
        };
        let run = run_target(&st2, &caller, &policy, &target, &ask, sink, &until);
        let (result, used) = while_wanted(run, &until, st2.cfg.request_timeout).await;
        st2.charge(&caller.0, used);
        (result, used)
    });
    let (result, billed) = match work.await {
        Ok(r) => r,
        Err(e) => (
            Err(ApiError::from(Error::internal(format!(
                "the request's task failed: {e}"
            )))),
            0,
        ),
    };
    match result {
        Ok(done) => {
            let id = st.id(if chat { "chatcmpl" } else { "cmpl" });
            let usage = openai::usage(done.prompt, done.completion, done.cached, billed);
            let body = openai::completion(
                chat,
                &id,
                now_unix(),
                &model,
                (&done.text, done.finish),
                usage,
                done.provenance,
            );
            Json(body).into_response()
        }
        Err(e) => e.into_response(),
    }
}

/// A member chat sized to what its tenant has left of today's tokens
/// (`left`, from admission): its completion may take at most what the
/// prompt (estimated at a token per four bytes) leaves, and a prompt that
/// alone is more than is left is refused with the quota's 429. Admission
/// only checks that some tokens are left, so without this one request
/// could run as far past the quota as its `max_tokens` reaches. A system's
/// calls are not known in advance: it is admitted on the same rule and
/// metered as it runs ([`crate::Metering::charge_limit`]): a call that
/// would take it past what is left ends it with the same 429.
fn within_quota(mut ask: Ask, target: &Target, left: Option<u64>) -> Result<Ask, ApiError> {
    let (Some(left), Target::Member(_)) = (left, target) else {
        return Ok(ask);
    };
    let prompt = crate::inference::tokens_for_bytes(ask.input.counted_bytes());
    if prompt >= left {
        return Err(super::admission::day_quota_spent(&format!(
            "this prompt is about {prompt} tokens, more than the {left} tokens its tenant has left \
             for today (UTC): shorten it, or try again when the quota renews"
        )));
    }
    let room = u32::try_from(left - prompt).unwrap_or(u32::MAX);
    let asked = ask.params.max_tokens.unwrap_or(crate::inference::DEFAULT_MAX_TOKENS);
    ask.params.max_tokens = Some(asked.min(room));
    Ok(ask)
}

/// How often [`while_wanted`] looks whether the client is still there.
const CLIENT_POLL: Duration = Duration::from_millis(50);

/// How long work whose client went away may still take to stop by itself
/// (and so report what it used) before it is dropped.
const GONE_GRACE: Duration = Duration::from_millis(500);

/// How long past the request's deadline work may take to stop by itself.
/// Members and modules are given the deadline and stop there, reporting
/// what they used (which is charged); a module's run is cut off half a
/// second past it at the latest (`sandbox::OVERRUN`). This is the backstop
/// for work that does not stop, which is then dropped.
const OVERRUN: Duration = Duration::from_secs(1);

/// When work on a request must stop: at its deadline (the request timeout
/// from its arrival, the wait for admission included), when `cancel` is
/// raised because its client went away, or, for a system, when it would
/// be charged past what its tenant has left of today's tokens.
pub(crate) struct Until {
    pub(crate) deadline: Instant,
    pub(crate) cancel: Arc<AtomicBool>,
    /// The tenant's tokens left today at admission (`None`: no quota).
    pub(crate) tokens_left: Option<u64>,
}

/// Runs `work` until `until`'s deadline (then [`OVERRUN`] more at most),
/// and not much longer than its client wants it: once the client is gone,
/// the work has [`GONE_GRACE`] to stop by itself, and is then dropped. A
/// timeout is reported with the server's request timeout, `limit`.
///
/// A member that is decoding stops at its next token (its sink reads the
/// same flag) and returns its usage, which is charged. Until its first
/// token, though, nothing reads the flag: a generation still queued behind
/// other requests, or waiting for KV room, would have kept its admission
/// place, its tenant's permit and then the member's time until it ran, up
/// to the request timeout. Dropping the work drops the member's reply
/// channel, and the member's worker drops a job whose caller is gone
/// without running it. Nothing was used by such a job, so nothing is
/// charged.
async fn while_wanted(
    work: impl std::future::Future<Output = (Result<Done, ApiError>, u64)>,
    until: &Until,
    limit: Duration,
) -> (Result<Done, ApiError>, u64) {
    let timed_out = || (Err(ApiError::timeout(limit)), 0);
    let work = tokio::time::timeout_at((until.deadline + OVERRUN).into(), work);
    tokio::pin!(work);
    let left = async {
        while !until.cancel.load(Ordering::Relaxed) {
            tokio::time::sleep(CLIENT_POLL).await;
        }
    };
    tokio::select! {
        r = &mut work => return r.unwrap_or_else(|_| timed_out()),
        () = left => {}
    }
    match tokio::time::timeout(GONE_GRACE, &mut work).await {
        Ok(r) => r.unwrap_or_else(|_| timed_out()),
        Err(_) => (Err(ApiError::client_gone()), 0),
    }
}

/// Raises its flag when dropped: the handler of a request whose client
/// went away is dropped, and the work it started sees the flag.
pub(crate) struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// A finished answer, whoever gave it.
pub(crate) struct Done {
    text: String,
    finish: &'static str,
    prompt: u64,
    completion: u64,
    cached: u64,
    provenance: Value,
}

/// Runs the member or system, and says how many tokens it used: what the
/// tenant's daily quota is charged whether or not it succeeded (`prompt +
/// completion`, plus a system's trained tokens at their weight and its
/// module's own time, [`crate::UsageReport::charged`]). With `sink`, a
/// member's text is streamed into it as it is decoded (returning `false`
/// stops it). The member, or
/// the system's module and every call it makes, stops at `until`'s
/// deadline; the module also stops when `until.cancel` is raised.
pub(crate) async fn run_target(
    st: &AppState,
    caller: &Caller,
    policy: &TenantPolicy,
    target: &Target,
    ask: &Ask,
    sink: Option<crate::inference::TextSink>,
    until: &Until,
) -> (Result<Done, ApiError>, u64) {
    match target {
        Target::Member(id) => {
            // A member decoding at the deadline is stopped by its sink, so
            // it ends with its usage, which is charged: a generation cut by
            // its own deadline reports none, and a tenant whose requests all
            // ran into the timeout would use the member without paying.
            // Its own deadline, a little later, stops what emits no text
            // by then (a generation still queued or in its prompt); that
            // reports no usage either, so it is charged the input's bytes
            // / 4, as `AppState::until_cut` charges a cut score.
            let ctx = CallCtx::new(until.deadline + MEMBER_BACKSTOP, CallCtx::next_requester());
            let passed = Arc::new(AtomicBool::new(false));
            let sink = crate::inference::stop_at(until.deadline, None, passed.clone(), sink);
            let started = Instant::now();
            let g = st
                .rt
                .models()
                .generate_stream(ctx, id, ask.input.clone(), ask.params.clone(), sink)
                .await;
            let g = match g {
                Ok(g) => g,
                Err(crate::inference::InferenceError::Deadline) => {
                    let cut = crate::inference::tokens_for_bytes(ask.input.counted_bytes());
                    return (Err(ApiError::timeout(st.cfg.request_timeout)), cut);
                }
                // Expired in the member's queue: it never ran.
                Err(crate::inference::InferenceError::Expired) => {
                    return (Err(ApiError::timeout(st.cfg.request_timeout)), 0)
                }
                Err(e) => return (Err(ApiError::from(Error::from(e))), 0),
            };
            let ms = started.elapsed().as_millis() as u64;
            let used = u64::from(g.usage.prompt_tokens) + u64::from(g.usage.completion_tokens);
            if passed.load(Ordering::Relaxed) {
                return (Err(ApiError::timeout(st.cfg.request_timeout)), used);
            }
            let done = Done {
                provenance: member_provenance(id, &g.usage, ms),
                text: g.text,
                finish: finish_name(g.finish),
                prompt: g.usage.prompt_tokens as u64,
                completion: g.usage.completion_tokens as u64,
                cached: g.usage.cached_tokens as u64,
            };
            (Ok(done), used)
        }
        Target::System(module) => {
            let req = RunRequest {
                input: ask.input.clone(),
                params: ask.params.clone(),
                config: ask.config.clone(),
            };
            let members: Option<Vec<String>> =
                (!policy.members.iter().any(|m| m == "*")).then(|| policy.members.clone());
            let (rt, m) = (st.rt.clone(), module.clone());
            let metering = crate::Metering {
                cancel: Some(until.cancel.clone()),
                output: sink,
                deadline: Some(until.deadline),
                charge_limit: until.tokens_left,
                state: None,
            };
            let ran = st
                .guests
                .run(async move { rt.run_metered(&m, req, members.as_deref(), metering).await })
                .await;
            let (out, usage) = match ran {
                Ok(r) => r,
                Err(e) => {
                    let e = Error::internal(format!("the module runtime stopped: {e}"));
                    return (Err(ApiError::from(e)), 0);
                }
            };
            // Every token the members read, wrote or trained on for the
            // module is charged (scored and trained ones too).
            let used = usage.charged();
            // Stopped at the request's deadline rather than its own: the
            // server's timeout, as for a member, and not held against the
            // module by the breaker (a slow strategy under load is not a
            // broken one). What it used until then is still charged.
            if matches!(out, Err(Error::Deadline { .. })) && Instant::now() + DEADLINE_SLACK >= until.deadline {
                return (Err(ApiError::timeout(st.cfg.request_timeout)), used);
            }
            // Stopped because its client went away: not the module's fault
            // either (the client gets nothing, so this is only for the
            // record).
            if until.cancel.load(Ordering::Relaxed) {
                return (Err(ApiError::client_gone()), used);
            }
            // Stopped at its tenant's quota: the caller's limit, not the
            // module's, so the quota's 429 and nothing held against it.
            if matches!(&out, Err(Error::Budget { budget, .. }) if budget == crate::sandbox::QUOTA_BUDGET) {
                let left = until.tokens_left.unwrap_or(0);
                return (
                    Err(super::admission::day_quota_spent(&format!(
                        "this request would use more than the {left} tokens its tenant had left for \
                         today (UTC); it was stopped there and charged {used}: ask for less, or try \
                         again when the quota renews"
                    ))),
                    used,
                );
            }
            st.breaker
                .record(&breaker_key(caller, &module.sha256), out.as_ref().map(|_| ()));
            let out = match out {
                Ok(o) => o,
                Err(e) => return (Err(ApiError::from(e)), used),
            };
            let done = Done {
                provenance: system_provenance(&out),
                text: out.text.clone(),
                finish: "stop",
                prompt: out.usage.prompt_tokens + out.usage.scored_tokens,
                completion: out.usage.completion_tokens,
                cached: out.usage.cached_tokens,
            };
            (Ok(done), used)
        }
    }
}

/// How long past the request's deadline a member's own deadline falls:
/// time for its sink to stop it first ([`run_target`]). Below [`OVERRUN`].
const MEMBER_BACKSTOP: Duration = Duration::from_millis(250);

/// How close to the request's deadline a module's deadline error must come
/// to count as the request's timeout: the sandbox ends a run at or after
/// its deadline, so this only absorbs clock reads a little apart.
const DEADLINE_SLACK: Duration = Duration::from_millis(20);

pub(crate) fn event(v: &Value) -> Result<Event, Infallible> {
    Ok(Event::default().data(v.to_string()))
}

/// Answers `ask` as server-sent events.
///
/// A member's stream begins when its first piece of text is ready (or its
/// answer is, if it has no text): a request that fails before that (a
/// prompt longer than the member's context or its KV budget, a timeout
/// while queued) gets its HTTP status and error body, as without
/// streaming, rather than a 200 whose first event is the error. A system's
/// stream begins at once, with a note on whether it streams; what fails
/// after the stream began arrives as an error event before `[DONE]`.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn stream(
    st: Arc<AppState>,
    caller: Caller,
    policy: TenantPolicy,
    target: Target,
    ask: Ask,
    admitted: Admitted,
    deadline: Instant,
) -> Response {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Result<Event, Infallible>>();
    let id = st.id(if ask.chat { "chatcmpl" } else { "cmpl" });
    let created = now_unix();
    let model = ask.model.clone();
    let chat = ask.chat;
    // The first event: the role, and for a system, whether it streams.
    let mut first = openai::chunk(chat, &id, created, &model, Some(""), true, None);
    if let Target::System(m) = &target {
        first["tessera"] = if m.streams {
            json!({
                "streaming": "tokens",
                "note": format!("system `{}` can stream its answer (its strategy imports `output`): pieces arrive as it writes them, the rest when it finishes", m.manifest.name),
            })
        } else {
            json!({
                "streaming": "final-answer",
                "note": format!("system `{}` answers only when its strategy finishes: the answer arrives as one chunk", m.manifest.name),
            })
        };
    }
    let _ = tx.send(event(&first));
    // Says whether the stream may begin: `Ok` at the first piece or a
    // successful end, the error if the work failed before either. Only a
    // member's stream waits for it.
    let (begin, begun) = tokio::sync::oneshot::channel::<Result<(), ApiError>>();
    // Only `open` and its clones (the sink's, the task's) hold the sender:
    // a task that dies without answering drops them all, and the handler
    // answers 500 instead of waiting for ever.
    let begin = Arc::new(std::sync::Mutex::new(Some(begin)));
    let open = move |verdict: Result<(), ApiError>| -> Option<ApiError> {
        match begin.lock().unwrap_or_else(|e| e.into_inner()).take() {
            // The handler answers with it (or is gone).
            Some(tx) => {
                let _ = tx.send(verdict);
                None
            }
            // Already begun: the caller sends it as an event.
            None => verdict.err(),
        }
    };
    let pieces = tx.clone();
    let (id2, model2) = (id.clone(), model.clone());
    // Bytes of the answer already sent: a streaming system's answer begins
    // with them (the sandbox checks), so only the rest follows at the end.
    let sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = sent.clone();
    let first_piece = open.clone();
    let sink: crate::inference::TextSink = Box::new(move |piece: &str| {
        counted.fetch_add(piece.len(), Ordering::Relaxed);
        first_piece(Ok(()));
        pieces
            .send(event(&openai::chunk(
                chat,
                &id2,
                created,
                &model2,
                Some(piece),
                false,
                None,
            )))
            .is_ok()
    });
    let waits_for_first = matches!(target, Target::Member(_));
    if !waits_for_first {
        open(Ok(()));
    }
    let tokens_left = admitted.tokens_left;
    tokio::spawn(async move {
        let _admitted = admitted;
        let limit = st.cfg.request_timeout;
        let streams_itself = matches!(target, Target::Member(_));
        let streams = match &target {
            Target::Member(_) => true,
            Target::System(m) => m.streams,
        };
        // The work is stopped when the client goes away: the stream's
        // channel closes (or, before the stream began, the handler and its
        // receiver are dropped), which `watch` turns into `cancel`.
        let cancel = Arc::new(AtomicBool::new(false));
        let (flag, watch) = (cancel.clone(), tx.clone());
        let watcher = tokio::spawn(async move {
            watch.closed().await;
            flag.store(true, Ordering::Relaxed);
        });
        let until = Until {
            deadline,
            cancel,
            tokens_left,
        };
        let work = run_target(&st, &caller, &policy, &target, &ask, streams.then_some(sink), &until);
        let (result, used) = while_wanted(work, &until, limit).await;
        watcher.abort();
        st.charge(&caller.0, used);
        match result {
            Ok(done) => {
                open(Ok(()));
                if !streams_itself {
                    let rest = done.text.get(sent.load(Ordering::Relaxed)..).unwrap_or("");
                    if !rest.is_empty() {
                        let _ = tx.send(event(&openai::chunk(
                            chat,
                            &id,
                            created,
                            &model,
                            Some(rest),
                            false,
                            None,
                        )));
                    }
                }
                let mut last = openai::chunk(chat, &id, created, &model, None, false, Some(done.finish));
                last["provenance"] = done.provenance;
                let _ = tx.send(event(&last));
                if ask.include_usage {
                    let mut u = openai::chunk(chat, &id, created, &model, None, false, None);
                    u["choices"] = json!([]);
                    u["usage"] = openai::usage(done.prompt, done.completion, done.cached, used);
                    let _ = tx.send(event(&u));
                }
            }
            Err(e) => match open(Err(e)) {
                Some(e) => {
                    let _ = tx.send(event(&e.body()));
                }
                // The handler answers with the error; no stream follows.
                None => return,
            },
        }
        let _ = tx.send(Ok(Event::default().data("[DONE]")));
    });
    if waits_for_first {
        match begun.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return e.into_response(),
            Err(_) => {
                return ApiError::from(Error::internal("the request's task ended without an answer")).into_response()
            }
        }
    }
    let body = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|e| (e, rx)) });
    Sse::new(body)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(5)))
        .into_response()
}
