//! `trace.json`: where a run's time went, in Chrome's trace format (opens in
//! Perfetto): a track per rank (and per thread of it), with spans for forward and
//! backward passes, each collective with its size, point-to-point waits and optimizer
//! steps. The host records them by wrapping what it lends a strategy (the
//! communicator, the model, the optimizer), so no strategy or ABI change is needed.
//!
//! Stragglers: each world collective's span starts when its rank arrives. Rank 0
//! gathers every rank's spans, and for each world collective the last rank to arrive
//! made each other rank wait the difference; `summary.json` names the rank that made
//! the others wait longest, and for how long in all. (Ranks' clocks are the system
//! clock: exact on one host, as good as their synchronisation across hosts.)

use std::cell::Cell;
use std::ops::Deref;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use sheaf_core::{
    Batch, CommError, Communicator, DType, Deadline, Model, OptimState, Optimizer, Param, ParamLayout, Piece,
    ReduceOp, Result,
};

/// Spans kept per rank at most (a long run keeps its first ones).
const MAX_EVENTS: usize = 200_000;

/// One span (a Chrome trace "complete" event).
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct Span {
    pub name: String,
    pub cat: String,
    /// Start, in microseconds since the Unix epoch.
    pub ts: f64,
    pub dur: f64,
    pub tid: u64,
    /// For collectives of the world group: its sequence number there.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub world_seq: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
}

/// A rank's spans, from every thread that works for it, and its flight recorder.
pub struct Recorder {
    rank: usize,
    /// The last calls on the communicators the strategy is lent ([`crate::flight`]).
    pub flight: crate::flight::Flight,
    spans: Mutex<Vec<Span>>,
    origin: (Instant, f64),
    dropped: AtomicUsize,
    /// A test-only delay before each forward pass (`SHEAF_TEST_SLOW_MS` on the rank
    /// `SHEAF_TEST_SLOW_RANK`): a straggler made on purpose.
    slow: Option<std::time::Duration>,
    /// A test-only delay before each evaluation pass, on every rank
    /// (`SHEAF_TEST_SLOW_EVAL_MS`): an evaluation long enough to be preempted in.
    slow_eval: Option<std::time::Duration>,
}

/// The test-only delay for `rank`: `SHEAF_TEST_SLOW_MS` when `SHEAF_TEST_SLOW_RANK`
/// is this rank (a straggler made on purpose, for the tests that must find one).
pub fn test_slowdown(rank: usize) -> Option<std::time::Duration> {
    let slow_rank = std::env::var("SHEAF_TEST_SLOW_RANK").ok().and_then(|r| r.parse::<usize>().ok());
    (slow_rank == Some(rank))
        .then(|| std::env::var("SHEAF_TEST_SLOW_MS").ok().and_then(|m| m.parse().ok()))
        .flatten()
        .map(std::time::Duration::from_millis)
}

/// A test-only skew of this rank's clock: `SHEAF_TEST_CLOCK_SKEW_MS` when
/// `SHEAF_TEST_CLOCK_SKEW_RANK` is this rank (hosts whose clocks disagree, made on one).
fn test_clock_skew_us(rank: usize) -> f64 {
    let var = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<f64>().ok());
    match var("SHEAF_TEST_CLOCK_SKEW_RANK") {
        Some(r) if r == rank as f64 => var("SHEAF_TEST_CLOCK_SKEW_MS").unwrap_or(0.0) * 1e3,
        _ => 0.0,
    }
}

thread_local! {
    static TID: Cell<u64> = const { Cell::new(0) };
}

fn tid() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    TID.with(|t| {
        if t.get() == 0 {
            t.set(NEXT.fetch_add(1, Ordering::Relaxed));
        }
        t.get()
    })
}

