//! Compute backends: model kinds, descriptions, piece layouts, models.

use super::prelude::*;

impl<P, T> ComputeAbi for Exported<P>
where
    P: Deref<Target = T> + Send + Sync,
    T: ComputeBackend + ?Sized,
{
    fn device(&self) -> RResult<RString, AbiError> {
        guard(self.plugin, "compute device", || Ok(self.inner.device().into()))
    }
    fn build_model(&self, spec: AbiModelSpec, seed: u64) -> RResult<ModelBox, AbiError> {
        let plugin = self.plugin;
        guard(plugin, "compute build_model", || {
            Ok(export_model(plugin, self.inner.build_model(&spec_from_abi(&spec)?, seed)?))
        })
    }
    fn build_piece(&self, spec: AbiModelSpec, piece: AbiPiece, seed: u64) -> RResult<ModelBox, AbiError> {
        let plugin = self.plugin;
        guard(plugin, "compute build_piece", || {
            let piece = piece_from_abi(&piece)?;
            Ok(export_model(plugin, self.inner.build_piece(&spec_from_abi(&spec)?, &piece, seed)?))
        })
    }
    fn build_shard(
        &self,
        spec: AbiModelSpec,
        shard: AbiParamShard,
        seed: u64,
    ) -> RResult<ModelBox, AbiError> {
        let plugin = self.plugin;
        guard(plugin, "compute build_shard", || {
            let shard = shard_from_abi(&shard)?
                .ok_or_else(|| Error::invalid("build_shard without a parameter shard".to_string()))?;
            Ok(export_model(plugin, self.inner.build_shard(&spec_from_abi(&spec)?, shard, seed)?))
        })
    }
    fn build_piece_shard(
        &self,
        spec: AbiModelSpec,
        piece: AbiPiece,
        shard: AbiParamShard,
        seed: u64,
    ) -> RResult<ModelBox, AbiError> {
        let plugin = self.plugin;
        guard(plugin, "compute build_piece_shard", || {
            let piece = piece_from_abi(&piece)?;
            let shard = shard_from_abi(&shard)?
                .ok_or_else(|| Error::invalid("build_piece_shard without a parameter shard".to_string()))?;
            let spec = spec_from_abi(&spec)?;
            Ok(export_model(plugin, self.inner.build_piece_shard(&spec, &piece, shard, seed)?))
        })
    }
    fn model_kinds(&self) -> RResult<RVec<RString>, AbiError> {
        guard(self.plugin, "compute model_kinds", || {
            Ok(self.inner.model_kinds().into_iter().map(RString::from).collect())
        })
    }
    fn describe(&self, spec: AbiModelSpec) -> RResult<AbiModelInfo, AbiError> {
        guard(self.plugin, "compute describe", || {
            Ok(info_to_abi(&self.inner.describe(&spec_from_abi(&spec)?)?))
        })
    }
    fn piece_layout(&self, spec: AbiModelSpec, piece: AbiPiece) -> RResult<AbiPieceLayout, AbiError> {
        guard(self.plugin, "compute piece_layout", || {
            let piece = piece_from_abi(&piece)?;
            Ok(piece_layout_to_abi(&self.inner.piece_layout(&spec_from_abi(&spec)?, &piece)?))
        })
    }
    fn hf_layout(&self, spec: AbiModelSpec) -> RResult<AbiHfLayout, AbiError> {
        guard(self.plugin, "compute hf_layout", || {
            Ok(hf_layout_to_abi(self.inner.hf_layout(&spec_from_abi(&spec)?)?))
        })
    }
    fn hf_model(&self, config_json: RString) -> RResult<AbiModelSpec, AbiError> {
        guard(self.plugin, "compute hf_model", || Ok(spec_to_abi(&self.inner.hf_model(&config_json)?)))
    }
}

pub fn export_compute(plugin: &'static str, inner: Box<dyn ComputeBackend>) -> ComputeBox {
    ComputeAbi_TO::from_value(Exported { plugin, inner }, TD_Opaque)
}

pub(crate) struct LoadedCompute {
    pub(crate) inner: ComputeBox,
    pub(crate) device: String,
    pub(crate) kinds: Vec<String>,
}

impl ComputeBackend for LoadedCompute {
    fn device(&self) -> &str {
        &self.device
    }
    fn build_model(&self, spec: &ModelSpec, seed: u64) -> Result<Box<dyn Model>> {
        load_model(self.inner.build_model(spec_to_abi(spec), seed).into_result()?)
    }
    fn build_piece(&self, spec: &ModelSpec, piece: &Piece, seed: u64) -> Result<Box<dyn Model>> {
        load_model(self.inner.build_piece(spec_to_abi(spec), piece_to_abi(piece), seed).into_result()?)
    }
    fn build_shard(&self, spec: &ModelSpec, shard: ParamShard, seed: u64) -> Result<Box<dyn Model>> {
        load_model(self.inner.build_shard(spec_to_abi(spec), shard_to_abi(Some(shard)), seed).into_result()?)
    }
    fn build_piece_shard(
        &self,
        spec: &ModelSpec,
        piece: &Piece,
        shard: ParamShard,
        seed: u64,
    ) -> Result<Box<dyn Model>> {
        let built = self.inner.build_piece_shard(
            spec_to_abi(spec),
            piece_to_abi(piece),
            shard_to_abi(Some(shard)),
            seed,
        );
        load_model(built.into_result()?)
    }
    fn model_kinds(&self) -> Vec<String> {
        self.kinds.clone()
    }
    fn describe(&self, spec: &ModelSpec) -> Result<ModelInfo> {
        info_from_abi(&self.inner.describe(spec_to_abi(spec)).into_result()?)
    }
    fn piece_layout(&self, spec: &ModelSpec, piece: &Piece) -> Result<PieceLayout> {
        piece_layout_from_abi(&self.inner.piece_layout(spec_to_abi(spec), piece_to_abi(piece)).into_result()?)
    }
    fn hf_layout(&self, spec: &ModelSpec) -> Result<HfLayout> {
        Ok(hf_layout_from_abi(self.inner.hf_layout(spec_to_abi(spec)).into_result()?))
    }
    fn hf_model(&self, config_json: &str) -> Result<ModelSpec> {
        spec_from_abi(&self.inner.hf_model(config_json.into()).into_result()?)
    }
}

pub fn load_compute(inner: ComputeBox) -> Result<Box<dyn ComputeBackend>> {
    let device = inner.device().into_result()?.into_string();
    let kinds = inner.model_kinds().into_result()?.into_iter().map(RString::into_string).collect();
    Ok(Box::new(LoadedCompute { inner, device, kinds }))
}
