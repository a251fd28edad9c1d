//! A data loader's prefetch: samples gathered on a thread of their own, ahead of the
//! step that trains on them, so the copy out of the dataset runs while the model
//! computes instead of between two steps.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc;

use sheaf_core::{Dataset, Error, Result, Samples, TrainConfig};

use crate::optimizer_steps;

/// Requests of [`Dataset::gather`] served in order by a loader thread (see
/// [`with_prefetch`]). A strategy asks for the next step's samples before it trains on
/// this step's; each [`Prefetch::take`] returns the oldest request's samples.
pub struct Prefetch {
    requests: mpsc::Sender<Vec<usize>>,
    ready: mpsc::Receiver<Result<Samples>>,
    pending: usize,
}

impl Prefetch {
    /// Queues a gather of `indices` behind the ones already asked for.
    pub fn request(&mut self, indices: Vec<usize>) -> Result<()> {
        self.requests.send(indices).map_err(|_| loader_gone())?;
        self.pending += 1;
        Ok(())
    }

    /// The samples of the oldest request not yet taken, waiting for its gather.
    pub fn take(&mut self) -> Result<Samples> {
        if self.pending == 0 {
            return Err(Error::BadState("prefetch: samples taken that were never requested".into()));
        }
        self.pending -= 1;
        self.ready.recv().map_err(|_| loader_gone())?
    }
}

fn loader_gone() -> Error {
    Error::BadState("prefetch: the loader thread is gone".into())
}

/// Runs `f` with a [`Prefetch`] over `data`, whose gathers run on a loader thread
/// started for the call and joined before it returns.
///
/// The loader gathers what is asked of it in order, one request at a time, so it holds
/// at most the samples asked for and not yet taken. A gather's error is returned by
/// the [`Prefetch::take`] that takes it; a panic in the dataset is one too, never a
/// panic of the caller. When `f` returns (or fails), requests not taken are dropped.
pub fn with_prefetch<R>(data: &dyn Dataset, f: impl FnOnce(&mut Prefetch) -> Result<R>) -> Result<R> {
    std::thread::scope(|scope| {
        let (requests, asked) = mpsc::channel::<Vec<usize>>();
        let (done, ready) = mpsc::channel();
        std::thread::Builder::new()
            .name("loader".into())
            .spawn_scoped(scope, move || {
                for indices in asked {
                    let samples = catch_unwind(AssertUnwindSafe(|| data.gather(&indices)))
                        .unwrap_or_else(|_| Err(Error::BadState("the dataset panicked in gather".into())));
                    if done.send(samples).is_err() {
                        break;
                    }
                }
            })
            .map_err(|e| Error::BadState(format!("prefetch: cannot start the loader thread: {e}")))?;
        let mut prefetch = Prefetch { requests, ready, pending: 0 };
        // Dropping `prefetch` closes the requests: the loader ends after the gather
        // it is in, and the scope joins it.
        f(&mut prefetch)
    })
}

