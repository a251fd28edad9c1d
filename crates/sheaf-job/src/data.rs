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
    /// What the token ids stand for, for a text dataset.
    pub vocab: Option<Vocab>,
}

/// What a text dataset's token ids stand for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Vocab {
    /// Id `i` is the `i`-th character (a character-level text).
    Chars(Vec<char>),
    /// Ids of a tokenizer (a directory `sheaf prepare` wrote).
    Tokenizer(sheaf_data::Tokenizer),
}

impl Vocab {
    /// `vocab.json` in a run directory, which `sheaf sample` reads.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Vocab::Chars(chars) => {
                let tokens: Vec<String> = chars.iter().map(char::to_string).collect();
                serde_json::json!({ "kind": "characters", "tokens": tokens })
            }
            Vocab::Tokenizer(t) => serde_json::json!({
                "kind": "tokenizer",
                "tokenizer": t.name(),
                "vocab_size": t.vocab_size(),
            }),
        }
    }

    /// The vocabulary a `vocab.json` describes.
    pub fn from_json(v: &serde_json::Value) -> Result<Vocab, String> {
        if let Some(name) = v["tokenizer"].as_str() {
            return sheaf_data::Tokenizer::named(name).map(Vocab::Tokenizer).map_err(|e| e.to_string());
        }
        let tokens = v["tokens"].as_array().ok_or("no `tokens` array and no `tokenizer`")?;
        tokens
            .iter()
            .map(|t| {
                let mut chars = t.as_str().unwrap_or_default().chars();
                match (chars.next(), chars.next()) {
                    (Some(c), None) => Ok(c),
                    _ => Err(format!("token {t} is not one character")),
                }
            })
            .collect::<Result<_, _>>()
            .map(Vocab::Chars)
    }

    /// Token ids below this.
    pub fn size(&self) -> usize {
        match self {
            Vocab::Chars(chars) => chars.len(),
            Vocab::Tokenizer(t) => t.vocab_size(),
        }
    }

    /// The ids of `text`; a character outside a character vocabulary is an error.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, String> {
        match self {
            Vocab::Chars(chars) => text
                .chars()
                .map(|c| {
                    chars
                        .binary_search(&c)
                        .map(|i| i as u32)
                        .map_err(|_| format!("the character {c:?} is not in the model's vocabulary"))
                })
                .collect(),
            Vocab::Tokenizer(t) => Ok(t.encode(text)),
        }
    }

    /// The text of `ids` (each below [`Vocab::size`]).
    pub fn decode(&self, ids: &[u32]) -> Result<String, String> {
        match self {
            Vocab::Chars(chars) => ids
                .iter()
                .map(|&i| {
                    chars.get(i as usize).copied().ok_or(format!("token id {i} outside the vocabulary"))
                })
                .collect(),
            Vocab::Tokenizer(t) => t.decode(ids).map_err(|e| e.to_string()),
        }
    }
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
    /// A directory `sheaf prepare` wrote: its train and validation files.
    Prepared {
        dir: PathBuf,
        tokenizer: sheaf_data::Tokenizer,
    },
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
        path if Path::new(path).join("meta.json").is_file() => {
            let dir = PathBuf::from(path);
            let (_, tokenizer) = sheaf_data::read_meta(&dir).map_err(data_err)?;
            Source::Prepared { dir, tokenizer }
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
    // Every input read on the way is the dataset's.
    load_source(job, registry, compute).map_err(|e| match e {
        HostError::Input { what, source } => {
            HostError::Input { what: format!("key `data.dataset` = {:?}: {what}", job.data.dataset), source }
        }
        other => other,
    })
}

