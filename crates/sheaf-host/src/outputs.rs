//! What a run leaves in its run directory: `metrics.jsonl` (a line per step),
//! `summary.json`, and `checkpoint.safetensors` with the final parameters under stable
//! names. Files are written to a temporary name and renamed, so a crash never leaves a
//! half-written checkpoint or summary.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;
use sheaf_core::{MetricsSink, ParamLayout, StepMetrics};

use crate::HostError;

fn io_err(path: &Path, e: std::io::Error) -> HostError {
    HostError::Output(format!("{}: {e}", path.display()))
}

/// Writes `bytes` to `path` atomically (temporary file in the same directory, fsync,
/// rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), HostError> {
    let tmp = path.with_extension(format!("{}.partial", std::process::id()));
    let mut f = std::fs::File::create(&tmp).map_err(|e| io_err(&tmp, e))?;
    f.write_all(bytes).and_then(|()| f.sync_all()).map_err(|e| io_err(&tmp, e))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(|e| io_err(path, e))
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
    /// Seconds each rank computed and waited during training steps (pipeline stages).
    pub busy_seconds_per_rank: Vec<f64>,
    pub idle_seconds_per_rank: Vec<f64>,
    /// The measured pipeline bubble: waiting over step time, averaged over the ranks
    /// (pipeline only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bubble_fraction: Option<f64>,
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

/// `safetensors` bytes of a flat parameter buffer: little-endian f32 tensors named by
/// `layout`, in layout order.
pub fn safetensors_bytes(layout: &ParamLayout, params: &[f32]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    for (i, spec) in layout.specs().iter().enumerate() {
        let r = layout.range(i);
        header.insert(
            spec.name.clone(),
            serde_json::json!({"dtype": "F32", "shape": spec.shape, "data_offsets": [r.start * 4, r.end * 4]}),
        );
    }
    let mut json = serde_json::Value::Object(header).to_string().into_bytes();
    while !json.len().is_multiple_of(8) {
        json.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + json.len() + params.len() * 4);
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    for v in params {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// Reads a checkpoint written by [`safetensors_bytes`] (or any safetensors file of f32
/// tensors) into a flat buffer in `layout` order, checking that every tensor is there
/// with its shape.
pub fn read_safetensors(path: &Path, layout: &ParamLayout) -> Result<Vec<f32>, HostError> {
    let bad = |detail: String| HostError::Data(format!("{}: {detail}", path.display()));
    let bytes = std::fs::read(path).map_err(|e| bad(format!("cannot read: {e}")))?;
    let n = bytes.get(..8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize);
    let header = n
        .and_then(|n| bytes.get(8..8usize.checked_add(n)?))
        .ok_or_else(|| bad("not a safetensors file (truncated header)".into()))?;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(header).map_err(|e| bad(format!("not a safetensors file: {e}")))?;
    let data = &bytes[8 + n.expect("checked")..];
    let mut out = vec![0f32; layout.total()];
    for (i, spec) in layout.specs().iter().enumerate() {
        let t = header.get(&spec.name).ok_or_else(|| bad(format!("no tensor `{}`", spec.name)))?;
        let shape: Vec<usize> = serde_json::from_value(t["shape"].clone()).unwrap_or_default();
        if t["dtype"] != "F32" || shape != spec.shape {
            return Err(bad(format!(
                "`{}` is {} {:?}, the model needs F32 {:?}",
                spec.name, t["dtype"], shape, spec.shape
            )));
        }
        let offs: Vec<usize> = serde_json::from_value(t["data_offsets"].clone()).unwrap_or_default();
        let raw = match offs[..] {
            [a, b] if b >= a && b - a == spec.numel() * 4 => data.get(a..b),
            _ => None,
        }
        .ok_or_else(|| bad(format!("`{}` has bad data offsets", spec.name)))?;
        for (v, c) in out[layout.range(i)].iter_mut().zip(raw.chunks_exact(4)) {
            *v = f32::from_le_bytes(c.try_into().expect("4 bytes"));
        }
    }
    Ok(out)
}

/// Metrics of every step as JSON lines, and a progress display on stderr: a bar per
/// epoch when stderr is a terminal, a plain line per epoch otherwise.
pub struct Metrics {
    file: Option<(PathBuf, BufWriter<std::fs::File>)>,
    /// Print per-epoch lines (rank 0 only).
    show: bool,
    progress: bool,
    steps_per_epoch: u64,
    epochs: u64,
    last_epoch: Option<u64>,
    losses: Vec<f64>,
    pub error: Option<HostError>,
}

impl Metrics {
    /// `show`: print per-epoch progress at all (rank 0); `progress`: as a bar.
    pub fn new(
        path: Option<&Path>,
        show: bool,
        progress: bool,
        steps_per_epoch: u64,
        epochs: u64,
    ) -> Result<Metrics, HostError> {
        let file = match path {
            Some(p) => {
                Some((p.to_path_buf(), BufWriter::new(std::fs::File::create(p).map_err(|e| io_err(p, e))?)))
            }
            None => None,
        };
        let progress = show && progress;
        Ok(Metrics {
            file,
            show,
            progress,
            steps_per_epoch,
            epochs,
            last_epoch: None,
            losses: vec![],
            error: None,
        })
    }

    fn end_epoch(&mut self, epoch: u64) {
        let mean = self.losses.iter().sum::<f64>() / self.losses.len().max(1) as f64;
        if self.progress {
            eprintln!();
        } else if self.show {
            eprintln!(
                "epoch {}/{}: mean loss {mean:.4} over {} steps",
                epoch + 1,
                self.epochs,
                self.losses.len()
            );
        }
        self.losses.clear();
    }

    pub fn finish(&mut self) -> Result<(), HostError> {
        if let Some(e) = self.last_epoch {
            self.end_epoch(e);
            self.last_epoch = None;
        }
        if let Some((p, f)) = &mut self.file {
            f.flush().map_err(|e| io_err(p, e))?;
        }
        match self.error.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
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
                self.error.get_or_insert(io_err(path, e));
            }
        }
        if let Some(prev) = self.last_epoch.filter(|&e| e != m.epoch) {
            self.end_epoch(prev);
        }
        self.last_epoch = Some(m.epoch);
        self.losses.push(m.loss);
        if let (Some(v), true) = (m.val_loss, self.show) {
            if self.progress {
                eprintln!();
            }
            eprintln!("step {}: loss {:.4}, val_loss {v:.4}", m.step, m.loss);
        }
        if self.progress {
            let done = self.losses.len() as u64;
            let width = 30;
            let filled = (done * width / self.steps_per_epoch.max(1)).min(width) as usize;
            eprint!(
                "\repoch {:>3}/{} [{}{}] {done}/{} loss {:.4} {:.0} samples/s",
                m.epoch + 1,
                self.epochs,
                "#".repeat(filled),
                "-".repeat(width as usize - filled),
                self.steps_per_epoch,
                m.loss,
                m.samples_per_sec
            );
        }
    }
}
