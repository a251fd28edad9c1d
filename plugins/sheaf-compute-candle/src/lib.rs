//! Sheaf plugin: compute on candle-core. Builds the models a job describes, a folder
//! per kind (`mlp`, `gpt`: each its graph model on candle's autograd, any device, and
//! its fused CPU path in `fused`), on the CPU kernels kept apart in `cpu`.
//!
//! Parameters are initialised on the host from the seed, exactly as PyTorch's
//! `nn.Linear` does (uniform in +-1/sqrt(fan_in)), so every device and every rank
//! starts from the same numbers. The loss is the mean cross-entropy of the batch.
//! `cuda:N` needs the `cuda` feature; without it the error says so.

mod cpu;
mod gpt;
mod kind;
mod mlp;

use candle_core::{Device, Tensor, Var, D};
use serde::Deserialize;
use sheaf_core::{
    ComputeBackend, Error, HfLayout, Model, ModelInfo, ModelSpec, ParamLayout, ParamShard, Piece,
    PieceLayout, PluginKind, Provided, Result,
};

pub use gpt::fused::{FusedGpt, FusedPiece};
pub use gpt::{Gpt, GptSpec};
pub use mlp::fused::FusedMlp;
pub use mlp::{init_params, init_piece, Activation, LayerCut, Mlp, MlpSpec, Stage};

/// The plugin as exported to the host.
pub struct CandlePlugin;

impl sheaf_abi::Plugin for CandlePlugin {
    const NAME: &'static str = "sheaf-compute-candle";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn provides() -> Vec<Provided> {
        let mut provided = vec![Provided { kind: PluginKind::Compute, name: "candle".into() }];
        provided
            .extend(model_kinds().into_iter().map(|k| Provided { kind: PluginKind::Model, name: k.into() }));
        provided
    }

    fn compute(name: &str, config: &str) -> Result<Box<dyn ComputeBackend>> {
        if name != "candle" {
            return Err(Error::config(
                "compute.backend",
                format!("unknown backend `{name}` (this plugin has candle)"),
            ));
        }
        let config: CandleConfig = if config.trim().is_empty() {
            CandleConfig::default()
        } else {
            serde_json::from_str(config).map_err(|e| Error::config("compute", e))?
        };
        Ok(Box::new(CandleBackend::new(&config.device)?))
    }
}

sheaf_abi::export_plugin!(CandlePlugin);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CandleConfig {
    device: String,
}

impl Default for CandleConfig {
    fn default() -> Self {
        CandleConfig { device: "cpu".into() }
    }
}

fn candle_err(what: &str) -> impl Fn(candle_core::Error) -> Error + '_ {
    move |e| Error::Other(format!("candle: {what}: {e}"))
}

/// A compute backend on one candle device.
pub struct CandleBackend {
    name: String,
    device: Device,
}

impl CandleBackend {
    /// `"cpu"` or `"cuda:N"`.
    pub fn new(device: &str) -> Result<CandleBackend> {
        let dev = match device {
            "cpu" => Device::Cpu,
            d if d.starts_with("cuda") => cuda_device(d)?,
            other => {
                return Err(Error::config(
                    "compute.device",
                    format!("unknown device `{other}` (cpu, cuda:N)"),
                ))
            }
        };
        Ok(CandleBackend { name: device.to_owned(), device: dev })
    }
}

fn cuda_ordinal(d: &str) -> Result<usize> {
    match d {
        "cuda" => Ok(0),
        _ => d
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| Error::config("compute.device", format!("`{d}` is not cuda:N"))),
    }
}

