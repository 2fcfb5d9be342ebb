//! The prompt set every forward-pass plugin reads, so that their tables
//! join: `probes/prompts.jsonl` (built in) or `--param prompts=FILE` in the
//! same format, one JSON object a line:
//!
//! ```text
//! {"category": "factual", "prompt": "The capital of France is"}
//! {"category": "code", "prompt": "def add(a, b):\n    return", "completion": " a + b"}
//! ```
//!
//! A prompt's token sequence is `encode(prompt) ++ encode(completion)`, the
//! completion without special tokens ([`Host::sequence`]); where a line has
//! no completion the model's own greedy one is generated
//! ([`Host::prompt_sequences`]). The scored positions are those that predict
//! a completion token ([`Sequence::scored_positions`]), and a set's loss is
//! the mean over all its scored tokens ([`set_loss`]).
//!
//! ```ignore
//! let set = PromptSet::from_params(params)?;
//! let sequences = host.prompt_sequences(&set, &PromptOptions::from_params(params)?)?;
//! ```

use polars::prelude::*;
use serde::Deserialize;

use crate::forward::{ForwardRequest, Sequence};
use crate::{GenerateRequest, Host, LensRequest, ParamKind, ParamSpec, Params, PluginError};

/// The set shipped with probe.
pub const BUILT_IN: &str = include_str!("../../../probes/prompts.jsonl");
/// Its name in messages and metadata.
pub const BUILT_IN_NAME: &str = "probes/prompts.jsonl";

/// One line of a prompt set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Prompt {
    /// The prompt's 0-based line in its file (`prompt_index` in tables).
    pub index: usize,
    /// Its category (`factual`, `reasoning`, `code`, `linguistic`, `rare` in
    /// the built-in set; any name in a user's).
    pub category: String,
    /// The text the model reads.
    pub prompt: String,
    /// The text scored after it; `None`: the model's own greedy completion.
    pub completion: Option<String>,
}

/// A prompt set, read and checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PromptSet {
    /// The file it came from (or [`BUILT_IN_NAME`]).
    pub name: String,
    /// Its prompts, in file order.
    pub prompts: Vec<Prompt>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    category: String,
    prompt: String,
    #[serde(default)]
    completion: Option<String>,
}

impl PromptSet {
    /// Read a set: `text` from the file `name`. Blank lines are skipped (a
    /// prompt's index stays its line); every problem names the file and the
    /// line, counted from 1 as editors do.
    pub fn parse(name: &str, text: &str) -> Result<Self, PluginError> {
        let mut prompts = Vec::new();
        let shape = "a prompt object {\"category\", \"prompt\", \"completion\"?}";
        for line in crate::jsonl::parse_lines::<Line>(name, text, shape) {
            let (index, parsed) = line?;
            let at = |problem: &str| crate::jsonl::at_line(name, index, problem);
            if parsed.category.trim().is_empty() {
                return Err(at("empty `category`"));
            }
            if parsed.prompt.is_empty() {
                return Err(at("empty `prompt`"));
            }
            if parsed.completion.as_deref() == Some("") {
                return Err(at(
                    "empty `completion`: leave the field out for the model's own greedy completion",
                ));
            }
            prompts.push(Prompt {
                index,
                category: parsed.category,
                prompt: parsed.prompt,
                completion: parsed.completion,
            });
        }
        if prompts.is_empty() {
            return Err(format!("{name}: no prompts (one JSON object a line)").into());
        }
        Ok(Self {
            name: name.to_string(),
            prompts,
        })
    }

    /// The set `--param prompts` names, or the built-in one.
    pub fn from_params(params: &Params) -> Result<Self, PluginError> {
        let (name, text) = crate::jsonl::param_file(
            params,
            "prompts",
            (BUILT_IN_NAME, BUILT_IN),
            "the prompt set",
        )?;
        Self::parse(&name, &text)
    }
}

/// How a set's prompts become token sequences.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PromptOptions {
    /// Encode each prompt as a user message under the model's chat template
    /// (when it has one).
    pub chat: bool,
    /// How many tokens to generate where a line has no completion.
    pub completion_tokens: usize,
}

impl PromptOptions {
    /// From the parameters of [`prompt_params`].
    pub fn from_params(params: &Params) -> Result<Self, PluginError> {
        let completion_tokens = params.int("completion_tokens")?;
        if !(1..=4096).contains(&completion_tokens) {
            return Err(format!(
                "parameter `completion_tokens`: {completion_tokens} is not between 1 and 4096"
            )
            .into());
        }
        Ok(Self {
            chat: params.bool("chat")?,
            completion_tokens: completion_tokens as usize,
        })
    }
}

