//! Chat templates: the model's own Jinja template from its metadata,
//! rendered with minijinja **inside a wasm sandbox**.
//!
//! A chat template is code written by whoever published the model, and it
//! runs on every chat request. minijinja's fuel bounds template
//! *instructions*, but one instruction can do unbounded native work: repeat
//! a string to 100 MB, stringify a repeated sequence of millions of items,
//! or double a namespace attribute in a loop until it holds gigabytes. (A
//! fuzzer found the first: a 420-byte template that took 15 s per render,
//! `fuzz/regressions/template-repeated-string-in-loop.bin`.) Bounding every
//! such operation inside the engine would mean auditing all of minijinja,
//! so the host does not render templates itself. The renderer
//! (`host/template-guest`, built into the host by `build.rs`) is a core
//! wasm module with no imports; each render gets a fresh instance with a
//! memory cap ([`TEMPLATE_MEMORY_BYTES`]), wasm fuel
//! ([`TEMPLATE_WASM_FUEL`]) and a deadline ([`TEMPLATE_DEADLINE`]), so
//! whatever a template does costs at most half a second of one core and
//! ends with an error.
//!
//! Templates written for Hugging Face's Python renderer call Python string
//! methods (`.strip()`, `.startswith()`); minijinja-contrib's pycompat layer
//! provides those. A model without a template (a base model) gets a plain
//! completion format instead, and its card says so.

use std::sync::OnceLock;

use wasmtime::{Config, Engine, Instance, Module, ResourceLimiter, Store, Trap};

use crate::inference::Message;

/// How a member turns chat turns into a prompt.
pub enum ChatFormat {
    /// The model's own Jinja template, checked to compile.
    Template { source: String, bos: String, eos: String },
    /// No template: turns are joined as `role: content` lines and the prompt
    /// ends with `assistant:`, a format base models continue reasonably.
    Plain,
}

/// Why a chat template cannot be used: it does not compile (the model
/// file's fault), or it fails on these messages (often a template that
/// insists on roles alternating, or on a system message first, or one that
/// ran past its limits).
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// The template's source is not valid Jinja.
    #[error("the chat template does not compile: {0}")]
    Compile(String),
    /// The template raised or failed on these messages (the caller may
    /// send them otherwise).
    #[error("rendering the chat template failed: {0}")]
    Render(String),
    /// The template ran past a limit of its sandbox: memory, instructions,
    /// time or output. The model file's fault, whatever the messages.
    #[error("the chat template ran past its limits: {0}")]
    Limit(String),
    /// The host could not start the sandboxed renderer (a server fault,
    /// not the template's).
    #[error("the chat-template renderer is unavailable: {0}")]
    Renderer(String),
}

/// Template instructions one render may run (minijinja's own fuel). Real
/// templates (ChatML, Llama, Gemma) use a few hundred instructions per
/// turn, so this leaves room for conversations of thousands of turns and
/// stops a hostile loop early with minijinja's clear "out of fuel" error.
pub const TEMPLATE_FUEL: u64 = 2_000_000;

/// Wasm instructions one render may run. A 200-turn ChatML conversation
/// takes about 2.4 million; a hostile loop of plain instructions stops at
/// this within about 0.1 s. Fuel alone is not a time bound (one bulk
/// memory copy of many megabytes costs one unit), hence also
/// [`TEMPLATE_DEADLINE`].
pub const TEMPLATE_WASM_FUEL: u64 = 600_000_000;

/// Wall-clock time one render may take, checked every [`TEMPLATE_TICK`].
/// Real renders take well under a millisecond; the margin is for a busy
/// machine that deschedules the rendering thread.
pub const TEMPLATE_DEADLINE: std::time::Duration = std::time::Duration::from_millis(500);

/// The grain at which [`TEMPLATE_DEADLINE`] is checked.
pub const TEMPLATE_TICK: std::time::Duration = std::time::Duration::from_millis(10);

/// Linear memory one render may use (the request, the messages as template
/// values and the output, with room to spare).
pub const TEMPLATE_MEMORY_BYTES: usize = 64 << 20;

/// Largest source accepted for a template (real ones are a few KiB).
pub const MAX_TEMPLATE_BYTES: usize = 256 << 10;

/// Largest prompt a template may write. The prompt goes to a model whose
/// input is capped at [`crate::inference::MAX_INPUT_BYTES`]; a template
/// that writes far more is a loop, not a chat format, and is stopped as it
/// writes rather than after building gigabytes.
pub const MAX_RENDER_BYTES: usize = 4 * crate::inference::MAX_INPUT_BYTES;

