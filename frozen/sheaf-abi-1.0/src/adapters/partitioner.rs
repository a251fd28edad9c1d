//! Data and model partitioners.

use super::prelude::*;

impl<P, T> DataPartitionerAbi for Exported<P>
where
    P: Deref<Target = T> + Send + Sync,
    T: DataPartitioner + ?Sized,
{
    fn shard(&self, epoch: u64, num_samples: u64, rank: u64, world: u64) -> RResult<RVec<u64>, AbiError> {
        guard(self.plugin, "data partitioner shard", || {
            let shard = self.inner.shard(
                epoch,
                usize_arg(num_samples, "num_samples")?,
                usize_arg(rank, "rank")?,
                usize_arg(world, "world")?,
            )?;
            Ok(shard.into_iter().map(|i| i as u64).collect())
        })
    }
}

impl<P, T> ModelPartitionerAbi for Exported<P>
where
    P: Deref<Target = T> + Send + Sync,
    T: ModelPartitioner + ?Sized,
{
    fn cut(&self, layer_costs: RSlice<'_, u64>, stages: u64) -> RResult<RVec<AbiRange>, AbiError> {
        guard(self.plugin, "model partitioner cut", || {
            let ranges = self.inner.cut(&layer_costs, usize_arg(stages, "stages")?)?;
            Ok(ranges.into_iter().map(|r| AbiRange { start: r.start as u64, end: r.end as u64 }).collect())
        })
    }
}

pub fn export_data_partitioner(plugin: &'static str, inner: Box<dyn DataPartitioner>) -> DataPartitionerBox {
    DataPartitionerAbi_TO::from_value(Exported { plugin, inner }, TD_Opaque)
}

pub fn export_model_partitioner(
    plugin: &'static str,
    inner: Box<dyn ModelPartitioner>,
) -> ModelPartitionerBox {
    ModelPartitionerAbi_TO::from_value(Exported { plugin, inner }, TD_Opaque)
}

pub(crate) struct LoadedDataPartitioner<'a, P: GetPointerKind>(pub(crate) DataPartitionerAbi_TO<'a, P>);

impl<P: AsPtr<PtrTarget = ()> + Send + Sync> DataPartitioner for LoadedDataPartitioner<'_, P> {
    fn shard(&self, epoch: u64, num_samples: usize, rank: usize, world: usize) -> Result<Vec<usize>> {
        let v = self.0.shard(epoch, num_samples as u64, rank as u64, world as u64).into_result()?;
        Ok(v.into_iter().map(|i| i as usize).collect())
    }
}

pub(crate) struct LoadedModelPartitioner<'a, P: GetPointerKind>(pub(crate) ModelPartitionerAbi_TO<'a, P>);

impl<P: AsPtr<PtrTarget = ()> + Send + Sync> ModelPartitioner for LoadedModelPartitioner<'_, P> {
    fn cut(&self, layer_costs: &[u64], stages: usize) -> Result<Vec<Range<usize>>> {
        let v = self.0.cut(RSlice::from_slice(layer_costs), stages as u64).into_result()?;
        Ok(v.into_iter().map(|r| r.start as usize..r.end as usize).collect())
    }
}

pub fn load_data_partitioner(inner: DataPartitionerBox) -> Box<dyn DataPartitioner> {
    Box::new(LoadedDataPartitioner(inner))
}

pub fn load_model_partitioner(inner: ModelPartitionerBox) -> Box<dyn ModelPartitioner> {
    Box::new(LoadedModelPartitioner(inner))
}
