//! The contrastive set: groups of completions of one prompt, read from JSON
//! and checked before any forward pass, every problem named by its group.

use serde::Deserialize;

/// The set shipped with probe (`probes/contrastive.json`).
pub const BUILT_IN: &str = include_str!("../../../probes/contrastive.json");
/// Its name in messages.
pub const BUILT_IN_NAME: &str = "probes/contrastive.json";

/// How the completions of a group relate to each other.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Relationship {
    /// Same meaning, different words ("big" / "large").
    Synonym,
    /// Opposite meaning ("hot" / "cold").
    Antonym,
    /// Same meaning, different register ("Hello." / "Hey!").
    Style,
    /// Different topics altogether.
    Unrelated,
}

impl Relationship {
    /// Every relationship, in table order.
    pub const ALL: [Relationship; 4] = [
        Relationship::Synonym,
        Relationship::Antonym,
        Relationship::Style,
        Relationship::Unrelated,
    ];

    /// The word in tables and files.
    pub fn as_str(self) -> &'static str {
        match self {
            Relationship::Synonym => "synonym",
            Relationship::Antonym => "antonym",
            Relationship::Style => "style",
            Relationship::Unrelated => "unrelated",
        }
    }
}

/// One completion of a group's prompt.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Completion {
    /// A short name for it in tables (`hot`, `formal`, …).
    pub label: String,
    /// The text force-decoded after the prompt.
    pub text: String,
}

/// One prompt and the related completions compared after it.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Group {
    /// Unique name of the group.
    pub id: String,
    /// What every pair of its completions is to each other.
    pub relationship: Relationship,
    /// The shared prompt.
    pub prompt: String,
    /// Two or more completions; every pair of them is compared.
    pub completions: Vec<Completion>,
}

/// The file as a whole.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetFile {
    /// Free text about the set; allowed, not used.
    #[serde(default, rename = "description")]
    _description: Option<String>,
    groups: Vec<serde_json::Value>,
}

/// Read and check a set: `text` from the file `name`.
pub fn parse(name: &str, text: &str) -> Result<Vec<Group>, String> {
    let file: SetFile = serde_json::from_str(text).map_err(|e| {
        format!("{name}: not a contrastive set ({e}); it is one JSON object {{\"groups\": [{{\"id\", \"relationship\", \"prompt\", \"completions\": [{{\"label\", \"text\"}}, …]}}, …]}}")
    })?;
    if file.groups.is_empty() {
        return Err(format!("{name}: no groups"));
    }
    let mut groups: Vec<Group> = Vec::with_capacity(file.groups.len());
    for (index, value) in file.groups.into_iter().enumerate() {
        let id = value
            .get("id")
            .and_then(|v| v.as_str())
            .map(|id| format!(" (`{id}`)"))
            .unwrap_or_default();
        let at = format!("{name}: group {index}{id}");
        let group: Group = serde_json::from_value(value).map_err(|e| format!("{at}: {e}"))?;
        check(&group).map_err(|problem| format!("{at}: {problem}"))?;
        if let Some(first) = groups.iter().position(|g| g.id == group.id) {
            return Err(format!(
                "{at}: the id is group {first}'s too; ids are unique"
            ));
        }
        groups.push(group);
    }
    Ok(groups)
}

fn check(group: &Group) -> Result<(), String> {
    if group.id.trim().is_empty() {
        return Err("an empty id".into());
    }
    if group.prompt.trim().is_empty() {
        return Err("an empty prompt".into());
    }
    if group.completions.len() < 2 {
        return Err(format!(
            "{} completion(s): a group compares two or more",
            group.completions.len()
        ));
    }
    for (i, c) in group.completions.iter().enumerate() {
        if c.label.trim().is_empty() {
            return Err(format!("completion {i} has an empty label"));
        }
        if c.text.trim().is_empty() {
            return Err(format!("completion `{}` has an empty text", c.label));
        }
        if group.completions[..i].iter().any(|o| o.label == c.label) {
            return Err(format!("two completions are labelled `{}`", c.label));
        }
    }
    Ok(())
}

/// Where two token sequences of one group first differ, or why they never do.
pub fn divergence(a: &[u32], b: &[u32], label_a: &str, label_b: &str) -> Result<usize, String> {
    match a.iter().zip(b).position(|(x, y)| x != y) {
        Some(position) => Ok(position),
        None if a.len() == b.len() => Err(format!(
            "completions `{label_a}` and `{label_b}` tokenize identically, so there is nothing to compare"
        )),
        None => {
            let (short, long) = if a.len() < b.len() {
                (label_a, label_b)
            } else {
                (label_b, label_a)
            };
            Err(format!(
                "the tokens of completion `{short}` begin completion `{long}`'s, so no position holds a different token in both; make them differ before one ends"
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_in_set_is_large_and_balanced() {
        let groups = parse(BUILT_IN_NAME, BUILT_IN).unwrap();
        assert!(groups.len() >= 80, "{} groups", groups.len());
        for relationship in Relationship::ALL {
            let n = groups
                .iter()
                .filter(|g| g.relationship == relationship)
                .count();
            assert!(n >= 16, "{} {relationship:?} groups", n);
        }
    }

    #[test]
    fn problems_name_the_file_and_the_group() {
        let bad = |json: &str| parse("set.json", json).unwrap_err();
        assert!(bad("[1]").starts_with("set.json: not a contrastive set"));
        assert_eq!(bad(r#"{"groups": []}"#), "set.json: no groups");
        let one = |group: &str| format!(r#"{{"groups": [{group}]}}"#);
        let message = bad(&one(
            r#"{"id": "g", "relationship": "synonyms", "prompt": "p", "completions": []}"#,
        ));
        assert!(
            message.starts_with("set.json: group 0 (`g`): unknown variant `synonyms`"),
            "{message}"
        );
        let message = bad(&one(
            r#"{"id": "g", "relationship": "style", "prompt": "p", "completions": [{"label": "a", "text": "x"}]}"#,
        ));
        assert_eq!(
            message,
            "set.json: group 0 (`g`): 1 completion(s): a group compares two or more"
        );
        let message = bad(&one(
            r#"{"id": "g", "relationship": "style", "prompt": "p", "completions": [{"label": "a", "text": "x"}, {"label": "a", "text": "y"}]}"#,
        ));
        assert!(
            message.ends_with("two completions are labelled `a`"),
            "{message}"
        );
        let message = bad(&one(r#"{"relationship": "style"}"#));
        assert!(
            message.starts_with("set.json: group 0: missing field `id`"),
            "{message}"
        );
    }

    #[test]
    fn divergence_is_the_first_differing_token() {
        assert_eq!(divergence(&[1, 2, 3], &[1, 2, 4, 5], "a", "b"), Ok(2));
        assert!(divergence(&[1, 2], &[1, 2], "a", "b")
            .unwrap_err()
            .contains("tokenize identically"));
        assert!(divergence(&[1, 2, 3], &[1, 2], "a", "b")
            .unwrap_err()
            .contains("completion `b` begin completion `a`'s"));
    }
}
