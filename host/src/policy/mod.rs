//! Policy: what a module asks for (its [`Manifest`]), what the operator allows
//! ([`Policy`]), and what a request actually gets ([`Grant`]), the
//! intersection of the two.
//!
//! Every budget has three numbers: the operator's default (used when the
//! module does not ask), the operator's maximum, and the module's ask. The
//! grant is `min(ask or default, maximum)`. Models are granted when the module
//! wants them (`"*"` = every member) *and* the operator allows them for that
//! module.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The most linear memory any module can be granted: the sandbox reserves
/// slots of this size, so no policy can grant more.
pub const MAX_MEMORY_BYTES: usize = 512 << 20;

/// The largest `fit` state a module may return. The host persists it and
/// hands it to every later run of the module, so it is bounded on its own,
/// whatever the module's memory grant.
pub const MAX_STATE_BYTES: usize = 8 << 20;

/// Whether `name` is plain: 1-64 lowercase ASCII letters, digits, `-`,
/// `_` and `.`, not starting with `.`. Module names (URL path segments and
/// file names) and names of kept merged members (pool ids and folder names)
/// both follow it.
pub fn is_plain_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_' || c == '.')
        && !name.starts_with('.')
}

/// The world a module implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum World {
    /// A whole strategy (`run`, `fit`).
    Strategy,
    /// Picks members (`route`).
    Router,
    /// Scores candidates (`judge`).
    Judge,
    /// Combines candidates (`aggregate`).
    Aggregator,
}

impl World {
    /// Every world, in the order the contract declares them.
    pub const ALL: [World; 4] = [World::Strategy, World::Router, World::Judge, World::Aggregator];

    /// The name manifests, the registry and listings use (`strategy`, ...).
    pub fn name(self) -> &'static str {
        match self {
            World::Strategy => "strategy",
            World::Router => "router",
            World::Judge => "judge",
            World::Aggregator => "aggregator",
        }
    }
}

impl std::fmt::Display for World {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A world name that is not one of the contract's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown world `{0}`: use strategy, router, judge or aggregator")]
pub struct UnknownWorld(pub String);

impl std::str::FromStr for World {
    type Err = UnknownWorld;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        World::ALL
            .into_iter()
            .find(|w| w.name() == s)
            .ok_or_else(|| UnknownWorld(s.to_string()))
    }
}

/// A module's manifest: the TOML file beside its `.wasm`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Module name (what `--strategy NAME` finds).
    pub name: String,
    /// Semantic version.
    pub version: String,
    /// Who wrote it.
    pub author: String,
    /// Which world it implements.
    pub world: World,
    /// What it does.
    pub description: String,
    /// Members it wants; `["*"]` means every member of the pool.
    #[serde(default = "all_models")]
    pub models: Vec<String>,
    /// Budgets it asks for; anything unset gets the operator's default.
    #[serde(default)]
    pub budgets: Budgets,
    /// Budgets it asks for its `fit`, where they differ from a request's:
    /// a fit runs once, offline, over a whole dev set, so what it needs
    /// grows with the dev set while a request's does not (a calibrated
    /// option-fusion fit makes two calls per member and dev item). Anything
    /// unset is the request's grant; everything is capped by the operator's
    /// `fit_maxima`. Left out of the serialised manifest when empty, so a
    /// manifest that does not ask serialises as it did before fits had
    /// budgets of their own (the evaluation cache keys on it).
    #[serde(default, skip_serializing_if = "Budgets::is_unset")]
    pub fit_budgets: Budgets,
    /// Default hyperparameters, overridable per request.
    #[serde(default)]
    pub config: BTreeMap<String, String>,
}

fn all_models() -> Vec<String> {
    vec!["*".into()]
}

