//! `sheaf sample`: text from a trained language model. The checkpoint's run directory
//! holds the job (`summary.json`) and the vocabulary (`vocab.json`: characters, or
//! the tokenizer the dataset's `meta.json` named, which encodes the prompt and decodes
//! the text); the model is
//! rebuilt by the job's compute plugin, loaded from the checkpoint, and asked for the
//! next token's logits one token at a time.

use std::path::Path;

use sheaf_core::{Batch, SplitMix64};

use sheaf_plugins::{HostError, Registry};

use crate::trained::{data_err, Trained};

/// How to sample.
#[derive(Clone, Debug)]
pub struct SampleOptions {
    pub prompt: String,
    pub tokens: usize,
    /// 0: always the likeliest token.
    pub temperature: f64,
    pub top_k: Option<usize>,
    pub seed: u64,
}

/// The prompt followed by `opts.tokens` generated tokens, as text.
pub fn sample(registry: &Registry, checkpoint: &Path, opts: &SampleOptions) -> Result<String, HostError> {
    let trained = Trained::open(checkpoint)?;
    let job = &trained.job;
    let Some(vocab) = trained.vocab()? else {
        // No vocabulary: a classifier's run says so, rather than that a file is missing.
        let compute = registry.compute(&job.compute.backend_for(&job.model.kind, registry)?, "")?;
        let spec = sheaf_job::data::model_spec(job, None);
        if let Ok(sheaf_core::ModelInput::Rows { .. }) =
            sheaf_job::data::describe(job, &spec, registry, compute.as_ref()).map(|i| i.input)
        {
            return Err(HostError::Usage(format!(
                "{}: this run trained a classifier (model kind `{}` on `{}`), which has no text to \
                 sample; `sheaf sample` continues text with a language model (model.kind = \"gpt\" \
                 on a text dataset: examples/shakespeare-gpt.toml)",
                trained.checkpoint.display(),
                job.model.kind,
                job.data.dataset
            )));
        }
        return Err(data_err(&trained.dir.join("vocab.json"), "cannot read the vocabulary: no such file"));
    };
    let spec = sheaf_job::data::model_spec(job, Some(vocab.size()));
    let compute = trained.compute(registry)?;
    let info = sheaf_job::data::describe(job, &spec, registry, compute.as_ref())?;
    let mut model = trained.model(compute.as_ref(), &spec, &info)?;

    let mut ids = vocab.encode(&opts.prompt).map_err(|e| HostError::Usage(format!("--prompt: {e}")))?;
    if ids.is_empty() {
        return Err(HostError::Usage("--prompt: give at least one token's worth of text".into()));
    }
    let block_size = match info.input {
        sheaf_core::ModelInput::Tokens { block_size, .. } => block_size,
        sheaf_core::ModelInput::Rows { .. } => {
            return Err(HostError::Usage(format!("model kind `{}` is not a language model", spec.kind)))
        }
    };
    let mut rng = SplitMix64::new(opts.seed);
    for _ in 0..opts.tokens {
        let context = &ids[ids.len().saturating_sub(block_size)..];
        let logits = model.predict(&Batch::Tokens { windows: context, window: context.len() })?;
        ids.push(pick(&logits, opts, &mut rng) as u32);
    }
    // A model whose vocab_size is rounded up may pick an id no text has.
    if let Some(&bad) = ids.iter().find(|&&i| i as usize >= vocab.size()) {
        return Err(HostError::Data(format!(
            "the model sampled token id {bad}, which its vocabulary ({} ids) has no text for: train it longer, or lower --temperature",
            vocab.size()
        )));
    }
    vocab.decode(&ids).map_err(|e| data_err(&trained.dir.join("vocab.json"), e))
}

/// A token from `logits`: the likeliest at temperature 0, else drawn from the softmax
/// of `logits / temperature` over the `top_k` likeliest.
fn pick(logits: &[f32], opts: &SampleOptions, rng: &mut SplitMix64) -> usize {
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    if opts.temperature <= 0.0 {
        return order[0];
    }
    order.truncate(opts.top_k.unwrap_or(logits.len()).clamp(1, logits.len()));
    let max = f64::from(logits[order[0]]);
    let weights: Vec<f64> =
        order.iter().map(|&i| ((f64::from(logits[i]) - max) / opts.temperature).exp()).collect();
    let total: f64 = weights.iter().sum();
    let mut u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * total;
    for (&i, w) in order.iter().zip(&weights) {
        if u < *w {
            return i;
        }
        u -= w;
    }
    order[order.len() - 1]
}
