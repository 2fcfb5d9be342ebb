//! A plugin (a real cdylib speaking the ABI by hand) hands the host broken
//! Arrow tables; each is refused with a message and exit code 2, no crash.

use crate::util::{fixture, plugin_lib, run_plugin};

#[test]
fn broken_tables_are_refused_with_a_message() {
    let lib = plugin_lib("probe-testkit-bad-table").display().to_string();
    let model = fixture("llama-tied-f32");
    let cases: [(&str, &str); 9] = [
        ("null", "schema is missing or released"),
        ("no_release", "array is missing or released"),
        ("not_struct", "must be a struct array (format `+s`"),
        ("child_count", "the schema has 2 children, the array 1"),
        (
            "missing_buffer",
            "column `a` (format `l`) has 0 buffers, the format needs 2",
        ),
        ("null_data", "column `a` has 3 rows but no data buffer"),
        ("bad_length", "has length -5"),
        ("short_child", "column `a` has 1 rows, the table 3"),
        (
            "bad_format",
            "column `a` has the unsupported Arrow format `q!`",
        ),
    ];
    for (mode, message) in cases {
        let param = format!("mode={mode}");
        run_plugin(&lib, &model, &[&param], &[]).fails_with(&[
            "plugin `testkit-bad-table`",
            "returned an unreadable table",
            message,
        ]);
    }
}