#[cfg(feature = "cuda")]
fn cuda_device(d: &str) -> Result<Device> {
    Device::new_cuda(cuda_ordinal(d)?).map_err(candle_err("opening the CUDA device"))
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(d: &str) -> Result<Device> {
    cuda_ordinal(d)?;
    Err(Error::config(
        "compute.device",
        format!("`{d}` asked for, but sheaf-compute-candle was built without CUDA support (rebuild with --features cuda)"),
    ))
}

impl ComputeBackend for CandleBackend {
    fn device(&self) -> &str {
        &self.name
    }

    fn model_kinds(&self) -> Vec<String> {
        model_kinds().into_iter().map(String::from).collect()
    }

    fn describe(&self, spec: &ModelSpec) -> Result<ModelInfo> {
        kind::of(spec)?.describe(spec)
    }

    fn piece_layout(&self, spec: &ModelSpec, piece: &Piece) -> Result<PieceLayout> {
        kind::of(spec)?.piece_layout(spec, piece)
    }

    fn hf_layout(&self, spec: &ModelSpec) -> Result<HfLayout> {
        kind::of(spec)?;
        let hf = kind::HF.iter().find(|k| k.kind() == spec.kind).ok_or_else(|| {
            Error::Unsupported(format!("`{}` models have no Hugging Face transformers layout", spec.kind))
        })?;
        hf.layout(spec)
    }

    fn hf_model(&self, config_json: &str) -> Result<ModelSpec> {
        let config: serde_json::Value = serde_json::from_str(config_json)
            .map_err(|e| Error::config("config.json", format!("not JSON: {e}")))?;
        match kind::HF.iter().find(|k| k.describes(&config)) {
            Some(hf) => hf.model(&config),
            None => Err(Error::config(
                "config.json",
                format!(
                    "architecture {} (model_type {}): sheaf-compute-candle reads {}",
                    config["architectures"],
                    config["model_type"],
                    kind::HF.iter().map(|k| k.architecture()).collect::<Vec<_>>().join(", ")
                ),
            )),
        }
    }

    fn build_model(&self, spec: &ModelSpec, seed: u64) -> Result<Box<dyn Model>> {
        kind::of(spec)?.build_model(spec, seed, &self.device)
    }

    fn build_piece(&self, spec: &ModelSpec, piece: &Piece, seed: u64) -> Result<Box<dyn Model>> {
        kind::of(spec)?.build_piece(spec, piece, seed, &self.device)
    }

    fn build_shard(&self, spec: &ModelSpec, shard: ParamShard, seed: u64) -> Result<Box<dyn Model>> {
        let kind = kind::of(spec)?;
        if !self.device.is_cpu() {
            return Err(Error::Unsupported(format!(
                "ZeRO stage 3 runs the CPU's fused models; `{}` models on {} have no row shards",
                spec.kind,
                self.device()
            )));
        }
        kind.build_shard(spec, shard, seed)
    }

    fn build_piece_shard(
        &self,
        spec: &ModelSpec,
        piece: &Piece,
        shard: ParamShard,
        seed: u64,
    ) -> Result<Box<dyn Model>> {
        let kind = kind::of(spec)?;
        if !self.device.is_cpu() {
            return Err(Error::Unsupported(format!(
                "ZeRO stage 3 inside a pipeline stage runs the CPU's fused pieces; `{}` models on {} have \
                 none",
                spec.kind,
                self.device()
            )));
        }
        kind.build_piece_shard(spec, piece, shard, seed)
    }
}

/// The model kinds this plugin builds.
pub fn model_kinds() -> Vec<&'static str> {
    kind::KINDS.iter().map(|k| k.name()).collect()
}

/// A kind's settings from their JSON text; an unknown key or a wrong type is an error
/// naming the key.
pub(crate) fn parse_config<T: serde::de::DeserializeOwned>(kind: &str, json: &str) -> Result<T> {
    let json = if json.trim().is_empty() { "{}" } else { json };
    let mut de = serde_json::Deserializer::from_str(json);
    T::deserialize(&mut de).map_err(|e| Error::config("model", format!("{kind}: {e}")))
}

/// Adds each parameter's gradient in `store` to its slots of `grads` (a segment of a
/// piece uses some of its parameters only: the others are left as they are).
pub(crate) fn add_var_grads(
    layout: &ParamLayout,
    vars: &[Var],
    store: &candle_core::backprop::GradStore,
    grads: &mut [f32],
) -> candle_core::Result<()> {
    for (i, v) in vars.iter().enumerate() {
        let Some(g) = store.get(v.as_tensor()) else { continue };
        for (acc, d) in grads[layout.range(i)].iter_mut().zip(g.flatten_all()?.to_vec1::<f32>()?) {
            *acc += d;
        }
    }
    Ok(())
}

/// Checks that `given` values match a model of `params` parameters (a read or write
/// of its parameters).
pub(crate) fn check_values(given: usize, params: usize) -> Result<()> {
    if given != params {
        return Err(Error::invalid(format!("{given} values for {params} parameters")));
    }
    Ok(())
}

