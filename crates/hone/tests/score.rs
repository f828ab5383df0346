//! hone compare's metrics against the references: rouge-score's ROUGE-L and SQuAD's official
//! exact match and token F1 (tests/reference/make_score_fixtures.py).

use hone::score::{contains, exact_match, rouge_l, token_f1};

#[test]
fn scores_equal_the_reference_implementations() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/score/cases.json");
    let fixture: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    let cases = fixture["cases"].as_array().unwrap();
    assert!(cases.len() >= 20);
    for c in cases {
        let (p, r) = (c["prediction"].as_str().unwrap(), c["reference"].as_str().unwrap());
        let at = format!("prediction {p:?}, reference {r:?}");
        assert_eq!(exact_match(p, r) as u8 as f64, c["exact_match"].as_f64().unwrap(), "exact match: {at}");
        assert!((token_f1(p, r) - c["token_f1"].as_f64().unwrap()).abs() < 1e-12, "token F1 {} vs {}: {at}", token_f1(p, r), c["token_f1"]);
        assert_eq!(contains(p, r) as u8 as f64, c["contains"].as_f64().unwrap(), "contains: {at}");
        let ours = rouge_l(p, r);
        let want = &c["rouge_l"];
        for (name, got) in [("precision", ours.precision), ("recall", ours.recall), ("fmeasure", ours.fmeasure)] {
            assert!((got - want[name].as_f64().unwrap()).abs() < 1e-12, "ROUGE-L {name} {got} vs {}: {at}", want[name]);
        }
    }
}
