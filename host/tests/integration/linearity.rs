//! The linearity plugin: every gap, spread, amplification, update ratio,
//! sweep row and order against finite differences computed here from
//! whole-block engine runs — the attention part from the block's attention
//! update, the MLP part from the block with its attention output zeroed by
//! an override (so the check does not go through the sublayer graphs the
//! plugin uses) — with the random directions made here from their
//! definition, on every decoder fixture family; the block part on BERT.

use std::collections::BTreeMap;

use probe::forward::{text::TextCodec, Capture, Engine, EngineOptions, Request, WeightOverride};
use probe::store::Checkpoint;
use probe::Schema;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::knockout::{sequences, SET};
use crate::real_models::real_model;
use crate::util::{
    column_f64, column_i64, column_opt_f64, column_str, family_with_tokenizer, read_parquet,
    run_plugin, run_plugin_to, tempdir, DECODER_FIXTURES,
};

const PLUGIN: &str = "probe-plugin-linearity";

/// Unit rows of standard normal components: Box–Muller over ChaCha8
/// uniforms (seed, then stream `line << 20 | k`), as the README defines them.
fn directions(seed: u64, stream: u64, rows: usize, hidden: usize) -> Vec<Vec<f64>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    (0..rows)
        .map(|_| {
            let mut row = Vec::new();
            while row.len() < hidden {
                let (u1, u2) = (1.0 - rng.random::<f64>(), rng.random::<f64>());
                let r = (-2.0 * u1.ln()).sqrt();
                row.push(r * (std::f64::consts::TAU * u2).cos());
                row.push(r * (std::f64::consts::TAU * u2).sin());
            }
            row.truncate(hidden);
            let norm = row.iter().map(|v| v * v).sum::<f64>().sqrt();
            // The plugin holds directions as f32.
            row.iter().map(|v| f64::from((v / norm) as f32)).collect()
        })
        .collect()
}

fn l2(v: impl Iterator<Item = f64>) -> f64 {
    v.map(|x| x * x).sum::<f64>().sqrt()
}

/// Per-(token, direction) gaps and amplifications of one (block, part, ε).
#[derive(Default)]
struct Samples {
    gaps: Vec<f64>,
    amplifications: Vec<f64>,
}

impl Samples {
    fn mean(v: &[f64]) -> f64 {
        v.iter().sum::<f64>() / v.len() as f64
    }
    fn std(v: &[f64]) -> f64 {
        let m = Self::mean(v);
        (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / v.len() as f64).sqrt()
    }
}

const EPSILON: f64 = 0.05;
const SWEEP: [f64; 3] = [0.02, 0.05, 0.2];
const DIRECTIONS: usize = 3;
const SWEEP_DIRECTIONS: usize = 2;
const SEED: u64 = 5;

#[test]
fn every_number_matches_finite_differences_on_every_family() {
    for family in DECODER_FIXTURES.iter().chain(&["bert-f32"]) {
        eprintln!("{family}");
        check_linearity(family);
    }
}

