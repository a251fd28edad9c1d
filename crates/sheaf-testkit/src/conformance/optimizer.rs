//! Optimizer laws: resuming from saved state is bit-for-bit the same as never
//! stopping; a zero gradient from a fresh state moves nothing (but weight decay's pull
//! toward zero); a convex quadratic goes down at a small learning rate; bad input is
//! an error, never a panic.

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

/// The state an optimizer lends (`state_views`, where it lends it) is its state: the
/// same step count and the same buffers by name as `state` copies, after every step.
pub fn check_state_views(make: &dyn Fn() -> Box<dyn Optimizer>, problem: &Problem) -> Check {
    let mut opt = make();
    let mut values = problem.values.clone();
    for step in 0..problem.grads.len() {
        run_steps(opt.as_mut(), problem, &mut values, step..step + 1)?;
        let want = opt.state().map_err(|e| format!("state: {e}"))?;
        let Some(views) = opt.state_views().map_err(|e| format!("state_views: {e}"))? else { return Ok(()) };
        if views.copied() != want {
            return Err(format!("after step {step}, the state lent differs from state()"));
        }
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

/// A zero gradient from a fresh state leaves every parameter where it was, or pulled
/// toward zero (decoupled weight decay), never away from zero or across it.
pub fn check_zero_gradient(make: &dyn Fn() -> Box<dyn Optimizer>, problem: &Problem) -> Check {
    let mut values = problem.values.clone();
    let zeros: Vec<Vec<f32>> = values.iter().map(|v| vec![0.0; v.len()]).collect();
    let mut opt = make();
    let mut params: Vec<Param<'_>> = values
        .iter_mut()
        .zip(&problem.names)
        .zip(&zeros)
        .map(|((v, name), g)| Param { name, value: v.as_mut_slice(), grad: g })
        .collect();
    opt.step(&mut params).map_err(|e| format!("a zero-gradient step: {e}"))?;
    for (before, after) in problem.values.iter().flatten().zip(values.iter().flatten()) {
        let toward_zero = after.abs() <= before.abs() && (after * before >= 0.0);
        if !(after == before || toward_zero) || !after.is_finite() {
            return Err(format!(
                "a zero gradient from a fresh state moved a parameter from {before} to {after}"
            ));
        }
    }
    Ok(())
}

/// On `f(x) = sum(a_i x_i^2) / 2` (every `a_i` in [0.5, 2]) with the learning rate set
/// to 0.01, 100 steps lower `f` by a tenth at least, and nothing becomes NaN.
pub fn check_quadratic_descends(make: &dyn Fn() -> Box<dyn Optimizer>, seed: u64) -> Check {
    let mut g = SplitMix::new(seed);
    let n = 32;
    let a: Vec<f32> = (0..n).map(|_| 0.5 + 1.5 * g.next_f32()).collect();
    let mut x: Vec<f32> = (0..n).map(|_| g.next_f32() * 2.0 - 1.0).collect();
    let f = |x: &[f32]| x.iter().zip(&a).map(|(x, a)| 0.5 * f64::from(a * x * x)).sum::<f64>();
    let start = f(&x);
    let mut opt = make();
    opt.set_learning_rate(0.01);
    for step in 0..100 {
        let grad: Vec<f32> = x.iter().zip(&a).map(|(x, a)| a * x).collect();
        opt.step(&mut [Param { name: "x", value: &mut x, grad: &grad }])
            .map_err(|e| format!("quadratic step {step}: {e}"))?;
    }
    let end = f(&x);
    if !end.is_finite() || end > 0.9 * start {
        return Err(format!(
            "100 steps at learning rate 0.01 took a convex quadratic from {start:.4} to {end:.4}"
        ));
    }
    Ok(())
}

/// Every optimizer law on one generated problem.
pub fn check_all(make: &dyn Fn() -> Box<dyn Optimizer>, seed: u64) -> Check {
    let problem = Problem::generate(seed, &[17, 1, 64], 6);
    check_resume(make, &problem, 3)?;
    check_state_views(make, &problem)?;
    check_zero_gradient(make, &problem)?;
    check_quadratic_descends(make, seed)?;
    check_rejects_mismatched_lengths(make)?;
    check_learning_rate(make)
}
