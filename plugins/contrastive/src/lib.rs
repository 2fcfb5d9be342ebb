//! contrastive: after one prompt, how far apart do related completions
//! ("big" / "large", "hot" / "cold", "Hello." / "Hey!") sit in the residual
//! stream, layer by layer? Each completion is force-decoded after the prompt
//! in one batched pass; at the first token where two completions differ the
//! plugin compares their hidden states (cosine, relative distance), their
//! logit-lens distributions (KL, both directions) and, over the completion
//! tokens they both have, the two sets of hidden states (linear CKA).
//!
//! Residuals are reduced where they arrive: of each pass only the
//! completion's rows are kept, and only until its group is measured; the
//! lens is reduced in the host, so no `[rows, vocab]` logits cross.

pub mod groups;
pub mod measures;

use std::collections::BTreeMap;

use probe_sdk::prelude::*;

use groups::{Group, Relationship};
use measures::{cosine, linear_cka, mean_std, relative_distance, CKA_MIN_TOKENS};

/// Residual floats held at once across a batch of passes (128 MiB): the
/// batch grows group by group until its completions would need more.
const BATCH_FLOATS: usize = 1 << 25;

struct Contrastive;

/// The groups to run, from `--param groups=FILE` or the built-in set.
fn load(params: &Params) -> Result<(String, Vec<Group>), PluginError> {
    let path = params.str("groups")?;
    if path.is_empty() {
        let groups = groups::parse(groups::BUILT_IN_NAME, groups::BUILT_IN)?;
        return Ok((groups::BUILT_IN_NAME.to_string(), groups));
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| PluginError::from(format!("{path}: cannot read the contrastive set: {e}")))?;
    Ok((path.to_string(), groups::parse(path, &text)?))
}

/// One completion's pass, reduced: per stage, the rows of its completion
/// tokens only.
struct Kept {
    tokens: Vec<u32>,
    prompt_len: usize,
    /// `[stage][(position − prompt_len) × hidden ..]`.
    stages: Vec<Vec<f32>>,
    hidden: usize,
}

impl Kept {
    /// `sequence`'s completion rows from a pass whose rows `at..` hold them
    /// (`at` = the prompt's length for a pass of its own; a branch's first
    /// row in a branched pass).
    fn from_output(out: &ForwardOutput, sequence: &Sequence, at: usize) -> Self {
        let hidden = out.hidden;
        let rows = at * hidden..(at + sequence.completion().len()) * hidden;
        Kept {
            tokens: sequence.tokens.clone(),
            prompt_len: sequence.prompt_len,
            stages: out
                .residuals
                .iter()
                .map(|stage| stage[rows.clone()].to_vec())
                .collect(),
            hidden,
        }
    }

    /// The hidden state at `position` (a completion position) after `stage`.
    fn row(&self, stage: usize, position: usize) -> &[f32] {
        let i = position - self.prompt_len;
        &self.stages[stage][i * self.hidden..(i + 1) * self.hidden]
    }

    fn completion_len(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }
}

/// The forward request of a group whose completions share their prompt's
/// tokens on a causal model: one pass, the prompt once and each completion
/// as a branch of it. `None` when they do not share them.
fn branched_request(sequences: &[Sequence]) -> Option<ForwardRequest> {
    let first = sequences.first()?;
    let prompt = &first.tokens[..first.prompt_len];
    if sequences
        .iter()
        .any(|s| &s.tokens[..s.prompt_len] != prompt)
    {
        return None;
    }
    let mut tokens = prompt.to_vec();
    for s in sequences {
        tokens.extend_from_slice(s.completion());
    }
    Some(ForwardRequest {
        tokens,
        residuals: true,
        branches: Some(Branches {
            prefix: prompt.len(),
            lengths: sequences.iter().map(|s| s.completion().len()).collect(),
        }),
        ..Default::default()
    })
}

/// A group with its completions encoded and every pair's divergence found.
struct Prepared<'g> {
    index: usize,
    group: &'g Group,
    sequences: Vec<Sequence>,
    /// The forward requests: one branched pass (causal models), else one
    /// pass per completion.
    requests: Vec<ForwardRequest>,
    /// `(i, j, divergence position)` for every pair i < j.
    pairs: Vec<(usize, usize, usize)>,
}