impl Recorder {
    pub fn new(rank: usize) -> Arc<Recorder> {
        let unix_us = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64() * 1e6)
            + test_clock_skew_us(rank);
        let slow = test_slowdown(rank);
        Arc::new(Recorder {
            rank,
            flight: crate::flight::Flight::default(),
            spans: Mutex::new(Vec::new()),
            origin: (Instant::now(), unix_us),
            dropped: AtomicUsize::new(0),
            slow,
            slow_eval: std::env::var("SHEAF_TEST_SLOW_EVAL_MS")
                .ok()
                .and_then(|m| m.parse().ok())
                .map(std::time::Duration::from_millis),
        })
    }

    /// This rank's clock, in µs since the Unix epoch (as the spans have it).
    pub fn now_us(&self) -> f64 {
        self.origin.1 + self.origin.0.elapsed().as_secs_f64() * 1e6
    }

    /// Runs `f` as a span.
    fn span<T>(
        &self,
        name: &str,
        cat: &str,
        bytes: Option<u64>,
        world_seq: Option<u64>,
        f: impl FnOnce() -> T,
    ) -> T {
        let ts = self.now_us();
        let out = f();
        let span = Span {
            name: name.to_string(),
            cat: cat.to_string(),
            ts,
            dur: self.now_us() - ts,
            tid: tid(),
            world_seq,
            bytes,
        };
        let mut spans = self.spans.lock().unwrap_or_else(|e| e.into_inner());
        if spans.len() < MAX_EVENTS {
            spans.push(span);
        } else {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        out
    }

    /// Writes the flight recorder's calls (`RUN_DIR/flight/rank-N.json`).
    pub fn write_flight(&self) {
        self.flight.write(self.rank, self.now_us());
    }

    /// Runs `f`, a call of group `group`, in the flight recorder; a call that fails
    /// writes the record.
    fn flown<T>(
        &self,
        group: &str,
        (op, seq, peer, bytes): (&str, u64, Option<usize>, usize),
        f: impl FnOnce() -> std::result::Result<T, CommError>,
    ) -> std::result::Result<T, CommError> {
        let call = crate::flight::Call {
            group: group.to_owned(),
            op: op.to_owned(),
            seq,
            peer,
            bytes: bytes as u64,
            enter_us: self.now_us(),
            leave_us: None,
            error: None,
        };
        let id = self.flight.enter(call);
        let out = f();
        self.flight.leave(id, self.now_us(), out.as_ref().err().map(ToString::to_string));
        if out.is_err() {
            self.write_flight();
        }
        out
    }

    /// This rank's spans as JSON (to gather on rank 0).
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(&*self.spans.lock().unwrap_or_else(|e| e.into_inner())).unwrap_or_default()
    }
}

/// A communicator whose calls are spans of `rec` and calls of its flight recorder;
/// collectives are numbered per group, point-to-point calls per peer.
pub struct TracedComm<C> {
    inner: C,
    rec: Arc<Recorder>,
    /// `world`, or `<parent>/<split call>.<color>`: the same on every rank of the group.
    group: String,
    /// Collectives so far.
    calls: AtomicU64,
    /// Sends to and receives from each peer so far.
    p2p: Mutex<std::collections::HashMap<(bool, usize), u64>>,
    world: bool,
}

impl<C> TracedComm<C> {
    pub fn world(inner: C, rec: Arc<Recorder>) -> TracedComm<C> {
        TracedComm::group(inner, rec, "world".into(), true)
    }

    fn group(inner: C, rec: Arc<Recorder>, group: String, world: bool) -> TracedComm<C> {
        TracedComm { inner, rec, group, calls: AtomicU64::new(0), p2p: Mutex::default(), world }
    }

    fn collective<T>(
        &self,
        name: &str,
        bytes: usize,
        f: impl FnOnce() -> std::result::Result<T, CommError>,
    ) -> std::result::Result<T, CommError> {
        let seq = self.calls.fetch_add(1, Ordering::Relaxed);
        let world_seq = self.world.then_some(seq);
        self.rec.flown(&self.group, (name, seq, None, bytes), || {
            self.rec.span(name, "collective", Some(bytes as u64), world_seq, f)
        })
    }

    /// The number of this rank's next send to (`sending`) or receive from `peer`.
    fn p2p_seq(&self, sending: bool, peer: usize) -> u64 {
        let mut counts = self.p2p.lock().unwrap_or_else(|e| e.into_inner());
        let n = counts.entry((sending, peer)).or_insert(0);
        *n += 1;
        *n
    }
}

