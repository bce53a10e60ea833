//! The chat-template renderer, built as a core WebAssembly module that the
//! host runs in a sandbox of its own.
//!
//! A chat template is Jinja source taken from a model file: code written by
//! whoever published the model, run on every chat request. minijinja's fuel
//! bounds the number of template instructions, but one instruction may do
//! unbounded native work (repeat a string 100 MB long, join a repeated
//! sequence, double a namespace attribute in a loop until it is gigabytes).
//! So the host does not render templates itself: it instantiates this
//! module per render with a memory cap and wasm fuel, and whatever the
//! template does ends that render with an error.
//!
//! The interface is two exports over linear memory, no imports:
//! - `alloc(len) -> ptr`: room for the request, written by the host;
//! - `render(ptr, len) -> u64`: reads the request (JSON: `source`, `bos`,
//!   `eos`, `messages` as `[role, content]` pairs, `add_generation_prompt`,
//!   `fuel`, `max_output`, `check_only`) and returns the answer's pointer
//!   in the high 32 bits and its length in the low 32. The answer is one
//!   status byte (0: the rendered text follows, 1: the template does not
//!   compile, 2: rendering failed on these messages, 3: the template ran
//!   past a limit; an error message follows) and UTF-8 text.

use minijinja::{context, Environment};
use serde::{Deserialize, Serialize};

#[derive(Deserialize)]
struct Request {
    source: String,
    bos: String,
    eos: String,
    messages: Vec<(String, String)>,
    add_generation_prompt: bool,
    fuel: u64,
    max_output: usize,
    check_only: bool,
}

#[derive(Serialize)]
struct Turn<'a> {
    role: &'a str,
    content: &'a str,
}

/// The render's output, refusing to grow past the request's `max_output`:
/// a template that writes far more than a model can read is a loop, and is
/// stopped as it writes.
struct Capped {
    out: Vec<u8>,
    max: usize,
}

impl std::io::Write for Capped {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.out.len() + buf.len() > self.max {
            return Err(std::io::Error::other(format!(
                "the chat template wrote more than {} bytes",
                self.max
            )));
        }
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

const OK: u8 = 0;
const COMPILE: u8 = 1;
const RENDER: u8 = 2;
const LIMIT: u8 = 3;

/// A render's failure: past a limit (the template's fault, however the
/// messages look) or not (often a template that insists on an order of
/// roles the messages do not follow).
fn failed(e: &minijinja::Error) -> Vec<u8> {
    let text = format!("{e:#}");
    let limit = matches!(
        e.kind(),
        minijinja::ErrorKind::OutOfFuel | minijinja::ErrorKind::WriteFailure
    ) || text.contains("recursion limit");
    answer(if limit { LIMIT } else { RENDER }, text.as_bytes())
}

fn answer(status: u8, text: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(text.len() + 1);
    v.push(status);
    v.extend_from_slice(text);
    v
}

fn run(input: &[u8]) -> Vec<u8> {
    let req: Request = match serde_json::from_slice(input) {
        Ok(r) => r,
        Err(e) => return answer(RENDER, format!("malformed request from the host: {e}").as_bytes()),
    };
    let mut env = Environment::new();
    env.set_fuel(Some(req.fuel));
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    if let Err(e) = env.add_template("chat", &req.source) {
        return answer(COMPILE, format!("{e:#}").as_bytes());
    }
    if req.check_only {
        return answer(OK, b"");
    }
    let tmpl = match env.get_template("chat") {
        Ok(t) => t,
        Err(e) => return answer(COMPILE, format!("{e:#}").as_bytes()),
    };
    let turns: Vec<Turn> = req
        .messages
        .iter()
        .map(|(role, content)| Turn { role, content })
        .collect();
    let mut out = Capped {
        out: Vec::new(),
        max: req.max_output,
    };
    let rendered = tmpl.render_captured_to(
        context! {
            messages => turns,
            add_generation_prompt => req.add_generation_prompt,
            bos_token => req.bos,
            eos_token => req.eos,
        },
        &mut out,
    );
    match rendered {
        Ok(_) => match std::str::from_utf8(&out.out) {
            Ok(_) => answer(OK, &out.out),
            Err(e) => answer(RENDER, format!("the template wrote invalid UTF-8: {e}").as_bytes()),
        },
        Err(e) => failed(&e),
    }
}

/// Room for `len` bytes of request; the host writes there and calls
/// [`render`]. The memory is handed to `render`, which frees it.
#[no_mangle]
pub extern "C" fn alloc(len: usize) -> *mut u8 {
    let mut v = Vec::<u8>::with_capacity(len);
    let p = v.as_mut_ptr();
    std::mem::forget(v);
    p
}

/// Renders the request at `ptr`/`len` (from [`alloc`]); see the crate docs
/// for the answer's layout. The instance is thrown away after one call, so
/// the answer is never freed.
///
/// # Safety
/// `ptr` must come from `alloc(len)` with `len` bytes written.
#[no_mangle]
pub unsafe extern "C" fn render(ptr: *mut u8, len: usize) -> u64 {
    // SAFETY: the caller passes back what `alloc(len)` returned, filled.
    let input = unsafe { Vec::from_raw_parts(ptr, len, len) };
    let out = run(&input);
    drop(input);
    let (p, n) = (out.as_ptr() as u64, out.len() as u64);
    std::mem::forget(out);
    (p << 32) | n
}
