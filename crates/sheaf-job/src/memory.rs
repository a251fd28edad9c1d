//! Memory, planned and measured: what each rank of a plan is expected to hold, by part
//! (`sheaf plan`, `summary.json`'s `planned_bytes_per_rank`), what the kernel says a
//! process holds (`getrusage`), and what this host has available for its ranks.

use serde::Serialize;

use crate::job::Job;
use crate::plan::{need_bytes, Plan};
use sheaf_plugins::HostError;

/// What one rank is planned to hold at its peak, in bytes, by part.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PlannedBytes {
    /// The rank's piece of the model, in f32.
    pub parameters: u64,
    /// Its gradients (the summed gradient buffer, and a shard of them under ZeRO).
    pub gradients: u64,
    /// The optimizer's state: the rank's shard of it where the strategy shards it.
    pub optimizer_state: u64,
    /// The activations it keeps for backward passes at once.
    pub activations: u64,
    /// Buffers of the transport and collectives.
    pub communication: u64,
    pub total: u64,
}

impl PlannedBytes {
    /// The parts, and their total.
    fn of(
        parameters: u64,
        gradients: u64,
        optimizer_state: u64,
        activations: u64,
        communication: u64,
    ) -> Self {
        let total = parameters + gradients + optimizer_state + activations + communication;
        PlannedBytes { parameters, gradients, optimizer_state, activations, communication, total }
    }

