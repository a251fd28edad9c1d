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
    let bytes = read_all(path)?;
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
        return Err(corrupt(format!("truncated header ({} dimensions)", ndim)));
    }
    let dims: Vec<usize> = bytes[4..header]
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes(c.try_into().expect("4 bytes")) as usize)
        .collect();
    let expected = dims
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| corrupt("size overflows".into()))?;
    let data = bytes[header..].to_vec();
    if data.len() != expected {
        return Err(corrupt(format!(
            "dimensions {dims:?} need {expected} bytes of data, file has {}",
            data.len()
        )));
    }
    Ok(IdxArray { dims, data })
}

/// The labels file that goes with an images file, by MNIST's naming
/// (`train-images-idx3-ubyte[.gz]` -> `train-labels-idx1-ubyte[.gz]`).
pub fn labels_path_for(images: &Path) -> Option<PathBuf> {
    let name = images.file_name()?.to_str()?;
    name.contains("images-idx3").then(|| images.with_file_name(name.replace("images-idx3", "labels-idx1")))
}

/// An images file and its labels file as a dataset; pixels scaled to `[0, 1]`.
pub fn load_idx_pair(images: &Path, labels: &Path) -> Result<Dataset> {
    let img = read_idx(images)?;
    let lab = read_idx(labels)?;
    let corrupt = |detail: String| DataError::Corrupt { what: images.display().to_string(), detail };
    if img.dims.len() < 2 {
        return Err(corrupt(format!("images need at least 2 dimensions, found {:?}", img.dims)));
    }
    if lab.dims.len() != 1 {
        return Err(DataError::Corrupt {
            what: labels.display().to_string(),
            detail: format!("labels need 1 dimension, found {:?}", lab.dims),
        });
    }
    if lab.dims[0] != img.dims[0] {
        return Err(corrupt(format!(
            "{} images but {} labels in {}",
            img.dims[0],
            lab.dims[0],
            labels.display()
        )));
    }
    let input_dim = img.dims[1..].iter().product();
    let num_classes = lab.data.iter().copied().max().map_or(0, |m| usize::from(m) + 1);
    Ok(Dataset {
        name: images.display().to_string(),
        inputs: img.data.iter().map(|&p| f32::from(p) / 255.0).collect(),
        labels: lab.data.iter().map(|&l| u32::from(l)).collect(),
        input_dim,
        num_classes,
    })
}
