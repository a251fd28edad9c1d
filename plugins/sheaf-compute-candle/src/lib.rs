//! Sheaf plugin: compute on candle-core. Builds the MLPs a job describes and runs
//! forward and backward with candle's autograd (`Var` + `backward`, measured faster
//! here than candle-nn's layers for these sizes).
//!
//! Parameters are initialised on the host from the seed, exactly as PyTorch's
//! `nn.Linear` does (uniform in +-1/sqrt(fan_in)), so every device and every rank
//! starts from the same numbers. The loss is the mean cross-entropy of the batch.
//! `cuda:N` needs the `cuda` feature; without it the error says so.

use candle_core::{DType, Device, Tensor, Var, D};
use serde::Deserialize;
use sheaf_core::{
    Activation, Batch, ComputeBackend, Error, Model, ModelSpec, ParamLayout, PluginKind, Provided, Result,
    SplitMix64,
};

/// The plugin as exported to the host.
pub struct CandlePlugin;

impl sheaf_abi::Plugin for CandlePlugin {
    const NAME: &'static str = "sheaf-compute-candle";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn provides() -> Vec<Provided> {
        vec![Provided { kind: PluginKind::Compute, name: "candle".into() }]
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

    fn build_model(&self, spec: &ModelSpec, seed: u64) -> Result<Box<dyn Model>> {
        spec.validate()?;
        Ok(Box::new(Mlp::new(spec, seed, self.device.clone())?))
    }
}

/// PyTorch's `nn.Linear` initialisation, drawn from a seeded SplitMix64: every
/// parameter uniform in `[-1/sqrt(fan_in), 1/sqrt(fan_in))`.
pub fn init_params(spec: &ModelSpec, seed: u64) -> Vec<f32> {
    let layout = spec.layout();
    let mut out = vec![0f32; layout.total()];
    let mut rng = SplitMix64::new(seed ^ 0x1F2E_3D4C_5B6A_7988);
    for (i, s) in layout.specs().iter().enumerate() {
        let fan_in = spec.layers[i / 2];
        let bound = 1.0 / (fan_in as f32).sqrt();
        for v in &mut out[layout.range(i)] {
            *v = rng.next_f32() * bound;
        }
        debug_assert_eq!(s.numel(), layout.range(i).len());
    }
    out
}

/// A multilayer perceptron held as candle `Var`s: `[w0, b0, w1, b1, ...]`.
pub struct Mlp {
    spec: ModelSpec,
    layout: ParamLayout,
    vars: Vec<Var>,
    device: Device,
}

impl Mlp {
    pub fn new(spec: &ModelSpec, seed: u64, device: Device) -> Result<Mlp> {
        let layout = spec.layout();
        let init = init_params(spec, seed);
        let vars = layout
            .specs()
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let t = Tensor::from_slice(&init[layout.range(i)], s.shape.as_slice(), &device)
                    .map_err(candle_err("creating a parameter"))?;
                Var::from_tensor(&t).map_err(candle_err("creating a parameter"))
            })
            .collect::<Result<_>>()?;
        Ok(Mlp { spec: spec.clone(), layout, vars, device })
    }

    fn check_batch(&self, batch: &Batch<'_>) -> Result<()> {
        let d = self.spec.layers[0];
        if batch.input_dim != d || batch.inputs.len() != batch.len() * d {
            return Err(Error::invalid(format!(
                "batch of {} samples with {} inputs each ({} values) does not fit a model with {d} inputs",
                batch.len(),
                batch.input_dim,
                batch.inputs.len()
            )));
        }
        let classes = *self.spec.layers.last().expect("validated");
        if let Some(&bad) = batch.labels.iter().find(|&&l| l as usize >= classes) {
            return Err(Error::invalid(format!("label {bad} but the model has {classes} classes")));
        }
        Ok(())
    }

    /// Logits and log-probabilities of a batch, and the one-hot labels.
    fn forward(&self, batch: &Batch<'_>) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let n = batch.len();
        let x = Tensor::from_slice(batch.inputs, (n, batch.input_dim), &self.device)?;
        let layers = self.vars.len() / 2;
        let mut h = x;
        for l in 0..layers {
            let (w, b) = (self.vars[2 * l].as_tensor(), self.vars[2 * l + 1].as_tensor());
            h = h.matmul(&w.t()?)?.broadcast_add(b)?;
            if l + 1 < layers {
                h = match self.spec.activation {
                    Activation::Tanh => h.tanh()?,
                    _ => h.relu()?,
                };
            }
        }
        let max = h.max_keepdim(D::Minus1)?;
        let shifted = h.broadcast_sub(&max)?;
        let log_probs = shifted.broadcast_sub(&shifted.exp()?.sum_keepdim(D::Minus1)?.log()?)?;
        let classes = *self.spec.layers.last().expect("validated");
        let mut one_hot = vec![0f32; n * classes];
        for (i, &l) in batch.labels.iter().enumerate() {
            one_hot[i * classes + l as usize] = 1.0;
        }
        let one_hot = Tensor::from_vec(one_hot, (n, classes), &self.device)?;
        Ok((h, log_probs, one_hot))
    }
}