    /// The parts by name, in the order `sheaf plan` prints them.
    pub fn parts(&self) -> [(&'static str, u64); 5] {
        [
            ("parameters", self.parameters),
            ("gradients", self.gradients),
            ("optimizer state", self.optimizer_state),
            ("activations", self.activations),
            ("communication", self.communication),
        ]
    }
}

/// Bytes a transport's buffers hold per rank at most, for messages of at most
/// `largest` bytes in a world of `world` ranks, as the transport says of itself
/// (`plan.transport`): the buffers it keeps resident for each peer where that is fixed
/// (shared memory's rings, prefaulted by their reader), or else the frames in flight to
/// and from its two ring neighbours, a message or ZeroMQ's 16 MiB credit window each
/// way, whichever is less.
fn communication_bytes(transport: &sheaf_core::TransportInfo, world: usize, largest: u64) -> u64 {
    if world < 2 {
        return 0;
    }
    const MIB: u64 = 1 << 20;
    match transport.resident_bytes_per_peer {
        Some(per_peer) => per_peer * (world as u64 - 1),
        None => 2 * largest.min(16 * MIB),
    }
}

/// What rank `rank` of `plan` is planned to hold at its peak: the host's reckoning,
/// with the parts the strategy says it knows better (`Strategy::planned_gradient_bytes`,
/// `planned_parameter_bytes`) in their place.
pub fn planned(job: &Job, plan: &Plan, rank: usize) -> PlannedBytes {
    let p = reckoned(job, plan, rank);
    let said = |by: &Option<Vec<u64>>, reckoned: u64| by.as_ref().map_or(reckoned, |b| b[rank]);
    PlannedBytes::of(
        said(&plan.parameter_bytes, p.parameters),
        said(&plan.gradient_bytes, p.gradients),
        p.optimizer_state,
        p.activations,
        p.communication,
    )
}

/// The host's own reckoning of what rank `rank` of `plan` holds at its peak.
fn reckoned(job: &Job, plan: &Plan, rank: usize) -> PlannedBytes {
    let layout = plan.layout_of(rank);
    let r = &plan.ranks[rank];
    let values = layout.layout.total() as u64;
    let (held, activations) = need_bytes(plan, rank);
    let optimizer_state = held - 8 * values;
    if r.param_shard.is_some() {
        return match plan.stage_interface {
            true => sharded_piece(plan, rank, values, optimizer_state, activations),
            false => sharded(plan, values, optimizer_state, activations),
        };
    }
    let shards = r.state_shards.max(1);
    // The summed gradients (and the loss beside them), a second full-size buffer when
    // micro-batches are accumulated, and a shard of them under ZeRO.
    let accumulated = if job.train.grad_accum > 1 { 4 * values } else { 0 };
    let shard = if shards > 1 { 4 * values.div_ceil(shards) } else { 0 };
    let gradients = 4 * (values + 1) + accumulated + shard;
    // The largest message: a piece held by replicas sums its gradients (and the loss)
    // over them; pieces of a model exchange activations and their gradients.
    let replicas = plan.ranks.iter().filter(|o| o.piece == r.piece).count();
    let summed = if replicas > 1 { 4 * (values + 1) } else { 0 };
    let exchanged = if plan.is_model_parallel() { activations } else { 0 };
    let communication = communication_bytes(&plan.transport, plan.ranks.len(), summed.max(exchanged));
    let parameters = 4 * values;
    PlannedBytes::of(parameters, gradients, optimizer_state, activations, communication)
}

/// The plan of a rank holding its rows of every parameter (`values` of them; ZeRO
/// stage 3): those rows and their gradient and optimizer state, plus one unit
/// gathered at a time. A unit is a block, and the root the first and last blocks
/// together (the embeddings and the head). The strategy reuses three buffers of the
/// largest unit (its parameters, its gradient, its parts on the wire) and the model
/// keeps the root, with the root's gradient beside it (a block runs on the buffer it
/// is lent).
fn sharded(plan: &Plan, values: u64, optimizer_state: u64, activations: u64) -> PlannedBytes {
    let blocks: Vec<u64> = plan.info.blocks.iter().map(|b| b.params).collect();
    let block = blocks.iter().copied().max().unwrap_or(0);
    let root = match blocks.as_slice() {
        [first, .., last] => first + last,
        _ => block,
    };
    let largest = 4 * root.max(block);
    let kept = 4 * root;
    let parameters = 4 * values + 2 * largest + kept;
    let gradients = 4 * values + largest + kept;
    let communication = communication_bytes(&plan.transport, plan.ranks.len(), largest);
    PlannedBytes::of(parameters, gradients, optimizer_state, activations, communication)
}

/// The plan of a rank holding its rows of every parameter of a pipeline stage
/// (`values` of them; ZeRO stage 3 inside the stage): those rows and their gradient and
/// optimizer state, plus one unit gathered at a time into the piece's buffer, its
/// gradient in the piece's gradient buffer, and its parts on the wire (every replica's
/// and this one's). A unit is one of the stage's blocks; a tied head's embedding runs
/// with the head. The stage also exchanges activations with its neighbours.
fn sharded_piece(
    plan: &Plan,
    rank: usize,
    values: u64,
    optimizer_state: u64,
    activations: u64,
) -> PlannedBytes {
    let r = &plan.ranks[rank];
    let blocks: Vec<u64> = plan.info.blocks[r.piece.blocks.clone()].iter().map(|b| b.params).collect();
    // The piece held whole, from the whole model's parameters its rows come from: what
    // it holds beyond its blocks' own parameters is a tied head's embedding. A stage
    // holding the embeddings and the head is counted as reading the embeddings with the
    // head (as a tied head does; an untied one is overcounted by them).
    let mut sources: Vec<usize> = plan.layout_of(rank).sources.iter().map(|s| s.param).collect();
    sources.dedup();
    let whole: u64 = sources.iter().map(|&p| plan.info.layout.specs()[p].numel() as u64).sum();
    let tied_copy = whole.saturating_sub(blocks.iter().sum());
    let both_ends =
        r.piece.blocks.start == 0 && r.piece.blocks.end == plan.info.blocks.len() && blocks.len() > 1;
    let with_head = tied_copy + if both_ends { blocks[0] } else { 0 };
    let unit = blocks
        .iter()
        .enumerate()
        .map(|(i, &b)| if i + 1 == blocks.len() { b + with_head } else { b })
        .max()
        .unwrap_or(0);
    let count = r.param_shard.map_or(1, |s| s.count).max(1) as u64;
    let largest = 4 * unit;
    let parameters = 4 * values + largest;
    let gradients = 4 * values + largest;
    // Each replica's part of a unit travels on its own: the largest message.
    let part = largest.div_ceil(count);
    let wire = largest + part;
    let message = part.max(activations);
    let communication = wire + communication_bytes(&plan.transport, plan.ranks.len(), message);
    PlannedBytes::of(parameters, gradients, optimizer_state, activations, communication)
}

/// This process's peak resident memory so far, as the kernel counts it.
pub fn peak_rss_bytes() -> u64 {
    // SAFETY: getrusage writes the struct it is given and nothing else.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return 0;
    }
    // Linux reports kilobytes.
    usage.ru_maxrss.max(0) as u64 * 1024
}

/// The memory this host can still give to new processes (`MemAvailable`), when the
/// kernel says.
pub fn available_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_available(&text)
}

fn parse_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The parts of `need`, largest first, in MiB: "optimizer state 96.00 MiB,
/// parameters 48.00 MiB, ...".
pub fn parts_text(need: &PlannedBytes) -> String {
    let mut parts = need.parts();
    parts.sort_by_key(|&(_, b)| std::cmp::Reverse(b));
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    parts.iter().map(|(name, b)| format!("{name} {:.2} MiB", mib(*b))).collect::<Vec<_>>().join(", ")
}

