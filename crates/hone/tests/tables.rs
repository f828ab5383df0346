//! Datasets in CSV and Parquet (tests/reference/make_table_fixtures.py: the rows of
//! tests/fixtures/chat/cases.json, Parquet as Hugging Face datasets writes it) give the token ids
//! and loss masks TRL gives for the same rows as JSONL; columns are renamed by `--columns`; a bad
//! row names its file and line.

mod common;

use hone::data::dataset::EncodeOptions;
use hone::data::table::{csv_to_jsonl, parquet_to_jsonl, Columns};
use hone::data::{ChatTemplate, Format, Tokenizer};
use hone::io::Dir;
use hone::train::run::samples_from_jsonl;

fn tables() -> std::path::PathBuf {
    common::fixtures().join("tables")
}

fn as_jsonl(format: &str, kind: &str, columns: &Columns) -> (String, String) {
    let path = tables().join(format!("{format}.{kind}"));
    let file = path.display().to_string();
    let text = match kind {
        "csv" => csv_to_jsonl(&std::fs::read(&path).unwrap(), &file, columns).unwrap(),
        _ => parquet_to_jsonl(&path, columns).unwrap(),
    };
    (text, file)
}

#[test]
fn csv_and_parquet_rows_give_trls_ids_and_masks() {
    let chat = Dir(common::fixtures().join("chat"));
    let tok = Tokenizer::open(&chat).unwrap();
    let template = ChatTemplate::open(&chat).unwrap();
    let cases: serde_json::Value = serde_json::from_slice(&std::fs::read(common::fixtures().join("chat/cases.json")).unwrap()).unwrap();
    let mut first_rows = std::collections::BTreeMap::new();
    let mut checked = 0;
    for case in cases.as_array().unwrap() {
        let name = case["format"].as_str().unwrap();
        // The files hold the first case's rows of each format.
        if first_rows.entry(name).or_insert(&case["rows"]) != &&case["rows"] {
            continue;
        }
        let opts = EncodeOptions { train_on_completions_only: case["loss"] != "all", max_len: None };
        for kind in ["csv", "parquet"] {
            let (text, file) = as_jsonl(name, kind, &Columns::default());
            for format in [None, Some(Format::parse(name).unwrap())] {
                let got = samples_from_jsonl(&text, &file, format, false, &tok, template.as_ref(), opts).unwrap().samples;
                let want = case["expected"].as_array().unwrap();
                assert_eq!(got.len(), want.len(), "{file}");
                for (s, w) in got.iter().zip(want) {
                    let ids: Vec<u32> = w["input_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
                    let labels: Vec<i64> = w["labels"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
                    assert_eq!((&s.input_ids, &s.labels), (&ids, &labels), "{file} / {}", case["loss"]);
                }
            }
            checked += 1;
        }
    }
    assert!(checked >= 8, "{checked}");
}

#[test]
fn columns_are_renamed_and_bad_rows_are_named_by_line() {
    let chat = Dir(common::fixtures().join("chat"));
    let tok = Tokenizer::open(&chat).unwrap();
    let opts = EncodeOptions { train_on_completions_only: true, max_len: None };
    let encode = |text: &str| samples_from_jsonl(text, "t", None, false, &tok, None, opts).unwrap().samples;
    let (plain, _) = as_jsonl("completion", "csv", &Columns::default());
    let (renamed, _) = as_jsonl("renamed", "csv", &Columns::parse("prompt=question,completion=answer").unwrap());
    assert_eq!(encode(&plain), encode(&renamed));
    // Without the mapping, the renamed file's rows have no format hone knows: named by line.
    let path = tables().join("renamed.csv");
    let text = csv_to_jsonl(&std::fs::read(&path).unwrap(), "renamed.csv", &Columns::default()).unwrap();
    let e = samples_from_jsonl(&text, "renamed.csv", None, false, &tok, None, opts).err().expect("no known format").to_string();
    assert!(e.contains("renamed.csv:2"), "{e}");
    // A mapping from a column the file lacks.
    let e = csv_to_jsonl(&std::fs::read(&path).unwrap(), "renamed.csv", &Columns::parse("prompt=q").unwrap()).unwrap_err().to_string();
    assert!(e.contains("renamed.csv:2") && e.contains("no column \"q\"") && e.contains("question"), "{e}");
    // A Parquet row: by its 1-based index.
    let e = parquet_to_jsonl(&tables().join("text.parquet"), &Columns::parse("prompt=nothing").unwrap()).unwrap_err().to_string();
    assert!(e.contains("text.parquet:1"), "{e}");
    // Not a Parquet file.
    let e = parquet_to_jsonl(&tables().join("text.csv"), &Columns::default()).unwrap_err().to_string();
    assert!(e.contains("text.csv") && e.contains("Parquet"), "{e}");
}