/// Per-request budgets. In a manifest every field is optional.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Budgets {
    /// Wall-clock deadline for the whole request, in milliseconds.
    pub deadline_ms: Option<u64>,
    /// Linear memory the module may grow to, in MiB.
    pub memory_mib: Option<u64>,
    /// WebAssembly fuel (roughly, instructions executed).
    pub fuel: Option<u64>,
    /// Model calls (each fan-out job counts as one).
    pub host_calls: Option<u32>,
    /// Tokens generated across all calls.
    pub tokens: Option<u32>,
    /// Bytes of the final response (text plus annotations).
    pub output_bytes: Option<u64>,
    /// Trace events the module may emit.
    pub trace_events: Option<u32>,
    /// Host resources (WASI handles) the module may hold at once.
    pub resources: Option<u32>,
    /// Merged members (`weights.merge`) the module may create per request;
    /// 0 means the capability is not granted.
    pub merges: Option<u32>,
    /// Bytes of provenance (trace steps and the host's record of each call)
    /// one request may accumulate; it is returned to the caller, so it is
    /// bounded like the output.
    #[serde(default)]
    pub provenance_bytes: Option<u64>,
    /// Memory, in MiB, that the merged members a request holds at once (not
    /// yet released) may take together; a merge past it is refused.
    #[serde(default)]
    pub merge_memory_mib: Option<u64>,
    /// Training runs (`training.train`) the module may start per request;
    /// 0 means the capability is not granted.
    #[serde(default)]
    pub train_runs: Option<u32>,
    /// Optimizer steps all of a request's training runs may take together.
    #[serde(default)]
    pub train_steps: Option<u32>,
    /// Tokens a request's training may run through the model (forward and
    /// backward), counting the reference passes DPO and GRPO make.
    #[serde(default)]
    pub train_tokens: Option<u64>,
    /// Wall time a request's training may take, in milliseconds; a run
    /// that reaches it is stopped between steps.
    #[serde(default)]
    pub train_ms: Option<u64>,
}

/// The operator's side: defaults, maxima and model allow-lists.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Budgets for modules that do not ask.
    #[serde(default = "Policy::builtin_defaults")]
    pub defaults: Budgets,
    /// The most any module gets.
    #[serde(default = "Policy::builtin_maxima")]
    pub maxima: Budgets,
    /// The most any module's `fit` gets (see [`Policy::fit_grant`]). A
    /// budget left out keeps its built-in fit maximum.
    #[serde(default = "Policy::builtin_fit_maxima")]
    pub fit_maxima: Budgets,
    /// Members every module may use; `["*"]` = the whole pool.
    #[serde(default = "all_models")]
    pub models: Vec<String>,
    /// Per-module overrides of the allow-list, by module name.
    #[serde(default)]
    pub modules: BTreeMap<String, ModulePolicy>,
    /// How many merged members modules may keep beyond their request as
    /// named pool members (`weights.keep`); each holds its weights in memory
    /// (about 540 MB for a 135M model in f32) until the process ends. 0, the
    /// default, refuses every `keep`.
    #[serde(default)]
    pub keep_merged: u32,
    /// How many trained members modules may keep beyond their request
    /// (`training.keep`), each holding its f32 weights in memory until the
    /// process ends. 0, the default, refuses every `keep`.
    #[serde(default)]
    pub keep_trained: u32,
}

/// Per-module operator rules.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModulePolicy {
    /// Members this module may use, replacing the global allow-list.
    pub models: Option<Vec<String>>,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            defaults: Self::builtin_defaults(),
            maxima: Self::builtin_maxima(),
            fit_maxima: Self::builtin_fit_maxima(),
            models: all_models(),
            modules: BTreeMap::new(),
            keep_merged: 0,
            keep_trained: 0,
        }
    }
}

impl Policy {
    /// Defaults: enough for a few generations on a CPU.
    pub fn builtin_defaults() -> Budgets {
        Budgets {
            deadline_ms: Some(120_000),
            memory_mib: Some(64),
            fuel: Some(2_000_000_000),
            host_calls: Some(64),
            tokens: Some(4_096),
            output_bytes: Some(1 << 20),
            trace_events: Some(256),
            resources: Some(64),
            merges: Some(0),
            provenance_bytes: Some(256 << 10),
            merge_memory_mib: Some(2048),
            train_runs: Some(0),
            train_steps: Some(0),
            train_tokens: Some(0),
            train_ms: Some(0),
        }
    }