impl<'a, C: Deref<Target = dyn Communicator + 'a> + Send + Sync> Communicator for TracedComm<C> {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world_size(&self) -> usize {
        self.inner.world_size()
    }
    fn send(&self, peer: usize, tag: u32, data: &[u8], dl: Deadline) -> std::result::Result<(), CommError> {
        let seq = self.p2p_seq(true, peer);
        self.rec.flown(&self.group, ("send", seq, Some(peer), data.len()), || {
            self.rec
                .span("send", "p2p", Some(data.len() as u64), None, || self.inner.send(peer, tag, data, dl))
        })
    }
    fn recv(&self, peer: usize, tag: u32, dl: Deadline) -> std::result::Result<Vec<u8>, CommError> {
        // Time in a receive is time waiting for the peer.
        let seq = self.p2p_seq(false, peer);
        self.rec.flown(&self.group, ("recv", seq, Some(peer), 0), || {
            self.rec.span("recv (waiting)", "wait", None, None, || self.inner.recv(peer, tag, dl))
        })
    }
    fn order_point_to_point(&self) -> std::result::Result<bool, CommError> {
        self.inner.order_point_to_point()
    }
    fn allreduce(
        &self,
        buf: &mut [u8],
        dtype: DType,
        op: ReduceOp,
        dl: Deadline,
    ) -> std::result::Result<(), CommError> {
        self.collective("allreduce", buf.len(), || self.inner.allreduce(buf, dtype, op, dl))
    }
    fn broadcast(&self, buf: &mut [u8], root: usize, dl: Deadline) -> std::result::Result<(), CommError> {
        self.collective("broadcast", buf.len(), || self.inner.broadcast(buf, root, dl))
    }
    fn allgather(&self, input: &[u8], output: &mut [u8], dl: Deadline) -> std::result::Result<(), CommError> {
        self.collective("allgather", output.len(), || self.inner.allgather(input, output, dl))
    }
    fn reduce_scatter(
        &self,
        input: &[u8],
        output: &mut [u8],
        dtype: DType,
        op: ReduceOp,
        dl: Deadline,
    ) -> std::result::Result<(), CommError> {
        self.collective("reduce_scatter", input.len(), || {
            self.inner.reduce_scatter(input, output, dtype, op, dl)
        })
    }
    fn barrier(&self, dl: Deadline) -> std::result::Result<(), CommError> {
        self.collective("barrier", 0, || self.inner.barrier(dl))
    }
    fn reduce(
        &self,
        buf: &mut [u8],
        dtype: DType,
        op: ReduceOp,
        root: usize,
        dl: Deadline,
    ) -> std::result::Result<(), CommError> {
        self.collective("reduce", buf.len(), || self.inner.reduce(buf, dtype, op, root, dl))
    }
    fn gather(
        &self,
        input: &[u8],
        output: &mut [u8],
        root: usize,
        dl: Deadline,
    ) -> std::result::Result<(), CommError> {
        self.collective("gather", input.len(), || self.inner.gather(input, output, root, dl))
    }
    fn scatter(
        &self,
        input: &[u8],
        output: &mut [u8],
        root: usize,
        dl: Deadline,
    ) -> std::result::Result<(), CommError> {
        self.collective("scatter", output.len(), || self.inner.scatter(input, output, root, dl))
    }
    fn all_to_all(
        &self,
        input: &[u8],
        output: &mut [u8],
        dl: Deadline,
    ) -> std::result::Result<(), CommError> {
        self.collective("all_to_all", input.len(), || self.inner.all_to_all(input, output, dl))
    }
    fn split(
        &self,
        color: Option<u32>,
        key: u32,
        dl: Deadline,
    ) -> std::result::Result<Option<Box<dyn Communicator>>, CommError> {
        let seq = self.calls.load(Ordering::Relaxed);
        let sub = self.collective("split", 0, || self.inner.split(color, key, dl))?;
        Ok(sub.map(|s| {
            let group = format!("{}/{seq}.{}", self.group, color.unwrap_or(0));
            Box::new(TracedComm::group(s, self.rec.clone(), group, false)) as Box<dyn Communicator>
        }))
    }
}

