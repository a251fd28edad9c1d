//! Metrics and checkpoint sinks: the host's, lent to strategies.

use super::prelude::*;

impl<P, T> MetricsSinkAbi for Exported<P>
where
    P: DerefMut<Target = T>,
    T: MetricsSink + ?Sized,
{
    fn record(&mut self, metrics: RVec<AbiNamedValue>) -> RResult<(), AbiError> {
        guard(self.plugin, "metrics record", || {
            self.inner.record(&StepMetrics::from_values(&values_from_abi(&metrics))?);
            Ok(())
        })
    }
}

pub(crate) struct LoadedMetrics<'a, P: GetPointerKind>(pub(crate) MetricsSinkAbi_TO<'a, P>);

impl<P: AsMutPtr<PtrTarget = ()>> MetricsSink for LoadedMetrics<'_, P> {
    fn record(&mut self, metrics: &StepMetrics) {
        if let Err(e) = self.0.record(values_to_abi(metrics.to_values())).into_result() {
            tracing_free_warn("metrics sink", &Error::from(e));
        }
    }
}

impl<P, T> CheckpointSinkAbi for Exported<P>
where
    P: DerefMut<Target = T>,
    T: CheckpointSink + ?Sized,
{
    fn save(
        &mut self,
        step: u64,
        params: RSlice<'_, f32>,
        optimizer: AbiOptimState,
    ) -> RResult<(), AbiError> {
        guard(self.plugin, "checkpoint save", || {
            self.inner
                .save_owned(step, params.as_slice(), state_from_abi_owned(optimizer))
                .map_err(AbiError::from)
        })
    }
    fn preempted(&mut self, step: u64) -> RResult<bool, AbiError> {
        guard(self.plugin, "checkpoint preempted", || self.inner.preempted(step).map_err(AbiError::from))
    }
    fn save_views(
        &mut self,
        step: u64,
        params: RSlice<'_, f32>,
        optimizer: AbiStateViews<'_>,
    ) -> RResult<(), AbiError> {
        guard(self.plugin, "checkpoint save_views", || {
            self.inner.save_views(step, params.as_slice(), &views_from_abi(optimizer)).map_err(AbiError::from)
        })
    }
}

pub(crate) struct LoadedCheckpoints<'a, P: GetPointerKind>(pub(crate) CheckpointSinkAbi_TO<'a, P>);

impl<P: AsMutPtr<PtrTarget = ()>> CheckpointSink for LoadedCheckpoints<'_, P> {
    fn save(&mut self, step: u64, params: &[f32], optimizer: &OptimState) -> Result<()> {
        Ok(self.0.save(step, RSlice::from_slice(params), state_to_abi(optimizer.clone())).into_result()?)
    }
    fn save_owned(&mut self, step: u64, params: &[f32], optimizer: OptimState) -> Result<()> {
        // The state crosses by value anyway: no copy of it on this side.
        Ok(self.0.save(step, RSlice::from_slice(params), state_to_abi(optimizer)).into_result()?)
    }
    fn preempted(&mut self, step: u64) -> Result<bool> {
        Ok(self.0.preempted(step).into_result()?)
    }
    fn save_views(&mut self, step: u64, params: &[f32], optimizer: &StateViews<'_>) -> Result<()> {
        Ok(self.0.save_views(step, RSlice::from_slice(params), views_to_abi(optimizer)).into_result()?)
    }
}
