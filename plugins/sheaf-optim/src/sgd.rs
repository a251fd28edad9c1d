//! Stochastic gradient descent, as `torch.optim.SGD` defines it.

use std::collections::BTreeMap;

use serde::Deserialize;
use sheaf_core::{Error, OptimState, Optimizer, Param, Result};

use crate::{check_finite, compute_threads, update_pieces, validate, with_state, Piece};

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SgdConfig {
    pub lr: f64,
    pub momentum: f64,
    pub dampening: f64,
    pub nesterov: bool,
    pub weight_decay: f64,
}

impl Default for SgdConfig {
    fn default() -> SgdConfig {
        SgdConfig { lr: 0.01, momentum: 0.0, dampening: 0.0, nesterov: false, weight_decay: 0.0 }
    }
}

/// `g = grad + wd * p`; with momentum `b = g` on the first step, then
/// `b = momentum * b + (1 - dampening) * g`; Nesterov uses `g + momentum * b`, plain
/// momentum uses `b`; finally `p -= lr * g`.
pub struct Sgd {
    config: SgdConfig,
    step: u64,
    momentum: BTreeMap<String, Vec<f32>>,
    /// Threads a large step is shared among.
    threads: usize,
}

const SLOT: &str = ".momentum_buffer";

impl Sgd {
    pub fn new(config: SgdConfig) -> Result<Sgd> {
        check_finite("lr", config.lr)?;
        check_finite("momentum", config.momentum)?;
        check_finite("dampening", config.dampening)?;
        check_finite("weight_decay", config.weight_decay)?;
        if config.nesterov && (config.momentum <= 0.0 || config.dampening != 0.0) {
            return Err(Error::config("nesterov", "needs momentum > 0 and dampening = 0"));
        }
        Ok(Sgd { config, step: 0, momentum: BTreeMap::new(), threads: compute_threads() })
    }

    /// Shares large steps among `threads` threads (by default the worker's compute
    /// threads, `RAYON_NUM_THREADS`); the result is the same for any number.
    pub fn with_threads(mut self, threads: usize) -> Sgd {
        self.threads = threads.max(1);
        self
    }
}

/// `f(value, grad, buffer)` for each element of a piece.
#[inline(always)]
fn update_loop(value: &mut [f32], grad: &[f32], buf: &mut [f32], f: impl Fn(&mut f32, f32, &mut f32)) {
    for ((w, &g), b) in value.iter_mut().zip(grad).zip(buf.iter_mut()) {
        f(w, g, b);
    }
}

impl Optimizer for Sgd {
    fn step(&mut self, params: &mut [Param<'_>]) -> Result<()> {
        validate(params, |name| self.momentum.get(name).map(Vec::len))?;
        let c = &self.config;
        let (lr, mu, damp, wd) = (c.lr as f32, c.momentum as f32, c.dampening as f32, c.weight_decay as f32);
        let pieces: Vec<Piece<'_>> = if mu != 0.0 {
            with_state(params, &mut self.momentum, |n| vec![0.0; n])?
                .into_iter()
                .map(|p| Piece { value: p.value, grad: p.grad, state: [p.state, &mut []], fresh: p.fresh })
                .collect()
        } else {
            params
                .iter_mut()
                .map(|p| Piece {
                    value: &mut *p.value,
                    grad: p.grad,
                    state: [&mut [], &mut []],
                    fresh: false,
                })
                .collect()
        };
        let nesterov = c.nesterov;
        update_pieces(pieces, self.threads, |Piece { value, grad, state: [buf, _], fresh }| {
            if mu == 0.0 {
                for (w, &g) in value.iter_mut().zip(grad) {
                    let g = g + wd * *w;
                    *w -= lr * g;
                }
                return;
            }
            // `fresh` and `nesterov` are the same for the whole piece: the loop is
            // written once per case so that each vectorises without a branch.
            match (fresh, nesterov) {
                (true, false) => update_loop(value, grad, buf, |w, g, b| {
                    let g = g + wd * *w;
                    *b = g;
                    *w -= lr * *b;
                }),
                (true, true) => update_loop(value, grad, buf, |w, g, b| {
                    let g = g + wd * *w;
                    *b = g;
                    *w -= lr * (g + mu * *b);
                }),
                (false, false) => update_loop(value, grad, buf, |w, g, b| {
                    let g = g + wd * *w;
                    *b = mu * *b + (1.0 - damp) * g;
                    *w -= lr * *b;
                }),
                (false, true) => update_loop(value, grad, buf, |w, g, b| {
                    let g = g + wd * *w;
                    *b = mu * *b + (1.0 - damp) * g;
                    *w -= lr * (g + mu * *b);
                }),
            }
        });
        self.step += 1;
        Ok(())
    }

    fn learning_rate(&self) -> f64 {
        self.config.lr
    }

    fn set_learning_rate(&mut self, lr: f64) {
        self.config.lr = lr;
    }

    fn state(&self) -> Result<OptimState> {
        Ok(OptimState {
            step: self.step,
            buffers: self.momentum.iter().map(|(n, b)| (format!("{n}{SLOT}"), b.clone())).collect(),
        })
    }

    fn state_views(&self) -> Result<Option<sheaf_core::StateViews<'_>>> {
        let buffers = self.momentum.iter().map(|(n, b)| (format!("{n}{SLOT}"), &b[..])).collect();
        Ok(Some(sheaf_core::StateViews { step: self.step, buffers }))
    }

    fn state_bytes(&self) -> Result<u64> {
        Ok(self.momentum.values().map(|b| 4 * b.len() as u64).sum())
    }

    /// The momentum buffer, which plain SGD (momentum 0) never makes.
    fn state_values_per_param(&self) -> Option<u32> {
        Some(u32::from(self.config.momentum != 0.0))
    }

    fn take_state(&mut self) -> Result<OptimState> {
        let momentum = std::mem::take(&mut self.momentum);
        let buffers = momentum.into_iter().map(|(n, b)| (format!("{n}{SLOT}"), b)).collect();
        Ok(OptimState { step: std::mem::take(&mut self.step), buffers })
    }

    fn load_state(&mut self, state: &OptimState) -> Result<()> {
        let mut momentum = BTreeMap::new();
        for (name, buf) in &state.buffers {
            let param = name
                .strip_suffix(SLOT)
                .ok_or_else(|| Error::BadState(format!("sgd state has unknown buffer `{name}`")))?;
            momentum.insert(param.to_owned(), buf.clone());
        }
        self.momentum = momentum;
        self.step = state.step;
        Ok(())
    }
}
