//! Collective laws. Each check runs on one rank of a communicator; every rank derives
//! all ranks' inputs from the [`Case`], so each verifies its own result against the
//! naive definition computed locally, in-process or across real processes.
//!
//! Inputs are small integers, so sums are exact in every dtype and every algorithm
//! must match the naive definition bit for bit.

use half::{bf16, f16};
use sheaf_core::{chunk_range, Communicator, DType, Deadline, ReduceOp};

use super::SplitMix;

/// One generated case.
#[derive(Clone, Debug)]
pub struct Case {
    pub seed: u64,
    /// Elements per rank.
    pub len: usize,
    pub dtype: DType,
    pub op: ReduceOp,
    /// Root for rooted collectives, taken modulo the world size.
    pub root: usize,
}

type Check = Result<(), String>;

/// The values rank `rank` contributes: integers in `-16..=16`.
pub fn input_values(case: &Case, rank: usize) -> Vec<f64> {
    let mut g = SplitMix::new(case.seed ^ (rank as u64).wrapping_mul(0xD1B5_4A32_D192_ED03));
    (0..case.len).map(|_| g.int(-16, 16) as f64).collect()
}

/// Encodes values as `dtype` bytes (little-endian).
pub fn encode(values: &[f64], dtype: DType) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * dtype.size());
    for &v in values {
        match dtype {
            DType::F32 => out.extend_from_slice(&(v as f32).to_le_bytes()),
            DType::F64 => out.extend_from_slice(&v.to_le_bytes()),
            DType::BF16 => out.extend_from_slice(&bf16::from_f64(v).to_le_bytes()),
            DType::F16 => out.extend_from_slice(&f16::from_f64(v).to_le_bytes()),
            other => panic!("conformance has no encoding for {other}"),
        }
    }
    out
}

/// Rank `rank`'s input as bytes.
pub fn input(case: &Case, rank: usize) -> Vec<u8> {
    encode(&input_values(case, rank), case.dtype)
}

/// The naive definition of the reduction of all `world` ranks' inputs.
pub fn naive_reduce(case: &Case, world: usize) -> Vec<u8> {
    let inputs: Vec<Vec<f64>> = (0..world).map(|r| input_values(case, r)).collect();
    let reduced: Vec<f64> = (0..case.len)
        .map(|i| {
            let column = inputs.iter().map(|v| v[i]);
            match case.op {
                ReduceOp::Max => column.fold(f64::NEG_INFINITY, f64::max),
                ReduceOp::Min => column.fold(f64::INFINITY, f64::min),
                _ => column.sum(),
            }
        })
        .collect();
    let mut bytes = encode(&reduced, case.dtype);
    if case.op == ReduceOp::Avg {
        // The average is the exact sum, rounded to the dtype, times 1/world in f64.
        let by = 1.0 / world as f64;
        let avg: Vec<f64> = reduced
            .iter()
            .map(|&s| match case.dtype {
                DType::F32 => f64::from(((s as f32) as f64 * by) as f32),
                _ => s * by,
            })
            .collect();
        bytes = encode(&avg, case.dtype);
    }
    bytes
}

fn compare(what: &str, got: &[u8], want: &[u8]) -> Check {
    if got == want {
        return Ok(());
    }
    let first = got.iter().zip(want).position(|(a, b)| a != b);
    Err(format!(
        "{what}: result differs from the naive definition (got {} bytes, want {}, first difference at byte {first:?})",
        got.len(),
        want.len()
    ))
}

pub fn check_allreduce(comm: &dyn Communicator, case: &Case, dl: Deadline) -> Check {
    let mut buf = input(case, comm.rank());
    comm.allreduce(&mut buf, case.dtype, case.op, dl).map_err(|e| e.to_string())?;
    compare("allreduce", &buf, &naive_reduce(case, comm.world_size()))
}

pub fn check_broadcast(comm: &dyn Communicator, case: &Case, dl: Deadline) -> Check {
    let root = case.root % comm.world_size();
    let mut buf = input(case, comm.rank());
    comm.broadcast(&mut buf, root, dl).map_err(|e| e.to_string())?;
    compare(&format!("broadcast from {root}"), &buf, &input(case, root))
}

pub fn check_allgather(comm: &dyn Communicator, case: &Case, dl: Deadline) -> Check {
    let mine = input(case, comm.rank());
    let mut out = vec![0u8; mine.len() * comm.world_size()];
    comm.allgather(&mine, &mut out, dl).map_err(|e| e.to_string())?;
    let want: Vec<u8> = (0..comm.world_size()).flat_map(|r| input(case, r)).collect();
    compare("allgather", &out, &want)
}

