//! A tokenizer from the vocabulary a GGUF file carries (`tokenizer.ggml.*`),
//! so `--text` works on a GGUF file alone.
//!
//! llama.cpp keeps the pieces of a Hugging Face `tokenizer.json` — the
//! tokens, the BPE merges, which tokens are special, the BOS/EOS ids and
//! whether to add BOS — and names the pre-tokenizer (`tokenizer.ggml.pre`)
//! instead of storing it. probe rebuilds the `tokenizer.json` those pieces
//! came from and loads it through the `tokenizers` crate. Byte-level BPE
//! (`gpt2` model: SmolLM, Qwen, Llama 3, GPT-2) is rebuilt for the
//! pre-tokenizers below; any other model or pre-tokenizer is refused by
//! name, never guessed, since a wrong split gives wrong token ids silently.

use std::path::Path;

use serde_json::{json, Value};

use crate::{TextCodec, TextError};

/// The `tokenizer.ggml.*` metadata of a GGUF file.
#[derive(Clone, Debug, Default)]
pub struct GgufVocabulary<'a> {
    /// `tokenizer.ggml.model`: `gpt2` (byte-level BPE), `llama` (SentencePiece), …
    pub model: &'a str,
    /// `tokenizer.ggml.pre`: llama.cpp's name of the pre-tokenizer.
    pub pre: Option<&'a str>,
    pub tokens: &'a [String],
    pub merges: Option<&'a [String]>,
    /// `tokenizer.ggml.token_type`: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
    pub token_types: Option<Vec<i64>>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub add_bos: bool,
    pub add_eos: bool,
    pub chat_template: Option<&'a str>,
}

/// Qwen2's and Llama 3's splits (as their `tokenizer.json` and llama.cpp's
/// `llama-vocab.cpp` write them): they differ in digits, one or up to three.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The Hugging Face pre-tokenizer and normalizer of a llama.cpp
/// pre-tokenizer name (llama.cpp's `llama-vocab.cpp` lists the regexes).
fn pre_tokenizer(pre: &str) -> Option<(Value, Value)> {
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let split = |pattern: &str| json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false});
    Some(match pre {
        "gpt2" | "default" | "gpt-2" => (
            json!({"type": "Sequence", "pretokenizers": [byte_level(true)]}),
            Value::Null,
        ),
        // GPT-2's regex after splitting every digit apart.
        "smollm" | "starcoder" | "refact" | "codeshell" => (
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true},
                byte_level(true)
            ]}),
            Value::Null,
        ),
        "qwen2" | "deepseek-r1-qwen" => (
            json!({"type": "Sequence", "pretokenizers": [split(QWEN2_SPLIT), byte_level(false)]}),
            json!({"type": "NFC"}),
        ),
        "llama3" | "llama-bpe" | "llama-v3" | "smaug-bpe" | "dbrx" => (
            json!({"type": "Sequence", "pretokenizers": [split(LLAMA3_SPLIT), byte_level(false)]}),
            Value::Null,
        ),
        _ => return None,
    })
}

