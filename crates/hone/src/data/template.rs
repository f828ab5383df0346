//! Chat templates: the model's own Jinja template (`chat_template` in tokenizer_config.json, or
//! chat_template.jinja) rendered with minijinja, with Python string methods as transformers'
//! Jinja has them. `{% generation %}…{% endgeneration %}` blocks (transformers' marker for
//! assistant tokens) are kept as spans so that loss can be put on them.

use crate::error::{Error, Result};
use crate::io::FileSet;
use serde::Serialize;

pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";
pub const CHAT_TEMPLATE_FILE: &str = "chat_template.jinja";

/// Fuel for one rendering beyond what its conversation pays for. minijinja charges fuel for
/// every instruction and for every 64 bytes of data an operator, filter or the output makes
/// (more for turning lists into text), so fuel bounds both time and memory. A real template
/// spends a few hundred fuel per message; a template from a model file that loops (nested
/// `range`s, recursion) or builds millions of items stops within a fraction of a second.
pub const TEMPLATE_FUEL: u64 = 1_000_000;

/// Fuel per message: a template's steps for each message (a tool-calling template runs a few
/// hundred instructions per turn, whatever its length).
pub const TEMPLATE_FUEL_PER_MESSAGE: u64 = 2_000;

/// Fuel per byte of the conversation (contents, roles, special tokens): 64 bytes of work per
/// byte given, so a long conversation renders and a short one cannot be made to cost seconds
/// and gigabytes (`['x'] * 6666666` turned into text did, within a fixed 20 M fuel).
pub const TEMPLATE_FUEL_PER_BYTE: u64 = 1;

/// The fuel one rendering of `messages` gets.
pub fn template_fuel(messages: &[Message], extra_bytes: usize) -> u64 {
    let bytes: usize = messages.iter().map(|m| m.role.len() + m.content.len()).sum::<usize>() + extra_bytes;
    TEMPLATE_FUEL
        .saturating_add(TEMPLATE_FUEL_PER_MESSAGE.saturating_mul(messages.len() as u64))
        .saturating_add(TEMPLATE_FUEL_PER_BYTE.saturating_mul(bytes as u64))
}

/// The most text one rendering may write: fuel bounds the steps, not what each step writes (a
/// loop over a long string can emit hundreds of MB within the fuel). A dataset line is at most
/// 64 MiB ([`crate::io::MAX_LINE_BYTES`]), so a real conversation's text stays far below.
pub const RENDERED_LIMIT: usize = 64 << 20;

/// Collects a rendering's bytes up to [`RENDERED_LIMIT`], then fails the write (which stops the
/// rendering).
#[derive(Default)]
struct Bounded {
    bytes: Vec<u8>,
    over: bool,
}

impl std::io::Write for Bounded {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.bytes.len() + buf.len() > RENDERED_LIMIT {
            self.over = true;
            return Err(std::io::Error::other("rendered text too long"));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

// Private-use characters that stand for the generation markers while rendering.
const GEN_START: char = '\u{F8F0}';
const GEN_END: char = '\u{F8F1}';

#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// A rendered conversation: the text, and the byte ranges inside `{% generation %}` blocks.
#[derive(Debug, Clone, PartialEq)]
pub struct Rendered {
    pub text: String,
    pub generation_spans: Vec<(usize, usize)>,
}

pub struct ChatTemplate {
    source: String,
    env: minijinja::Environment<'static>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    /// Whether the template marks assistant tokens with `{% generation %}`.
    pub has_generation_markers: bool,
    file: String,
}

/// `"<s>"` or `{"content": "<s>", ...}`, as tokenizer_config.json writes special tokens.
fn special_token(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(String::from),
        _ => None,
    }
}

impl ChatTemplate {
    pub fn new(source: &str, bos_token: Option<String>, eos_token: Option<String>, file: &str) -> Result<Self> {
        let has_generation_markers = source.contains("generation %}") || source.contains("generation -%}");
        let mut src = source.to_string();
        for (tag, ch) in [("generation", GEN_START), ("endgeneration", GEN_END)] {
            for (open, close) in [("{%", "%}"), ("{%-", "%}"), ("{%", "-%}"), ("{%-", "-%}")] {
                for space in [" ", ""] {
                    src = src.replace(&format!("{open}{space}{tag}{space}{close}"), &format!("{{{{ '{ch}' }}}}"));
                }
            }
        }
        if let Err((line, bytes)) = super::template_fold::check(&src) {
            let size = if bytes < 1 << 50 { format!("about {} MB", bytes.div_ceil(1 << 20)) } else { "data without bound".to_string() };
            return Err(Error::format(
                file,
                format!("chat template refused: the constant expression on its line {line} would make {size} while the template compiles, before any limit applies"),
            ));
        }
        let mut env = minijinja::Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", |_fmt: String| -> String { String::new() });
        env.add_template_owned("chat", src).map_err(|e| Error::format(file, format!("chat template does not parse: {e}")))?;
        Ok(ChatTemplate { source: source.to_string(), env, bos_token, eos_token, has_generation_markers, file: file.to_string() })
    }