pub fn check_reduce_scatter(comm: &dyn Communicator, case: &Case, dl: Deadline) -> Check {
    let (n, r, sz) = (comm.world_size(), comm.rank(), case.dtype.size());
    let chunk = chunk_range(case.len, n, r);
    let mut out = vec![0u8; chunk.len() * sz];
    comm.reduce_scatter(&input(case, r), &mut out, case.dtype, case.op, dl).map_err(|e| e.to_string())?;
    let want = naive_reduce(case, n);
    compare("reduce-scatter", &out, &want[chunk.start * sz..chunk.end * sz])
}

/// allreduce(x) == allgather(reduce_scatter(x)): chunks are padded to the largest so
/// allgather's equal-size contract holds for every length, even below the world size.
pub fn check_allreduce_is_reduce_scatter_then_allgather(
    comm: &dyn Communicator,
    case: &Case,
    dl: Deadline,
) -> Check {
    let (n, r, sz) = (comm.world_size(), comm.rank(), case.dtype.size());
    let mut via_allreduce = input(case, r);
    comm.allreduce(&mut via_allreduce, case.dtype, case.op, dl).map_err(|e| e.to_string())?;
    let chunk = chunk_range(case.len, n, r);
    let mut mine = vec![0u8; chunk.len() * sz];
    comm.reduce_scatter(&input(case, r), &mut mine, case.dtype, case.op, dl).map_err(|e| e.to_string())?;
    let widest = chunk_range(case.len, n, 0).len() * sz;
    mine.resize(widest, 0);
    let mut gathered = vec![0u8; widest * n];
    comm.allgather(&mine, &mut gathered, dl).map_err(|e| e.to_string())?;
    let joined: Vec<u8> = (0..n)
        .flat_map(|i| {
            let len = chunk_range(case.len, n, i).len() * sz;
            gathered[i * widest..i * widest + len].to_vec()
        })
        .collect();
    compare("reduce-scatter then allgather", &joined, &via_allreduce)
}

/// Messages with one tag arrive in order, and tags do not cross.
pub fn check_send_recv(comm: &dyn Communicator, case: &Case, dl: Deadline) -> Check {
    let (n, r) = (comm.world_size(), comm.rank());
    if n == 1 {
        return Ok(());
    }
    let right = (r + 1) % n;
    let left = (r + n - 1) % n;
    for (i, tag) in [7u32, 7, 9].into_iter().enumerate() {
        let mut msg = input(case, r);
        msg.push(i as u8);
        comm.send(right, tag, &msg, dl).map_err(|e| e.to_string())?;
    }
    let third = comm.recv(left, 9, dl).map_err(|e| e.to_string())?;
    let first = comm.recv(left, 7, dl).map_err(|e| e.to_string())?;
    let second = comm.recv(left, 7, dl).map_err(|e| e.to_string())?;
    for (i, got) in [first, second, third].into_iter().enumerate() {
        let mut want = input(case, left);
        want.push(i as u8);
        compare(&format!("send/recv message {i}"), &got, &want)?;
    }
    Ok(())
}

/// Under NCCL's rule (`order_point_to_point`, on a sub-communicator so that the
/// laws after this one keep the unordered contract) messages of several tags come in
/// the order sent, a receive that outwaits its probe included: the transport's
/// timed-out receives take nothing (the [`sheaf_core::Link`] contract).
pub fn check_ordered_send_recv(comm: &dyn Communicator, case: &Case, dl: Deadline) -> Check {
    let sub = comm.split(Some(0), 0, dl).map_err(|e| e.to_string())?.ok_or("no group")?;
    let (n, r) = (sub.world_size(), sub.rank());
    if n == 1 || !sub.order_point_to_point().map_err(|e| e.to_string())? {
        return Ok(());
    }
    let (right, left) = ((r + 1) % n, (r + n - 1) % n);
    for (i, tag) in [7u32, 9, 7].into_iter().enumerate() {
        if i == 1 {
            // Longer than the probe: the left neighbour's receive hears of it.
            std::thread::sleep(std::time::Duration::from_millis(80));
        }
        let mut msg = input(case, r);
        msg.push(i as u8);
        sub.send(right, tag, &msg, dl).map_err(|e| e.to_string())?;
        let got = sub.recv(left, tag, dl).map_err(|e| e.to_string())?;
        let mut want = input(case, left);
        want.push(i as u8);
        compare(&format!("ordered send/recv message {i}"), &got, &want)?;
    }
    sub.barrier(dl).map_err(|e| e.to_string())
}

pub fn check_barrier(comm: &dyn Communicator, dl: Deadline) -> Check {
    comm.barrier(dl).map_err(|e| e.to_string())
}

