//! What a run leaves in its run directory: `metrics.jsonl` (a line per step),
//! `summary.json`, and `checkpoint.safetensors` with the final parameters under stable
//! names. Files are written to a temporary name and renamed, so a crash never leaves a
//! half-written checkpoint or summary.

use std::collections::HashMap;
use std::io::{LineWriter, Write};
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use serde::Serialize;
use sheaf_core::{MetricsSink, ParamLayout, StepMetrics};

use sheaf_plugins::HostError;

/// Writes `bytes` to `path` atomically (temporary file in the same directory, fsync,
/// rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), HostError> {
    let tmp = path.with_extension(format!("{}.partial", std::process::id()));
    let mut f = std::fs::File::create(&tmp).map_err(|e| HostError::io(&tmp, e))?;
    f.write_all(bytes).and_then(|()| f.sync_all()).map_err(|e| HostError::io(&tmp, e))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(|e| HostError::io(path, e))
}

/// The run-level results.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub world_size: usize,
    pub strategy: String,
    pub transport: String,
    pub device: String,
    /// What the strategy reported (rank 0's), written as its named values: `epochs`,
    /// `steps`, `final_loss`, `test_accuracy`, `test_loss`, `samples_per_sec`,
    /// `wall_seconds`, ...
    #[serde(skip)]
    pub trained: sheaf_core::TrainSummary,
    #[serde(flatten)]
    pub trained_values: std::collections::BTreeMap<String, serde_json::Value>,
    /// For token data: the mean cross-entropy over every token of the validation
    /// split's non-overlapping windows.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f64>,
    /// For token data: tokens trained on per second.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_per_sec: Option<f64>,
    /// Parameters of the whole model.
    pub params: usize,
    /// Parameters each rank holds (all of them under data parallelism).
    pub params_per_rank: Vec<u64>,
    /// Most bytes of activations each rank kept for backward passes at once (measured
    /// by model-parallel strategies; estimated from the batch under data parallelism).
    pub peak_activation_bytes_per_rank: Vec<u64>,
    /// Each rank's peak resident memory as the kernel counts it (`getrusage`), over
    /// the whole run, the final checkpoint included.
    pub peak_rss_bytes_per_rank: Vec<u64>,
    /// Each rank's peak resident memory before its model was built (the process's own
    /// baseline: the runtime, the plugins, the dataset).
    pub baseline_rss_bytes_per_rank: Vec<u64>,
    /// What each rank was planned to hold, by part (`sheaf plan` prints the same), to
    /// compare with the measured peak less the baseline.
    pub planned_bytes_per_rank: Vec<sheaf_job::memory::PlannedBytes>,
    /// Seconds each rank computed and waited during training steps, where the strategy
    /// measures them (pipeline stages); absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub busy_seconds_per_rank: Option<Vec<f64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_seconds_per_rank: Option<Vec<f64>>,
    /// The measured pipeline bubble: waiting over step time, averaged over the ranks
    /// (pipeline only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bubble_fraction: Option<f64>,
    /// Who made the others wait at the world's collectives (`trace.json` has the rest).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stragglers: Option<crate::trace::Stragglers>,
    /// The step of the checkpoint this run resumed from (absent: not resumed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resumed_from_step: Option<u64>,
    /// What ran: Sheaf's version, the git commit it was built from (when built in a
    /// checkout), rank 0's command line, and each rank's host name by rank.
    pub sheaf_version: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub git_commit: Option<String>,
    pub command_line: Vec<String>,
    pub hosts: Vec<String>,
    /// Each time the launcher started the world again after a worker died: when, which
    /// rank, why, and the step it resumed from (`RUN_DIR/restarts.jsonl`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub restarts: Vec<serde_json::Value>,
    /// What `collectives.algorithm = "auto"` runs for the world's allreduce, by size,
    /// as measured on this transport and world size (`RUN_DIR/tuning.json`), and
    /// whether it was measured in this run (and in how many seconds) or read back.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub collectives_tuning: Option<serde_json::Value>,
    /// Each checkpoint this run committed (rank 0's): its step, the seconds the
    /// training loop spent in the checkpoint sink for it (`stall_s`; the optimizer's
    /// copy of its state, taken by the strategy just before, is not in it), the seconds
    /// its files took to write, and the seconds to its commit.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub checkpoint_saves: Vec<serde_json::Value>,
    /// Each component of the run and the library that supplied it (its plugin's
    /// name, file, version and ABI), as rank 0 built them.
    pub components: Vec<sheaf_plugins::ComponentSource>,
    pub job: serde_json::Value,
}

