//! Optimizer laws: resuming from saved state is bit-for-bit the same as never
//! stopping; bad input is an error, never a panic.

use sheaf_core::{Optimizer, Param};

use super::SplitMix;

type Check = Result<(), String>;

/// Named parameters and a gradient per step, all generated from a seed.
#[derive(Clone, Debug)]
pub struct Problem {
    pub names: Vec<String>,
    pub values: Vec<Vec<f32>>,
    /// `grads[step][param]`.
    pub grads: Vec<Vec<Vec<f32>>>,
}

impl Problem {
    pub fn generate(seed: u64, sizes: &[usize], steps: usize) -> Problem {
        let mut g = SplitMix::new(seed);
        let names = (0..sizes.len()).map(|i| format!("layers.{i}.weight")).collect();
        let values = sizes.iter().map(|&n| (0..n).map(|_| g.next_f32()).collect()).collect();
        let grads = (0..steps)
            .map(|_| sizes.iter().map(|&n| (0..n).map(|_| g.next_f32()).collect()).collect())
            .collect();
        Problem { names, values, grads }
    }
}

/// Runs steps `range` of `problem` on `values` with `opt`.
pub fn run_steps(
    opt: &mut dyn Optimizer,
    problem: &Problem,
    values: &mut [Vec<f32>],
    range: std::ops::Range<usize>,
) -> Check {
    for step in range {
        let mut params: Vec<Param<'_>> = values
            .iter_mut()
            .zip(&problem.names)
            .zip(&problem.grads[step])
            .map(|((v, name), g)| Param { name, value: v.as_mut_slice(), grad: g })
            .collect();
        opt.step(&mut params).map_err(|e| format!("step {step}: {e}"))?;
    }
    Ok(())
}

/// Stopping after `split` steps, saving state, and resuming in a fresh optimizer ends
/// bit-for-bit where an uninterrupted run ends.
pub fn check_resume(make: &dyn Fn() -> Box<dyn Optimizer>, problem: &Problem, split: usize) -> Check {
    let steps = problem.grads.len();
    let mut straight = problem.values.clone();
    run_steps(make().as_mut(), problem, &mut straight, 0..steps)?;

    let mut resumed = problem.values.clone();
    let mut first = make();
    run_steps(first.as_mut(), problem, &mut resumed, 0..split)?;
    let saved = first.state().map_err(|e| format!("state: {e}"))?;
    let mut second = make();
    second.load_state(&saved).map_err(|e| format!("load_state: {e}"))?;
    if second.state().map_err(|e| format!("state: {e}"))? != saved {
        return Err("state() after load_state(s) differs from s".into());
    }
    run_steps(second.as_mut(), problem, &mut resumed, split..steps)?;
    if straight != resumed {
        return Err(format!("resuming after step {split} changed the result"));
    }
    Ok(())
}

/// A gradient of the wrong length is an error, and leaves the parameter alone.
pub fn check_rejects_mismatched_lengths(make: &dyn Fn() -> Box<dyn Optimizer>) -> Check {
    let mut opt = make();
    let mut value = vec![1.0f32; 4];
    let grad = vec![1.0f32; 3];
    let result = opt.step(&mut [Param { name: "w", value: &mut value, grad: &grad }]);
    if result.is_ok() {
        return Err("accepted a gradient of 3 elements for a parameter of 4".into());
    }
    if value != [1.0; 4] {
        return Err("a rejected step changed the parameter".into());
    }
    Ok(())
}

/// The learning rate reads back as set.
pub fn check_learning_rate(make: &dyn Fn() -> Box<dyn Optimizer>) -> Check {
    let mut opt = make();
    opt.set_learning_rate(0.125);
    if opt.learning_rate() != 0.125 {
        return Err(format!("set_learning_rate(0.125) read back {}", opt.learning_rate()));
    }
    Ok(())
}

/// Every optimizer law on one generated problem.
pub fn check_all(make: &dyn Fn() -> Box<dyn Optimizer>, seed: u64) -> Check {
    let problem = Problem::generate(seed, &[17, 1, 64], 6);
    check_resume(make, &problem, 3)?;
    check_rejects_mismatched_lengths(make)?;
    check_learning_rate(make)
}