/// A model whose passes are spans of `rec`.
pub struct TracedModel<'a> {
    pub inner: &'a mut dyn Model,
    pub rec: Arc<Recorder>,
}

impl TracedModel<'_> {
    fn slow(&self) {
        if let Some(d) = self.rec.slow {
            std::thread::sleep(d);
        }
    }

    /// Runs `f` on the model as a compute span named `name`.
    fn timed<T>(&mut self, name: &str, f: impl FnOnce(&mut dyn Model) -> T) -> T {
        let (rec, inner) = (self.rec.clone(), &mut *self.inner);
        rec.span(name, "compute", None, None, || f(inner))
    }
}

// A wrapper forwards every method: one left to its default would silently turn a
// capability off for traced runs (as the piece shard's buffers once were).
#[deny(clippy::missing_trait_methods)]
impl Model for TracedModel<'_> {
    fn layout(&self) -> &ParamLayout {
        self.inner.layout()
    }
    fn read_params(&self, out: &mut [f32]) -> Result<()> {
        self.inner.read_params(out)
    }
    fn write_params(&mut self, src: &[f32]) -> Result<()> {
        self.inner.write_params(src)
    }
    fn params_mut(&mut self) -> Result<Option<&mut [f32]>> {
        self.inner.params_mut()
    }
    fn forward_backward(&mut self, batch: &Batch<'_>, grads: &mut [f32]) -> Result<f32> {
        self.slow();
        self.timed("forward+backward", |m| m.forward_backward(batch, grads))
    }
    fn backward_in_steps(&self) -> bool {
        self.inner.backward_in_steps()
    }
    fn backward_begin(&mut self, batch: &Batch<'_>) -> Result<f32> {
        self.slow();
        self.timed("forward", |m| m.backward_begin(batch))
    }
    fn backward_next(&mut self, pending: &mut [f32]) -> Result<usize> {
        self.timed("backward", |m| m.backward_next(pending))
    }
    fn backward_window(&self) -> Option<usize> {
        self.inner.backward_window()
    }
    fn backward_next_into(&mut self, window: &mut [f32], end: usize) -> Result<usize> {
        self.timed("backward", |m| m.backward_next_into(window, end))
    }
    fn evaluate(&mut self, batch: &Batch<'_>) -> Result<(f64, usize)> {
        if let Some(d) = self.rec.slow_eval {
            std::thread::sleep(d);
        }
        self.timed("evaluate", |m| m.evaluate(batch))
    }
    fn predict(&mut self, batch: &Batch<'_>) -> Result<Vec<f32>> {
        self.inner.predict(batch)
    }
    fn piece(&self) -> Option<Piece> {
        self.inner.piece()
    }
    fn segments(&self) -> usize {
        self.inner.segments()
    }
    fn stage_forward(&mut self, micro: u64, segment: usize, input: &[f32], rows: usize) -> Result<Vec<f32>> {
        self.timed("forward", |m| m.stage_forward(micro, segment, input, rows))
    }
    fn stage_forward_batch(&mut self, micro: u64, segment: usize, batch: &Batch<'_>) -> Result<Vec<f32>> {
        self.slow();
        self.timed("forward", |m| m.stage_forward_batch(micro, segment, batch))
    }
    fn tied_params(&self) -> Vec<(usize, usize)> {
        self.inner.tied_params()
    }
    fn replicated_params(&self) -> Vec<bool> {
        self.inner.replicated_params()
    }
    fn stage_backward(&mut self, micro: u64, segment: usize, grad_output: &[f32]) -> Result<Vec<f32>> {
        self.timed("backward", |m| m.stage_backward(micro, segment, grad_output))
    }
    fn loss_grad(&mut self, logits: &[f32], labels: &[u32], scale: f32) -> Result<(f64, usize, Vec<f32>)> {
        self.timed("loss", |m| m.loss_grad(logits, labels, scale))
    }
    fn take_grads(&mut self, out: &mut [f32]) -> Result<()> {
        self.inner.take_grads(out)
    }
    fn drop_saved(&mut self) {
        self.inner.drop_saved()
    }
    fn saved_bytes(&self) -> u64 {
        self.inner.saved_bytes()
    }
    fn units(&self) -> Vec<Vec<usize>> {
        self.inner.units()
    }
    fn piece_params_mut(&mut self) -> Result<Option<&mut [f32]>> {
        self.inner.piece_params_mut()
    }
    fn piece_grads_mut(&mut self) -> Result<Option<&mut [f32]>> {
        self.inner.piece_grads_mut()
    }
    fn unit_begin(&mut self, batch: &Batch<'_>, train: bool) -> Result<()> {
        self.slow();
        self.inner.unit_begin(batch, train)
    }
    fn unit_forward(&mut self, unit: usize, params: &[f32]) -> Result<Option<(f64, usize)>> {
        self.timed("forward", |m| m.unit_forward(unit, params))
    }
    fn unit_backward(&mut self, unit: usize, params: &[f32], grads: &mut [f32]) -> Result<()> {
        self.timed("backward", |m| m.unit_backward(unit, params, grads))
    }
}

