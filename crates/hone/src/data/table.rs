//! Datasets as the JSONL the example and pair parsers read, from JSONL, CSV (a header row, then
//! one row per example) or Parquet (native builds) files, with columns renamed on the way
//! (`--columns prompt=question,completion=answer`). Each CSV row lands on the line it starts
//! at, so an error in it names `file:line` as in the CSV file; a Parquet row lands on line
//! `row + 1` (1-based rows: `file:N` is the N-th row).
//!
//! CSV cells are strings, except that a cell that holds a JSON array of objects (a `messages`
//! list, conversational `chosen` / `rejected`) is read as that array.

use crate::error::{Error, Result};
use serde_json::{Map, Value};

/// Column renames: (name the parsers want, name in the file).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Columns(Vec<(String, String)>);

impl Columns {
    /// `want=have[,want=have…]`, e.g. `prompt=question,completion=answer`.
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        let mut out = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (want, have) = part.split_once('=').ok_or_else(|| format!("{part:?}: expected name=column (e.g. prompt=question)"))?;
            let (want, have) = (want.trim(), have.trim());
            if want.is_empty() || have.is_empty() {
                return Err(format!("{part:?}: expected name=column (e.g. prompt=question)"));
            }
            out.push((want.to_string(), have.to_string()));
        }
        Ok(Columns(out))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The row with its columns renamed; a mapped column it lacks is an error naming the ones
    /// it has.
    fn apply(&self, mut row: Map<String, Value>, at: &str) -> Result<Map<String, Value>> {
        for (want, have) in &self.0 {
            let v = row.remove(have).ok_or_else(|| {
                let names: Vec<&str> = row.keys().map(String::as_str).collect();
                Error::format(at, format!("no column {have:?} (for {want}); the row has {names:?}"))
            })?;
            row.insert(want.clone(), v);
        }
        Ok(row)
    }
}

/// The file formats a dataset may come in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableKind {
    Jsonl,
    Csv,
    Parquet,
}

impl TableKind {
    /// By the file's extension (`.csv`, `.parquet`); anything else is JSONL.
    pub fn of(name: &str) -> Self {
        let lower = name.to_ascii_lowercase();
        if lower.ends_with(".csv") {
            TableKind::Csv
        } else if lower.ends_with(".parquet") {
            TableKind::Parquet
        } else {
            TableKind::Jsonl
        }
    }
}

/// Appends `row` as a JSON line at line `line` (1-based), blank lines before it as needed.
fn put_at(out: &mut String, lines: &mut usize, line: usize, row: Map<String, Value>) {
    while *lines + 1 < line {
        out.push('\n');
        *lines += 1;
    }
    out.push_str(&Value::Object(row).to_string());
    out.push('\n');
    *lines += 1;
}

/// JSONL with `columns` renamed (lines that are not JSON objects are left for the parser to
/// report).
pub fn rename_jsonl(text: &str, file: &str, columns: &Columns) -> Result<String> {
    if columns.is_empty() {
        return Ok(text.to_string());
    }
    let mut out = String::with_capacity(text.len());
    for (i, line) in text.lines().enumerate() {
        match serde_json::from_str::<Value>(line) {
            Ok(Value::Object(row)) => out.push_str(&Value::Object(columns.apply(row, &format!("{file}:{}", i + 1))?).to_string()),
            _ => out.push_str(line),
        }
        out.push('\n');
    }
    Ok(out)
}

/// A CSV cell as a JSON value: a JSON array of objects stays one, anything else is a string.
fn cell(s: &str) -> Value {
    let t = s.trim_start();
    if t.starts_with('[') {
        if let Ok(v @ Value::Array(_)) = serde_json::from_str::<Value>(s) {
            if v.as_array().is_some_and(|a| !a.is_empty() && a.iter().all(Value::is_object)) {
                return v;
            }
        }
    }
    Value::String(s.to_string())
}

/// A CSV file (header row first) as JSONL, each row on the line it starts at.
pub fn csv_to_jsonl(bytes: &[u8], file: &str, columns: &Columns) -> Result<String> {
    let mut reader = csv::ReaderBuilder::new().has_headers(true).flexible(false).from_reader(bytes);
    let header: Vec<String> = reader.headers().map_err(|e| Error::format(format!("{file}:1"), e))?.iter().map(str::to_string).collect();
    let mut out = String::new();
    let mut lines = 0; // written so far: the header's line stays blank
    let mut record = csv::StringRecord::new();
    // The line a record starts at, from its byte offset (the csv crate's own line count lags a
    // line behind after a CRLF): newlines counted incrementally, line ends skipped.
    let (mut counted_to, mut counted) = (0usize, 1usize);
    let mut line_at = |byte: usize| {
        let mut start = byte.min(bytes.len());
        while start < bytes.len() && matches!(bytes[start], b'\r' | b'\n') {
            start += 1;
        }
        counted += bytes[counted_to..start].iter().filter(|&&c| c == b'\n').count();
        counted_to = start;
        counted
    };
    loop {
        match reader.read_record(&mut record) {
            Ok(false) => break,
            Ok(true) => {
                let line = line_at(record.position().map_or(0, |p| p.byte() as usize));
                let at = format!("{file}:{line}");
                let row: Map<String, Value> = header.iter().zip(record.iter()).map(|(k, v)| (k.clone(), cell(v))).collect();
                put_at(&mut out, &mut lines, line, columns.apply(row, &at)?);
            }
            Err(e) => {
                let line = e.position().map_or(lines + 1, |p| line_at(p.byte() as usize));
                let why = match e.kind() {
                    csv::ErrorKind::UnequalLengths { expected_len, len, .. } => format!("{len} fields where the header has {expected_len}"),
                    csv::ErrorKind::Utf8 { .. } => "not UTF-8".to_string(),
                    _ => e.to_string(),
                };
                return Err(Error::format(format!("{file}:{line}"), why));
            }
        }
    }
    Ok(out)
}

