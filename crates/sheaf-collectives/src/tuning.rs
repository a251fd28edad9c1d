//! Allreduce choices by measurement, as NCCL's tuner makes them: [`calibrate`] times
//! every algorithm at each size from 4 KiB to 4 MiB on the group itself (its
//! transport, its world size, its machine), and the [`Tuning`] it returns says which
//! algorithm `auto` runs up to each size. A transport is then never judged by another
//! one's crossovers (the fixed rule took direct up to 64 KiB on every transport).

use std::time::Instant;

use sheaf_core::{CommError, Communicator, DType, Deadline, ReduceOp};

use crate::{Algorithm, Group};

/// What `auto` runs: `upto[i].1` for buffers of at most `upto[i].0` bytes (the first
/// that fits), the last entry's algorithm beyond.
#[derive(Clone, Debug, PartialEq)]
pub struct Tuning {
    /// The group size it was measured at: a group of another size does not use it.
    pub world: usize,
    pub upto: Vec<(usize, Algorithm)>,
}

/// The sizes measured: 4 KiB to 512 KiB, doubling. Beyond, ring (bandwidth-optimal,
/// as NCCL's large sizes): measuring there would cost a run memory and time.
pub const SIZES: std::ops::RangeInclusive<u32> = 12..=19;

/// Calibration stops measuring larger sizes once it has run this long (a slow link:
/// the fixed rule decides the rest).
pub const BUDGET: std::time::Duration = std::time::Duration::from_millis(500);

/// The algorithms measured, the fixed rule's first.
const CANDIDATES: [Algorithm; 3] = [Algorithm::Ring, Algorithm::Direct, Algorithm::HalvingDoubling];

/// Another algorithm replaces the fixed rule's choice only when it is faster by more
/// than this share (noise must not flip a choice).
const MARGIN: f64 = 0.05;

impl Tuning {
    /// The algorithm for a `bytes`-long buffer.
    pub fn choose(&self, bytes: usize) -> Algorithm {
        self.upto.iter().find(|(max, _)| bytes <= *max).or(self.upto.last()).map_or(Algorithm::Ring, |u| u.1)
    }

    /// The tuning whose choice at each measured size (`times[size][algorithm]`, in
    /// microseconds, [`SIZES`] by [`CANDIDATES`]) is the fastest, unless the fixed
    /// rule's is within [`MARGIN`] of it; neighbouring sizes with one choice merged.
    pub fn from_times(world: usize, times: &[[f64; 3]]) -> Tuning {
        let mut upto: Vec<(usize, Algorithm)> = Vec::new();
        for (p, row) in SIZES.zip(times) {
            let bytes = 1usize << p;
            let rule = Algorithm::Auto.choose(bytes, world);
            let rule_time = row[CANDIDATES.iter().position(|a| *a == rule).unwrap_or(0)];
            let (best, best_time) = CANDIDATES
                .iter()
                .zip(row)
                .min_by(|a, b| a.1.total_cmp(b.1))
                .map(|(a, t)| (*a, *t))
                .unwrap_or((rule, rule_time));
            let pick = if best_time < rule_time * (1.0 - MARGIN) { best } else { rule };
            match upto.last_mut() {
                Some((max, a)) if *a == pick => *max = bytes,
                _ => upto.push((bytes, pick)),
            }
        }
        // Beyond the largest size measured, ring.
        match upto.last_mut() {
            Some((max, Algorithm::Ring)) => *max = usize::MAX,
            _ => upto.push((usize::MAX, Algorithm::Ring)),
        }
        Tuning { world, upto }
    }
}

