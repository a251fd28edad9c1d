//! Compute backend laws, for every model kind a backend lists: initialisation is a
//! function of the seed; gradients are the loss's derivatives (against central finite
//! differences); the pieces a pipeline cuts the model into hold exactly the whole
//! model's parameters and, run stage after stage, give the whole model's loss and
//! gradients; a transformers layout, where the kind has one, covers every parameter
//! and reads back as the same model.

use sheaf_core::{Batch, ComputeBackend, ModelInfo, ModelInput, ModelSpec, Piece, Samples};

use super::SplitMix;

type Check = Result<(), String>;

/// A small model of `kind` for the laws: known kinds get a few hundred parameters; an
/// unknown kind is tried with its defaults (`{}`).
pub fn tiny_spec(kind: &str) -> ModelSpec {
    match kind {
        "mlp" => ModelSpec::mlp(vec![6, 8, 7, 3]),
        "gpt" => {
            ModelSpec::new("gpt", r#"{"n_layer":2,"n_head":2,"n_embd":8,"block_size":5,"vocab_size":11}"#)
        }
        other => ModelSpec::new(other, "{}"),
    }
}

/// `n` samples of what `info` says the model consumes, from `seed`.
pub fn samples(info: &ModelInfo, n: usize, seed: u64) -> Samples {
    let mut g = SplitMix::new(seed);
    match info.input {
        ModelInput::Rows { features, classes } => Samples::Rows {
            inputs: (0..n * features).map(|_| g.next_f32() * 2.0 - 1.0).collect(),
            labels: (0..n).map(|_| (g.next_u64() % classes as u64) as u32).collect(),
            input_dim: features,
        },
        ModelInput::Tokens { vocab_size, block_size } => Samples::Tokens {
            windows: (0..n * (block_size + 1)).map(|_| (g.next_u64() % vocab_size as u64) as u32).collect(),
            window: block_size + 1,
        },
    }
}

fn params_of(backend: &dyn ComputeBackend, spec: &ModelSpec, seed: u64) -> Result<Vec<f32>, String> {
    let model = backend.build_model(spec, seed).map_err(|e| format!("build_model: {e}"))?;
    let mut p = vec![0f32; model.layout().total()];
    model.read_params(&mut p).map_err(|e| format!("read_params: {e}"))?;
    Ok(p)
}

/// The same seed gives the same parameters; another seed, others; `describe` reports
/// the layout the model has.
pub fn check_deterministic_init(backend: &dyn ComputeBackend, spec: &ModelSpec) -> Check {
    let info = backend.describe(spec).map_err(|e| format!("describe: {e}"))?;
    let a = params_of(backend, spec, 7)?;
    if a.len() != info.layout.total() {
        return Err(format!("the model has {} parameters, describe said {}", a.len(), info.layout.total()));
    }
    if a != params_of(backend, spec, 7)? {
        return Err("two models built from seed 7 differ".into());
    }
    if a == params_of(backend, spec, 8)? {
        return Err("models built from seeds 7 and 8 are identical".into());
    }
    if a.iter().any(|v| !v.is_finite()) {
        return Err("initial parameters are not finite".into());
    }
    Ok(())
}

/// Every checked gradient agrees with the central difference of the mean loss,
/// `(L(p + h) - L(p - h)) / 2h`, within a tolerance f32 arithmetic allows.
pub fn check_gradients(backend: &dyn ComputeBackend, spec: &ModelSpec, seed: u64) -> Check {
    let info = backend.describe(spec).map_err(|e| format!("describe: {e}"))?;
    let data = samples(&info, 4, seed);
    let batch = data.batch();
    let mut model = backend.build_model(spec, seed).map_err(|e| format!("build_model: {e}"))?;
    let n = model.layout().total();
    let mut params = vec![0f32; n];
    model.read_params(&mut params).map_err(|e| format!("read_params: {e}"))?;
    let mut grads = vec![0f32; n];
    model.forward_backward(&batch, &mut grads).map_err(|e| format!("forward_backward: {e}"))?;
    let mut loss_at = |p: &[f32], batch: &Batch<'_>| -> Result<f64, String> {
        model.write_params(p).map_err(|e| format!("write_params: {e}"))?;
        let mut scratch = vec![0f32; n];
        model
            .forward_backward(batch, &mut scratch)
            .map(f64::from)
            .map_err(|e| format!("forward_backward: {e}"))
    };
    let mut g = SplitMix::new(seed ^ 0x9e37);
    let h = 1e-2f32;
    let mut worst = (0.0f64, 0usize, 0.0f64, 0.0f64);
    for _ in 0..16 {
        let i = (g.next_u64() % n as u64) as usize;
        let mut p = params.clone();
        p[i] = params[i] + h;
        let up = loss_at(&p, &batch)?;
        p[i] = params[i] - h;
        let down = loss_at(&p, &batch)?;
        let numeric = (up - down) / (2.0 * f64::from(h));
        let analytic = f64::from(grads[i]);
        let err = (numeric - analytic).abs() - (0.05 * numeric.abs().max(analytic.abs()) + 2e-3);
        if err > worst.0 {
            worst = (err, i, numeric, analytic);
        }
    }
    if worst.0 > 0.0 {
        let (_, i, numeric, analytic) = worst;
        let name = &info.layout.specs()
            [(0..info.layout.specs().len()).find(|&k| info.layout.range(k).contains(&i)).unwrap_or(0)]
        .name;
        return Err(format!(
            "{}: gradient of parameter {i} ({name}) is {analytic:.6}, the loss's central difference {numeric:.6}",
            spec.kind
        ));
    }
    Ok(())
}

