//! The model kinds this plugin builds, in one table: a new kind is a folder with its
//! models and one `Kind` in [`KINDS`]; the backend dispatches through the table and
//! names no kind.

use candle_core::Device;
use sheaf_core::{Error, HfLayout, Model, ModelInfo, ModelSpec, ParamShard, Piece, PieceLayout, Result};

/// One model kind: what it is made of (without building it), and its models on a
/// device. `spec.kind` is this kind's name; its settings are parsed by each call.
pub(crate) trait Kind: Sync {
    fn name(&self) -> &'static str;

    /// Its parameters, blocks and input, without building it.
    fn describe(&self, spec: &ModelSpec) -> Result<ModelInfo>;

    /// The parameters of `piece` and where they come from.
    fn piece_layout(&self, spec: &ModelSpec, piece: &Piece) -> Result<PieceLayout>;

    /// The whole model: the fused CPU path on the CPU, the graph model elsewhere.
    fn build_model(&self, spec: &ModelSpec, seed: u64, device: &Device) -> Result<Box<dyn Model>>;

    /// A piece (pipeline stage blocks, tensor slices) on `device`.
    fn build_piece(
        &self,
        spec: &ModelSpec,
        piece: &Piece,
        seed: u64,
        device: &Device,
    ) -> Result<Box<dyn Model>>;

    /// A row shard of the whole model on the CPU (ZeRO stage 3).
    fn build_shard(&self, spec: &ModelSpec, shard: ParamShard, seed: u64) -> Result<Box<dyn Model>>;

    /// A row shard of a piece on the CPU (ZeRO stage 3 inside a stage); none unless the
    /// kind has them.
    fn build_piece_shard(
        &self,
        spec: &ModelSpec,
        _piece: &Piece,
        _shard: ParamShard,
        _seed: u64,
    ) -> Result<Box<dyn Model>> {
        Err(Error::Unsupported(format!(
            "ZeRO stage 3 inside a pipeline stage: `{}` models have no row shards of a piece",
            spec.kind
        )))
    }
}

/// transformers' layout of a kind's model, and the model a `config.json` of its
/// architecture describes; none unless the kind has one.
pub(crate) trait Hf: Sync {
    /// The model kind.
    fn kind(&self) -> &'static str;
    /// The transformers architecture (`GPT2LMHeadModel`).
    fn architecture(&self) -> &'static str;
    fn describes(&self, config: &serde_json::Value) -> bool;
    fn layout(&self, spec: &ModelSpec) -> Result<HfLayout>;
    fn model(&self, config: &serde_json::Value) -> Result<ModelSpec>;
}

/// Every kind with a transformers architecture.
pub(crate) const HF: [&dyn Hf; 1] = [&crate::gpt::kind::GptKind];

/// Every kind this plugin builds, in the order `sheaf plugins` lists them.
pub(crate) const KINDS: [&dyn Kind; 2] = [&crate::mlp::kind::MlpKind, &crate::gpt::kind::GptKind];

/// The kind `spec` names, or an error naming the key and the kinds there are.
pub(crate) fn of(spec: &ModelSpec) -> Result<&'static dyn Kind> {
    KINDS.iter().copied().find(|k| k.name() == spec.kind).ok_or_else(|| {
        let names: Vec<&str> = KINDS.iter().map(|k| k.name()).collect();
        Error::config(
            "model.kind",
            format!("unknown model kind `{}` (sheaf-compute-candle builds {})", spec.kind, names.join(", ")),
        )
    })
}