fn check_linearity(family: &str) {
    let encoder = family == "bert-f32";
    let parts: &[&str] = if encoder {
        &["block"]
    } else {
        &["block", "attention", "mlp"]
    };
    let dir = tempdir();
    let model = family_with_tokenizer(dir.path(), family);
    let set = dir.path().join("prompts.jsonl");
    std::fs::write(&set, SET).unwrap();
    let out = dir.path().join("linearity.parquet");
    run_plugin_to(
        PLUGIN,
        &model,
        &[
            &format!("prompts={}", set.display()),
            "eps=0.02,0.2",
            &format!("epsilon={EPSILON}"),
            &format!("directions={DIRECTIONS}"),
            &format!("sweep_directions={SWEEP_DIRECTIONS}"),
            &format!("seed={SEED}"),
            &format!("parts={}", parts.join(",")),
            "sample=0",
        ],
        &out,
    );
    let table = read_parquet(&out);
    let sweep = read_parquet(&dir.path().join("linearity.sweep.parquet"));

    let checkpoint = Checkpoint::open(&model).unwrap();
    let schema = Schema::of(&checkpoint);
    let codec = TextCodec::open(&checkpoint.dir).unwrap();
    let mut engine = Engine::open(&checkpoint, EngineOptions::default()).unwrap();
    let n = engine.num_blocks();
    let hidden = engine.arch.hidden;
    // Each block's attention output projection (weight and bias), zeroed:
    // the block then adds its MLP's update only.
    let zeroed: Vec<Vec<(String, Vec<f32>)>> = (0..n)
        .map(|l| {
            checkpoint
                .tensors()
                .iter()
                .zip(&schema.placements)
                .filter(|(_, p)| p.layer == Some(l) && p.role.to_string() == "o")
                .map(|(t, _)| (t.name.clone(), vec![0.0; t.shape.iter().product()]))
                .collect()
        })
        .collect();

    // (block, part, ε index) → samples over the first `SWEEP_DIRECTIONS`;
    // (block, part) → over `DIRECTIONS` at ε; update ratios.
    let mut sweep_samples: BTreeMap<(usize, &str, usize), Samples> = BTreeMap::new();
    let mut gap_samples: BTreeMap<(usize, &str), Samples> = BTreeMap::new();
    let mut ratios: BTreeMap<(usize, &str), Vec<f64>> = BTreeMap::new();
    for (line, (tokens, prompt_len)) in sequences(&codec).iter().enumerate() {
        // Positions predicting a completion token; a causal model's last
        // row never reaches one of them, so the plugin leaves it out.
        let scored = prompt_len - 1..tokens.len() - 1;
        let tokens = if encoder {
            &tokens[..]
        } else {
            &tokens[..tokens.len() - 1]
        };
        let t = tokens.len();
        let whole = engine
            .run(&Request {
                tokens,
                capture: Capture {
                    residuals: true,
                    updates: true,
                    ..Capture::default()
                },
                ..Request::default()
            })
            .unwrap();
        let dirs: Vec<Vec<Vec<f64>>> = (0..DIRECTIONS)
            .map(|k| directions(SEED, ((line as u64) << 20) | k as u64, t, hidden))
            .collect();
        for (block, zero) in zeroed.iter().enumerate() {
            let blocks = [block];
            let overrides: Vec<WeightOverride> = zero
                .iter()
                .map(|(tensor, values)| WeightOverride { tensor, values })
                .collect();
            let mut run_block = |start: &[f32], mlp_only: bool| -> (Vec<f32>, Vec<f32>) {
                let trace = engine
                    .run(&Request {
                        tokens,
                        blocks: Some(&blocks),
                        start: Some(start),
                        capture: Capture {
                            updates: true,
                            ..Capture::default()
                        },
                        overrides: if mlp_only { &overrides } else { &[] },
                        ..Request::default()
                    })
                    .unwrap();
                (trace.output, trace.attn_updates[0].clone())
            };
            // F for each part: the residual the part hands on.
            let x = &whole.residuals[block];
            let midpoint: Vec<f32> = x
                .iter()
                .zip(&whole.attn_updates[block])
                .map(|(a, b)| a + b)
                .collect();
            for &part in parts {
                let input: &[f32] = if part == "mlp" { &midpoint } else { x };
                let mut f = |start: &[f32]| -> Vec<f32> {
                    match part {
                        "block" => run_block(start, false).0,
                        "attention" => {
                            let (_, update) = run_block(start, false);
                            start.iter().zip(&update).map(|(a, b)| a + b).collect()
                        }
                        _ => run_block(start, true).0,
                    }
                };
                let base = f(input);
                let row = |v: &[f32], p: usize| -> Vec<f64> {
                    v[p * hidden..(p + 1) * hidden]
                        .iter()
                        .map(|&a| f64::from(a))
                        .collect()
                };
                for p in scored.clone() {
                    let (xr, fr) = (row(input, p), row(&base, p));
                    let ratio = l2(xr.iter().zip(&fr).map(|(a, b)| b - a)) / l2(xr.iter().copied());
                    ratios.entry((block, part)).or_default().push(ratio);
                }
                for (e, &eps) in SWEEP.iter().enumerate() {
                    for (k, d) in dirs.iter().enumerate() {
                        if !(k < SWEEP_DIRECTIONS || eps == EPSILON) {
                            continue;
                        }
                        // x ± ε‖x_t‖ d_t, every row, rounded to f32 as run.
                        let shifted = |sign: f64| -> Vec<f32> {
                            (0..t)
                                .flat_map(|p| {
                                    let xr = row(input, p);
                                    let size = eps * l2(xr.iter().copied());
                                    xr.into_iter()
                                        .zip(&d[p])
                                        .map(move |(v, dv)| (v + sign * size * dv) as f32)
                                        .collect::<Vec<_>>()
                                })
                                .collect()
                        };
                        let (plus, minus) = (shifted(1.0), shifted(-1.0));
                        let (fp, fm) = (f(&plus), f(&minus));
                        for p in scored.clone() {
                            let (xr, pr) = (row(input, p), row(&plus, p));
                            let (f0, f1, f2) = (row(&base, p), row(&fp, p), row(&fm, p));
                            let delta: Vec<f64> = pr.iter().zip(&xr).map(|(a, b)| a - b).collect();
                            // g(x+δ) − g(x) and g(x+δ) − g(x) − [g(x+δ) − g(x−δ)]/2.
                            let change: Vec<f64> =
                                (0..hidden).map(|i| f1[i] - f0[i] - delta[i]).collect();
                            let g = |y: &[f64], i: usize, input: &[f64]| y[i] - input[i];
                            let minus_row = row(&minus, p);
                            let nonlinear: Vec<f64> = (0..hidden)
                                .map(|i| {
                                    let jvp = 0.5 * (g(&f1, i, &pr) - g(&f2, i, &minus_row));
                                    change[i] - jvp
                                })
                                .collect();
                            let gap = l2(nonlinear.iter().copied()) / l2(change.iter().copied());
                            let amp = l2(change.iter().copied()) / l2(delta.iter().copied());
                            if k < SWEEP_DIRECTIONS {
                                let s = sweep_samples.entry((block, part, e)).or_default();
                                s.gaps.push(gap);
                                s.amplifications.push(amp);
                            }
                            if eps == EPSILON && k < DIRECTIONS {
                                let s = gap_samples.entry((block, part)).or_default();
                                s.gaps.push(gap);
                                s.amplifications.push(amp);
                            }
                        }
                    }
                }
            }
        }
    }

    let close = |what: String, got: f64, want: f64, tolerance: f64| {
        assert!(
            (got - want).abs() <= tolerance * want.abs().max(1e-3),
            "{family} {what}: plugin {got}, direct {want}"
        );
    };
    let (layer, part) = (column_i64(&table, "layer"), column_str(&table, "part"));
    assert_eq!(table.height(), n * parts.len(), "{family}");
    let (gap, gap_std, amp, order, ratio) = (
        column_f64(&table, "gap"),
        column_f64(&table, "gap_std"),
        column_f64(&table, "amplification"),
        column_opt_f64(&table, "order"),
        column_f64(&table, "update_ratio"),
    );
    let (s_layer, s_part, s_eps, s_gap, s_std, s_amp) = (
        column_i64(&sweep, "layer"),
        column_str(&sweep, "part"),
        column_f64(&sweep, "eps"),
        column_f64(&sweep, "gap"),
        column_f64(&sweep, "gap_std"),
        column_f64(&sweep, "amplification"),
    );
    assert_eq!(sweep.height(), n * parts.len() * SWEEP.len(), "{family}");
    for r in 0..table.height() {
        let key = (layer[r] as usize, part[r].as_str());
        assert_eq!(key.1, parts[r % parts.len()], "{family} row {r}");
        let s = &gap_samples[&key];
        assert_eq!(s.gaps.len(), 10 * DIRECTIONS, "{family}: 10 scored tokens");
        let what = |c: &str| format!("block {} {} {c}", key.0, key.1);
        close(what("gap"), gap[r], Samples::mean(&s.gaps), 2e-3);
        close(what("gap_std"), gap_std[r], Samples::std(&s.gaps), 2e-2);
        close(
            what("amplification"),
            amp[r],
            Samples::mean(&s.amplifications),
            1e-4,
        );
        close(
            what("update_ratio"),
            ratio[r],
            Samples::mean(&ratios[&key]),
            1e-5,
        );
        // The slope of ln gap over ln ε, by least squares, here.
        let points: Vec<(f64, f64)> = (0..SWEEP.len())
            .map(|e| {
                (
                    SWEEP[e].ln(),
                    Samples::mean(&sweep_samples[&(key.0, key.1, e)].gaps).ln(),
                )
            })
            .collect();
        let mx = points.iter().map(|p| p.0).sum::<f64>() / 3.0;
        let my = points.iter().map(|p| p.1).sum::<f64>() / 3.0;
        let slope = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum::<f64>()
            / points.iter().map(|p| (p.0 - mx).powi(2)).sum::<f64>();
        close(what("order"), order[r].unwrap(), slope, 2e-2);
    }
    for r in 0..sweep.height() {
        let e = SWEEP.iter().position(|&v| v == s_eps[r]).unwrap();
        let s = &sweep_samples[&(s_layer[r] as usize, s_part[r].as_str(), e)];
        assert_eq!(s.gaps.len(), 10 * SWEEP_DIRECTIONS);
        let what = |c: &str| {
            format!(
                "sweep block {} {} ε {} {c}",
                s_layer[r], s_part[r], s_eps[r]
            )
        };
        close(what("gap"), s_gap[r], Samples::mean(&s.gaps), 2e-3);
        close(what("gap_std"), s_std[r], Samples::std(&s.gaps), 2e-2);
        close(
            what("amplification"),
            s_amp[r],
            Samples::mean(&s.amplifications),
            1e-4,
        );
    }
    // Not a constant: the gap grows with ε.
    assert!(s_gap.chunks(3).all(|c| c[2] > c[0]), "{family}: {s_gap:?}");
}

