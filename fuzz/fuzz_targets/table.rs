//! Dataset files as tables: CSV (with and without a column mapping) and Parquet, then the rows
//! through the JSONL parser.
#![no_main]
use hone::data::dataset::parse_jsonl;
use hone::data::table::{csv_to_jsonl, parquet_bytes_to_jsonl, Columns};
use hone_fuzz::tolerate_caught_panics;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    // The parquet crate's panics on damaged files are caught by hone and become errors.
    tolerate_caught_panics();
    let mapping = Columns::parse("prompt=question,completion=answer").expect("a mapping");
    for columns in [Columns::default(), mapping] {
        if let Ok(text) = csv_to_jsonl(data, "data.csv", &columns) {
            let _ = parse_jsonl(&text, "data.csv", None, true);
        }
        if let Ok(text) = parquet_bytes_to_jsonl(data.to_vec(), "data.parquet", &columns) {
            let _ = parse_jsonl(&text, "data.parquet", None, true);
        }
    }
});