/// `forward_backward` of a model with a stepped backward pass: its steps run one
/// after the other into the whole of `grads`.
pub(crate) fn whole_backward(
    model: &mut dyn Model,
    batch: &sheaf_core::Batch<'_>,
    grads: &mut [f32],
) -> Result<f32> {
    if grads.len() != model.layout().total() {
        return Err(Error::invalid(format!(
            "{} gradient slots for {} parameters",
            grads.len(),
            model.layout().total()
        )));
    }
    let loss = model.backward_begin(batch)?;
    let mut pending = grads.len();
    while pending > 0 {
        pending = model.backward_next(&mut grads[..pending])?;
    }
    Ok(loss)
}

/// Moves accumulated gradients into `out` and starts again from zero, the
/// accumulator's pages handed back to the kernel as `out`'s are touched, until the
/// next backward pass touches them: the accumulator and the strategy's copy are never
/// both resident.
pub(crate) fn take_accumulated(grads: &mut Vec<f32>, out: &mut [f32]) -> Result<()> {
    if out.len() != grads.len() {
        return Err(Error::invalid(format!("{} gradient slots for {} parameters", out.len(), grads.len())));
    }
    sheaf_train::take_release(grads, out);
    Ok(())
}

/// The end of `loss_grad`: `sum` is the summed loss of the logits `z`; returns it, the
/// correct predictions of `labels`, and the gradient of `scale` times it with respect
/// to the logits (zeros for a zero scale, an evaluation, without a backward pass).
pub(crate) fn loss_sum_correct_grad(
    z: &Var,
    sum: &Tensor,
    labels: &[u32],
    scale: f32,
) -> candle_core::Result<(f64, usize, Vec<f32>)> {
    let n = z.as_tensor().elem_count();
    let grad = if scale == 0.0 {
        vec![0.0; n]
    } else {
        let store = sum.affine(f64::from(scale), 0.0)?.backward()?;
        match store.get(z.as_tensor()) {
            Some(g) => g.flatten_all()?.to_vec1::<f32>()?,
            None => vec![0.0; n],
        }
    };
    let predicted = z.as_tensor().argmax(D::Minus1)?.to_vec1::<u32>()?;
    let correct = predicted.iter().zip(labels).filter(|(p, l)| p == l).count();
    Ok((f64::from(sum.to_scalar::<f32>()?), correct, grad))
}

/// One `Var` per parameter of `layout`, from flat `values`.
pub(crate) fn vars_from(layout: &ParamLayout, values: &[f32], device: &Device) -> Result<Vec<Var>> {
    layout
        .specs()
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let t = Tensor::from_slice(&values[layout.range(i)], s.shape.as_slice(), device)
                .map_err(candle_err("creating a parameter"))?;
            Var::from_tensor(&t).map_err(candle_err("creating a parameter"))
        })
        .collect()
}

pub(crate) fn read_vars(layout: &ParamLayout, vars: &[Var], out: &mut [f32]) -> Result<()> {
    check_values(out.len(), layout.total())?;
    for (i, v) in vars.iter().enumerate() {
        let values =
            v.as_tensor().flatten_all().and_then(|t| t.to_vec1::<f32>()).map_err(candle_err("reading"))?;
        out[layout.range(i)].copy_from_slice(&values);
    }
    Ok(())
}

pub(crate) fn write_vars(layout: &ParamLayout, vars: &[Var], src: &[f32], device: &Device) -> Result<()> {
    check_values(src.len(), layout.total())?;
    for (i, v) in vars.iter().enumerate() {
        let shape = layout.specs()[i].shape.as_slice();
        let t = Tensor::from_slice(&src[layout.range(i)], shape, device).map_err(candle_err("writing"))?;
        v.set(&t).map_err(candle_err("writing"))?;
    }
    Ok(())
}

/// Log-probabilities of `logits` and the one-hot matrix of `labels`.
pub(crate) fn log_softmax_one_hot(
    logits: &Tensor,
    labels: &[u32],
    classes: usize,
    device: &Device,
) -> candle_core::Result<(Tensor, Tensor)> {
    let max = logits.max_keepdim(D::Minus1)?;
    let shifted = logits.broadcast_sub(&max)?;
    let log_probs = shifted.broadcast_sub(&shifted.exp()?.sum_keepdim(D::Minus1)?.log()?)?;
    let mut one_hot = vec![0f32; labels.len() * classes];
    for (i, &l) in labels.iter().enumerate() {
        one_hot[i * classes + l as usize] = 1.0;
    }
    Ok((log_probs, Tensor::from_vec(one_hot, (labels.len(), classes), device)?))
}

#[cfg(test)]
mod tests;