    /// The model's template and special tokens, from tokenizer_config.json (or
    /// chat_template.jinja); `Ok(None)` when the model has no chat template.
    pub fn open(files: &dyn FileSet) -> Result<Option<Self>> {
        let cfg: Option<(String, serde_json::Value)> = match files.open(TOKENIZER_CONFIG_FILE)? {
            Some(src) => {
                let v = serde_json::from_slice(&src.read_all()?).map_err(|e| Error::format(src.name(), format!("invalid JSON: {e}")))?;
                Some((src.name().to_string(), v))
            }
            None => None,
        };
        let bos = cfg.as_ref().and_then(|(_, c)| special_token(c.get("bos_token")));
        let eos = cfg.as_ref().and_then(|(_, c)| special_token(c.get("eos_token")));
        if let Some(src) = files.open(CHAT_TEMPLATE_FILE)? {
            let text = String::from_utf8(src.read_all()?).map_err(|_| Error::format(src.name(), "not UTF-8"))?;
            return Self::new(&text, bos, eos, src.name()).map(Some);
        }
        let Some((file, cfg)) = cfg else { return Ok(None) };
        let template = match cfg.get("chat_template") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            // A list of named templates: the "default" one.
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template").and_then(|s| s.as_str()).map(String::from)),
            _ => None,
        };
        template.map(|t| Self::new(&t, bos, eos, &file)).transpose()
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders `messages` (and the assistant header after them when `add_generation_prompt`).
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<Rendered> {
        // Fuel is the environment's; a clone (its templates and functions are shared, not
        // copied) carries this conversation's.
        let specials = self.bos_token.as_ref().map_or(0, |t| t.len()) + self.eos_token.as_ref().map_or(0, |t| t.len());
        let mut env = self.env.clone();
        env.set_fuel(Some(template_fuel(messages, specials)));
        let tmpl = env.get_template("chat").expect("added");
        let mut out = Bounded::default();
        let rendered = tmpl.render_captured_to(
            minijinja::context! {
                messages => minijinja::value::Serde(messages),
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token.clone().unwrap_or_default(),
                eos_token => self.eos_token.clone().unwrap_or_default(),
            },
            &mut out,
        );
        if out.over {
            return Err(Error::format(&self.file, format!("chat template failed: it wrote more than {} MiB for one conversation", RENDERED_LIMIT >> 20)));
        }
        rendered.map_err(|e| Error::format(&self.file, format!("chat template failed: {e}")))?;
        let text = String::from_utf8(out.bytes).map_err(|e| Error::format(&self.file, format!("chat template failed: {e}")))?;
        let mut clean = String::with_capacity(text.len());
        let mut spans = Vec::new();
        let mut open = None;
        for ch in text.chars() {
            match ch {
                GEN_START => open = Some(clean.len()),
                GEN_END => {
                    if let Some(start) = open.take() {
                        spans.push((start, clean.len()));
                    }
                }
                c => clean.push(c),
            }
        }
        Ok(Rendered { text: clean, generation_spans: spans })
    }
}