/// A Parquet file as JSONL, row N on line N; nested columns (a `messages` list of structs) come
/// out as JSON arrays and objects.
#[cfg(not(target_arch = "wasm32"))]
pub fn parquet_to_jsonl(path: &std::path::Path, columns: &Columns) -> Result<String> {
    let file = path.display().to_string();
    let f = std::fs::File::open(path).map_err(|e| Error::io(&file, e))?;
    parquet_rows(f, &file, columns)
}

/// As [`parquet_to_jsonl`], from bytes in memory (the page's way).
pub fn parquet_bytes_to_jsonl(bytes: Vec<u8>, file: &str, columns: &Columns) -> Result<String> {
    parquet_rows(bytes::Bytes::from(bytes), file, columns)
}

fn parquet_rows<R: parquet::file::reader::ChunkReader + 'static>(source: R, file: &str, columns: &Columns) -> Result<String> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    // The parquet crate can panic on a damaged file: that is a bad file, not a crash.
    let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| -> Result<String> {
        let reader = SerializedFileReader::new(source).map_err(|e| Error::format(file, format!("not a Parquet file hone can read: {e}")))?;
        let rows = reader.get_row_iter(None).map_err(|e| Error::format(file, e))?;
        let mut out = String::new();
        let mut lines = 0;
        for (i, row) in rows.enumerate() {
            let at = format!("{file}:{}", i + 1);
            // Snappy (pyarrow's and datasets' default) and uncompressed pages are read; another
            // codec is named in the error.
            let row = row.map_err(|e| Error::format(&at, e))?;
            let Value::Object(obj) = row.to_json_value() else { return Err(Error::format(&at, "a row that is not a record")) };
            put_at(&mut out, &mut lines, i + 1, columns.apply(obj, &at)?);
        }
        Ok(out)
    }));
    read.unwrap_or_else(|_| Err(Error::format(file, "a damaged Parquet file (its reader gave up)")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_rows_keep_their_lines_and_columns_are_renamed() {
        let csv = "question,answer\nQ1,A1\n\"multi\nline\",A2\nQ3,\"[{\"\"role\"\": \"\"user\"\"}]\"\n";
        let cols = Columns::parse("prompt=question, completion=answer").unwrap();
        let text = csv_to_jsonl(csv.as_bytes(), "d.csv", &cols).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "");
        assert_eq!(serde_json::from_str::<Value>(lines[1]).unwrap(), serde_json::json!({"prompt": "Q1", "completion": "A1"}));
        assert_eq!(serde_json::from_str::<Value>(lines[2]).unwrap(), serde_json::json!({"prompt": "multi\nline", "completion": "A2"}));
        // The quoted row spans lines 3 and 4: the next row starts at line 5.
        assert_eq!(lines[3], "");
        assert_eq!(serde_json::from_str::<Value>(lines[4]).unwrap(), serde_json::json!({"prompt": "Q3", "completion": [{"role": "user"}]}));
        let e = csv_to_jsonl(b"a,b\n1,2\n3\n", "d.csv", &Columns::default()).unwrap_err().to_string();
        assert!(e.contains("d.csv:3") && e.contains("1 fields where the header has 2"), "{e}");
        let e = csv_to_jsonl(b"a,b\n1,2\n", "d.csv", &cols).unwrap_err().to_string();
        assert!(e.contains("d.csv:2") && e.contains("no column \"question\""), "{e}");
        assert!(Columns::parse("prompt").is_err());
        // CRLF line ends (Python's csv module writes them) keep the numbering.
        let text = csv_to_jsonl(b"a,b\r\n1,2\r\n\"x\r\ny\",4\r\n5,6\r\n", "d.csv", &Columns::default()).unwrap();
        let at: Vec<usize> = text.lines().enumerate().filter(|(_, l)| !l.is_empty()).map(|(i, _)| i + 1).collect();
        assert_eq!(at, [2, 3, 5]);
    }
}