/// The renderer module, compiled once per process.
const GUEST: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/chat_template.wasm"));

struct Renderer {
    engine: Engine,
    module: Module,
}

fn renderer() -> Result<&'static Renderer, TemplateError> {
    static RENDERER: OnceLock<Result<Renderer, String>> = OnceLock::new();
    RENDERER
        .get_or_init(|| {
            let mut cfg = Config::new();
            cfg.consume_fuel(true).epoch_interruption(true).max_wasm_stack(1 << 20);
            let engine = Engine::new(&cfg).map_err(|e| format!("wasm engine: {e:#}"))?;
            let module = compiled(&engine)?;
            // The renderer lives as long as the process, and so does its
            // clock; the thread ends if the engine is ever dropped.
            let weak = engine.weak();
            std::thread::Builder::new()
                .name("tessera-template-clock".into())
                .spawn(move || {
                    while let Some(e) = weak.upgrade() {
                        e.increment_epoch();
                        drop(e);
                        std::thread::sleep(TEMPLATE_TICK);
                    }
                })
                .map_err(|e| format!("cannot start the renderer's clock: {e}"))?;
            Ok(Renderer { engine, module })
        })
        .as_ref()
        .map_err(|e| TemplateError::Renderer(e.clone()))
}

/// The renderer compiled for `engine`, from the precompiled-artifact cache
/// under `$TESSERA_HOME` when it is there: compiling takes about a second of
/// CPU, which every process that loads a model would otherwise pay.
fn compiled(engine: &Engine) -> Result<Module, String> {
    use sha2::{Digest, Sha256};
    let dir = crate::runtime::Paths::from_env().components;
    // A cache: without its directory the renderer is compiled every time.
    let _ = std::fs::create_dir_all(&dir);
    crate::sandbox::precompiled(
        engine,
        &dir,
        &hex::encode(Sha256::digest(GUEST)),
        || engine.precompile_module(GUEST),
        // SAFETY: `precompiled` hands these only this engine's own
        // `precompile_module` output, or a file it stored from it.
        |path| unsafe { Module::deserialize_file(engine, path) },
        |artifact| unsafe { Module::deserialize(engine, artifact) },
    )
    .map_err(|e| format!("the renderer {e}"))
}

/// Refuses linear memory past [`TEMPLATE_MEMORY_BYTES`] and remembers that
/// it did, so the trap that follows is reported as the memory cap.
struct Limits {
    refused: bool,
}

impl ResourceLimiter for Limits {
    fn memory_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        let ok = desired <= TEMPLATE_MEMORY_BYTES;
        self.refused |= !ok;
        Ok(ok)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= 1 << 16)
    }
}

/// What the renderer answered: the status byte and the text after it.
fn call(request: &serde_json::Value) -> Result<String, TemplateError> {
    let r = renderer()?;
    let fault = |what: &str, e: wasmtime::Error| TemplateError::Renderer(format!("{what}: {e:#}"));
    let input = serde_json::to_vec(request).map_err(|e| TemplateError::Renderer(e.to_string()))?;
    let len = u32::try_from(input.len()).map_err(|_| {
        TemplateError::Render(format!(
            "the conversation is {} bytes, too large to render",
            input.len()
        ))
    })?;
    let mut store = Store::new(&r.engine, Limits { refused: false });
    store.limiter(|l| l);
    store
        .set_fuel(TEMPLATE_WASM_FUEL)
        .map_err(|e| fault("setting fuel", e))?;
    store.set_epoch_deadline(TEMPLATE_DEADLINE.as_millis().div_ceil(TEMPLATE_TICK.as_millis()) as u64);
    let instance = Instance::new(&mut store, &r.module, &[]).map_err(|e| fault("instantiating", e))?;
    let memory = instance
        .get_memory(&mut store, "memory")
        .ok_or_else(|| TemplateError::Renderer("the renderer exports no memory".into()))?;
    let alloc = instance
        .get_typed_func::<u32, u32>(&mut store, "alloc")
        .map_err(|e| fault("export `alloc`", e))?;
    let render = instance
        .get_typed_func::<(u32, u32), u64>(&mut store, "render")
        .map_err(|e| fault("export `render`", e))?;
    let trapped = |store: &Store<Limits>, e: wasmtime::Error| {
        if store.data().refused {
            TemplateError::Limit(format!(
                "it used more than {} MiB of memory",
                TEMPLATE_MEMORY_BYTES >> 20
            ))
        } else if e.downcast_ref::<Trap>() == Some(&Trap::OutOfFuel) {
            TemplateError::Limit(format!("it ran {TEMPLATE_WASM_FUEL} wasm instructions"))
        } else if e.downcast_ref::<Trap>() == Some(&Trap::Interrupt) {
            TemplateError::Limit(format!("it ran for {} ms", TEMPLATE_DEADLINE.as_millis()))
        } else {
            TemplateError::Limit(format!("its renderer trapped: {e:#}"))
        }
    };
    let ptr = alloc.call(&mut store, len).map_err(|e| trapped(&store, e))?;
    memory
        .write(&mut store, ptr as usize, &input)
        .map_err(|e| TemplateError::Renderer(format!("writing the request: {e}")))?;
    let packed = render.call(&mut store, (ptr, len)).map_err(|e| trapped(&store, e))?;
    let (at, n) = ((packed >> 32) as usize, (packed & 0xffff_ffff) as usize);
    let answer = memory
        .data(&store)
        .get(at..at.saturating_add(n))
        .filter(|a| !a.is_empty())
        .ok_or_else(|| TemplateError::Renderer("the renderer's answer lies outside its memory".into()))?;
    let text = String::from_utf8_lossy(&answer[1..]).into_owned();
    match answer[0] {
        0 => Ok(text),
        1 => Err(TemplateError::Compile(text)),
        2 => Err(TemplateError::Render(text)),
        _ => Err(TemplateError::Limit(text)),
    }
}