/// Splitting by `rank % k` with keys in reverse order gives groups whose collectives
/// equal those of a world of the group's size, ranked by key.
pub fn check_split(comm: &dyn Communicator, case: &Case, dl: Deadline) -> Check {
    let (n, r) = (comm.world_size(), comm.rank());
    let k = 1 + (case.seed as usize % n);
    // The last rank sits out, when there is more than one, to exercise `None`.
    let color = if n > 1 && r == n - 1 && case.seed % 2 == 1 { None } else { Some((r % k) as u32) };
    let key = (n - r) as u32;
    let sub = comm.split(color, key, dl).map_err(|e| e.to_string())?;
    let Some(color) = color else {
        if sub.is_some() {
            return Err("split(None) returned a communicator".into());
        }
        return check_allreduce(comm, case, dl).map_err(|e| format!("parent after split: {e}"));
    };
    let sub = sub.ok_or("split(Some) returned no communicator")?;
    let mut members: Vec<usize> =
        (0..n).filter(|&q| q % k == color as usize && !(n > 1 && q == n - 1 && case.seed % 2 == 1)).collect();
    members.reverse(); // keys are n - rank: descending rank
    let want_rank = members.iter().position(|&q| q == r).expect("member of own color");
    if sub.world_size() != members.len() || sub.rank() != want_rank {
        return Err(format!(
            "split: rank {r} got rank {} of {}, want {want_rank} of {}",
            sub.rank(),
            sub.world_size(),
            members.len()
        ));
    }
    check_allreduce(sub.as_ref(), case, dl).map_err(|e| format!("on a sub-communicator: {e}"))?;
    check_broadcast(sub.as_ref(), case, dl).map_err(|e| format!("on a sub-communicator: {e}"))?;
    // The parent still works after the split.
    check_allreduce(comm, case, dl).map_err(|e| format!("parent after split: {e}"))
}

pub fn check_reduce(comm: &dyn Communicator, case: &Case, dl: Deadline) -> Check {
    let root = case.root % comm.world_size();
    let mut buf = input(case, comm.rank());
    comm.reduce(&mut buf, case.dtype, case.op, root, dl).map_err(|e| e.to_string())?;
    if comm.rank() == root {
        compare(&format!("reduce to {root}"), &buf, &naive_reduce(case, comm.world_size()))?;
    }
    Ok(())
}

pub fn check_gather(comm: &dyn Communicator, case: &Case, dl: Deadline) -> Check {
    let (n, root) = (comm.world_size(), case.root % comm.world_size());
    let mine = input(case, comm.rank());
    let mut out = if comm.rank() == root { vec![0u8; mine.len() * n] } else { Vec::new() };
    comm.gather(&mine, &mut out, root, dl).map_err(|e| e.to_string())?;
    if comm.rank() == root {
        let want: Vec<u8> = (0..n).flat_map(|r| input(case, r)).collect();
        compare(&format!("gather to {root}"), &out, &want)?;
    }
    Ok(())
}

pub fn check_scatter(comm: &dyn Communicator, case: &Case, dl: Deadline) -> Check {
    let (n, root) = (comm.world_size(), case.root % comm.world_size());
    let all: Vec<u8> =
        if comm.rank() == root { (0..n).flat_map(|r| input(case, r)).collect() } else { Vec::new() };
    let mut out = vec![0u8; input(case, comm.rank()).len()];
    comm.scatter(&all, &mut out, root, dl).map_err(|e| e.to_string())?;
    compare(&format!("scatter from {root}"), &out, &input(case, comm.rank()))
}

/// The block rank `from` sends rank `to` in an all-to-all.
fn block(case: &Case, from: usize, to: usize) -> Vec<u8> {
    let c = Case {
        seed: case.seed ^ ((from as u64) << 32 | to as u64).wrapping_mul(0x2545_F491_4F6C_DD1D),
        ..case.clone()
    };
    input(&c, from)
}

pub fn check_all_to_all(comm: &dyn Communicator, case: &Case, dl: Deadline) -> Check {
    let (n, r) = (comm.world_size(), comm.rank());
    let send: Vec<u8> = (0..n).flat_map(|to| block(case, r, to)).collect();
    let mut out = vec![0u8; send.len()];
    comm.all_to_all(&send, &mut out, dl).map_err(|e| e.to_string())?;
    let want: Vec<u8> = (0..n).flat_map(|from| block(case, from, r)).collect();
    compare("all-to-all", &out, &want)
}

/// Every law above, in an order all ranks follow.
pub fn check_all(comm: &dyn Communicator, case: &Case, dl: Deadline) -> Check {
    check_allreduce(comm, case, dl)?;
    check_broadcast(comm, case, dl)?;
    check_allgather(comm, case, dl)?;
    check_reduce_scatter(comm, case, dl)?;
    check_allreduce_is_reduce_scatter_then_allgather(comm, case, dl)?;
    check_reduce(comm, case, dl)?;
    check_gather(comm, case, dl)?;
    check_scatter(comm, case, dl)?;
    check_all_to_all(comm, case, dl)?;
    check_send_recv(comm, case, dl)?;
    check_ordered_send_recv(comm, case, dl)?;
    check_barrier(comm, dl)?;
    check_split(comm, case, dl)
}