    /// Maxima: no module gets more than this, whatever it asks.
    pub fn builtin_maxima() -> Budgets {
        Budgets {
            deadline_ms: Some(600_000),
            memory_mib: Some(512),
            fuel: Some(50_000_000_000),
            host_calls: Some(1_024),
            tokens: Some(65_536),
            output_bytes: Some(16 << 20),
            trace_events: Some(4_096),
            resources: Some(1_024),
            // A swarm search merges one candidate per particle and round;
            // memory stays bounded because a released merge is freed.
            merges: Some(64),
            provenance_bytes: Some(4 << 20),
            // Four SmolLM2-135M merges in f32 held at once; a search that
            // releases each candidate holds one.
            merge_memory_mib: Some(4096),
            // A method that trains every member of a 16-member pool once
            // in `fit`; steps, tokens and time bound what that costs (on
            // 2 cores SmolLM2-135M trains at roughly 400 tokens/s).
            train_runs: Some(16),
            train_steps: Some(4_000),
            train_tokens: Some(8 << 20),
            train_ms: Some(3_600_000),
        }
    }

    /// Fit maxima: no module's `fit` gets more than this. A fit runs once
    /// per dev set, by the operator (`tessera eval`), not per user request,
    /// so it may take what an hour of work on a 2-core host does; a fit
    /// that does not ask gets its request's grant, which is within these.
    pub fn builtin_fit_maxima() -> Budgets {
        Budgets {
            deadline_ms: Some(3_600_000),
            memory_mib: Some(512),
            fuel: Some(500_000_000_000),
            // 32 members x 400 dev items x 2 calls (score and calibrate)
            // with room to spare; each call is still bounded by `tokens`.
            host_calls: Some(32_768),
            tokens: Some(1 << 20),
            output_bytes: Some(16 << 20),
            trace_events: Some(16_384),
            resources: Some(1_024),
            merges: Some(256),
            provenance_bytes: Some(16 << 20),
            merge_memory_mib: Some(4096),
            train_runs: Some(16),
            train_steps: Some(4_000),
            train_tokens: Some(8 << 20),
            train_ms: Some(3_600_000),
        }
    }

    /// Reads a policy file; the error names the file and the problem.
    pub fn from_file(path: &Path) -> Result<Self, crate::files::FileError> {
        crate::files::read_toml(path)
    }

    /// The grant for `manifest` over a pool with members `pool`.
    pub fn grant(&self, manifest: &Manifest, pool: &[String]) -> Grant {
        // Wanted: the module's ask, else the operator's default (which falls
        // back to the built-in one); granted: that, capped by the maximum.
        let d = self.defaults.or(&Policy::builtin_defaults());
        // A `[maxima]` table that names only some budgets caps the others at
        // the built-in maxima: leaving a budget out never uncaps it.
        let m = self.maxima.or(&Policy::builtin_maxima());
        let allowed = self
            .modules
            .get(&manifest.name)
            .and_then(|p| p.models.clone())
            .unwrap_or_else(|| self.models.clone());
        let matches = |list: &[String], id: &str| list.iter().any(|x| x == "*" || x == id);
        let models = pool
            .iter()
            .filter(|id| matches(&manifest.models, id) && matches(&allowed, id))
            .cloned()
            .collect();
        capped(&manifest.name, models, &manifest.budgets.or(&d), &m)
    }

    /// The grant for `manifest`'s `fit`: each budget its `fit_budgets` asks
    /// for, else its request grant ([`Policy::grant`]), capped by the fit
    /// maxima. Members are the request's: a fit learns about the members
    /// that will answer.
    pub fn fit_grant(&self, manifest: &Manifest, pool: &[String]) -> Grant {
        let request = self.grant(manifest, pool);
        let m = self.fit_maxima.or(&Policy::builtin_fit_maxima());
        let want = manifest.fit_budgets.or(&request.budgets());
        capped(&manifest.name, request.models, &want, &m)
    }
}

