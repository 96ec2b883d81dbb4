//! A memory-mapped GGUF file: the mapping plus its parsed header.

use std::fs::File;
use std::ops::Deref;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use super::error::{GgufError, Result};
use super::header::Gguf;
use super::parse::parse;

/// An open GGUF file. Tensor data is handed out as zero-copy slices of the
/// mapping, valid for as long as the `GgufFile` lives.
#[derive(Debug)]
pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    gguf: Gguf,
}

impl GgufFile {
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile> {
        let path = path.as_ref().to_path_buf();
        let io = |source| GgufError::Io {
            path: path.clone(),
            source,
        };
        // Looked at before opening: mapping a directory fails with a baffling ENODEV, and
        // opening a FIFO blocks until someone writes to it.
        let kind = std::fs::metadata(&path).map_err(io)?.file_type();
        if !kind.is_file() {
            return Err(GgufError::NotAFile {
                path,
                what: if kind.is_dir() {
                    "a directory"
                } else {
                    "not a regular file"
                },
            });
        }
        let file = File::open(&path).map_err(io)?;
        // SAFETY: `Mmap::map` is unsafe because the mapping aliases the file:
        // if another process writes to or truncates the file while it is
        // mapped, the bytes behind the `&[u8]` slices we hand out change
        // underneath us (breaking Rust's immutability guarantee, and making
        // the validation done by `parse` stale), and touching pages past a
        // truncated end raises SIGBUS. Nothing in-process can prevent that,
        // so the contract is the same as llama.cpp's own mmap loading: model
        // files must not be modified while open. We never write through the
        // mapping, and `parse` bounds-checks everything once at open time.
        let mmap = unsafe { Mmap::map(&file) }.map_err(io)?;
        let gguf = parse(&mmap)?;
        Ok(GgufFile { path, mmap, gguf })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn file_size(&self) -> u64 {
        self.mmap.len() as u64
    }

    pub fn gguf(&self) -> &Gguf {
        &self.gguf
    }

    /// The whole mapped file.
    pub fn bytes(&self) -> &[u8] {
        &self.mmap
    }

    /// Zero-copy view of one tensor's data.
    pub fn tensor_data(&self, name: &str) -> Result<&[u8]> {
        self.gguf.tensor_data(&self.mmap, name)
    }
}

impl Deref for GgufFile {
    type Target = Gguf;

    fn deref(&self) -> &Gguf {
        &self.gguf
    }
}
