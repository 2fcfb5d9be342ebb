//! `probe inspect` on every fixture family, on layouts (sharded, run
//! folders), on every kind of bad input, and its output formats.

use std::io::{Seek, SeekFrom, Write};

use polars::prelude::*;
use serde_json::Value;

use crate::util::{copy_dir, fixture, inspect_json, probe, tempdir};

#[test]
fn every_fixture_family_is_recognised() {
    for spec in probe_fixtures::all() {
        let json = inspect_json(&fixture(spec.name));
        let known = spec.arch != probe_fixtures::Arch::Unknown;
        assert_eq!(json["family"], spec.arch.family(), "{}", spec.name);
        assert_eq!(json["num_layers"], spec.layers, "{}", spec.name);
        if known {
            assert_eq!(json["hidden_size"], spec.hidden, "{}", spec.name);
            assert_eq!(json["vocab_size"], spec.vocab, "{}", spec.name);
        } else {
            // Nothing names an embedding: probe does not guess.
            assert_eq!(json["hidden_size"], Value::Null);
        }
        // BERT has no output embedding at all, so nothing is tied.
        let tied = spec.tied && spec.arch != probe_fixtures::Arch::Bert;
        assert_eq!(json["tied_embeddings"], tied, "{}", spec.name);
    }
}

#[test]
fn json_lists_every_tensor_with_its_placement() {
    let json = inspect_json(&fixture("qwen2-untied-f16"));
    let tensors = json["tensors"].as_array().unwrap();
    // 3 layers × (4 proj + 3 biases + 3 mlp + 2 norms) + embed + norm + lm_head.
    assert_eq!(tensors.len(), 3 * 12 + 3);
    let k_bias = tensors
        .iter()
        .find(|t| t["name"] == "model.layers.2.self_attn.k_proj.bias")
        .unwrap();
    assert_eq!(k_bias["layer"], 2);
    assert_eq!(k_bias["role"], "k_bias");
    assert_eq!(k_bias["dtype"], "F16");
    assert_eq!(k_bias["shape"], serde_json::json!([16]));
    assert_eq!(k_bias["params"], 16);
    let embed = tensors
        .iter()
        .find(|t| t["name"] == "model.embed_tokens.weight")
        .unwrap();
    assert_eq!(embed["layer"], Value::Null);
    assert_eq!(embed["role"], "embed");
    assert_eq!(
        json["params"],
        tensors
            .iter()
            .map(|t| t["params"].as_u64().unwrap())
            .sum::<u64>()
    );
}