/// The grant of `want` capped by `max`, field by field (a budget neither
/// sets is 0, a maximum not set does not cap).
fn capped(module: &str, models: Vec<String>, want: &Budgets, max: &Budgets) -> Grant {
    let pick = |want: Option<u64>, max: Option<u64>| -> u64 {
        let want = want.unwrap_or(0);
        max.map_or(want, |m| want.min(m))
    };
    let u = |x: Option<u32>| x.map(u64::from);
    let (w, m) = (want, max);
    Grant {
        module: module.to_string(),
        models,
        deadline: Duration::from_millis(pick(w.deadline_ms, m.deadline_ms)),
        // The sandbox's memory pool bounds every grant, whatever the policy says.
        memory_bytes: (pick(w.memory_mib, m.memory_mib) << 20).min(MAX_MEMORY_BYTES as u64),
        fuel: pick(w.fuel, m.fuel),
        host_calls: pick(u(w.host_calls), u(m.host_calls)) as u32,
        tokens: pick(u(w.tokens), u(m.tokens)) as u32,
        output_bytes: pick(w.output_bytes, m.output_bytes),
        trace_events: pick(u(w.trace_events), u(m.trace_events)) as u32,
        resources: pick(u(w.resources), u(m.resources)) as u32,
        merges: pick(u(w.merges), u(m.merges)) as u32,
        provenance_bytes: pick(w.provenance_bytes, m.provenance_bytes),
        merge_memory_bytes: pick(w.merge_memory_mib, m.merge_memory_mib) << 20,
        train_runs: pick(u(w.train_runs), u(m.train_runs)) as u32,
        train_steps: pick(u(w.train_steps), u(m.train_steps)) as u32,
        train_tokens: pick(w.train_tokens, m.train_tokens),
        train_time: Duration::from_millis(pick(w.train_ms, m.train_ms)),
        charge_limit: None,
    }
}

impl Budgets {
    /// Whether no budget is set (a manifest that does not ask).
    pub fn is_unset(&self) -> bool {
        *self == Budgets::default()
    }

    /// Every unset field taken from `fallback`.
    pub fn or(&self, fallback: &Budgets) -> Budgets {
        Budgets {
            deadline_ms: self.deadline_ms.or(fallback.deadline_ms),
            memory_mib: self.memory_mib.or(fallback.memory_mib),
            fuel: self.fuel.or(fallback.fuel),
            host_calls: self.host_calls.or(fallback.host_calls),
            tokens: self.tokens.or(fallback.tokens),
            output_bytes: self.output_bytes.or(fallback.output_bytes),
            trace_events: self.trace_events.or(fallback.trace_events),
            resources: self.resources.or(fallback.resources),
            merges: self.merges.or(fallback.merges),
            provenance_bytes: self.provenance_bytes.or(fallback.provenance_bytes),
            merge_memory_mib: self.merge_memory_mib.or(fallback.merge_memory_mib),
            train_runs: self.train_runs.or(fallback.train_runs),
            train_steps: self.train_steps.or(fallback.train_steps),
            train_tokens: self.train_tokens.or(fallback.train_tokens),
            train_ms: self.train_ms.or(fallback.train_ms),
        }
    }
}

/// What one request of one module is allowed: the intersection of its
/// manifest and the operator's policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Grant {
    /// The module it is for (its manifest's name): what a kept trained
    /// member records as its owner.
    #[serde(default)]
    pub module: String,
    /// Members it may call.
    pub models: Vec<String>,
    /// Wall-clock limit for the request.
    pub deadline: Duration,
    /// Linear-memory cap in bytes.
    pub memory_bytes: u64,
    /// Fuel.
    pub fuel: u64,
    /// Model calls.
    pub host_calls: u32,
    /// Generated tokens.
    pub tokens: u32,
    /// Response size in bytes.
    pub output_bytes: u64,
    /// Trace events.
    pub trace_events: u32,
    /// Simultaneous host resources.
    pub resources: u32,
    /// Merged members it may create per request (0 = none).
    pub merges: u32,
    /// Provenance bytes the request may accumulate.
    pub provenance_bytes: u64,
    /// Bytes the merged and trained members it holds at once may take
    /// together.
    pub merge_memory_bytes: u64,
    /// Training runs it may start (0 = none).
    pub train_runs: u32,
    /// Optimizer steps its training may take in all.
    pub train_steps: u32,
    /// Tokens its training may run through the model in all.
    pub train_tokens: u64,
    /// Wall time its training may take in all.
    pub train_time: Duration,
    /// The most the request may be charged in tokens
    /// ([`crate::UsageReport::charged`]: read, written, scored and trained),
    /// set by a face that bills a quota (the server: what the tenant has
    /// left today); `None` for no such limit. Not a manifest budget: it is
    /// the caller's, and a call that would pass it ends the request with
    /// `budget exhausted: tenant-tokens`.
    #[serde(default)]
    pub charge_limit: Option<u64>,
}

