//! Job files: TOML, with `--set key=value` overrides (the value is TOML too), checked
//! against a typed model in which every table denies unknown keys.

use std::path::Path;

use serde::{Deserialize, Serialize};

use sheaf_plugins::HostError;

/// The built-in default job (`examples/digits.toml`).
pub const DEFAULT_JOB: &str = include_str!("../../../examples/digits.toml");

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Job {
    #[serde(default)]
    pub seed: u64,
    pub model: ModelSection,
    pub data: DataSection,
    pub train: TrainSection,
    pub parallel: ParallelSection,
    #[serde(default)]
    pub transport: TransportSection,
    #[serde(default)]
    pub compute: ComputeSection,
    #[serde(default)]
    pub collectives: CollectivesSection,
    #[serde(default, skip_serializing_if = "OutputsSection::is_default")]
    pub outputs: OutputsSection,
    /// Which library supplies a component that more than one provides:
    /// `[plugins.<kind>] <name> = "<plugin name or file name>"`.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub plugins: std::collections::BTreeMap<String, std::collections::BTreeMap<String, String>>,
}

/// `[outputs]`: what a run writes besides its summary, metrics and checkpoints.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OutputsSection {
    /// TensorBoard event files under `RUN_DIR/tensorboard/`: the run's scalars (loss,
    /// val_loss, lr, grad_norm, tokens/s or samples/s, step time), and each rank's step
    /// time under `tensorboard/rank-N/`.
    #[serde(default)]
    pub tensorboard: bool,
}

impl OutputsSection {
    fn is_default(&self) -> bool {
        *self == OutputsSection::default()
    }
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CollectivesSection {
    /// `auto` (by message size), `ring`, `halving-doubling` or `direct`.
    #[serde(default)]
    pub algorithm: Option<String>,
}

impl CollectivesSection {
    pub fn algorithm(&self) -> Result<sheaf_collectives::Algorithm, String> {
        self.algorithm.as_deref().unwrap_or("auto").parse()
    }
}

/// `[model]`: a kind and the kind's own keys, which the host does not interpret: the
/// compute plugin that provides the kind validates them (naming any unknown key).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct ModelSection {
    #[serde(default = "mlp")]
    pub kind: String,
    #[serde(flatten)]
    pub settings: toml::Table,
}

fn mlp() -> String {
    "mlp".into()
}

impl ModelSection {
    /// The kind's keys as the compute plugin takes them (JSON).
    pub fn config_json(&self) -> String {
        serde_json::to_value(&self.settings).map(|v| v.to_string()).unwrap_or_else(|_| "{}".into())
    }

