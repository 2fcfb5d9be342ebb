//! A tokenizer from the vocabulary a GGUF file carries (`tokenizer.ggml.*`),
//! so `--text` works on a GGUF file alone.
//!
//! llama.cpp keeps the pieces of a Hugging Face tokenizer — the tokens, the
//! BPE merges or SentencePiece scores, which tokens are special, the
//! BOS/EOS ids and whether to add them — and names the pre-tokenizer
//! (`tokenizer.ggml.pre`) instead of storing it. probe rebuilds the
//! `tokenizer.json` those pieces came from and loads it through the
//! `tokenizers` crate: byte-level BPE (`gpt2` model: SmolLM, Qwen, Llama 3,
//! GPT-2, StarCoder) for the pre-tokenizers below, and SentencePiece BPE
//! (`llama` model: Llama 2, Phi-3, Gemma 3). Any other model or
//! pre-tokenizer is refused by name, never guessed, since a wrong split
//! gives wrong token ids silently. llama.cpp's own tokenizer test set checks
//! every kind (`gguf_tokenizers_match_llama_cpp_test_vocabularies`).

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
    /// `tokenizer.ggml.scores`: SentencePiece's piece scores (merge priority).
    pub scores: Option<&'a [f32]>,
    /// `tokenizer.ggml.token_type`: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
    pub token_types: Option<Vec<i64>>,
    pub bos: Option<u32>,
    /// `tokenizer.ggml.unknown_token_id`.
    pub unknown: Option<u32>,
    pub eos: Option<u32>,
    /// `tokenizer.ggml.add_bos_token` / `add_eos_token`; absent, llama.cpp's
    /// default for the kind (BOS for SentencePiece and Llama 3, else none).
    pub add_bos: Option<bool>,
    pub add_eos: Option<bool>,
    /// `tokenizer.ggml.add_space_prefix` (SentencePiece's dummy prefix;
    /// llama.cpp's default is true).
    pub add_space_prefix: bool,
    pub chat_template: Option<&'a str>,
}

/// Qwen2's and Llama 3's splits (as their `tokenizer.json` and llama.cpp's
/// `llama-vocab.cpp` write them): they differ in digits, one or up to three.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The Hugging Face pre-tokenizer and normalizer of a llama.cpp
/// pre-tokenizer name (llama.cpp's `llama-vocab.cpp` lists the regexes).
/// Llama 3's also takes a word that is in the vocabulary whole, before any
/// merge (`ignore_merges`), and adds BOS unless the file says otherwise.
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
        _ if is_llama3(pre) => (
            json!({"type": "Sequence", "pretokenizers": [split(LLAMA3_SPLIT), byte_level(false)]}),
            Value::Null,
        ),
        _ => return None,
    })
}

/// `tokenizer.ggml.token_type` values (llama.cpp's `llama_token_type`).
const UNKNOWN: i64 = 2;
const CONTROL: i64 = 3;
const USER_DEFINED: i64 = 4;

/// Longer pieces are not merged into (the longest piece is 48 bytes in
/// Llama 2's vocabulary, 93 in Gemma 4's).
const MAX_PIECE_BYTES: usize = 1024;

/// SentencePiece's word-boundary mark, which stands for a space.
const SPACE_MARK: &str = "\u{2581}";

fn is_llama3(pre: &str) -> bool {
    matches!(
        pre,
        "llama3" | "llama-bpe" | "llama-v3" | "smaug-bpe" | "dbrx"
    )
}

/// The pieces of a `tokenizer.json` that differ between the two kinds.
struct ModelParts {
    /// Whether BOS is added when the file does not say.
    add_bos: bool,
    model: Value,
    normalizer: Value,
    pre_tokenizer: Value,
    decoder: Value,
    /// Run before the BOS/EOS template (byte-level BPE's offsets fix-up).
    post: Option<Value>,
}

/// Byte-level BPE (`gpt2`): the file's merges and a named pre-tokenizer.
fn byte_level_parts(
    vocab: &GgufVocabulary,
    fail: &dyn Fn(String) -> TextError,
) -> Result<ModelParts, TextError> {
    let pre = vocab.pre.unwrap_or("default");
    let (pre_tokenizer, normalizer) = pre_tokenizer(pre).ok_or_else(|| {
        fail(format!(
            "its pre-tokenizer `{pre}` (`tokenizer.ggml.pre`) is not one probe knows (gpt2, smollm, starcoder, qwen2, llama3 and their aliases); give token ids with --tokens, or put the model's tokenizer.json beside the file"
        ))
    })?;
    let merges = vocab.merges.ok_or_else(|| {
        fail("its byte-level BPE vocabulary has no `tokenizer.ggml.merges`".into())
    })?;
    let llama3 = is_llama3(pre);
    Ok(ModelParts {
        add_bos: llama3,
        model: bpe_model(vocab.tokens, json!(merges), None, llama3),
        normalizer,
        pre_tokenizer,
        decoder: json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true}),
        post: Some(
            json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true}),
        ),
    })
}

