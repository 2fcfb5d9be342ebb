//! Input files of one JSON object a line (the prompt set, patching pairs):
//! read from a file parameter or the plugin's built-in copy, parsed line by
//! line, every problem naming the file and the line (from 1, as editors
//! count).

use serde::de::DeserializeOwned;

use crate::{Params, PluginError};

/// The error `problem` at the 0-based line `index` of the file `name`.
pub fn at_line(name: &str, index: usize, problem: &str) -> PluginError {
    PluginError::from(format!("{name}: line {}: {problem}", index + 1))
}

/// Every non-blank line of `text` (the file `name`) parsed as a `T`, in
/// order, with its 0-based line (blank lines are skipped, so an object keeps
/// its line); a line that does not parse is "not {shape}: {why}" at that
/// line. Lazy, so a caller's own checks of earlier lines come first.
pub fn parse_lines<'t, T: DeserializeOwned>(
    name: &'t str,
    text: &'t str,
    shape: &'t str,
) -> impl Iterator<Item = Result<(usize, T), PluginError>> + 't {
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(move |(index, line)| {
            serde_json::from_str(line)
                .map(|value| (index, value))
                .map_err(|e| at_line(name, index, &format!("not {shape}: {e}")))
        })
}

/// The file the parameter `param` names, as (name, text), or the built-in
/// `(name, text)` when the parameter is empty; a file that cannot be read
/// is "{path}: cannot read {what}: {why}".
pub fn param_file(
    params: &Params,
    param: &str,
    built_in: (&str, &str),
    what: &str,
) -> Result<(String, String), PluginError> {
    let path = params.str(param)?;
    if path.is_empty() {
        return Ok((built_in.0.to_string(), built_in.1.to_string()));
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| PluginError::from(format!("{path}: cannot read {what}: {e}")))?;
    Ok((path.to_string(), text))
}
