//! A checkpoint's metadata: trainer_state.json and checksums.json as a resume reads them
//! (split at the first NUL byte), beside a whole adapter.
#![no_main]
use hone::io::MemFiles;
use hone::train::checkpoint::{read, SavedState, CHECKSUMS_FILE, OPTIMIZER_FILE, STATE_FILE};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let cut = data.iter().position(|&b| b == 0).unwrap_or(data.len());
    let (state, sums) = (&data[..cut], data.get(cut + 1..).unwrap_or_default());
    let _ = serde_json::from_slice::<SavedState>(state);
    let files = MemFiles::new("checkpoint")
        .with(STATE_FILE, state.to_vec())
        .with(CHECKSUMS_FILE, sums.to_vec())
        .with(OPTIMIZER_FILE, Vec::new());
    let _ = read(&files);
});