/// A run's optimizer steps ([`optimizer_steps`] of `train` under `config`), each step's
/// samples asked of a loader thread ([`with_prefetch`]) one step ahead: `ask` requests
/// a step's samples, its micro-batches' in order, and returns what `step` needs to know
/// of them (their sizes, say); `step` trains on a step, taking its samples in the order
/// they were asked for, while the next step's are gathered.
pub fn prefetched_steps<P>(
    train: &dyn Dataset,
    config: &TrainConfig,
    mut ask: impl FnMut(&mut Prefetch, &[(u64, Vec<usize>)]) -> Result<P>,
    mut step: impl FnMut(&mut Prefetch, Vec<(u64, Vec<usize>)>, P) -> Result<()>,
) -> Result<()> {
    with_prefetch(train, |loader| {
        let mut groups = optimizer_steps(train.len(), config).peekable();
        let mut asked = groups.peek().map(|group| ask(loader, group)).transpose()?;
        while let (Some(group), Some(this)) = (groups.next(), asked.take()) {
            asked = groups.peek().map(|group| ask(loader, group)).transpose()?;
            step(loader, group, this)?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rows `i` hold `[i]` and label `i`; gathering index 13 fails, 14 panics.
    struct Numbers;

    impl Dataset for Numbers {
        fn len(&self) -> usize {
            100
        }
        fn gather(&self, indices: &[usize]) -> Result<Samples> {
            if indices.contains(&13) {
                return Err(Error::invalid("unlucky"));
            }
            assert!(!indices.contains(&14), "the dataset's own bug");
            Ok(Samples::Rows {
                inputs: indices.iter().map(|&i| i as f32).collect(),
                labels: indices.iter().map(|&i| i as u32).collect(),
                input_dim: 1,
            })
        }
    }

    #[test]
    fn requests_are_served_in_order_with_the_samples_gather_gives() {
        let asks: Vec<Vec<usize>> = vec![vec![3, 1], vec![], vec![7, 7, 0], vec![99]];
        let got = with_prefetch(&Numbers, |p| {
            // Two ahead, then one in, one out.
            p.request(asks[0].clone())?;
            p.request(asks[1].clone())?;
            let mut got = vec![p.take()?];
            p.request(asks[2].clone())?;
            p.request(asks[3].clone())?;
            for _ in 0..3 {
                got.push(p.take()?);
            }
            Ok(got)
        })
        .unwrap();
        let want: Vec<Samples> = asks.iter().map(|a| Numbers.gather(a).unwrap()).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn a_failed_or_panicking_gather_is_an_error_of_its_own_request() {
        let outcome = with_prefetch(&Numbers, |p| {
            p.request(vec![1])?;
            p.request(vec![13])?;
            p.request(vec![14])?;
            p.request(vec![2])?;
            Ok((p.take(), p.take(), p.take(), p.take()))
        })
        .unwrap();
        assert!(outcome.0.is_ok());
        assert!(matches!(outcome.1, Err(Error::InvalidArgument(_))), "{:?}", outcome.1);
        assert!(matches!(&outcome.2, Err(Error::BadState(m)) if m.contains("panicked")), "{:?}", outcome.2);
        assert_eq!(outcome.3.unwrap(), Numbers.gather(&[2]).unwrap());
    }

    #[test]
    fn taking_more_than_was_asked_is_an_error_not_a_wait() {
        let r = with_prefetch(&Numbers, |p| {
            p.request(vec![1])?;
            p.take()?;
            p.take()
        });
        assert!(matches!(r, Err(Error::BadState(_))), "{r:?}");
    }

    #[test]
    fn requests_left_untaken_are_dropped_when_the_call_returns() {
        let r = with_prefetch(&Numbers, |p| {
            for i in 0..50 {
                p.request(vec![i])?;
            }
            Err::<(), _>(Error::invalid("the step failed"))
        });
        assert!(matches!(r, Err(Error::InvalidArgument(m)) if m.contains("the step failed")));
    }

    /// Asks for every micro-batch of a step, in order.
    fn ask_all(p: &mut Prefetch, group: &[(u64, Vec<usize>)]) -> Result<()> {
        group.iter().try_for_each(|(_, g)| p.request(g.clone()))
    }

    /// Every optimizer step runs once, in order, on the samples asked for it, and each
    /// step's samples are asked for before the step ahead of it runs; an error in
    /// either closure ends the run with it.
    #[test]
    fn steps_run_in_order_on_samples_asked_a_step_ahead() {
        // 100 samples (13 and 14 are never drawn: 40 samples a run), two micro-batches
        // of 5 per step, 4 steps.
        let config = TrainConfig { grad_accum: 2, ..TrainConfig::basic(3, 1, 5, Some(4), 0.1) };
        let avoid =
            |group: &[(u64, Vec<usize>)]| group.iter().all(|(_, g)| !g.iter().any(|i| (13..=14).contains(i)));
        let seed = (0..100).find(|&seed| {
            let c = TrainConfig { seed, ..config.clone() };
            optimizer_steps(100, &c).all(|g| avoid(&g))
        });
        let config = TrainConfig { seed: seed.expect("a seed avoiding 13 and 14"), ..config };
        let expected: Vec<_> = optimizer_steps(100, &config).collect();
        assert_eq!(expected.len(), 4);
        let mut events = Vec::new();
        let log = std::cell::RefCell::new(&mut events);
        let mut asked = 0;
        prefetched_steps(
            &Numbers,
            &config,
            |p, group| {
                ask_all(p, group)?;
                log.borrow_mut().push(format!("ask {asked}"));
                asked += 1;
                Ok(group.to_vec())
            },
            |p, group, told| {
                assert_eq!(group, told);
                for (_, g) in &group {
                    assert_eq!(p.take()?, Numbers.gather(g)?);
                }
                let k = expected.iter().position(|e| *e == group).unwrap();
                log.borrow_mut().push(format!("step {k}"));
                Ok(())
            },
        )
        .unwrap();
        let order = ["ask 0", "ask 1", "step 0", "ask 2", "step 1", "ask 3", "step 2", "step 3"];
        assert_eq!(events, order);

        let failing = |at: usize| {
            let mut steps = 0;
            prefetched_steps(&Numbers, &config, ask_all, |p, group, ()| {
                for _ in &group {
                    p.take()?;
                }
                steps += 1;
                if steps == at {
                    return Err(Error::invalid(format!("step {at} failed")));
                }
                Ok(())
            })
        };
        let e = failing(2).unwrap_err();
        assert!(e.to_string().contains("step 2 failed"), "{e}");
        let e = prefetched_steps(
            &Numbers,
            &config,
            |_, _| Err::<(), _>(Error::invalid("no shard")),
            |_, _, ()| Ok(()),
        )
        .unwrap_err();
        assert!(e.to_string().contains("no shard"), "{e}");
    }
}
