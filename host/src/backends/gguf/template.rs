//! Chat templates: the model's own Jinja template from its metadata, rendered
//! with minijinja.
//!
//! Templates written for Hugging Face's Python renderer call Python string
//! methods (`.strip()`, `.startswith()`); minijinja-contrib's pycompat layer
//! provides those. A model without a template (a base model) gets a plain
//! completion format instead, and its card says so.

use minijinja::{context, Environment};
use serde::Serialize;

use crate::inference::Message;

/// How a member turns chat turns into a prompt.
pub enum ChatFormat {
    /// The model's own Jinja template.
    Template {
        env: Box<Environment<'static>>,
        bos: String,
        eos: String,
    },
    /// No template: turns are joined as `role: content` lines and the prompt
    /// ends with `assistant:`, a format base models continue reasonably.
    Plain,
}

#[derive(Serialize)]
struct TemplateMessage<'a> {
    role: &'a str,
    content: &'a str,
}

/// Why a chat template cannot be used: it does not compile (the model
/// file's fault), or it fails on these messages (often a template that
/// insists on roles alternating, or on a system message first).
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// The template's source is not valid Jinja.
    #[error("the chat template does not compile: {0}")]
    Compile(#[source] minijinja::Error),
    /// The template raised or failed while rendering these messages.
    #[error("rendering the chat template failed: {0}")]
    Render(#[source] minijinja::Error),
}

/// Template instructions one render may run. A model file's template is a
/// contributor's code, run on every chat request: without a bound, nested
/// loops over `range` (or a recursive macro) would hold a worker for hours
/// and grow its output without end. Real templates (ChatML, Llama, Gemma)
/// use a few hundred instructions per turn, so this leaves room for
/// conversations of thousands of turns and stops a hostile loop within
/// about a second.
pub const TEMPLATE_FUEL: u64 = 2_000_000;

/// Largest source accepted for a template (real ones are a few KiB).
pub const MAX_TEMPLATE_BYTES: usize = 256 << 10;

/// Largest prompt a template may write. The prompt goes to a model whose
/// input is capped at [`crate::inference::MAX_INPUT_BYTES`]; a template
/// that writes far more is a loop, not a chat format, and is stopped as it
/// writes rather than after building gigabytes.
pub const MAX_RENDER_BYTES: usize = 4 * crate::inference::MAX_INPUT_BYTES;

/// The render's output, refusing to grow past [`MAX_RENDER_BYTES`].
struct Capped(Vec<u8>);

impl std::io::Write for Capped {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.0.len() + buf.len() > MAX_RENDER_BYTES {
            return Err(std::io::Error::other(format!(
                "the chat template wrote more than {MAX_RENDER_BYTES} bytes"
            )));
        }
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl ChatFormat {
    /// Compiles `source`; the error names the template problem.
    pub fn from_template(source: &str, bos: String, eos: String) -> Result<Self, TemplateError> {
        if source.len() > MAX_TEMPLATE_BYTES {
            return Err(TemplateError::Compile(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                format!(
                    "the template is {} bytes; at most {MAX_TEMPLATE_BYTES} are accepted",
                    source.len()
                ),
            )));
        }
        let mut env = Environment::new();
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_template_owned("chat", source.to_string())
            .map_err(TemplateError::Compile)?;
        Ok(ChatFormat::Template {
            env: Box::new(env),
            bos,
            eos,
        })
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
        match self {
            ChatFormat::Template { env, bos, eos } => {
                let msgs: Vec<TemplateMessage> = messages
                    .iter()
                    .map(|m| TemplateMessage {
                        role: &m.role,
                        content: &m.content,
                    })
                    .collect();
                let tmpl = env.get_template("chat").map_err(TemplateError::Compile)?;
                let mut out = Capped(Vec::new());
                tmpl.render_captured_to(
                    context! {
                        messages => msgs,
                        add_generation_prompt => generation_prompt,
                        bos_token => bos,
                        eos_token => eos,
                    },
                    &mut out,
                )
                .map_err(TemplateError::Render)?;
                String::from_utf8(out.0).map_err(|e| {
                    TemplateError::Render(minijinja::Error::new(
                        minijinja::ErrorKind::InvalidOperation,
                        format!("the template wrote invalid UTF-8: {e}"),
                    ))
                })
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