#[test]
fn roles_of_special_families() {
    let roles = |name: &str| -> Vec<(String, String)> {
        inspect_json(&fixture(name))["tensors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| {
                (
                    t["name"].as_str().unwrap().to_string(),
                    t["role"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    let banked = roles("paramgolf-banked-bf16");
    for (name, role) in [
        ("qo_bank", "qo_bank"),
        ("kv_bank", "kv_bank"),
        ("mlp_up_bank", "mlp_up_bank"),
        ("mlp_down_bank", "mlp_down_bank"),
        ("skip_weights", "skip_weights"),
        ("skip_gates", "skip_gates"),
        ("blocks.1.attn.q_gain", "q_gain"),
        ("blocks.1.attn_scale", "attn_scale"),
        ("blocks.1.resid_mix", "resid_mix"),
        ("tok_emb.weight", "embed"),
    ] {
        assert!(
            banked.contains(&(name.into(), role.into())),
            "{name} should be {role}"
        );
    }
    let gemma = roles("gemma3-tied-f32");
    for (name, role) in [
        (
            "model.layers.0.post_attention_layernorm.weight",
            "post_attn_norm",
        ),
        (
            "model.layers.0.pre_feedforward_layernorm.weight",
            "mlp_norm",
        ),
        (
            "model.layers.0.post_feedforward_layernorm.weight",
            "post_mlp_norm",
        ),
        ("model.layers.0.self_attn.q_norm.weight", "q_norm"),
    ] {
        assert!(
            gemma.contains(&(name.into(), role.into())),
            "{name} should be {role}"
        );
    }
    let gpt2 = roles("gpt2-tied-f32");
    assert!(gpt2.contains(&("h.1.attn.c_attn.weight".into(), "qkv".into())));
    assert!(gpt2.contains(&("h.1.mlp.c_fc.weight".into(), "up".into())));
    assert!(gpt2.contains(&("wpe.weight".into(), "pos_embed".into())));
}

#[test]
fn layer_order_comes_from_names_not_file_order() {
    // With 12 layers, name order and file order put layer 10 before layer 2.
    let dir = tempdir();
    let spec = probe_fixtures::Spec {
        layers: 12,
        ..probe_fixtures::by_name("llama-tied-f32").unwrap()
    };
    probe_fixtures::write(&spec, dir.path()).unwrap();
    let json = inspect_json(dir.path());
    assert_eq!(json["num_layers"], 12);
    let layers: Vec<i64> = json["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["layer"].as_i64())
        .collect();
    let mut sorted = layers.clone();
    sorted.sort();
    assert_eq!(layers, sorted);
    assert_eq!(layers.first(), Some(&0));
    assert_eq!(layers.last(), Some(&11));
}

#[test]
fn sharded_checkpoint_through_index_folder_and_file() {
    let dir = fixture("llama-sharded-f16");
    let by_folder = inspect_json(&dir);
    let by_index = inspect_json(&dir.join("model.safetensors.index.json"));
    assert_eq!(by_folder, by_index);
    assert_eq!(by_folder["num_layers"], 4);
    assert_eq!(by_folder["tensors"].as_array().unwrap().len(), 4 * 9 + 3);

    // Shards named -0000i-of-0000n without an index are one checkpoint too.
    let copy = tempdir();
    copy_dir(&dir, copy.path());
    std::fs::remove_file(copy.path().join("model.safetensors.index.json")).unwrap();
    assert_eq!(inspect_json(copy.path())["tensors"], by_folder["tensors"]);
}

#[test]
fn run_folder_gives_one_row_set_per_checkpoint_in_natural_order() {
    let run = tempdir();
    for step in ["step-1000", "step-900", "step-100"] {
        copy_dir(&fixture("llama-tied-f32"), &run.path().join(step));
    }
    std::fs::create_dir(run.path().join("logs")).unwrap();
    let json = inspect_json(run.path());
    let labels: Vec<&str> = json
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["checkpoint"].as_str().unwrap())
        .collect();
    assert_eq!(labels, ["step-100", "step-900", "step-1000"]);

    let csv = probe([
        "inspect".as_ref(),
        "--format".as_ref(),
        "csv".as_ref(),
        run.path().as_os_str(),
    ])
    .ok();
    let header = csv.lines().next().unwrap();
    assert_eq!(
        header,
        "checkpoint,name,layer,role,dtype,shape,params,bits_per_weight"
    );
    assert_eq!(csv.lines().count(), 1 + 3 * (3 * 9 + 2));
    assert!(
        csv.contains("step-900,model.layers.1.self_attn.k_proj.weight,1,k,F32,\"[16, 32]\",512")
    );

    // A run of plain files: each .safetensors is one checkpoint.
    let files = tempdir();
    for step in ["ckpt10", "ckpt2"] {
        std::fs::copy(
            fixture("llama-tied-f32").join("model.safetensors"),
            files.path().join(format!("{step}.safetensors")),
        )
        .unwrap();
    }
    let json = inspect_json(files.path());
    assert_eq!(json[0]["checkpoint"], "ckpt2.safetensors");
    assert_eq!(json[1]["checkpoint"], "ckpt10.safetensors");
}

#[test]
fn parquet_output_reads_back() {
    let dir = tempdir();
    let out = dir.path().join("tensors.parquet");
    probe([
        "inspect".as_ref(),
        fixture("gpt2-tied-f32").as_os_str(),
        "--out".as_ref(),
        out.as_os_str(),
    ])
    .ok();
    let file = std::fs::File::open(&out).unwrap();
    let df = ParquetReader::new(file).finish().unwrap();
    assert_eq!(
        df.get_column_names()
            .iter()
            .map(|n| n.as_str())
            .collect::<Vec<_>>(),
        [
            "name",
            "layer",
            "role",
            "dtype",
            "shape",
            "params",
            "bits_per_weight"
        ]
    );
    assert_eq!(df.height(), 2 + 3 * 12 + 2);
    let params: i64 = df
        .column("params")
        .unwrap()
        .as_materialized_series()
        .i64()
        .unwrap()
        .sum()
        .unwrap();
    assert_eq!(
        params,
        inspect_json(&fixture("gpt2-tied-f32"))["params"]
            .as_i64()
            .unwrap()
    );
    // Nothing but the output is left in the folder: no temporary files.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn terminal_table_and_json_file() {
    let out = probe(["inspect".as_ref(), fixture("bert-f32").as_os_str()]).ok();
    assert!(out.starts_with("family bert · 3 layers · hidden 32 · vocab 96 · tied embeddings: no"));
    assert!(out.contains("encoder.layer.2.attention.self.query.weight"));
    let dir = tempdir();
    let file = dir.path().join("x.json");
    probe([
        "inspect".as_ref(),
        fixture("bert-f32").as_os_str(),
        "-o".as_ref(),
        file.as_os_str(),
    ])
    .ok();
    let json: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    assert_eq!(json["family"], "bert");
}

// ---- bad input: one line naming the file and the problem, exit code 2 ----

fn broken_copy(name: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempdir();
    copy_dir(&fixture(name), dir.path());
    let file = dir.path().join("model.safetensors");
    (dir, file)
}

#[test]
fn missing_path() {
    probe(["inspect", "/nonexistent/model.safetensors"])
        .fails_with(&["/nonexistent/model.safetensors", "no such file or folder"]);
}

#[test]
fn truncated_file() {
    let (_dir, file) = broken_copy("llama-tied-f32");
    let len = std::fs::metadata(&file).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(len - 100)
        .unwrap();
    probe(["inspect".as_ref(), file.as_os_str()])
        .fails_with(&[file.to_str().unwrap(), "truncated"]);
}

#[test]
fn file_shorter_than_header() {
    let (_dir, file) = broken_copy("llama-tied-f32");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(200)
        .unwrap();
    probe(["inspect".as_ref(), file.as_os_str()]).fails_with(&[
        file.to_str().unwrap(),
        "header length field says",
        "truncated",
    ]);
}

#[test]
fn corrupt_header() {
    let (_dir, file) = broken_copy("llama-tied-f32");
    let mut f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
    f.seek(SeekFrom::Start(8)).unwrap();
    f.write_all(b"garbage!").unwrap();
    drop(f);
    probe(["inspect".as_ref(), file.as_os_str()])
        .fails_with(&[file.to_str().unwrap(), "corrupt header"]);
}

#[test]
fn absurd_header_length() {
    let (_dir, file) = broken_copy("llama-tied-f32");
    let mut f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
    f.write_all(&(u64::MAX / 2).to_le_bytes()).unwrap();
    drop(f);
    probe(["inspect".as_ref(), file.as_os_str()])
        .fails_with(&[file.to_str().unwrap(), "not a safetensors file"]);
}

#[test]
fn text_file_is_not_a_checkpoint() {
    let dir = tempdir();
    let file = dir.path().join("notes.safetensors");
    std::fs::write(&file, "these are not weights, just a text file").unwrap();
    probe(["inspect".as_ref(), file.as_os_str()])
        .fails_with(&[file.to_str().unwrap(), "safetensors"]);
    let tiny = dir.path().join("tiny.safetensors");
    std::fs::write(&tiny, "abc").unwrap();
    probe(["inspect".as_ref(), tiny.as_os_str()])
        .fails_with(&[tiny.to_str().unwrap(), "too short"]);
}

#[test]
fn index_naming_a_missing_shard() {
    let dir = tempdir();
    copy_dir(&fixture("llama-sharded-f16"), dir.path());
    std::fs::remove_file(dir.path().join("model-00002-of-00003.safetensors")).unwrap();
    probe(["inspect".as_ref(), dir.path().as_os_str()]).fails_with(&[
        "model.safetensors.index.json",
        "names shard model-00002-of-00003.safetensors, which does not exist",
    ]);
    // Without the index, the gap in the shard numbers is the problem.
    std::fs::remove_file(dir.path().join("model.safetensors.index.json")).unwrap();
    probe(["inspect".as_ref(), dir.path().as_os_str()]).fails_with(&["shard 2 of 3 is missing"]);
}

#[test]
fn index_that_disagrees_with_its_shards() {
    let dir = tempdir();
    copy_dir(&fixture("llama-sharded-f16"), dir.path());
    let index = dir.path().join("model.safetensors.index.json");
    let mut json: Value = serde_json::from_str(&std::fs::read_to_string(&index).unwrap()).unwrap();
    json["weight_map"]["model.layers.9.mlp.up_proj.weight"] =
        "model-00001-of-00003.safetensors".into();
    std::fs::write(&index, json.to_string()).unwrap();
    probe(["inspect".as_ref(), dir.path().as_os_str()]).fails_with(&[
        "model.safetensors.index.json",
        "model.layers.9.mlp.up_proj.weight",
        "does not hold it",
    ]);

    std::fs::write(&index, "{\"weight_map\": [1, 2]}").unwrap();
    probe(["inspect".as_ref(), dir.path().as_os_str()])
        .fails_with(&["model.safetensors.index.json", "no `weight_map` object"]);
    std::fs::write(&index, "{\"weight_map\": {\"a\": \"../../etc/passwd\"}}").unwrap();
    probe(["inspect".as_ref(), dir.path().as_os_str()])
        .fails_with(&["not a file name in this folder"]);
    std::fs::write(&index, "{ not json").unwrap();
    probe(["inspect".as_ref(), dir.path().as_os_str()])
        .fails_with(&["model.safetensors.index.json", "not valid JSON"]);
}

#[test]
fn unreadable_config() {
    let (dir, _file) = broken_copy("llama-tied-f32");
    let config = dir.path().join("config.json");
    std::fs::write(&config, "{\"model_type\": \"llama\",").unwrap();
    probe(["inspect".as_ref(), dir.path().as_os_str()])
        .fails_with(&[config.to_str().unwrap(), "not valid JSON"]);
    std::fs::write(&config, "[1, 2, 3]").unwrap();
    probe(["inspect".as_ref(), dir.path().as_os_str()])
        .fails_with(&[config.to_str().unwrap(), "JSON object"]);
}

#[test]
fn other_formats_and_empty_folders() {
    let dir = tempdir();
    let bin = dir.path().join("pytorch_model.bin");
    std::fs::write(&bin, b"PK\x03\x04").unwrap();
    probe(["inspect".as_ref(), bin.as_os_str()])
        .fails_with(&["pytorch_model.bin", "PyTorch pickle"]);
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    probe(["inspect".as_ref(), empty.as_os_str()])
        .fails_with(&[empty.to_str().unwrap(), "no checkpoint here"]);
}

#[test]
fn unwritable_output_leaves_nothing() {
    let dir = tempdir();
    let out = dir.path().join("no/such/folder/out.parquet");
    probe([
        "inspect".as_ref(),
        fixture("llama-tied-f32").as_os_str(),
        "--out".as_ref(),
        out.as_os_str(),
    ])
    .fails_with(&["no/such/folder/out.parquet"]);
    assert!(!out.exists());
}

#[test]
fn bad_format_is_a_usage_error() {
    let run = probe([
        "inspect".as_ref(),
        fixture("llama-tied-f32").as_os_str(),
        "--format".as_ref(),
        "xml".as_ref(),
    ]);
    assert_eq!(run.code, Some(2));
    assert!(
        run.stderr.contains("unknown format `xml`"),
        "{}",
        run.stderr
    );
}

#[test]
fn committed_fixtures_are_current() {
    let fresh = tempdir();
    probe_fixtures::write_all(fresh.path()).unwrap();
    for spec in probe_fixtures::all() {
        for entry in std::fs::read_dir(fresh.path().join(spec.name)).unwrap() {
            let entry = entry.unwrap();
            let committed = fixture(spec.name).join(entry.file_name());
            assert!(
                std::fs::read(entry.path()).unwrap() == std::fs::read(&committed).unwrap(),
                "{} is stale: run `cargo xtask fixtures`",
                committed.display()
            );
        }
    }
}