/// An optimizer whose steps are spans of `rec`.
pub struct TracedOptimizer<'a> {
    pub inner: &'a mut dyn Optimizer,
    pub rec: Arc<Recorder>,
}

#[deny(clippy::missing_trait_methods)]
impl Optimizer for TracedOptimizer<'_> {
    fn step(&mut self, params: &mut [Param<'_>]) -> Result<()> {
        let (rec, inner) = (self.rec.clone(), &mut *self.inner);
        rec.span("optimizer step", "optimizer", None, None, || inner.step(params))
    }
    fn learning_rate(&self) -> f64 {
        self.inner.learning_rate()
    }
    fn set_learning_rate(&mut self, lr: f64) {
        self.inner.set_learning_rate(lr)
    }
    fn state(&self) -> Result<OptimState> {
        self.inner.state()
    }
    fn load_state(&mut self, state: &OptimState) -> Result<()> {
        self.inner.load_state(state)
    }
    fn take_state(&mut self) -> Result<OptimState> {
        self.inner.take_state()
    }
    fn state_views(&self) -> Result<Option<sheaf_core::StateViews<'_>>> {
        self.inner.state_views()
    }
    fn state_bytes(&self) -> Result<u64> {
        self.inner.state_bytes()
    }
    fn state_values_per_param(&self) -> Option<u32> {
        self.inner.state_values_per_param()
    }
}

/// Which rank made the others wait at the world's collectives, and how long in all.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Stragglers {
    /// Seconds each rank made the others wait (the sum over world collectives of the
    /// others' waits for it when it arrived last).
    pub made_others_wait_s: Vec<f64>,
    /// The rank that made them wait longest, if anyone waited.
    pub straggler: Option<usize>,
    /// Each rank's clock less rank 0's, in ms, as measured when the spans were
    /// gathered ([`align_clocks`]); the spans were moved onto rank 0's clock.
    pub clock_offsets_ms: Vec<f64>,
}

/// Moves each rank's spans onto rank 0's clock: `offsets_us[r]` is rank r's clock
/// less rank 0's (hosts' clocks disagree; a trace and its stragglers compare times
/// across ranks).
pub fn align_clocks(ranks: &mut [Vec<Span>], offsets_us: &[f64]) {
    for (spans, off) in ranks.iter_mut().zip(offsets_us) {
        for s in spans {
            s.ts -= off;
        }
    }
}

/// A clock offset from round trips `(sent, peer's clock, received)` (NTP's rule):
/// the peer's clock less this one's at the middle of the shortest round trip, where
/// the one-way times are most nearly equal.
pub fn clock_offset_us(samples: &[(f64, f64, f64)]) -> f64 {
    samples
        .iter()
        .min_by(|a, b| (a.2 - a.0).total_cmp(&(b.2 - b.0)))
        .map_or(0.0, |&(t0, peer, t1)| peer - (t0 + t1) / 2.0)
}

