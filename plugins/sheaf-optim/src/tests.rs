//! The optimizers against straightforward f64 references of their update formulas,
//! over random parameters and gradients, with state saved and restored mid-way; and
//! the conformance suite, directly and through the plugin ABI adapters.

use proptest::prelude::*;
use sheaf_core::Optimizer;
use sheaf_testkit::conformance::optimizer::{self as laws, Problem};

use crate::{new_optimizer, AdamW, AdamWConfig, Sgd, SgdConfig};

/// `torch.optim.SGD`, one parameter, written out plainly.
fn sgd_reference(c: &SgdConfig, p0: &[f32], grads: &[Vec<f32>]) -> Vec<f64> {
    let mut p: Vec<f64> = p0.iter().map(|&x| f64::from(x)).collect();
    let mut buf: Option<Vec<f64>> = None;
    for g in grads {
        let g: Vec<f64> = g.iter().zip(&p).map(|(&g, &w)| f64::from(g) + c.weight_decay * w).collect();
        let d = if c.momentum != 0.0 {
            let b = match buf.take() {
                None => g.clone(),
                Some(b) => b.iter().zip(&g).map(|(b, g)| c.momentum * b + (1.0 - c.dampening) * g).collect(),
            };
            let d = if c.nesterov {
                g.iter().zip(&b).map(|(g, b)| g + c.momentum * b).collect()
            } else {
                b.clone()
            };
            buf = Some(b);
            d
        } else {
            g
        };
        p.iter_mut().zip(&d).for_each(|(w, d)| *w -= c.lr * d);
    }
    p
}

/// `torch.optim.AdamW`, one parameter, written out plainly.
fn adamw_reference(c: &AdamWConfig, p0: &[f32], grads: &[Vec<f32>]) -> Vec<f64> {
    let mut p: Vec<f64> = p0.iter().map(|&x| f64::from(x)).collect();
    let mut m = vec![0.0; p.len()];
    let mut v = vec![0.0; p.len()];
    for (t, g) in grads.iter().enumerate() {
        let t = (t + 1) as i32;
        for i in 0..p.len() {
            let g = f64::from(g[i]);
            p[i] *= 1.0 - c.lr * c.weight_decay;
            m[i] = c.beta1 * m[i] + (1.0 - c.beta1) * g;
            v[i] = c.beta2 * v[i] + (1.0 - c.beta2) * g * g;
            let mhat = m[i] / (1.0 - c.beta1.powi(t));
            let vhat = v[i] / (1.0 - c.beta2.powi(t));
            p[i] -= c.lr * mhat / (vhat.sqrt() + c.eps);
        }
    }
    p
}

/// Runs `steps` steps, saving the state after `split` and continuing in a fresh
/// optimizer from it, on a single-parameter problem.
fn run_with_resume(make: &dyn Fn() -> Box<dyn Optimizer>, problem: &Problem, split: usize) -> Vec<f32> {
    let mut values = problem.values.clone();
    let mut first = make();
    laws::run_steps(first.as_mut(), problem, &mut values, 0..split).unwrap();
    let mut second = make();
    second.load_state(&first.state().unwrap()).unwrap();
    laws::run_steps(second.as_mut(), problem, &mut values, split..problem.grads.len()).unwrap();
    values.remove(0)
}