/// The parameters every forward-pass plugin takes for its prompts:
/// `prompts`, `chat`, `completion_tokens`.
pub fn prompt_params() -> Vec<ParamSpec> {
    vec![
        ParamSpec::new(
            "prompts",
            ParamKind::Str,
            Some(""),
            "prompt set, JSONL {\"category\", \"prompt\", \"completion\"?} (default: probes/prompts.jsonl, built in)",
        ),
        ParamSpec::new(
            "chat",
            ParamKind::Bool,
            Some("false"),
            "encode each prompt as a user message under the model's chat template, when it has one",
        ),
        ParamSpec::new(
            "completion_tokens",
            ParamKind::Int,
            Some("16"),
            "tokens of greedy completion generated where a prompt has none",
        ),
    ]
}

/// The token ids that end a generation: `eos_token_id` of the model's
/// `config.json` (a number or a list), when it has one.
fn end_ids(host: &Host) -> Result<Vec<u32>, PluginError> {
    let model = host.model()?;
    let Some(value) = model.config.as_ref().and_then(|c| c.get("eos_token_id")) else {
        return Ok(Vec::new());
    };
    let ids = match value {
        serde_json::Value::Array(items) => items.iter().filter_map(|v| v.as_u64()).collect(),
        other => other.as_u64().into_iter().collect::<Vec<_>>(),
    };
    Ok(ids.into_iter().map(|id| id as u32).collect())
}

/// Prompt tokens one generation call carries at most (the host keeps every
/// block's keys and values of them while it generates).
const GENERATE_BATCH_TOKENS: usize = 4096;

