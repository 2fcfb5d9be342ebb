//! The geometry plugin: every metric at every layer against a direct
//! computation over the hidden states taken from the engine — cosines pair
//! by pair, the participation ratio from traces, eigenvalues by Jacobi
//! rotations written here — on every decoder family and BERT; SmolLM2 once.

use probe::forward::{text::TextCodec, Capture, Engine, EngineOptions, Request};
use probe::store::Checkpoint;

use crate::knockout::{sequences, SET};
use crate::real_models::real_model;
use crate::util::{
    column_f64, column_i64, column_opt_f64, family_with_tokenizer, read_parquet, run_plugin_to,
    tempdir, DECODER_FIXTURES,
};

const PLUGIN: &str = "probe-plugin-geometry";

/// Eigenvalues of a symmetric matrix by cyclic Jacobi rotations.
pub fn jacobi_eigenvalues(mut a: Vec<f64>, n: usize) -> Vec<f64> {
    for _sweep in 0..100 {
        let off: f64 = (0..n)
            .flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[i * n + j].powi(2))
            .sum();
        if off
            < 1e-22
                * (0..n)
                    .map(|i| a[i * n + i].powi(2))
                    .sum::<f64>()
                    .max(1e-300)
        {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                let apq = a[p * n + q];
                if apq == 0.0 {
                    continue;
                }
                let theta = (a[q * n + q] - a[p * n + p]) / (2.0 * apq);
                let t = theta.signum().max(0.0) * 2.0 - 1.0;
                let t = t / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..n {
                    let (akp, akq) = (a[k * n + p], a[k * n + q]);
                    a[k * n + p] = c * akp - s * akq;
                    a[k * n + q] = s * akp + c * akq;
                }
                for k in 0..n {
                    let (apk, aqk) = (a[p * n + k], a[q * n + k]);
                    a[p * n + k] = c * apk - s * aqk;
                    a[q * n + k] = s * apk + c * aqk;
                }
            }
        }
    }
    let mut values: Vec<f64> = (0..n).map(|i| a[i * n + i].max(0.0)).collect();
    values.sort_by(|x, y| y.total_cmp(x));
    values
}

/// XᵀX of `n` rows of width `d`.
pub fn gram(x: &[Vec<f64>], d: usize) -> Vec<f64> {
    let mut g = vec![0.0; d * d];
    for row in x {
        for i in 0..d {
            for j in 0..d {
                g[i * d + j] += row[i] * row[j];
            }
        }
    }
    g
}

fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let (na, nb) = (
        a.iter().map(|x| x * x).sum::<f64>().sqrt(),
        b.iter().map(|x| x * x).sum::<f64>().sqrt(),
    );
    if na == 0.0 || nb == 0.0 {
        0.0
    } else {
        dot / (na * nb)
    }
}

/// Every metric of one pool, written out from its definition.
fn direct(rows: &[Vec<f64>], categories: &[usize]) -> [Option<f64>; 7] {
    let (n, d) = (rows.len(), rows[0].len());
    let mean: Vec<f64> = (0..d)
        .map(|k| rows.iter().map(|r| r[k]).sum::<f64>() / n as f64)
        .collect();
    let centred: Vec<Vec<f64>> = rows
        .iter()
        .map(|r| r.iter().zip(&mean).map(|(v, m)| v - m).collect())
        .collect();
    let (mut raw, mut cen, mut pairs) = (0.0, 0.0, 0.0);
    let (mut intra, mut n_intra, mut inter, mut n_inter) = (0.0, 0.0, 0.0, 0.0);
    for i in 0..n {
        for j in 0..n {
            if i == j {
                continue;
            }
            let c = cosine(&rows[i], &rows[j]);
            raw += c;
            cen += cosine(&centred[i], &centred[j]);
            pairs += 1.0;
            if categories[i] == categories[j] {
                intra += c;
                n_intra += 1.0;
            } else {
                inter += c;
                n_inter += 1.0;
            }
        }
    }
    let separation = (n_intra > 0.0 && n_inter > 0.0).then(|| {
        let (a, b) = (intra / n_intra, inter / n_inter);
        (a - b) / b.abs()
    });
    // PR = (tr C)² / tr(C²) = (Σλ)² / Σλ², no eigenvalues needed.
    let c = gram(&centred, d);
    let trace: f64 = (0..d).map(|i| c[i * d + i]).sum();
    let frobenius: f64 = c.iter().map(|v| v * v).sum();
    let pr = trace * trace / frobenius;
    let lambda = jacobi_eigenvalues(c, d);
    let held = &lambda[..(n - 1).min(d)];
    let flatness = if held.iter().all(|&l| l > 1e-10 * lambda[0]) {
        let log_mean = held.iter().map(|l| l.ln()).sum::<f64>() / held.len() as f64;
        log_mean.exp() / (held.iter().sum::<f64>() / held.len() as f64)
    } else {
        0.0
    };
    let sigma: Vec<f64> = jacobi_eigenvalues(gram(rows, d), d)
        .into_iter()
        .map(f64::sqrt)
        .collect();
    let total: f64 = sigma.iter().sum();
    let erank = (-sigma
        .iter()
        .filter(|&&s| s > 1e-12 * sigma[0])
        .map(|s| (s / total) * (s / total).ln())
        .sum::<f64>())
    .exp();
    let mean_norm = rows
        .iter()
        .map(|r| r.iter().map(|x| x * x).sum::<f64>().sqrt())
        .sum::<f64>()
        / n as f64;
    [
        Some(pr),
        Some(raw / pairs),
        Some(cen / pairs),
        Some(mean_norm),
        Some(flatness),
        separation,
        Some(erank),
    ]
}

