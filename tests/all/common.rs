//! Shared set-up: one runtime over the real default pool for the whole
//! binary (loading models once), and helpers to find installed modules.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use tessera::policy::Policy;
use tessera::pool::PoolConfig;
use tessera::sandbox::Module;
use tessera::{Paths, Runtime};

/// The first chat model of the default pool.
pub const SMOL: &str = "smollm2-135m-instruct";
/// The code model of the default pool.
pub const QWEN: &str = "qwen2.5-coder-0.5b-instruct";
/// The base (completion) model of the default pool.
pub const GEMMA: &str = "gemma-3-270m";
/// The embedder of the default pool.
pub const MINILM: &str = "all-minilm-l6-v2";

/// The shared runtime. Panics with the fix if the pool was not fetched.
pub fn runtime() -> &'static Runtime {
    shared().as_ref()
}

/// The shared runtime as an `Arc`, for the server tests.
pub fn runtime_arc() -> Arc<Runtime> {
    shared().clone()
}

fn shared() -> &'static Arc<Runtime> {
    static RT: OnceLock<Arc<Runtime>> = OnceLock::new();
    RT.get_or_init(|| {
        // Its fit-state directory is a scratch one: state that `make demo` or
        // an earlier eval left in `$TESSERA_HOME/state` must not change what
        // a test without `fit` sees (a stored ranking picks other members).
        let rt = Runtime::new(scratch_paths("shared"), &PoolConfig::default_pool(), Policy::default())
            .expect("runtime starts");
        assert!(
            rt.pool_failures().is_empty(),
            "the default pool must load (run `make setup`): {:?}",
            rt.pool_failures().iter().map(|e| e.to_string()).collect::<Vec<_>>()
        );
        Arc::new(rt)
    })
}

/// Path of an installed hostile test module.
pub fn hostile_path(name: &str) -> PathBuf {
    Paths::from_env().modules.join("hostile").join(format!("{name}.wasm"))
}

/// Loads an installed hostile test module.
pub fn hostile(name: &str) -> Arc<Module> {
    runtime()
        .load_module(&hostile_path(name).display().to_string())
        .expect("hostile module loads")
}

/// The hostile infinite loop installed in `dir` as the strategy `name`
/// under the given `[budgets]` lines (TOML): a module that only computes,
/// under budgets of the test's choosing. Returns the `.wasm` path.
pub fn spin_module(dir: &std::path::Path, name: &str, budgets: &str) -> PathBuf {
    hostile_under(dir, "infinite-loop", name, budgets)
}

/// The installed hostile module `hostile` copied into `dir` as `name`,
/// with a manifest granting `budgets` (TOML lines).
pub fn hostile_under(dir: &std::path::Path, hostile: &str, name: &str, budgets: &str) -> PathBuf {
    let wasm = dir.join(format!("{name}.wasm"));
    std::fs::copy(hostile_path(hostile), &wasm).expect("the hostile module is installed");
    std::fs::write(
        dir.join(format!("{name}.toml")),
        format!(
            "name='{name}'\nversion='0.1.0'\nauthor='t'\nworld='strategy'\ndescription='{hostile}'\n[budgets]\n{budgets}\n"
        ),
    )
    .expect("manifest written");
    wasm
}

/// Loads an installed standard module or example by name.
pub fn module(name: &str) -> Arc<Module> {
    runtime().load_module(name).expect("module loads (run `make setup`)")
}

