//! Byte sources backed by `Blob`s (a `File` the user picked is a `Blob`): each read slices the
//! blob and reads just that range, so a weights file is never in wasm memory whole. Reads use
//! `FileReaderSync`, which exists only in workers: hone runs in the page's Web Worker.

use hone::io::{ByteSource, FileSet};
use hone::Error;
use std::collections::BTreeMap;
use web_sys::{Blob, FileReaderSync};

pub struct BlobSource {
    name: String,
    blob: Blob,
    /// The last window read, for small reads: a GGUF's metadata is tens of thousands of tiny
    /// reads (one per vocabulary string), and each FileReaderSync call costs about a millisecond.
    window: std::sync::Mutex<Option<(u64, Vec<u8>)>>,
}

/// Bytes read at once for a small read.
const WINDOW: u64 = 1 << 20;

// wasm32-unknown-unknown without the atomics feature is single-threaded: a JS handle can never
// be reached from another thread, which is what these markers promise.
unsafe impl Send for BlobSource {}
unsafe impl Sync for BlobSource {}

impl BlobSource {
    pub fn new(name: impl Into<String>, blob: Blob) -> Self {
        BlobSource { name: name.into(), blob, window: std::sync::Mutex::new(None) }
    }
}

impl ByteSource for BlobSource {
    fn name(&self) -> &str {
        &self.name
    }
    fn len(&self) -> u64 {
        self.blob.size() as u64
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> hone::Result<()> {
        let end = offset + buf.len() as u64;
        if end > self.len() {
            return Err(Error::io(&self.name, format!("read of {} bytes at offset {offset} is past the end ({} bytes)", buf.len(), self.len())));
        }
        if (buf.len() as u64) < WINDOW / 4 {
            let mut window = self.window.lock().expect("single-threaded");
            let hit = |w: &(u64, Vec<u8>)| offset >= w.0 && end <= w.0 + w.1.len() as u64;
            if !window.as_ref().is_some_and(hit) {
                let mut bytes = vec![0u8; (WINDOW.min(self.len() - offset)) as usize];
                self.read_direct(offset, &mut bytes)?;
                *window = Some((offset, bytes));
            }
            let (start, bytes) = window.as_ref().expect("filled");
            let at = (offset - start) as usize;
            buf.copy_from_slice(&bytes[at..at + buf.len()]);
            return Ok(());
        }
        self.read_direct(offset, buf)
    }
}

impl BlobSource {
    fn read_direct(&self, offset: u64, buf: &mut [u8]) -> hone::Result<()> {
        let end = offset + buf.len() as u64;
        let js = |e: wasm_bindgen::JsValue| Error::io(&self.name, format!("{e:?}"));
        let slice = self.blob.slice_with_f64_and_f64(offset as f64, end as f64).map_err(js)?;
        let reader = FileReaderSync::new().map_err(js)?;
        let buffer = reader.read_as_array_buffer(&slice).map_err(js)?;
        let bytes = js_sys::Uint8Array::new(&buffer);
        if bytes.length() as usize != buf.len() {
            return Err(Error::io(&self.name, "short read"));
        }
        bytes.copy_to(buf);
        Ok(())
    }
}

/// Named blobs: a folder the user picked, or files from a multi-file input.
#[derive(Default)]
pub struct BlobFiles {
    location: String,
    files: BTreeMap<String, Blob>,
}

// See BlobSource.
unsafe impl Send for BlobFiles {}
unsafe impl Sync for BlobFiles {}

impl BlobFiles {
    pub fn new(location: impl Into<String>) -> Self {
        BlobFiles { location: location.into(), files: BTreeMap::new() }
    }
    pub fn insert(&mut self, name: impl Into<String>, blob: Blob) {
        self.files.insert(name.into(), blob);
    }
}

impl FileSet for BlobFiles {
    fn open(&self, name: &str) -> hone::Result<Option<Box<dyn ByteSource>>> {
        Ok(self
            .files
            .get(name)
            .map(|b| Box::new(BlobSource::new(format!("{}/{name}", self.location), b.clone())) as Box<dyn ByteSource>))
    }
    fn location(&self) -> String {
        self.location.clone()
    }
}