const COLUMNS: [&str; 7] = [
    "participation_ratio",
    "isotropy_raw",
    "isotropy_centred",
    "mean_norm",
    "spectral_flatness",
    "category_separation",
    "erank",
];

#[test]
fn every_metric_at_every_layer_matches_a_direct_computation() {
    for family in DECODER_FIXTURES.iter().chain(&["bert-f32"]) {
        eprintln!("{family}");
        let dir = tempdir();
        let model = family_with_tokenizer(dir.path(), family);
        let set = dir.path().join("prompts.jsonl");
        std::fs::write(&set, SET).unwrap();
        let out = run_plugin_to(
            PLUGIN,
            &model,
            &[&format!("prompts={}", set.display())],
            &dir.path().join("geometry.parquet"),
        );
        let table = read_parquet(&out);

        let checkpoint = Checkpoint::open(&model).unwrap();
        let codec = TextCodec::open(&checkpoint.dir).unwrap();
        let mut engine = Engine::open(&checkpoint, EngineOptions::default()).unwrap();
        let stages = engine.num_blocks() + 1;
        // SET's categories in file order: facts, weather, facts.
        let category_of = [0usize, 1, 0];
        let mut pools: Vec<Vec<Vec<f64>>> = vec![Vec::new(); stages];
        let mut categories = Vec::new();
        for ((tokens, prompt_len), &category) in sequences(&codec).iter().zip(&category_of) {
            let trace = engine
                .run(&Request {
                    tokens,
                    capture: Capture {
                        residuals: true,
                        ..Capture::default()
                    },
                    ..Request::default()
                })
                .unwrap();
            let d = trace.hidden;
            for p in prompt_len - 1..tokens.len() - 1 {
                categories.push(category);
                for (pool, residual) in pools.iter_mut().zip(&trace.residuals) {
                    pool.push(
                        residual[p * d..(p + 1) * d]
                            .iter()
                            .map(|&v| f64::from(v))
                            .collect(),
                    );
                }
            }
        }
        assert_eq!(
            column_i64(&table, "layer"),
            (-1..stages as i64 - 1).collect::<Vec<_>>()
        );
        assert_eq!(column_i64(&table, "tokens")[0], categories.len() as i64);
        let got: Vec<Vec<Option<f64>>> =
            COLUMNS.iter().map(|c| column_opt_f64(&table, c)).collect();
        for (stage, pool) in pools.iter().enumerate() {
            let want = direct(pool, &categories);
            for (k, name) in COLUMNS.iter().enumerate() {
                let (g, w) = (got[k][stage], want[k]);
                match (g, w) {
                    // The separation divides by the inter-category mean
                    // cosine, which can be near 0 (a ratio of 700 on a
                    // fixture): it carries the sums' rounding times that.
                    (Some(g), Some(w)) => assert!(
                        (g - w).abs()
                            <= if *name == "category_separation" {
                                1e-4
                            } else {
                                1e-6
                            } * w.abs().max(1.0),
                        "{family} layer {} {name}: plugin {g}, direct {w}",
                        stage as i64 - 1
                    ),
                    _ => assert_eq!(g.is_some(), w.is_some(), "{family} {name}"),
                }
            }
        }
        // Not a constant: the metrics move across depth.
        let pr = column_f64(&table, "participation_ratio");
        assert!(
            pr.iter().any(|&p| (p - pr[0]).abs() > 1e-3),
            "{family}: {pr:?}"
        );
    }
}

/// SmolLM2 on two prompts: the published shapes that a small pool shows —
/// the norm grows with depth, the centred cosine stays near 0 while the raw
/// one does not.
#[test]
fn smollm2_norms_grow_and_anisotropy_is_the_mean_direction() {
    let Some(model) = real_model("SmolLM2-135M-Instruct") else {
        return;
    };
    let dir = tempdir();
    let set = crate::util::two_real_prompts(dir.path());
    let out = run_plugin_to(
        PLUGIN,
        &model,
        &[&format!("prompts={}", set.display())],
        &dir.path().join("geometry.parquet"),
    );
    let table = read_parquet(&out);
    assert_eq!(table.height(), 31);
    let norm = column_f64(&table, "mean_norm");
    assert!(norm[30] > 50.0 * norm[0], "{norm:?}");
    let (raw, centred) = (
        column_f64(&table, "isotropy_raw"),
        column_f64(&table, "isotropy_centred"),
    );
    for layer in 10..29 {
        assert!(
            raw[layer] > 0.3,
            "layer {}: {}",
            layer as i64 - 1,
            raw[layer]
        );
        assert!(
            centred[layer].abs() < 0.1,
            "layer {}: {}",
            layer as i64 - 1,
            centred[layer]
        );
    }
}
