//! Patching pairs: `{"clean", "corrupt", "answer", "wrong", "category"?}`
//! a line (JSONL), read and checked, then tokenized.

use probe_sdk::prelude::*;
use serde::Deserialize;

/// The built-in set: factual recall with swapped subjects, indirect-object
/// sentences with the second name swapped, two-shot addition with one
/// operand changed.
pub const BUILT_IN: &str = include_str!("../../../probes/patching.jsonl");
/// How the built-in set is named in messages.
pub const BUILT_IN_NAME: &str = "probes/patching.jsonl";

/// One line of a pair file.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pair {
    /// The prompt whose answer is to be found.
    pub clean: String,
    /// The same prompt with the information changed (as many tokens).
    pub corrupt: String,
    /// The clean answer: a text whose first token is scored.
    pub answer: String,
    /// The corrupted prompt's answer: likewise.
    pub wrong: String,
    /// A free label (`factual`, `indirect_object`, `arithmetic` built in).
    #[serde(default)]
    pub category: Option<String>,
    /// The pair's 0-based line in its file (`pair` in tables).
    #[serde(skip)]
    pub index: usize,
}

/// A pair file, read and checked.
#[derive(Clone, Debug)]
pub struct PairSet {
    pub name: String,
    pub pairs: Vec<Pair>,
}

impl PairSet {
    /// Read `text` from the file `name`; every problem names the file and
    /// the line (from 1). Blank lines are skipped (a pair keeps its line).
    pub fn parse(name: &str, text: &str) -> Result<Self, PluginError> {
        let mut pairs = Vec::new();
        let shape = "a pair object {\"clean\", \"corrupt\", \"answer\", \"wrong\", \"category\"?}";
        for line in probe_sdk::jsonl::parse_lines::<Pair>(name, text, shape) {
            let (index, mut pair) = line?;
            let at = |problem: &str| probe_sdk::jsonl::at_line(name, index, problem);
            for (field, value) in [
                ("clean", &pair.clean),
                ("corrupt", &pair.corrupt),
                ("answer", &pair.answer),
                ("wrong", &pair.wrong),
            ] {
                if value.is_empty() {
                    return Err(at(&format!("empty `{field}`")));
                }
            }
            pair.index = index;
            pairs.push(pair);
        }
        if pairs.is_empty() {
            return Err(format!("{name}: no pairs (one JSON object a line)").into());
        }
        Ok(Self {
            name: name.to_string(),
            pairs,
        })
    }

    /// The set `--param pairs` names, or the built-in one.
    pub fn from_params(params: &Params) -> Result<Self, PluginError> {
        let (name, text) =
            probe_sdk::jsonl::param_file(params, "pairs", (BUILT_IN_NAME, BUILT_IN), "the pairs")?;
        Self::parse(&name, &text)
    }
}

/// A pair as token ids.
#[derive(Clone, Debug)]
pub struct TokenPair {
    pub clean: Vec<u32>,
    pub corrupt: Vec<u32>,
    /// The first token of `answer` and of `wrong` (encoded as continuations).
    pub answer: u32,
    pub wrong: u32,
}

/// Tokenize every pair: prompts plainly (or as chat messages), answers as
/// continuations; a pair whose prompts differ in length, or whose answers
/// begin with the same token, is an error naming the file and line.
pub fn tokenize(host: &Host, set: &PairSet, chat: bool) -> Result<Vec<TokenPair>, PluginError> {
    let mode = if chat {
        TextMode::Chat
    } else {
        TextMode::Plain
    };
    set.pairs
        .iter()
        .map(|p| {
            let at = |problem: String| {
                PluginError::from(format!("{}: line {}: {problem}", set.name, p.index + 1))
            };
            let clean = host.encode(&p.clean, mode)?;
            let corrupt = host.encode(&p.corrupt, mode)?;
            if clean.len() != corrupt.len() {
                return Err(at(format!(
                    "`clean` is {} tokens and `corrupt` {}: a patch needs prompts of the same length",
                    clean.len(),
                    corrupt.len()
                )));
            }
            let first = |text: &str, field: &str| -> Result<u32, PluginError> {
                host.encode(text, TextMode::Continuation)?
                    .first()
                    .copied()
                    .ok_or_else(|| at(format!("`{field}` has no token")))
            };
            let (answer, wrong) = (first(&p.answer, "answer")?, first(&p.wrong, "wrong")?);
            if answer == wrong {
                return Err(at(format!(
                    "`answer` and `wrong` begin with the same token ({answer}): their logit difference is 0"
                )));
            }
            Ok(TokenPair {
                clean,
                corrupt,
                answer,
                wrong,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_in_set_parses_with_three_kinds_of_pair() {
        let set = PairSet::parse(BUILT_IN_NAME, BUILT_IN).unwrap();
        assert!(set.pairs.len() >= 30);
        for kind in ["factual", "indirect_object", "arithmetic"] {
            assert!(
                set.pairs
                    .iter()
                    .filter(|p| p.category.as_deref() == Some(kind))
                    .count()
                    >= 10
            );
        }
    }

    #[test]
    fn bad_lines_are_named() {
        let bad = [
            ("{\"clean\": \"a\"}\n", "f: line 1: not a pair object"),
            ("\n{\"clean\": \"a\", \"corrupt\": \"b\", \"answer\": \"\", \"wrong\": \"c\"}\n", "f: line 2: empty `answer`"),
            ("{\"clean\": \"a\", \"corrupt\": \"b\", \"answer\": \"x\", \"wrong\": \"c\", \"extra\": 1}\n", "f: line 1: not a pair object"),
            ("\n\n", "f: no pairs"),
        ];
        for (text, want) in bad {
            let got = PairSet::parse("f", text).unwrap_err().to_string();
            assert!(got.contains(want), "{got}");
        }
    }
}
