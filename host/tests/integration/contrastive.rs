//! The contrastive plugin: every measure against a direct computation from
//! the engine's residuals and its full-vocabulary lens, on a fixture with a
//! word-level tokenizer; the real models on a few groups; bad sets.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use probe::forward::{text::TextCodec, Capture, Engine, EngineOptions, Request};
use probe::store::Checkpoint;

use crate::real_models::real_model;
use crate::util::{
    column_i64, column_opt_f64, column_str, fixture_with_tokenizer, read_parquet, run_plugin,
    run_plugin_to, tempdir,
};

const PLUGIN: &str = "probe-plugin-contrastive";

const FIXTURE_SET: &str = r#"{"groups": [
  {"id": "size", "relationship": "synonym", "prompt": "the cat sat on the mat",
   "completions": [{"label": "big", "text": "it was big and warm ."},
                   {"label": "large", "text": "it was large and warm ."},
                   {"label": "huge", "text": "huge it was and warm"}]},
  {"id": "heat", "relationship": "antonym", "prompt": "the day was",
   "completions": [{"label": "hot", "text": "very hot and dry"},
                   {"label": "cold", "text": "very cold and dry ."}]},
  {"id": "short", "relationship": "style", "prompt": "is it",
   "completions": [{"label": "yes", "text": "yes sir"}, {"label": "no", "text": "no sir"}]}
]}"#;

fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().fold(f64::MIN, |m, &z| m.max(z as f64));
    let lse = max
        + logits
            .iter()
            .map(|&z| (z as f64 - max).exp())
            .sum::<f64>()
            .ln();
    logits.iter().map(|&z| z as f64 - lse).collect()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// CKA by its feature-space form ‖YᵀX‖²_F / (‖XᵀX‖_F ‖YᵀY‖_F) on centred
/// columns: another route than the plugin's Gram matrices.
fn cka_features(x: &[Vec<f64>], y: &[Vec<f64>]) -> f64 {
    let centre = |m: &[Vec<f64>]| -> Vec<Vec<f64>> {
        let n = m.len() as f64;
        let mean: Vec<f64> = (0..m[0].len())
            .map(|j| m.iter().map(|r| r[j]).sum::<f64>() / n)
            .collect();
        m.iter()
            .map(|r| r.iter().zip(&mean).map(|(v, mu)| v - mu).collect())
            .collect()
    };
    let (x, y) = (centre(x), centre(y));
    let cross = |a: &[Vec<f64>], b: &[Vec<f64>]| -> f64 {
        // ‖BᵀA‖²_F = Σ_{p,q} (Σ_n b[n][p] a[n][q])².
        let (w_a, w_b) = (a[0].len(), b[0].len());
        let mut total = 0.0;
        for p in 0..w_b {
            for q in 0..w_a {
                let s: f64 = a.iter().zip(b).map(|(ra, rb)| rb[p] * ra[q]).sum();
                total += s * s;
            }
        }
        total
    };
    cross(&x, &y) / (cross(&x, &x).sqrt() * cross(&y, &y).sqrt())
}

