//! What a strategy's in-process tests train with besides the model: momentum SGD, a
//! partitioner of contiguous blocks, sinks that keep what they are handed, one rank's
//! run with them, and the cross-entropy the test models share.

use sheaf_core::{
    CheckpointSink, Communicator, DataPartitioner, Dataset, MetricsSink, Model, OptimState, Optimizer, Param,
    Result, StepMetrics, Strategy, TrainConfig, TrainContext, TrainSummary,
};

/// Momentum SGD (momentum 0.9), its buffer over the parameters in order.
pub struct Momentum {
    pub lr: f64,
    pub buf: Vec<f32>,
}

impl Momentum {
    pub fn new(lr: f64) -> Momentum {
        Momentum { lr, buf: Vec::new() }
    }
}

impl Optimizer for Momentum {
    fn step(&mut self, params: &mut [Param<'_>]) -> Result<()> {
        let total: usize = params.iter().map(|p| p.value.len()).sum();
        self.buf.resize(total, 0.0);
        let mut off = 0;
        for p in params.iter_mut() {
            for ((w, g), b) in p.value.iter_mut().zip(p.grad).zip(&mut self.buf[off..]) {
                *b = 0.9 * *b + g;
                *w -= self.lr as f32 * *b;
            }
            off += p.value.len();
        }
        Ok(())
    }
    fn learning_rate(&self) -> f64 {
        self.lr
    }
    fn set_learning_rate(&mut self, lr: f64) {
        self.lr = lr;
    }
    fn state(&self) -> Result<OptimState> {
        Ok(OptimState { step: 0, buffers: vec![("momentum".into(), self.buf.clone())] })
    }
    fn load_state(&mut self, state: &OptimState) -> Result<()> {
        self.buf = state.get("momentum").unwrap_or_default().to_vec();
        Ok(())
    }
}

/// Balanced contiguous blocks of every batch.
pub struct Blocks;

impl DataPartitioner for Blocks {
    fn shard(&self, _: u64, n: usize, rank: usize, world: usize) -> Result<Vec<usize>> {
        Ok(sheaf_core::chunk_range(n, world, rank).collect())
    }
}

/// Every step's metrics handed over.
#[derive(Default)]
pub struct Collect(pub Vec<StepMetrics>);

impl MetricsSink for Collect {
    fn record(&mut self, m: &StepMetrics) {
        self.0.push(m.clone());
    }
}

/// Every checkpoint handed over: step, parameters, optimizer state.
#[derive(Default)]
pub struct Saved(pub Vec<(u64, Vec<f32>, OptimState)>);

impl CheckpointSink for Saved {
    fn save(&mut self, step: u64, params: &[f32], optimizer: &OptimState) -> Result<()> {
        self.0.push((step, params.to_vec(), optimizer.clone()));
        Ok(())
    }
}

/// The cross-entropy of `logits` (`[labels.len(), classes]`) against
/// `labels`, as `Model::loss_grad` returns it: the summed loss, the number of correct
/// predictions (the first largest logit), and `scale` times the sum's gradient with
/// respect to the logits. Computed in f64.
pub fn softmax_loss_grad(
    logits: &[f32],
    labels: &[u32],
    classes: usize,
    scale: f32,
) -> (f64, usize, Vec<f32>) {
    let (mut loss, mut correct, mut grad) = (0.0f64, 0usize, Vec::with_capacity(logits.len()));
    for (row, &label) in logits.chunks(classes).zip(labels) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let exp: Vec<f64> = row.iter().map(|l| f64::from(l - max).exp()).collect();
        let sum: f64 = exp.iter().sum();
        loss -= (exp[label as usize] / sum).ln();
        let best = (0..classes).max_by(|&a, &b| row[a].total_cmp(&row[b]).then(b.cmp(&a))).unwrap_or(0);
        correct += usize::from(best == label as usize);
        grad.extend(
            exp.iter()
                .enumerate()
                .map(|(k, e)| (e / sum - f64::from(u8::from(k == label as usize))) as f32 * scale),
        );
    }
    (loss, correct, grad)
}

/// Moves `grads` into `out` and zeroes them, as `Model::take_grads` does.
pub fn take(grads: &mut [f32], out: &mut [f32]) {
    out.copy_from_slice(grads);
    grads.fill(0.0);
}

