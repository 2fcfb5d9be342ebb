//! Plugin parameters: declared by the plugin, given by the user as
//! `--param key=value`, checked and typed by the host, read by the plugin.
//!
//! They cross the boundary as a JSON object of typed values with every
//! default filled in, so a plugin never parses user text itself. Two kinds
//! select parts of a model — [`ParamKind::Roles`] and [`ParamKind::Layers`]
//! — and are checked against each model before the plugin runs
//! ([`check_selection`]): a selection that matches nothing is an error
//! naming the parameter, never an empty table.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::model::Role;

/// The type of a parameter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ParamKind {
    /// `true`/`false` (also `1`/`0`, `yes`/`no`).
    Bool,
    /// A whole number (`i64`).
    Int,
    /// A finite number (`f64`).
    Float,
    /// Any text, or one of `choices`.
    Str,
    /// Comma-separated words: `q,k,v`.
    List,
    /// Comma-separated integers and inclusive ranges: `0-5,8`.
    Range,
    /// Comma-separated tensor roles (`q,k,v`), each a [`Role`] name; checked
    /// against the roles the model has.
    Roles,
    /// Block indices and inclusive ranges (`0-5,8`); checked against the
    /// model's blocks.
    Layers,
}

impl ParamKind {
    /// The kind's name in `probe plugins info`.
    pub fn as_str(&self) -> &'static str {
        match self {
            ParamKind::Bool => "bool",
            ParamKind::Int => "int",
            ParamKind::Float => "float",
            ParamKind::Str => "str",
            ParamKind::List => "list",
            ParamKind::Range => "range",
            ParamKind::Roles => "roles",
            ParamKind::Layers => "layers",
        }
    }
}

/// A parameter a plugin accepts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ParamSpec {
    /// What the user types before `=`.
    pub name: String,
    /// How the value is parsed.
    pub kind: ParamKind,
    /// As the user would type it; `None`: absent unless given.
    pub default: Option<String>,
    /// One line for `probe plugins info`.
    pub help: String,
    /// For `str`: the accepted values; for `roles`: the accepted roles
    /// (empty: any).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub choices: Vec<String>,
}

impl ParamSpec {
    /// A parameter of any kind; `default` as the user would type it (`None`: absent unless given).
    pub fn new(name: &str, kind: ParamKind, default: Option<&str>, help: &str) -> Self {
        Self {
            name: name.into(),
            kind,
            default: default.map(Into::into),
            help: help.into(),
            choices: Vec::new(),
        }
    }

    /// A `roles` parameter limited to `accepted` roles (empty: every role);
    /// no default selects every role.
    pub fn roles(name: &str, accepted: &[Role], help: &str) -> Self {
        Self {
            choices: accepted.iter().map(|r| r.as_str().to_string()).collect(),
            ..Self::new(name, ParamKind::Roles, None, help)
        }
    }

    /// A `layers` parameter; no default selects every block.
    pub fn layers(name: &str, help: &str) -> Self {
        Self::new(name, ParamKind::Layers, None, help)
    }