/// This host's ranks (`local`, their plans) against the memory the kernel says it
/// has available, each rank counting `baseline` bytes of its own besides its plan.
/// Fails naming the ranks, what they need and what is available.
pub fn check_host(local: &[PlannedBytes], baseline: u64) -> Result<(), HostError> {
    let Some(available) = available_bytes() else { return Ok(()) };
    fits_host(local, baseline, available)
}

fn fits_host(local: &[PlannedBytes], baseline: u64, available: u64) -> Result<(), HostError> {
    let need: u64 = local.iter().map(|p| p.total + baseline).sum();
    if need <= available {
        return Ok(());
    }
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let largest = local.iter().enumerate().max_by_key(|(_, p)| p.total).map(|(r, p)| (r, p.clone()));
    let (r, p) = largest.unwrap_or_default();
    Err(HostError::Job(format!(
        "this host has {:.0} MiB available, but its {} ranks need {:.0} MiB ({:.0} MiB each of their own besides \
         their plans; the largest, local rank {r}, plans {:.0} MiB: {}): use more hosts, a model-parallel \
         strategy or ZeRO (`sheaf plan` shows every part)",
        mib(available),
        local.len(),
        mib(need),
        mib(baseline),
        mib(p.total),
        parts_text(&p)
    )))
}