/// What one rank's run gives back: its summary (or its error), every step's metrics,
/// and its optimizer's momentum as the run left it.
pub struct Ran {
    pub summary: Result<TrainSummary>,
    pub metrics: Vec<StepMetrics>,
    pub momentum: Vec<f32>,
}

/// Runs `strategy` on this rank as the strategies' tests do: momentum SGD, contiguous
/// blocks, sinks that keep what they are handed.
pub fn run_rank(
    strategy: &mut dyn Strategy,
    comm: &dyn Communicator,
    model: &mut dyn Model,
    config: TrainConfig,
    data: (&dyn Dataset, &dyn Dataset),
) -> Ran {
    let (mut metrics, mut saved, mut momentum) =
        (Collect::default(), Saved::default(), Momentum::new(config.lr.base));
    let (train, test) = data;
    let summary = strategy.train(TrainContext {
        config,
        comm,
        model,
        optimizer: &mut momentum,
        partitioner: &Blocks,
        train,
        test,
        metrics: &mut metrics,
        checkpoints: &mut saved,
    });
    Ran { summary, metrics: metrics.0, momentum: momentum.buf }
}

/// One step of a global batch of `batch` on this rank (as [`run_rank`] runs it): the
/// error the strategy refused it with, if any. What the strategies' refusal tests ask.
pub fn refusal(
    strategy: &mut dyn Strategy,
    comm: &dyn Communicator,
    model: &mut dyn Model,
    batch: usize,
    data: (&dyn Dataset, &dyn Dataset),
) -> Option<String> {
    let config = TrainConfig::basic(1, 1, batch, Some(1), 0.1);
    run_rank(strategy, comm, model, config, data).summary.err().map(|e| e.to_string())
}

/// A strategy plugin's factory against what it says it provides: each strategy it
/// lists builds from empty settings under its own name; a name it does not list is
/// refused naming `parallel.strategy` and the names it has.
pub fn check_strategy_factory(
    provided: Vec<sheaf_core::Provided>,
    build: impl Fn(&str, &str) -> Result<Box<dyn sheaf_core::Strategy>>,
) {
    let names: Vec<String> = provided
        .into_iter()
        .map(|p| {
            assert_eq!(p.kind, sheaf_core::PluginKind::Strategy, "{}", p.name);
            p.name
        })
        .collect();
    assert!(!names.is_empty(), "a strategy plugin provides a strategy");
    for name in &names {
        let strategy = build(name, "{}").unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(strategy.name(), name);
    }
    let e = build("no-such-strategy", "{}").err().expect("an unknown name is refused").to_string();
    assert!(
        e.contains("parallel.strategy") && e.contains("no-such-strategy") && e.contains(&names[0]),
        "{e}"
    );
}

#[cfg(test)]
mod tests {
    /// The loss, the count of correct predictions (ties to the first class) and the
    /// gradient against their definitions on two rows.
    #[test]
    fn cross_entropy_against_its_definition() {
        let logits = [0.0, 1.0, 1.0, 2.0, 0.0, 0.0];
        let (loss, correct, grad) = super::softmax_loss_grad(&logits, &[1, 0], 3, 0.5);
        let e = std::f64::consts::E;
        let p1 = e / (1.0 + 2.0 * e);
        let p0 = e * e / (e * e + 2.0);
        assert!((loss - (-p1.ln() - p0.ln())).abs() < 1e-12, "{loss}");
        assert_eq!(correct, 2, "row 0's tie goes to class 1, row 1's largest is class 0");
        let want = [
            0.5 / (1.0 + 2.0 * e),
            0.5 * (p1 - 1.0),
            0.5 * p1,
            0.5 * (p0 - 1.0),
            0.5 * (1.0 - p0) / 2.0,
            0.5 * (1.0 - p0) / 2.0,
        ];
        for (g, w) in grad.iter().zip(want) {
            assert!((f64::from(*g) - w).abs() < 1e-6, "{grad:?} vs {want:?}");
        }
        let mut grads = [1.0, 2.0];
        let mut out = [0.0; 2];
        super::take(&mut grads, &mut out);
        assert_eq!((grads, out), ([0.0; 2], [1.0, 2.0]));
    }
}
