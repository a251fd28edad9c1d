//! ZeRO stage 2 through a window the size of a bucket and a backward step reduces
//! the same bits as through the whole gradient buffer, on a model whose stepped
//! backward pass is written here.

use super::*;

/// A model of parameters of the given sizes whose stepped backward pass finishes
/// `per_step` parameters a step (as a layer's weight and bias), the last first, into
/// the whole buffer or into a window; each rank's gradients are fixed values of its
/// rank and their index.
struct Steps {
    layout: ParamLayout,
    rank: usize,
    per_step: usize,
    /// The parameters whose gradients are not written yet.
    next: usize,
}

impl Steps {
    fn new(sizes: &[usize], per_step: usize, rank: usize) -> Steps {
        Steps { layout: sheaf_testkit::flat_layout(sizes), rank, per_step, next: 0 }
    }

    /// The values of the step that ends with parameter `last - 1`.
    fn step_range(&self, last: usize) -> std::ops::Range<usize> {
        let first = last.saturating_sub(self.per_step);
        self.layout.range(first).start..self.layout.range(last - 1).end
    }

    fn value(&self, i: usize) -> f32 {
        ((i * 37 + self.rank * 11) % 101) as f32 / 7.0 - 7.0
    }
}

impl Model for Steps {
    fn layout(&self) -> &ParamLayout {
        &self.layout
    }
    fn read_params(&self, out: &mut [f32]) -> Result<()> {
        out.fill(0.0);
        Ok(())
    }
    fn write_params(&mut self, _: &[f32]) -> Result<()> {
        Ok(())
    }
    fn forward_backward(&mut self, _: &Batch<'_>, _: &mut [f32]) -> Result<f32> {
        unreachable!("the exchange runs the stepped pass")
    }
    fn evaluate(&mut self, _: &Batch<'_>) -> Result<(f64, usize)> {
        Ok((0.0, 0))
    }
    fn backward_in_steps(&self) -> bool {
        true
    }
    fn backward_begin(&mut self, _: &Batch<'_>) -> Result<f32> {
        self.next = self.layout.specs().len();
        Ok(1.5)
    }
    fn backward_next(&mut self, pending: &mut [f32]) -> Result<usize> {
        self.backward_next_into(pending, pending.len())
    }
    fn backward_window(&self) -> Option<usize> {
        (1..=self.layout.specs().len()).map(|last| self.step_range(last).len()).max()
    }
    fn backward_next_into(&mut self, window: &mut [f32], end: usize) -> Result<usize> {
        let r = self.step_range(self.next);
        self.next = self.next.saturating_sub(self.per_step);
        assert_eq!(r.end, end, "a step's window ends where the last step left off");
        let base = end - window.len();
        assert!(r.start >= base, "a window of {} values cannot hold parameter {}", window.len(), self.next);
        for i in r.clone() {
            window[i - base] = self.value(i);
        }
        Ok(r.start)
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]

    /// ZeRO stage 2 through a window the size of a bucket and a step reduce-scatters
    /// the same bits into every rank's shard as through a full-size gradient buffer,
    /// for any parameter sizes, bucket size, world, share and exchange path; and the
    /// buffer is smaller than the model wherever buckets and steps are.
    #[test]
    fn zero_2_through_a_window_equals_through_the_whole_buffer(
        sizes in proptest::collection::vec(1usize..40, 1..9),
        per_step in 1usize..=3,
        bucket_bytes in 4usize..200,
        n in 2usize..=4,
        overlap in proptest::bool::ANY,
        share in 0.1f32..1.0,
    ) {
        let outcomes = run_world(n, |comm| {
            let rank = sheaf_core::Communicator::rank(&comm);
            let mut model = Steps::new(&sizes, per_step, rank);
            let layout = model.layout().clone();
            let buckets = crate::buckets(&layout, bucket_bytes);
            let exchange = crate::buckets::Exchange {
                comm: &comm,
                buckets: &buckets,
                wire: crate::GradDType::F32,
                timeout: std::time::Duration::from_secs(30),
                overlap,
            };
            let shards = sheaf_train::Shards::new(&layout, &buckets, rank, n);
            let batch = Batch::Rows { inputs: &[], labels: &[], input_dim: 0 };
            let backward = crate::buckets::Backward::Stepped(&batch);
            let mut grads = vec![0f32; layout.total()];
            let mut whole = vec![0f32; shards.len()];
            let l1 = exchange.scatter(&mut model, &mut grads, &shards, &mut whole, share, backward).unwrap();
            let step = model.backward_window().unwrap();
            let mut held = vec![f32::NAN; exchange.window_sizes(step).0];
            let mut windowed = vec![0f32; shards.len()];
            let l2 = exchange.scatter_windowed(&mut model, &mut held, &shards, &mut windowed, share, &batch).unwrap();
            (l1, l2, whole, windowed, held.len(), layout.total())
        });
        for (rank, (l1, l2, whole, windowed, held, total)) in outcomes.into_iter().enumerate() {
            proptest::prop_assert_eq!(l1, l2);
            proptest::prop_assert_eq!(&whole, &windowed, "rank {}", rank);
            proptest::prop_assert!(held <= total);
        }
    }
}
