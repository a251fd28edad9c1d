//! The whole model's safetensors file, written by rank 0 from every rank's piece one
//! parameter at a time, so no rank ever holds the whole model to write it (a model cut
//! into stages, slices or ZeRO 3 row shards may be larger than any rank's memory).
//!
//! Rank 0 writes the file with the `safetensors` crate through views whose bytes are
//! fetched as the crate writes them: for each parameter, the lowest rank holding each
//! distinct piece ([`Plan::representatives`]) is asked for its part of it (the index
//! of the parameter in its piece) and sends those values, which are placed where its
//! piece's [`ShardSource`] says. The others answer requests until rank 0 says it is
//! done, whatever order the crate writes in. The file is written beside its path and
//! renamed into place once synced, so a failure leaves no half-written file.

use std::borrow::Cow;
use std::cell::RefCell;
use std::path::Path;

use safetensors::{Dtype, View};
use sheaf_collectives::Group;
use sheaf_core::{CommError, Communicator, Deadline, Op, ParamLayout, PieceLayout, ShardSource};

use crate::outputs::{layout_tensors, write_safetensors};
use crate::plan::Plan;
use crate::HostError;

const ASK_TAG: u32 = 0x5EAF_0003;
const PIECE_TAG: u32 = 0x5EAF_0001;
/// The request that ends a rank's answering.
const DONE: u64 = u64::MAX;

/// Writes the whole model to `path` on rank 0 from every rank's `mine` (its piece of
/// `plan`, in its layout); every rank calls it. Without a `path` (no run directory)
/// nothing is written, but the ranks still agree that the write is over.
pub fn write_whole(
    comm: &Group,
    mine: &[f32],
    plan: &Plan,
    path: Option<&Path>,
    dl: impl Fn() -> Deadline,
) -> Result<(), HostError> {
    let rank = comm.rank();
    let comm_err = |e: CommError| HostError::Train { rank, detail: format!("writing the whole model: {e}") };
    let whole = &plan.info.layout;
    if !plan.is_model_parallel() {
        // Rank 0 holds the whole model already.
        return match (rank, path) {
            (0, Some(path)) => {
                synced_rename(path, |tmp| write_safetensors(tmp, layout_tensors(whole, mine), None))
            }
            _ => Ok(()),
        };
    }
    let senders: Vec<usize> = plan.representatives().into_iter().filter(|&r| r != 0).collect();
    if rank != 0 {
        if senders.contains(&rank) {
            answer(comm, mine, &plan.layout_of(rank).layout, &dl).map_err(comm_err)?;
        }
        return Ok(());
    }
    let written = match path {
        Some(path) => {
            let holders = plan.representatives();
            let fetch = Fetch { comm, mine, plan, holders, dl: &dl, failed: RefCell::new(None) };
            let views = whole.specs().iter().enumerate().map(|(p, s)| {
                (
                    s.name.as_str(),
                    Lazy { fetch: &fetch, param: p, shape: s.shape.clone(), len: 4 * s.numel() },
                )
            });
            synced_rename(path, |tmp| {
                let result = safetensors::serialize_to_file(views, None, tmp)
                    .map_err(|e| HostError::Output(format!("{}: safetensors: {e}", tmp.display())));
                match fetch.failed.take() {
                    Some(e) => Err(comm_err(e)),
                    None => result,
                }
            })
        }
        None => Ok(()),
    };
    // Every rank stops answering, whether or not the write went through.
    for &r in &senders {
        comm.send(r, ASK_TAG, &DONE.to_le_bytes(), dl()).map_err(comm_err)?;
    }
    written
}

