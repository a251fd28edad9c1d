//! A job's data and model, checked against each other: the dataset is opened, the
//! compute plugin describes the model kind (with the dataset's vocabulary when it has
//! one), and the data is split and checked against what the model consumes. The
//! launcher runs this before any worker starts; every worker runs it again.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use sheaf_core::{ComputeBackend, Dataset, ModelInfo, ModelInput, ModelSpec, PluginKind};
use sheaf_data::TokenFile;

use crate::job::Job;
use sheaf_plugins::{HostError, Registry};

/// What a worker trains on and with.
pub struct JobData {
    pub spec: ModelSpec,
    pub info: ModelInfo,
    pub train: Box<dyn Dataset>,
    pub test: Box<dyn Dataset>,
    /// The characters behind the token ids, for a text dataset.
    pub vocab: Option<Vec<char>>,
}

impl JobData {
    /// Tokens one sample predicts (a token window's `block_size`), or `None` for rows.
    pub fn tokens_per_sample(&self) -> Option<usize> {
        match self.info.input {
            ModelInput::Tokens { block_size, .. } => Some(block_size),
            ModelInput::Rows { .. } => None,
        }
    }
}

enum Source {
    Digits,
    Synthetic,
    Idx(PathBuf),
    Tokens(Arc<TokenFile>, Option<PathBuf>),
}

fn data_err(e: sheaf_data::DataError) -> HostError {
    HostError::input("cannot read the dataset", e)
}

fn open(job: &Job) -> Result<Source, HostError> {
    Ok(match job.data.dataset.as_str() {
        "digits" => Source::Digits,
        "synthetic" => Source::Synthetic,
        "shakespeare" => Source::Tokens(Arc::new(TokenFile::shakespeare().map_err(data_err)?), None),
        path if path.ends_with(".txt") || path.ends_with(".bin") => {
            let p = PathBuf::from(path);
            Source::Tokens(Arc::new(TokenFile::open(&p).map_err(data_err)?), Some(p))
        }
        path => Source::Idx(PathBuf::from(path)),
    })
}

/// The model spec of `job` given the dataset's vocabulary size.
pub fn model_spec(job: &Job, vocab_size: Option<usize>) -> ModelSpec {
    let mut config = job.model.config_json();
    // Recomputation travels with the model's settings, where the compute plugin that
    // runs the kind accepts it or refuses it by name (checked when the job was read).
    if let Ok(Some(every)) = job.train.activation_checkpointing.every() {
        if let Ok(serde_json::Value::Object(mut map)) = serde_json::from_str::<serde_json::Value>(&config) {
            map.insert("activation_checkpointing".into(), every.into());
            config = serde_json::Value::Object(map).to_string();
        }
    }
    ModelSpec { kind: job.model.kind.clone(), config, vocab_size }
}

/// Asks `compute` to describe the job's model; an unknown kind names the kinds the
/// loaded plugins provide.
pub fn describe(
    job: &Job,
    spec: &ModelSpec,
    registry: &Registry,
    compute: &dyn ComputeBackend,
) -> Result<ModelInfo, HostError> {
    if !compute.model_kinds().contains(&spec.kind) {
        let mut loaded: Vec<String> =
            registry.provided().into_iter().filter(|p| p.kind == PluginKind::Model).map(|p| p.name).collect();
        loaded.sort();
        loaded.dedup();
        return Err(HostError::Job(format!(
            "key `model.kind`: unknown model kind `{}` (compute backend `{}` builds {}; kinds loaded: {})",
            spec.kind,
            job.compute.backend,
            compute.model_kinds().join(", "),
            if loaded.is_empty() { "none".into() } else { loaded.join(", ") }
        )));
    }
    compute.describe(spec).map_err(|source| HostError::Core { during: Some("describing the model"), source })
}

/// Opens the job's dataset, describes its model and splits the data to fit it.
pub fn load(job: &Job, registry: &Registry, compute: &dyn ComputeBackend) -> Result<JobData, HostError> {
    // A dataset that cannot be read names the key that asked for it.
    load_source(job, registry, compute).map_err(|e| match e {
        HostError::Data(detail) if !detail.contains("data.dataset") => {
            HostError::Data(format!("key `data.dataset` = {:?}: {detail}", job.data.dataset))
        }
        HostError::Input { what, source } if !what.contains("data.dataset") => {
            HostError::Input { what: format!("key `data.dataset` = {:?}: {what}", job.data.dataset), source }
        }
        other => other,
    })
}