/// Times every candidate algorithm at every size of [`SIZES`] on `group` (each rank the
/// same calls: a collective over the group) and returns the tuning all ranks agree on
/// (the slowest rank's time counts). Runs on a context of its own, so nothing it sends
/// can meet the group's own traffic. Each size's runs are capped at 16 MiB of data per
/// algorithm and at about 5 ms, and sizes are measured while the ranks agree that
/// [`BUDGET`] is not spent (those left take the fixed rule's choice): about a quarter
/// of a second on two ranks of one host.
pub fn calibrate(group: &Group, dl: Deadline) -> Result<Tuning, CommError> {
    let world = group.world_size();
    let probes: Vec<Group> = CANDIDATES.iter().map(|&a| group.probe(a)).collect();
    let mut buf = vec![0u8; 1 << SIZES.end()];
    let rule = |bytes: usize| {
        let a = Algorithm::Auto.choose(bytes, world);
        CANDIDATES.map(|c| if c == a { 0.0 } else { f64::INFINITY })
    };
    let mut times: Vec<[f64; 3]> = SIZES.map(|p| rule(1 << p)).collect();
    let start = Instant::now();
    // The agreed time of the last size's fastest call, in microseconds: the next
    // size's runs are as many as take about 5 ms (the same count on every rank).
    let mut last_us: Option<f64> = None;
    'sizes: for (row, p) in times.iter_mut().zip(SIZES) {
        let bytes = 1usize << p;
        let by_time = last_us.map_or(usize::MAX, |us| (5_000.0 / (2.0 * us)) as usize);
        let iters = ((16usize << 20) / bytes).min(by_time).clamp(3, 40);
        let mut measured = [f64::INFINITY; 3];
        // Two interleaved passes, the faster of each kept: drift hits every algorithm.
        for _ in 0..2 {
            for (cell, probe) in measured.iter_mut().zip(&probes) {
                let b = &mut buf[..bytes];
                probe.allreduce(b, DType::F32, ReduceOp::Sum, dl)?; // warm
                let t = Instant::now();
                for _ in 0..iters {
                    probe.allreduce(b, DType::F32, ReduceOp::Sum, dl)?;
                }
                *cell = cell.min(t.elapsed().as_secs_f64() * 1e6 / iters as f64);
            }
        }
        // The slowest rank's times, and whether any rank has spent the budget.
        let mut agreed = [measured[0], measured[1], measured[2], start.elapsed().as_secs_f64()];
        probes[0].allreduce(bytemuck::cast_slice_mut(&mut agreed), DType::F64, ReduceOp::Max, dl)?;
        *row = [agreed[0], agreed[1], agreed[2]];
        last_us = Some(row.iter().copied().fold(f64::INFINITY, f64::min));
        if agreed[3] > BUDGET.as_secs_f64() {
            break 'sizes;
        }
    }
    Ok(Tuning::from_times(world, &times))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(ring: f64, direct: f64, hd: f64) -> [f64; 3] {
        [ring, direct, hd]
    }

    /// The fastest wins by more than the margin, the rule's choice otherwise; runs of
    /// one choice merge and the last reaches every size beyond.
    #[test]
    fn the_fastest_by_a_margin_is_chosen_and_runs_merge() {
        let mut times = vec![row(10.0, 5.0, 9.0); SIZES.count()];
        // 64 KiB (the rule: direct at world 2): ring 20% faster.
        times[4] = row(8.0, 10.0, 11.0);
        // 128 KiB (the rule: ring): halving-doubling only 3% faster, so ring stays.
        times[5] = row(10.0, 12.0, 9.7);
        // From 256 KiB ring is fastest.
        for t in &mut times[6..] {
            *t = row(5.0, 9.0, 7.0);
        }
        let t = Tuning::from_times(2, &times);
        assert_eq!(
            t.upto,
            vec![(32 << 10, Algorithm::Direct), (usize::MAX, Algorithm::Ring)],
            "64 KiB and up: ring"
        );
        assert_eq!(t.choose(4096), Algorithm::Direct);
        assert_eq!(t.choose(32 << 10), Algorithm::Direct);
        assert_eq!(t.choose((32 << 10) + 1), Algorithm::Ring);
        assert_eq!(t.choose(1 << 30), Algorithm::Ring);
        // Halving-doubling where it is clearly fastest, between two directs.
        times[2] = row(10.0, 10.0, 4.0);
        let t = Tuning::from_times(2, &times);
        assert_eq!(t.choose(16 << 10), Algorithm::HalvingDoubling);
        assert_eq!(t.choose(8 << 10), Algorithm::Direct);
        assert_eq!(t.choose(32 << 10), Algorithm::Direct);
    }
}