    /// Fills the section from a model `source` describes (a transformers
    /// `config.json`): its `kind` and its settings (a JSON object), each key the job
    /// leaves out; a key the job sets to another value is an error naming it.
    pub fn fill(&mut self, kind: &str, settings: &str, source: &str) -> Result<(), HostError> {
        let mismatch = |key: &str, ours: String, theirs: String| {
            HostError::Usage(format!("key `model.{key}`: {ours} in the job, but {source} says {theirs}"))
        };
        if self.kind != kind {
            return Err(mismatch("kind", format!("{:?}", self.kind), format!("{kind:?}")));
        }
        let settings: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(settings).map_err(|e| {
                HostError::Data(format!("model settings from {source} are not a JSON object: {e}"))
            })?;
        for (key, value) in settings {
            let theirs: toml::Value = serde_json::from_value(value.clone())
                .map_err(|e| HostError::Data(format!("model setting `{key}` from {source}: {e}")))?;
            match self.settings.get(&key) {
                None => {
                    self.settings.insert(key, theirs);
                }
                Some(ours) if *ours == theirs => {}
                Some(ours) => return Err(mismatch(&key, ours.to_string(), value.to_string())),
            }
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    pub dataset: String,
    /// For an IDX images file: its labels file (default: by MNIST's naming).
    #[serde(default)]
    pub labels: Option<String>,
    /// The fraction held out for test or validation (default 0.2 of rows, the last 0.1
    /// of a token file).
    #[serde(default)]
    pub test_fraction: Option<f64>,
    /// Samples of the synthetic set.
    #[serde(default = "synthetic_samples")]
    pub samples: usize,
    #[serde(default = "contiguous")]
    pub partitioner: String,
    /// The data partitioner's settings, passed to it as a JSON object.
    #[serde(default, skip_serializing_if = "toml::Table::is_empty")]
    pub partitioner_options: toml::Table,
}

impl DataSection {
    /// The data partitioner's settings as JSON (`{}` when none).
    pub fn partitioner_config(&self) -> String {
        table_json(&self.partitioner_options)
    }
}

/// A TOML table as a JSON object.
fn table_json(table: &toml::Table) -> String {
    serde_json::to_string(table).unwrap_or_else(|_| "{}".into())
}

fn synthetic_samples() -> usize {
    8192
}
fn contiguous() -> String {
    "contiguous".into()
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    pub epochs: u64,
    pub batch_size: usize,
    pub lr: f64,
    #[serde(default = "sgd")]
    pub optimizer: String,
    /// Optimizer steps at most.
    #[serde(default)]
    pub max_steps: Option<u64>,
    /// `constant` or `cosine` (to `min_lr` at the last step), after `warmup_steps` of
    /// linear warmup.
    #[serde(default = "constant")]
    pub lr_schedule: String,
    #[serde(default)]
    pub warmup_steps: u64,
    /// Where a cosine schedule ends (default: lr / 10).
    #[serde(default)]
    pub min_lr: Option<f64>,
    /// Clip the gradient to this global norm (the whole model's, across shards).
    #[serde(default)]
    pub grad_clip: Option<f64>,
    /// Micro-steps of `batch_size` per optimizer step.
    #[serde(default = "one")]
    pub grad_accum: usize,
    /// Evaluate on the validation split every this many steps (into metrics.jsonl).
    #[serde(default)]
    pub eval_every: Option<u64>,
    /// Write a checkpoint to resume from every this many optimizer steps and at the
    /// end (`RUN_DIR/checkpoints/step-N/`; `--resume RUN_DIR` continues from the
    /// newest). Unset: only the final parameters (`checkpoint.safetensors`).
    #[serde(default)]
    pub checkpoint_every: Option<u64>,
    /// Checkpoints kept, the newest.
    #[serde(default = "two")]
    pub keep_checkpoints: usize,
    /// Write each checkpoint on a thread while training goes on: the step's state is
    /// copied, and the checkpoint exists once every rank's files are synced (committed
    /// at a later step boundary).
    #[serde(default)]
    pub checkpoint_async: bool,
    /// Activation recomputation: `"none"`, `"blocks"` (every block keeps only its
    /// input in the forward pass and runs its forward again in the backward pass), or
    /// `N` (every N-th block does). Passed to the compute plugin with the model's
    /// settings; a model kind that cannot recompute refuses it.
    #[serde(default)]
    pub activation_checkpointing: Checkpointing,
    /// Settings of each optimizer, by name (`[train.options.sgd]`); only the chosen
    /// optimizer's table is used, so `--set train.optimizer=...` switches cleanly. Its
    /// plugin rejects keys it does not know.
    #[serde(default)]
    pub options: std::collections::BTreeMap<String, toml::Table>,
}

/// `train.activation_checkpointing`: a name (`"none"`, `"blocks"`) or every how many
/// blocks.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
pub enum Checkpointing {
    Named(String),
    Every(u64),
}

impl Default for Checkpointing {
    fn default() -> Self {
        Checkpointing::Named("none".into())
    }
}

impl Checkpointing {
    /// Every how many blocks one recomputes (`None`: none).
    pub fn every(&self) -> Result<Option<u64>, String> {
        match self {
            Checkpointing::Named(n) if n == "none" => Ok(None),
            Checkpointing::Named(n) if n == "blocks" => Ok(Some(1)),
            Checkpointing::Every(n) if *n >= 1 => Ok(Some(*n)),
            other => Err(format!(
                "key `train.activation_checkpointing`: {other:?} (\"none\", \"blocks\", or every N-th block with N >= 1)"
            )),
        }
    }
}

fn sgd() -> String {
    "sgd".into()
}
fn constant() -> String {
    "constant".into()
}
fn one() -> usize {
    1
}
fn two() -> usize {
    2
}

impl TrainSection {
    /// The run-level settings every strategy honours.
    pub fn config(&self, seed: u64) -> sheaf_core::TrainConfig {
        sheaf_core::TrainConfig {
            seed,
            epochs: self.epochs,
            batch_size: self.batch_size,
            max_steps: self.max_steps,
            lr: sheaf_core::LrSchedule {
                base: self.lr,
                cosine: self.lr_schedule == "cosine",
                warmup_steps: self.warmup_steps,
                min_lr: self.min_lr.unwrap_or(self.lr / 10.0),
            },
            grad_clip: self.grad_clip,
            grad_accum: self.grad_accum,
            eval_every: self.eval_every.filter(|&e| e > 0),
            start_step: 0,
            // 0 is refused when the job is read.
            checkpoint_every: self.checkpoint_every,
        }
    }

    /// The chosen optimizer's settings as its plugin takes them: `lr` and the keys of
    /// `[train.options.<optimizer>]`.
    pub fn optimizer_config(&self) -> String {
        let mut m = serde_json::Map::new();
        m.insert("lr".into(), self.lr.into());
        if let Some(table) = self.options.get(&self.optimizer) {
            if let Ok(serde_json::Value::Object(extra)) = serde_json::to_value(table) {
                m.extend(extra);
            }
        }
        serde_json::Value::Object(m).to_string()
    }
}

/// `[parallel]`: which strategy, the keys every strategy may use, and each
/// strategy's own settings under `[parallel.options.<strategy>]`, which the host
/// passes on as JSON and the strategy plugin checks (naming any unknown key).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ParallelSection {
    /// The strategy plugin's name (`sheaf plugins` lists them; the host knows none).
    pub strategy: String,
    /// Data-parallel replicas, for a strategy that replicates its layout (default:
    /// the strategy's own).
    #[serde(default)]
    pub data: Option<usize>,
    /// The model partitioner a strategy cuts blocks with.
    #[serde(default = "balanced")]
    pub partitioner: String,
    /// The model partitioner's settings, passed to it as a JSON object.
    #[serde(default, skip_serializing_if = "toml::Table::is_empty")]
    pub partitioner_options: toml::Table,
    /// What blocks weigh when they are cut: `params` (parameter count) or `time`
    /// (each block's measured forward and backward time, `layer_costs`).
    #[serde(default = "params")]
    pub balance: String,
    /// Each block's cost for `balance = "time"` (filled in by `sheaf launch`).
    #[serde(default)]
    pub layer_costs: Option<Vec<u64>>,
    /// Settings of each strategy, by name; only the chosen strategy's are used.
    #[serde(default)]
    pub options: std::collections::BTreeMap<String, toml::Table>,
}

fn params() -> String {
    "params".into()
}
fn balanced() -> String {
    "balanced".into()
}

impl ParallelSection {
    /// The model partitioner's settings as JSON (`{}` when none).
    pub fn partitioner_config(&self) -> String {
        table_json(&self.partitioner_options)
    }