/// A report's named number as JSON: whole numbers (counts) as integers, NaN as null.
pub fn json_number(v: f64) -> serde_json::Value {
    if v.is_finite() && v.fract() == 0.0 && v.abs() < 9e15 {
        (v as i64).into()
    } else {
        v.into()
    }
}

/// The `safetensors` crate's views of named f32 buffers, each checked against its shape.
fn tensor_views<'a>(
    tensors: impl IntoIterator<Item = NamedTensor<'a>>,
) -> Result<Vec<(&'a str, TensorView<'a>)>, HostError> {
    tensors
        .into_iter()
        .map(|(name, shape, values)| {
            TensorView::new(Dtype::F32, shape, bytemuck::cast_slice(values))
                .map(|v| (name, v))
                .map_err(|e| HostError::encode(format!("tensor `{name}`"), e))
        })
        .collect()
}

/// `safetensors` bytes of named f32 buffers (`(name, shape, values)`), with string
/// metadata in the header's `__metadata__`; written by the `safetensors` crate.
pub fn safetensors_of<'a>(
    tensors: impl IntoIterator<Item = NamedTensor<'a>>,
    metadata: Option<HashMap<String, String>>,
) -> Result<Vec<u8>, HostError> {
    let views = tensor_views(tensors)?;
    safetensors::serialize(views, metadata).map_err(|e| HostError::encode("safetensors", e))
}

/// A named f32 tensor to write: its name, shape and values.
pub type NamedTensor<'a> = (&'a str, Vec<usize>, &'a [f32]);

/// Writes named f32 buffers (`(name, shape, values)`), with string metadata in the
/// header's `__metadata__`, to `path` as a safetensors file
/// without building the file in memory: the `safetensors` crate streams each tensor
/// from its buffer into a temporary file beside `path` and renames it; the file is
/// then fsynced. A checkpoint of a model as large as memory allows costs no second
/// copy of it.
pub fn write_safetensors<'a>(
    path: &Path,
    tensors: impl IntoIterator<Item = NamedTensor<'a>>,
    metadata: Option<HashMap<String, String>>,
) -> Result<(), HostError> {
    let views = tensor_views(tensors)?;
    safetensors::serialize_to_file(views, metadata, path)
        .map_err(|e| HostError::encode(format!("{}: safetensors", path.display()), e))?;
    std::fs::File::open(path).and_then(|f| f.sync_all()).map_err(|e| HostError::io(path, e))
}

/// The tensors of a flat parameter buffer, named and shaped by `layout`.
pub fn layout_tensors<'a>(
    layout: &'a ParamLayout,
    params: &'a [f32],
) -> impl Iterator<Item = NamedTensor<'a>> {
    layout
        .specs()
        .iter()
        .enumerate()
        .map(|(i, spec)| (spec.name.as_str(), spec.shape.clone(), &params[layout.range(i)]))
}

/// `safetensors` bytes of a flat parameter buffer: f32 tensors named and shaped by
/// `layout`.
pub fn safetensors_bytes(layout: &ParamLayout, params: &[f32]) -> Result<Vec<u8>, HostError> {
    safetensors_of(layout_tensors(layout, params), None)
}

/// A safetensors file, read whole or memory-mapped, parsed by the `safetensors` crate
/// (which checks the header's length, offsets and shapes against the file before
/// anything is allocated from them).
pub struct TensorFile {
    path: PathBuf,
    bytes: Held,
}

/// A file's bytes: read into memory, or mapped (only the pages touched are read).
enum Held {
    Read(Vec<u8>),
    Mapped(memmap2::Mmap),
}

impl std::ops::Deref for Held {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Held::Read(v) => v,
            Held::Mapped(m) => m,
        }
    }
}

impl TensorFile {
    pub fn read(path: &Path) -> Result<TensorFile, HostError> {
        let bytes = std::fs::read(path)
            .map_err(|e| HostError::input(format!("{}: cannot read", path.display()), e))?;
        TensorFile::from_bytes(path, bytes)
    }

