//! Datasets for Sheaf jobs, as dense `f32` inputs and `u32` labels.
//!
//! - `digits`: the 8x8 handwritten digits (1,797 images, 10 classes; UCI, E. Alpaydin
//!   and C. Kaynak, CC BY 4.0), compiled into the binary, so the default job needs no
//!   files and no network. Pixels are scaled to `[0, 1]`; a seeded permutation splits
//!   it 80/20 into train and test, the same on every machine.
//! - IDX files (the MNIST / Fashion-MNIST format), gzipped or not.
//! - `synthetic`: random inputs labelled by a fixed random "teacher" network, seeded.
//! - Token data for language models ([`TokenFile`]): the bundled Shakespeare text,
//!   `.txt` files (characters) and `.bin` files (nanoGPT's `u16` ids, memory-mapped),
//!   split by position and read window by window ([`TokenWindows`]), and directories
//!   that `sheaf prepare` wrote: text encoded with a [`Tokenizer`] (GPT-2's) into
//!   `train.bin`, `val.bin` and `meta.json` ([`prepare`]).
//!
//! Every malformed input is an error naming the file and what was wrong.

mod idx;
pub mod prepare;
mod synthetic;
pub mod tokenizer;
mod tokens;

use std::io::Read;
use std::path::PathBuf;

use sheaf_core::SplitMix64;

pub use idx::{labels_path_for, load_idx_pair, open_idx_pair, read_idx, IdxArray, IdxRows};
pub use prepare::{prepare, read_meta, Meta};
pub use synthetic::teacher;
pub use tokenizer::Tokenizer;
pub use tokens::{token_split, token_split_prepared, TokenFile, TokenWindows};

/// Why a dataset could not be had.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DataError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{what}: {detail}")]
    Corrupt { what: String, detail: String },
    #[error("dataset `{name}` has {found} {what} per sample but the model needs {expected}")]
    Shape { name: String, what: &'static str, found: usize, expected: usize },
}

pub type Result<T, E = DataError> = std::result::Result<T, E>;

/// Samples as rows: `inputs` is `[len, input_dim]`, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct Dataset {
    pub name: String,
    pub inputs: Vec<f32>,
    pub labels: Vec<u32>,
    pub input_dim: usize,
    pub num_classes: usize,
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Checks the dataset fits a model with `inputs` input features and `classes`
    /// outputs.
    pub fn check_shape(&self, inputs: usize, classes: usize) -> Result<()> {
        check_shape(&self.name, (self.input_dim, self.num_classes), (inputs, classes))
    }

    /// The samples at `indices`, in that order.
    pub fn select(&self, indices: &[usize]) -> Dataset {
        let d = self.input_dim;
        let mut inputs = Vec::with_capacity(indices.len() * d);
        for &i in indices {
            inputs.extend_from_slice(&self.inputs[i * d..(i + 1) * d]);
        }
        Dataset {
            name: self.name.clone(),
            inputs,
            labels: indices.iter().map(|&i| self.labels[i]).collect(),
            input_dim: d,
            num_classes: self.num_classes,
        }
    }

    /// A seeded split: a fraction `test_fraction` of the samples (rounded down) for
    /// test, the rest for training, both in a shuffled but fixed order.
    pub fn split(&self, test_fraction: f64, seed: u64) -> (Dataset, Dataset) {
        let perm = permutation(self.len(), seed);
        let n_test = (self.len() as f64 * test_fraction) as usize;
        let (test, train) = perm.split_at(n_test);
        (self.select(train), self.select(test))
    }
}

impl sheaf_core::Dataset for Dataset {
    fn len(&self) -> usize {
        self.labels.len()
    }

    fn gather(&self, indices: &[usize]) -> sheaf_core::Result<sheaf_core::Samples> {
        if let Some(&bad) = indices.iter().find(|&&i| i >= self.labels.len()) {
            return Err(sheaf_core::Error::invalid(format!(
                "sample {bad} of a set of {}",
                self.labels.len()
            )));
        }
        let rows = self.select(indices);
        Ok(sheaf_core::Samples::Rows { inputs: rows.inputs, labels: rows.labels, input_dim: self.input_dim })
    }
}

/// Checks rows of `found` `(input features, classes)` fit a model of `expected` ones.
pub(crate) fn check_shape(name: &str, found: (usize, usize), expected: (usize, usize)) -> Result<()> {
    if found.0 != expected.0 {
        return Err(DataError::Shape {
            name: name.into(),
            what: "inputs",
            found: found.0,
            expected: expected.0,
        });
    }
    if found.1 > expected.1 {
        return Err(DataError::Shape {
            name: name.into(),
            what: "classes",
            found: found.1,
            expected: expected.1,
        });
    }
    Ok(())
}

/// A seeded permutation of `0..n`.
pub fn permutation(n: usize, seed: u64) -> Vec<usize> {
    SplitMix64::new(seed).permutation(n)
}

static DIGITS_GZ: &[u8] = include_bytes!("../data/digits.csv.gz");

/// The bundled digits set, all 1,797 samples, pixels scaled to `[0, 1]`.
pub fn digits() -> Result<Dataset> {
    let mut text = String::new();
    flate2::read::GzDecoder::new(DIGITS_GZ)
        .read_to_string(&mut text)
        .map_err(|e| DataError::Corrupt { what: "bundled digits.csv.gz".into(), detail: e.to_string() })?;
    parse_csv("digits", &text, 64, 10)
}

/// Rows of `dim` numbers then a label below `classes`.
fn parse_csv(name: &str, text: &str, dim: usize, classes: usize) -> Result<Dataset> {
    let corrupt =
        |line: usize, detail: String| DataError::Corrupt { what: format!("{name} line {line}"), detail };
    let mut inputs = Vec::new();
    let mut labels = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        if fields.len() != dim + 1 {
            return Err(corrupt(i + 1, format!("{} fields, expected {}", fields.len(), dim + 1)));
        }
        for f in &fields[..dim] {
            let v: f32 = f.parse().map_err(|_| corrupt(i + 1, format!("`{f}` is not a number")))?;
            inputs.push(v / 16.0);
        }
        let label: u32 = fields[dim]
            .parse::<f64>()
            .ok()
            .filter(|l| l.fract() == 0.0 && *l >= 0.0 && (*l as usize) < classes)
            .map(|l| l as u32)
            .ok_or_else(|| {
                corrupt(i + 1, format!("label `{}` is not a class below {classes}", fields[dim]))
            })?;
        labels.push(label);
    }
    Ok(Dataset { name: name.into(), inputs, labels, input_dim: dim, num_classes: classes })
}

#[cfg(test)]
mod fuzz;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_prepare;