/// Stragglers from every rank's spans (by rank).
pub fn stragglers(ranks: &[Vec<Span>]) -> Stragglers {
    let n = ranks.len();
    let mut caused = vec![0.0f64; n];
    let arrivals: Vec<std::collections::HashMap<u64, f64>> = ranks
        .iter()
        .map(|spans| spans.iter().filter_map(|s| s.world_seq.map(|q| (q, s.ts))).collect())
        .collect();
    let seqs: Vec<u64> = arrivals.first().map(|a| a.keys().copied().collect()).unwrap_or_default();
    for q in seqs {
        let Some(at): Option<Vec<f64>> = arrivals.iter().map(|a| a.get(&q).copied()).collect() else {
            continue;
        };
        let (last, &latest) = at.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).expect("a rank");
        caused[last] += at.iter().map(|t| (latest - t).max(0.0)).sum::<f64>() / 1e6;
    }
    let straggler =
        caused.iter().enumerate().filter(|(_, &c)| c > 0.0).max_by(|a, b| a.1.total_cmp(b.1)).map(|(r, _)| r);
    Stragglers { made_others_wait_s: caused, straggler, clock_offsets_ms: vec![0.0; n] }
}

/// Chrome trace JSON of every rank's spans: process `rank` named "rank N".
pub fn chrome_trace(ranks: &[Vec<Span>]) -> Vec<u8> {
    let mut events = Vec::new();
    for (rank, spans) in ranks.iter().enumerate() {
        events.push(serde_json::json!({
            "name": "process_name", "ph": "M", "pid": rank, "tid": 0, "args": {"name": format!("rank {rank}")}
        }));
        for s in spans {
            let mut args = serde_json::Map::new();
            if let Some(b) = s.bytes {
                args.insert("bytes".into(), b.into());
            }
            if let Some(q) = s.world_seq {
                args.insert("world_seq".into(), q.into());
            }
            events.push(serde_json::json!({
                "name": s.name, "cat": s.cat, "ph": "X", "ts": s.ts, "dur": s.dur, "pid": rank, "tid": s.tid,
                "args": args,
            }));
        }
    }
    serde_json::to_vec(&serde_json::json!({ "traceEvents": events, "displayTimeUnit": "ms" }))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// NTP's rule: the offset at the middle of the shortest round trip; spans moved
    /// by it land on rank 0's clock.
    #[test]
    fn clocks_are_aligned_by_the_shortest_round_trip() {
        // The peer's clock is 1000 µs ahead; the 2nd sample's round trip is shortest.
        let samples = [(0.0, 1090.0, 100.0), (200.0, 1210.0, 220.0), (300.0, 1500.0, 700.0)];
        assert_eq!(clock_offset_us(&samples), 1000.0);
        assert_eq!(clock_offset_us(&[]), 0.0);
        let span = |ts| Span {
            name: "allreduce".into(),
            cat: "collective".into(),
            ts,
            dur: 1.0,
            tid: 1,
            world_seq: Some(0),
            bytes: None,
        };
        let mut ranks = vec![vec![span(10.0)], vec![span(1012.0)]];
        align_clocks(&mut ranks, &[0.0, 1000.0]);
        assert_eq!(ranks[1][0].ts, 12.0);
        assert_eq!(stragglers(&ranks).straggler, Some(1));
    }

    fn span(q: u64, ts: f64) -> Span {
        Span {
            name: "allreduce".into(),
            cat: "collective".into(),
            ts,
            dur: 1.0,
            tid: 1,
            world_seq: Some(q),
            bytes: Some(8),
        }
    }

    /// The last to arrive at each world collective made each other rank wait the
    /// difference; the straggler is the rank that did so longest.
    #[test]
    fn the_last_to_arrive_is_the_straggler() {
        let ranks = vec![
            vec![span(0, 0.0), span(1, 10.0)],
            vec![span(0, 5.0), span(1, 2_000_010.0)],
            vec![span(0, 1.0), span(1, 12.0)],
        ];
        let s = stragglers(&ranks);
        assert_eq!(s.straggler, Some(1));
        assert!((s.made_others_wait_s[1] - (5e-6 + 4e-6 + 2.0 + 1.999998)).abs() < 1e-9, "{s:?}");
        assert_eq!(s.made_others_wait_s[0], 0.0);
        let trace: serde_json::Value = serde_json::from_slice(&chrome_trace(&ranks)).unwrap();
        assert_eq!(trace["traceEvents"].as_array().unwrap().len(), 3 + 6);
    }
}
