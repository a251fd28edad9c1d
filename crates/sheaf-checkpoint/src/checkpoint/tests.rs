//! The checkpointer between ranks of an in-process world, on the `sheaf-job` fixture's
//! model (`e` [10, 4], `w` [4, 4], `b` [4], `o` [4, 10]): two replicas whose optimizer
//! state is sharded over them (ZeRO 1, each its chunk of every parameter).

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use sheaf_collectives::Group;
use sheaf_core::{
    chunk_range, CheckpointSink, Communicator, OptimState, Optimizer, Param, StateViews, TrainConfig,
};
use sheaf_job::plan::Plan;

use super::{check_resumable, latest, read, Checkpointer, ResumedState};
use crate::universal::tests::Keep;

fn plan() -> Plan {
    sheaf_job::fixture::plan(&[0..3, 0..3], 2, &[None, None])
}

fn config() -> TrainConfig {
    TrainConfig { checkpoint_every: Some(2), ..TrainConfig::basic(1, 1, 4, Some(10), 0.1) }
}

fn checkpointer<'a>(
    comm: &'a Group,
    plan: &'a Plan,
    dir: Option<&Path>,
    asynchronous: bool,
) -> Checkpointer<'a> {
    Checkpointer {
        comm,
        plan,
        run_dir: dir.map(Path::to_path_buf),
        keep: 2,
        config: config(),
        train_len: 40,
        world_size: 2,
        strategy: "any".into(),
        job: serde_json::json!({}),
        timeout: Duration::from_secs(10),
        saved: None,
        preempt: None,
        preempt_dir: None,
        asynchronous,
        pending: None,
        staging: None,
        saves: Vec::new(),
    }
}

/// The whole model's values at `step` (its index, plus the step), and rank `rank`'s
/// moments: its chunk of every parameter, named as ZeRO 1 names them.
fn state_at(plan: &Plan, step: u64, rank: usize) -> (Vec<f32>, OptimState) {
    let layout = &plan.info.layout;
    let params: Vec<f32> = (0..layout.total()).map(|i| i as f32 + step as f32).collect();
    let buffers = layout
        .specs()
        .iter()
        .enumerate()
        .map(|(p, spec)| {
            let own = chunk_range(spec.numel(), 2, rank);
            let at = layout.range(p).start;
            let values = (at + own.start..at + own.end).map(|i| -(i as f32) - step as f32).collect();
            (format!("{}@{}.m", spec.name, own.start), values)
        })
        .collect();
    (params, OptimState { step, buffers })
}

