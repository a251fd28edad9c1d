//! Metrics sinks: the host's, lent to strategies.

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
