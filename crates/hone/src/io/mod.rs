//! Byte sources: everything hone reads (weights, configs, tokenizers) comes through
//! [`ByteSource`], read by range, so that a weights file is never resident whole. Natively a
//! source is a file; in the browser it is a `Blob` (see hone-web); in tests it is memory.

pub mod gguf;
pub mod gguf_write;
pub mod safetensors;
pub mod weights;

use crate::error::{Error, Result};
use std::sync::Arc;

/// Random-access bytes of known length.
pub trait ByteSource: Send + Sync {
    /// The name shown in errors (a file name or path).
    fn name(&self) -> &str;
    fn len(&self) -> u64;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Fill `buf` with the bytes at `offset..offset + buf.len()`.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()>;

    fn read_vec(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        self.read_at(offset, &mut buf)?;
        Ok(buf)
    }
    fn read_all(&self) -> Result<Vec<u8>> {
        let len = usize::try_from(self.len()).map_err(|_| Error::io(self.name(), "too large to read whole"))?;
        self.read_vec(0, len)
    }
}

/// Bytes already in memory (fixtures, pasted data, a fetched small file).
pub struct MemSource {
    name: String,
    bytes: Arc<[u8]>,
}

impl MemSource {
    pub fn new(name: impl Into<String>, bytes: impl Into<Arc<[u8]>>) -> Self {
        MemSource { name: name.into(), bytes: bytes.into() }
    }
}

impl ByteSource for MemSource {
    fn name(&self) -> &str {
        &self.name
    }
    fn len(&self) -> u64 {
        self.bytes.len() as u64
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let start = usize::try_from(offset).ok().filter(|&s| s <= self.bytes.len());
        match start.and_then(|s| self.bytes.get(s..s + buf.len())) {
            Some(src) => {
                buf.copy_from_slice(src);
                Ok(())
            }
            None => Err(Error::io(
                &self.name,
                format!("read of {} bytes at offset {offset} is past the end ({} bytes)", buf.len(), self.bytes.len()),
            )),
        }
    }
}

#[cfg(not(target_arch = "wasm32"))]
pub use native::{read_text_lines, FileSource};

/// The longest line hone reads from a text file (JSONL data): far past any real example, and a
/// bound on what one line can make it allocate.
pub const MAX_LINE_BYTES: usize = 64 << 20;

#[cfg(not(target_arch = "wasm32"))]
mod native {
    use super::ByteSource;
    use crate::error::{Error, Result};
    use std::fs::File;
    use std::io::{Read, Seek, SeekFrom};
    use std::path::Path;
    use std::sync::Mutex;

    /// A text file read line by line, each line at most `max_line` bytes (without its newline):
    /// a longer one is an error naming `file:line` as soon as `max_line` bytes of it are read,
    /// so a file that is one huge line is refused without reading or allocating the rest.
    pub fn read_text_lines(path: &Path, max_line: usize) -> Result<String> {
        use std::io::BufRead;
        let name = path.display().to_string();
        let file = File::open(path).map_err(|e| Error::io(&name, e))?;
        let mut reader = std::io::BufReader::new(file);
        let mut out = Vec::new();
        for line in 1.. {
            let start = out.len();
            let n = (&mut reader).take(max_line as u64 + 1).read_until(b'\n', &mut out).map_err(|e| Error::io(&name, e))?;
            if n == 0 {
                break;
            }
            if n > max_line && out.last() != Some(&b'\n') {
                return Err(Error::format(format!("{name}:{line}"), format!("line longer than {max_line} bytes")));
            }
            if let Err(e) = std::str::from_utf8(&out[start..]) {
                return Err(Error::format(format!("{name}:{line}"), format!("not UTF-8 text: {e}")));
            }
        }
        Ok(String::from_utf8(out).expect("each line checked"))
    }

    /// A file on disk, read by range.
    pub struct FileSource {
        name: String,
        file: Mutex<File>,
        len: u64,
    }

    impl FileSource {
        pub fn open(path: &Path) -> Result<Self> {
            let name = path.display().to_string();
            let file = File::open(path).map_err(|e| Error::io(&name, e))?;
            let len = file.metadata().map_err(|e| Error::io(&name, e))?.len();
            Ok(FileSource { name, file: Mutex::new(file), len })
        }
    }

    impl ByteSource for FileSource {
        fn name(&self) -> &str {
            &self.name
        }
        fn len(&self) -> u64 {
            self.len
        }
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
            if offset.checked_add(buf.len() as u64).is_none_or(|end| end > self.len) {
                return Err(Error::io(
                    &self.name,
                    format!("read of {} bytes at offset {offset} is past the end ({} bytes)", buf.len(), self.len),
                ));
            }
            let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
            file.seek(SeekFrom::Start(offset)).map_err(|e| Error::io(&self.name, e))?;
            file.read_exact(buf).map_err(|e| Error::io(&self.name, e))
        }
    }
}

/// A set of named files, like a model directory: a folder natively, a list of `File`s or an
/// in-memory map in the browser.
pub trait FileSet {
    /// Opens `name`, or `Ok(None)` when the set has no such file.
    fn open(&self, name: &str) -> Result<Option<Box<dyn ByteSource>>>;
    /// Where the set lives, for messages.
    fn location(&self) -> String;

    fn open_required(&self, name: &str) -> Result<Box<dyn ByteSource>> {
        self.open(name)?
            .ok_or_else(|| Error::io(format!("{}/{name}", self.location()), "file not found"))
    }
}

/// Files held in memory, keyed by name.
#[derive(Default, Clone)]
pub struct MemFiles {
    location: String,
    files: std::collections::BTreeMap<String, Arc<[u8]>>,
}

impl MemFiles {
    pub fn new(location: impl Into<String>) -> Self {
        MemFiles { location: location.into(), files: Default::default() }
    }
    pub fn insert(&mut self, name: impl Into<String>, bytes: impl Into<Arc<[u8]>>) {
        self.files.insert(name.into(), bytes.into());
    }
    pub fn with(mut self, name: impl Into<String>, bytes: impl Into<Arc<[u8]>>) -> Self {
        self.insert(name, bytes);
        self
    }
}

impl FileSet for MemFiles {
    fn open(&self, name: &str) -> Result<Option<Box<dyn ByteSource>>> {
        Ok(self.files.get(name).map(|b| {
            Box::new(MemSource::new(format!("{}/{name}", self.location), b.clone())) as Box<dyn ByteSource>
        }))
    }
    fn location(&self) -> String {
        self.location.clone()
    }
}

#[cfg(not(target_arch = "wasm32"))]
pub use dir::Dir;

#[cfg(not(target_arch = "wasm32"))]
mod dir {
    use super::{ByteSource, FileSet, FileSource};
    use crate::error::Result;
    use std::path::PathBuf;

    /// A folder on disk.
    pub struct Dir(pub PathBuf);

    impl FileSet for Dir {
        fn open(&self, name: &str) -> Result<Option<Box<dyn ByteSource>>> {
            let path = self.0.join(name);
            if !path.is_file() {
                return Ok(None);
            }
            Ok(Some(Box::new(FileSource::open(&path)?)))
        }
        fn location(&self) -> String {
            self.0.display().to_string()
        }
    }
}