/// Renders every rank's plan as a table: one row per rank, a column per part.
pub fn table(rows: &[PlannedBytes]) -> String {
    let mib = |b: u64| format!("{:.1}", b as f64 / (1 << 20) as f64);
    let mut out = String::from(
        "rank  parameters  gradients  optimizer state  activations  communication  total (MiB)\n",
    );
    for (r, p) in rows.iter().enumerate() {
        out += &format!(
            "{r:>4}  {:>10}  {:>9}  {:>15}  {:>11}  {:>13}  {:>11}\n",
            mib(p.parameters),
            mib(p.gradients),
            mib(p.optimizer_state),
            mib(p.activations),
            mib(p.communication),
            mib(p.total)
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan_of(total: u64) -> PlannedBytes {
        PlannedBytes {
            parameters: total / 4,
            optimizer_state: total / 2,
            gradients: total / 4,
            total,
            ..Default::default()
        }
    }

    /// Ranks fit while their plans and baselines are within what is available, and no
    /// further: the error names what is needed, what is available and the largest part.
    #[test]
    fn a_host_refuses_ranks_over_its_available_memory() {
        let mib = 1u64 << 20;
        let local = [plan_of(400 * mib), plan_of(800 * mib)];
        assert!(fits_host(&local, 100 * mib, 1400 * mib).is_ok());
        let err = fits_host(&local, 100 * mib, 1400 * mib - 1).unwrap_err().to_string();
        assert!(err.contains("1400 MiB available") || err.contains("1400 MiB"), "{err}");
        assert!(err.contains("local rank 1") && err.contains("optimizer state 400.00 MiB"), "{err}");
    }

    #[test]
    fn available_memory_is_read_from_meminfo() {
        let text = "MemTotal:       24000000 kB\nMemFree:        1000 kB\nMemAvailable:   2048 kB\n";
        assert_eq!(parse_available(text), Some(2048 * 1024));
        assert_eq!(parse_available("MemTotal: 1 kB\n"), None);
    }

    /// The peak is the kernel's, in bytes: about at least what the process holds
    /// resident while 64 MiB it has written are alive.
    #[test]
    fn the_peak_is_at_least_what_is_resident() {
        let mut big = vec![0u8; 64 << 20];
        for i in (0..big.len()).step_by(4096) {
            big[i] = 1;
        }
        std::hint::black_box(&big);
        let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
        let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
        let resident = pages * 4096;
        let peak = peak_rss_bytes();
        assert!(resident >= 64 << 20, "resident {resident}");
        // The kernel folds threads' cached RSS counts into the high-water mark lazily
        // (seen 110 KiB behind `statm`), so the bound allows 4 MiB of slack: a peak in
        // KiB (1,024 times too small) still fails it.
        assert!(peak + (4 << 20) >= resident, "peak {peak} below resident {resident}");
        assert!(peak < 64 * resident, "peak {peak} far above resident {resident}: not bytes?");
        drop(big);
    }
}

#[cfg(test)]
mod plan_tests {
    use super::*;
    use crate::fixture::{job, plan, shard};

    fn parts(p: &PlannedBytes) -> [u64; 6] {
        [p.parameters, p.gradients, p.optimizer_state, p.activations, p.communication, p.total]
    }

    /// Every plan's total is its parts.
    fn checked(p: PlannedBytes) -> PlannedBytes {
        assert_eq!(p.total, p.parts().iter().map(|(_, b)| b).sum::<u64>(), "{p:?}");
        p
    }

    /// A replica (100 values, AdamW's 2 state values each): parameters, the summed
    /// gradient and the loss beside it, its state, 2 samples' activations, and the
    /// summed gradient in flight to and from its ring neighbours.
    #[test]
    fn a_replica_holds_the_model_its_gradient_and_state() {
        let job0 = job(&[]);
        let one = checked(planned(&job0, &plan(&vec![0..3; 1], 1, &[None]), 0));
        assert_eq!(parts(&one), [400, 404, 800, 16, 0, 1620], "a world of one sends nothing");
        let two = checked(planned(&job0, &plan(&vec![0..3; 2], 1, &[None; 2]), 1));
        assert_eq!(parts(&two)[..5], [400, 404, 800, 16, 2 * 404]);
        // ZeRO 1 over 2: half the state, and a shard of the summed gradient besides.
        let zero1 = checked(planned(&job0, &plan(&vec![0..3; 2], 2, &[None; 2]), 0));
        assert_eq!(parts(&zero1)[..5], [400, 404 + 200, 400, 16, 2 * 404]);
        // Accumulated micro-batches keep a second whole gradient.
        let accum = checked(planned(&job(&["train.grad_accum=2"]), &plan(&vec![0..3; 2], 1, &[None; 2]), 0));
        assert_eq!(accum.gradients, 404 + 400);
    }

    /// A transport that keeps fixed buffers per peer is planned by them; one that does
    /// not, by the largest message (ZeroMQ's 16 MiB window at most) each way.
    #[test]
    fn communication_is_what_the_transport_says_it_holds() {
        let shm = sheaf_core::TransportInfo::host().with_resident_bytes_per_peer(1000);
        assert_eq!(communication_bytes(&shm, 4, 5), 3000);
        assert_eq!(communication_bytes(&shm, 1, 5), 0);
        let tcp = sheaf_core::TransportInfo::network();
        assert_eq!(communication_bytes(&tcp, 2, 5), 10);
        assert_eq!(communication_bytes(&tcp, 2, 1 << 30), 32 << 20);
        let mut p = plan(&vec![0..3; 3], 1, &[None; 3]);
        p.transport = shm;
        assert_eq!(planned(&job(&[]), &p, 0).communication, 2000);
    }

    /// Pipeline stages exchange activations: the larger of those and a summed gradient
    /// is the largest message.
    #[test]
    fn stages_plan_their_own_piece() {
        let p = plan(&[0..2, 2..3], 1, &[None, None]);
        let first = checked(planned(&job(&[]), &p, 0));
        // 60 values; no replica to sum with, 16 bytes of activations in flight.
        assert_eq!(parts(&first)[..5], [240, 244, 480, 16, 2 * 16]);
        let last = checked(planned(&job(&[]), &p, 1));
        assert_eq!(parts(&last)[..5], [160, 164, 320, 16, 2 * 16]);
        let replicated = plan(&[0..2, 0..2, 2..3, 2..3], 1, &[None; 4]);
        assert_eq!(planned(&job(&[]), &replicated, 2).communication, 2 * 164);
    }

    /// ZeRO 3 over 2 ranks: a rank's rows (50 values) and their gradient and state, one
    /// unit gathered at a time (the root, embeddings and head together: 80 values)
    /// twice over with the root kept by the model, the root's gradient beside it.
    #[test]
    fn a_fully_sharded_rank_holds_its_rows_and_one_unit() {
        let p = plan(&vec![0..3; 2], 1, &[shard(0, 2), shard(1, 2)]);
        let r = checked(planned(&job(&[]), &p, 0));
        assert_eq!(parts(&r)[..5], [200 + 2 * 320 + 320, 200 + 320 + 320, 400, 16, 2 * 320]);
    }

    /// ZeRO 3 inside a stage: the stage's rows, its largest block gathered into the
    /// piece's buffer, that block's gradient, and the block on the wire (every
    /// replica's part and this one's) beside the activations exchanged.
    #[test]
    fn a_sharded_stage_holds_its_rows_and_one_block() {
        let p = plan(&[0..2, 0..2, 2..3, 2..3], 1, &[shard(0, 2), shard(1, 2), shard(0, 2), shard(1, 2)]);
        let first = checked(planned(&job(&[]), &p, 0));
        // Rows: e 5x4, w 2x4, b 2 = 30 values; the embeddings (40) are the largest block.
        assert_eq!(parts(&first)[..5], [120 + 160, 120 + 160, 240, 16, 160 + 80 + 2 * 80]);
        let last = checked(planned(&job(&[]), &p, 3));
        // Rows: o 2x10 = 20 values; the head (40).
        assert_eq!(parts(&last)[..5], [80 + 160, 80 + 160, 160, 16, 160 + 80 + 2 * 80]);
        // One stage holding both ends reads the embeddings with the head.
        let both = plan(&[0..3, 0..3], 1, &[shard(0, 2), shard(1, 2)]);
        let mut both = both;
        both.stage_interface = true;
        both.layouts = (0..2)
            .map(|i| sheaf_core::PieceLayout::whole(&both.info.layout, 8).rows(shard(i, 2).unwrap()).unwrap())
            .collect();
        let r = checked(planned(&job(&[]), &both, 0));
        assert_eq!(r.parameters, 200 + 4 * 80);
        // The head is the last block, whatever the sizes: blocks of 10, 20 and 70 values
        // run as 10, 20 and 70 + 10.
        let block = |params| sheaf_core::Block { name: "b".into(), params };
        both.info.blocks = vec![block(10), block(20), block(70)];
        assert_eq!(planned(&job(&[]), &both, 0).parameters, 200 + 4 * 80);
        // A model of one block has no head apart from it.
        both.info.blocks = vec![block(100)];
        both.ranks.iter_mut().for_each(|r| r.piece.blocks = 0..1);
        assert_eq!(planned(&job(&[]), &both, 0).parameters, 200 + 4 * 100);
    }

    /// What the strategy says it holds replaces the host's reckoning, rank by rank.
    #[test]
    fn the_strategy_knows_its_own_bytes_better() {
        let mut p = plan(&vec![0..3; 2], 1, &[None; 2]);
        p.parameter_bytes = Some(vec![1, 2]);
        p.gradient_bytes = Some(vec![3, 4]);
        let r = checked(planned(&job(&[]), &p, 1));
        assert_eq!((r.parameters, r.gradients, r.optimizer_state), (2, 4, 800));
    }

    /// The parts largest first; a host whose ranks need more than it has is refused
    /// naming the largest, and one that has exactly enough is not.
    #[test]
    fn a_host_fits_its_ranks_or_names_the_largest() {
        let small = PlannedBytes::of(1 << 20, 0, 3 << 20, 0, 2 << 20);
        assert_eq!(parts_text(&small), "optimizer state 3.00 MiB, communication 2.00 MiB, parameters 1.00 MiB, gradients 0.00 MiB, activations 0.00 MiB");
        let big = PlannedBytes::of(8 << 20, 0, 0, 0, 0);
        let local = [small.clone(), big.clone()];
        let need = small.total + big.total + 2 * 100;
        assert!(fits_host(&local, 100, need).is_ok());
        let e = fits_host(&local, 100, need - 1).unwrap_err();
        assert!(
            e.to_string().contains("its 2 ranks need") && e.to_string().contains("local rank 1, plans 8 MiB"),
            "{e}"
        );
        assert_eq!(e.exit_code(), sheaf_plugins::exit::USAGE);
        // This host's own figure, from the kernel: more than a mebibyte, and less
        // than any plan could ask.
        assert!(available_bytes().is_some_and(|b| b > 1 << 20), "{:?}", available_bytes());
        let beyond = PlannedBytes::of(u64::MAX / 4, 0, 0, 0, 0);
        assert!(check_host(&[beyond], 0).is_err());
        assert!(check_host(&[small], 0).is_ok());
    }

    /// `sheaf plan`'s table: a row per rank, each part in MiB.
    #[test]
    fn the_table_has_a_row_per_rank() {
        let mib = 1 << 20;
        let rows = [PlannedBytes::of(mib, 2 * mib, 3 * mib, mib / 2, 0), PlannedBytes::default()];
        let lines: Vec<String> =
            table(&rows).lines().map(|l| l.split_whitespace().collect::<Vec<_>>().join(" ")).collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("rank parameters gradients optimizer state"), "{}", lines[0]);
        assert_eq!(lines[1], "0 1.0 2.0 3.0 0.5 0.0 6.5");
        assert_eq!(lines[2], "1 0.0 0.0 0.0 0.0 0.0 0.0");
    }
}