fn prepare<'g>(
    host: &Host,
    set_name: &str,
    index: usize,
    group: &'g Group,
    chat: bool,
    causal: bool,
) -> Result<Prepared<'g>, PluginError> {
    let at = |problem: String| format!("{set_name}: group {index} (`{}`): {problem}", group.id);
    let sequences = group
        .completions
        .iter()
        .map(|c| host.sequence(&group.prompt, &c.text, chat))
        .collect::<Result<Vec<_>, _>>()?;
    let mut pairs = Vec::new();
    for i in 0..sequences.len() {
        for j in i + 1..sequences.len() {
            let (a, b) = (&group.completions[i], &group.completions[j]);
            let d = groups::divergence(
                &sequences[i].tokens,
                &sequences[j].tokens,
                &a.label,
                &b.label,
            )
            .map_err(at)?;
            pairs.push((i, j, d));
        }
    }
    let requests = match branched_request(&sequences).filter(|_| causal) {
        Some(request) => vec![request],
        None => sequences.iter().map(Sequence::residual_request).collect(),
    };
    Ok(Prepared {
        index,
        group,
        sequences,
        requests,
        pairs,
    })
}

/// The main table's columns, one entry per (pair, layer).
#[derive(Default)]
struct Rows {
    group: Vec<String>,
    group_index: Vec<i64>,
    relationship: Vec<&'static str>,
    prompt: Vec<String>,
    label_a: Vec<String>,
    label_b: Vec<String>,
    divergence_position: Vec<i64>,
    shared_prefix_tokens: Vec<i64>,
    token_a: Vec<i64>,
    token_b: Vec<i64>,
    common_tokens: Vec<i64>,
    layer: Vec<i64>,
    cosine: Vec<Option<f64>>,
    distance: Vec<Option<f64>>,
    kl_ab: Vec<Option<f64>>,
    kl_ba: Vec<Option<f64>>,
    kl_sym: Vec<Option<f64>>,
    cka: Vec<Option<f64>>,
}

impl Rows {
    fn frame(self) -> Result<DataFrame, PluginError> {
        Ok(df!(
            "group" => self.group,
            "group_index" => self.group_index,
            "relationship" => self.relationship,
            "prompt" => self.prompt,
            "label_a" => self.label_a,
            "label_b" => self.label_b,
            "divergence_position" => self.divergence_position,
            "shared_prefix_tokens" => self.shared_prefix_tokens,
            "token_a" => self.token_a,
            "token_b" => self.token_b,
            "common_tokens" => self.common_tokens,
            "layer" => self.layer,
            "cosine" => self.cosine,
            "distance" => self.distance,
            "kl_ab" => self.kl_ab,
            "kl_ba" => self.kl_ba,
            "kl_sym" => self.kl_sym,
            "cka" => self.cka,
        )?)
    }
}

/// Measure every pair of one group from its reduced passes.
fn measure(
    host: &Host,
    prepared: &Prepared,
    kept: &[Kept],
    lens: bool,
    rows: &mut Rows,
) -> Result<usize, PluginError> {
    let group = prepared.group;
    let stages = kept[0].stages.len();
    let hidden = kept[0].hidden;
    // The lens rows: each (completion, divergence position) once, every stage.
    let mut lens_index: BTreeMap<(usize, usize), usize> = BTreeMap::new();
    for &(i, j, d) in &prepared.pairs {
        for c in [i, j] {
            let next = lens_index.len();
            lens_index.entry((c, d)).or_insert(next);
        }
    }
    let row_of = |c: usize, d: usize, stage: usize| lens_index[&(c, d)] * stages + stage;
    let kl = if lens {
        let mut residual = vec![0.0f32; lens_index.len() * stages * hidden];
        for (&(c, d), &slot) in &lens_index {
            for stage in 0..stages {
                let at = (slot * stages + stage) * hidden;
                residual[at..at + hidden].copy_from_slice(kept[c].row(stage, d));
            }
        }
        let mut kl_pairs = Vec::with_capacity(prepared.pairs.len() * stages * 2);
        for &(i, j, d) in &prepared.pairs {
            for stage in 0..stages {
                let (a, b) = (row_of(i, d, stage), row_of(j, d, stage));
                kl_pairs.extend([(a, b), (b, a)]);
            }
        }
        let reply = host.lens_reduce(
            &residual,
            lens_index.len() * stages,
            &LensRequest {
                kl_pairs,
                ..Default::default()
            },
        )?;
        Some(reply.kl)
    } else {
        None
    };
    let mut short = 0;
    for (p, &(i, j, d)) in prepared.pairs.iter().enumerate() {
        let (a, b) = (&kept[i], &kept[j]);
        let common = a.completion_len().min(b.completion_len());
        if common < CKA_MIN_TOKENS {
            short += 1;
        }
        for stage in 0..stages {
            let (ra, rb) = (a.row(stage, d), b.row(stage, d));
            let (kl_ab, kl_ba) = match &kl {
                Some(kl) => {
                    let at = (p * stages + stage) * 2;
                    (Some(kl[at]), Some(kl[at + 1]))
                }
                None => (None, None),
            };
            rows.group.push(group.id.clone());
            rows.group_index.push(prepared.index as i64);
            rows.relationship.push(group.relationship.as_str());
            rows.prompt.push(group.prompt.clone());
            rows.label_a.push(group.completions[i].label.clone());
            rows.label_b.push(group.completions[j].label.clone());
            rows.divergence_position.push(d as i64);
            rows.shared_prefix_tokens.push((d - a.prompt_len) as i64);
            rows.token_a.push(a.tokens[d] as i64);
            rows.token_b.push(b.tokens[d] as i64);
            rows.common_tokens.push(common as i64);
            rows.layer.push(stage as i64 - 1);
            rows.cosine.push(cosine(ra, rb));
            rows.distance.push(relative_distance(ra, rb));
            rows.kl_ab.push(kl_ab);
            rows.kl_ba.push(kl_ba);
            rows.kl_sym
                .push(kl_ab.zip(kl_ba).map(|(x, y)| 0.5 * (x + y)));
            rows.cka.push(linear_cka(
                &a.stages[stage],
                &b.stages[stage],
                common,
                hidden,
            ));
        }
    }
    Ok(short)
}

