//! GGUF files as checkpoints: the dequantization of every block type against
//! the `gguf` Python package (llama.cpp's own), the fixtures written as
//! llama.cpp writes them, broken files, and SmolLM2's shipped Q4_1 GGUF
//! against the safetensors probe converts it to.

use std::path::{Path, PathBuf};

use probe::forward::{Capture, Engine, EngineOptions, Request};
use probe::store::Checkpoint;
use probe_store::gguf::testing;
use probe_store::quants::READABLE;

use crate::real_models::real_model;
use crate::util::{
    column_f64, column_opt_i64, column_str, fixture, inspect_json, probe, read_parquet, tempdir,
};

/// A file written by `fixtures/reference/gguf_reference.py`.
pub fn gguf_fixture(name: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fixtures/gguf")
        .join(name);
    assert!(path.is_file(), "missing {}", path.display());
    path
}

/// Two `inspect --format json` outputs describe the same model.
fn assert_same_model(a: &serde_json::Value, b: &serde_json::Value, what: &str) {
    for key in [
        "family",
        "num_layers",
        "hidden_size",
        "vocab_size",
        "tied_embeddings",
        "params",
    ] {
        assert_eq!(a[key], b[key], "{what}: {key}");
    }
}

#[test]
fn every_block_type_dequantizes_bit_for_bit_as_the_gguf_package_does() {
    let gguf = Checkpoint::open(&gguf_fixture("quants.gguf")).unwrap();
    let expected = Checkpoint::open(&gguf_fixture("quants.safetensors")).unwrap();
    let mut covered = Vec::new();
    for entry in expected.tensors() {
        let want = expected.view(entry).to_f32().unwrap();
        let view = gguf.tensor(&entry.name).unwrap();
        let got = view.to_f32().unwrap();
        assert_eq!(view.shape(), entry.shape.as_slice(), "{}", entry.name);
        assert_eq!(got.len(), want.len(), "{}", entry.name);
        let differing = got
            .iter()
            .zip(want.iter())
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        assert_eq!(differing, 0, "{}: {differing} values differ", entry.name);
        // Real values, not a file of zeros: a wrong dequantizer must fail.
        assert!(want.iter().filter(|v| **v != 0.0).count() > want.len() / 2);
        covered.push(view.dtype().as_str());
    }
    for quant in READABLE {
        assert!(
            covered.contains(&quant.as_str()),
            "{quant} not covered by quants.gguf"
        );
    }
    for plain in ["F32", "F16", "BF16"] {
        assert!(covered.contains(&plain));
    }
}

#[test]
fn the_type_table_is_the_gguf_packages() {
    let table: serde_json::Value =
        serde_json::from_slice(&std::fs::read(gguf_fixture("types.json")).unwrap()).unwrap();
    let mut checked = 0;
    for row in table.as_array().unwrap() {
        let id = row["id"].as_u64().unwrap() as u32;
        let Some(quant) = probe_contract::Quant::from_ggml_id(id) else {
            continue; // F32, F16, BF16, F64, I8…I64
        };
        assert_eq!(quant.as_str(), row["name"].as_str().unwrap());
        assert_eq!(quant.block_weights() as u64, row["block"].as_u64().unwrap());
        // The package's Q8_1 still has the old f32 scale and sum (40 bytes);
        // llama.cpp's block_q8_1 holds two halves (36). Never in a file.
        if quant != probe_contract::Quant::Q8_1 {
            assert_eq!(
                quant.block_bytes() as u64,
                row["bytes"].as_u64().unwrap(),
                "{quant}"
            );
        }
        checked += 1;
    }
    assert_eq!(checked, probe_contract::Quant::ALL.len());
}

