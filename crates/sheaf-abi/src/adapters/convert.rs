//! Plain data across the boundary: layouts, pieces, specs, model info, samples,
//! batches, metrics, summaries and the training config, both ways.

use super::prelude::*;

pub(crate) fn state_to_abi(s: OptimState) -> AbiOptimState {
    let (names, buffers): (Vec<_>, Vec<_>) =
        s.buffers.into_iter().map(|(n, b)| (RString::from(n), RVec::from(b))).unzip();
    AbiOptimState { step: s.step, names: names.into(), buffers: buffers.into() }
}

/// An optimizer state taken over from the other side of the boundary: each buffer
/// moved into this side's allocation and the other side's freed before the next, so
/// the state is never held twice over (a copy of a large model's AdamW moments is
/// 8 bytes a parameter).
pub(crate) fn state_from_abi_owned(s: AbiOptimState) -> OptimState {
    let AbiOptimState { step, names, buffers } = s;
    let buffers = names.into_iter().zip(buffers).map(|(n, b)| (n.into_string(), b.into_vec())).collect();
    OptimState { step, buffers }
}

/// Views crossing: the names copied (short), the buffers lent.
pub(crate) fn views_to_abi<'a>(v: &StateViews<'a>) -> AbiStateViews<'a> {
    AbiStateViews {
        step: v.step,
        names: v.buffers.iter().map(|(n, _)| RString::from(n.as_str())).collect(),
        buffers: v.buffers.iter().map(|(_, b)| RSlice::from_slice(b)).collect(),
    }
}