fn assert_close(got: &[f32], want: &[f64]) -> Result<(), TestCaseError> {
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let tol = 1e-4 * (1.0 + w.abs());
        prop_assert!((f64::from(g) - w).abs() <= tol, "element {i}: {g} vs reference {w}");
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(sheaf_testkit::proptest_cases(256)))]

    #[test]
    fn sgd_matches_reference(seed in any::<u64>(), len in 1usize..64, steps in 1usize..8, split_at in 0usize..8,
                             lr in 0.001f64..0.5, momentum in prop::sample::select(vec![0.0, 0.5, 0.9]),
                             nesterov in any::<bool>(), weight_decay in prop::sample::select(vec![0.0, 1e-4, 0.1]),
                             dampening in prop::sample::select(vec![0.0, 0.1])) {
        let nesterov = nesterov && momentum > 0.0;
        let dampening = if nesterov { 0.0 } else { dampening };
        let c = SgdConfig { lr, momentum, dampening, nesterov, weight_decay };
        let problem = Problem::generate(seed, &[len], steps);
        let got = run_with_resume(&|| Box::new(Sgd::new(c.clone()).unwrap()), &problem, split_at.min(steps));
        let grads: Vec<Vec<f32>> = problem.grads.iter().map(|g| g[0].clone()).collect();
        assert_close(&got, &sgd_reference(&c, &problem.values[0], &grads))?;
    }

    #[test]
    fn adamw_matches_reference(seed in any::<u64>(), len in 1usize..64, steps in 1usize..8, split_at in 0usize..8,
                               lr in 0.0001f64..0.1, beta1 in 0.0f64..0.99, beta2 in 0.9f64..0.9999,
                               weight_decay in prop::sample::select(vec![0.0, 0.01, 0.1])) {
        let c = AdamWConfig { lr, beta1, beta2, eps: 1e-8, weight_decay };
        let problem = Problem::generate(seed, &[len], steps);
        let got = run_with_resume(&|| Box::new(AdamW::new(c.clone()).unwrap()), &problem, split_at.min(steps));
        let grads: Vec<Vec<f32>> = problem.grads.iter().map(|g| g[0].clone()).collect();
        assert_close(&got, &adamw_reference(&c, &problem.values[0], &grads))?;
    }

    #[test]
    fn conformance(seed in any::<u64>()) {
        for (name, config) in [("sgd", r#"{"lr":0.1,"momentum":0.9,"nesterov":true}"#), ("adamw", "{}")] {
            let direct = || new_optimizer(name, config).unwrap();
            laws::check_all(&direct, seed).map_err(TestCaseError::fail)?;
            // The same through both ABI adapters, as the host sees a loaded plugin.
            let via_abi = || {
                let exported = sheaf_abi::to_abi::optimizer("sheaf-optim", new_optimizer(name, config).unwrap());
                sheaf_abi::from_abi::optimizer(exported).unwrap()
            };
            laws::check_all(&via_abi, seed).map_err(TestCaseError::fail)?;
        }
    }
}