/// SentencePiece BPE (`llama`: Llama 2, Gemma 3, Phi-3): spaces become
/// `▁`, optionally one is put before the text, and the pair of adjacent
/// pieces whose join has the highest score is merged first; a character
/// outside the vocabulary falls back to its `<0xNN>` byte tokens. The file
/// stores scores, not merges: every split of a normal token into two
/// tokens is a merge, ranked by the joined token's score — the ranking
/// SentencePiece and llama.cpp apply, written the way Hugging Face's
/// converter writes it.
fn sentencepiece_parts(
    vocab: &GgufVocabulary,
    fail: &dyn Fn(String) -> TextError,
) -> Result<ModelParts, TextError> {
    let scores = vocab.scores.ok_or_else(|| {
        fail("its SentencePiece vocabulary has no `tokenizer.ggml.scores`".into())
    })?;
    if scores.len() != vocab.tokens.len() {
        return Err(fail(format!(
            "`tokenizer.ggml.scores` has {} entries for {} tokens",
            scores.len(),
            vocab.tokens.len()
        )));
    }
    let types = vocab.token_types.as_deref().unwrap_or_default();
    let ids: std::collections::HashMap<&str, usize> = vocab
        .tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    let mut merges: Vec<(f32, usize, usize, &str, &str)> = Vec::new();
    for (id, token) in vocab.tokens.iter().enumerate() {
        // Normal tokens only: control, byte and user-defined tokens are
        // never made by merging.
        // Splitting costs the square of a token's length: real pieces are
        // a few dozen bytes, and a hostile file must not make this hang.
        if types.get(id).is_some_and(|&t| t != 1) || token.len() > MAX_PIECE_BYTES {
            continue;
        }
        for (split, _) in token.char_indices().skip(1) {
            let (left, right) = token.split_at(split);
            if ids.contains_key(left) && ids.contains_key(right) {
                merges.push((scores[id], id, left.len(), left, right));
            }
        }
    }
    merges.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    let merges: Vec<[&str; 2]> = merges.iter().map(|m| [m.3, m.4]).collect();
    let unknown = vocab
        .unknown
        .or_else(|| types.iter().position(|&t| t == UNKNOWN).map(|i| i as u32))
        .and_then(|id| vocab.tokens.get(id as usize));
    let replace_spaces =
        json!({"type": "Replace", "pattern": {"String": " "}, "content": SPACE_MARK});
    let (normalizer, decoder_strip) = if vocab.add_space_prefix {
        (
            json!({"type": "Sequence", "normalizers": [
                {"type": "Prepend", "prepend": SPACE_MARK}, replace_spaces
            ]}),
            vec![json!({"type": "Strip", "content": " ", "start": 1, "stop": 0})],
        )
    } else {
        (replace_spaces, vec![])
    };
    let mut decoders = vec![
        json!({"type": "Replace", "pattern": {"String": SPACE_MARK}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    decoders.extend(decoder_strip);
    Ok(ModelParts {
        add_bos: true,
        model: bpe_model(vocab.tokens, json!(merges), Some(unknown), false),
        normalizer,
        pre_tokenizer: Value::Null,
        decoder: json!({"type": "Sequence", "decoders": decoders}),
        post: None,
    })
}

/// A `tokenizer.json` BPE model; `byte_fallback` (SentencePiece's) carries
/// the unknown token, if the vocabulary has one.
fn bpe_model(
    tokens: &[String],
    merges: Value,
    byte_fallback: Option<Option<&String>>,
    ignore_merges: bool,
) -> Value {
    let vocab: serde_json::Map<String, Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    json!({
        "type": "BPE", "dropout": null, "unk_token": byte_fallback.flatten(),
        "continuing_subword_prefix": null, "end_of_word_suffix": null,
        "fuse_unk": byte_fallback.is_some(), "byte_fallback": byte_fallback.is_some(),
        "ignore_merges": ignore_merges, "vocab": vocab, "merges": merges,
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
        let parts = match vocab.model {
            "gpt2" => byte_level_parts(vocab, &fail)?,
            "llama" => sentencepiece_parts(vocab, &fail)?,
            other => {
                return Err(fail(format!(
                    "its tokenizer (`tokenizer.ggml.model` = `{other}`) is neither byte-level BPE (`gpt2`) nor SentencePiece BPE (`llama`), the kinds probe rebuilds from GGUF metadata; give token ids with --tokens, or put the model's tokenizer.json beside the file"
                )))
            }
        };
        let types = vocab.token_types.as_deref().unwrap_or_default();
        // Control and user-defined tokens are matched whole and never split,
        // as llama.cpp does; only control tokens are special (dropped when
        // decoding without special tokens).
        let added: Vec<Value> = vocab
            .tokens
            .iter()
            .enumerate()
            .filter_map(|(i, token)| {
                let special = match types.get(i)? {
                    &CONTROL | &UNKNOWN => true,
                    &USER_DEFINED => false,
                    _ => return None,
                };
                Some(
                    json!({"id": i, "content": token, "single_word": false, "lstrip": false,
                       "rstrip": false, "normalized": false, "special": special}),
                )
            })
            .collect();
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
        let add_bos = vocab.add_bos.unwrap_or(parts.add_bos);
        let add_eos = vocab.add_eos.unwrap_or(false);
        let template = if add_bos || add_eos {
            let missing =
                |what: &str| fail(format!("it asks to add {what} but names no {what} token"));
            let bos = add_bos
                .then(|| bos.clone().ok_or_else(|| missing("BOS")))
                .transpose()?;
            let eos = add_eos
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
            Some(
                json!({"type": "TemplateProcessing", "single": single, "pair": single, "special_tokens": specials}),
            )
        } else {
            None
        };
        let post_processor = match (parts.post, template) {
            (Some(post), Some(template)) => {
                json!({"type": "Sequence", "processors": [post, template]})
            }
            (post, template) => post.or(template).unwrap_or(Value::Null),
        };
        let tokenizer = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": parts.normalizer,
            "pre_tokenizer": parts.pre_tokenizer,
            "post_processor": post_processor,
            "decoder": parts.decoder,
            "model": parts.model,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A SentencePiece vocabulary small enough to merge by hand: each merge
    /// is scored so that the order below is the only one.
    fn sentencepiece(add_space_prefix: bool) -> TextCodec {
        let pieces: Vec<(&str, f32, i64)> = vec![
            ("<unk>", 0.0, UNKNOWN),
            ("<s>", 0.0, CONTROL),
            ("</s>", 0.0, CONTROL),
            ("<start_of_turn>", 0.0, USER_DEFINED),
            ("<0xE4>", 0.0, 6),
            ("<0xBD>", 0.0, 6),
            ("<0xA0>", 0.0, 6),
            ("h", -10.0, 1),
            ("e", -10.0, 1),
            ("l", -10.0, 1),
            ("o", -10.0, 1),
            ("\u{2581}", -10.0, 1),
            ("w", -10.0, 1),
            ("r", -10.0, 1),
            ("d", -10.0, 1),
            ("he", -1.0, 1),
            ("ll", -2.0, 1),
            ("hell", -3.0, 1),
            ("hello", -4.0, 1),
            ("\u{2581}w", -5.0, 1),
            ("or", -6.0, 1),
            ("\u{2581}wor", -7.0, 1),
            // Lower than `ll`: "lo" must lose to "ll" in "llo".
            ("lo", -2.5, 1),
        ];
        let tokens: Vec<String> = pieces.iter().map(|p| p.0.to_string()).collect();
        let scores: Vec<f32> = pieces.iter().map(|p| p.1).collect();
        let vocab = GgufVocabulary {
            model: "llama",
            tokens: &tokens,
            scores: Some(&scores),
            token_types: Some(pieces.iter().map(|p| p.2).collect()),
            bos: Some(1),
            eos: Some(2),
            add_space_prefix,
            ..Default::default()
        };
        TextCodec::from_gguf(Path::new("m.gguf"), &vocab).unwrap()
    }

    fn pieces(codec: &TextCodec, text: &str) -> Vec<String> {
        codec
            .encode(text)
            .unwrap()
            .into_iter()
            .map(|id| codec.tokenizer.id_to_token(id).unwrap())
            .collect()
    }

    #[test]
    fn sentencepiece_merges_by_score_and_falls_back_to_bytes() {
        // Gemma's form: no space prefix; BOS by default.
        let gemma = sentencepiece(false);
        assert_eq!(
            pieces(&gemma, "hello world"),
            ["<s>", "hello", "\u{2581}wor", "l", "d"]
        );
        // A user-defined token is kept whole; 你 is not in the vocabulary.
        assert_eq!(
            pieces(&gemma, "hello<start_of_turn>world你"),
            [
                "<s>",
                "hello",
                "<start_of_turn>",
                "w",
                "or",
                "l",
                "d",
                "<0xE4>",
                "<0xBD>",
                "<0xA0>"
            ]
        );
        assert_eq!(gemma.token_text(gemma.encode("world").unwrap()[2]), "or");
        // Llama 2's form: one `▁` before the text.
        let llama = sentencepiece(true);
        assert_eq!(
            pieces(&llama, "hello world"),
            ["<s>", "\u{2581}", "hello", "\u{2581}wor", "l", "d"]
        );
        assert_eq!(
            llama
                .tokenizer
                .decode(&llama.encode("hello world").unwrap(), true)
                .unwrap(),
            "hello world"
        );
    }

    #[test]
    fn a_sentencepiece_vocabulary_without_scores_is_refused() {
        let tokens = vec!["a".to_string()];
        let vocab = GgufVocabulary {
            model: "llama",
            tokens: &tokens,
            ..Default::default()
        };
        let error = TextCodec::from_gguf(Path::new("m.gguf"), &vocab)
            .err()
            .unwrap();
        assert_eq!(
            error.to_string(),
            "m.gguf: its SentencePiece vocabulary has no `tokenizer.ggml.scores`"
        );
    }
}
