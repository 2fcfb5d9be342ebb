//! The tokenizer of a checkpoint: a GGUF file's own vocabulary when it
//! carries one (so `--text` works on the file alone), else the
//! `tokenizer.json` beside the weights.

use probe_store::gguf::Metadata;
use probe_store::Checkpoint;
use probe_text::{GgufVocabulary, TextCodec, TextError};

/// The `tokenizer.ggml.*` metadata as the text crate reads it; `None`
/// when the file carries no tokenizer.
pub fn gguf_vocabulary(meta: &Metadata) -> Option<GgufVocabulary<'_>> {
    let id = |key: &str| meta.u64(key).and_then(|v| u32::try_from(v).ok());
    Some(GgufVocabulary {
        model: meta.str("tokenizer.ggml.model")?,
        pre: meta.str("tokenizer.ggml.pre"),
        tokens: meta.strings("tokenizer.ggml.tokens")?,
        merges: meta.strings("tokenizer.ggml.merges"),
        scores: meta.floats("tokenizer.ggml.scores"),
        token_types: meta
            .get("tokenizer.ggml.token_type")
            .and_then(|v| v.as_array())
            .and_then(|a| a.integers()),
        bos: id("tokenizer.ggml.bos_token_id"),
        eos: id("tokenizer.ggml.eos_token_id"),
        unknown: id("tokenizer.ggml.unknown_token_id"),
        add_bos: meta.bool("tokenizer.ggml.add_bos_token"),
        add_eos: meta.bool("tokenizer.ggml.add_eos_token"),
        add_space_prefix: meta.bool("tokenizer.ggml.add_space_prefix").unwrap_or(true),
        chat_template: meta.str("tokenizer.chat_template"),
    })
}

/// Open the checkpoint's tokenizer.
pub fn open(checkpoint: &Checkpoint) -> Result<TextCodec, TextError> {
    if let Some(vocab) = checkpoint.gguf_metadata().and_then(gguf_vocabulary) {
        let from_file = TextCodec::from_gguf(&checkpoint.config_source(), &vocab);
        // A vocabulary probe cannot rebuild (Gemma 4's, a BERT WordPiece) gives way to a
        // tokenizer.json the user put beside the file.
        if from_file.is_ok() || !checkpoint.dir.join("tokenizer.json").is_file() {
            return from_file;
        }
    }
    TextCodec::open(&checkpoint.dir)
}

/// Whether the checkpoint's tokenizer has a chat template.
pub fn has_chat_template(checkpoint: &Checkpoint) -> bool {
    match checkpoint.gguf_metadata() {
        Some(meta) if meta.str("tokenizer.ggml.model").is_some() => {
            meta.str("tokenizer.chat_template").is_some()
        }
        _ => probe_text::has_chat_template(&checkpoint.dir),
    }
}
