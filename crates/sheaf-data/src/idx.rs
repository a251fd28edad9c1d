//! The IDX format of MNIST and Fashion-MNIST: a big-endian header (two zero bytes, a
//! type code, the number of dimensions, each dimension as u32) then the data.
//! Gzipped files (`.gz`) are read transparently.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::{DataError, Dataset, Result};

/// An IDX array of unsigned bytes: its dimensions and data.
#[derive(Debug, PartialEq)]
pub struct IdxArray {
    pub dims: Vec<usize>,
    pub data: Vec<u8>,
}

fn read_all(path: &Path) -> Result<Vec<u8>> {
    let io = |source| DataError::Io { path: path.to_path_buf(), source };
    let raw = std::fs::read(path).map_err(io)?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..]).read_to_end(&mut out).map_err(|e| DataError::Corrupt {
            what: path.display().to_string(),
            detail: format!("bad gzip data: {e}"),
        })?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// Reads an IDX file of unsigned bytes (type code 0x08).
pub fn read_idx(path: &Path) -> Result<IdxArray> {
    let mut bytes = read_all(path)?;
    let (dims, header) = idx_header(path, &bytes)?;
    Ok(IdxArray { dims, data: bytes.split_off(header) })
}

/// The labels file that goes with an images file, by MNIST's naming
/// (`train-images-idx3-ubyte[.gz]` -> `train-labels-idx1-ubyte[.gz]`).
pub fn labels_path_for(images: &Path) -> Option<PathBuf> {
    let name = images.file_name()?.to_str()?;
    name.contains("images-idx3").then(|| images.with_file_name(name.replace("images-idx3", "labels-idx1")))
}

/// An images file and its labels file as a dataset in memory; pixels scaled to
/// `[0, 1]`.
pub fn load_idx_pair(images: &Path, labels: &Path) -> Result<Dataset> {
    let rows = open_idx_pair(images, labels)?;
    let all: Vec<usize> = (0..rows.rows.len()).collect();
    let (inputs, labels) = rows
        .read(&all)
        .map_err(|e| DataError::Corrupt { what: images.display().to_string(), detail: e.to_string() })?;
    Ok(Dataset { name: rows.name, inputs, labels, input_dim: rows.input_dim, num_classes: rows.num_classes })
}

/// The bytes of an IDX file: memory-mapped when plain, decompressed into memory when
/// gzipped (a gzip stream cannot be read at random).
enum IdxBytes {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl IdxBytes {
    fn open(path: &Path) -> Result<IdxBytes> {
        let io = |source| DataError::Io { path: path.to_path_buf(), source };
        let file = std::fs::File::open(path).map_err(io)?;
        let mut magic = [0u8; 2];
        let gz = std::io::Read::read(&mut &file, &mut magic).map_err(io)? == 2 && magic == [0x1f, 0x8b];
        if gz {
            return Ok(IdxBytes::Owned(read_all(path)?));
        }
        // SAFETY: a read-only map; a file changed underneath reads changed pixels.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        Ok(IdxBytes::Mapped(map))
    }

    fn bytes(&self) -> &[u8] {
        match self {
            IdxBytes::Mapped(m) => m,
            IdxBytes::Owned(v) => v,
        }
    }
}

/// The header of an IDX file of unsigned bytes: its dimensions and where the data
/// starts, checked against the file's length.
fn idx_header(path: &Path, bytes: &[u8]) -> Result<(Vec<usize>, usize)> {
    let corrupt = |detail: String| DataError::Corrupt { what: path.display().to_string(), detail };
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 {
        return Err(corrupt("not an IDX file (bad magic number)".into()));
    }
    if bytes[2] != 0x08 {
        return Err(corrupt(format!(
            "IDX type code {:#04x}; only unsigned bytes (0x08) are supported",
            bytes[2]
        )));
    }
    let ndim = usize::from(bytes[3]);
    let header = 4 + 4 * ndim;
    if ndim == 0 || bytes.len() < header {
        return Err(corrupt(format!("truncated header ({ndim} dimensions)")));
    }
    let dims: Vec<usize> = bytes[4..header]
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes(c.try_into().expect("4 bytes")) as usize)
        .collect();
    let expected = dims
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| corrupt("size overflows".into()))?;
    if bytes.len() - header != expected {
        return Err(corrupt(format!(
            "dimensions {dims:?} need {expected} bytes of data, file has {}",
            bytes.len() - header
        )));
    }
    Ok((dims, header))
}

