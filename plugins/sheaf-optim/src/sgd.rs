//! Stochastic gradient descent, as `torch.optim.SGD` defines it.

use std::collections::BTreeMap;

use serde::Deserialize;
use sheaf_core::{Error, OptimState, Optimizer, Param, Result};

use crate::{check_finite, validate};

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
        Ok(Sgd { config, step: 0, momentum: BTreeMap::new() })
    }
}

impl Optimizer for Sgd {
    fn step(&mut self, params: &mut [Param<'_>]) -> Result<()> {
        validate(params, |name| self.momentum.get(name).map(Vec::len))?;
        let c = &self.config;
        let (lr, mu, damp, wd) = (c.lr as f32, c.momentum as f32, c.dampening as f32, c.weight_decay as f32);
        for p in params.iter_mut() {
            let buf = if mu != 0.0 {
                let fresh = !self.momentum.contains_key(p.name);
                let buf = self.momentum.entry(p.name.to_owned()).or_insert_with(|| vec![0.0; p.grad.len()]);
                Some((buf, fresh))
            } else {
                None
            };
            match buf {
                None => {
                    for (w, &g) in p.value.iter_mut().zip(p.grad) {
                        let g = g + wd * *w;
                        *w -= lr * g;
                    }
                }
                Some((buf, fresh)) => {
                    for ((w, &g), b) in p.value.iter_mut().zip(p.grad).zip(buf.iter_mut()) {
                        let g = g + wd * *w;
                        *b = if fresh { g } else { mu * *b + (1.0 - damp) * g };
                        let d = if c.nesterov { g + mu * *b } else { *b };
                        *w -= lr * d;
                    }
                }
            }
        }
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