/// Writes `path` through `write` into a file beside it, then syncs and renames it
/// into place; a failure removes the partial file.
fn synced_rename(path: &Path, write: impl FnOnce(&Path) -> Result<(), HostError>) -> Result<(), HostError> {
    let tmp = path.with_extension(format!("partial-{}", std::process::id()));
    let result = write(&tmp).and_then(|()| {
        std::fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .and_then(|()| std::fs::rename(&tmp, path))
            .map_err(|e| HostError::Output(format!("{}: {e}", path.display())))
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// A rank's side: answers rank 0's requests for parameters of its piece until told
/// it is done.
fn answer(
    comm: &Group,
    mine: &[f32],
    layout: &ParamLayout,
    dl: &dyn Fn() -> Deadline,
) -> Result<(), CommError> {
    loop {
        let ask = comm.recv(0, ASK_TAG, dl())?;
        let k = match <[u8; 8]>::try_from(ask.as_slice()) {
            Ok(b) => u64::from_le_bytes(b),
            Err(_) => return Err(protocol(0, format!("a request of {} bytes, not 8", ask.len()))),
        };
        if k == DONE {
            return Ok(());
        }
        let Some(k) = usize::try_from(k).ok().filter(|&k| k < layout.specs().len()) else {
            return Err(protocol(
                0,
                format!("asked for parameter {k} of a piece of {}", layout.specs().len()),
            ));
        };
        comm.send(0, PIECE_TAG, bytemuck::cast_slice(&mine[layout.range(k)]), dl())?;
    }
}

fn protocol(peer: usize, detail: String) -> CommError {
    CommError::Protocol { op: Op::Gather, peer, detail }
}

/// Rank 0's side: fetches each parameter from the ranks holding it, keeping the
/// first failure (a view cannot return one).
struct Fetch<'a, D: Fn() -> Deadline> {
    comm: &'a Group,
    mine: &'a [f32],
    plan: &'a Plan,
    /// The lowest rank holding each distinct piece.
    holders: Vec<usize>,
    dl: &'a D,
    failed: RefCell<Option<CommError>>,
}

impl<D: Fn() -> Deadline> Fetch<'_, D> {
    /// Whole-model parameter `p`'s values, from every distinct piece holding part of it.
    fn param(&self, p: usize) -> Result<Vec<f32>, CommError> {
        let whole = &self.plan.info.layout;
        let spec = &whole.specs()[p];
        let single = ParamLayout::new(vec![spec.clone()]);
        let mut out = vec![0f32; spec.numel()];
        for &r in &self.holders {
            let piece = self.plan.layout_of(r);
            for (k, src) in piece.sources.iter().enumerate().filter(|(_, s)| s.param == p) {
                let want = piece.layout.range(k).len();
                let values: Cow<'_, [f32]> = if r == 0 {
                    Cow::Borrowed(&self.mine[piece.layout.range(k)])
                } else {
                    self.comm.send(r, ASK_TAG, &(k as u64).to_le_bytes(), (self.dl)())?;
                    let bytes = self.comm.recv(r, PIECE_TAG, (self.dl)())?;
                    if bytes.len() != 4 * want {
                        return Err(protocol(
                            r,
                            format!("sent {} bytes of a parameter of {want} values", bytes.len()),
                        ));
                    }
                    Cow::Owned(
                        bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4"))).collect(),
                    )
                };
                let one = PieceLayout {
                    layout: ParamLayout::new(vec![piece.layout.specs()[k].clone()]),
                    sources: vec![ShardSource { param: 0, ..src.clone() }],
                    activation_bytes_per_sample: 0,
                };
                one.place(&single, &values, &mut out);
            }
        }
        Ok(out)
    }
}

/// One parameter's tensor, its bytes fetched when the writer asks for them.
struct Lazy<'a, D: Fn() -> Deadline> {
    fetch: &'a Fetch<'a, D>,
    param: usize,
    shape: Vec<usize>,
    len: usize,
}

impl<D: Fn() -> Deadline> View for Lazy<'_, D> {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        // After a failure, zeros of the right length: the file is removed afterwards.
        if self.fetch.failed.borrow().is_some() {
            return Cow::Owned(vec![0; self.len]);
        }
        match self.fetch.param(self.param) {
            Ok(values) => Cow::Owned(bytemuck::cast_slice(&values).to_vec()),
            Err(e) => {
                *self.fetch.failed.borrow_mut() = Some(e);
                Cow::Owned(vec![0; self.len])
            }
        }
    }
    fn data_len(&self) -> usize {
        self.len
    }
}
