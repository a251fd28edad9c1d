//! A trained model from its run directory, for `sheaf sample` and `sheaf eval`: the
//! checkpoint (a run directory stands for its `checkpoint.safetensors`), the job from
//! `summary.json` beside it, the vocabulary from `vocab.json`, and the model rebuilt
//! by the job's compute plugin (on the CPU) with the checkpoint's parameters.

use std::path::{Path, PathBuf};

use sheaf_core::{ComputeBackend, Model, ModelInfo, ModelSpec};
use sheaf_job::data::Vocab;
use sheaf_job::job::Job;
use sheaf_plugins::{HostError, Registry};
use sheaf_report::outputs::read_safetensors;

pub(crate) fn data_err(path: &Path, detail: impl std::fmt::Display) -> HostError {
    HostError::Data(format!("{}: {detail}", path.display()))
}

/// `job`'s compute backend (the one building its kind, or the one it names), on the
/// CPU: what reads a trained model back, whatever device trained it.
pub(crate) fn cpu_compute(job: &Job, registry: &Registry) -> Result<Box<dyn ComputeBackend>, HostError> {
    let backend = job.compute.backend_for(&job.model.kind, registry)?;
    registry.compute(&backend, &serde_json::json!({ "device": "cpu" }).to_string())
}

/// A run's checkpoint and what was read beside it.
pub struct Trained {
    pub checkpoint: PathBuf,
    pub dir: PathBuf,
    pub job: Job,
}

impl Trained {
    /// The checkpoint at `path` (a file, or a run directory) and its run's job.
    pub fn open(path: &Path) -> Result<Trained, HostError> {
        let checkpoint = if path.is_dir() { path.join("checkpoint.safetensors") } else { path.to_path_buf() };
        let dir = checkpoint.parent().unwrap_or(Path::new(".")).to_path_buf();
        let summary_path = dir.join("summary.json");
        let summary = std::fs::read_to_string(&summary_path)
            .map_err(|e| data_err(&summary_path, format!("cannot read the run's summary (its job): {e}")))?;
        let summary: serde_json::Value =
            serde_json::from_str(&summary).map_err(|e| data_err(&summary_path, e))?;
        let job: Job = serde_json::from_value(summary["job"].clone())
            .map_err(|e| data_err(&summary_path, format!("its job does not parse: {e}")))?;
        Ok(Trained { checkpoint, dir, job })
    }

    /// The vocabulary of `vocab.json`, if the run wrote one (text runs do).
    pub fn vocab(&self) -> Result<Option<Vocab>, HostError> {
        let path = self.dir.join("vocab.json");
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(data_err(&path, format!("cannot read the vocabulary: {e}"))),
        };
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| data_err(&path, e))?;
        Vocab::from_json(&v).map(Some).map_err(|e| data_err(&path, e))
    }

    /// The job's compute backend, on the CPU.
    pub fn compute(&self, registry: &Registry) -> Result<Box<dyn ComputeBackend>, HostError> {
        cpu_compute(&self.job, registry)
    }

    /// The model of `spec` with the checkpoint's parameters.
    pub fn model(
        &self,
        compute: &dyn ComputeBackend,
        spec: &ModelSpec,
        info: &ModelInfo,
    ) -> Result<Box<dyn Model>, HostError> {
        let mut model = compute.build_model(spec, self.job.seed)?;
        model.write_params(&read_safetensors(&self.checkpoint, &info.layout)?)?;
        Ok(model)
    }
}
