//! Models: whole or pieces, with the stage interface.

use super::prelude::*;

// The target is named through `P` (not as a parameter of its own) so that a borrow
// of `self` bounds it too: `params_mut` lends a slice out of it.
impl<P> ModelAbi for Exported<P>
where
    P: DerefMut + Send,
    P::Target: Model,
{
    fn layout(&self) -> RResult<RVec<AbiParamSpec>, AbiError> {
        guard(self.plugin, "model layout", || Ok(layout_to_abi(self.inner.layout())))
    }
    fn read_params(&self, mut out: RSliceMut<'_, f32>) -> RResult<(), AbiError> {
        guard(self.plugin, "model read_params", || Ok(self.inner.read_params(&mut out)?))
    }
    fn write_params(&mut self, src: RSlice<'_, f32>) -> RResult<(), AbiError> {
        guard(self.plugin, "model write_params", || Ok(self.inner.write_params(&src)?))
    }
    fn forward_backward(
        &mut self,
        batch: AbiBatch<'_>,
        mut grads: RSliceMut<'_, f32>,
    ) -> RResult<f32, AbiError> {
        guard(self.plugin, "model forward_backward", || {
            Ok(self.inner.forward_backward(&batch_from_abi(&batch)?, &mut grads)?)
        })
    }
    fn evaluate(&mut self, batch: AbiBatch<'_>) -> RResult<AbiEval, AbiError> {
        guard(self.plugin, "model evaluate", || {
            let (loss_sum, correct) = self.inner.evaluate(&batch_from_abi(&batch)?)?;
            Ok(AbiEval { loss_sum, correct: correct as u64 })
        })
    }
    fn piece(&self) -> RResult<ROption<AbiPiece>, AbiError> {
        guard(self.plugin, "model piece", || Ok(self.inner.piece().as_ref().map(piece_to_abi).into()))
    }
    fn segments(&self) -> RResult<u64, AbiError> {
        guard(self.plugin, "model segments", || Ok(self.inner.segments() as u64))
    }
    fn stage_forward(
        &mut self,
        micro: u64,
        segment: u64,
        input: RSlice<'_, f32>,
        rows: u64,
    ) -> RResult<RVec<f32>, AbiError> {
        guard(self.plugin, "model stage_forward", || {
            let (segment, rows) = (usize_arg(segment, "segment")?, usize_arg(rows, "rows")?);
            Ok(self.inner.stage_forward(micro, segment, &input, rows)?.into())
        })
    }
    fn stage_backward(
        &mut self,
        micro: u64,
        segment: u64,
        grad_output: RSlice<'_, f32>,
    ) -> RResult<RVec<f32>, AbiError> {
        guard(self.plugin, "model stage_backward", || {
            Ok(self.inner.stage_backward(micro, usize_arg(segment, "segment")?, &grad_output)?.into())
        })
    }
    fn loss_grad(
        &mut self,
        logits: RSlice<'_, f32>,
        labels: RSlice<'_, u32>,
        scale: f32,
    ) -> RResult<AbiLossGrad, AbiError> {
        guard(self.plugin, "model loss_grad", || {
            let (loss_sum, correct, grad) = self.inner.loss_grad(&logits, &labels, scale)?;
            Ok(AbiLossGrad { loss_sum, correct: correct as u64, grad: grad.into() })
        })
    }
    fn take_grads(&mut self, mut out: RSliceMut<'_, f32>) -> RResult<(), AbiError> {
        guard(self.plugin, "model take_grads", || Ok(self.inner.take_grads(&mut out)?))
    }
    fn drop_saved(&mut self) -> RResult<(), AbiError> {
        guard(self.plugin, "model drop_saved", || {
            self.inner.drop_saved();
            Ok(())
        })
    }
    fn saved_bytes(&self) -> RResult<u64, AbiError> {
        guard(self.plugin, "model saved_bytes", || Ok(self.inner.saved_bytes()))
    }
    fn predict(&mut self, batch: AbiBatch<'_>) -> RResult<RVec<f32>, AbiError> {
        guard(self.plugin, "model predict", || Ok(self.inner.predict(&batch_from_abi(&batch)?)?.into()))
    }
    fn stage_forward_batch(
        &mut self,
        micro: u64,
        segment: u64,
        batch: AbiBatch<'_>,
    ) -> RResult<RVec<f32>, AbiError> {
        guard(self.plugin, "model stage_forward_batch", || {
            let segment = usize_arg(segment, "segment")?;
            Ok(self.inner.stage_forward_batch(micro, segment, &batch_from_abi(&batch)?)?.into())
        })
    }
    fn replicated_params(&self) -> RResult<RVec<u8>, AbiError> {
        guard(self.plugin, "model replicated_params", || {
            Ok(self.inner.replicated_params().into_iter().map(u8::from).collect())
        })
    }
    fn backward_in_steps(&self) -> RResult<bool, AbiError> {
        guard(self.plugin, "model backward_in_steps", || Ok(self.inner.backward_in_steps()))
    }
    fn backward_begin(&mut self, batch: AbiBatch<'_>) -> RResult<f32, AbiError> {
        guard(self.plugin, "model backward_begin", || {
            Ok(self.inner.backward_begin(&batch_from_abi(&batch)?)?)
        })
    }
    fn backward_next(&mut self, mut pending: RSliceMut<'_, f32>) -> RResult<u64, AbiError> {
        guard(self.plugin, "model backward_next", || Ok(self.inner.backward_next(&mut pending)? as u64))
    }
    fn params_mut(&mut self) -> RResult<ROption<RSliceMut<'_, f32>>, AbiError> {
        guard(self.plugin, "model params_mut", || {
            Ok(self.inner.params_mut()?.map(RSliceMut::from_mut_slice).into())
        })
    }
    fn backward_window(&self) -> RResult<ROption<u64>, AbiError> {
        guard(self.plugin, "model backward_window", || {
            Ok(self.inner.backward_window().map(|n| n as u64).into())
        })
    }
    fn backward_next_into(&mut self, mut window: RSliceMut<'_, f32>, end: u64) -> RResult<u64, AbiError> {
        guard(self.plugin, "model backward_next_into", || {
            let end = usize_of(end, "pending gradient values")?;
            Ok(self.inner.backward_next_into(&mut window, end)? as u64)
        })
    }
    fn units(&self) -> RResult<RVec<RVec<u64>>, AbiError> {
        guard(self.plugin, "model units", || {
            Ok(self.inner.units().into_iter().map(|u| u.into_iter().map(|p| p as u64).collect()).collect())
        })
    }
    fn unit_begin(&mut self, batch: AbiBatch<'_>, train: bool) -> RResult<(), AbiError> {
        guard(self.plugin, "model unit_begin", || {
            Ok(self.inner.unit_begin(&batch_from_abi(&batch)?, train)?)
        })
    }
    fn unit_forward(&mut self, unit: u64, params: RSlice<'_, f32>) -> RResult<ROption<AbiEval>, AbiError> {
        guard(self.plugin, "model unit_forward", || {
            let unit = usize_of(unit, "unit")?;
            let end = self.inner.unit_forward(unit, &params)?;
            Ok(end.map(|(loss_sum, correct)| AbiEval { loss_sum, correct: correct as u64 }).into())
        })
    }
    fn unit_backward(
        &mut self,
        unit: u64,
        params: RSlice<'_, f32>,
        mut grads: RSliceMut<'_, f32>,
    ) -> RResult<(), AbiError> {
        guard(self.plugin, "model unit_backward", || {
            Ok(self.inner.unit_backward(usize_of(unit, "unit")?, &params, &mut grads)?)
        })
    }
    fn piece_params_mut(&mut self) -> RResult<ROption<RSliceMut<'_, f32>>, AbiError> {
        guard(self.plugin, "model piece_params_mut", || {
            Ok(self.inner.piece_params_mut()?.map(RSliceMut::from_mut_slice).into())
        })
    }
    fn piece_grads_mut(&mut self) -> RResult<ROption<RSliceMut<'_, f32>>, AbiError> {
        guard(self.plugin, "model piece_grads_mut", || {
            Ok(self.inner.piece_grads_mut()?.map(RSliceMut::from_mut_slice).into())
        })
    }
    fn tied_params(&self) -> RResult<RVec<AbiRange>, AbiError> {
        guard(self.plugin, "model tied_params", || {
            Ok(self
                .inner
                .tied_params()
                .into_iter()
                .map(|(p, w)| AbiRange { start: p as u64, end: w as u64 })
                .collect())
        })
    }
}

