//! `sheaf prepare`: a text file encoded with a [`Tokenizer`] into a dataset directory
//! as nanoGPT's `prepare.py` writes one: `train.bin` and `val.bin` (little-endian
//! `u16` ids) and `meta.json` (the tokenizer, its vocabulary size and end-of-text id,
//! the token counts).
//!
//! The text streams through in blocks, so a file of any size prepares in bounded
//! memory. Blocks end only where a single space or line break sits between two
//! characters of text ([`is_boundary`]), where GPT-2's pre-tokenizer never joins
//! anything, so encoding block by block gives exactly the ids of the whole text. Blocks
//! are encoded in parallel and written in order. The validation split is the text
//! from the first such boundary at or after `(1 - val_fraction)` of the file's bytes.
//! The files are written under temporary names and renamed when complete, `meta.json`
//! last: a directory with a `meta.json` is whole.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::tokenizer::Tokenizer;
use crate::{DataError, Result};

/// What `meta.json` says of a prepared dataset.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    pub tokenizer: String,
    pub vocab_size: usize,
    pub end_of_text: u32,
    pub train_tokens: u64,
    pub val_tokens: u64,
}

/// Bytes read per block, about.
pub const BLOCK_BYTES: usize = 4 << 20;
/// A block may grow to this while looking for a boundary; a text with none in this
/// many bytes is refused.
const MAX_BLOCK_BYTES: usize = 64 << 20;

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> DataError + '_ {
    move |e| DataError::Io { path: path.to_path_buf(), source: e }
}

/// Whether a block may end at `at` in `bytes`: a single space or line break sits
/// between two characters that are ASCII and not whitespace, and the block ends
/// before the space or after the line break. GPT-2's pre-tokenizer never joins
/// anything across such a place (a space only ever leads the piece after it; a lone
/// line break is a piece of its own whether text follows it or not), so the pieces,
/// and so the ids, are those of the whole text. Longer runs of whitespace are not
/// boundaries: the last character of a run splits off only when text follows it.
fn is_boundary(bytes: &[u8], at: usize) -> bool {
    let text = |i: usize| bytes.get(i).is_some_and(|&b| b < 0x80 && !b.is_ascii_whitespace());
    at >= 2
        && ((bytes[at - 1] == b'\n' && text(at - 2) && text(at))
            || (bytes.get(at) == Some(&b' ') && text(at - 1) && text(at + 1)))
}

/// The last boundary in `bytes`, if any.
fn last_boundary(bytes: &[u8]) -> Option<usize> {
    (1..bytes.len()).rev().find(|&at| is_boundary(bytes, at))
}

/// The first boundary at or after `from`, if any.
fn first_boundary(bytes: &[u8], from: usize) -> Option<usize> {
    (from.max(1)..bytes.len()).find(|&at| is_boundary(bytes, at))
}