#[test]
fn every_measure_matches_a_direct_computation_on_a_fixture() {
    let dir = tempdir();
    let model = fixture_with_tokenizer(dir.path());
    let set = dir.path().join("set.json");
    std::fs::write(&set, FIXTURE_SET).unwrap();
    let out = dir.path().join("traj.parquet");
    run_plugin_to(
        PLUGIN,
        &model,
        &[&format!("groups={}", set.display())],
        &out,
    );
    let table = read_parquet(&out);

    // The reference: the engine's residuals and full logits, measured here,
    // one pass per completion (the plugin runs each group as one branched
    // pass, so residuals agree to f32 rounding, not bit for bit).
    let checkpoint = Checkpoint::open(&model).unwrap();
    let codec = TextCodec::open(&checkpoint.dir).unwrap();
    let mut engine = Engine::open(&checkpoint, EngineOptions::default()).unwrap();
    let groups: serde_json::Value = serde_json::from_str(FIXTURE_SET).unwrap();
    // (group, label) → (tokens, prompt length, residual per stage).
    type Pass = (Vec<u32>, usize, Vec<Vec<f32>>);
    let mut residuals: BTreeMap<(String, String), Pass> = BTreeMap::new();
    for group in groups["groups"].as_array().unwrap() {
        let prompt = codec.encode(group["prompt"].as_str().unwrap()).unwrap();
        for c in group["completions"].as_array().unwrap() {
            let mut tokens = prompt.clone();
            tokens.extend(
                codec
                    .encode_continuation(c["text"].as_str().unwrap())
                    .unwrap(),
            );
            let trace = engine
                .run(&Request {
                    tokens: &tokens,
                    capture: Capture {
                        residuals: true,
                        ..Capture::default()
                    },
                    ..Request::default()
                })
                .unwrap();
            let key = (
                group["id"].as_str().unwrap().to_string(),
                c["label"].as_str().unwrap().to_string(),
            );
            residuals.insert(key, (tokens, prompt.len(), trace.residuals));
        }
    }
    let hidden = 32;
    let row = |stage: &[f32], p: usize| -> Vec<f64> {
        stage[p * hidden..(p + 1) * hidden]
            .iter()
            .map(|&v| v as f64)
            .collect()
    };

    // 3 + 1 + 1 pairs, each over the embedding and 3 blocks.
    assert_eq!(table.height(), 5 * 4);
    let (group, label_a, label_b) = (
        column_str(&table, "group"),
        column_str(&table, "label_a"),
        column_str(&table, "label_b"),
    );
    let (layer, divergence, shared, common) = (
        column_i64(&table, "layer"),
        column_i64(&table, "divergence_position"),
        column_i64(&table, "shared_prefix_tokens"),
        column_i64(&table, "common_tokens"),
    );
    let measures = ["cosine", "distance", "kl_ab", "kl_ba", "kl_sym", "cka"]
        .map(|m| column_opt_f64(&table, m));
    let mut checked_kl = 0;
    for r in 0..table.height() {
        let (ta, pa, ra) = &residuals[&(group[r].clone(), label_a[r].clone())];
        let (tb, _, rb) = &residuals[&(group[r].clone(), label_b[r].clone())];
        let d = ta.iter().zip(tb).position(|(x, y)| x != y).unwrap();
        assert_eq!(divergence[r], d as i64);
        assert_eq!(shared[r], (d - pa) as i64);
        let stage = (layer[r] + 1) as usize;
        let (a, b) = (row(&ra[stage], d), row(&rb[stage], d));
        let (na, nb) = (dot(&a, &a).sqrt(), dot(&b, &b).sqrt());
        let diff: Vec<f64> = a.iter().zip(&b).map(|(x, y)| x - y).collect();
        let want_cosine = dot(&a, &b) / (na * nb);
        let want_distance = dot(&diff, &diff).sqrt() / (0.5 * (na + nb));
        let close = |got: Option<f64>, want: f64, tol: f64, what: &str| {
            let got = got.unwrap_or_else(|| panic!("{what} is null in row {r}"));
            assert!(
                (got - want).abs() <= tol * want.abs().max(1.0),
                "{what} row {r}: {got} vs {want}"
            );
        };
        close(measures[0][r], want_cosine, 1e-6, "cosine");
        close(measures[1][r], want_distance, 1e-6, "distance");
        // The full-vocabulary lens of each row, its KL both ways.
        let mut lens = |v: &[f64]| -> Vec<f64> {
            let residual: Vec<f32> = v.iter().map(|&x| x as f32).collect();
            log_softmax(&engine.lens(&residual, 1).unwrap())
        };
        let (lp, lq) = (lens(&a), lens(&b));
        let kl =
            |p: &[f64], q: &[f64]| -> f64 { p.iter().zip(q).map(|(x, y)| x.exp() * (x - y)).sum() };
        let (ab, ba) = (kl(&lp, &lq), kl(&lq, &lp));
        close(measures[2][r], ab, 1e-5, "kl_ab");
        close(measures[3][r], ba, 1e-5, "kl_ba");
        close(measures[4][r], 0.5 * (ab + ba), 1e-5, "kl_sym");
        checked_kl += usize::from(ab > 1e-6);
        // CKA over the completion tokens both have.
        let n = (ta.len() - pa).min(tb.len() - pa);
        assert_eq!(common[r], n as i64);
        if n < 3 {
            assert_eq!(measures[5][r], None, "cka under 3 common tokens");
        } else {
            let x: Vec<Vec<f64>> = (*pa..pa + n).map(|p| row(&ra[stage], p)).collect();
            let y: Vec<Vec<f64>> = (*pa..pa + n).map(|p| row(&rb[stage], p)).collect();
            close(measures[5][r], cka_features(&x, &y), 1e-6, "cka");
        }
    }
    assert!(checked_kl >= 15, "the lens differs at most rows");
    // "huge" differs from the first completion token, "big"/"large" after two.
    assert_eq!(&shared[..4], &[2, 2, 2, 2]);
    assert!(shared.contains(&0));

    // The summary: mean and sample std per (relationship, layer).
    let summary = read_parquet(&dir.path().join("traj.summary.parquet"));
    assert_eq!(summary.height(), 3 * 4);
    let s_rel = column_str(&summary, "relationship");
    let s_layer = column_i64(&summary, "layer");
    let s_mean = column_opt_f64(&summary, "cosine_mean");
    let s_std = column_opt_f64(&summary, "cosine_std");
    let relationship = column_str(&table, "relationship");
    for i in 0..summary.height() {
        let values: Vec<f64> = (0..table.height())
            .filter(|&r| relationship[r] == s_rel[i] && layer[r] == s_layer[i])
            .map(|r| measures[0][r].unwrap())
            .collect();
        let n = values.len() as f64;
        let mean = values.iter().sum::<f64>() / n;
        assert!((s_mean[i].unwrap() - mean).abs() < 1e-12);
        if values.len() > 1 {
            let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
            assert!((s_std[i].unwrap() - var.sqrt()).abs() < 1e-12);
        } else {
            assert_eq!(s_std[i], None);
        }
    }
    assert_eq!(&s_rel[..4], &["synonym"; 4], "relationships in their order");
    assert_eq!(&s_layer[..4], &[-1, 0, 1, 2]);

    // The crossover: wherever the sign of synonym − antonym cosine flips.
    let crossover = read_parquet(&dir.path().join("traj.crossover.parquet"));
    let curve = |name: &str| -> Vec<f64> {
        (0..summary.height())
            .filter(|&i| s_rel[i] == name)
            .map(|i| s_mean[i].unwrap())
            .collect()
    };
    let (syn, ant) = (curve("synonym"), curve("antonym"));
    let flips: Vec<i64> = (1..syn.len())
        .filter(|&l| (syn[l] - ant[l]).signum() != (syn[l - 1] - ant[l - 1]).signum())
        .map(|l| l as i64 - 1)
        .collect();
    assert_eq!(column_i64(&crossover, "layer"), flips);
}

