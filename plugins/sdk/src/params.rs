//! Plugin parameters: declared by the plugin, given by the user as
//! `--param key=value`, checked and typed by the host, read by the plugin.
//!
//! They cross the boundary as a JSON object of typed values with every
//! default filled in, so a plugin never parses user text itself.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The type of a parameter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ParamKind {
    /// `true`/`false` (also `1`/`0`, `yes`/`no`).
    Bool,
    Int,
    Float,
    Str,
    /// Comma-separated words: `q,k,v`.
    List,
    /// Comma-separated integers and inclusive ranges: `0-5,8`.
    Range,
}

impl ParamKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            ParamKind::Bool => "bool",
            ParamKind::Int => "int",
            ParamKind::Float => "float",
            ParamKind::Str => "str",
            ParamKind::List => "list",
            ParamKind::Range => "range",
        }
    }
}

/// A parameter a plugin accepts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ParamSpec {
    pub name: String,
    pub kind: ParamKind,
    /// As the user would type it; `None`: absent unless given.
    pub default: Option<String>,
    pub help: String,
    /// For `str`: the accepted values (empty: any).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub choices: Vec<String>,
}

impl ParamSpec {
    pub fn new(name: &str, kind: ParamKind, default: Option<&str>, help: &str) -> Self {
        Self {
            name: name.into(),
            kind,
            default: default.map(Into::into),
            help: help.into(),
            choices: Vec::new(),
        }
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
pub enum ParamError {
    #[error("unknown parameter `{name}` (this plugin takes: {known})")]
    Unknown { name: String, known: String },
    #[error("parameter `{name}` is given twice")]
    Duplicate { name: String },
    #[error("`{given}` is not key=value")]
    NotKeyValue { given: String },
    #[error("parameter `{name}`: expected {expected}, got `{value}`")]
    Invalid {
        name: String,
        expected: String,
        value: String,
    },
    #[error("parameter `{name}` is missing or has the wrong type")]
    Missing { name: String },
    #[error("parameters are not a JSON object: {0}")]
    Malformed(String),
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
        ParamKind::Range => {
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
    pub fn from_json(text: &str) -> Result<Self, ParamError> {
        match serde_json::from_str(text) {
            Ok(Value::Object(values)) => Ok(Self { values }),
            Ok(other) => Err(ParamError::Malformed(other.to_string())),
            Err(e) => Err(ParamError::Malformed(e.to_string())),
        }
    }

    pub fn to_json(&self) -> String {
        Value::Object(self.values.clone()).to_string()
    }

    pub fn from_map(values: Map<String, Value>) -> Self {
        Self { values }
    }

    pub fn raw(&self, name: &str) -> Option<&Value> {
        self.values.get(name).filter(|v| !v.is_null())
    }

    fn missing(name: &str) -> ParamError {
        ParamError::Missing { name: name.into() }
    }

    pub fn bool(&self, name: &str) -> Result<bool, ParamError> {
        self.raw(name)
            .and_then(Value::as_bool)
            .ok_or_else(|| Self::missing(name))
    }

    pub fn int(&self, name: &str) -> Result<i64, ParamError> {
        self.raw(name)
            .and_then(Value::as_i64)
            .ok_or_else(|| Self::missing(name))
    }

    pub fn float(&self, name: &str) -> Result<f64, ParamError> {
        self.raw(name)
            .and_then(Value::as_f64)
            .ok_or_else(|| Self::missing(name))
    }

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

    /// A `range` parameter, expanded; `None` when neither given nor defaulted.
    pub fn range(&self, name: &str) -> Option<Vec<usize>> {
        self.raw(name)?.as_array().map(|a| {
            a.iter()
                .filter_map(|v| v.as_u64().map(|n| n as usize))
                .collect()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn specs() -> Vec<ParamSpec> {
        vec![
            ParamSpec::new("roles", ParamKind::List, None, "roles to keep"),
            ParamSpec::new("layers", ParamKind::Range, None, "layers to keep"),
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
        assert_eq!(params.list("roles").unwrap(), ["q", "k", "v"]);
        assert_eq!(params.range("layers").unwrap(), [0, 1, 2, 7]);
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
        let twice = resolve(&specs(), &["method=svd".into(), "method=power".into()]).unwrap_err();
        assert_eq!(twice.to_string(), "parameter `method` is given twice");
    }
}
