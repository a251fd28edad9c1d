//! A strategy's hold on its model's parameters: the buffer the model lends, updated in
//! place, or a copy written in after each change.

use sheaf_core::{Communicator, Deadline, Error, Model, Result};

/// Where a strategy updates its model's parameters. A model that keeps them in one
/// flat buffer lends it ([`Model::params_mut`]), and every update (the optimizer's
/// step, ZeRO's allgather, the first broadcast) happens there; otherwise the strategy
/// keeps a copy, equal to the model's, and writes it in after each update
/// ([`Model::write_params`]). The strategy's code is the same either way.
#[derive(Debug)]
pub struct ModelParams {
    /// The copy, for a model that lends nothing.
    copy: Option<Vec<f32>>,
}

impl ModelParams {
    /// A hold on `model`'s current parameters.
    pub fn new(model: &mut dyn Model) -> Result<ModelParams> {
        let copy = match offered(model)? {
            Some(_) => None,
            None => {
                let mut copy = vec![0f32; model.layout().total()];
                model.read_params(&mut copy)?;
                Some(copy)
            }
        };
        Ok(ModelParams { copy })
    }

    /// A hold on `model`'s parameters after they are made those of rank 0 of
    /// `replicas` (every replica starts from the same point).
    pub fn synced(model: &mut dyn Model, replicas: &dyn Communicator, dl: Deadline) -> Result<ModelParams> {
        let mut params = ModelParams::new(model)?;
        params.update(model, |p| Ok(replicas.broadcast(bytemuck::cast_slice_mut(p), 0, dl)?))?;
        Ok(params)
    }

    /// Whether the model lends its buffer (no copy is kept).
    pub fn lent(&self) -> bool {
        self.copy.is_none()
    }

    /// Runs `f` on the parameters, to change them: on the lent buffer, or on the copy,
    /// which is then written into the model (not when `f` fails; the run is over then).
    pub fn update<R>(&mut self, model: &mut dyn Model, f: impl FnOnce(&mut [f32]) -> Result<R>) -> Result<R> {
        match &mut self.copy {
            Some(copy) => {
                let r = f(copy)?;
                model.write_params(copy)?;
                Ok(r)
            }
            None => f(loan(model)?),
        }
    }

    /// Runs `f` on the parameters, without changing them.
    pub fn read<R>(&self, model: &mut dyn Model, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
        match &self.copy {
            Some(copy) => f(copy),
            None => f(loan(model)?),
        }
    }
}

/// The buffer `model` lends, if any, checked to be as long as its layout.
fn offered(model: &mut dyn Model) -> Result<Option<&mut [f32]>> {
    let total = model.layout().total();
    match model.params_mut()? {
        Some(p) if p.len() != total => Err(Error::BadState(format!(
            "the model lent a parameter buffer of {} values, but its layout has {total}",
            p.len()
        ))),
        lent => Ok(lent),
    }
}

/// The buffer of a model that lent it before: lending nothing now is an error.
fn loan(model: &mut dyn Model) -> Result<&mut [f32]> {
    offered(model)?.ok_or_else(|| Error::BadState("the model no longer lends its parameter buffer".into()))
}

#[cfg(test)]
mod tests {
    use super::ModelParams;
    use sheaf_core::{Batch, Error, Model, ParamLayout, ParamSpec, Result};

    /// A model of `n` parameters that lends them or not, and counts its copies.
    struct Flat {
        layout: ParamLayout,
        values: Vec<f32>,
        lends: bool,
        /// What `params_mut` lends: a buffer of the wrong length, when set.
        wrong: Option<Vec<f32>>,
        writes: usize,
    }

    impl Flat {
        fn new(n: usize, lends: bool) -> Flat {
            let layout = ParamLayout::new(vec![ParamSpec { name: "w".into(), shape: vec![n] }]);
            Flat { layout, values: (0..n).map(|i| i as f32).collect(), lends, wrong: None, writes: 0 }
        }
    }

    impl Model for Flat {
        fn layout(&self) -> &ParamLayout {
            &self.layout
        }
        fn read_params(&self, out: &mut [f32]) -> Result<()> {
            out.copy_from_slice(&self.values);
            Ok(())
        }
        fn write_params(&mut self, src: &[f32]) -> Result<()> {
            self.writes += 1;
            self.values.copy_from_slice(src);
            Ok(())
        }
        fn params_mut(&mut self) -> Result<Option<&mut [f32]>> {
            if let Some(wrong) = &mut self.wrong {
                return Ok(Some(wrong));
            }
            Ok(self.lends.then_some(&mut self.values[..]))
        }
        fn forward_backward(&mut self, _: &Batch<'_>, _: &mut [f32]) -> Result<f32> {
            Ok(0.0)
        }
        fn evaluate(&mut self, _: &Batch<'_>) -> Result<(f64, usize)> {
            Ok((0.0, 0))
        }
    }

    /// Lent or copied, an update reaches the model, and only the copy is written in;
    /// a failed update writes nothing.
    #[test]
    fn updates_reach_the_model_lent_or_copied() {
        for lends in [true, false] {
            let mut model = Flat::new(5, lends);
            let mut params = ModelParams::new(&mut model).unwrap();
            assert_eq!(params.lent(), lends);
            params
                .update(&mut model, |p| {
                    p.iter_mut().for_each(|v| *v *= 2.0);
                    Ok(())
                })
                .unwrap();
            assert_eq!(model.values, [0.0, 2.0, 4.0, 6.0, 8.0]);
            assert_eq!(model.writes, usize::from(!lends));
            let sum = params.read(&mut model, |p| Ok(p.iter().sum::<f32>())).unwrap();
            assert_eq!(sum, 20.0);
            let failed = params.update(&mut model, |p| {
                p[0] = 99.0;
                Err::<(), _>(Error::BadState("optimizer failed".into()))
            });
            assert!(failed.is_err());
            assert_eq!(model.writes, usize::from(!lends), "a failed update was written in");
        }
    }

    /// A lent buffer of the wrong length, or one no longer lent, is an error naming it.
    #[test]
    fn a_wrong_or_withdrawn_loan_is_an_error() {
        let mut model = Flat::new(4, true);
        model.wrong = Some(vec![0.0; 3]);
        let err = ModelParams::new(&mut model).unwrap_err().to_string();
        assert!(err.contains("3 values") && err.contains("has 4"), "{err}");

        let mut model = Flat::new(4, true);
        let mut params = ModelParams::new(&mut model).unwrap();
        model.lends = false;
        let err = params.update(&mut model, |_| Ok(())).unwrap_err().to_string();
        assert!(err.contains("no longer lends"), "{err}");
    }
}