/// Prepares `input` into `out` (created if missing) with `tokenizer`. `progress`
/// hears the bytes read so far and the input's size.
pub fn prepare(
    input: &Path,
    tokenizer: Tokenizer,
    out: &Path,
    val_fraction: f64,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Meta> {
    prepare_in_blocks(input, tokenizer, out, val_fraction, BLOCK_BYTES, progress)
}

/// [`prepare`] with blocks of about `block_bytes` (tests use small ones).
pub fn prepare_in_blocks(
    input: &Path,
    tokenizer: Tokenizer,
    out: &Path,
    val_fraction: f64,
    block_bytes: usize,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Meta> {
    if !(0.0..1.0).contains(&val_fraction) {
        return Err(DataError::Corrupt {
            what: "--val-fraction".into(),
            detail: format!("{val_fraction} is not in [0, 1)"),
        });
    }
    if tokenizer.vocab_size() > usize::from(u16::MAX) + 1 {
        return Err(DataError::Corrupt {
            what: format!("tokenizer `{}`", tokenizer.name()),
            detail: "its ids do not fit the u16 ids of a .bin file".into(),
        });
    }
    let file = File::open(input).map_err(io_err(input))?;
    let total = file.metadata().map_err(io_err(input))?.len();
    // Where the validation split is to begin (at the first boundary at or after it).
    let cut = (val_fraction > 0.0).then(|| ((1.0 - val_fraction) * total as f64).floor() as u64);
    std::fs::create_dir_all(out).map_err(io_err(out))?;
    // A directory being written again is not whole until its new meta.json is there.
    let meta_path = out.join("meta.json");
    if meta_path.exists() {
        std::fs::remove_file(&meta_path).map_err(io_err(&meta_path))?;
    }
    let written = write_splits(file, total, cut, input, tokenizer, out, block_bytes, progress);
    if written.is_err() {
        for name in ["train.bin", "val.bin", "meta.json"] {
            let _ = std::fs::remove_file(partial(out, name));
        }
    }
    written
}

/// Where `name` is written in `out` until it is whole.
fn partial(out: &Path, name: &str) -> PathBuf {
    out.join(format!("{name}.partial"))
}

#[allow(clippy::too_many_arguments)]
fn write_splits(
    file: File,
    total: u64,
    cut: Option<u64>,
    input: &Path,
    tokenizer: Tokenizer,
    out: &Path,
    block_bytes: usize,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Meta> {
    let mut train = Sink::create(partial(out, "train.bin"))?;
    let mut val = Sink::create(partial(out, "val.bin"))?;

    let threads = rayon::current_num_threads().max(1);
    let mut blocks = Blocks {
        file,
        input,
        pending: Vec::new(),
        offset: 0,
        eof: false,
        cut,
        in_val: cut == Some(0),
        block_bytes,
    };
    loop {
        // A block per thread, encoded in parallel, written in order.
        let mut batch = Vec::with_capacity(threads);
        while batch.len() < threads {
            match blocks.next()? {
                Some(block) => batch.push(block),
                None => break,
            }
        }
        if batch.is_empty() {
            break;
        }
        let encoded: Vec<Result<(Vec<u32>, bool)>> = batch
            .into_par_iter()
            .map(|(start, bytes, is_val)| {
                let text = std::str::from_utf8(&bytes).map_err(|e| DataError::Corrupt {
                    what: input.display().to_string(),
                    detail: format!(
                        "not UTF-8 text: invalid byte at offset {}",
                        start + e.valid_up_to() as u64
                    ),
                })?;
                Ok((tokenizer.encode(text), is_val))
            })
            .collect();
        for block in encoded {
            let (ids, is_val) = block?;
            if is_val { &mut val } else { &mut train }.write(&ids)?;
        }
        progress(blocks.offset, total);
    }
    let meta = Meta {
        tokenizer: tokenizer.name().into(),
        vocab_size: tokenizer.vocab_size(),
        end_of_text: tokenizer.end_of_text(),
        train_tokens: train.tokens,
        val_tokens: val.tokens,
    };
    train.finish(&out.join("train.bin"))?;
    val.finish(&out.join("val.bin"))?;
    let text = serde_json::to_string_pretty(&meta).expect("meta serializes");
    let meta_part = partial(out, "meta.json");
    std::fs::write(&meta_part, text + "\n").map_err(io_err(&meta_part))?;
    std::fs::rename(&meta_part, out.join("meta.json")).map_err(io_err(out))?;
    Ok(meta)
}

/// The input's blocks in order, each ending on a boundary (or at the end of the text).
struct Blocks<'a> {
    file: File,
    input: &'a Path,
    /// Read and not yet handed out; `offset` is the file offset of its first byte.
    pending: Vec<u8>,
    offset: u64,
    eof: bool,
    /// Where the validation split is to begin (at the first boundary at or after it).
    cut: Option<u64>,
    in_val: bool,
    block_bytes: usize,
}

impl Blocks<'_> {
    /// Reads until `pending` holds `want` bytes or the file ends.
    fn fill(&mut self, want: usize) -> Result<()> {
        while !self.eof && self.pending.len() < want {
            let start = self.pending.len();
            self.pending.resize(want, 0);
            let n = read_some(&mut self.file, &mut self.pending[start..]).map_err(io_err(self.input))?;
            self.pending.truncate(start + n);
            self.eof = n == 0;
        }
        Ok(())
    }

    /// The next block: its file offset, its bytes, and whether it validates.
    fn next(&mut self) -> Result<Option<(u64, Vec<u8>, bool)>> {
        let mut want = self.block_bytes.max(1);
        let mut end = loop {
            self.fill(want)?;
            if self.eof {
                break self.pending.len();
            }
            if let Some(end) = last_boundary(&self.pending) {
                break end;
            }
            if want >= MAX_BLOCK_BYTES {
                return Err(DataError::Corrupt {
                    what: self.input.display().to_string(),
                    detail: format!(
                        "no single space or line break between two characters in {} MiB from byte {}: prepare splits the text there",
                        MAX_BLOCK_BYTES >> 20,
                        self.offset
                    ),
                });
            }
            want *= 2;
        };
        if end == 0 {
            return Ok(None);
        }
        let is_val = self.in_val;
        if let (false, Some(cut)) = (self.in_val, self.cut) {
            if self.offset + end as u64 >= cut {
                // The split starts at the first boundary at or after the cut: this
                // block ends there, and the blocks after it validate.
                if let Some(b) = first_boundary(&self.pending[..end], (cut - self.offset) as usize) {
                    end = b;
                }
                self.in_val = true;
            }
        }
        let rest = self.pending.split_off(end);
        let block = std::mem::replace(&mut self.pending, rest);
        let start = self.offset;
        self.offset += end as u64;
        Ok(Some((start, block, is_val)))
    }
}

fn read_some(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        match file.read(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// A `.bin` file being written under a temporary name.
struct Sink {
    path: PathBuf,
    file: BufWriter<File>,
    tokens: u64,
}

impl Sink {
    fn create(path: PathBuf) -> Result<Sink> {
        let file = File::create(&path).map_err(io_err(&path))?;
        Ok(Sink { path, file: BufWriter::with_capacity(1 << 20, file), tokens: 0 })
    }

    fn write(&mut self, ids: &[u32]) -> Result<()> {
        let bytes: Vec<u8> = ids.iter().flat_map(|&id| (id as u16).to_le_bytes()).collect();
        self.file.write_all(&bytes).map_err(io_err(&self.path))?;
        self.tokens += ids.len() as u64;
        Ok(())
    }

    fn finish(self, to: &Path) -> Result<()> {
        let file = self
            .file
            .into_inner()
            .map_err(|e| DataError::Io { path: self.path.clone(), source: e.into_error() })?;
        file.sync_all().map_err(io_err(&self.path))?;
        std::fs::rename(&self.path, to).map_err(io_err(to))
    }
}

/// A prepared directory's `meta.json`, checked: a tokenizer Sheaf knows, with its
/// vocabulary size.
pub fn read_meta(dir: &Path) -> Result<(Meta, Tokenizer)> {
    let path = dir.join("meta.json");
    let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
    let meta: Meta = serde_json::from_str(&text)
        .map_err(|e| DataError::Corrupt { what: path.display().to_string(), detail: e.to_string() })?;
    let tokenizer = Tokenizer::named(&meta.tokenizer)?;
    if meta.vocab_size != tokenizer.vocab_size() {
        return Err(DataError::Corrupt {
            what: path.display().to_string(),
            detail: format!(
                "vocab_size {} is not tokenizer `{}`'s {}",
                meta.vocab_size,
                tokenizer.name(),
                tokenizer.vocab_size()
            ),
        });
    }
    Ok((meta, tokenizer))
}