/// Cut into two pipeline stages: each stage holds exactly its slice of the whole
/// model's parameters, and stage 0's forward, stage 1's forward and loss, then their
/// backward passes, give the whole model's loss and gradients. A backend that cannot
/// cut models (the default `build_piece`) has no pieces to check.
pub fn check_pieces_equal_whole(backend: &dyn ComputeBackend, spec: &ModelSpec, seed: u64) -> Check {
    let info = backend.describe(spec).map_err(|e| format!("describe: {e}"))?;
    let blocks = info.blocks.len();
    if blocks < 2 {
        return Ok(());
    }
    let cut = blocks / 2;
    let pieces = [
        Piece { blocks: 0..cut, tensor_rank: 0, tensor_width: 1 },
        Piece { blocks: cut..blocks, tensor_rank: 0, tensor_width: 1 },
    ];
    let mut stages = Vec::new();
    for piece in &pieces {
        match backend.build_piece(spec, piece, seed) {
            Ok(m) => stages.push(m),
            Err(sheaf_core::Error::Unsupported(_)) => return Ok(()),
            Err(e) => return Err(format!("build_piece {piece:?}: {e}")),
        }
    }
    let whole_params = params_of(backend, spec, seed)?;
    for (piece, stage) in pieces.iter().zip(&stages) {
        let layout = backend.piece_layout(spec, piece).map_err(|e| format!("piece_layout: {e}"))?;
        let mut mine = vec![0f32; stage.layout().total()];
        stage.read_params(&mut mine).map_err(|e| format!("read_params: {e}"))?;
        if mine != layout.slice(&info.layout, &whole_params) {
            return Err(format!("piece {:?} does not hold its slice of the whole model", piece.blocks));
        }
    }

    let data = samples(&info, 3, seed);
    let batch = data.batch();
    let targets = data.targets();
    let mut whole = backend.build_model(spec, seed).map_err(|e| format!("build_model: {e}"))?;
    let mut whole_grads = vec![0f32; whole.layout().total()];
    let mean =
        whole.forward_backward(&batch, &mut whole_grads).map_err(|e| format!("forward_backward: {e}"))?;

    let scale = 1.0 / batch.predictions() as f32;
    let hidden = stages[0].stage_forward_batch(0, 0, &batch).map_err(|e| format!("stage 0 forward: {e}"))?;
    let logits =
        stages[1].stage_forward(0, 0, &hidden, batch.len()).map_err(|e| format!("stage 1 forward: {e}"))?;
    let (sum, _, dlogits) =
        stages[1].loss_grad(&logits, &targets, scale).map_err(|e| format!("loss_grad: {e}"))?;
    let staged_mean = sum / batch.predictions() as f64;
    if (staged_mean - f64::from(mean)).abs() > 1e-4 * (1.0 + staged_mean.abs()) {
        return Err(format!("two stages give a loss of {staged_mean}, the whole model {mean}"));
    }
    let dhidden = stages[1].stage_backward(0, 0, &dlogits).map_err(|e| format!("stage 1 backward: {e}"))?;
    stages[0].stage_backward(0, 0, &dhidden).map_err(|e| format!("stage 0 backward: {e}"))?;
    let mut staged = vec![0f32; whole_grads.len()];
    for (piece, stage) in pieces.iter().zip(stages.iter_mut()) {
        let layout = backend.piece_layout(spec, piece).map_err(|e| format!("piece_layout: {e}"))?;
        let mut g = vec![0f32; stage.layout().total()];
        stage.take_grads(&mut g).map_err(|e| format!("take_grads: {e}"))?;
        // A tied parameter's gradient is the sum over the pieces holding it.
        for (k, idx) in layout.full_indices(&info.layout).into_iter().enumerate() {
            staged[idx] += g[k];
        }
    }
    let worst = staged
        .iter()
        .zip(&whole_grads)
        .map(|(a, b)| (a - b).abs() - 1e-4 * (1.0 + b.abs()))
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(&b.1));
    if let Some((i, err)) = worst.filter(|w| w.1 > 0.0) {
        return Err(format!(
            "two stages' gradient of parameter {i} is {}, the whole model's {} (off by {err:e} beyond tolerance)",
            staged[i], whole_grads[i]
        ));
    }
    Ok(())
}