/// Mean and sample standard deviation per (relationship, layer) of every
/// measure, with the mean cosine curves kept for the crossover.
struct Summary {
    frame: DataFrame,
    cosine: BTreeMap<(Relationship, i64), f64>,
}

fn summary(rows: &Rows) -> Result<Summary, PluginError> {
    let mut cells: BTreeMap<(Relationship, i64), Vec<usize>> = BTreeMap::new();
    for (r, (&name, &layer)) in rows.relationship.iter().zip(&rows.layer).enumerate() {
        let relationship = Relationship::ALL
            .into_iter()
            .find(|k| k.as_str() == name)
            .unwrap_or(Relationship::Unrelated);
        cells.entry((relationship, layer)).or_default().push(r);
    }
    let measures: [(&str, &Vec<Option<f64>>); 4] = [
        ("cosine", &rows.cosine),
        ("distance", &rows.distance),
        ("kl_sym", &rows.kl_sym),
        ("cka", &rows.cka),
    ];
    let mut relationship = Vec::new();
    let mut layer = Vec::new();
    let mut pairs = Vec::new();
    let mut means: Vec<Vec<Option<f64>>> = vec![Vec::new(); measures.len()];
    let mut stds: Vec<Vec<Option<f64>>> = vec![Vec::new(); measures.len()];
    let mut cosine = BTreeMap::new();
    for (&(kind, l), members) in &cells {
        relationship.push(kind.as_str());
        layer.push(l);
        pairs.push(members.len() as i64);
        for (m, (name, values)) in measures.iter().enumerate() {
            let (mean, std) = mean_std(members.iter().map(|&r| values[r]));
            if *name == "cosine" {
                if let Some(mean) = mean {
                    cosine.insert((kind, l), mean);
                }
            }
            means[m].push(mean);
            stds[m].push(std);
        }
    }
    let mut frame = df!(
        "relationship" => relationship,
        "layer" => layer,
        "pairs" => pairs,
    )?;
    for (m, (name, _)) in measures.iter().enumerate() {
        let mean = std::mem::take(&mut means[m]);
        let std = std::mem::take(&mut stds[m]);
        frame.with_column(Column::new(format!("{name}_mean").into(), mean))?;
        frame.with_column(Column::new(format!("{name}_std").into(), std))?;
    }
    Ok(Summary { frame, cosine })
}

/// Layers where the synonym and antonym mean cosine curves cross: the
/// first layer on the other side, and which relationship is closer from it.
fn crossovers(cosine: &BTreeMap<(Relationship, i64), f64>) -> Result<DataFrame, PluginError> {
    let mut layer = Vec::new();
    let mut synonym_cosine = Vec::new();
    let mut antonym_cosine = Vec::new();
    let mut closer = Vec::new();
    let mut previous: Option<f64> = None;
    for (&(kind, l), &s) in cosine {
        if kind != Relationship::Synonym {
            continue;
        }
        let Some(&a) = cosine.get(&(Relationship::Antonym, l)) else {
            continue;
        };
        let gap = s - a;
        if gap == 0.0 {
            continue;
        }
        if previous.is_some_and(|before| before.signum() != gap.signum()) {
            layer.push(l);
            synonym_cosine.push(s);
            antonym_cosine.push(a);
            closer.push(if gap > 0.0 { "synonym" } else { "antonym" });
        }
        previous = Some(gap);
    }
    Ok(df!(
        "layer" => layer,
        "synonym_cosine" => synonym_cosine,
        "antonym_cosine" => antonym_cosine,
        "closer_from_here" => closer,
    )?)
}