#[test]
fn bad_parameters_and_missing_completions_are_refused_naming_them() {
    let dir = tempdir();
    let model = family_with_tokenizer(dir.path(), "llama-tied-f32");
    for (param, fragment) in [
        ("eps=0.1,abc", "`abc` is not a number"),
        ("epsilon=-0.1", "parameter `epsilon`"),
        ("directions=0", "parameter `directions`"),
        (
            "parts=block,ffn",
            "`ffn` is not one of block, attention, mlp",
        ),
        ("sample=-1", "parameter `sample`"),
    ] {
        run_plugin(PLUGIN, &model, &[param], &[]).fails_with(&[fragment]);
    }
    let bert = family_with_tokenizer(dir.path(), "bert-f32");
    run_plugin(PLUGIN, &bert, &[], &[]).fails_with(&["no completion", "cannot generate"]);
}

/// SmolLM2, three blocks, one prompt: block 0 is the one whose update
/// dwarfs its input (the published "layer 0 is qualitatively different"),
/// and the order of every part is near 1 (smooth maps).
#[test]
fn smollm2_block_zero_transforms_most() {
    let Some(model) = real_model("SmolLM2-135M-Instruct") else {
        return;
    };
    let dir = tempdir();
    let set = crate::util::two_real_prompts(dir.path());
    let out = run_plugin_to(
        PLUGIN,
        &model,
        &[
            &format!("prompts={}", set.display()),
            "sample=1",
            "layers=0,15,29",
            "directions=2",
            "sweep_directions=2",
            "eps=0.02,0.2",
        ],
        &dir.path().join("linearity.parquet"),
    );
    let table = read_parquet(&out);
    assert_eq!(
        column_i64(&table, "layer"),
        [0, 0, 0, 15, 15, 15, 29, 29, 29]
    );
    let ratio = column_f64(&table, "update_ratio");
    assert!(
        ratio[0] > 5.0 && ratio[3] < 1.0 && ratio[6] < 2.0,
        "{ratio:?}"
    );
    for (o, g) in column_opt_f64(&table, "order")
        .iter()
        .zip(column_f64(&table, "gap"))
    {
        let o = o.unwrap();
        assert!((0.8..1.2).contains(&o), "order {o}");
        assert!(g > 0.01 && g < 0.5, "gap {g}");
    }
}
