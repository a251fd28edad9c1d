//! A synthetic classification set: inputs uniform in `[-1, 1)`, each labelled by a
//! fixed random two-layer "teacher" network drawn from the same seed, so the task is
//! learnable and any size can be generated without files.

use sheaf_core::SplitMix64;

use crate::Dataset;

/// `samples` samples of `input_dim` features in `classes` classes.
pub fn teacher(samples: usize, input_dim: usize, classes: usize, seed: u64) -> Dataset {
    let hidden = 32;
    let mut rng = SplitMix64::new(seed ^ 0x5EED_7EAC_4E12);
    let w1: Vec<f32> = (0..hidden * input_dim).map(|_| rng.next_f32()).collect();
    let w2: Vec<f32> = (0..classes * hidden).map(|_| rng.next_f32()).collect();
    let mut inputs = Vec::with_capacity(samples * input_dim);
    let mut labels = Vec::with_capacity(samples);
    let mut h = vec![0f32; hidden];
    for _ in 0..samples {
        let x: Vec<f32> = (0..input_dim).map(|_| rng.next_f32()).collect();
        for (j, hj) in h.iter_mut().enumerate() {
            let z: f32 = w1[j * input_dim..(j + 1) * input_dim].iter().zip(&x).map(|(w, x)| w * x).sum();
            *hj = z.tanh();
        }
        let label = (0..classes)
            .map(|c| w2[c * hidden..(c + 1) * hidden].iter().zip(&h).map(|(w, h)| w * h).sum::<f32>())
            .enumerate()
            .fold((0, f32::NEG_INFINITY), |best, (c, s)| if s > best.1 { (c, s) } else { best })
            .0;
        inputs.extend_from_slice(&x);
        labels.push(label as u32);
    }
    Dataset { name: "synthetic".into(), inputs, labels, input_dim, num_classes: classes }
}