impl Model for Mlp {
    fn layout(&self) -> &ParamLayout {
        &self.layout
    }

    fn read_params(&self, out: &mut [f32]) -> Result<()> {
        if out.len() != self.layout.total() {
            return Err(Error::invalid(format!(
                "{} values for {} parameters",
                out.len(),
                self.layout.total()
            )));
        }
        for (i, v) in self.vars.iter().enumerate() {
            let values = v
                .as_tensor()
                .flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(candle_err("reading"))?;
            out[self.layout.range(i)].copy_from_slice(&values);
        }
        Ok(())
    }

    fn write_params(&mut self, src: &[f32]) -> Result<()> {
        if src.len() != self.layout.total() {
            return Err(Error::invalid(format!(
                "{} values for {} parameters",
                src.len(),
                self.layout.total()
            )));
        }
        for (i, v) in self.vars.iter().enumerate() {
            let shape = self.layout.specs()[i].shape.as_slice();
            let t = Tensor::from_slice(&src[self.layout.range(i)], shape, &self.device)
                .map_err(candle_err("writing"))?;
            v.set(&t).map_err(candle_err("writing"))?;
        }
        Ok(())
    }

    fn forward_backward(&mut self, batch: &Batch<'_>, grads: &mut [f32]) -> Result<f32> {
        self.check_batch(batch)?;
        if grads.len() != self.layout.total() {
            return Err(Error::invalid(format!(
                "{} gradient slots for {} parameters",
                grads.len(),
                self.layout.total()
            )));
        }
        if batch.is_empty() {
            grads.fill(0.0);
            return Ok(0.0);
        }
        let n = batch.len() as f64;
        let mut step = || -> candle_core::Result<f32> {
            let (_, log_probs, one_hot) = self.forward(batch)?;
            let loss = (log_probs * one_hot)?.sum_all()?.affine(-1.0 / n, 0.0)?;
            let store = loss.backward()?;
            for (i, v) in self.vars.iter().enumerate() {
                let g = store.get(v.as_tensor()).expect("every parameter takes part in the loss");
                grads[self.layout.range(i)].copy_from_slice(&g.flatten_all()?.to_vec1::<f32>()?);
            }
            loss.to_dtype(DType::F32)?.to_scalar::<f32>()
        };
        step().map_err(candle_err("forward/backward"))
    }

    fn evaluate(&mut self, batch: &Batch<'_>) -> Result<(f64, usize)> {
        self.check_batch(batch)?;
        if batch.is_empty() {
            return Ok((0.0, 0));
        }
        let eval = || -> candle_core::Result<(f64, usize)> {
            let (logits, log_probs, one_hot) = self.forward(batch)?;
            let loss = (log_probs * one_hot)?.sum_all()?.to_scalar::<f32>()?;
            let predicted = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
            let correct = predicted.iter().zip(batch.labels).filter(|(p, l)| p == l).count();
            Ok((-f64::from(loss), correct))
        };
        eval().map_err(candle_err("evaluate"))
    }
}

#[cfg(test)]
mod tests;