    /// A `str` parameter that takes one of `choices`.
    pub fn choice(name: &str, choices: &[&str], default: &str, help: &str) -> Self {
        Self {
            choices: choices.iter().map(|c| c.to_string()).collect(),
            ..Self::new(name, ParamKind::Str, Some(default), help)
        }
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
/// Why parameters were refused.
pub enum ParamError {
    #[error("unknown parameter `{name}` (this plugin takes: {known})")]
    /// A name the plugin does not take.
    Unknown {
        /// The name given.
        name: String,
        /// The names the plugin takes.
        known: String,
    },
    #[error("parameter `{name}` is given twice")]
    /// The same name given twice.
    Duplicate {
        /// The parameter.
        name: String,
    },
    #[error("`{given}` is not key=value")]
    /// An argument without `=`.
    NotKeyValue {
        /// The argument.
        given: String,
    },
    #[error("parameter `{name}`: expected {expected}, got `{value}`")]
    /// A value that does not parse as its kind.
    Invalid {
        /// The parameter.
        name: String,
        /// What it takes.
        expected: String,
        /// What was given.
        value: String,
    },
    #[error("parameter `{name}` is missing or has the wrong type")]
    /// A value the plugin asked for that is neither given nor defaulted.
    Missing {
        /// The parameter.
        name: String,
    },
    #[error("parameters are not a JSON object: {0}")]
    /// The parameters a plugin received are not a JSON object.
    Malformed(String),
    #[error("parameter `{name}` selects what {model} lacks: {problem}")]
    /// A `roles` or `layers` selection names what the model lacks.
    NotInModel {
        /// The parameter.
        name: String,
        /// The checkpoint.
        model: String,
        /// What it lacks.
        problem: String,
    },
}

/// Parse one value of a kind into its typed JSON form.
pub fn parse_value(spec: &ParamSpec, text: &str) -> Result<Value, ParamError> {
    let invalid = |expected: &str| ParamError::Invalid {
        name: spec.name.clone(),
        expected: expected.into(),
        value: text.into(),
    };
    let text = text.trim();
    Ok(match spec.kind {
        ParamKind::Bool => match text.to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => Value::Bool(true),
            "false" | "0" | "no" | "off" => Value::Bool(false),
            _ => return Err(invalid("true or false")),
        },
        ParamKind::Int => Value::from(text.parse::<i64>().map_err(|_| invalid("an integer"))?),
        ParamKind::Float => {
            let v = text.parse::<f64>().map_err(|_| invalid("a number"))?;
            if !v.is_finite() {
                return Err(invalid("a finite number"));
            }
            Value::from(v)
        }
        ParamKind::Str => {
            if !spec.choices.is_empty() && !spec.choices.iter().any(|c| c == text) {
                return Err(invalid(&format!("one of {}", spec.choices.join(", "))));
            }
            Value::from(text)
        }
        ParamKind::List => Value::Array(
            text.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(Value::from)
                .collect(),
        ),
        ParamKind::Roles => {
            let mut roles = Vec::new();
            for word in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                let Some(role) = Role::parse(word) else {
                    let known = if spec.choices.is_empty() {
                        Role::ALL
                            .iter()
                            .map(|r| r.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    } else {
                        spec.choices.join(", ")
                    };
                    return Err(invalid(&format!("roles among {known}")));
                };
                if !spec.choices.is_empty() && !spec.choices.iter().any(|c| c == word) {
                    return Err(invalid(&format!("roles among {}", spec.choices.join(", "))));
                }
                roles.push(Value::from(role.as_str()));
            }
            if roles.is_empty() {
                return Err(invalid("at least one role"));
            }
            Value::Array(roles)
        }
        ParamKind::Range | ParamKind::Layers => {
            let mut values = Vec::new();
            for part in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                let (lo, hi) = match part.split_once('-') {
                    Some((lo, hi)) => (lo.trim().parse::<u32>(), hi.trim().parse::<u32>()),
                    None => (part.parse::<u32>(), part.parse::<u32>()),
                };
                match (lo, hi) {
                    // A cap on the expanded total, not per part: "0-999999"
                    // repeated must not expand into gigabytes.
                    (Ok(lo), Ok(hi))
                        if lo <= hi && values.len() + (hi - lo) as usize <= MAX_RANGE_VALUES =>
                    {
                        values.extend((lo..=hi).map(Value::from))
                    }
                    _ => return Err(invalid("integers and ranges like 0-5,8")),
                }
            }
            Value::Array(values)
        }
    })
}

/// The most values a `range` parameter may expand to.
pub const MAX_RANGE_VALUES: usize = 1_000_000;

/// Check `key=value` pairs against the specs; fill in defaults.
pub fn resolve(specs: &[ParamSpec], given: &[String]) -> Result<Map<String, Value>, ParamError> {
    let mut out = Map::new();
    let mut seen = Vec::new();
    for pair in given {
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| ParamError::NotKeyValue {
                given: pair.clone(),
            })?;
        let key = key.trim();
        let spec = specs
            .iter()
            .find(|s| s.name == key)
            .ok_or_else(|| ParamError::Unknown {
                name: key.into(),
                known: if specs.is_empty() {
                    "no parameters".into()
                } else {
                    specs
                        .iter()
                        .map(|s| s.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                },
            })?;
        if seen.contains(&key) {
            return Err(ParamError::Duplicate { name: key.into() });
        }
        seen.push(key);
        out.insert(key.into(), parse_value(spec, value)?);
    }
    for spec in specs {
        if !out.contains_key(&spec.name) {
            let value = match &spec.default {
                Some(default) => parse_value(spec, default)?,
                None => Value::Null,
            };
            out.insert(spec.name.clone(), value);
        }
    }
    Ok(out)
}

/// The typed parameters a plugin receives.
#[derive(Clone, Debug, Default)]
pub struct Params {
    values: Map<String, Value>,
}

impl Params {
    /// Parse the JSON the host passes.
    pub fn from_json(text: &str) -> Result<Self, ParamError> {
        match serde_json::from_str(text) {
            Ok(Value::Object(values)) => Ok(Self { values }),
            Ok(other) => Err(ParamError::Malformed(other.to_string())),
            Err(e) => Err(ParamError::Malformed(e.to_string())),
        }
    }

    /// The JSON the host passes.
    pub fn to_json(&self) -> String {
        Value::Object(self.values.clone()).to_string()
    }

