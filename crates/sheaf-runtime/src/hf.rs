//! Hugging Face transformers checkpoints in and out: `sheaf export CHECKPOINT --format
//! hf --out DIR` writes `config.json` and `model.safetensors` as transformers'
//! `save_pretrained` does, and `--init-from DIR` starts a run from such a directory.
//! The compute plugin that builds the model kind says how its parameters are named
//! and laid out there ([`ComputeBackend::hf_layout`], [`ComputeBackend::hf_model`]);
//! the host moves the tensors and fills the job's `[model]` from `config.json`.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;

use sheaf_core::{ComputeBackend, HfLayout, ModelSpec, ParamLayout};
use sheaf_job::job::Job;
use sheaf_plugins::{HostError, Registry};
use sheaf_report::outputs::{read_safetensors, write_atomic, write_safetensors, TensorFile};

use crate::trained::Trained;

/// Whether `path` is a transformers directory (a `config.json` in it).
pub fn is_hf_dir(path: &Path) -> bool {
    path.is_dir() && path.join("config.json").is_file()
}

fn layout_of(
    compute: &dyn ComputeBackend,
    spec: &ModelSpec,
    layout: &ParamLayout,
) -> Result<HfLayout, HostError> {
    let hf = compute.hf_layout(spec)?;
    if hf.tensors.len() != layout.specs().len() {
        return Err(HostError::Data(format!(
            "the compute plugin's Hugging Face layout of `{}` names {} tensors for {} parameters",
            spec.kind,
            hf.tensors.len(),
            layout.specs().len()
        )));
    }
    Ok(hf)
}

fn transpose(values: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; values.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = values[r * cols + c];
        }
    }
    out
}

/// Writes the run's checkpoint at `checkpoint` to `out` in transformers' layout;
/// returns what was written, as JSON.
pub fn export(registry: &Registry, checkpoint: &Path, out: &Path) -> Result<serde_json::Value, HostError> {
    let trained = Trained::open(checkpoint)?;
    let vocab = trained.vocab()?;
    let spec = sheaf_job::data::model_spec(&trained.job, vocab.as_ref().map(|v| v.size()));
    let compute = trained.compute(registry)?;
    let info = sheaf_job::data::describe(&trained.job, &spec, registry, compute.as_ref())?;
    let hf = layout_of(compute.as_ref(), &spec, &info.layout)?;
    let params = read_safetensors(&trained.checkpoint, &info.layout)?;
    // Tensors stored as they are borrow the checkpoint's buffer; only transposed ones
    // are copied.
    let mut owned: Vec<(String, Vec<usize>, Cow<'_, [f32]>)> = Vec::new();
    for (i, (p, t)) in info.layout.specs().iter().zip(&hf.tensors).enumerate() {
        let values = &params[info.layout.range(i)];
        let (shape, values) = match (t.transposed, p.shape.as_slice()) {
            (true, &[rows, cols]) => (vec![cols, rows], Cow::Owned(transpose(values, rows, cols))),
            (true, shape) => {
                return Err(HostError::Data(format!(
                    "Hugging Face layout: `{}` of shape {shape:?} is to be stored transposed, but is not a matrix",
                    p.name
                )))
            }
            (false, _) => (p.shape.clone(), Cow::Borrowed(values)),
        };
        owned.push((t.name.clone(), shape, values));
    }
    std::fs::create_dir_all(out).map_err(|e| HostError::io(out, e))?;
    // transformers reads only files whose metadata says the tensors are PyTorch's.
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let file = out.join("model.safetensors");
    write_safetensors(&file, owned.iter().map(|(n, s, v)| (n.as_str(), s.clone(), &v[..])), Some(metadata))?;
    write_atomic(&out.join("config.json"), (hf.config.clone() + "\n").as_bytes())?;
    // A tokenizer's run: its files too, so transformers' AutoTokenizer opens the
    // directory as well.
    let mut tokenizer = None;
    if let Some(sheaf_job::data::Vocab::Tokenizer(t)) = &vocab {
        for (name, text) in t.hf_files().map_err(|e| HostError::Data(e.to_string()))? {
            write_atomic(&out.join(name), text.as_bytes())?;
        }
        tokenizer = Some(t.name());
    }
    Ok(serde_json::json!({
        "out": out.display().to_string(),
        "format": "hf",
        "tensors": owned.len(),
        "parameters": info.layout.total(),
        "tokenizer": tokenizer,
        "config": serde_json::from_str::<serde_json::Value>(&hf.config).unwrap_or_default(),
    }))
}

/// Fills `job`'s `[model]` from the transformers `config.json` in `dir`: the kind and
/// every key the job leaves out; a key the job sets otherwise is an error naming it.
pub fn fill_model(job: &mut Job, dir: &Path, registry: &Registry) -> Result<(), HostError> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| HostError::io(&path, e))?;
    // The library that reads config.json: the one providing the job's kind, or the
    // backend the job names.
    let compute = crate::trained::cpu_compute(job, registry)?;
    let spec = compute
        .hf_model(&text)
        .map_err(|e| HostError::Usage(format!("--init-from {}: {e}", dir.display())))?;
    job.model.fill(&spec.kind, &spec.config, &path.display().to_string())
}

/// The whole model's parameters (in `layout`) from the transformers directory `dir`:
/// each tensor under its name there (or an alias), shaped as the layout says (or
/// transposed where it is stored so), in f32, f16 or bf16 (widened); a missing or
/// misshapen tensor is an error naming it.
pub fn read_params(
    dir: &Path,
    compute: &dyn ComputeBackend,
    spec: &ModelSpec,
    layout: &ParamLayout,
) -> Result<Vec<f32>, HostError> {
    let hf = layout_of(compute, spec, layout)?;
    let path = dir.join("model.safetensors");
    let file = TensorFile::map(&path)?;
    let names: std::collections::HashSet<String> = file.names()?.into_iter().collect();
    let mut out = Vec::with_capacity(layout.total());
    for (p, t) in layout.specs().iter().zip(&hf.tensors) {
        let name =
            std::iter::once(&t.name).chain(&t.aliases).find(|n| names.contains(*n)).ok_or_else(|| {
                HostError::Data(format!(
                    "{}: no tensor `{}`{} (the model's `{}`)",
                    path.display(),
                    t.name,
                    if t.aliases.is_empty() { String::new() } else { format!(" nor {:?}", t.aliases) },
                    p.name
                ))
            })?;
        match (t.transposed, p.shape.as_slice()) {
            (true, &[rows, cols]) => {
                let stored = file.widened(name, &[cols, rows])?;
                out.extend(transpose(&stored, cols, rows));
            }
            _ => out.extend(file.widened(name, &p.shape)?),
        }
    }
    Ok(out)
}

/// `--init-from`: a transformers directory or a Sheaf checkpoint, as the whole
/// model's parameters.
pub fn init_params(
    path: &Path,
    compute: &dyn ComputeBackend,
    spec: &ModelSpec,
    layout: &ParamLayout,
) -> Result<Vec<f32>, HostError> {
    match is_hf_dir(path) {
        true => read_params(path, compute, spec, layout),
        false => read_safetensors(path, layout),
    }
}
