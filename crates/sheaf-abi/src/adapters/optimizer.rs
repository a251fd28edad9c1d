//! Optimizers: exported by plugins, lent by the host to strategies.

use super::prelude::*;

/// The optimizers that cross: a plugin's own (boxed) and the host's lent one. Named
/// types rather than any pointer, so that the state lent by `state_views` borrows
/// from an optimizer known to outlive the call.
macro_rules! optimizer_abi {
    ($($lt:lifetime)? ; $ptr:ty) => {
        impl<$($lt)?> OptimizerAbi for Exported<$ptr> {
            fn step(&mut self, mut params: RSliceMut<'_, AbiParam<'_>>) -> RResult<(), AbiError> {
                guard(self.plugin, "optimizer step", || {
                    let mut core: Vec<Param<'_>> = params
                        .iter_mut()
                        .map(|p| Param { name: p.name.as_str(), value: &mut p.value[..], grad: &p.grad[..] })
                        .collect();
                    Ok(self.inner.step(&mut core)?)
                })
            }
            fn learning_rate(&self) -> RResult<f64, AbiError> {
                guard(self.plugin, "optimizer learning_rate", || Ok(self.inner.learning_rate()))
            }
            fn set_learning_rate(&mut self, lr: f64) -> RResult<(), AbiError> {
                guard(self.plugin, "optimizer set_learning_rate", || {
                    self.inner.set_learning_rate(lr);
                    Ok(())
                })
            }
            fn state(&self) -> RResult<AbiOptimState, AbiError> {
                guard(self.plugin, "optimizer state", || Ok(state_to_abi(self.inner.state()?)))
            }
            fn state_views(&self) -> RResult<ROption<AbiStateViews<'_>>, AbiError> {
                guard(self.plugin, "optimizer state_views", || {
                    Ok(self.inner.state_views()?.map(|v| views_to_abi(&v)).into())
                })
            }
            fn load_state(&mut self, state: &AbiOptimState) -> RResult<(), AbiError> {
                guard(self.plugin, "optimizer load_state", || Ok(self.inner.load_state(&state_from_abi(state))?))
            }
            fn take_state(&mut self) -> RResult<AbiOptimState, AbiError> {
                guard(self.plugin, "optimizer take_state", || Ok(state_to_abi(self.inner.take_state()?)))
            }
            fn state_bytes(&self) -> RResult<u64, AbiError> {
                guard(self.plugin, "optimizer state_bytes", || Ok(self.inner.state_bytes()?))
            }
            fn state_values_per_param(&self) -> RResult<ROption<u32>, AbiError> {
                guard(self.plugin, "optimizer state_values_per_param", || {
                    Ok(self.inner.state_values_per_param().into())
                })
            }
        }
    };
}

optimizer_abi!(; Box<dyn Optimizer>);
optimizer_abi!('t; &'t mut (dyn Optimizer + 't));

pub fn export_optimizer(plugin: &'static str, inner: Box<dyn Optimizer>) -> OptimizerBox {
    OptimizerAbi_TO::from_value(Exported { plugin, inner }, TD_Opaque)
}

pub(crate) struct LoadedOptimizer<'a, P: GetPointerKind> {
    pub(crate) inner: OptimizerAbi_TO<'a, P>,
    pub(crate) lr: f64,
}

impl<P: AsMutPtr<PtrTarget = ()> + Send> Optimizer for LoadedOptimizer<'_, P> {
    fn step(&mut self, params: &mut [Param<'_>]) -> Result<()> {
        let mut abi: Vec<AbiParam<'_>> = params
            .iter_mut()
            .map(|p| AbiParam {
                name: RStr::from_str(p.name),
                value: RSliceMut::from_mut_slice(&mut *p.value),
                grad: RSlice::from_slice(p.grad),
            })
            .collect();
        self.inner.step(RSliceMut::from_mut_slice(&mut abi)).into_result().map_err(Error::from)
    }
    fn learning_rate(&self) -> f64 {
        self.lr
    }
    fn set_learning_rate(&mut self, lr: f64) {
        // A panic here is reported by the next step, which sees the plugin's state.
        if self.inner.set_learning_rate(lr).is_ok() {
            self.lr = lr;
        }
    }
    fn state(&self) -> Result<OptimState> {
        Ok(state_from_abi_owned(self.inner.state().into_result()?))
    }
    fn load_state(&mut self, state: &OptimState) -> Result<()> {
        self.inner.load_state(&state_to_abi(state.clone())).into_result().map_err(Error::from)
    }
    fn take_state(&mut self) -> Result<OptimState> {
        Ok(state_from_abi_owned(self.inner.take_state().into_result()?))
    }
    fn state_bytes(&self) -> Result<u64> {
        self.inner.state_bytes().into_result().map_err(Error::from)
    }
    fn state_views(&self) -> Result<Option<StateViews<'_>>> {
        Ok(self.inner.state_views().into_result()?.into_option().map(views_from_abi))
    }
    fn state_values_per_param(&self) -> Option<u32> {
        // A plugin that fails to say has said nothing.
        self.inner.state_values_per_param().into_result().ok().and_then(ROption::into_option)
    }
}

/// An optimizer loaded from a plugin. Fails if the plugin cannot even report its
/// learning rate.
pub fn load_optimizer(inner: OptimizerBox) -> Result<Box<dyn Optimizer>> {
    let lr = inner.learning_rate().into_result()?;
    Ok(Box::new(LoadedOptimizer { inner, lr }))
}