/// An IDX images file and its labels as rows read by index: the images stay in the
/// (mapped) file and each gather decodes only the rows asked for, pixels scaled to
/// `[0, 1]`; labels are read whole (a byte per sample).
pub struct IdxRows {
    name: String,
    images: std::sync::Arc<IdxBytes>,
    offset: usize,
    labels: std::sync::Arc<Vec<u32>>,
    /// The rows of this split, into the file's rows.
    rows: Vec<u32>,
    input_dim: usize,
    num_classes: usize,
}

impl std::fmt::Debug for IdxRows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdxRows").field("name", &self.name).field("rows", &self.rows.len()).finish()
    }
}

/// Opens an images file and its labels file for reading rows by index.
pub fn open_idx_pair(images: &Path, labels: &Path) -> Result<IdxRows> {
    let img = IdxBytes::open(images)?;
    let (dims, offset) = idx_header(images, img.bytes())?;
    let lab = read_idx(labels)?;
    let corrupt = |detail: String| DataError::Corrupt { what: images.display().to_string(), detail };
    if dims.len() < 2 {
        return Err(corrupt(format!("images need at least 2 dimensions, found {dims:?}")));
    }
    if lab.dims.len() != 1 {
        return Err(DataError::Corrupt {
            what: labels.display().to_string(),
            detail: format!("labels need 1 dimension, found {:?}", lab.dims),
        });
    }
    if lab.dims[0] != dims[0] {
        return Err(corrupt(format!(
            "{} images but {} labels in {}",
            dims[0],
            lab.dims[0],
            labels.display()
        )));
    }
    let rows = u32::try_from(dims[0]).map_err(|_| corrupt(format!("{} images is too many", dims[0])))?;
    Ok(IdxRows {
        name: images.display().to_string(),
        images: std::sync::Arc::new(img),
        offset,
        num_classes: lab.data.iter().copied().max().map_or(0, |m| usize::from(m) + 1),
        labels: std::sync::Arc::new(lab.data.iter().map(|&l| u32::from(l)).collect()),
        rows: (0..rows).collect(),
        input_dim: dims[1..].iter().product(),
    })
}

impl IdxRows {
    pub fn input_dim(&self) -> usize {
        self.input_dim
    }

    pub fn num_classes(&self) -> usize {
        self.num_classes
    }

    /// The same seeded split as [`Dataset::split`]: `(train, test)`.
    pub fn split(&self, test_fraction: f64, seed: u64) -> (IdxRows, IdxRows) {
        let perm = crate::permutation(self.rows.len(), seed);
        let n_test = (self.rows.len() as f64 * test_fraction) as usize;
        let (test, train) = perm.split_at(n_test);
        let pick =
            |idx: &[usize]| IdxRows { rows: idx.iter().map(|&i| self.rows[i]).collect(), ..self.share() };
        (pick(train), pick(test))
    }

    fn share(&self) -> IdxRows {
        IdxRows {
            name: self.name.clone(),
            images: self.images.clone(),
            offset: self.offset,
            labels: self.labels.clone(),
            rows: Vec::new(),
            input_dim: self.input_dim,
            num_classes: self.num_classes,
        }
    }

    /// Checks the rows fit a model with `inputs` features and `classes` outputs.
    pub fn check_shape(&self, inputs: usize, classes: usize) -> Result<()> {
        crate::check_shape(&self.name, (self.input_dim, self.num_classes), (inputs, classes))
    }
}

impl sheaf_core::Dataset for IdxRows {
    fn len(&self) -> usize {
        self.rows.len()
    }

    fn gather(&self, indices: &[usize]) -> sheaf_core::Result<sheaf_core::Samples> {
        let (inputs, labels) = self.read(indices)?;
        Ok(sheaf_core::Samples::Rows { inputs, labels, input_dim: self.input_dim })
    }
}

impl IdxRows {
    /// The pixels (scaled to `[0, 1]`) and labels of this split's rows `indices`.
    fn read(&self, indices: &[usize]) -> sheaf_core::Result<(Vec<f32>, Vec<u32>)> {
        let d = self.input_dim;
        let bytes = &self.images.bytes()[self.offset..];
        let mut inputs = Vec::with_capacity(indices.len() * d);
        let mut labels = Vec::with_capacity(indices.len());
        for &i in indices {
            let row = *self.rows.get(i).ok_or_else(|| {
                sheaf_core::Error::invalid(format!("sample {i} of a set of {}", self.rows.len()))
            })? as usize;
            inputs.extend(bytes[row * d..(row + 1) * d].iter().map(|&p| f32::from(p) / 255.0));
            labels.push(self.labels[row]);
        }
        Ok((inputs, labels))
    }
}
