//! `--log-dir`: the run's series for TensorBoard and for scripts. Each record goes to
//! - an event file TensorBoard reads (`events.out.tfevents.<time>.<host>.hone`): TFRecord framing
//!   (length, masked CRC-32C of the length, the bytes, masked CRC-32C of the bytes) around
//!   `Event` protobufs, one scalar summary per value, as TensorFlow's and PyTorch's writers do;
//! - `metrics.jsonl`, one JSON object per record (`{"step":…,"split":"train","loss":…}`).
//!
//! Both are flushed record by record, so a killed run keeps its series; a resumed run appends to
//! metrics.jsonl and starts a new event file (TensorBoard merges a directory's files).

use anyhow::Context;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

pub struct MetricsLog {
    events: File,
    jsonl: File,
    pub events_path: PathBuf,
}

impl MetricsLog {
    pub fn create(dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating --log-dir {}", dir.display()))?;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let host = std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_string()).ok().filter(|h| !h.is_empty()).unwrap_or_else(|| "localhost".into());
        // TensorBoard takes any file whose name holds "tfevents"; the nanoseconds keep two runs
        // started in the same second apart.
        let events_path = dir.join(format!("events.out.tfevents.{}.{host}.{}.hone", now.as_secs(), now.subsec_nanos()));
        let mut events = File::create(&events_path).with_context(|| format!("creating {}", events_path.display()))?;
        let jsonl_path = dir.join("metrics.jsonl");
        let jsonl = OpenOptions::new().create(true).append(true).open(&jsonl_path).with_context(|| format!("opening {}", jsonl_path.display()))?;
        let first = event(now.as_secs_f64(), 0, Some("brain.Event:2"), &[]);
        events.write_all(&record(&first)).with_context(|| format!("writing {}", events_path.display()))?;
        Ok(MetricsLog { events, jsonl, events_path })
    }

    /// One record: `values` under `split/name` tags in TensorBoard, as one JSON line.
    pub fn log(&mut self, step: usize, split: &str, values: &[(&str, f64)]) -> anyhow::Result<()> {
        let wall = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs_f64();
        let tagged: Vec<(String, f32)> = values.iter().filter(|(_, v)| v.is_finite()).map(|(k, v)| (format!("{split}/{k}"), *v as f32)).collect();
        self.events.write_all(&record(&event(wall, step as i64, None, &tagged))).with_context(|| format!("writing {}", self.events_path.display()))?;
        let mut line = serde_json::Map::new();
        line.insert("step".into(), step.into());
        line.insert("split".into(), split.into());
        for (k, v) in values {
            line.insert((*k).into(), serde_json::Number::from_f64(*v).map_or(serde_json::Value::Null, serde_json::Value::Number));
        }
        let mut text = serde_json::Value::Object(line).to_string();
        text.push('\n');
        self.jsonl.write_all(text.as_bytes()).context("writing metrics.jsonl")?;
        Ok(())
    }
}

/// A TFRecord: the length and the data, each followed by its masked CRC-32C.
fn record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
    out
}

/// TFRecord's CRC mask: rotated right by 15 bits plus a constant.
pub fn masked_crc(data: &[u8]) -> u32 {
    crc32c::crc32c(data).rotate_right(15).wrapping_add(0xa282_ead8)
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn bytes_field(out: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    varint(out, (field << 3) | 2);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// `tensorflow.Event { double wall_time = 1; int64 step = 2; string file_version = 3;
/// Summary summary = 5; }`, the summary holding `Value { string tag = 1; float simple_value = 2; }`s.
fn event(wall_time: f64, step: i64, file_version: Option<&str>, scalars: &[(String, f32)]) -> Vec<u8> {
    let mut out = vec![(1 << 3) | 1];
    out.extend_from_slice(&wall_time.to_le_bytes());
    if step != 0 {
        varint(&mut out, 2 << 3);
        varint(&mut out, step as u64);
    }
    if let Some(v) = file_version {
        bytes_field(&mut out, 3, v.as_bytes());
    }
    if !scalars.is_empty() {
        let mut summary = Vec::new();
        for (tag, value) in scalars {
            let mut v = Vec::new();
            bytes_field(&mut v, 1, tag.as_bytes());
            v.push((2 << 3) | 5);
            v.extend_from_slice(&value.to_le_bytes());
            bytes_field(&mut summary, 1, &v);
        }
        bytes_field(&mut out, 5, &summary);
    }
    out
}
