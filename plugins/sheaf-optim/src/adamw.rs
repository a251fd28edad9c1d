//! AdamW (decoupled weight decay), as `torch.optim.AdamW` defines it.

use std::collections::BTreeMap;

use serde::Deserialize;
use sheaf_core::{Error, OptimState, Optimizer, Param, Result};

use crate::{check_finite, compute_threads, update_pieces, validate, with_state, Piece};

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> AdamWConfig {
        AdamWConfig { lr: 0.001, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 }
    }
}

/// With `t` the step number from 1: `p *= 1 - lr * wd`; `m = b1 m + (1 - b1) g`;
/// `v = b2 v + (1 - b2) g^2`; `p -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)`.
pub struct AdamW {
    config: AdamWConfig,
    step: u64,
    /// Per parameter: (exp_avg, exp_avg_sq).
    moments: BTreeMap<String, (Vec<f32>, Vec<f32>)>,
    /// Threads a large step is shared among.
    threads: usize,
}

const M: &str = ".exp_avg";
const V: &str = ".exp_avg_sq";

impl AdamW {
    pub fn new(config: AdamWConfig) -> Result<AdamW> {
        check_finite("lr", config.lr)?;
        check_finite("eps", config.eps)?;
        check_finite("weight_decay", config.weight_decay)?;
        for (key, b) in [("beta1", config.beta1), ("beta2", config.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return Err(Error::config(key, format!("must be in [0, 1), got {b}")));
            }
        }
        Ok(AdamW { config, step: 0, moments: BTreeMap::new(), threads: compute_threads() })
    }

    /// Shares large steps among `threads` threads (by default the worker's compute
    /// threads, `RAYON_NUM_THREADS`); the result is the same for any number.
    pub fn with_threads(mut self, threads: usize) -> AdamW {
        self.threads = threads.max(1);
        self
    }
}

impl Optimizer for AdamW {
    fn step(&mut self, params: &mut [Param<'_>]) -> Result<()> {
        validate(params, |name| self.moments.get(name).map(|(m, _)| m.len()))?;
        let t = self.step + 1;
        let c = &self.config;
        let (lr, b1, b2, eps) = (c.lr as f32, c.beta1 as f32, c.beta2 as f32, c.eps as f32);
        let decay = 1.0 - lr * c.weight_decay as f32;
        let bc1 = 1.0 - b1.powi(t as i32);
        let bc2 = 1.0 - b2.powi(t as i32);
        let pieces: Vec<Piece<'_>> = with_state(params, &mut self.moments, |n| (vec![0.0; n], vec![0.0; n]))?
            .into_iter()
            .map(|p| Piece {
                value: p.value,
                grad: p.grad,
                state: [&mut p.state.0, &mut p.state.1],
                fresh: false,
            })
            .collect();
        update_pieces(pieces, self.threads, |Piece { value, grad, state: [m, v], .. }| {
            for (((w, &g), m), v) in value.iter_mut().zip(grad).zip(m.iter_mut()).zip(v.iter_mut()) {
                *w *= decay;
                *m = b1 * *m + (1.0 - b1) * g;
                *v = b2 * *v + (1.0 - b2) * g * g;
                *w -= lr * (*m / bc1) / ((*v / bc2).sqrt() + eps);
            }
        });
        self.step = t;
        Ok(())
    }

    fn learning_rate(&self) -> f64 {
        self.config.lr
    }

    fn set_learning_rate(&mut self, lr: f64) {
        self.config.lr = lr;
    }

    fn state(&self) -> Result<OptimState> {
        let buffers = self
            .moments
            .iter()
            .flat_map(|(n, (m, v))| [(format!("{n}{M}"), m.clone()), (format!("{n}{V}"), v.clone())])
            .collect();
        Ok(OptimState { step: self.step, buffers })
    }

    fn state_views(&self) -> Result<Option<sheaf_core::StateViews<'_>>> {
        let buffers = self
            .moments
            .iter()
            .flat_map(|(n, (m, v))| [(format!("{n}{M}"), &m[..]), (format!("{n}{V}"), &v[..])])
            .collect();
        Ok(Some(sheaf_core::StateViews { step: self.step, buffers }))
    }

    fn state_bytes(&self) -> Result<u64> {
        Ok(self.moments.values().map(|(m, v)| 4 * (m.len() + v.len()) as u64).sum())
    }

    /// The first and second moments.
    fn state_values_per_param(&self) -> Option<u32> {
        Some(2)
    }

    fn take_state(&mut self) -> Result<OptimState> {
        let buffers = std::mem::take(&mut self.moments)
            .into_iter()
            .flat_map(|(n, (m, v))| [(format!("{n}{M}"), m), (format!("{n}{V}"), v)])
            .collect();
        Ok(OptimState { step: std::mem::take(&mut self.step), buffers })
    }

    fn load_state(&mut self, state: &OptimState) -> Result<()> {
        type Partial = (Option<Vec<f32>>, Option<Vec<f32>>);
        let mut moments: BTreeMap<String, Partial> = BTreeMap::new();
        for (name, buf) in &state.buffers {
            if let Some(p) = name.strip_suffix(V) {
                moments.entry(p.to_owned()).or_default().1 = Some(buf.clone());
            } else if let Some(p) = name.strip_suffix(M) {
                moments.entry(p.to_owned()).or_default().0 = Some(buf.clone());
            } else {
                return Err(Error::BadState(format!("adamw state has unknown buffer `{name}`")));
            }
        }
        let mut complete = BTreeMap::new();
        for (p, pair) in moments {
            match pair {
                (Some(m), Some(v)) if m.len() == v.len() => {
                    complete.insert(p, (m, v));
                }
                _ => {
                    return Err(Error::BadState(format!(
                        "adamw state for `{p}` lacks a moment or sizes differ"
                    )))
                }
            }
        }
        self.moments = complete;
        self.step = state.step;
        Ok(())
    }
}