fn load_source(job: &Job, registry: &Registry, compute: &dyn ComputeBackend) -> Result<JobData, HostError> {
    let source = open(job)?;
    let vocab_size = match &source {
        Source::Tokens(file, _) => file.vocab_size(),
        _ => None,
    };
    let spec = model_spec(job, vocab_size);
    let info = describe(job, &spec, registry, compute)?;
    let mismatch = |what: &str| {
        HostError::Job(format!(
            "model kind `{}` and data.dataset `{}` do not fit: the dataset is {what}",
            spec.kind, job.data.dataset
        ))
    };
    let (train, test, vocab): (Box<dyn Dataset>, Box<dyn Dataset>, _) = match (source, info.input) {
        (Source::Tokens(file, path), ModelInput::Tokens { vocab_size, block_size }) => {
            file.check_ids(vocab_size, path.as_deref()).map_err(data_err)?;
            let fraction = job.data.test_fraction.unwrap_or(0.1);
            let vocab = file.vocab().map(<[char]>::to_vec);
            let (train, test) =
                sheaf_data::token_split(file, fraction, block_size, job.seed).map_err(data_err)?;
            (Box::new(train), Box::new(test), vocab)
        }
        (Source::Tokens(..), ModelInput::Rows { .. }) => {
            return Err(mismatch("token ids, but the model takes rows of features"))
        }
        (_, ModelInput::Tokens { .. }) => {
            return Err(mismatch("rows of features, but the model takes token windows"))
        }
        (Source::Idx(images), ModelInput::Rows { features, classes }) => {
            let (train, test) = open_idx(job, &images, features, classes)?;
            (Box::new(train), Box::new(test), None)
        }
        (source, ModelInput::Rows { features, classes }) => {
            let (train, test) = load_rows(job, source, features, classes)?;
            (Box::new(train), Box::new(test), None)
        }
    };
    Ok(JobData { spec, info, train, test, vocab })
}

/// An IDX images file (and its labels) read by index: MNIST's `t10k` files as the
/// test set when they sit beside it, else a seeded split.
fn open_idx(
    job: &Job,
    images: &Path,
    features: usize,
    classes: usize,
) -> Result<(sheaf_data::IdxRows, sheaf_data::IdxRows), HostError> {
    let path = images.display().to_string();
    let labels = match &job.data.labels {
        Some(l) => PathBuf::from(l),
        None => sheaf_data::labels_path_for(images).ok_or_else(|| {
            HostError::Data(format!(
                "data.dataset `{path}` is not `digits`, `synthetic`, `shakespeare`, a token file (.txt, .bin) or an IDX images file named *-images-idx3-ubyte[.gz]; set data.labels for other names"
            ))
        })?,
    };
    let all = sheaf_data::open_idx_pair(images, &labels).map_err(data_err)?;
    // MNIST ships its test set beside the training set.
    let t10k = |p: &Path| Some(p.with_file_name(p.file_name()?.to_str()?.replacen("train", "t10k", 1)));
    let (train, test) = match (t10k(images), t10k(&labels)) {
        (Some(ti), Some(tl)) if ti != images && ti.exists() && tl.exists() => {
            (all, sheaf_data::open_idx_pair(&ti, &tl).map_err(data_err)?)
        }
        _ => all.split(job.data.test_fraction.unwrap_or(0.2), job.seed),
    };
    train.check_shape(features, classes).map_err(data_err)?;
    Ok((train, test))
}

fn load_rows(
    job: &Job,
    source: Source,
    features: usize,
    classes: usize,
) -> Result<(sheaf_data::Dataset, sheaf_data::Dataset), HostError> {
    let data = &job.data;
    let fraction = data.test_fraction.unwrap_or(0.2);
    let (train, test) = match source {
        Source::Digits => sheaf_data::digits().map_err(data_err)?.split(fraction, job.seed),
        Source::Synthetic => {
            sheaf_data::teacher(data.samples, features, classes, job.seed).split(fraction, job.seed)
        }
        Source::Idx(..) | Source::Tokens(..) => {
            return Err(HostError::Data("IDX files and token data are not in-memory rows".into()))
        }
    };
    train.check_shape(features, classes).map_err(data_err)?;
    Ok((train, test))
}