    /// The file memory-mapped: what is read from disk is the header and the pages of
    /// the values asked for. For files no one writes again (a committed checkpoint's).
    pub fn map(path: &Path) -> Result<TensorFile, HostError> {
        let cannot = |e| HostError::input(format!("{}: cannot read", path.display()), e);
        let file = std::fs::File::open(path).map_err(cannot)?;
        // SAFETY: a committed checkpoint's files are written once, synced and renamed
        // into place before the index names them, and never written again; a file
        // truncated under the map by someone else would fault, as reading it would
        // fail. The map is only read.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(cannot)?;
        let file = TensorFile { path: path.to_path_buf(), bytes: Held::Mapped(map) };
        file.parse()?;
        Ok(file)
    }

    /// A file's bytes, read elsewhere from `path`.
    pub fn from_bytes(path: &Path, bytes: Vec<u8>) -> Result<TensorFile, HostError> {
        let file = TensorFile { path: path.to_path_buf(), bytes: Held::Read(bytes) };
        file.parse()?;
        Ok(file)
    }

    fn bad(&self, detail: impl std::fmt::Display) -> HostError {
        HostError::Data(format!("{}: {detail}", self.path.display()))
    }

    fn parse(&self) -> Result<SafeTensors<'_>, HostError> {
        SafeTensors::deserialize(&self.bytes).map_err(|e| self.bad(format!("not a safetensors file: {e}")))
    }

    /// The header's `__metadata__` (empty when it has none).
    pub fn metadata(&self) -> Result<HashMap<String, String>, HostError> {
        let (_, meta) = SafeTensors::read_metadata(&self.bytes)
            .map_err(|e| self.bad(format!("not a safetensors file: {e}")))?;
        Ok(meta.metadata().clone().unwrap_or_default())
    }

    /// Every tensor's name.
    pub fn names(&self) -> Result<Vec<String>, HostError> {
        Ok(self.parse()?.names().into_iter().map(str::to_owned).collect())
    }

    /// Tensor `name`'s values, which must be f32 of `shape` (any shape when `None`).
    pub fn f32s(&self, name: &str, shape: Option<&[usize]>) -> Result<Vec<f32>, HostError> {
        let data = self.f32_bytes(name, shape)?;
        Ok(data.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect())
    }

    /// Tensor `name`'s values as f32, from f32, f16 or bf16 (each widens exactly), of
    /// `shape`: what weights saved in half precision (most Hugging Face checkpoints)
    /// start a run from.
    pub fn widened(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, HostError> {
        let tensors = self.parse()?;
        let t = tensors.tensor(name).map_err(|_| self.bad(format!("no tensor `{name}`")))?;
        if t.shape() != shape {
            return Err(self.bad(format!("`{name}` is {:?} {:?}, {shape:?} needed", t.dtype(), t.shape())));
        }
        let halves =
            |widen: fn([u8; 2]) -> f32| t.data().chunks_exact(2).map(|c| widen([c[0], c[1]])).collect();
        match t.dtype() {
            Dtype::F32 => self.f32s(name, Some(shape)),
            Dtype::F16 => Ok(halves(|b| half::f16::from_le_bytes(b).to_f32())),
            Dtype::BF16 => Ok(halves(|b| half::bf16::from_le_bytes(b).to_f32())),
            other => Err(self.bad(format!("`{name}` is {other:?}: F32, F16 or BF16 needed"))),
        }
    }

    /// Tensor `name`'s values as they lie in the file (little-endian f32), which must
    /// be f32 of `shape` (any shape when `None`): nothing is copied or read beyond the
    /// pages a caller touches.
    pub fn f32_bytes(&self, name: &str, shape: Option<&[usize]>) -> Result<&[u8], HostError> {
        let tensors = self.parse()?;
        let t = tensors.tensor(name).map_err(|_| self.bad(format!("no tensor `{name}`")))?;
        if t.dtype() != Dtype::F32 || shape.is_some_and(|s| s != t.shape()) {
            return Err(self.bad(format!(
                "`{name}` is {:?} {:?}, {} needed",
                t.dtype(),
                t.shape(),
                match shape {
                    Some(s) => format!("F32 {s:?}"),
                    None => "F32".into(),
                }
            )));
        }
        Ok(t.data())
    }

    /// The parameters `layout` names, as one flat buffer in its order, each tensor
    /// checked for its shape.
    pub fn params(&self, layout: &ParamLayout) -> Result<Vec<f32>, HostError> {
        let mut out = vec![0f32; layout.total()];
        for (i, spec) in layout.specs().iter().enumerate() {
            out[layout.range(i)].copy_from_slice(&self.f32s(&spec.name, Some(&spec.shape))?);
        }
        Ok(out)
    }
}