#[test]
fn a_gguf_fixture_inspects_as_its_safetensors() {
    for name in ["llama-tied-f32", "qwen2-untied-f16", "gemma3-tied-f32"] {
        let gguf = inspect_json(&gguf_fixture(&format!("{name}.gguf")));
        let st = inspect_json(&fixture(name));
        assert_same_model(&gguf, &st, name);
        assert_eq!(gguf["format"], "gguf");
        let roles = |json: &serde_json::Value| {
            let mut roles: Vec<(Option<u64>, String)> = json["tensors"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| (t["layer"].as_u64(), t["role"].as_str().unwrap().to_string()))
                .collect();
            roles.sort();
            roles
        };
        assert_eq!(roles(&gguf), roles(&st), "{name}: roles");
    }
    let quants = inspect_json(&gguf_fixture("quants.gguf"));
    let q4k = quants["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "q.Q4_K")
        .unwrap();
    assert_eq!(q4k["dtype"], "Q4_K");
    assert_eq!(q4k["bits_per_weight"], 4.5);
    assert_eq!(q4k["shape"], serde_json::json!([3, 512]));
}

#[test]
fn convert_and_shuffle_write_the_hugging_face_layout() {
    let out = tempdir();
    probe([
        "convert".as_ref(),
        gguf_fixture("llama-tied-f32.gguf").as_os_str(),
        "--out".as_ref(),
        out.path().as_os_str(),
    ])
    .ok();
    let converted = Checkpoint::open(out.path()).unwrap();
    let original = Checkpoint::open(&fixture("llama-tied-f32")).unwrap();
    let names = |c: &Checkpoint| {
        c.tensors()
            .iter()
            .map(|t| t.name.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(names(&converted), names(&original));
    for entry in original.tensors() {
        // F32 in, F32 out: the un-permuted Q/K rows are the original's exactly.
        assert_eq!(
            converted.tensor(&entry.name).unwrap().bytes,
            original.view(entry).bytes,
            "{}",
            entry.name
        );
    }

    let shuffled = tempdir();
    probe([
        "shuffle".as_ref(),
        gguf_fixture("qwen3-tied-bf16.gguf").as_os_str(),
        "--seed".as_ref(),
        "3".as_ref(),
        "--out".as_ref(),
        shuffled.path().as_os_str(),
    ])
    .ok();
    let json = inspect_json(shuffled.path());
    assert_eq!(json["family"], "qwen3");
    assert_eq!(json["format"], "safetensors");
    assert_eq!(
        json["params"],
        inspect_json(&gguf_fixture("qwen3-tied-bf16.gguf"))["params"]
    );
}

#[test]
fn broken_gguf_files_fail_with_one_line() {
    let dir = tempdir();
    let write = |name: &str, bytes: &[u8]| {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    };
    let inspect = |path: &Path| probe(["inspect".as_ref(), path.as_os_str()]);

    let whole = std::fs::read(gguf_fixture("quants.gguf")).unwrap();
    let truncated = write("truncated.gguf", &whole[..whole.len() - 100]);
    inspect(&truncated).fails_with(&[
        truncated.to_str().unwrap(),
        "runs past the end of the file",
        "truncated",
    ]);

    // A tensor whose offset lies past the end of the data.
    let mut past = testing::file(&[], &[("w", &[8], 0, &[0; 32])]);
    // The one tensor entry ends with its u64 offset: after the 24-byte
    // preamble, its name (8 + 1), dims (4), one extent (8) and type (4).
    let info_end = 24 + 8 + 1 + 4 + 8 + 4 + 8;
    past[info_end - 8..info_end].copy_from_slice(&(1u64 << 20).to_le_bytes());
    let past = write("offset.gguf", &past);
    inspect(&past).fails_with(&[
        "offset.gguf",
        "tensor `w`",
        "data offset 1048576",
        "runs past the end",
    ]);

    let unknown = write(
        "unknown.gguf",
        &testing::file(&[], &[("blk.0.attn_q.weight", &[32], 77, &[0; 32])]),
    );
    inspect(&unknown).fails_with(&[
        "unknown.gguf",
        "tensor `blk.0.attn_q.weight` has GGML type 77, which probe does not know",
    ]);

    let mut absurd = (u64::MAX / 2).to_le_bytes().to_vec();
    absurd.extend(b"llama");
    let absurd = write(
        "absurd.gguf",
        &testing::file(&[("general.architecture", 8, absurd)], &[]),
    );
    inspect(&absurd).fails_with(&[
        "absurd.gguf",
        "metadata `general.architecture` claims a string of 9223372036854775807 bytes",
    ]);

    // One split of two, the other missing.
    let split = write("m-00001-of-00002.gguf", &whole);
    inspect(&split).fails_with(&["m-00001-of-00002.gguf", "split 2", "is missing"]);

    // A known type probe cannot dequantize: listed, refused when read.
    let iq = write(
        "iq.gguf",
        &testing::file(
            &[("general.architecture", 8, testing::string("llama"))],
            &[("blk.0.ffn_up.weight", &[256, 2], 17, &[0; 148])],
        ),
    );
    let listed = inspect_json(&iq);
    assert_eq!(listed["tensors"][0]["dtype"], "IQ2_XS");
    crate::util::run_plugin(
        crate::util::plugin_lib("probe-plugin-spectral")
            .to_str()
            .unwrap(),
        &iq,
        &[],
        &[
            "--out",
            dir.path().join("s.parquet").to_str().unwrap(),
            "--quiet",
        ],
    )
    .fails_with(&["iq.gguf", "IQ2_XS, which probe cannot dequantize yet"]);
}

/// SmolLM2's GGUF as the package ships it, beside the safetensors probe
/// converted it to.
fn smollm2_pair() -> Option<(PathBuf, PathBuf)> {
    let gguf = real_model("SmolLM2-135M-Instruct-gguf")?;
    let st = real_model("SmolLM2-135M-Instruct")?;
    Some((gguf.join("SmolLM2-135M-Instruct.Q4_1.gguf"), st))
}

#[test]
fn smollm2_gguf_reads_as_its_safetensors() {
    let Some((gguf, st)) = smollm2_pair() else {
        return;
    };
    let (g, s) = (inspect_json(&gguf), inspect_json(&st));
    assert_same_model(&g, &s, "SmolLM2");
    assert_eq!(
        (g["family"].as_str(), g["num_layers"].as_u64()),
        (Some("llama"), Some(30))
    );

    // The tokenizer rebuilt from the GGUF splits every shared prompt as
    // the tokenizer.json does.
    let g_check = Checkpoint::open(&gguf).unwrap();
    let s_check = Checkpoint::open(&st).unwrap();
    let g_codec = probe::codec::open(&g_check).unwrap();
    let s_codec = probe::codec::open(&s_check).unwrap();
    let prompts = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../probes/prompts.jsonl"),
    )
    .unwrap();
    let mut texts: Vec<String> = prompts
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["prompt"].as_str().map(str::to_string))
        .collect();
    texts.push("Digits 1234567 and\ttabs,  double  spaces\nand émigré naïveté 你好".into());
    assert!(texts.len() > 10);
    for text in &texts {
        assert_eq!(
            g_codec.encode(text).unwrap(),
            s_codec.encode(text).unwrap(),
            "{text}"
        );
    }
    assert_eq!(
        g_codec.encode_chat("What is 2+2?").unwrap(),
        s_codec.encode_chat("What is 2+2?").unwrap()
    );

    // The same top-1 at every position and the same loss.
    let text = &texts[0];
    let tokens = g_codec.encode(text).unwrap();
    let pass = |checkpoint: &Checkpoint| {
        let mut engine = Engine::open(checkpoint, EngineOptions::default()).unwrap();
        engine
            .run(&Request {
                tokens: &tokens,
                capture: Capture {
                    logits: true,
                    loss: true,
                    ..Capture::default()
                },
                ..Request::default()
            })
            .unwrap()
    };
    let (a, b) = (pass(&g_check), pass(&s_check));
    let top = |trace: &probe::forward::Trace| {
        trace
            .logits
            .as_ref()
            .unwrap()
            .chunks_exact(trace.vocab)
            .map(|row| probe::forward::summary::top_k(row, 1)[0].0)
            .collect::<Vec<_>>()
    };
    assert_eq!(top(&a), top(&b));
    let (la, lb) = (a.loss().unwrap(), b.loss().unwrap());
    assert!((la / lb - 1.0).abs() < 1e-4, "loss {la} vs {lb}");

    // spectral on both: the same numbers for every matrix.
    let dir = tempdir();
    let run = |model: &Path, out: &str| {
        let out = dir.path().join(out);
        crate::util::run_plugin_to("probe-plugin-spectral", model, &["layers=0,29"], &out);
        read_parquet(&out)
    };
    let (fa, fb) = (run(&gguf, "g.parquet"), run(&st, "s.parquet"));
    assert_eq!(fa.height(), fb.height());
    assert!(fa.height() >= 14, "{} rows", fa.height());
    // Rows by (layer, role): the GGUF's names differ from the converted ones.
    let keyed = |frame: &polars::prelude::DataFrame, metric: &str| {
        let layers = column_opt_i64(frame, "layer");
        let roles = column_str(frame, "role");
        let values = column_f64(frame, metric);
        let mut rows: Vec<(String, f64)> = layers
            .iter()
            .zip(roles)
            .zip(values)
            .map(|((l, r), v)| (format!("{l:?}/{r}"), v))
            .collect();
        rows.sort_by(|a, b| a.0.cmp(&b.0));
        rows
    };
    for metric in [
        "stable_rank",
        "alpha",
        "pr_rank_ratio",
        "log_norm",
        "entropy",
    ] {
        for ((key, p), (other, q)) in keyed(&fa, metric).into_iter().zip(keyed(&fb, metric)) {
            assert_eq!(key, other);
            assert!(
                (p - q).abs() <= 1e-4 * q.abs().max(1e-12),
                "{metric} {key}: {p} vs {q}"
            );
        }
    }
}

/// llama.cpp's own tokenizer test set: vocabulary-only GGUF files of real
/// models (written by llama.cpp from each model's Hugging Face tokenizer)
/// and, for about 40 texts each, the token ids that Hugging Face tokenizer
/// gives (`ggml-vocab-NAME.gguf.inp` / `.out`, from the llama.cpp source
/// `cargo xtask models` fetches). The rebuilt tokenizer must give the same
/// ids for every text, special tokens not added.
#[test]
fn gguf_tokenizers_match_llama_cpp_test_vocabularies() {
    let Some(dir) = real_model("llama-cpp-vocab") else {
        return;
    };
    let mut checked = 0;
    for name in [
        "llama-spm", // SentencePiece BPE with a space prefix (Llama 2)
        "phi-3",     // the same kind, with added control tokens
        "gpt-2",
        "starcoder",
        "refact",
        "qwen2",
        "llama-bpe", // Llama 3
    ] {
        let file = dir.join(format!("ggml-vocab-{name}.gguf"));
        let bytes = std::fs::read(&file).unwrap();
        let header = probe_store::gguf::parse(&file, &bytes).unwrap();
        let vocab = probe::codec::gguf_vocabulary(&header.metadata).unwrap();
        let codec = probe_text::TextCodec::from_gguf(&file, &vocab)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let inputs =
            std::fs::read_to_string(dir.join(format!("ggml-vocab-{name}.gguf.inp"))).unwrap();
        let outputs =
            std::fs::read_to_string(dir.join(format!("ggml-vocab-{name}.gguf.out"))).unwrap();
        // Texts separated by this line, the last one followed by it too.
        let inputs: Vec<&str> = inputs
            .strip_suffix("\n__ggml_vocab_test__\n")
            .unwrap_or(&inputs)
            .split("\n__ggml_vocab_test__\n")
            .collect();
        let outputs: Vec<&str> = outputs.lines().collect();
        assert_eq!(inputs.len(), outputs.len(), "{name}");
        let mut wrong = vec![];
        for (text, ids) in inputs.iter().zip(&outputs) {
            let expected: Vec<u32> = ids.split_whitespace().map(|i| i.parse().unwrap()).collect();
            let got = codec.encode_continuation(text).unwrap();
            if got != expected {
                wrong.push(format!("{text:?}: {got:?} != {expected:?}"));
            }
            checked += 1;
        }
        assert!(wrong.is_empty(), "{name}:\n{}", wrong.join("\n"));
    }
    assert!(checked > 200, "{checked}");

    // A pre-tokenizer probe does not rebuild is refused by name.
    let file = dir.join("ggml-vocab-deepseek-llm.gguf");
    let bytes = std::fs::read(&file).unwrap();
    let header = probe_store::gguf::parse(&file, &bytes).unwrap();
    let vocab = probe::codec::gguf_vocabulary(&header.metadata).unwrap();
    let error = probe_text::TextCodec::from_gguf(&file, &vocab)
        .err()
        .unwrap()
        .to_string();
    assert!(
        error.contains(
            "its pre-tokenizer `deepseek-llm` (`tokenizer.ggml.pre`) is not one probe knows"
        ),
        "{error}"
    );
}
