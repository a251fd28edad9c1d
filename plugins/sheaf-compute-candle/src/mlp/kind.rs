//! The `mlp` kind in the plugin's table of kinds.

use candle_core::Device;
use sheaf_core::{Model, ModelInfo, ModelSpec, ParamShard, Piece, PieceLayout, Result};

use super::{fused, Mlp, MlpSpec, Stage};
use crate::kind::Kind;

pub(crate) struct MlpKind;

impl Kind for MlpKind {
    fn name(&self) -> &'static str {
        "mlp"
    }

    fn describe(&self, spec: &ModelSpec) -> Result<ModelInfo> {
        Ok(MlpSpec::parse(spec)?.info())
    }

    fn piece_layout(&self, spec: &ModelSpec, piece: &Piece) -> Result<PieceLayout> {
        MlpSpec::parse(spec)?.piece_layout(piece)
    }

    fn build_model(&self, spec: &ModelSpec, seed: u64, device: &Device) -> Result<Box<dyn Model>> {
        let spec = MlpSpec::parse(spec)?;
        match device.is_cpu() {
            true => Ok(Box::new(fused::FusedMlp::new(&spec, seed))),
            false => Ok(Box::new(Mlp::new(&spec, seed, device.clone())?)),
        }
    }

    fn build_piece(
        &self,
        spec: &ModelSpec,
        piece: &Piece,
        seed: u64,
        device: &Device,
    ) -> Result<Box<dyn Model>> {
        Ok(Box::new(Stage::new(&MlpSpec::parse(spec)?, piece, seed, device.clone())?))
    }

    fn build_shard(&self, spec: &ModelSpec, shard: ParamShard, seed: u64) -> Result<Box<dyn Model>> {
        Ok(Box::new(fused::shard(&MlpSpec::parse(spec)?, shard, seed)?))
    }
}