/// Reads a checkpoint written by [`safetensors_bytes`] (or any safetensors file of f32
/// tensors) into a flat buffer in `layout` order, checking that every tensor is there
/// with its shape.
pub fn read_safetensors(path: &Path, layout: &ParamLayout) -> Result<Vec<f32>, HostError> {
    TensorFile::read(path)?.params(layout)
}

/// Metrics of every step as JSON lines (each written through as it ends, so a killed
/// run's file ends on a whole line), and a progress display on stderr: an `indicatif`
/// bar over the run's steps (step, epoch, loss, rate, ETA; redrawn at most 4 times a
/// second) when stderr is a terminal (or the launcher's is), a plain line per epoch
/// otherwise.
pub struct Metrics {
    file: Option<(PathBuf, LineWriter<std::fs::File>)>,
    /// Print per-epoch lines (rank 0 only).
    show: bool,
    progress: bool,
    bar: Option<indicatif::ProgressBar>,
    epochs: u64,
    total_steps: u64,
    /// A language model's tokens per sample: its rate is printed in tokens/s.
    tokens_per_sample: Option<usize>,
    last_epoch: Option<u64>,
    losses: Vec<f64>,
    /// Without a bar: when the last line was printed, and how often to print one
    /// between epochs' lines (`SHEAF_PROGRESS_EVERY_S`, [`PROGRESS_EVERY`] by default).
    last_line: std::time::Instant,
    every: std::time::Duration,
    /// TensorBoard: the run's scalars (rank 0), and this rank's step time with when
    /// and at which step it last recorded.
    tensorboard: Option<crate::tensorboard::EventWriter>,
    rank_board: Option<(crate::tensorboard::EventWriter, std::time::Instant, u64)>,
    pub error: Option<HostError>,
}

/// Without a terminal, a progress line at least this often.
const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

impl Metrics {
    /// `show`: print per-epoch progress at all (rank 0); `progress`: as a bar.
    /// `resumed_at`: a run resumed after this many steps keeps the file's lines up to
    /// that step (dropping those of steps it will take again) and appends.
    pub fn new(
        path: Option<&Path>,
        show: bool,
        progress: bool,
        epochs: u64,
        total_steps: u64,
        resumed_at: Option<u64>,
    ) -> Result<Metrics, HostError> {
        let file = match path {
            Some(p) => {
                let mut open = std::fs::OpenOptions::new();
                match resumed_at {
                    Some(step) => {
                        keep_lines_up_to(p, step)?;
                        open.append(true).create(true)
                    }
                    None => open.write(true).create(true).truncate(true),
                };
                Some((p.to_path_buf(), LineWriter::new(open.open(p).map_err(|e| HostError::io(p, e))?)))
            }
            None => None,
        };
        let progress = show && progress;
        // Drawn on stderr even when it is a pipe: under `sheaf launch`, rank 0's stderr
        // goes to the launcher's terminal as it comes.
        let bar = progress.then(|| {
            let target =
                indicatif::ProgressDrawTarget::term_like_with_hz(Box::new(console::Term::stderr()), 4);
            let bar = indicatif::ProgressBar::with_draw_target(Some(total_steps), target);
            let style = indicatif::ProgressStyle::with_template(
                "epoch {prefix} [{bar:30}] step {pos}/{len}  loss {msg}  ETA {eta}",
            )
            .expect("a valid template")
            .progress_chars("#>-");
            bar.set_style(style);
            bar.set_position(resumed_at.unwrap_or(0));
            bar
        });
        Ok(Metrics {
            file,
            show,
            progress,
            bar,
            epochs,
            total_steps,
            tokens_per_sample: None,
            last_epoch: None,
            losses: vec![],
            last_line: std::time::Instant::now(),
            every: std::env::var("SHEAF_PROGRESS_EVERY_S")
                .ok()
                .and_then(|v| v.parse::<f64>().ok())
                .filter(|s| s.is_finite() && *s >= 0.0)
                .map_or(PROGRESS_EVERY, std::time::Duration::from_secs_f64),
            tensorboard: None,
            rank_board: None,
            error: None,
        })
    }

    /// Rates in tokens/s, for a language model of `tokens` per sample.
    pub fn with_tokens_per_sample(mut self, tokens: Option<usize>) -> Metrics {
        self.tokens_per_sample = tokens;
        self
    }

