//! `sheaf eval`: a trained model's loss on a validation split, as one JSON line. The
//! model and its job come from the run directory ([`Trained`]); the data is the job's
//! dataset, or another one of the same vocabulary (`--data`), split as training split
//! it; the validation windows (or test rows) are evaluated in order, `batch_size` at a
//! time, the first `--batches` batches or all of them.

use std::path::Path;
use std::time::Instant;

use sheaf_core::ModelInput;
use sheaf_plugins::{HostError, Registry};

use crate::trained::Trained;

/// What to evaluate on.
#[derive(Clone, Debug, Default)]
pub struct EvalOptions {
    /// A dataset in place of the job's (`data.dataset`'s values).
    pub data: Option<String>,
    /// Batches of the job's `batch_size` at most; all of the split by default.
    pub batches: Option<usize>,
}

/// The evaluation as JSON: `val_loss`, and for a language model `perplexity`,
/// `tokens` and `tokens_per_sec`; for a classifier `accuracy`, `samples` and
/// `samples_per_sec`.
pub fn eval(
    registry: &Registry,
    checkpoint: &Path,
    opts: &EvalOptions,
) -> Result<serde_json::Value, HostError> {
    let trained = Trained::open(checkpoint)?;
    let mut job = trained.job.clone();
    if let Some(data) = &opts.data {
        job.data.dataset = data.clone();
    }
    let compute = trained.compute(registry)?;
    let data = sheaf_job::data::load(&job, registry, compute.as_ref())?;
    // Ids mean what they meant in training, or the loss means nothing.
    let vocab = trained.vocab()?;
    if vocab != data.vocab {
        let name = |v: &Option<sheaf_job::data::Vocab>| match v {
            Some(sheaf_job::data::Vocab::Chars(c)) => format!("{} characters", c.len()),
            Some(sheaf_job::data::Vocab::Tokenizer(t)) => format!("tokenizer `{}`", t.name()),
            None => "ids without a vocabulary".into(),
        };
        return Err(HostError::Usage(format!(
            "--data {:?}: its tokens are {}, but the model was trained on {}",
            job.data.dataset,
            name(&data.vocab),
            name(&vocab)
        )));
    }
    let mut model = trained.model(compute.as_ref(), &data.spec, &data.info)?;
    let batch = job.train.batch_size.max(1);
    let windows = opts.batches.map_or(data.test.len(), |b| b.saturating_mul(batch)).min(data.test.len());
    if windows == 0 {
        return Err(HostError::Usage(format!(
            "nothing to evaluate: the validation split of {:?} has {} samples{}",
            job.data.dataset,
            data.test.len(),
            if opts.batches == Some(0) { " and --batches is 0" } else { "" }
        )));
    }
    let start = Instant::now();
    let (mut loss, mut correct, mut predictions) = (0f64, 0usize, 0usize);
    let indices: Vec<usize> = (0..windows).collect();
    for part in indices.chunks(batch) {
        let samples = data.test.gather(part)?;
        let batch = samples.batch();
        let (l, c) = model.evaluate(&batch)?;
        loss += l;
        correct += c;
        predictions += batch.predictions();
    }
    let seconds = start.elapsed().as_secs_f64();
    let val_loss = loss / predictions as f64;
    let rate = predictions as f64 / seconds.max(1e-9);
    let number = sheaf_report::outputs::json_number;
    Ok(match data.info.input {
        ModelInput::Tokens { .. } => serde_json::json!({
            "val_loss": number(val_loss),
            "perplexity": number(val_loss.exp()),
            "tokens": predictions,
            "tokens_per_sec": number(rate),
            "batches": indices.chunks(batch).len(),
            "dataset": job.data.dataset,
        }),
        ModelInput::Rows { .. } => serde_json::json!({
            "val_loss": number(val_loss),
            "accuracy": number(correct as f64 / predictions as f64),
            "samples": predictions,
            "samples_per_sec": number(rate),
            "batches": indices.chunks(batch).len(),
            "dataset": job.data.dataset,
        }),
    })
}