    /// The chosen strategy's settings as its plugin takes them: `timeout_ms`,
    /// `data` when set, and the keys of `[parallel.options.<strategy>]`.
    pub fn strategy_config(&self, timeout_ms: u64) -> String {
        let mut m = serde_json::Map::new();
        m.insert("timeout_ms".into(), timeout_ms.into());
        if let Some(d) = self.data {
            m.insert("data".into(), d.into());
        }
        if let Some(table) = self.options.get(&self.strategy) {
            if let Ok(serde_json::Value::Object(extra)) = serde_json::to_value(table) {
                m.extend(extra);
            }
        }
        serde_json::Value::Object(m).to_string()
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TransportSection {
    /// The transport plugin, or `auto`. Left out: `auto` when the world spans hosts
    /// ([`TransportSection::resolve`]), else the loaded transport of network reach
    /// that prefers itself most (ZeroMQ's TCP, of the bundled ones).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plugin: Option<String>,
    /// Deadline of every collective and of the rendezvous, in seconds.
    #[serde(default = "timeout_s")]
    pub timeout_s: f64,
    /// A peer silent this long is declared dead.
    #[serde(default = "peer_timeout_s")]
    pub peer_timeout_s: f64,
}

fn timeout_s() -> f64 {
    60.0
}
fn peer_timeout_s() -> f64 {
    15.0
}

impl Default for TransportSection {
    fn default() -> Self {
        TransportSection { plugin: None, timeout_s: timeout_s(), peer_timeout_s: peer_timeout_s() }
    }
}

impl TransportSection {
    /// The transport this job runs over, once [`TransportSection::resolve`] settled
    /// it; `auto` before (each host's and the network's preferred transports).
    pub fn plugin(&self) -> &str {
        self.plugin.as_deref().unwrap_or("auto")
    }

    /// The deadline of every collective and of the rendezvous (`timeout_s`), to the
    /// millisecond.
    pub fn timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis((self.timeout_s * 1000.0) as u64)
    }

    /// Settles a transport the job left out, asking the loaded transports what they
    /// are: `auto` (within each host the preferred transport of host reach, between
    /// hosts of network reach, collectives hierarchical) when the world spans hosts, as
    /// `sheaf launch --nnodes` and other launchers' node counts say; else the preferred
    /// one of network reach.
    pub fn resolve(
        &mut self,
        spans_hosts: bool,
        registry: &sheaf_plugins::Registry,
    ) -> Result<(), HostError> {
        if self.plugin.is_none() {
            self.plugin = Some(match spans_hosts {
                true => "auto".into(),
                false => registry.preferred_transport(sheaf_core::Reach::Network)?,
            });
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ComputeSection {
    /// The compute plugin's backend; `auto` (the default): the one of the library that
    /// provides `model.kind`.
    #[serde(default = "auto")]
    pub backend: String,
    #[serde(default = "cpu")]
    pub device: String,
    /// Per-worker budget for parameters, gradients, optimizer state and activations,
    /// in MiB; a job that needs more fails before training.
    #[serde(default)]
    pub memory_limit_mb: Option<f64>,
}

fn auto() -> String {
    "auto".into()
}
fn cpu() -> String {
    "cpu".into()
}

impl ComputeSection {
    /// The backend that builds `kind`: the one named, or under `auto` the one of the
    /// library providing the kind ([`sheaf_plugins::Registry::compute_for_kind`]).
    pub fn backend_for(&self, kind: &str, registry: &sheaf_plugins::Registry) -> Result<String, HostError> {
        match self.backend.as_str() {
            "auto" => registry.compute_for_kind(kind),
            named => Ok(named.to_string()),
        }
    }

    /// The compute plugin's settings (JSON).
    pub fn config_json(&self) -> String {
        serde_json::json!({ "device": self.device }).to_string()
    }
}

impl Default for ComputeSection {
    fn default() -> Self {
        ComputeSection { backend: auto(), device: cpu(), memory_limit_mb: None }
    }
}

/// Whether `text` is one word of letters, digits and `-_.:/+`, taken as a string when it
/// is not TOML.
fn is_bare_word(text: &str) -> bool {
    !text.is_empty() && text.chars().all(|c| c.is_alphanumeric() || "-_.:/+".contains(c))
}

/// Sets `key` (dotted, e.g. `train.lr`) to `value` (TOML, e.g. `0.1` or `"adamw"`; a bare
/// word that is not TOML, e.g. `adamw`, as a string).
fn apply_override(doc: &mut toml::Table, assignment: &str) -> Result<(), HostError> {
    let (key, value) = assignment
        .split_once('=')
        .ok_or_else(|| HostError::Usage(format!("--set {assignment}: expected key=value")))?;
    let key = key.trim();
    let text = value.trim();
    let value = match format!("v = {text}").parse::<toml::Table>() {
        Ok(parsed) => parsed.get("v").cloned().expect("parsed one key"),
        // A bare word is a string (`--set train.optimizer=adamw`): the job's own check
        // then says what the key takes, naming it, where TOML would only say it is
        // not a boolean.
        Err(_) if is_bare_word(text) => toml::Value::String(text.to_string()),
        Err(e) => {
            return Err(HostError::Usage(format!(
                "--set {key}: `{text}` is not a TOML value: {} (a string with spaces or quotes: --set '{key}=\"...\"')",
                e.message()
            )))
        }
    };
    let parts: Vec<&str> = key.split('.').collect();
    let mut table = doc;
    for part in &parts[..parts.len() - 1] {
        let entry = table.entry(part.to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = entry
            .as_table_mut()
            .ok_or_else(|| HostError::Usage(format!("--set {key}: `{part}` is not a table")))?;
    }
    table.insert(parts[parts.len() - 1].to_string(), value);
    Ok(())
}

/// Reads a job: `source` is TOML text named `origin` in errors; overrides apply in order.
pub fn parse_job(source: &str, origin: &str, overrides: &[String]) -> Result<Job, HostError> {
    let mut doc: toml::Table = source
        .parse()
        .map_err(|e: toml::de::Error| HostError::input(format!("{origin}: malformed TOML"), e))?;
    for o in overrides {
        apply_override(&mut doc, o)?;
    }
    let job: Job = serde_path_to_error::deserialize(doc).map_err(|e| {
        let path = e.path().to_string();
        HostError::Job(format!("{origin}: key `{path}`: {}", e.into_inner().message()))
    })?;
    validate(&job).map_err(|e| HostError::Job(format!("{origin}: {e}")))?;
    Ok(job)
}

fn validate(job: &Job) -> Result<(), String> {
    if job.train.batch_size == 0 {
        return Err("key `train.batch_size`: must be at least 1".into());
    }
    job.train.activation_checkpointing.every()?;
    if job.train.grad_accum == 0 {
        return Err("key `train.grad_accum`: must be at least 1".into());
    }
    if job.train.checkpoint_every == Some(0) {
        return Err("key `train.checkpoint_every`: must be at least 1 (leave it out for none)".into());
    }
    if job.train.keep_checkpoints == 0 {
        return Err("key `train.keep_checkpoints`: must be at least 1".into());
    }
    if !["constant", "cosine"].contains(&job.train.lr_schedule.as_str()) {
        return Err(format!("key `train.lr_schedule`: `{}` (constant, cosine)", job.train.lr_schedule));
    }
    if let Some(c) = job.train.grad_clip.filter(|c| c.is_nan() || *c <= 0.0) {
        return Err(format!("key `train.grad_clip`: {c} is not a positive norm"));
    }
    if let Some(f) = job.data.test_fraction.filter(|f| !(0.0..1.0).contains(f)) {
        return Err(format!("key `data.test_fraction`: {f} is not in [0, 1)"));
    }
    job.collectives.algorithm().map_err(|e| format!("key `collectives.algorithm`: {e}"))?;
    if let Some(kind) = job.plugins.keys().find(|k| sheaf_core::PluginKind::from_name(k).is_none()) {
        return Err(format!(
            "key `plugins.{kind}`: not a kind of plugin ({})",
            sheaf_core::PluginKind::ALL.iter().map(|k| k.name()).collect::<Vec<_>>().join(", ")
        ));
    }
    if !(job.transport.timeout_s > 0.0 && job.transport.peer_timeout_s > 0.0) {
        return Err("key `transport.timeout_s`/`peer_timeout_s`: must be positive".into());
    }
    Ok(())
}

/// Reads a job file, or the default job when `path` is `None`.
pub fn load_job(path: Option<&Path>, overrides: &[String]) -> Result<Job, HostError> {
    match path {
        None => parse_job(DEFAULT_JOB, "default job", overrides),
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .map_err(|e| HostError::input(format!("{}: cannot read job file", p.display()), e))?;
            parse_job(&text, &p.display().to_string(), overrides)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_job_parses() {
        let job = parse_job(DEFAULT_JOB, "default", &[]).unwrap();
        assert_eq!(job.model.kind, "mlp");
        let config: serde_json::Value = serde_json::from_str(&job.model.config_json()).unwrap();
        assert_eq!(config, serde_json::json!({"layers": [64, 128, 10], "activation": "relu"}));
        assert_eq!(job.transport.plugin, None, "settled by the transports loaded (resolve)");
    }

    #[test]
    fn overrides_take_toml_values() {
        let job = parse_job(
            DEFAULT_JOB,
            "default",
            &[
                "train.optimizer=\"adamw\"".into(),
                "train.max_steps = 10".into(),
                "model.layers=[64, 10]".into(),
            ],
        )
        .unwrap();
        assert_eq!((job.train.optimizer.as_str(), job.train.max_steps), ("adamw", Some(10)));
        let config: serde_json::Value = serde_json::from_str(&job.model.config_json()).unwrap();
        assert_eq!(config["layers"], serde_json::json!([64, 10]));
    }

    /// A bare word that is not TOML is a string (`--set train.optimizer=adamw`); a word
    /// given where a number goes is then the job's error naming the key and the type,
    /// not TOML's "invalid boolean"; what is neither says how to quote.
    #[test]
    fn bare_words_are_strings_and_wrong_types_name_the_key() {
        let job = parse_job(DEFAULT_JOB, "d", &["train.optimizer=adamw".into()]).unwrap();
        assert_eq!(job.train.optimizer, "adamw");
        let e = parse_job(DEFAULT_JOB, "j", &["train.lr=fast".into()]).unwrap_err().to_string();
        assert!(e.contains("train.lr") && e.contains("\"fast\"") && !e.contains("boolean"), "{e}");
        let e = parse_job(DEFAULT_JOB, "j", &["train.lr=[1,".into()]).unwrap_err().to_string();
        assert!(
            e.contains("--set train.lr") && e.contains("not a TOML value") && e.contains("quotes"),
            "{e}"
        );
        // TOML's own values keep their types.
        let job = parse_job(DEFAULT_JOB, "d", &["train.lr=1e-3".into(), "train.max_steps=7".into()]).unwrap();
        assert_eq!((job.train.lr, job.train.max_steps), (1e-3, Some(7)));
    }

    #[test]
    fn errors_name_the_key() {
        let e = parse_job(DEFAULT_JOB, "job.toml", &["train.lrr=1".into()]).unwrap_err().to_string();
        assert!(e.contains("lrr") && e.contains("job.toml"), "{e}");
        let e =
            parse_job(DEFAULT_JOB, "job.toml", &["train.epochs=\"many\"".into()]).unwrap_err().to_string();
        assert!(e.contains("train.epochs"), "{e}");
        let e = parse_job("seed = [", "bad.toml", &[]).unwrap_err().to_string();
        assert!(e.contains("bad.toml") && e.contains("malformed"), "{e}");
        let e = parse_job(DEFAULT_JOB, "j", &["train.batch_size=0".into()]).unwrap_err().to_string();
        assert!(e.contains("batch_size"), "{e}");
        let e = parse_job(DEFAULT_JOB, "j", &["nokey".into()]).unwrap_err().to_string();
        assert!(e.contains("key=value"), "{e}");
    }

    #[test]
    fn optimizer_config_is_lr_and_the_chosen_table() {
        let job = parse_job(DEFAULT_JOB, "d", &[]).unwrap();
        let v: serde_json::Value = serde_json::from_str(&job.train.optimizer_config()).unwrap();
        assert_eq!(v, serde_json::json!({"lr": 0.05, "momentum": 0.9}));
        let job = parse_job(DEFAULT_JOB, "d", &["train.optimizer=\"adamw\"".into()]).unwrap();
        let v: serde_json::Value = serde_json::from_str(&job.train.optimizer_config()).unwrap();
        assert_eq!(v, serde_json::json!({"lr": 0.05, "weight_decay": 0.01}));
    }

    /// The smallest job: every key it leaves out takes the default its comment
    /// promises.
    const MINIMAL: &str =
        "[model]\n[data]\ndataset = \"synthetic\"\n[train]\nepochs = 1\nbatch_size = 4\nlr = 0.1\n\
                           [parallel]\nstrategy = \"data-parallel\"\n";

    #[test]
    fn keys_left_out_take_their_documented_defaults() {
        let job = parse_job(MINIMAL, "minimal", &[]).unwrap();
        assert_eq!((job.seed, job.model.kind.as_str()), (0, "mlp"));
        let d = &job.data;
        assert_eq!(
            (d.samples, d.partitioner.as_str(), d.labels.as_deref(), d.test_fraction),
            (8192, "contiguous", None, None)
        );
        let t = &job.train;
        assert_eq!((t.optimizer.as_str(), t.lr_schedule.as_str()), ("sgd", "constant"));
        assert_eq!((t.grad_accum, t.keep_checkpoints, t.warmup_steps), (1, 2, 0));
        assert_eq!((t.max_steps, t.eval_every, t.checkpoint_every, t.grad_clip), (None, None, None, None));
        assert_eq!(t.activation_checkpointing.every(), Ok(None));
        let p = &job.parallel;
        assert_eq!(
            (p.partitioner.as_str(), p.balance.as_str(), p.data, &p.layer_costs),
            ("balanced", "params", None, &None)
        );
        assert_eq!(job.transport, TransportSection::default());
        assert_eq!(
            (job.transport.timeout_s, job.transport.peer_timeout_s, job.transport.plugin()),
            (60.0, 15.0, "auto")
        );
        assert_eq!(job.compute, ComputeSection::default());
        assert_eq!((job.compute.backend.as_str(), job.compute.device.as_str()), ("auto", "cpu"));
        assert_eq!(job.compute.memory_limit_mb, None);
        assert_eq!(job.collectives.algorithm(), Ok(sheaf_collectives::Algorithm::Auto));
        // A job written back (the run directory's job.toml) reads as itself.
        let again = parse_job(&toml::to_string(&job).unwrap(), "again", &[]).unwrap();
        assert_eq!(again, job);
    }

    /// Each check refuses what it names and lets its edge through.
    #[test]
    fn every_check_names_its_key_and_keeps_its_edge() {
        let refused = |set: &str, key: &str| {
            let e = parse_job(MINIMAL, "m.toml", &[set.into()]).unwrap_err();
            assert!(e.to_string().contains(key) && e.to_string().starts_with("m.toml: "), "{set}: {e}");
            assert_eq!(e.exit_code(), sheaf_plugins::exit::USAGE, "{set}");
        };
        let taken =
            |set: &str| parse_job(MINIMAL, "m.toml", &[set.into()]).unwrap_or_else(|e| panic!("{set}: {e}"));
        refused("train.batch_size=0", "train.batch_size");
        taken("train.batch_size=1");
        refused("train.grad_accum=0", "train.grad_accum");
        assert_eq!(taken("train.grad_accum=1").train.grad_accum, 1);
        refused("train.checkpoint_every=0", "train.checkpoint_every");
        assert_eq!(taken("train.checkpoint_every=1").train.checkpoint_every, Some(1));
        refused("train.keep_checkpoints=0", "train.keep_checkpoints");
        taken("train.keep_checkpoints=1");
        refused("train.lr_schedule=linear", "train.lr_schedule");
        taken("train.lr_schedule=cosine");
        refused("train.grad_clip=0.0", "train.grad_clip");
        refused("train.grad_clip=-1.0", "train.grad_clip");
        refused("train.grad_clip=nan", "train.grad_clip");
        taken("train.grad_clip=1e-9");
        refused("data.test_fraction=1.0", "data.test_fraction");
        refused("data.test_fraction=-0.1", "data.test_fraction");
        taken("data.test_fraction=0.0");
        refused("collectives.algorithm=fastest", "collectives.algorithm");
        taken("collectives.algorithm=ring");
        refused("plugins.widget.x=\"y\"", "plugins.widget");
        taken("plugins.optimizer.adamw=\"mine\"");
        refused("transport.timeout_s=0.0", "transport.timeout_s");
        refused("transport.peer_timeout_s=0.0", "peer_timeout_s");
        taken("transport.peer_timeout_s=0.5");
        refused("train.activation_checkpointing=0", "train.activation_checkpointing");
        refused("train.activation_checkpointing=all", "train.activation_checkpointing");
        assert_eq!(
            taken("train.activation_checkpointing=blocks").train.activation_checkpointing.every(),
            Ok(Some(1))
        );
        assert_eq!(
            taken("train.activation_checkpointing=3").train.activation_checkpointing.every(),
            Ok(Some(3))
        );
    }

    /// `--set` makes the tables on its path and refuses to go through a value.
    #[test]
    fn overrides_make_tables_and_refuse_to_pass_through_values() {
        let job = parse_job(MINIMAL, "m", &["parallel.options.mine.micro_batches=4".into()]).unwrap();
        assert_eq!(job.parallel.options["mine"]["micro_batches"].as_integer(), Some(4));
        let e = parse_job(MINIMAL, "m", &["train.lr.x=1".into()]).unwrap_err().to_string();
        assert!(e.contains("--set train.lr.x") && e.contains("`lr` is not a table"), "{e}");
        assert!(is_bare_word("zmq-tcp") && is_bare_word("a/b:c+d.e_f"));
        assert!(!is_bare_word("") && !is_bare_word("two words") && !is_bare_word("q\"uote"));
    }

    /// What each plugin is handed: its own table as JSON, with the keys the host owns.
    #[test]
    fn plugins_get_their_own_tables_as_json() {
        let json = |s: String| serde_json::from_str::<serde_json::Value>(&s).unwrap();
        let job = parse_job(MINIMAL, "m", &[]).unwrap();
        assert_eq!(json(job.parallel.strategy_config(1500)), serde_json::json!({"timeout_ms": 1500}));
        assert_eq!(json(job.parallel.partitioner_config()), serde_json::json!({}));
        assert_eq!(json(job.data.partitioner_config()), serde_json::json!({}));
        assert_eq!(json(job.compute.config_json()), serde_json::json!({"device": "cpu"}));
        let job = parse_job(
            MINIMAL,
            "m",
            &[
                "parallel.data=2".into(),
                "parallel.options.data-parallel.zero=1".into(),
                "parallel.options.pipeline.micro_batches=4".into(),
                "parallel.partitioner_options.slack=1".into(),
                "data.partitioner_options.shuffle=true".into(),
                "compute.device=\"cuda:1\"".into(),
            ],
        )
        .unwrap();
        let strategy = json(job.parallel.strategy_config(7));
        assert_eq!(strategy, serde_json::json!({"timeout_ms": 7, "data": 2, "zero": 1}));
        assert_eq!(json(job.parallel.partitioner_config()), serde_json::json!({"slack": 1}));
        assert_eq!(json(job.data.partitioner_config()), serde_json::json!({"shuffle": true}));
        assert_eq!(json(job.compute.config_json()), serde_json::json!({"device": "cuda:1"}));
    }

    /// The run-level settings every strategy honours, from the job's keys: zero means
    /// never, the cosine floor defaults to a tenth of the rate.
    #[test]
    fn the_train_config_follows_the_keys() {
        let job = parse_job(MINIMAL, "m", &["seed=9".into(), "train.max_steps=5".into()]).unwrap();
        let c = job.train.config(job.seed);
        assert_eq!((c.seed, c.epochs, c.batch_size, c.max_steps, c.grad_accum), (9, 1, 4, Some(5), 1));
        assert_eq!((c.lr.base, c.lr.cosine, c.lr.warmup_steps, c.lr.min_lr), (0.1, false, 0, 0.1 / 10.0));
        assert_eq!((c.eval_every, c.checkpoint_every, c.start_step, c.grad_clip), (None, None, 0, None));
        let sets =
            ["train.lr_schedule=cosine", "train.min_lr=0.001", "train.warmup_steps=3", "train.eval_every=0"];
        let mut sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        sets.extend([
            "train.checkpoint_every=4".into(),
            "train.grad_clip=0.5".into(),
            "train.grad_accum=2".into(),
        ]);
        let c = parse_job(MINIMAL, "m", &sets).unwrap().train.config(0);
        assert_eq!((c.lr.cosine, c.lr.min_lr, c.lr.warmup_steps), (true, 0.001, 3));
        assert_eq!(
            (c.eval_every, c.checkpoint_every, c.grad_clip, c.grad_accum),
            (None, Some(4), Some(0.5), 2)
        );
        let c = parse_job(MINIMAL, "m", &["train.eval_every=2".into()]).unwrap().train.config(0);
        assert_eq!(c.eval_every, Some(2));
    }

    /// The deadline in milliseconds, from the job's seconds.
    #[test]
    fn the_deadline_is_the_jobs_seconds() {
        let ms = |set: &str| parse_job(MINIMAL, "m", &[set.into()]).unwrap().transport.timeout().as_millis();
        assert_eq!((ms("transport.timeout_s=60.0"), ms("transport.timeout_s=0.25")), (60_000, 250));
    }

    /// A job that names no transport is settled by what the loaded transports say;
    /// one that names it keeps it; none loaded is an error, not a silent default.
    #[test]
    fn a_transport_left_out_is_settled_by_the_loaded_ones() {
        let none = sheaf_plugins::Registry::load(&[]);
        let mut t = TransportSection::default();
        assert!(t.resolve(false, &none).is_err());
        assert_eq!(t.plugin, None);
        t.resolve(true, &none).unwrap();
        assert_eq!(t.plugin(), "auto", "across hosts: each host's and the network's own");
        let mut named = TransportSection { plugin: Some("mine".into()), ..TransportSection::default() };
        named.resolve(false, &none).unwrap();
        assert_eq!(named.plugin(), "mine");
    }

    /// The job file's own errors: one that cannot be read is the user's to fix, and
    /// names the file.
    #[test]
    fn a_missing_job_file_is_named() {
        let e = load_job(Some(Path::new("/nonexistent/job.toml")), &[]).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/job.toml: cannot read job file"), "{e}");
        assert_eq!(e.exit_code(), sheaf_plugins::exit::USAGE);
        assert_eq!(load_job(None, &[]).unwrap(), parse_job(DEFAULT_JOB, "x", &[]).unwrap());
    }
}