fn load_source(job: &Job, registry: &Registry, compute: &dyn ComputeBackend) -> Result<JobData, HostError> {
    let source = open(job)?;
    let vocab_size = match &source {
        Source::Tokens(file, _) => file.vocab_size(),
        Source::Prepared { tokenizer, .. } => Some(tokenizer.vocab_size()),
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
            let vocab = file.vocab().map(|c| Vocab::Chars(c.to_vec()));
            let (train, test) =
                sheaf_data::token_split(file, fraction, block_size, job.seed).map_err(data_err)?;
            (Box::new(train), Box::new(test), vocab)
        }
        (Source::Prepared { dir, tokenizer }, ModelInput::Tokens { vocab_size, block_size }) => {
            if let Some(f) = job.data.test_fraction {
                return Err(HostError::Job(format!(
                    "key `data.test_fraction` = {f}: {} validates on its val.bin, split when it was prepared \
                     (sheaf prepare --val-fraction); leave the key out",
                    dir.display()
                )));
            }
            let open = |name: &str| -> Result<Arc<TokenFile>, HostError> {
                let path = dir.join(name);
                let file = TokenFile::open(&path).map_err(data_err)?;
                file.check_ids(vocab_size.min(tokenizer.vocab_size()), Some(&path)).map_err(data_err)?;
                Ok(Arc::new(file))
            };
            let (train, test) =
                sheaf_data::token_split_prepared(open("train.bin")?, open("val.bin")?, block_size, job.seed)
                    .map_err(data_err)?;
            (Box::new(train), Box::new(test), Some(Vocab::Tokenizer(tokenizer)))
        }
        (Source::Tokens(..) | Source::Prepared { .. }, ModelInput::Rows { .. }) => {
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
        Source::Idx(..) | Source::Tokens(..) | Source::Prepared { .. } => {
            return Err(HostError::Data("IDX files and token data are not in-memory rows".into()))
        }
    };
    train.check_shape(features, classes).map_err(data_err)?;
    Ok((train, test))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixture::job;
    use sheaf_core::{Block, Model, ParamLayout, ParamSpec};
    use sheaf_plugins::exit;

    /// Describes `rows` (8 features, 3 classes; 64 and 10 for `digits`) and `tokens`
    /// (the dataset's vocabulary or 256, windows of `block_size`) models; refuses a
    /// `block_size` of 0 as a model kind would; builds nothing.
    struct Describer;

    impl ComputeBackend for Describer {
        fn device(&self) -> &str {
            "test"
        }
        fn model_kinds(&self) -> Vec<String> {
            vec!["rows".into(), "digits".into(), "tokens".into()]
        }
        fn describe(&self, spec: &ModelSpec) -> sheaf_core::Result<ModelInfo> {
            let config: serde_json::Value = serde_json::from_str(&spec.config).unwrap();
            let input = match spec.kind.as_str() {
                "rows" => ModelInput::Rows { features: 8, classes: 3 },
                "digits" => ModelInput::Rows { features: 64, classes: 10 },
                _ => match config["block_size"].as_u64().unwrap_or(16) {
                    0 => {
                        return Err(sheaf_core::Error::InvalidConfig {
                            key: "block_size".into(),
                            detail: "must be at least 1".into(),
                        })
                    }
                    b => ModelInput::Tokens {
                        vocab_size: spec.vocab_size.unwrap_or(256),
                        block_size: b as usize,
                    },
                },
            };
            let layout = ParamLayout::new(vec![ParamSpec { name: "w".into(), shape: vec![2] }]);
            Ok(ModelInfo { layout, blocks: vec![Block { name: "b".into(), params: 2 }], input })
        }
        fn build_model(&self, _: &ModelSpec, _: u64) -> sheaf_core::Result<Box<dyn Model>> {
            Err(sheaf_core::Error::Unsupported("test backend".into()))
        }
    }

    fn load_job(sets: &[&str]) -> Result<JobData, HostError> {
        load(&job(sets), &Registry::load(&[]), &Describer)
    }

    /// Rows split at the test fraction (a fifth by default); token files by theirs (a
    /// tenth), with their characters as the vocabulary.
    #[test]
    fn datasets_split_at_their_fractions() {
        let d = load_job(&["model.kind=rows", "data.samples=100"]).unwrap();
        assert_eq!(
            (d.train.len(), d.test.len(), d.tokens_per_sample(), d.vocab.is_none()),
            (80, 20, None, true)
        );
        let d = load_job(&["model.kind=rows", "data.samples=100", "data.test_fraction=0.5"]).unwrap();
        assert_eq!((d.train.len(), d.test.len()), (50, 50));
        let d = load_job(&["model.kind=digits", "data.dataset=digits"]).unwrap();
        assert_eq!(d.train.len() + d.test.len(), 1797, "scikit-learn's digits");
        let d = load_job(&["model.kind=tokens", "data.dataset=shakespeare", "model.block_size=8"]).unwrap();
        assert_eq!(d.tokens_per_sample(), Some(8));
        let vocab = d.vocab.as_ref().expect("characters");
        assert_eq!(Some(vocab.size()), d.spec.vocab_size);
        assert!(
            d.test.len() * 8 < d.train.len(),
            "about a tenth held out: {} {}",
            d.train.len(),
            d.test.len()
        );
    }

    /// A model and a dataset that do not fit name both; an unknown kind names what is
    /// built; a kind's refusal of its settings is the user's to fix.
    #[test]
    fn mismatches_name_the_kind_and_the_dataset() {
        let e = load_job(&["model.kind=rows", "data.dataset=shakespeare"]).err().unwrap();
        assert!(
            e.to_string().contains(
                "model kind `rows` and data.dataset `shakespeare` do not fit: the dataset is token ids"
            ),
            "{e}"
        );
        let e = load_job(&["model.kind=tokens"]).err().unwrap();
        assert!(e.to_string().contains("data.dataset `synthetic` do not fit: the dataset is rows"), "{e}");
        let e = load_job(&["model.kind=gpt9"]).err().unwrap();
        assert!(
            e.to_string().contains("unknown model kind `gpt9`")
                && e.to_string().contains("builds rows, digits, tokens"),
            "{e}"
        );
        assert_eq!(e.exit_code(), exit::USAGE);
        let e =
            load_job(&["model.kind=tokens", "data.dataset=shakespeare", "model.block_size=0"]).err().unwrap();
        assert!(e.to_string().contains("block_size"), "{e}");
        assert_eq!(e.exit_code(), exit::USAGE);
        let e = load_job(&["model.kind=digits", "data.dataset=digits", "data.samples=10"]).map(|_| ());
        assert!(e.is_ok(), "samples are the synthetic set's only");
        let e = load_job(&["model.kind=rows", "data.dataset=digits"]).err().unwrap();
        assert!(e.to_string().contains("key `data.dataset` = \"digits\""), "{e}");
    }

    /// Which reader a path goes to: token files by their extension, IDX otherwise; what
    /// cannot be read names the key, and is the user's to fix.
    #[test]
    fn paths_go_to_their_readers_and_name_the_key() {
        let dir = std::env::temp_dir().join(format!("sheaf-job-data-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let text = dir.join("t.txt");
        std::fs::write(&text, "abcabcabcabc".repeat(20)).unwrap();
        let set = format!("data.dataset=\"{}\"", text.display());
        let d = load_job(&["model.kind=tokens", &set, "model.block_size=4"]).unwrap();
        assert_eq!(
            (d.spec.vocab_size, d.vocab.as_ref()),
            (Some(3), Some(&Vocab::Chars(vec!['a', 'b', 'c'])))
        );
        let bin = dir.join("t.bin");
        std::fs::write(&bin, [1u8, 0].repeat(100)).unwrap();
        let set = format!("data.dataset=\"{}\"", bin.display());
        let d = load_job(&["model.kind=tokens", &set, "model.block_size=4"]).unwrap();
        assert_eq!(
            (d.spec.vocab_size, d.vocab.clone(), d.tokens_per_sample()),
            (None, None, Some(4)),
            "ids without characters"
        );
        for missing in ["gone.txt", "gone.bin"] {
            let set = format!("data.dataset=\"{}\"", dir.join(missing).display());
            let e = load_job(&["model.kind=tokens", &set]).err().unwrap();
            assert!(
                e.to_string().starts_with("key `data.dataset` = ") && e.to_string().contains(missing),
                "{e}"
            );
            assert_eq!(e.exit_code(), exit::USAGE);
        }
        let set = format!("data.dataset=\"{}\"", dir.join("rows.csv").display());
        let e = load_job(&["model.kind=rows", &set]).err().unwrap();
        assert!(e.to_string().contains("set data.labels"), "an IDX path without MNIST's name: {e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// IDX bytes: the magic (unsigned bytes, `dims.len()` dimensions), the dimensions,
    /// then the values.
    fn idx(dims: &[u32], values: &[u8]) -> Vec<u8> {
        let mut out = vec![0, 0, 8, dims.len() as u8];
        out.extend(dims.iter().flat_map(|d| d.to_be_bytes()));
        out.extend_from_slice(values);
        out
    }

    /// `n` images of 2 x 4 pixels (8 features) labelled below 3, as `prefix`-images
    /// and -labels files.
    fn write_idx(dir: &Path, prefix: &str, n: usize) -> PathBuf {
        let images = dir.join(format!("{prefix}-images-idx3-ubyte"));
        std::fs::write(&images, idx(&[n as u32, 2, 4], &vec![7; n * 8])).unwrap();
        let labels: Vec<u8> = (0..n).map(|i| (i % 3) as u8).collect();
        std::fs::write(dir.join(format!("{prefix}-labels-idx1-ubyte")), idx(&[n as u32], &labels)).unwrap();
        images
    }

    /// MNIST's layout: a `t10k` set beside the training set is the test set; without
    /// one (or when the `t10k` set is the one named), a seeded split at the fraction.
    #[test]
    fn idx_sets_take_their_test_set_from_beside_them() {
        let dir = std::env::temp_dir().join(format!("sheaf-job-idx-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let train = write_idx(&dir, "train", 10);
        let rows = |images: &Path, extra: &[&str]| {
            let set = format!("data.dataset=\"{}\"", images.display());
            let mut sets = vec!["model.kind=rows", set.as_str()];
            sets.extend(extra);
            load_job(&sets).map(|d| (d.train.len(), d.test.len()))
        };
        assert_eq!(rows(&train, &[]).unwrap(), (8, 2), "no t10k set: a fifth held out");
        let t10k = write_idx(&dir, "t10k", 3);
        assert_eq!(rows(&train, &[]).unwrap(), (10, 3), "the t10k set beside it");
        assert_eq!(
            rows(&t10k, &["data.test_fraction=0.4"]).unwrap(),
            (2, 1),
            "the t10k set named: split itself"
        );
        std::fs::remove_file(dir.join("t10k-labels-idx1-ubyte")).unwrap();
        assert_eq!(rows(&train, &[]).unwrap(), (8, 2), "t10k images without labels are not a test set");
        let labels = format!("data.labels=\"{}\"", dir.join("train-labels-idx1-ubyte").display());
        let other = dir.join("mine.idx");
        std::fs::copy(&train, &other).unwrap();
        assert_eq!(rows(&other, &[labels.as_str()]).unwrap(), (8, 2), "labels named by the job");
        let e = rows(&other, &[]).unwrap_err().to_string();
        assert!(e.starts_with("data.dataset `") && e.contains("set data.labels"), "not prefixed twice: {e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Recomputation travels with the model's settings; the vocabulary beside them.
    #[test]
    fn the_spec_carries_recomputation_and_the_vocabulary() {
        let spec = model_spec(&job(&["model.kind=tokens", "model.n_layer=2"]), Some(7));
        assert_eq!((spec.kind.as_str(), spec.vocab_size), ("tokens", Some(7)));
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&spec.config).unwrap(),
            serde_json::json!({"n_layer": 2})
        );
        let spec = model_spec(&job(&["train.activation_checkpointing=2"]), None);
        let config: serde_json::Value = serde_json::from_str(&spec.config).unwrap();
        assert_eq!(config, serde_json::json!({"activation_checkpointing": 2}));
    }
}