/// (1.5.) A kind with a Hugging Face transformers layout names one tensor per
/// parameter, no name twice (aliases included), transposes only matrices, and its
/// `config.json` read back ([`ComputeBackend::hf_model`]) is a model of the same kind
/// with the same parameters. A kind without a layout (`Unsupported`) passes.
pub fn check_hf_layout(backend: &dyn ComputeBackend, spec: &ModelSpec) -> Check {
    let hf = match backend.hf_layout(spec) {
        Err(sheaf_core::Error::Unsupported(_)) => return Ok(()),
        Err(e) => return Err(format!("hf_layout: {e}")),
        Ok(hf) => hf,
    };
    let layout = backend.describe(spec).map_err(|e| format!("describe: {e}"))?.layout;
    if hf.tensors.len() != layout.specs().len() {
        return Err(format!(
            "hf_layout names {} tensors for {} parameters",
            hf.tensors.len(),
            layout.specs().len()
        ));
    }
    let mut seen = std::collections::HashSet::new();
    for (t, p) in hf.tensors.iter().zip(layout.specs()) {
        for name in std::iter::once(&t.name).chain(&t.aliases) {
            if !seen.insert(name.clone()) {
                return Err(format!("hf_layout names `{name}` twice"));
            }
        }
        if t.transposed && p.shape.len() != 2 {
            return Err(format!("hf_layout stores `{}` of shape {:?} transposed", p.name, p.shape));
        }
    }
    let back =
        backend.hf_model(&hf.config).map_err(|e| format!("hf_model of hf_layout's config.json: {e}"))?;
    let again = backend.describe(&back).map_err(|e| format!("describe of hf_model's spec: {e}"))?.layout;
    if back.kind != spec.kind || again != layout {
        return Err(format!(
            "hf_layout's config.json reads back as a `{}` model of other parameters than the `{}` model it came from",
            back.kind, spec.kind
        ));
    }
    Ok(())
}

/// Every compute law for one model spec.
pub fn check_all(backend: &dyn ComputeBackend, spec: &ModelSpec, seed: u64) -> Check {
    check_deterministic_init(backend, spec)?;
    check_gradients(backend, spec, seed)?;
    check_pieces_equal_whole(backend, spec, seed)?;
    check_hf_layout(backend, spec)
}

#[cfg(test)]
mod tests {
    use sheaf_core::{Block, Model, ParamLayout, ParamSpec, Result};

    use super::*;

    /// Softmax regression of 3 features onto 2 classes, its gradient scaled by `skew`
    /// (1: right), initialised from the seed.
    struct Linear {
        layout: ParamLayout,
        w: Vec<f32>,
        skew: f32,
    }

