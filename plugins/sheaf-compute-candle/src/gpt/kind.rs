//! The `gpt` kind in the plugin's table of kinds.

use candle_core::Device;
use sheaf_core::{Model, ModelInfo, ModelSpec, ParamShard, Piece, PieceLayout, Result};

use super::fused::{build_shard, FusedGpt, FusedPiece};
use super::{Gpt, GptSpec};
use crate::kind::Kind;

pub(crate) struct GptKind;

impl Kind for GptKind {
    fn name(&self) -> &'static str {
        "gpt"
    }

    fn describe(&self, spec: &ModelSpec) -> Result<ModelInfo> {
        Ok(GptSpec::parse(spec)?.info())
    }

    fn piece_layout(&self, spec: &ModelSpec, piece: &Piece) -> Result<PieceLayout> {
        GptSpec::parse(spec)?.piece_layout(piece)
    }

    fn build_model(&self, spec: &ModelSpec, seed: u64, device: &Device) -> Result<Box<dyn Model>> {
        let spec = GptSpec::parse(spec)?;
        match device.is_cpu() {
            true => Ok(Box::new(FusedGpt::new(&spec, seed))),
            false => Ok(Box::new(Gpt::new(&spec, seed, device.clone())?)),
        }
    }

    fn build_piece(
        &self,
        spec: &ModelSpec,
        piece: &Piece,
        seed: u64,
        device: &Device,
    ) -> Result<Box<dyn Model>> {
        let spec = GptSpec::parse(spec)?;
        match device.is_cpu() {
            true => Ok(Box::new(FusedPiece::new(&spec, piece, seed)?)),
            false => Ok(Box::new(Gpt::piece(&spec, piece, seed, device.clone())?)),
        }
    }

    fn build_shard(&self, spec: &ModelSpec, shard: ParamShard, seed: u64) -> Result<Box<dyn Model>> {
        Ok(Box::new(build_shard(&GptSpec::parse(spec)?, shard, seed)?))
    }

    fn build_piece_shard(
        &self,
        spec: &ModelSpec,
        piece: &Piece,
        shard: ParamShard,
        seed: u64,
    ) -> Result<Box<dyn Model>> {
        Ok(Box::new(FusedPiece::new_shard(&GptSpec::parse(spec)?, piece, shard, seed)?))
    }
}

impl crate::kind::Hf for GptKind {
    fn kind(&self) -> &'static str {
        "gpt"
    }

    fn architecture(&self) -> &'static str {
        super::hf::ARCHITECTURE
    }

    fn describes(&self, config: &serde_json::Value) -> bool {
        super::hf::describes(config)
    }

    fn layout(&self, spec: &ModelSpec) -> Result<sheaf_core::HfLayout> {
        super::hf::layout(spec)
    }

    fn model(&self, config: &serde_json::Value) -> Result<ModelSpec> {
        super::hf::model(config)
    }
}