impl Plugin for Contrastive {
    const NAME: &'static str = "contrastive";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const SUMMARY: &'static str =
        "How related completions of one prompt drift apart through depth (cosine, distance, lens KL, CKA per layer)";
    const DESCRIPTION: &'static str = "For each group of the contrastive set (one prompt, two or more completions that are synonyms, antonyms, style variants or unrelated) and each pair of its completions: both are force-decoded after the prompt (its chat template when the model has one and chat=true); at the first token where they differ (divergence_position; shared_prefix_tokens completion tokens before it are the same), per layer (−1 = the embedding, then every block): cosine of the two hidden states; distance = ‖a−b‖ / (½(‖a‖+‖b‖)); kl_ab = KL(p_a ‖ p_b) and kl_ba = KL(p_b ‖ p_a) between the two logit-lens distributions (final norm and unembedding applied to that layer's hidden state), kl_sym their mean, in nats (null on encoders, which have no unembedding); cka = linear CKA between the two completions' hidden states over their first common_tokens completion tokens (null under 3). Companion tables: `summary` (mean and sample std per relationship and layer) and `crossover` (layers where the synonym and antonym mean cosine curves cross).";

    fn params() -> Vec<ParamSpec> {
        vec![
            ParamSpec::new(
                "groups",
                ParamKind::Str,
                Some(""),
                "contrastive set, JSON (default: probes/contrastive.json, built in)",
            ),
            ParamSpec::new(
                "chat",
                ParamKind::Bool,
                Some("true"),
                "encode the prompt as a user message under the model's chat template, when it has one",
            ),
        ]
    }

    fn work_items(_host: &Host, params: &Params) -> Result<usize, PluginError> {
        Ok(load(params)?.1.len())
    }

    fn run(host: &Host, params: &Params, items: &[usize]) -> Result<DataFrame, PluginError> {
        let (set_name, groups) = load(params)?;
        let model = host.model()?;
        let chat = params.bool("chat")?;
        if chat && !model.chat_template {
            host.info(&format!(
                "{} has no chat template: prompts are encoded as plain text",
                model.label
            ));
        }
        let lens = model.family.is_decoder();
        let causal = model.family.is_causal();
        if !lens {
            host.warn(&format!(
                "{} is an encoder ({}): it has no unembedding, so no logit lens; kl_ab, kl_ba and kl_sym are null",
                model.label, model.family
            ));
        }
        let selected: Vec<usize> = items
            .iter()
            .copied()
            .filter(|&i| i < groups.len())
            .collect();
        let prepared = selected
            .iter()
            .map(|&i| prepare(host, &set_name, i, &groups[i], chat, causal))
            .collect::<Result<Vec<_>, _>>()?;
        let per_token = (model.num_layers + 1) * model.hidden_size.unwrap_or(1);
        let mut rows = Rows::default();
        let mut short = 0;
        let mut done = 0;
        let mut start = 0;
        while start < prepared.len() {
            host.check_cancelled()?;
            // Groups while their completions' residuals fit the budget (one at least).
            let mut end = start;
            let mut floats = 0;
            while end < prepared.len() {
                let need: usize = prepared[end]
                    .requests
                    .iter()
                    .map(|r| r.tokens.len() * per_token)
                    .sum();
                if end > start && floats + need > BATCH_FLOATS {
                    break;
                }
                floats += need;
                end += 1;
            }
            let requests: Vec<ForwardRequest> = prepared[start..end]
                .iter()
                .flat_map(|p| p.requests.iter().cloned())
                .collect();
            let mut outputs = host.forward_batch(&requests)?.into_iter();
            for group in &prepared[start..end] {
                let mut next = || {
                    outputs
                        .next()
                        .ok_or_else(|| PluginError::Host("forward_batch: missing result".into()))
                };
                let kept: Vec<Kept> = match &group.requests[0].branches {
                    Some(branches) => {
                        let out = next()?;
                        group
                            .sequences
                            .iter()
                            .enumerate()
                            .map(|(b, s)| Kept::from_output(&out, s, branches.start(b)))
                            .collect()
                    }
                    None => group
                        .sequences
                        .iter()
                        .map(|s| Ok(Kept::from_output(&next()?, s, s.prompt_len)))
                        .collect::<Result<_, PluginError>>()?,
                };
                short += measure(host, group, &kept, lens, &mut rows)?;
                done += 1;
                host.progress(done, prepared.len() as u64, "groups");
            }
            start = end;
        }
        if short > 0 {
            host.warn(&format!(
                "{short} pair(s) share fewer than {CKA_MIN_TOKENS} completion tokens: their cka is null"
            ));
        }
        let summary = summary(&rows)?;
        host.emit_table("summary", summary.frame)?;
        host.emit_table("crossover", crossovers(&summary.cosine)?)?;
        rows.frame()
    }
}

probe_sdk::export_plugin!(Contrastive);