/// Saves at steps 2, 4 and 6, on a thread or not, the state handed over or lent as
/// views (then copied into the staging an earlier save left): every rank writes its
/// part, the newest two are kept, and each rank reads back its parameters and, cut as
/// its optimizer is handed them, its moments; every save is timed.
#[test]
fn every_rank_writes_its_part_and_rank_0_commits() {
    let plan = plan();
    for (asynchronous, views) in [(false, false), (true, false), (false, true), (true, true)] {
        let dir = tempfile::tempdir().unwrap();
        let saves = sheaf_testkit::run_world(2, |comm| {
            let mut sink = checkpointer(&comm, &plan, Some(dir.path()), asynchronous);
            for step in [2, 4, 6] {
                let (params, state) = state_at(&plan, step, comm.rank());
                assert!(sink.due(step));
                if views {
                    let lent = state.buffers.iter().map(|(n, b)| (n.clone(), &b[..])).collect();
                    sink.save_views(step, &params, &StateViews { step: state.step, buffers: lent }).unwrap();
                } else {
                    sink.save_owned(step, &params, state).unwrap();
                }
                assert!(!sink.due(step), "a step is saved once");
            }
            sink.settle(true).unwrap();
            sink.saves.iter().map(|s| (s.step, s.stall_s >= 0.0 && s.write_s > 0.0)).collect::<Vec<_>>()
        });
        assert_eq!(
            saves,
            vec![vec![(2, true), (4, true), (6, true)]; 2],
            "async {asynchronous}, views {views}"
        );
        let checkpoints = dir.path().join(super::CHECKPOINTS);
        let mut names: Vec<String> = std::fs::read_dir(&checkpoints)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["step-00000004", "step-00000006"], "async {asynchronous}, views {views}");
        let (step, newest) = latest(dir.path()).unwrap().unwrap();
        assert_eq!(step, 6);
        for rank in 0..2 {
            let resumed = read(&newest, &plan, rank, "another strategy", &config()).unwrap();
            let (params, state) = state_at(&plan, 6, rank);
            assert_eq!((resumed.state.step, resumed.state.optimizer_step), (6, 6));
            assert_eq!(resumed.params, params, "rank {rank}");
            let ResumedState::Universal(universal) = resumed.optimizer else { panic!("format 2") };
            let mut keep = Keep::default();
            let local = plan.layout_of(rank).clone();
            let mut r = crate::universal::Resharding::new(
                &mut keep,
                Some((universal, local, plan.info.layout.clone(), 6)),
            );
            let mut values: Vec<Vec<f32>> = state.buffers.iter().map(|(_, b)| vec![0.0; b.len()]).collect();
            let names: Vec<String> =
                state.buffers.iter().map(|(n, _)| n.trim_end_matches(".m").to_string()).collect();
            let grads: Vec<Vec<f32>> = values.clone();
            let mut handed: Vec<Param<'_>> = names
                .iter()
                .zip(values.iter_mut())
                .zip(&grads)
                .map(|((name, value), grad)| Param { name, value, grad })
                .collect();
            r.step(&mut handed).unwrap();
            let mut got = keep.0.unwrap();
            got.buffers.sort_by(|a, b| a.0.cmp(&b.0));
            let mut want = state;
            want.buffers.sort_by(|a, b| a.0.cmp(&b.0));
            assert_eq!(got, want, "rank {rank}'s moments");
        }
    }
}

/// A rank that cannot write its part fails the save on every rank; the previous
/// checkpoint stays the newest.
#[test]
fn a_rank_that_cannot_write_fails_the_save_everywhere() {
    let plan = plan();
    let dir = tempfile::tempdir().unwrap();
    let outcomes = sheaf_testkit::run_world(2, |comm| {
        let mut sink = checkpointer(&comm, &plan, Some(dir.path()), false);
        let (params, state) = state_at(&plan, 2, comm.rank());
        sink.write(2, &params, &state).unwrap();
        let (params, mut state) = state_at(&plan, 4, comm.rank());
        if comm.rank() == 1 {
            state.buffers.push(("no.such.param.m".into(), vec![1.0]));
        }
        sink.write(4, &params, &state).map_err(|e| e.to_string())
    });
    assert!(
        outcomes[1].as_ref().unwrap_err().contains("`no.such.param.m` names no parameter"),
        "{outcomes:?}"
    );
    assert!(
        outcomes[0].as_ref().unwrap_err().contains("another rank could not write its part"),
        "{outcomes:?}"
    );
    assert_eq!(latest(dir.path()).unwrap().unwrap().0, 2);
    // Rank 0 cannot make the save's directory (the run directory is a file): every
    // rank is told, and no rank writes.
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"not a directory").unwrap();
    let outcomes = sheaf_testkit::run_world(2, |comm| {
        let mut sink = checkpointer(&comm, &plan, Some(&file), false);
        let (params, state) = state_at(&plan, 2, comm.rank());
        sink.write(2, &params, &state).map_err(|e| e.to_string())
    });
    assert!(outcomes[0].as_ref().unwrap_err().contains("a-file"), "{outcomes:?}");
    assert!(outcomes[1].as_ref().unwrap_err().contains("rank 0 could not make"), "{outcomes:?}");
}