impl Grant {
    /// The grant as budgets (each one set): what a fit that asks for
    /// nothing else wants ([`Policy::fit_grant`]).
    pub fn budgets(&self) -> Budgets {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        Budgets {
            deadline_ms: Some(ms(self.deadline)),
            memory_mib: Some(self.memory_bytes >> 20),
            fuel: Some(self.fuel),
            host_calls: Some(self.host_calls),
            tokens: Some(self.tokens),
            output_bytes: Some(self.output_bytes),
            trace_events: Some(self.trace_events),
            resources: Some(self.resources),
            merges: Some(self.merges),
            provenance_bytes: Some(self.provenance_bytes),
            merge_memory_mib: Some(self.merge_memory_bytes >> 20),
            train_runs: Some(self.train_runs),
            train_steps: Some(self.train_steps),
            train_tokens: Some(self.train_tokens),
            train_ms: Some(ms(self.train_time)),
        }
    }
}

impl Manifest {
    /// Reads a manifest; the error names the file and the problem.
    pub fn from_file(path: &Path) -> Result<Self, crate::files::FileError> {
        crate::files::read_toml(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(models: &[&str], budgets: Budgets) -> Manifest {
        Manifest {
            name: "m".into(),
            version: "0.1.0".into(),
            author: "a".into(),
            world: World::Strategy,
            description: "d".into(),
            models: models.iter().map(|s| s.to_string()).collect(),
            budgets,
            fit_budgets: Budgets::default(),
            config: BTreeMap::new(),
        }
    }

    #[test]
    fn grant_is_the_intersection() {
        let mut policy = Policy::default();
        policy.modules.insert(
            "m".into(),
            ModulePolicy {
                models: Some(vec!["a".into(), "b".into()]),
            },
        );
        let pool = vec!["a".to_string(), "b".into(), "c".into()];
        let g = policy.grant(&manifest(&["b", "c"], Budgets::default()), &pool);
        assert_eq!(g.models, vec!["b".to_string()]);
    }

    #[test]
    fn asks_are_capped_by_maxima_and_defaults_fill_gaps() {
        let policy = Policy::default();
        let ask = Budgets {
            tokens: Some(10_000_000),
            host_calls: Some(3),
            ..Default::default()
        };
        let g = policy.grant(&manifest(&["*"], ask), &[]);
        assert_eq!(g.tokens, 65_536);
        assert_eq!(g.host_calls, 3);
        assert_eq!(g.memory_bytes, 64 << 20);
    }

    #[test]
    fn example_policy_parses_and_applies() {
        let policy: Policy = toml::from_str(include_str!("../../../examples/policy.toml")).unwrap();
        let mut m = manifest(
            &["*"],
            Budgets {
                tokens: Some(1_000_000),
                ..Default::default()
            },
        );
        m.name = "prompt-router".into();
        let g = policy.grant(&m, &["smollm2-135m-instruct".into(), "all-minilm-l6-v2".into()]);
        assert_eq!(g.models, vec!["smollm2-135m-instruct".to_string()]);
        assert_eq!(g.tokens, 32_768);
        assert_eq!(g.deadline, Duration::from_secs(60));
        m.fit_budgets.host_calls = Some(100_000);
        let f = policy.fit_grant(&m, &["smollm2-135m-instruct".into()]);
        assert_eq!((f.host_calls, f.tokens), (8_192, 32_768));
    }

    #[test]
    fn memory_grants_never_exceed_the_sandbox_pool() {
        let mut policy = Policy::default();
        policy.maxima.memory_mib = Some(1 << 20);
        let g = policy.grant(
            &manifest(
                &["*"],
                Budgets {
                    memory_mib: Some(1 << 20),
                    ..Default::default()
                },
            ),
            &[],
        );
        assert_eq!(g.memory_bytes, MAX_MEMORY_BYTES as u64);
    }

    #[test]
    fn a_fit_gets_its_request_grant_unless_it_asks() {
        let policy = Policy::default();
        let mut m = manifest(
            &["*"],
            Budgets {
                host_calls: Some(4_096),
                tokens: Some(1_024),
                ..Default::default()
            },
        );
        let pool = ["a".to_string()];
        // No fit ask: the fit is granted exactly what a request is.
        assert_eq!(policy.fit_grant(&m, &pool), policy.grant(&m, &pool));
        // A fit ask goes past the request maxima, up to the fit maxima.
        m.fit_budgets = Budgets {
            host_calls: Some(16_384),
            deadline_ms: Some(10_000_000),
            ..Default::default()
        };
        let (r, f) = (policy.grant(&m, &pool), policy.fit_grant(&m, &pool));
        assert_eq!(r.host_calls, 1_024);
        assert_eq!(f.host_calls, 16_384);
        assert_eq!(f.deadline, Duration::from_millis(3_600_000));
        // What the fit does not ask stays the request's.
        assert_eq!(
            (f.tokens, f.fuel, f.models.clone()),
            (r.tokens, r.fuel, r.models.clone())
        );
    }

    #[test]
    fn the_operator_caps_fits_too() {
        // Fit maxima cap what a fit asks and what it inherits; a fit
        // maximum left out stays at the built-in one.
        let policy: Policy = toml::from_str(
            "[fit_maxima]
host_calls = 2000
tokens = 100
",
        )
        .unwrap();
        let mut m = manifest(
            &["*"],
            Budgets {
                tokens: Some(1_024),
                ..Default::default()
            },
        );
        m.fit_budgets = Budgets {
            host_calls: Some(1 << 30),
            train_steps: Some(1 << 30),
            ..Default::default()
        };
        let f = policy.fit_grant(&m, &[]);
        assert_eq!(f.host_calls, 2_000);
        assert_eq!(f.tokens, 100);
        assert_eq!(f.train_steps, 4_000);
        let parsed: Manifest = toml::from_str(
            "name='m'\nversion='0.1.0'\nauthor='a'\nworld='strategy'\ndescription='d'\n[fit_budgets]\nhost_calls=9000\n",
        )
        .unwrap();
        assert_eq!(parsed.fit_budgets.host_calls, Some(9_000));
        // A manifest that asks nothing for its fit serialises as before fit
        // budgets existed: evaluation caches keyed on it stay valid.
        let plain = serde_json::to_string(&manifest(&["*"], Budgets::default())).unwrap();
        assert!(!plain.contains("fit_budgets"), "{plain}");
        assert!(serde_json::to_string(&parsed).unwrap().contains("fit_budgets"));
    }

    #[test]
    fn maxima_left_out_of_a_policy_stay_at_the_builtin_ones() {
        // An operator who caps only tokens must not uncap host calls.
        let policy: Policy = toml::from_str("[maxima]\ntokens = 100\n").unwrap();
        let ask = Budgets {
            host_calls: Some(50_000),
            deadline_ms: Some(10_000_000),
            provenance_bytes: Some(u64::MAX),
            ..Default::default()
        };
        let g = policy.grant(&manifest(&["*"], ask), &[]);
        assert_eq!(g.tokens, 100);
        assert_eq!(g.host_calls, 1_024);
        assert_eq!(g.deadline, Duration::from_millis(600_000));
        assert_eq!(g.provenance_bytes, 4 << 20);
    }

    #[test]
    fn manifest_rejects_unknown_keys() {
        let err = toml::from_str::<Manifest>(
            "name='x'\nversion='1'\nauthor='a'\nworld='strategy'\ndescription='d'\nbudgetz={}\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("budgetz"), "{err}");
    }
}
