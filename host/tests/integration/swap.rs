//! The swap plugin: every loss against direct engine runs with the two
//! blocks exchanged, on a fixture.

use probe::forward::{text::TextCodec, Engine, EngineOptions};
use probe::store::Checkpoint;

use crate::knockout::{direct_loss, SET};
use crate::util::{
    column_f64, column_i64, family_with_tokenizer, read_parquet, run_plugin_to, tempdir,
    DECODER_FIXTURES,
};

#[test]
fn every_swap_loss_matches_a_direct_run_on_every_decoder_family() {
    for family in DECODER_FIXTURES {
        eprintln!("{family}");
        check_swap(family);
    }
}

fn check_swap(family: &str) {
    let dir = tempdir();
    let model = family_with_tokenizer(dir.path(), family);
    let set = dir.path().join("prompts.jsonl");
    std::fs::write(&set, SET).unwrap();
    let out = dir.path().join("swap.parquet");
    run_plugin_to(
        "probe-plugin-swap",
        &model,
        &[&format!("prompts={}", set.display())],
        &out,
    );
    let table = read_parquet(&out);
    let checkpoint = Checkpoint::open(&model).unwrap();
    let codec = TextCodec::open(&checkpoint.dir).unwrap();
    let mut engine = Engine::open(&checkpoint, EngineOptions::default()).unwrap();
    let n = engine.num_blocks();
    let sequences = crate::knockout::sequences(&codec);
    let all: Vec<usize> = (0..n).collect();
    let base = direct_loss(&mut engine, &sequences, &all);
    let (i, j) = (column_i64(&table, "layer_i"), column_i64(&table, "layer_j"));
    let (loss, delta, ratio) = (
        column_f64(&table, "loss"),
        column_f64(&table, "delta"),
        column_f64(&table, "ratio"),
    );
    assert_eq!(table.height(), n * (n - 1) / 2);
    for r in 0..table.height() {
        let (a, b) = (i[r] as usize, j[r] as usize);
        let mut order = all.clone();
        order.swap(a, b);
        let want = direct_loss(&mut engine, &sequences, &order);
        assert!((want - base).abs() > 1e-4, "swap {a},{b} changes nothing");
        for (what, got, w) in [
            ("loss", loss[r], want),
            ("delta", delta[r], want - base),
            ("ratio", ratio[r], want / base),
        ] {
            assert!(
                (got - w).abs() <= 1e-5 * w.abs().max(1.0),
                "swap {a},{b} {what}: {got} vs {w}"
            );
        }
    }
}