impl TextCodec {
    /// The tokenizer a GGUF file describes; `file` (the GGUF) is named in
    /// every message.
    pub fn from_gguf(file: &Path, vocab: &GgufVocabulary) -> Result<Self, TextError> {
        let fail = |problem: String| TextError {
            file: file.to_path_buf(),
            problem,
        };
        if vocab.model != "gpt2" {
            return Err(fail(format!(
                "its tokenizer (`tokenizer.ggml.model` = `{}`) is not byte-level BPE, the one kind probe rebuilds from GGUF metadata; give token ids with --tokens, or put the model's tokenizer.json beside the file",
                vocab.model
            )));
        }
        let pre = vocab.pre.unwrap_or("default");
        let (pre_tokenizer, normalizer) = pre_tokenizer(pre).ok_or_else(|| {
            fail(format!(
                "its pre-tokenizer `{pre}` (`tokenizer.ggml.pre`) is not one probe knows (gpt2, smollm, starcoder, qwen2, llama3 and their aliases); give token ids with --tokens, or put the model's tokenizer.json beside the file"
            ))
        })?;
        let merges = vocab.merges.ok_or_else(|| {
            fail("its byte-level BPE vocabulary has no `tokenizer.ggml.merges`".into())
        })?;
        let types = vocab.token_types.clone().unwrap_or_default();
        // Control tokens are matched whole and never split, as llama.cpp does.
        let control = 3;
        let added: Vec<Value> = vocab
            .tokens
            .iter()
            .enumerate()
            .filter(|(i, _)| types.get(*i) == Some(&control))
            .map(|(i, token)| {
                json!({"id": i, "content": token, "single_word": false, "lstrip": false,
                       "rstrip": false, "normalized": false, "special": true})
            })
            .collect();
        let byte_level_post = json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true});
        let special = |id: Option<u32>, what: &str| -> Result<Option<(String, u32)>, TextError> {
            match id {
                None => Ok(None),
                Some(id) => vocab
                    .tokens
                    .get(id as usize)
                    .map(|t| Some((t.clone(), id)))
                    .ok_or_else(|| {
                        fail(format!(
                            "its {what} token id {id} is past the vocabulary of {}",
                            vocab.tokens.len()
                        ))
                    }),
            }
        };
        let bos = special(vocab.bos, "BOS")?;
        let eos = special(vocab.eos, "EOS")?;
        let post_processor = if vocab.add_bos || vocab.add_eos {
            let missing =
                |what: &str| fail(format!("it asks to add {what} but names no {what} token"));
            let bos = vocab
                .add_bos
                .then(|| bos.clone().ok_or_else(|| missing("BOS")))
                .transpose()?;
            let eos = vocab
                .add_eos
                .then(|| eos.clone().ok_or_else(|| missing("EOS")))
                .transpose()?;
            let piece =
                |(token, _): &(String, u32)| json!({"SpecialToken": {"id": token, "type_id": 0}});
            let mut single: Vec<Value> = bos.iter().map(piece).collect();
            single.push(json!({"Sequence": {"id": "A", "type_id": 0}}));
            single.extend(eos.iter().map(piece));
            let specials: serde_json::Map<String, Value> = bos
                .iter()
                .chain(eos.iter())
                .map(|(token, id)| {
                    (
                        token.clone(),
                        json!({"id": token, "ids": [id], "tokens": [token]}),
                    )
                })
                .collect();
            json!({"type": "Sequence", "processors": [
                byte_level_post,
                {"type": "TemplateProcessing", "single": single, "pair": single, "special_tokens": specials}
            ]})
        } else {
            byte_level_post
        };
        let vocab_map: serde_json::Map<String, Value> = vocab
            .tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), json!(i)))
            .collect();
        let tokenizer = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": normalizer,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": post_processor,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {
                "type": "BPE", "dropout": null, "unk_token": null,
                "continuing_subword_prefix": null, "end_of_word_suffix": null,
                "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                "vocab": vocab_map, "merges": merges,
            },
        });
        let config = json!({
            "chat_template": vocab.chat_template,
            "bos_token": bos.map(|(t, _)| t),
            "eos_token": eos.map(|(t, _)| t),
        });
        let tokenizer_json = serde_json::to_vec(&tokenizer).map_err(|e| fail(e.to_string()))?;
        let config_json = serde_json::to_vec(&config).map_err(|e| fail(e.to_string()))?;
        let mut codec = Self::from_bytes(file, &tokenizer_json, Some(&config_json))?;
        codec.template_file = file.to_path_buf();
        Ok(codec)
    }

    /// The `tokenizer.json` and `tokenizer_config.json` this codec was made
    /// from, for writing beside a converted checkpoint.
    pub fn tokenizer_json(&self) -> Result<String, TextError> {
        self.tokenizer.to_string(true).map_err(|e| TextError {
            file: self.file.clone(),
            problem: format!("cannot write the tokenizer: {e}"),
        })
    }
}