#[test]
fn bad_sets_name_the_file_and_the_group() {
    let dir = tempdir();
    let model = fixture_with_tokenizer(dir.path());
    let lib = crate::util::plugin_lib(PLUGIN);
    let lib = lib.to_str().unwrap();
    let run = |name: &str, json: &str| {
        let set = dir.path().join(name);
        std::fs::write(&set, json).unwrap();
        let param = format!("groups={}", set.display());
        (set, run_plugin(lib, &model, &[&param], &["--quiet"]))
    };
    let (set, outcome) = run(
        "one.json",
        r#"{"groups": [{"id": "lonely", "relationship": "synonym", "prompt": "the cat",
            "completions": [{"label": "a", "text": "sat"}]}]}"#,
    );
    outcome.fails_with(&[
        &set.display().to_string(),
        "group 0 (`lonely`)",
        "a group compares two or more",
    ]);
    let (set, outcome) = run(
        "same.json",
        r#"{"groups": [
          {"id": "fine", "relationship": "antonym", "prompt": "the day was",
           "completions": [{"label": "hot", "text": "very hot"}, {"label": "cold", "text": "very cold"}]},
          {"id": "twins", "relationship": "style", "prompt": "the cat",
           "completions": [{"label": "a", "text": "sat on"}, {"label": "b", "text": "sat   on"}]}]}"#,
    );
    outcome.fails_with(&[
        &set.display().to_string(),
        "group 1 (`twins`)",
        "completions `a` and `b` tokenize identically",
    ]);
    let (set, outcome) = run("broken.json", r#"{"groups": [ {"id": "x",, } ]}"#);
    outcome.fails_with(&[
        &set.display().to_string(),
        "not a contrastive set",
        "line 1",
    ]);
}