/// A checkpoint of format 1 (the whole model, each rank's optimizer state in the
/// file `state.json` names), as runs before format 2 wrote them, is read by the
/// world and strategy that wrote it, and refused by another, naming both.
#[test]
fn format_1_checkpoints_are_still_read_by_their_own_world() {
    let plan = sheaf_job::fixture::plan(&[0..3, 0..3], 1, &[None, None]);
    let dir = tempfile::tempdir().unwrap();
    let (params, _) = state_at(&plan, 3, 0);
    let bytes = sheaf_report::outputs::safetensors_bytes(&plan.info.layout, &params).unwrap();
    std::fs::write(dir.path().join("model.safetensors"), bytes).unwrap();
    let state = OptimState { step: 3, buffers: vec![("e.m".into(), vec![0.5; 40])] };
    std::fs::write(dir.path().join("optimizer-rank-0.safetensors"), super::state_bytes(&state).unwrap())
        .unwrap();
    let written = super::CheckpointState {
        format: "sheaf-checkpoint-1".into(),
        step: 3,
        micro_step: 3,
        epoch: 0,
        batch_in_epoch: 3,
        seed: 1,
        world_size: 2,
        strategy: "any".into(),
        optimizer_files: vec!["optimizer-rank-0.safetensors".into(); 2],
        job: serde_json::json!({}),
        batch_size: 0,
        grad_accum: 0,
        optimizer_step: 0,
    };
    let json = |s: &super::CheckpointState| serde_json::to_vec(s).unwrap();
    std::fs::write(dir.path().join("state.json"), json(&written)).unwrap();
    for rank in 0..2 {
        let r = read(dir.path(), &plan, rank, "any", &config()).unwrap();
        assert_eq!((r.params, r.state.step), (params.clone(), 3), "rank {rank}");
        let ResumedState::Whole(got) = r.optimizer else { panic!("format 1 is read whole") };
        assert_eq!(got, state, "rank {rank}");
    }
    let e = read(dir.path(), &plan, 0, "another", &config()).err().unwrap().to_string();
    assert!(e.contains("written by 2 ranks of `any` in format 1, this run is 2 of `another`"), "{e}");
    let one = sheaf_job::fixture::plan(std::slice::from_ref(&(0..3)), 1, &[None]);
    let e = read(dir.path(), &one, 0, "any", &config()).err().unwrap().to_string();
    assert!(e.contains("this run is 1 of `any`"), "{e}");
    let outside = super::CheckpointState { optimizer_files: vec!["../x".into(); 2], ..written };
    std::fs::write(dir.path().join("state.json"), json(&outside)).unwrap();
    let e = read(dir.path(), &plan, 1, "any", &config()).err().unwrap().to_string();
    assert!(e.contains("optimizer file `../x` is not a file name"), "{e}");
}

/// A preemption signal on one rank stops every rank at the same step; the save goes
/// to the preemption's directory when the job saves no checkpoints; another
/// global batch is refused on resuming.
#[test]
fn one_rank_signalled_stops_every_rank_and_saves() {
    let plan = plan();
    let dir = tempfile::tempdir().unwrap();
    let stopped = sheaf_testkit::run_world(2, |comm| {
        let mut sink = checkpointer(&comm, &plan, None, false);
        let flag = Arc::new(AtomicBool::new(false));
        (sink.preempt, sink.preempt_dir) = (Some(flag.clone()), Some(dir.path().to_path_buf()));
        let before = sink.preempted(3).unwrap();
        flag.store(comm.rank() == 1, std::sync::atomic::Ordering::SeqCst);
        let after = sink.preempted(4).unwrap();
        let (params, state) = state_at(&plan, 4, comm.rank());
        sink.save(4, &params, &state).unwrap();
        (before, after, sink.asynchronous)
    });
    assert_eq!(stopped, [(false, true, false); 2]);
    assert_eq!(latest(dir.path()).unwrap().unwrap().0, 4);
    let other = TrainConfig { batch_size: 8, ..config() };
    let e = check_resumable(dir.path(), &other).unwrap_err();
    assert!(e.to_string().contains("global batch of 4 samples") && e.exit_code() == 2, "{e}");
    check_resumable(dir.path(), &config()).unwrap();
    // A run directory with no checkpoint yet resumes from the start.
    let fresh = tempfile::tempdir().unwrap();
    check_resumable(fresh.path(), &other).unwrap();
    assert!(latest(fresh.path()).unwrap().is_none());
}