impl ChatFormat {
    /// Compiles `source` once in the sandbox to check it; the error names
    /// the template problem.
    pub fn from_template(source: &str, bos: String, eos: String) -> Result<Self, TemplateError> {
        if source.len() > MAX_TEMPLATE_BYTES {
            return Err(TemplateError::Compile(format!(
                "the template is {} bytes; at most {MAX_TEMPLATE_BYTES} are accepted",
                source.len()
            )));
        }
        let format = ChatFormat::Template {
            source: source.to_string(),
            bos,
            eos,
        };
        format.run(&[], false, true)?;
        Ok(format)
    }

    /// Whether this is the model's own template.
    pub fn is_template(&self) -> bool {
        matches!(self, ChatFormat::Template { .. })
    }

    /// Renders `messages` ending with the prompt for the assistant's turn.
    pub fn render(&self, messages: &[Message]) -> Result<String, TemplateError> {
        self.render_with(messages, true)
    }

    /// Renders `messages`, with the prompt for the assistant's next turn only
    /// if `generation_prompt` is set. Training renders whole conversations
    /// without it, and uses the difference between the two renders to find
    /// which tokens are the assistant's.
    pub fn render_with(&self, messages: &[Message], generation_prompt: bool) -> Result<String, TemplateError> {
        self.run(messages, generation_prompt, false)
    }

    fn run(&self, messages: &[Message], generation_prompt: bool, check_only: bool) -> Result<String, TemplateError> {
        match self {
            ChatFormat::Template { source, bos, eos } => {
                let turns: Vec<(&str, &str)> = messages.iter().map(|m| (&*m.role, &*m.content)).collect();
                call(&serde_json::json!({
                    "source": source,
                    "bos": bos,
                    "eos": eos,
                    "messages": turns,
                    "add_generation_prompt": generation_prompt,
                    "fuel": TEMPLATE_FUEL,
                    "max_output": MAX_RENDER_BYTES,
                    "check_only": check_only,
                }))
            }
            ChatFormat::Plain => {
                let mut out = String::new();
                for m in messages {
                    out.push_str(&m.role);
                    out.push_str(": ");
                    out.push_str(&m.content);
                    out.push('\n');
                }
                if generation_prompt {
                    out.push_str("assistant:");
                }
                Ok(out)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml_template_renders_with_python_methods() {
        let src = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content.strip() }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
        let f = ChatFormat::from_template(src, "".into(), "<|im_end|>".into()).unwrap();
        let out = f.render(&[Message::user("  hi  ")]).unwrap();
        assert_eq!(out, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
    }

    #[test]
    fn plain_format_ends_with_assistant_turn() {
        let out = ChatFormat::Plain.render(&[Message::user("2+2?")]).unwrap();
        assert_eq!(out, "user: 2+2?\nassistant:");
    }

    #[test]
    fn broken_template_is_a_readable_error() {
        let err = ChatFormat::from_template("{% for %}", "".into(), "".into())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("does not compile"), "{err}");
    }
}