/// The first group of each relationship in the built-in set, as a file.
fn one_group_each(dir: &Path) -> PathBuf {
    let set: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../probes/contrastive.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let mut picked = Vec::new();
    for relationship in ["synonym", "antonym", "style", "unrelated"] {
        let group = set["groups"]
            .as_array()
            .unwrap()
            .iter()
            .find(|g| g["relationship"] == relationship)
            .unwrap();
        picked.push(group.clone());
    }
    let path = dir.join("four.json");
    std::fs::write(&path, serde_json::json!({ "groups": picked }).to_string()).unwrap();
    path
}

#[test]
fn smollm2_covers_every_layer_and_its_embedding_cosine_is_the_weights() {
    let Some(model) = real_model("SmolLM2-135M-Instruct") else {
        return;
    };
    let dir = tempdir();
    let set = one_group_each(dir.path());
    let out = dir.path().join("traj.parquet");
    run_plugin_to(
        PLUGIN,
        &model,
        &[&format!("groups={}", set.display())],
        &out,
    );
    let table = read_parquet(&out);
    let layer = column_i64(&table, "layer");
    let pairs = table.height() / 31;
    assert_eq!(table.height(), pairs * 31, "layers −1 … 29 for every pair");
    assert_eq!(pairs, 3 + 1 + 1 + 3, "all pairs of the four groups");
    assert_eq!(layer[..31].to_vec(), (-1..30).collect::<Vec<i64>>());
    for name in ["cosine", "distance", "kl_ab", "kl_ba", "kl_sym", "cka"] {
        let values = column_opt_f64(&table, name);
        assert!(
            values.iter().all(|v| v.is_some_and(f64::is_finite)),
            "{name} has a null or NaN"
        );
    }
    // Layer −1 is the token embedding itself (no position in it: RoPE acts
    // inside attention), so its cosine is that of the two embedding rows.
    let checkpoint = Checkpoint::open(&model).unwrap();
    let embed = checkpoint
        .tensor("model.embed_tokens.weight")
        .unwrap()
        .to_f32()
        .unwrap();
    let hidden = 576;
    let embedding = |id: i64| -> Vec<f64> {
        let id = id as usize;
        embed[id * hidden..(id + 1) * hidden]
            .iter()
            .map(|&v| v as f64)
            .collect()
    };
    let (token_a, token_b) = (column_i64(&table, "token_a"), column_i64(&table, "token_b"));
    let cosine = column_opt_f64(&table, "cosine");
    for r in (0..table.height()).filter(|&r| layer[r] == -1) {
        let (a, b) = (embedding(token_a[r]), embedding(token_b[r]));
        let want = dot(&a, &b) / (dot(&a, &a).sqrt() * dot(&b, &b).sqrt());
        assert!(
            (cosine[r].unwrap() - want).abs() < 1e-9,
            "row {r}: {:?} vs {want}",
            cosine[r]
        );
    }
    // The last layer's lens is the model's prediction: two different next
    // tokens' contexts give distributions apart.
    let kl = column_opt_f64(&table, "kl_sym");
    assert!((0..table.height())
        .filter(|&r| layer[r] == 29)
        .all(|r| kl[r].unwrap() > 0.0));
}

#[test]
fn minilm_runs_without_a_lens_and_says_so_once() {
    let Some(model) = real_model("all-MiniLM-L6-v2") else {
        return;
    };
    let dir = tempdir();
    let set = one_group_each(dir.path());
    let out = dir.path().join("traj.parquet");
    let lib = crate::util::plugin_lib(PLUGIN);
    let run = run_plugin(
        lib.to_str().unwrap(),
        &model,
        &[&format!("groups={}", set.display())],
        &["--out", out.to_str().unwrap()],
    );
    let stderr = run.stderr.clone();
    run.ok();
    assert_eq!(
        stderr.matches("no logit lens").count(),
        1,
        "one warning:\n{stderr}"
    );
    let table = read_parquet(&out);
    assert_eq!(table.height(), 8 * 7, "embedding and 6 blocks for 8 pairs");
    assert!(column_opt_f64(&table, "kl_sym").iter().all(Option::is_none));
    assert!(column_opt_f64(&table, "cosine")
        .iter()
        .all(|v| v.is_some_and(f64::is_finite)));
    assert!(column_opt_f64(&table, "cka")
        .iter()
        .all(|v| v.is_some_and(f64::is_finite)));
}