    /// From values `resolve` produced.
    pub fn from_map(values: Map<String, Value>) -> Self {
        Self { values }
    }

    /// A value as JSON; `None` when absent or null.
    pub fn raw(&self, name: &str) -> Option<&Value> {
        self.values.get(name).filter(|v| !v.is_null())
    }

    fn missing(name: &str) -> ParamError {
        ParamError::Missing { name: name.into() }
    }

    /// A `bool` parameter.
    pub fn bool(&self, name: &str) -> Result<bool, ParamError> {
        self.raw(name)
            .and_then(Value::as_bool)
            .ok_or_else(|| Self::missing(name))
    }

    /// An `int` parameter.
    pub fn int(&self, name: &str) -> Result<i64, ParamError> {
        self.raw(name)
            .and_then(Value::as_i64)
            .ok_or_else(|| Self::missing(name))
    }

    /// A `float` parameter.
    pub fn float(&self, name: &str) -> Result<f64, ParamError> {
        self.raw(name)
            .and_then(Value::as_f64)
            .ok_or_else(|| Self::missing(name))
    }

    /// A `str` parameter.
    pub fn str(&self, name: &str) -> Result<&str, ParamError> {
        self.raw(name)
            .and_then(Value::as_str)
            .ok_or_else(|| Self::missing(name))
    }

    /// A `list` parameter; `None` when neither given nor defaulted.
    pub fn list(&self, name: &str) -> Option<Vec<String>> {
        self.raw(name)?.as_array().map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
    }

    /// A `roles` parameter; `None` when not given (every role).
    pub fn roles(&self, name: &str) -> Option<Vec<Role>> {
        self.raw(name)?.as_array().map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().and_then(Role::parse))
                .collect()
        })
    }

    /// A `layers` parameter; `None` when not given (every block).
    pub fn layers(&self, name: &str) -> Option<Vec<usize>> {
        self.range(name)
    }

    /// A `range` parameter, expanded; `None` when neither given nor defaulted.
    pub fn range(&self, name: &str) -> Option<Vec<usize>> {
        self.raw(name)?.as_array().map(|a| {
            a.iter()
                .filter_map(|v| v.as_u64().map(|n| n as usize))
                .collect()
        })
    }
}

/// What a selection is checked against: one model's blocks and roles.
#[derive(Clone, Debug)]
pub struct ModelParts {
    /// The checkpoint's label, for messages.
    pub label: String,
    /// Its number of blocks.
    pub num_layers: usize,
    /// Roles of the model's weights (biases count under their role).
    pub roles: BTreeSet<Role>,
}

