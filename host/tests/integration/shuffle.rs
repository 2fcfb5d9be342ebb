//! `probe shuffle`: blocks permuted by renaming, the permutation in the
//! metadata, and the model still the same model when its blocks are run in
//! the true order.

use probe::forward::{Capture, Engine, EngineOptions, Request};
use probe::store::Checkpoint;

use crate::util::{fixture, probe, tempdir};

#[test]
fn shuffled_blocks_run_in_their_true_order_give_the_original_model() {
    for name in [
        "llama-sharded-f16",
        "gemma3-tied-f32",
        "gpt2-tied-f32",
        "bert-f32",
        "qwen2-untied-f16",
    ] {
        let dir = tempdir();
        let out = dir.path().join("shuffled");
        probe([
            "shuffle".as_ref(),
            fixture(name).as_os_str(),
            "--seed".as_ref(),
            "11".as_ref(),
            "--out".as_ref(),
            out.as_os_str(),
        ])
        .ok();
        let original = Checkpoint::open(&fixture(name)).unwrap();
        let shuffled = Checkpoint::open(&out).unwrap();
        let metadata = shuffled.user_metadata();
        let truth: Vec<usize> =
            serde_json::from_str(&metadata[probe::shuffle::TRUE_POSITION_KEY]).unwrap();
        let n = truth.len();
        assert_eq!(truth, probe::shuffle::permutation(n, 11), "{name}");
        assert_ne!(
            truth,
            (0..n).collect::<Vec<_>>(),
            "{name}: a shuffle moves something"
        );
        assert_eq!(original.tensors().len(), shuffled.tensors().len());

        // The stored block holding true depth k, for every k.
        let mut order = vec![0; n];
        for (stored, &depth) in truth.iter().enumerate() {
            order[depth] = stored;
        }
        let tokens = [3u32, 14, 15, 92, 65];
        let capture = Capture {
            logits: name != "bert-f32",
            ..Capture::default()
        };
        let mut a = Engine::open(&original, EngineOptions::default()).unwrap();
        let mut b = Engine::open(&shuffled, EngineOptions::default()).unwrap();
        let base = a
            .run(&Request {
                tokens: &tokens,
                capture,
                ..Request::default()
            })
            .unwrap();
        let repaired = b
            .run(&Request {
                tokens: &tokens,
                blocks: Some(&order),
                capture,
                ..Request::default()
            })
            .unwrap();
        assert_eq!(base.output, repaired.output, "{name}");
        let as_stored = b
            .run(&Request {
                tokens: &tokens,
                capture,
                ..Request::default()
            })
            .unwrap();
        assert_ne!(
            base.output, as_stored.output,
            "{name}: the shuffled order is another model"
        );
    }
    probe([
        "shuffle".as_ref(),
        fixture("paramgolf-banked-bf16").as_os_str(),
        "--seed".as_ref(),
        "1".as_ref(),
        "--out".as_ref(),
        tempdir().path().as_os_str(),
    ])
    .fails_with(&[
        "paramgolf-banked-bf16",
        "banked checkpoints cannot be shuffled yet",
    ]);
}
