//! Real trained models (fetched by `cargo xtask models`), single-file and
//! re-sharded. These fail, rather than skip, when the models are absent;
//! set PROBE_SKIP_REAL_MODELS=1 to leave them out deliberately.

use std::path::{Path, PathBuf};

use crate::util::{inspect_json, tempdir};

/// The folder of a real model, or None when the user opted out.
pub fn real_model(name: &str) -> Option<PathBuf> {
    if std::env::var_os("PROBE_SKIP_REAL_MODELS").is_some_and(|v| v == "1") {
        eprintln!("skipping {name}: PROBE_SKIP_REAL_MODELS=1");
        return None;
    }
    let root = std::env::var_os("PROBE_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.models"));
    let dir = root.join(name);
    assert!(
        dir.join(".complete").exists(),
        "{} is missing: run `cargo xtask models` (or set PROBE_SKIP_REAL_MODELS=1)",
        dir.display()
    );
    Some(dir)
}

/// Split a single-file checkpoint into `n` shards with an index, as
/// `save_pretrained(max_shard_size=…)` does.
fn reshard(model: &Path, dest: &Path, n: usize) {
    let bytes = std::fs::read(model.join("model.safetensors")).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = tensors.names().into_iter().map(String::from).collect();
    names.sort();
    let mut weight_map = serde_json::Map::new();
    for (shard, chunk) in names.chunks(names.len().div_ceil(n)).enumerate() {
        let file = format!("model-{:05}-of-{n:05}.safetensors", shard + 1);
        let views: Vec<(String, safetensors::tensor::TensorView)> = chunk
            .iter()
            .map(|name| {
                weight_map.insert(name.clone(), file.clone().into());
                (name.clone(), tensors.tensor(name).unwrap())
            })
            .collect();
        safetensors::serialize_to_file(views, None, &dest.join(&file)).unwrap();
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
    std::fs::write(dest.join("model.safetensors.index.json"), index.to_string()).unwrap();
    std::fs::copy(model.join("config.json"), dest.join("config.json")).unwrap();
}

fn check(
    json: &serde_json::Value,
    family: &str,
    layers: u64,
    hidden: u64,
    vocab: u64,
    tied: bool,
    tensors: usize,
) {
    assert_eq!(json["family"], family);
    assert_eq!(json["num_layers"], layers);
    assert_eq!(json["hidden_size"], hidden);
    assert_eq!(json["vocab_size"], vocab);
    assert_eq!(json["tied_embeddings"], tied);
    assert_eq!(json["tensors"].as_array().unwrap().len(), tensors);
}

#[test]
fn smollm2_single_and_sharded() {
    let Some(model) = real_model("SmolLM2-135M-Instruct") else {
        return;
    };
    let json = inspect_json(&model);
    // 30 blocks × 9 tensors + embedding + final norm; no lm_head (tied).
    check(&json, "llama", 30, 576, 49152, true, 272);
    assert_eq!(json["params"], 134_515_008u64);
    let q = json["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "model.layers.29.self_attn.k_proj.weight")
        .unwrap();
    assert_eq!(q["shape"], serde_json::json!([192, 576]));
    assert_eq!(q["role"], "k");
    assert_eq!(q["layer"], 29);

    let sharded = tempdir();
    reshard(&model, sharded.path(), 3);
    let resharded = inspect_json(sharded.path());
    assert_eq!(resharded, json);
}

#[test]
fn minilm_single_and_sharded() {
    let Some(model) = real_model("all-MiniLM-L6-v2") else {
        return;
    };
    let json = inspect_json(&model);
    check(
        &json,
        "bert",
        6,
        384,
        30522,
        false,
        json["tensors"].as_array().unwrap().len(),
    );
    let roles: Vec<&str> = json["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["layer"] == 3)
        .map(|t| t["role"].as_str().unwrap())
        .collect();
    for role in [
        "q",
        "k",
        "v",
        "o",
        "up",
        "down",
        "post_attn_norm",
        "post_mlp_norm",
    ] {
        assert!(roles.contains(&role), "layer 3 lacks {role}: {roles:?}");
    }
    let sharded = tempdir();
    reshard(&model, sharded.path(), 2);
    assert_eq!(inspect_json(sharded.path()), json);
}
