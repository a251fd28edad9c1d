//! Strategies: `plan` and `train`, and lending their inputs across the boundary.

use super::prelude::*;

impl<P, T> StrategyAbi for Exported<P>
where
    P: DerefMut<Target = T> + Send,
    T: Strategy + ?Sized,
{
    fn name(&self) -> RResult<RString, AbiError> {
        guard(self.plugin, "strategy name", || Ok(self.inner.name().into()))
    }
    fn train(&mut self, ctx: AbiTrainContext<'_>) -> RResult<RVec<AbiNamedValue>, AbiError> {
        let plugin = self.plugin;
        let inner = &mut self.inner;
        guard(plugin, "strategy train", || {
            train_context(ctx, |core| inner.train(core).map(|s| values_to_abi(s.to_values())))
                .map_err(AbiError::from)
        })
    }
    fn plan(&self, input: AbiPlanInput<'_>) -> RResult<AbiStrategyPlan, AbiError> {
        guard(self.plugin, "strategy plan", || {
            let plan = plan_input(input, |core| self.inner.plan(core))?;
            Ok(AbiStrategyPlan {
                pieces: plan.ranks.iter().map(|r| piece_to_abi(&r.piece)).collect(),
                activation_samples: plan.ranks.iter().map(|r| r.activation_samples).collect(),
                state_shards: plan.ranks.iter().map(|r| r.state_shards).collect(),
                stage_interface: plan.stage_interface,
                param_shards: plan.ranks.iter().map(|r| shard_to_abi(r.param_shard)).collect(),
            })
        })
    }
    fn planned_gradient_bytes(&self, input: AbiPlanInput<'_>) -> RResult<ROption<RVec<u64>>, AbiError> {
        guard(self.plugin, "strategy planned_gradient_bytes", || {
            let bytes = plan_input(input, |core| self.inner.planned_gradient_bytes(core))?;
            Ok(bytes.map(RVec::from).into())
        })
    }
    fn planned_parameter_bytes(&self, input: AbiPlanInput<'_>) -> RResult<ROption<RVec<u64>>, AbiError> {
        guard(self.plugin, "strategy planned_parameter_bytes", || {
            let bytes = plan_input(input, |core| self.inner.planned_parameter_bytes(core))?;
            Ok(bytes.map(RVec::from).into())
        })
    }
}

pub fn export_strategy(plugin: &'static str, inner: Box<dyn Strategy>) -> StrategyBox {
    StrategyAbi_TO::from_value(Exported { plugin, inner }, TD_Opaque)
}