    /// TensorBoard event files: the run's scalars in `run` (rank 0's), this rank's
    /// step time (wall seconds between the steps it records) in `rank`.
    pub fn with_tensorboard(mut self, run: Option<&Path>, rank: Option<&Path>) -> Result<Metrics, HostError> {
        self.tensorboard = run.map(crate::tensorboard::EventWriter::create).transpose()?;
        self.rank_board = match rank {
            Some(dir) => Some((crate::tensorboard::EventWriter::create(dir)?, std::time::Instant::now(), 0)),
            None => None,
        };
        Ok(self)
    }

    fn board(&mut self, m: &StepMetrics) -> Result<(), HostError> {
        if let Some(tb) = &mut self.tensorboard {
            let (rate, per_sample) = match self.tokens_per_sample {
                Some(t) => ("tokens_per_sec", t as f64),
                None => ("samples_per_sec", 1.0),
            };
            tb.scalars(
                m.step,
                &[
                    ("loss", m.loss),
                    ("val_loss", m.val_loss.unwrap_or(f64::NAN)),
                    ("lr", m.lr),
                    ("grad_norm", m.grad_norm),
                    (rate, m.samples_per_sec * per_sample),
                ],
            )?;
            tb.flush()?;
        }
        if let Some((tb, last, last_step)) = &mut self.rank_board {
            let steps = m.step.saturating_sub(*last_step).max(1);
            tb.scalars(m.step, &[("step_time_s", last.elapsed().as_secs_f64() / steps as f64)])?;
            tb.flush()?;
            (*last, *last_step) = (std::time::Instant::now(), m.step);
        }
        Ok(())
    }

    /// The rate of `samples_per_sec`, as this run's kind measures it.
    fn rate(&self, samples_per_sec: f64) -> String {
        match self.tokens_per_sample {
            Some(t) => format!("{:.0} tokens/s", samples_per_sec * t as f64),
            None => format!("{samples_per_sec:.0} samples/s"),
        }
    }

    fn end_epoch(&mut self, epoch: u64) {
        let mean = self.losses.iter().sum::<f64>() / self.losses.len().max(1) as f64;
        if self.progress {
            // The bar carries on across epochs.
        } else if self.show {
            eprintln!(
                "epoch {}/{}: mean loss {mean:.4} over {} steps",
                epoch + 1,
                self.epochs,
                self.losses.len()
            );
            self.last_line = std::time::Instant::now();
        }
        self.losses.clear();
    }

    pub fn finish(&mut self) -> Result<(), HostError> {
        if let Some(bar) = self.bar.take() {
            bar.finish();
        }
        if let Some(e) = self.last_epoch {
            self.end_epoch(e);
            self.last_epoch = None;
        }
        if let Some((p, f)) = &mut self.file {
            f.flush().map_err(|e| HostError::io(p, e))?;
        }
        match self.error.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// Rewrites `metrics.jsonl` (atomically) with only its whole lines of steps up to
/// `step`: what a run resumed from that step's checkpoint keeps.
fn keep_lines_up_to(path: &Path, step: u64) -> Result<(), HostError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(HostError::io(path, e)),
    };
    let kept: String = text
        .split_inclusive('\n')
        .filter(|line| line.ends_with('\n'))
        .filter(|line| {
            serde_json::from_str::<serde_json::Value>(line)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s <= step)
        })
        .collect();
    write_atomic(path, kept.as_bytes())
}

impl MetricsSink for Metrics {
    fn record(&mut self, m: &StepMetrics) {
        if let Some((path, f)) = &mut self.file {
            let mut line = serde_json::json!({
                "step": m.step, "epoch": m.epoch, "loss": m.loss, "lr": m.lr, "samples_per_sec": m.samples_per_sec,
            });
            if m.grad_norm.is_finite() {
                line["grad_norm"] = m.grad_norm.into();
            }
            if let Some(v) = m.val_loss {
                line["val_loss"] = v.into();
            }
            if let Err(e) = writeln!(f, "{line}") {
                self.error.get_or_insert(HostError::io(path, e));
            }
        }
        if let Err(e) = self.board(m) {
            self.error.get_or_insert(e);
        }
        if let Some(prev) = self.last_epoch.filter(|&e| e != m.epoch) {
            self.end_epoch(prev);
        }
        self.last_epoch = Some(m.epoch);
        self.losses.push(m.loss);
        if let (Some(v), true) = (m.val_loss, self.show) {
            let line = format!("step {}: loss {:.4}, val_loss {v:.4}", m.step, m.loss);
            match &self.bar {
                Some(bar) => bar.println(line),
                None => eprintln!("{line}"),
            }
        }
        if self.show && self.bar.is_none() && self.last_line.elapsed() >= self.every {
            // Without a terminal nothing else is printed between epochs' lines.
            eprintln!(
                "step {}/{} (epoch {}/{}): loss {:.4}, {}",
                m.step,
                self.total_steps,
                m.epoch + 1,
                self.epochs,
                m.loss,
                self.rate(m.samples_per_sec)
            );
            self.last_line = std::time::Instant::now();
        }
        if let Some(bar) = &self.bar {
            bar.set_prefix(format!("{}/{}", m.epoch + 1, self.epochs));
            bar.set_message(format!("{:.4}  {}", m.loss, self.rate(m.samples_per_sec)));
            bar.set_position(m.step);
        }
    }
}