#[test]
fn bad_configs_are_errors_naming_the_key() {
    for (name, config, needle) in [
        ("sgd", r#"{"lr": -1}"#, "lr"),
        ("sgd", r#"{"momentum": 0.9, "nesterov": true, "dampening": 0.5}"#, "nesterov"),
        ("sgd", r#"{"lrr": 0.1}"#, "lrr"),
        ("adamw", r#"{"beta1": 1.5}"#, "beta1"),
        ("adamw", "not json", "adamw"),
        ("lion", "{}", "lion"),
    ] {
        let err = new_optimizer(name, config)
            .err()
            .unwrap_or_else(|| panic!("{name} {config} accepted"))
            .to_string();
        assert!(err.contains(needle), "{name} {config}: {err}");
    }
}

#[test]
fn wrong_state_is_an_error() {
    let mut opt = new_optimizer("adamw", "{}").unwrap();
    let state = sheaf_core::OptimState { step: 3, buffers: vec![("w.exp_avg".into(), vec![0.0; 4])] };
    assert!(opt.load_state(&state).is_err());
    let mut sgd = new_optimizer("sgd", r#"{"momentum":0.9}"#).unwrap();
    let state = sheaf_core::OptimState { step: 1, buffers: vec![("w.exp_avg".into(), vec![0.0; 4])] };
    assert!(sgd.load_state(&state).is_err());
}

/// A step large enough to be shared among threads (parameters of several pieces, with
/// tails, beside small ones) gives the same bits on two and three threads as on one,
/// for every rule and every state a step can find (fresh, then carried).
#[test]
fn a_step_shared_among_threads_equals_one_on_a_single_thread() {
    let sizes = [3 * crate::PIECE + 17, 5, crate::MIN_PARALLEL, 1];
    let problem = Problem::generate(7, &sizes, 3);
    let sgd =
        |c: SgdConfig, threads| Box::new(Sgd::new(c).unwrap().with_threads(threads)) as Box<dyn Optimizer>;
    let make = |rule: &str, threads: usize| match rule {
        "sgd" => sgd(SgdConfig { lr: 0.1, ..SgdConfig::default() }, threads),
        "sgd momentum" => sgd(
            SgdConfig { lr: 0.1, momentum: 0.9, dampening: 0.1, weight_decay: 0.01, ..SgdConfig::default() },
            threads,
        ),
        "sgd nesterov" => {
            sgd(SgdConfig { lr: 0.1, momentum: 0.9, nesterov: true, ..SgdConfig::default() }, threads)
        }
        _ => {
            let c = AdamWConfig { weight_decay: 0.1, ..AdamWConfig::default() };
            Box::new(AdamW::new(c).unwrap().with_threads(threads)) as Box<dyn Optimizer>
        }
    };
    for name in ["sgd", "sgd momentum", "sgd nesterov", "adamw"] {
        let on = |threads: usize| {
            let mut opt = make(name, threads);
            let mut values = problem.values.clone();
            laws::run_steps(opt.as_mut(), &problem, &mut values, 0..problem.grads.len()).unwrap();
            (values, opt.state().unwrap())
        };
        let (one, one_state) = on(1);
        for threads in [2, 3] {
            let (many, many_state) = on(threads);
            assert_eq!(one, many, "{name} on {threads} threads: parameters differ");
            assert_eq!(one_state, many_state, "{name} on {threads} threads: state differs");
        }
        assert_ne!(one, problem.values, "{name}: nothing was stepped");
    }
}

/// A parameter named twice in one step is refused before anything changes.
#[test]
fn a_name_given_twice_is_refused_and_changes_nothing() {
    for (name, config) in [("sgd", r#"{"momentum":0.9}"#), ("adamw", "{}")] {
        let mut opt = new_optimizer(name, config).unwrap();
        let (mut a, mut b) = (vec![1.0f32; 4], vec![2.0f32; 4]);
        let g = vec![0.5f32; 4];
        let mut params = [
            sheaf_core::Param { name: "w", value: &mut a, grad: &g },
            sheaf_core::Param { name: "w", value: &mut b, grad: &g },
        ];
        let err = opt.step(&mut params).unwrap_err().to_string();
        assert!(err.contains("`w` given twice"), "{name}: {err}");
        assert_eq!((a, b), (vec![1.0; 4], vec![2.0; 4]), "{name}: a refused step changed parameters");
        assert!(opt.state().unwrap().buffers.is_empty(), "{name}: a refused step made state");
    }
}

/// The plugin lists exactly what it builds.
#[test]
fn provides_what_it_builds() {
    use sheaf_abi::Plugin;
    let names: Vec<String> = crate::OptimPlugin::provides().into_iter().map(|p| p.name).collect();
    assert_eq!(names, ["sgd", "adamw"]);
    for name in &names {
        assert!(new_optimizer(name, "{}").is_ok(), "{name}");
    }
}

/// A bad value names the optimizer and the key; settings that are not an object name
/// the optimizer alone.
#[test]
fn config_errors_name_the_optimizer_and_the_key() {
    let e = new_optimizer("sgd", r#"{"lr": "fast"}"#).err().unwrap().to_string();
    assert!(e.contains("optimizer sgd: lr"), "{e}");
    let e = new_optimizer("adamw", "7").err().unwrap().to_string();
    assert!(e.contains("optimizer adamw") && !e.contains("optimizer adamw:"), "{e}");
}

/// What an optimizer says it will keep per parameter (the plan's figure) is what it
/// holds once it has stepped: plain SGD nothing, SGD with momentum one buffer, AdamW
/// two.
#[test]
fn the_state_it_announces_is_the_state_it_keeps() {
    for (name, config, values) in
        [("sgd", r#"{"momentum": 0.0}"#, 0u32), ("sgd", r#"{"momentum": 0.9}"#, 1), ("adamw", "{}", 2)]
    {
        let mut opt = new_optimizer(name, config).unwrap();
        assert_eq!(opt.state_values_per_param(), Some(values), "{name} {config}");
        let (mut w, mut b) = (vec![0.5f32; 300], vec![0.1f32; 7]);
        let (gw, gb) = (vec![0.01f32; 300], vec![0.02f32; 7]);
        let mut params = [
            sheaf_core::Param { name: "w", value: &mut w, grad: &gw },
            sheaf_core::Param { name: "b", value: &mut b, grad: &gb },
        ];
        opt.step(&mut params).unwrap();
        assert_eq!(opt.state_bytes().unwrap(), 4 * u64::from(values) * 307, "{name} {config}");
    }
}

/// Both optimizers lend their state, also through the plugin ABI (where the lent
/// buffers are the optimizer's own memory, not copies).
#[test]
fn both_optimizers_lend_their_state_through_the_abi() {
    for (name, config) in [("adamw", "{}"), ("sgd", r#"{"momentum": 0.9}"#)] {
        let exported = sheaf_abi::to_abi::optimizer("sheaf-optim", new_optimizer(name, config).unwrap());
        let mut opt = sheaf_abi::from_abi::optimizer(exported).unwrap();
        let (mut value, grad) = (vec![1.0f32; 100], vec![0.5f32; 100]);
        opt.step(&mut [sheaf_core::Param { name: "w", value: &mut value, grad: &grad }]).unwrap();
        let views = opt.state_views().unwrap().expect("lent");
        assert_eq!(views.copied(), opt.state().unwrap(), "{name}");
        let first = views.buffers[0].1.as_ptr();
        let again = opt.state_views().unwrap().expect("lent");
        assert_eq!(again.buffers[0].1.as_ptr(), first, "{name}: lent twice, the same memory");
    }
}