/// Check every `roles` and `layers` parameter against a model: each role
/// named must be one the model has, each layer one of its blocks.
pub fn check_selection(
    specs: &[ParamSpec],
    params: &Params,
    model: &ModelParts,
) -> Result<(), ParamError> {
    for spec in specs {
        let fail = |problem: String| ParamError::NotInModel {
            name: spec.name.clone(),
            model: model.label.clone(),
            problem,
        };
        match spec.kind {
            ParamKind::Roles => {
                let Some(roles) = params.roles(&spec.name) else {
                    continue;
                };
                let missing: Vec<&str> = roles
                    .iter()
                    .filter(|r| !model.roles.contains(r))
                    .map(|r| r.as_str())
                    .collect();
                if !missing.is_empty() {
                    let has: Vec<&str> = model
                        .roles
                        .iter()
                        .filter(|r| {
                            spec.choices.is_empty() || spec.choices.iter().any(|c| c == r.as_str())
                        })
                        .map(|r| r.as_str())
                        .collect();
                    return Err(fail(format!(
                        "the model has no {} tensors (it has: {})",
                        missing.join(", "),
                        has.join(", ")
                    )));
                }
            }
            ParamKind::Layers => {
                let Some(layers) = params.layers(&spec.name) else {
                    continue;
                };
                let beyond: Vec<String> = layers
                    .iter()
                    .filter(|&&l| l >= model.num_layers)
                    .take(5)
                    .map(|l| l.to_string())
                    .collect();
                if !beyond.is_empty() {
                    let has = match model.num_layers {
                        0 => "no blocks".to_string(),
                        n => format!("blocks 0-{}", n - 1),
                    };
                    return Err(fail(format!(
                        "the model has {has}; {} {} not among them",
                        beyond.join(", "),
                        if beyond.len() == 1 { "is" } else { "are" }
                    )));
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// The fuzz target `plugin_params`: bytes as `--param` lines against
/// parameter specs of every kind, then read back as the plugin would.
#[doc(hidden)]
pub fn fuzz_plugin_params(bytes: &[u8]) {
    let specs = [
        ParamSpec::new("flag", ParamKind::Bool, Some("false"), ""),
        ParamSpec::new("count", ParamKind::Int, Some("1"), ""),
        ParamSpec::new("scale", ParamKind::Float, Some("1.0"), ""),
        ParamSpec::choice("method", &["svd", "power"], "svd", ""),
        ParamSpec::new("names", ParamKind::List, Some(""), ""),
        ParamSpec::new("range", ParamKind::Range, Some(""), ""),
        ParamSpec::roles("roles", &[], ""),
        ParamSpec::layers("layers", ""),
        ParamSpec::new("path", ParamKind::Str, Some(""), ""),
    ];
    let text = String::from_utf8_lossy(bytes);
    let given: Vec<String> = text.lines().map(str::to_string).collect();
    if let Ok(values) = resolve(&specs, &given) {
        let params = Params::from_map(values);
        let _ = params.range("range");
        let _ = params.list("names");
        let _ = params.roles("roles");
        let model = ModelParts {
            label: "fuzz".into(),
            num_layers: 4,
            roles: [Role::Q].into_iter().collect(),
        };
        let _ = check_selection(&specs, &params, &model);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn specs() -> Vec<ParamSpec> {
        vec![
            ParamSpec::roles("roles", &[], "roles to keep"),
            ParamSpec::layers("layers", "layers to keep"),
            ParamSpec::new("skip_embeddings", ParamKind::Bool, Some("false"), ""),
            ParamSpec::choice("method", &["svd", "power"], "svd", ""),
            ParamSpec::new("iterations", ParamKind::Int, Some("20"), ""),
        ]
    }

    #[test]
    fn values_are_typed_and_defaults_filled() {
        let given = [
            "roles=q, k,v".to_string(),
            "layers=0-2,7".into(),
            "method=power".into(),
        ];
        let params = Params::from_map(resolve(&specs(), &given).unwrap());
        assert_eq!(params.roles("roles").unwrap(), [Role::Q, Role::K, Role::V]);
        assert_eq!(params.layers("layers").unwrap(), [0, 1, 2, 7]);
        assert_eq!(params.str("method").unwrap(), "power");
        assert!(!params.bool("skip_embeddings").unwrap());
        assert_eq!(params.int("iterations").unwrap(), 20);
        let round_trip = Params::from_json(&params.to_json()).unwrap();
        assert_eq!(round_trip.range("layers"), params.range("layers"));
    }

    #[test]
    fn bad_parameters_say_what_is_wrong() {
        let err = |given: &str| {
            resolve(&specs(), &[given.to_string()])
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            err("colour=red"),
            "unknown parameter `colour` (this plugin takes: roles, layers, skip_embeddings, method, iterations)"
        );
        assert_eq!(
            err("method=qr"),
            "parameter `method`: expected one of svd, power, got `qr`"
        );
        assert_eq!(
            err("layers=5-2"),
            "parameter `layers`: expected integers and ranges like 0-5,8, got `5-2`"
        );
        assert_eq!(
            err("iterations=many"),
            "parameter `iterations`: expected an integer, got `many`"
        );
        assert_eq!(err("skip_embeddings"), "`skip_embeddings` is not key=value");
        assert_eq!(
            err("roles=q,nope"),
            format!(
                "parameter `roles`: expected roles among {}, got `q,nope`",
                Role::ALL
                    .iter()
                    .map(|r| r.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        );
        let only = [ParamSpec::roles("roles", &[Role::Q, Role::K], "")];
        assert_eq!(
            resolve(&only, &["roles=v".into()]).unwrap_err().to_string(),
            "parameter `roles`: expected roles among q, k, got `v`"
        );
        let twice = resolve(&specs(), &["method=svd".into(), "method=power".into()]).unwrap_err();
        assert_eq!(twice.to_string(), "parameter `method` is given twice");
    }

    #[test]
    fn a_selection_is_checked_against_the_model() {
        let model = ModelParts {
            label: "m".into(),
            num_layers: 30,
            roles: [Role::Q, Role::K, Role::AttnNorm].into_iter().collect(),
        };
        let check = |given: &str| {
            let params = Params::from_map(resolve(&specs(), &[given.to_string()]).unwrap());
            check_selection(&specs(), &params, &model).map_err(|e| e.to_string())
        };
        assert_eq!(check("layers=0-29"), Ok(()));
        assert_eq!(check("roles=q,k"), Ok(()));
        assert_eq!(
            check("layers=99").unwrap_err(),
            "parameter `layers` selects what m lacks: the model has blocks 0-29; 99 is not among them"
        );
        assert_eq!(
            check("roles=q,gate").unwrap_err(),
            "parameter `roles` selects what m lacks: the model has no gate tensors (it has: q, k, attn_norm)"
        );
    }
}