impl Host<'_> {
    /// Every prompt of `set` as a token sequence, in set order: the given
    /// completion where the line has one, else the model's greedy
    /// completion of `options.completion_tokens` tokens (ending early at
    /// the model's end-of-sequence token, which is kept). Generation runs in
    /// the host with a key/value cache ([`Host::generate`]), a few thousand
    /// prompt tokens a call.
    pub fn prompt_sequences(
        &self,
        set: &PromptSet,
        options: &PromptOptions,
    ) -> Result<Vec<Sequence>, PluginError> {
        let mut sequences = set
            .prompts
            .iter()
            .map(|p| {
                self.sequence(
                    &p.prompt,
                    p.completion.as_deref().unwrap_or(""),
                    options.chat,
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        let open: Vec<usize> = (0..sequences.len())
            .filter(|&i| set.prompts[i].completion.is_none())
            .collect();
        if open.is_empty() {
            return Ok(sequences);
        }
        let model = self.model()?;
        if !model.family.is_causal() {
            let first = &set.prompts[open[0]];
            return Err(format!(
                "{}: line {}: no completion, and a {} model cannot generate one: give every prompt a `completion`",
                set.name,
                first.index + 1,
                model.family
            )
            .into());
        }
        let ends = end_ids(self)?;
        let chunks = chunk_by_tokens(&open, |i| sequences[i].tokens.len());
        for (done, chunk) in chunks.iter().enumerate() {
            self.check_cancelled()?;
            self.progress(done as u64, chunks.len() as u64, "generating completions");
            let request = GenerateRequest {
                prompts: chunk.iter().map(|&i| sequences[i].tokens.clone()).collect(),
                max_new_tokens: options.completion_tokens,
                stop: ends.clone(),
            };
            let reply = self.generate(&request)?;
            for (&i, completion) in chunk.iter().zip(reply.completions) {
                sequences[i].tokens.extend(completion);
            }
        }
        Ok(sequences)
    }
}

impl Host<'_> {
    /// The set's loss from each sequence's final residual `[rows, hidden]`
    /// (a forward output's `output`; `rows` the sequence's length, or at
    /// least [`Sequence::scored_rows`]): the mean of −ln p(next token) over
    /// every scored position, p the model's output distribution there — the
    /// same value as the engine's loss restricted to scored positions, with
    /// the head run on those rows only and reduced in the host.
    pub fn scored_loss(
        &self,
        sequences: &[Sequence],
        finals: &[&[f32]],
        hidden: usize,
    ) -> Result<f64, PluginError> {
        if sequences.is_empty() || hidden == 0 {
            return Err("scored_loss: no sequences".into());
        }
        let mut rows = Vec::new();
        let mut targets = Vec::new();
        for (sequence, output) in sequences.iter().zip(finals) {
            if output.len() < sequence.scored_rows() * hidden {
                return Err(format!(
                    "scored_loss: a final residual of {} values holds fewer than the {} scored rows of {hidden}",
                    output.len(),
                    sequence.scored_rows()
                )
                .into());
            }
            for p in sequence.scored_positions() {
                rows.extend_from_slice(&output[p * hidden..(p + 1) * hidden]);
                targets.push(sequence.tokens[p + 1]);
            }
        }
        if targets.is_empty() {
            return Err("scored_loss: no scored position in the set".into());
        }
        let n = targets.len();
        let reply = self.lens_reduce(
            &rows,
            n,
            &LensRequest {
                targets: Some(targets),
                ..Default::default()
            },
        )?;
        let total: f64 = reply
            .rows
            .iter()
            .map(|r| -r.target_prob.unwrap_or(0.0).ln())
            .sum();
        Ok(total / n as f64)
    }
}

/// The whole model's pass over a prompt set, kept for passes that change
/// what happens after some block (knockout, swap, quantization): every
/// sequence's residual after the embedding and after every block, and the
/// set's loss. A pass that changes only blocks from `i` on starts from the
/// residual before block `i`, so blocks before it are never run again.
pub struct Baseline {
    /// The set's sequences, in set order.
    pub sequences: Vec<Sequence>,
    /// Per sequence, `[stage][T × hidden]` (stage 0: the embedding output).
    pub residuals: Vec<Vec<Vec<f32>>>,
    /// The set's loss with every block in stored order.
    pub loss: f64,
    /// The residual's width.
    pub hidden: usize,
    /// Whether the model is causal: then a pass that only scores runs each
    /// sequence up to its last scored row ([`Baseline::run_rows`]).
    pub causal: bool,
}

impl Baseline {
    /// Run the whole model over the sequences of `set`, keeping every stage.
    pub fn compute(
        host: &Host,
        set: &PromptSet,
        options: &PromptOptions,
    ) -> Result<Self, PluginError> {
        let sequences = host.prompt_sequences(set, options)?;
        let requests: Vec<ForwardRequest> =
            sequences.iter().map(Sequence::residual_request).collect();
        let outputs = host.forward_batch(&requests)?;
        let hidden = match (sequences.first(), outputs.first()) {
            (Some(s), Some(o)) if !s.tokens.is_empty() => o.output.len() / s.tokens.len(),
            _ => return Err("a baseline needs at least one sequence".into()),
        };
        let finals: Vec<&[f32]> = outputs.iter().map(|o| o.output.as_slice()).collect();
        let loss = host.scored_loss(&sequences, &finals, hidden)?;
        Ok(Self {
            sequences,
            residuals: outputs.into_iter().map(|o| o.residuals).collect(),
            loss,
            hidden,
            causal: host.model()?.family.is_causal(),
        })
    }

    /// How many of sequence `i`'s rows a pass that only scores must run:
    /// in a causal model a row sees none after it, so rows after the last
    /// scored one change no score (the last token predicts nothing scored);
    /// every row otherwise.
    pub fn run_rows(&self, i: usize) -> usize {
        let sequence = &self.sequences[i];
        if self.causal {
            sequence.scored_rows().max(1)
        } else {
            sequence.tokens.len()
        }
    }

    /// Sequence `i`'s tokens, cut to its [`Baseline::run_rows`] rows.
    pub fn tokens(&self, i: usize) -> &[u32] {
        &self.sequences[i].tokens[..self.run_rows(i)]
    }

    /// Sequence `i`'s residual before block `stage`, cut to its
    /// [`Baseline::run_rows`] rows.
    pub fn start(&self, i: usize, stage: usize) -> Result<Vec<f32>, PluginError> {
        let stages = &self.residuals[i];
        let residual = stages
            .get(stage)
            .ok_or_else(|| format!("no residual before block {stage}"))?;
        Ok(residual[..self.run_rows(i) * self.hidden].to_vec())
    }

    /// The set's loss when, from the residual before block `stage` (stage 0:
    /// the embedding output), `blocks` run in the order given — every prompt
    /// in one batch.
    pub fn loss_from(
        &self,
        host: &Host,
        stage: usize,
        blocks: &[usize],
    ) -> Result<f64, PluginError> {
        self.loss_from_overridden(host, stage, blocks, &[])
    }

    /// [`Baseline::loss_from`] with tensors overridden in every request
    /// (ids from [`Host::override_tensor`]): the loss with, say, block
    /// `stage`'s matrices quantized, run from the residual before it.
    pub fn loss_from_overridden(
        &self,
        host: &Host,
        stage: usize,
        blocks: &[usize],
        overrides: &[u64],
    ) -> Result<f64, PluginError> {
        let requests: Vec<ForwardRequest> = (0..self.sequences.len())
            .map(|i| {
                Ok(ForwardRequest {
                    tokens: self.tokens(i).to_vec(),
                    blocks: Some(blocks.to_vec()),
                    start: Some(self.start(i, stage)?),
                    overrides: overrides.to_vec(),
                    ..Default::default()
                })
            })
            .collect::<Result<_, PluginError>>()?;
        let outputs = host.forward_batch(&requests)?;
        let finals: Vec<&[f32]> = outputs.iter().map(|o| o.output.as_slice()).collect();
        host.scored_loss(&self.sequences, &finals, self.hidden)
    }
}

/// Consecutive runs of `members` of at most [`GENERATE_BATCH_TOKENS`] tokens.
fn chunk_by_tokens(members: &[usize], len: impl Fn(usize) -> usize) -> Vec<Vec<usize>> {
    let mut chunks: Vec<Vec<usize>> = Vec::new();
    let mut total = 0;
    for &i in members {
        match chunks.last_mut() {
            Some(last) if total + len(i) <= GENERATE_BATCH_TOKENS => {
                last.push(i);
                total += len(i);
            }
            _ => {
                chunks.push(vec![i]);
                total = len(i);
            }
        }
    }
    chunks
}

/// The mean cross-entropy over every scored token of the set (token-weighted:
/// a long completion counts for more than a short one), from each
/// sequence's per-position losses (`T − 1` values: position p predicts token
/// p + 1). `None` when nothing is scored.
pub fn set_loss(sequences: &[Sequence], token_losses: &[&[f64]]) -> Option<f64> {
    let mut sum = 0.0;
    let mut n = 0usize;
    for (sequence, losses) in sequences.iter().zip(token_losses) {
        for p in sequence.scored_positions() {
            sum += losses[p];
            n += 1;
        }
    }
    (n > 0).then(|| sum / n as f64)
}

/// The companion table of every input token, so anyone can re-run the exact
/// sequences: `prompt_index, position, token_id, scored` (whether the
/// position predicts a completion token).
pub fn tokens_frame(set: &PromptSet, sequences: &[Sequence]) -> PolarsResult<DataFrame> {
    let (mut index, mut position, mut token, mut scored) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (prompt, sequence) in set.prompts.iter().zip(sequences) {
        let scored_range = sequence.scored_positions();
        for (p, &id) in sequence.tokens.iter().enumerate() {
            index.push(prompt.index as i64);
            position.push(p as i64);
            token.push(i64::from(id));
            scored.push(scored_range.contains(&p));
        }
    }
    df!(
        "prompt_index" => index,
        "position" => position,
        "token_id" => token,
        "scored" => scored,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_in_set_has_five_categories_and_no_completions() {
        let set = PromptSet::parse(BUILT_IN_NAME, BUILT_IN).unwrap();
        assert!(set.prompts.len() >= 50);
        let mut categories: Vec<&str> = set.prompts.iter().map(|p| p.category.as_str()).collect();
        categories.dedup();
        assert_eq!(
            categories,
            ["factual", "reasoning", "code", "linguistic", "rare"]
        );
        assert!(set.prompts.iter().all(|p| p.completion.is_none()));
        assert_eq!(set.prompts[3].index, 3);
    }

    #[test]
    fn lines_keep_their_index_and_problems_name_their_line() {
        let text = "{\"category\": \"a\", \"prompt\": \"x\"}\n\n{\"category\": \"b\", \"prompt\": \"y\", \"completion\": \" z\"}\n";
        let set = PromptSet::parse("p.jsonl", text).unwrap();
        assert_eq!(set.prompts[1].index, 2);
        assert_eq!(set.prompts[1].completion.as_deref(), Some(" z"));
        let cases = [
            (
                "{\"category\": \"a\"}",
                "p.jsonl: line 1: not a prompt object",
            ),
            (
                "{\"category\": \"a\", \"prompt\": \"x\", \"answer\": 1}",
                "unknown field `answer`",
            ),
            (
                "\n{\"category\": \" \", \"prompt\": \"x\"}",
                "p.jsonl: line 2: empty `category`",
            ),
            (
                "{\"category\": \"a\", \"prompt\": \"\"}",
                "line 1: empty `prompt`",
            ),
            (
                "{\"category\": \"a\", \"prompt\": \"x\", \"completion\": \"\"}",
                "empty `completion`",
            ),
            ("[1, 2]", "line 1: not a prompt object"),
            ("\n\n", "p.jsonl: no prompts"),
        ];
        for (text, wanted) in cases {
            let error = PromptSet::parse("p.jsonl", text).unwrap_err().to_string();
            assert!(error.contains(wanted), "{text:?}: {error}");
        }
    }

    #[test]
    fn the_set_loss_weighs_every_scored_token_alike() {
        // Prompt of 2 tokens + completion of 2: positions 1 and 2 are scored;
        // prompt of 1 + completion of 1: position 0.
        let a = Sequence {
            tokens: vec![1, 2, 3, 4],
            prompt_len: 2,
        };
        let b = Sequence {
            tokens: vec![5, 6],
            prompt_len: 1,
        };
        let losses_a = [9.0, 1.0, 2.0];
        let losses_b = [6.0];
        let loss = set_loss(&[a, b], &[&losses_a, &losses_b]).unwrap();
        assert!((loss - 3.0).abs() < 1e-12, "{loss}");
    }
}