pub(crate) fn views_from_abi(v: AbiStateViews<'_>) -> StateViews<'_> {
    let AbiStateViews { step, names, buffers } = v;
    StateViews {
        step,
        buffers: names.into_iter().zip(buffers).map(|(n, b)| (n.into_string(), b.as_slice())).collect(),
    }
}

pub(crate) fn state_from_abi(s: &AbiOptimState) -> OptimState {
    OptimState {
        step: s.step,
        buffers: s.names.iter().zip(s.buffers.iter()).map(|(n, b)| (n.to_string(), b.to_vec())).collect(),
    }
}

pub(crate) fn layout_to_abi(l: &ParamLayout) -> RVec<AbiParamSpec> {
    l.specs()
        .iter()
        .map(|s| AbiParamSpec {
            name: s.name.as_str().into(),
            shape: s.shape.iter().map(|&d| d as u64).collect(),
        })
        .collect()
}

pub(crate) fn layout_from_abi(l: &[AbiParamSpec]) -> ParamLayout {
    ParamLayout::new(
        l.iter()
            .map(|s| ParamSpec {
                name: s.name.to_string(),
                shape: s.shape.iter().map(|&d| d as usize).collect(),
            })
            .collect(),
    )
}

pub(crate) fn piece_to_abi(p: &Piece) -> AbiPiece {
    AbiPiece {
        start: p.blocks.start as u64,
        end: p.blocks.end as u64,
        tensor_rank: p.tensor_rank as u64,
        tensor_width: p.tensor_width as u64,
    }
}

pub(crate) fn shard_to_abi(s: Option<ParamShard>) -> AbiParamShard {
    s.map_or(AbiParamShard { index: 0, count: 0 }, |s| AbiParamShard {
        index: s.index as u64,
        count: s.count as u64,
    })
}

pub(crate) fn shard_from_abi(s: &AbiParamShard) -> Result<Option<ParamShard>> {
    if s.count == 0 {
        return Ok(None);
    }
    let shard =
        ParamShard { index: usize_of(s.index, "shard index")?, count: usize_of(s.count, "shard count")? };
    shard.validate()?;
    Ok(Some(shard))
}

pub(crate) fn piece_from_abi(p: &AbiPiece) -> Result<Piece> {
    Ok(Piece {
        blocks: usize_of(p.start, "piece start")?..usize_of(p.end, "piece end")?,
        tensor_rank: usize_of(p.tensor_rank, "tensor rank")?,
        tensor_width: usize_of(p.tensor_width, "tensor width")?,
    })
}

pub(crate) fn spec_to_abi(s: &ModelSpec) -> AbiModelSpec {
    AbiModelSpec {
        kind: s.kind.as_str().into(),
        config: s.config.as_str().into(),
        vocab_size: s.vocab_size.map_or(u64::MAX, |v| v as u64),
    }
}

pub(crate) fn spec_from_abi(s: &AbiModelSpec) -> Result<ModelSpec> {
    Ok(ModelSpec {
        kind: s.kind.to_string(),
        config: s.config.to_string(),
        vocab_size: if s.vocab_size == u64::MAX { None } else { Some(usize_of(s.vocab_size, "vocab_size")?) },
    })
}

pub(crate) fn info_to_abi(i: &ModelInfo) -> AbiModelInfo {
    let (input_kind, a, b) = match i.input {
        ModelInput::Rows { features, classes } => (BATCH_ROWS, features, classes),
        ModelInput::Tokens { vocab_size, block_size } => (BATCH_TOKENS, vocab_size, block_size),
    };
    AbiModelInfo {
        layout: layout_to_abi(&i.layout),
        blocks: i
            .blocks
            .iter()
            .map(|b| AbiBlock { name: b.name.as_str().into(), params: b.params })
            .collect(),
        input_kind,
        input_a: a as u64,
        input_b: b as u64,
    }
}

pub(crate) fn info_from_abi(i: &AbiModelInfo) -> Result<ModelInfo> {
    let (a, b) = (usize_of(i.input_a, "model input")?, usize_of(i.input_b, "model input")?);
    let input = match i.input_kind {
        BATCH_ROWS => ModelInput::Rows { features: a, classes: b },
        BATCH_TOKENS => ModelInput::Tokens { vocab_size: a, block_size: b },
        other => return Err(Error::invalid(format!("unknown model input kind {other}"))),
    };
    Ok(ModelInfo {
        layout: layout_from_abi(&i.layout),
        blocks: i.blocks.iter().map(|b| Block { name: b.name.to_string(), params: b.params }).collect(),
        input,
    })
}

pub(crate) fn hf_layout_to_abi(l: HfLayout) -> AbiHfLayout {
    AbiHfLayout {
        config: l.config.into(),
        tensors: l
            .tensors
            .into_iter()
            .map(|t| AbiHfTensor {
                name: t.name.into(),
                aliases: t.aliases.into_iter().map(RString::from).collect(),
                transposed: t.transposed,
            })
            .collect(),
    }
}

pub(crate) fn hf_layout_from_abi(l: AbiHfLayout) -> HfLayout {
    HfLayout {
        config: l.config.into_string(),
        tensors: l
            .tensors
            .into_iter()
            .map(|t| HfTensor {
                name: t.name.into_string(),
                aliases: t.aliases.into_iter().map(RString::into_string).collect(),
                transposed: t.transposed,
            })
            .collect(),
    }
}

pub(crate) fn piece_layout_to_abi(p: &PieceLayout) -> AbiPieceLayout {
    AbiPieceLayout {
        layout: layout_to_abi(&p.layout),
        sources: p
            .sources
            .iter()
            .map(|s| AbiShardSource {
                param: s.param as u64,
                by_columns: s.by_columns,
                ranges: s
                    .ranges
                    .iter()
                    .map(|r| AbiRange { start: r.start as u64, end: r.end as u64 })
                    .collect(),
            })
            .collect(),
        activation_bytes_per_sample: p.activation_bytes_per_sample,
    }
}

pub(crate) fn piece_layout_from_abi(p: &AbiPieceLayout) -> Result<PieceLayout> {
    let sources = p
        .sources
        .iter()
        .map(|s| {
            let ranges = s
                .ranges
                .iter()
                .map(|r| Ok(usize_of(r.start, "range start")?..usize_of(r.end, "range end")?))
                .collect::<Result<Vec<_>>>()?;
            Ok(ShardSource { param: usize_of(s.param, "parameter index")?, by_columns: s.by_columns, ranges })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(PieceLayout {
        layout: layout_from_abi(&p.layout),
        sources,
        activation_bytes_per_sample: p.activation_bytes_per_sample,
    })
}

pub(crate) fn samples_to_abi(s: Samples) -> AbiSamples {
    match s {
        Samples::Rows { inputs, labels, input_dim } => AbiSamples {
            kind: BATCH_ROWS,
            inputs: inputs.into(),
            labels: labels.into(),
            width: input_dim as u64,
        },
        Samples::Tokens { windows, window } => AbiSamples {
            kind: BATCH_TOKENS,
            inputs: RVec::new(),
            labels: windows.into(),
            width: window as u64,
        },
    }
}

pub(crate) fn samples_from_abi(s: AbiSamples) -> Result<Samples> {
    let width = usize_of(s.width, "sample width")?;
    match s.kind {
        BATCH_ROWS => {
            Ok(Samples::Rows { inputs: s.inputs.into_vec(), labels: s.labels.into_vec(), input_dim: width })
        }
        BATCH_TOKENS => Ok(Samples::Tokens { windows: s.labels.into_vec(), window: width }),
        other => Err(Error::invalid(format!("unknown sample kind {other}"))),
    }
}

/// A report's named numbers across the boundary.
pub(crate) fn values_to_abi(values: Vec<(String, f64)>) -> RVec<AbiNamedValue> {
    values.into_iter().map(|(name, value)| AbiNamedValue { name: name.into(), value }).collect()
}

pub(crate) fn values_from_abi(values: &[AbiNamedValue]) -> Vec<(String, f64)> {
    values.iter().map(|v| (v.name.to_string(), v.value)).collect()
}

pub(crate) fn batch_from_abi<'a>(b: &AbiBatch<'a>) -> Result<Batch<'a>> {
    let width = usize_of(b.width, "batch width")?;
    match b.kind {
        BATCH_ROWS => {
            Ok(Batch::Rows { inputs: b.inputs.as_slice(), labels: b.labels.as_slice(), input_dim: width })
        }
        BATCH_TOKENS => Ok(Batch::Tokens { windows: b.labels.as_slice(), window: width }),
        other => Err(sheaf_core::Error::invalid(format!("unknown batch kind {other}"))),
    }
}

pub(crate) fn batch_to_abi<'a>(b: &Batch<'a>) -> AbiBatch<'a> {
    match *b {
        Batch::Tokens { windows, window } => AbiBatch {
            kind: BATCH_TOKENS,
            inputs: RSlice::from_slice(&[]),
            labels: RSlice::from_slice(windows),
            width: window as u64,
        },
        Batch::Rows { inputs, labels, input_dim } => AbiBatch {
            kind: BATCH_ROWS,
            inputs: RSlice::from_slice(inputs),
            labels: RSlice::from_slice(labels),
            width: input_dim as u64,
        },
    }
}

pub(crate) fn config_to_abi(c: &TrainConfig) -> AbiTrainConfig {
    AbiTrainConfig {
        seed: c.seed,
        epochs: c.epochs,
        batch_size: c.batch_size as u64,
        max_steps: c.max_steps.unwrap_or(u64::MAX),
        lr: c.lr.base,
        lr_cosine: c.lr.cosine,
        warmup_steps: c.lr.warmup_steps,
        min_lr: c.lr.min_lr,
        grad_clip: c.grad_clip.unwrap_or(f64::NAN),
        grad_accum: c.grad_accum as u64,
        eval_every: c.eval_every.unwrap_or(0),
        start_step: c.start_step,
        checkpoint_every: c.checkpoint_every.unwrap_or(0),
    }
}