    impl Model for Linear {
        fn layout(&self) -> &ParamLayout {
            &self.layout
        }
        fn read_params(&self, out: &mut [f32]) -> Result<()> {
            out.copy_from_slice(&self.w);
            Ok(())
        }
        fn write_params(&mut self, src: &[f32]) -> Result<()> {
            self.w.copy_from_slice(src);
            Ok(())
        }
        fn forward_backward(&mut self, batch: &Batch<'_>, grads: &mut [f32]) -> Result<f32> {
            let Batch::Rows { inputs, labels, .. } = *batch else { unreachable!("rows") };
            grads.fill(0.0);
            let mut loss = 0.0;
            for (x, &y) in inputs.chunks_exact(3).zip(labels) {
                let z: Vec<f32> = (0..2).map(|c| (0..3).map(|k| self.w[c * 3 + k] * x[k]).sum()).collect();
                let m = z[0].max(z[1]);
                let e: Vec<f32> = z.iter().map(|v| (v - m).exp()).collect();
                let s = e[0] + e[1];
                loss += -(e[y as usize] / s).ln();
                for c in 0..2 {
                    let d = e[c] / s - if c == y as usize { 1.0 } else { 0.0 };
                    for k in 0..3 {
                        grads[c * 3 + k] += self.skew * d * x[k] / labels.len() as f32;
                    }
                }
            }
            Ok(loss / labels.len() as f32)
        }
        fn evaluate(&mut self, _batch: &Batch<'_>) -> Result<(f64, usize)> {
            Ok((0.0, 0))
        }
    }

    struct Backend {
        skew: f32,
        /// Tensors `hf_layout` names (none: no layout).
        hf: Option<Vec<sheaf_core::HfTensor>>,
    }

    fn info() -> ModelInfo {
        ModelInfo {
            layout: ParamLayout::new(vec![ParamSpec { name: "w".into(), shape: vec![2, 3] }]),
            blocks: vec![Block { name: "linear".into(), params: 6 }],
            input: ModelInput::Rows { features: 3, classes: 2 },
        }
    }

    impl ComputeBackend for Backend {
        fn device(&self) -> &str {
            "cpu"
        }
        fn model_kinds(&self) -> Vec<String> {
            vec!["linear".into()]
        }
        fn describe(&self, _spec: &ModelSpec) -> Result<ModelInfo> {
            Ok(info())
        }
        fn build_model(&self, _spec: &ModelSpec, seed: u64) -> Result<Box<dyn Model>> {
            let mut g = SplitMix::new(seed);
            let w = (0..6).map(|_| g.next_f32() - 0.5).collect();
            Ok(Box::new(Linear { layout: info().layout, w, skew: self.skew }))
        }
        fn hf_layout(&self, _spec: &ModelSpec) -> Result<sheaf_core::HfLayout> {
            match &self.hf {
                Some(tensors) => Ok(sheaf_core::HfLayout { config: "{}".into(), tensors: tensors.clone() }),
                None => Err(sheaf_core::Error::Unsupported("no layout".into())),
            }
        }
        fn hf_model(&self, _config: &str) -> Result<ModelSpec> {
            Ok(tiny_spec("linear"))
        }
    }

    fn tensor(name: &str, transposed: bool) -> sheaf_core::HfTensor {
        sheaf_core::HfTensor { name: name.into(), aliases: vec![], transposed }
    }

    /// A layout covering the one matrix passes, stored either way; none passes; one
    /// that names two tensors for one parameter fails.
    #[test]
    fn the_hf_law_holds_layouts_to_the_parameters() {
        let spec = tiny_spec("linear");
        for hf in [None, Some(vec![tensor("w", false)]), Some(vec![tensor("w", true)])] {
            check_hf_layout(&Backend { skew: 1.0, hf }, &spec).unwrap();
        }
        let two = Backend { skew: 1.0, hf: Some(vec![tensor("w", false), tensor("b", false)]) };
        let e = check_hf_layout(&two, &spec).unwrap_err();
        assert!(e.contains("2 tensors for 1 parameters"), "{e}");
    }

    /// The laws hold for a right model and catch a gradient 10% off.
    #[test]
    fn the_gradient_law_catches_a_wrong_gradient() {
        let spec = tiny_spec("linear");
        check_all(&Backend { skew: 1.0, hf: None }, &spec, 3).unwrap();
        let e = check_gradients(&Backend { skew: 1.1, hf: None }, &spec, 3).unwrap_err();
        assert!(e.contains("central difference"), "{e}");
    }
}