/// A run's last line, from the `summary.json` in `run_dir`, in the measures of its
/// kind: a language model's validation loss and tokens/s, a classifier's test accuracy
/// and samples/s (the same words `sheaf run` and `sheaf launch` print).
pub fn outcome(run_dir: &std::path::Path) -> String {
    let summary = std::fs::read_to_string(run_dir.join("summary.json")).unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(&summary).unwrap_or_default();
    let num = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    let steps = v["steps"].as_u64().unwrap_or(0);
    let (score, rate) = match v["val_loss"].is_number() {
        true => {
            (format!("val_loss {:.4}", num("val_loss")), format!("{:.0} tokens/s", num("tokens_per_sec")))
        }
        false => (
            format!("test accuracy {:.4}", num("test_accuracy")),
            format!("{:.0} samples/s", num("samples_per_sec")),
        ),
    };
    format!(
        "{score}, final loss {:.4}, {rate} over {steps} steps; outputs in {}",
        num("final_loss"),
        run_dir.display()
    )
}

/// A progress bar over bytes on stderr (`sheaf prepare`): drawn at most 4 times a
/// second when stderr is a terminal, hidden otherwise.
pub struct ByteProgress {
    bar: indicatif::ProgressBar,
}

impl ByteProgress {
    pub fn new(total: u64, what: &str) -> ByteProgress {
        let bar = indicatif::ProgressBar::with_draw_target(
            Some(total),
            indicatif::ProgressDrawTarget::stderr_with_hz(4),
        );
        let style = indicatif::ProgressStyle::with_template(
            "{prefix} [{bar:30}] {bytes}/{total_bytes}  {bytes_per_sec}  ETA {eta}",
        )
        .expect("a valid template")
        .progress_chars("#>-");
        bar.set_style(style);
        bar.set_prefix(what.to_owned());
        ByteProgress { bar }
    }

    pub fn set(&self, done: u64) {
        self.bar.set_position(done);
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Half-precision tensors widen to exactly their f32 values; a wrong shape or an
    /// integer tensor is an error naming the tensor.
    #[test]
    fn half_precision_tensors_widen_exactly() {
        let values = [1.5f32, -0.0078125, 65504.0, 3.0e-5];
        let f16: Vec<u8> = values.iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect();
        let bf16: Vec<u8> = values.iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect();
        let ints = [7u8; 8];
        let views = vec![
            ("h", TensorView::new(Dtype::F16, vec![2, 2], &f16).unwrap()),
            ("b", TensorView::new(Dtype::BF16, vec![4], &bf16).unwrap()),
            ("i", TensorView::new(Dtype::I32, vec![2], &ints).unwrap()),
        ];
        let bytes = safetensors::serialize(views, None).unwrap();
        let file = TensorFile::from_bytes(Path::new("w.safetensors"), bytes).unwrap();
        let want = |round: fn(f32) -> f32| values.iter().map(|&v| round(v)).collect::<Vec<f32>>();
        assert_eq!(file.widened("h", &[2, 2]).unwrap(), want(|v| half::f16::from_f32(v).to_f32()));
        assert_eq!(file.widened("b", &[4]).unwrap(), want(|v| half::bf16::from_f32(v).to_f32()));
        assert_eq!(file.widened("h", &[2, 2]).unwrap()[..2], [1.5, -0.0078125]);
        let e = file.widened("h", &[4]).unwrap_err().to_string();
        assert!(e.contains("`h`") && e.contains("[4] needed"), "{e}");
        let e = file.widened("i", &[2]).unwrap_err().to_string();
        assert!(e.contains("`i` is I32") && e.contains("F16 or BF16"), "{e}");
    }
}
