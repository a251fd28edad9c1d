//! Datasets: a split lent to a strategy (`DatasetAbi`), gathered by index.

use super::prelude::*;

impl<P, T> DatasetAbi for Exported<P>
where
    P: Deref<Target = T> + Send + Sync,
    T: Dataset + ?Sized,
{
    fn len(&self) -> RResult<u64, AbiError> {
        guard(self.plugin, "dataset len", || Ok(self.inner.len() as u64))
    }
    fn gather(&self, indices: RSlice<'_, u64>) -> RResult<AbiSamples, AbiError> {
        guard(self.plugin, "dataset gather", || {
            let idx = indices.iter().map(|&i| usize_arg(i, "sample index")).collect::<Result<Vec<_>, _>>()?;
            Ok(samples_to_abi(self.inner.gather(&idx)?))
        })
    }
}

pub(crate) struct LoadedDataset<'a, P: GetPointerKind>(pub(crate) DatasetAbi_TO<'a, P>, pub(crate) usize);

impl<P: AsPtr<PtrTarget = ()> + Send + Sync> Dataset for LoadedDataset<'_, P> {
    fn len(&self) -> usize {
        self.1
    }
    fn gather(&self, indices: &[usize]) -> Result<Samples> {
        let idx: Vec<u64> = indices.iter().map(|&i| i as u64).collect();
        samples_from_abi(self.0.gather(RSlice::from_slice(&idx)).into_result()?)
    }
}
