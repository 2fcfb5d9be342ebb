//! Text in, token ids out: the checkpoint's own `tokenizer.json` (or the
//! vocabulary a GGUF file carries, see [`gguf`]) through the `tokenizers`
//! crate, and its chat template (from `tokenizer_config.json` or the GGUF
//! metadata) through minijinja.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

use serde_json::Value;

pub mod gguf;
pub use gguf::GgufVocabulary;

/// A tokenizer or chat template that cannot be used, naming its file.
#[derive(Debug, thiserror::Error)]
#[error("{}: {problem}", file.display())]
pub struct TextError {
    pub file: PathBuf,
    pub problem: String,
}

pub struct TextCodec {
    tokenizer: tokenizers::Tokenizer,
    file: PathBuf,
    /// Where the chat template came from (`tokenizer_config.json`, or the GGUF file).
    template_file: PathBuf,
    chat_template: Option<String>,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

fn special_token(config: &Value, key: &str) -> Option<String> {
    match config.get(key)? {
        Value::String(s) => Some(s.clone()),
        // Older configs store {"content": "<s>", ...}.
        other => other
            .get("content")
            .and_then(Value::as_str)
            .map(str::to_string),
    }
}

impl TextCodec {
    /// Load `tokenizer.json` (and `tokenizer_config.json` when present) from
    /// the checkpoint's folder.
    pub fn open(dir: &Path) -> Result<Self, TextError> {
        let file = dir.join("tokenizer.json");
        if !file.is_file() {
            return Err(TextError {
                file: file.clone(),
                problem: "no tokenizer.json beside the weights (give token ids with --tokens)"
                    .into(),
            });
        }
        let bytes = std::fs::read(&file).map_err(|e| TextError {
            file: file.clone(),
            problem: format!("cannot read it: {e}"),
        })?;
        let config_file = dir.join("tokenizer_config.json");
        let config = std::fs::read(&config_file).ok();
        Self::from_bytes(&file, &bytes, config.as_deref())
    }

    /// The same from bytes: `tokenizer.json` (named `file` in messages) and
    /// `tokenizer_config.json` when there is one.
    pub fn from_bytes(
        file: &Path,
        tokenizer_json: &[u8],
        config_json: Option<&[u8]>,
    ) -> Result<Self, TextError> {
        let file = file.to_path_buf();
        // The tokenizers crate panics on some malformed files instead of
        // returning an error (found by fuzzing): contain it.
        let loaded =
            probe_contract::guard::catch(|| tokenizers::Tokenizer::from_bytes(tokenizer_json))
                .map_err(|panic| TextError {
                    file: file.clone(),
                    problem: format!("cannot load the tokenizer: malformed ({panic})"),
                })?;
        let mut tokenizer = loaded.map_err(|e| TextError {
            file: file.clone(),
            problem: format!("cannot load the tokenizer: {e}"),
        })?;
        // A probe runs one sequence as it is: padding would add positions the
        // model attends to, truncation would drop text without a word.
        tokenizer.with_padding(None);
        tokenizer.with_truncation(None).map_err(|e| TextError {
            file: file.clone(),
            problem: format!("cannot turn off truncation: {e}"),
        })?;
        let config_file = file.with_file_name("tokenizer_config.json");
        let config: Value = match config_json {
            Some(bytes) => serde_json::from_slice(bytes).map_err(|e| TextError {
                file: config_file.clone(),
                problem: format!("invalid JSON: {e}"),
            })?,
            None => Value::Null,
        };
        Ok(TextCodec {
            tokenizer,
            file,
            template_file: config_file,
            chat_template: config
                .get("chat_template")
                .and_then(Value::as_str)
                .map(str::to_string),
            bos_token: special_token(&config, "bos_token"),
            eos_token: special_token(&config, "eos_token"),
        })
    }

    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// Token ids of `text`, with the tokenizer's own special tokens (BERT's
    /// [CLS] … [SEP]) as its post-processor adds them.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TextError> {
        self.encode_with(text, true)
    }

    /// Token ids of `text` without any special token: a continuation
    /// appended to an encoded prompt (a completion to force-decode).
    pub fn encode_continuation(&self, text: &str) -> Result<Vec<u32>, TextError> {
        self.encode_with(text, false)
    }

    fn encode_with(&self, text: &str, special: bool) -> Result<Vec<u32>, TextError> {
        let encoding = self
            .tokenizer
            .encode(text, special)
            .map_err(|e| TextError {
                file: self.file.clone(),
                problem: format!("cannot tokenize the text: {e}"),
            })?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The text as one user message under the model's chat template, with
    /// the prompt for the assistant's answer; tokenized without adding
    /// special tokens again (the template writes them).
    pub fn encode_chat(&self, text: &str) -> Result<Vec<u32>, TextError> {
        let Some(template) = &self.chat_template else {
            return Err(TextError {
                file: self.template_file.clone(),
                problem: "the model has no chat template".into(),
            });
        };
        let rendered = self.render_chat(template, text)?;
        self.encode_with(&rendered, false)
    }

    pub fn render_chat(&self, template: &str, text: &str) -> Result<String, TextError> {
        let fail = |e: minijinja::Error| TextError {
            file: self.template_file.clone(),
            problem: format!("chat template: {e}"),
        };
        let mut env = minijinja::Environment::new();
        env.add_template("chat", template).map_err(fail)?;
        let messages = vec![minijinja::context! { role => "user", content => text }];
        env.get_template("chat")
            .map_err(fail)?
            .render(minijinja::context! {
                messages => messages,
                add_generation_prompt => true,
                bos_token => self.bos_token.clone().unwrap_or_default(),
                eos_token => self.eos_token.clone().unwrap_or_default(),
            })
            .map_err(fail)
    }

    /// The text of one token, as the model would print it.
    pub fn token_text(&self, id: u32) -> String {
        self.tokenizer
            .decode(&[id], false)
            .unwrap_or_else(|_| self.tokenizer.id_to_token(id).unwrap_or_default())
    }
}

/// Whether the checkpoint in `dir` has a chat template: a
/// `tokenizer_config.json` with a `chat_template` text. Reads that file only.
pub fn has_chat_template(dir: &Path) -> bool {
    std::fs::read(dir.join("tokenizer_config.json"))
        .ok()
        .and_then(|bytes| serde_json::from_slice::<Value>(&bytes).ok())
        .is_some_and(|config| config.get("chat_template").is_some_and(Value::is_string))
}

/// The fuzz target `tokenizer_json`: bytes as `tokenizer.json` (and the same
/// bytes as a chat template): load, encode a text, apply the template.
#[doc(hidden)]
pub fn fuzz_tokenizer_json(bytes: &[u8]) {
    // Panics contained by `guard::catch` must not reach libFuzzer's hook.
    probe_contract::guard::install_quiet_hook();
    if let Ok(codec) = TextCodec::from_bytes(Path::new("tokenizer.json"), bytes, None) {
        let _ = codec.encode("The capital of France is Paris.");
        let _ = codec.render_chat(&String::from_utf8_lossy(bytes), "hi");
    }
}
