//! `hone train --log-dir`: TensorBoard event files and metrics.jsonl. The event files are read
//! here by a reader of the format (TFRecord framing with its CRC-32C checks, `Event` and
//! `Summary` protobufs), itself checked on a file PyTorch's `SummaryWriter` wrote
//! (tests/reference/make_tfevents_fixtures.py), and must hold the losses the CLI printed.

use std::path::{Path, PathBuf};
use std::process::Command;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// One event: wall time, step, file version, and (tag, value) scalars.
#[derive(Debug, Default)]
struct Event {
    wall_time: f64,
    step: i64,
    file_version: Option<String>,
    scalars: Vec<(String, f32)>,
}

fn masked_crc(data: &[u8]) -> u32 {
    crc32c::crc32c(data).rotate_right(15).wrapping_add(0xa282_ead8)
}

fn varint(b: &[u8], at: &mut usize) -> u64 {
    let mut v = 0;
    let mut shift = 0;
    loop {
        let byte = b[*at];
        *at += 1;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return v;
        }
        shift += 7;
    }
}

/// (field, wire type, bytes of a length-delimited field / the value's bytes otherwise).
fn fields(b: &[u8]) -> Vec<(u64, u64, Vec<u8>)> {
    let mut at = 0;
    let mut out = Vec::new();
    while at < b.len() {
        let tag = varint(b, &mut at);
        let value = match tag & 7 {
            0 => varint(b, &mut at).to_le_bytes().to_vec(),
            1 => {
                at += 8;
                b[at - 8..at].to_vec()
            }
            2 => {
                let n = varint(b, &mut at) as usize;
                at += n;
                b[at - n..at].to_vec()
            }
            5 => {
                at += 4;
                b[at - 4..at].to_vec()
            }
            w => panic!("wire type {w}"),
        };
        out.push((tag >> 3, tag & 7, value));
    }
    out
}

fn read_events(path: &Path) -> Vec<Event> {
    let bytes = std::fs::read(path).unwrap();
    let mut at = 0;
    let mut events = Vec::new();
    while at < bytes.len() {
        let len_bytes = &bytes[at..at + 8];
        assert_eq!(u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap()), masked_crc(len_bytes), "length CRC at {at}");
        let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
        let data = &bytes[at + 12..at + 12 + len];
        assert_eq!(u32::from_le_bytes(bytes[at + 12 + len..at + 16 + len].try_into().unwrap()), masked_crc(data), "data CRC at {at}");
        at += 16 + len;
        let mut e = Event::default();
        for (field, wire, v) in fields(data) {
            match (field, wire) {
                (1, 1) => e.wall_time = f64::from_le_bytes(v.try_into().unwrap()),
                (2, 0) => e.step = i64::from_le_bytes(v.try_into().unwrap()),
                (3, 2) => e.file_version = Some(String::from_utf8(v).unwrap()),
                (5, 2) => {
                    for (_, _, value) in fields(&v).into_iter().filter(|(f, _, _)| *f == 1) {
                        let (mut tag, mut x) = (String::new(), f32::NAN);
                        for (f, w, v) in fields(&value) {
                            match (f, w) {
                                (1, 2) => tag = String::from_utf8(v).unwrap(),
                                (2, 5) => x = f32::from_le_bytes(v.try_into().unwrap()),
                                _ => {}
                            }
                        }
                        e.scalars.push((tag, x));
                    }
                }
                _ => {}
            }
        }
        events.push(e);
    }
    events
}

fn scalar(events: &[Event], tag: &str) -> Vec<(i64, f32)> {
    events.iter().flat_map(|e| e.scalars.iter().filter(|(t, _)| t == tag).map(move |(_, v)| (e.step, *v))).collect()
}

#[test]
fn the_reader_reads_pytorchs_summary_writer() {
    let dir = fixtures().join("tfevents");
    let want: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("torch.json")).unwrap()).unwrap();
    let events = read_events(&dir.join("torch.tfevents"));
    assert_eq!(events[0].file_version.as_deref(), Some("brain.Event:2"));
    for (tag, series) in want.as_object().unwrap() {
        let want: Vec<(i64, f32)> = series.as_array().unwrap().iter().map(|p| (p[0].as_i64().unwrap(), p[1].as_f64().unwrap() as f32)).collect();
        assert_eq!(scalar(&events, tag), want, "{tag}");
    }
}

#[test]
fn log_dir_holds_the_printed_losses_in_tensorboard_events_and_metrics_jsonl() {
    let dir = std::env::temp_dir().join(format!("hone-cli-logdir-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let lines: Vec<String> = (0..12).map(|i| format!("{{\"prompt\": \"Q{i}: {i}+{i}?\", \"completion\": \" {}\"}}", 2 * i)).collect();
    let data = dir.join("data.jsonl");
    std::fs::write(&data, lines.join("\n")).unwrap();
    let logs = dir.join("logs");
    let model = fixtures().join("llama");
    let run = Command::new(env!("CARGO_BIN_EXE_hone"))
        .args(["train", "--quiet", "--steps", "3", "--rank", "2", "--batch-size", "2", "--eval-split", "0.25", "--lr", "0.01"])
        .args(["--model", model.to_str().unwrap(), "--data", data.to_str().unwrap(), "--out", dir.join("adapter").to_str().unwrap(), "--log-dir", logs.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    let printed: Vec<(i64, f32)> = stderr
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("step ")?;
            let (step, rest) = rest.split_once('/')?;
            let loss = rest.split("loss ").nth(1)?.split_whitespace().next()?;
            Some((step.parse().ok()?, loss.parse().ok()?))
        })
        .collect();
    assert_eq!(printed.len(), 3, "{stderr}");
    let files: Vec<PathBuf> = std::fs::read_dir(&logs).unwrap().map(|e| e.unwrap().path()).filter(|p| p.to_string_lossy().contains("tfevents")).collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let events = read_events(&files[0]);
    assert_eq!(events[0].file_version.as_deref(), Some("brain.Event:2"));
    let loss = scalar(&events, "train/loss");
    assert_eq!(loss.len(), 3);
    for ((s, l), (ps, pl)) in loss.iter().zip(&printed) {
        assert_eq!(s, ps);
        assert!((l - pl).abs() <= 5e-5, "step {s}: event {l} vs printed {pl}");
    }
    for tag in ["train/lr", "train/tokens_per_s", "train/grad_norm", "eval/loss", "eval/perplexity"] {
        assert!(!scalar(&events, tag).is_empty(), "{tag}");
    }
    assert_eq!(scalar(&events, "eval/loss").last().map(|(s, _)| *s), Some(3), "the last step's eval");
    // metrics.jsonl: the same series, one object per record.
    let jsonl: Vec<serde_json::Value> = std::fs::read_to_string(logs.join("metrics.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let train: Vec<&serde_json::Value> = jsonl.iter().filter(|v| v["split"] == "train").collect();
    assert_eq!(train.len(), 3);
    for (v, (s, l)) in train.iter().zip(&loss) {
        assert_eq!(v["step"].as_i64(), Some(*s));
        assert_eq!(v["loss"].as_f64().unwrap() as f32, *l);
    }
    assert!(jsonl.iter().any(|v| v["split"] == "eval" && v["perplexity"].as_f64().is_some()));
    std::fs::remove_dir_all(&dir).unwrap();
}