pub fn export_model(plugin: &'static str, inner: Box<dyn Model>) -> ModelBox {
    ModelAbi_TO::from_value(Exported { plugin, inner }, TD_Opaque)
}

pub(crate) struct LoadedModel<'a, P: GetPointerKind> {
    pub(crate) inner: ModelAbi_TO<'a, P>,
    pub(crate) layout: ParamLayout,
    pub(crate) piece: Option<Piece>,
    pub(crate) segments: usize,
    pub(crate) tied: Vec<(usize, usize)>,
    pub(crate) replicated: Vec<bool>,
    pub(crate) in_steps: bool,
    pub(crate) window: Option<usize>,
    pub(crate) units: Vec<Vec<usize>>,
}

impl<'a, P: AsPtr<PtrTarget = ()> + GetPointerKind> LoadedModel<'a, P> {
    pub(crate) fn new(inner: ModelAbi_TO<'a, P>) -> Result<LoadedModel<'a, P>> {
        let layout = layout_from_abi(&inner.layout().into_result()?);
        let piece = match inner.piece().into_result()?.into_option() {
            Some(p) => Some(piece_from_abi(&p)?),
            None => None,
        };
        let segments = usize_of(inner.segments().into_result()?, "segments")?;
        let tied = inner
            .tied_params()
            .into_result()?
            .iter()
            .map(|r| Ok((usize_of(r.start, "tied parameter")?, usize_of(r.end, "tied parameter")?)))
            .collect::<Result<Vec<_>>>()?;
        let replicated: Vec<bool> =
            inner.replicated_params().into_result()?.iter().map(|&f| f != 0).collect();
        if replicated.len() != layout.specs().len() {
            return Err(Error::invalid(format!(
                "the model reports {} replicated flags for {} parameters",
                replicated.len(),
                layout.specs().len()
            )));
        }
        let in_steps = inner.backward_in_steps().into_result()?;
        let window = match inner.backward_window().into_result()?.into_option() {
            Some(n) => Some(usize_of(n, "backward window")?),
            None => None,
        };
        let units = inner
            .units()
            .into_result()?
            .iter()
            .map(|u| u.iter().map(|&p| usize_of(p, "unit parameter")).collect::<Result<Vec<_>>>())
            .collect::<Result<Vec<_>>>()?;
        check_units(&units, layout.specs().len(), piece.is_some())?;
        Ok(LoadedModel { inner, layout, piece, segments, tied, replicated, in_steps, window, units })
    }
}

#[deny(clippy::missing_trait_methods)]
impl<P: AsMutPtr<PtrTarget = ()> + Send> Model for LoadedModel<'_, P> {
    fn layout(&self) -> &ParamLayout {
        &self.layout
    }
    fn read_params(&self, out: &mut [f32]) -> Result<()> {
        self.inner.read_params(RSliceMut::from_mut_slice(out)).into_result().map_err(Error::from)
    }
    fn write_params(&mut self, src: &[f32]) -> Result<()> {
        self.inner.write_params(RSlice::from_slice(src)).into_result().map_err(Error::from)
    }
    fn forward_backward(&mut self, batch: &Batch<'_>, grads: &mut [f32]) -> Result<f32> {
        self.inner
            .forward_backward(batch_to_abi(batch), RSliceMut::from_mut_slice(grads))
            .into_result()
            .map_err(Error::from)
    }
    fn evaluate(&mut self, batch: &Batch<'_>) -> Result<(f64, usize)> {
        let e = self.inner.evaluate(batch_to_abi(batch)).into_result()?;
        Ok((e.loss_sum, e.correct as usize))
    }
    fn piece(&self) -> Option<Piece> {
        self.piece.clone()
    }
    fn segments(&self) -> usize {
        self.segments
    }
    fn stage_forward(&mut self, micro: u64, segment: usize, input: &[f32], rows: usize) -> Result<Vec<f32>> {
        let out = self
            .inner
            .stage_forward(micro, segment as u64, RSlice::from_slice(input), rows as u64)
            .into_result()?;
        Ok(out.into_vec())
    }
    fn stage_backward(&mut self, micro: u64, segment: usize, grad_output: &[f32]) -> Result<Vec<f32>> {
        let out = self
            .inner
            .stage_backward(micro, segment as u64, RSlice::from_slice(grad_output))
            .into_result()?;
        Ok(out.into_vec())
    }
    fn loss_grad(&mut self, logits: &[f32], labels: &[u32], scale: f32) -> Result<(f64, usize, Vec<f32>)> {
        let r = self
            .inner
            .loss_grad(RSlice::from_slice(logits), RSlice::from_slice(labels), scale)
            .into_result()?;
        Ok((r.loss_sum, r.correct as usize, r.grad.into_vec()))
    }
    fn take_grads(&mut self, out: &mut [f32]) -> Result<()> {
        self.inner.take_grads(RSliceMut::from_mut_slice(out)).into_result().map_err(Error::from)
    }
    fn drop_saved(&mut self) {
        if let Err(e) = self.inner.drop_saved().into_result() {
            tracing_free_warn("model drop_saved", &Error::from(e));
        }
    }
    fn saved_bytes(&self) -> u64 {
        match self.inner.saved_bytes().into_result() {
            Ok(b) => b,
            Err(e) => {
                tracing_free_warn("model saved_bytes", &Error::from(e));
                0
            }
        }
    }
    fn predict(&mut self, batch: &Batch<'_>) -> Result<Vec<f32>> {
        Ok(self.inner.predict(batch_to_abi(batch)).into_result()?.into_vec())
    }
    fn stage_forward_batch(&mut self, micro: u64, segment: usize, batch: &Batch<'_>) -> Result<Vec<f32>> {
        let out = self.inner.stage_forward_batch(micro, segment as u64, batch_to_abi(batch)).into_result()?;
        Ok(out.into_vec())
    }
    fn backward_in_steps(&self) -> bool {
        self.in_steps
    }
    fn backward_begin(&mut self, batch: &Batch<'_>) -> Result<f32> {
        self.inner.backward_begin(batch_to_abi(batch)).into_result().map_err(Error::from)
    }
    fn backward_next(&mut self, pending: &mut [f32]) -> Result<usize> {
        let len = pending.len();
        let left = self.inner.backward_next(RSliceMut::from_mut_slice(pending)).into_result()?;
        match usize::try_from(left) {
            Ok(left) if left <= len => Ok(left),
            _ => Err(Error::invalid(format!(
                "the model's backward step left {left} of {len} gradient values pending"
            ))),
        }
    }
    fn backward_window(&self) -> Option<usize> {
        self.window
    }
    fn backward_next_into(&mut self, window: &mut [f32], end: usize) -> Result<usize> {
        let floor = end.saturating_sub(window.len());
        let left =
            self.inner.backward_next_into(RSliceMut::from_mut_slice(window), end as u64).into_result()?;
        match usize::try_from(left) {
            Ok(left) if (floor..end).contains(&left) => Ok(left),
            _ => Err(Error::invalid(format!(
                "the model's backward step into a window of {end} pending values left {left}, outside {floor}..{end}"
            ))),
        }
    }
    fn units(&self) -> Vec<Vec<usize>> {
        self.units.clone()
    }
    fn unit_begin(&mut self, batch: &Batch<'_>, train: bool) -> Result<()> {
        self.inner.unit_begin(batch_to_abi(batch), train).into_result().map_err(Error::from)
    }
    fn unit_forward(&mut self, unit: usize, params: &[f32]) -> Result<Option<(f64, usize)>> {
        let end = self.inner.unit_forward(unit as u64, RSlice::from_slice(params)).into_result()?;
        Ok(end.into_option().map(|e| (e.loss_sum, e.correct as usize)))
    }
    fn unit_backward(&mut self, unit: usize, params: &[f32], grads: &mut [f32]) -> Result<()> {
        self.inner
            .unit_backward(unit as u64, RSlice::from_slice(params), RSliceMut::from_mut_slice(grads))
            .into_result()
            .map_err(Error::from)
    }
    fn params_mut(&mut self) -> Result<Option<&mut [f32]>> {
        let lent = self.inner.params_mut().into_result().map_err(Error::from)?;
        Ok(lent.into_option().map(RSliceMut::into_mut_slice))
    }
    fn piece_params_mut(&mut self) -> Result<Option<&mut [f32]>> {
        let lent = self.inner.piece_params_mut().into_result().map_err(Error::from)?;
        Ok(lent.into_option().map(RSliceMut::into_mut_slice))
    }
    fn piece_grads_mut(&mut self) -> Result<Option<&mut [f32]>> {
        let lent = self.inner.piece_grads_mut().into_result().map_err(Error::from)?;
        Ok(lent.into_option().map(RSliceMut::into_mut_slice))
    }
    fn tied_params(&self) -> Vec<(usize, usize)> {
        self.tied.clone()
    }
    fn replicated_params(&self) -> Vec<bool> {
        self.replicated.clone()
    }
}

/// A model loaded from a plugin: its layout, piece and segments are asked for once,
/// and a failure to answer is an error here rather than a default later.
pub fn load_model(inner: ModelBox) -> Result<Box<dyn Model>> {
    Ok(Box::new(LoadedModel::new(inner)?))
}

/// A model's units must name every one of its `params` parameters exactly once (or be
/// empty: the model does not run unit by unit).
fn check_units(units: &[Vec<usize>], params: usize, piece: bool) -> Result<()> {
    if units.is_empty() {
        return Ok(());
    }
    let mut seen = vec![false; params];
    for &p in units.iter().flatten() {
        match seen.get_mut(p) {
            Some(s) if !*s => *s = true,
            // A piece shard's tied embedding is read by the embeddings and the head.
            Some(_) if piece => {}
            Some(_) => return Err(Error::invalid(format!("the model lists parameter {p} in two units"))),
            None => return Err(Error::invalid(format!("the model's units name parameter {p} of {params}"))),
        }
    }
    match seen.iter().position(|s| !s) {
        Some(p) => Err(Error::invalid(format!("the model's units leave out parameter {p}"))),
        None => Ok(()),
    }
}