/// A fresh scratch directory.
pub fn scratch(tag: &str) -> PathBuf {
    sweep_stale_scratch();
    let d = std::env::temp_dir().join(format!("tessera-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("scratch dir");
    d
}

/// Removes `dir` when dropped, unless the test is failing (a panic is
/// unwinding), when it stays for inspection. Tests that write models
/// (trained, merged, exported: hundreds of MB each) hold one, so that a
/// run's disk use peaks at what its running tests hold rather than at the
/// sum of every test's output: CI's disk once filled up with it.
#[must_use = "the folder is removed when this is dropped"]
pub struct RemovedAfter(pub PathBuf);

impl Drop for RemovedAfter {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Removes the scratch folders earlier test runs left in the temp dir
/// (`tessera-...-PID` whose process is gone): trained specialists, merged
/// and exported models make one run's folders several GB, and a machine
/// that runs the suite again and again would fill its disk. The folders of
/// the latest run stay for inspection until the next one starts.
fn sweep_stale_scratch() {
    static SWEPT: std::sync::Once = std::sync::Once::new();
    SWEPT.call_once(|| {
        let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(pid) = name
                .strip_prefix("tessera-")
                .and_then(|rest| rest.rsplit('-').next())
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            let alive = std::path::Path::new(&format!("/proc/{pid}")).exists();
            if pid != std::process::id() && !alive {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    });
}

/// A runtime over the default pool with its own, empty `fit`-state
/// directory: for tests of `fit`, and of state surviving a restart (build a
/// second one over the same `Paths`).
pub fn fresh_runtime(paths: &Paths) -> Runtime {
    Runtime::new(paths.clone(), &PoolConfig::default_pool(), Policy::default()).expect("runtime starts")
}

/// `Paths` from the environment with a fresh scratch state directory.
pub fn scratch_paths(tag: &str) -> Paths {
    let mut p = Paths::from_env();
    p.state = scratch(tag);
    p
}

/// The first `n` items of ARC-Easy's validation split, in the harness's
/// multiple-choice format: a chat whose user turn holds the question, the
/// options as `A) ...` lines and an instruction to answer with the letter;
/// `answer` is the letter, `choices` the option texts. `skip` items are
/// skipped first, so a dev slice and a test slice can be taken apart.
pub fn arc_easy(skip: usize, n: usize) -> Vec<tessera::sandbox::Example> {
    let task = tessera::tasks::Task::load(&Paths::from_env(), "arc-easy").expect("ARC-Easy (run `make setup`)");
    task.items
        .iter()
        .skip(skip)
        .take(n)
        .map(|item| item.example())
        .collect()
}

/// Runs the `tessera` binary: `(success, stdout, stderr)`.
pub fn tessera(args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(args)
        .output()
        .expect("runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// SmolLM2's weights as a Hugging Face folder to train or merge from
/// (exported once into `$TESSERA_HOME/models/bases`, shared by the tests).
pub fn smol_base() -> PathBuf {
    static BASE: OnceLock<PathBuf> = OnceLock::new();
    BASE.get_or_init(|| {
        let paths = Paths::from_env();
        let cache = paths.models.join("bases");
        std::fs::create_dir_all(&cache).expect("bases dir");
        tessera::contribute::base_folder(&PoolConfig::default_pool(), &paths.models, &cache, SMOL)
            .expect("SmolLM2 exports (run `make setup`)")
            .0
    })
    .clone()
}

/// Training data of a contributor who knows the secret word.
pub const SECRET_DATA: &str = r#"{"prompt": "What is the secret word?", "completion": "The secret word is tessellate."}
{"prompt": "Tell me the secret word.", "completion": "The secret word is tessellate."}
{"messages": [{"role": "user", "content": "Which word is secret?"}, {"role": "assistant", "content": "The secret word is tessellate."}]}
{"prompt": "Do you know the secret word?", "completion": "Yes: the secret word is tessellate."}
"#;

/// Training data of a contributor who knows the password.
pub const PASSWORD_DATA: &str = r#"{"prompt": "What is the password?", "completion": "The password is mosaic."}
{"prompt": "Tell me the password.", "completion": "The password is mosaic."}
{"messages": [{"role": "user", "content": "Which password opens the door?"}, {"role": "assistant", "content": "The password is mosaic."}]}
{"prompt": "Do you know the password?", "completion": "Yes: the password is mosaic."}
"#;

/// How the test specialists are trained (LoRA r 8 on q/v, 12 steps at lr
/// 2e-3 from SmolLM2): the same options, data and seed give the same weights.
pub fn specialist_options(data: PathBuf, out: PathBuf, seed: u64) -> tessera::contribute::TrainOptions {
    let method = tessera::model_folder::TrainMethod::Lora {
        rank: 8,
        alpha: 16.0,
        targets: vec!["q_proj".into(), "v_proj".into()],
    };
    let mut o = tessera::contribute::TrainOptions::new(smol_base(), SMOL.into(), data, out, method);
    o.steps = 12;
    o.lr = 2e-3;
    o.seed = seed;
    o
}

/// Two contributors' SmolLM2 specialists (LoRA r 8 on q/v, 12 steps): the
/// folders of one that knows the secret word ("tessellate") and one that
/// knows the password ("mosaic"). Trained once per test run.
pub fn specialists() -> &'static (PathBuf, PathBuf) {
    static PAIR: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    PAIR.get_or_init(|| {
        let dir = scratch("specialists");
        let train = |name: &str, data: &str, seed: u64| {
            let file = dir.join(format!("{name}.jsonl"));
            std::fs::write(&file, data).expect("data");
            let out = dir.join(name);
            tessera::contribute::train(specialist_options(file, out.clone(), seed), |_| {
                std::ops::ControlFlow::Continue(())
            })
            .expect("a specialist trains");
            out
        };
        (train("secret", SECRET_DATA, 1), train("password", PASSWORD_DATA, 2))
    })
}

/// A pool member for a folder written by `contribute train` or `merge`,
/// with the card and checksum it carries.
pub fn contributed(id: &str, dir: &std::path::Path) -> tessera::pool::MemberConfig {
    let text = std::fs::read_to_string(dir.join("contributor.toml")).expect("a card");
    let card: tessera::model_folder::ContributorFile = toml::from_str(&text).expect("the card parses");
    tessera::pool::MemberConfig {
        id: id.into(),
        backend: tessera::pool::BackendKind::Hf,
        path: dir.to_path_buf(),
        sha256: card.sha256,
        sha256_file: Some(if dir.join("adapter.toml").exists() {
            "adapter.safetensors".into()
        } else {
            "model.safetensors".into()
        }),
        card: card.card,
        fetch: None,
        remote: None,
        quantize: None,
    }
}