/// Lends `input` across the boundary for the duration of `f`: the host's side of
/// a strategy plugin's `plan`.
pub fn with_plan_input<R>(
    plugin: &'static str,
    input: &sheaf_core::PlanInput<'_>,
    f: impl FnOnce(AbiPlanInput<'_>) -> R,
) -> R {
    let blocks: Vec<AbiBlock> =
        input.blocks.iter().map(|b| AbiBlock { name: b.name.as_str().into(), params: b.params }).collect();
    let partitioner = Exported { plugin, inner: input.partitioner };
    f(AbiPlanInput {
        world: input.world as u64,
        blocks: RSlice::from_slice(&blocks),
        costs: RSlice::from_slice(input.costs),
        batch_size: input.batch_size as u64,
        partitioner: ModelPartitionerAbi_TO::from_ptr(&partitioner, TD_Opaque),
    })
}

/// Lends the parts of `ctx` across the boundary for the duration of `f`: the
/// host's side of a strategy plugin's `train`. Calls back into the host catch
/// panics as `plugin` (the host's name).
pub fn with_train_context<R>(
    plugin: &'static str,
    ctx: TrainContext<'_>,
    f: impl FnOnce(AbiTrainContext<'_>) -> R,
) -> R {
    let TrainContext { config, comm, model, optimizer, partitioner, train, test, metrics, checkpoints } = ctx;
    let comm = Exported { plugin, inner: comm };
    let mut model = Exported { plugin, inner: model };
    let mut optimizer = Exported { plugin, inner: optimizer };
    let partitioner = Exported { plugin, inner: partitioner };
    let (train, test) = (Exported { plugin, inner: train }, Exported { plugin, inner: test });
    let mut metrics = Exported { plugin, inner: metrics };
    let mut checkpoints = Exported { plugin, inner: checkpoints };
    f(AbiTrainContext {
        config: config_to_abi(&config),
        comm: CommunicatorAbi_TO::from_ptr(&comm, TD_Opaque),
        model: ModelAbi_TO::from_ptr(&mut model, TD_Opaque),
        optimizer: OptimizerAbi_TO::from_ptr(&mut optimizer, TD_Opaque),
        partitioner: DataPartitionerAbi_TO::from_ptr(&partitioner, TD_Opaque),
        train: DatasetAbi_TO::from_ptr(&train, TD_Opaque),
        test: DatasetAbi_TO::from_ptr(&test, TD_Opaque),
        metrics: MetricsSinkAbi_TO::from_ptr(&mut metrics, TD_Opaque),
        checkpoints: CheckpointSinkAbi_TO::from_ptr(&mut checkpoints, TD_Opaque),
    })
}

pub(crate) struct LoadedStrategy {
    pub(crate) inner: StrategyBox,
    pub(crate) name: String,
}

impl LoadedStrategy {
    /// A strategy's per-rank figures, checked to be one per rank of `world`.
    fn per_rank(&self, bytes: ROption<RVec<u64>>, world: usize, what: &str) -> Result<Option<Vec<u64>>> {
        match bytes.into_option() {
            Some(b) if b.len() != world => Err(Error::invalid(format!(
                "strategy `{}` planned {what} bytes for {} ranks of a world of {world}",
                self.name,
                b.len()
            ))),
            b => Ok(b.map(RVec::into_vec)),
        }
    }
}

#[deny(clippy::missing_trait_methods)]
impl Strategy for LoadedStrategy {
    fn name(&self) -> &str {
        &self.name
    }
    fn train(&mut self, ctx: TrainContext<'_>) -> Result<TrainSummary> {
        let inner = &mut self.inner;
        let values = with_train_context("sheaf-host", ctx, |abi| inner.train(abi).into_result())?;
        TrainSummary::from_values(&values_from_abi(&values))
    }
    fn planned_gradient_bytes(&self, input: &PlanInput<'_>) -> Result<Option<Vec<u64>>> {
        let bytes =
            with_plan_input("sheaf-host", input, |abi| self.inner.planned_gradient_bytes(abi).into_result())?;
        self.per_rank(bytes, input.world, "gradient")
    }
    fn planned_parameter_bytes(&self, input: &PlanInput<'_>) -> Result<Option<Vec<u64>>> {
        let bytes = with_plan_input("sheaf-host", input, |abi| {
            self.inner.planned_parameter_bytes(abi).into_result()
        })?;
        self.per_rank(bytes, input.world, "parameter")
    }
    fn plan(&self, input: &PlanInput<'_>) -> Result<StrategyPlan> {
        let plan = with_plan_input("sheaf-host", input, |abi| self.inner.plan(abi).into_result())?;
        let n = plan.pieces.len();
        if plan.activation_samples.len() != n || plan.state_shards.len() != n || plan.param_shards.len() != n
        {
            return Err(Error::invalid(format!(
                "strategy `{}` planned {n} pieces but {} activation counts, {} state shard counts and {} \
                 parameter shards",
                self.name,
                plan.activation_samples.len(),
                plan.state_shards.len(),
                plan.param_shards.len()
            )));
        }
        let ranks = plan
            .pieces
            .iter()
            .zip(plan.activation_samples.iter().zip(plan.state_shards.iter()))
            .zip(plan.param_shards.iter())
            .map(|((p, (&activation_samples, &state_shards)), shard)| {
                if state_shards == 0 {
                    return Err(Error::invalid(format!(
                        "strategy `{}` planned optimizer state sharded over 0 ranks",
                        self.name
                    )));
                }
                Ok(RankPlan {
                    piece: piece_from_abi(p)?,
                    activation_samples,
                    state_shards,
                    param_shard: shard_from_abi(shard)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(StrategyPlan { ranks, stage_interface: plan.stage_interface })
    }
}

/// The plugin's side of `plan`: turns the lent ABI input back into a core
/// [`PlanInput`] for the duration of `f`.
pub fn plan_input<R>(input: AbiPlanInput<'_>, f: impl FnOnce(&PlanInput<'_>) -> Result<R>) -> Result<R> {
    let blocks: Vec<sheaf_core::Block> = input
        .blocks
        .iter()
        .map(|b| sheaf_core::Block { name: b.name.to_string(), params: b.params })
        .collect();
    let partitioner = LoadedModelPartitioner(input.partitioner);
    f(&PlanInput {
        world: usize_of(input.world, "world size")?,
        blocks: &blocks,
        costs: input.costs.as_slice(),
        batch_size: usize_of(input.batch_size, "batch size")?,
        partitioner: &partitioner,
    })
}

pub fn load_strategy(inner: StrategyBox) -> Result<Box<dyn Strategy>> {
    let name = inner.name().into_result()?.into_string();
    Ok(Box::new(LoadedStrategy { inner, name }))
}

/// The plugin's side of `train`: turns the lent ABI context back into a core
/// [`TrainContext`] for the duration of `f`.
pub fn train_context<R>(
    ctx: AbiTrainContext<'_>,
    f: impl FnOnce(TrainContext<'_>) -> Result<R>,
) -> Result<R> {
    let AbiTrainContext { config, comm, model, optimizer, partitioner, train, test, metrics, checkpoints } =
        ctx;
    let rank = comm.rank().into_result()? as usize;
    let world = comm.world_size().into_result()? as usize;
    let comm = LoadedCommunicator { inner: comm, rank, world };
    let mut model = LoadedModel::new(model)?;
    let train_len = usize_of(train.len().into_result()?, "training samples")?;
    let test_len = usize_of(test.len().into_result()?, "test samples")?;
    let (train, test) = (LoadedDataset(train, train_len), LoadedDataset(test, test_len));
    let lr = optimizer.learning_rate().into_result()?;
    let mut optimizer = LoadedOptimizer { inner: optimizer, lr };
    let partitioner = LoadedDataPartitioner(partitioner);
    let mut metrics = LoadedMetrics(metrics);
    let mut checkpoints = LoadedCheckpoints(checkpoints);
    f(TrainContext {
        config: TrainConfig {
            seed: config.seed,
            epochs: config.epochs,
            batch_size: usize_of(config.batch_size, "batch size")?,
            max_steps: (config.max_steps != u64::MAX).then_some(config.max_steps),
            lr: LrSchedule {
                base: config.lr,
                cosine: config.lr_cosine,
                warmup_steps: config.warmup_steps,
                min_lr: config.min_lr,
            },
            grad_clip: nan_none(config.grad_clip),
            grad_accum: usize_of(config.grad_accum, "grad_accum")?.max(1),
            eval_every: (config.eval_every > 0).then_some(config.eval_every),
            start_step: config.start_step,
            checkpoint_every: (config.checkpoint_every > 0).then_some(config.checkpoint_every),
        },
        comm: &comm,
        model: &mut model,
        optimizer: &mut optimizer,
        partitioner: &partitioner,
        train: &train,
        test: &test,
        metrics: &mut metrics,
        checkpoints: &mut checkpoints,
    })
}
