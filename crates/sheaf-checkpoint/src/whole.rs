//! Files rank 0 writes from tensors other ranks hold, fetched a tensor at a time as
//! the `safetensors` crate writes them, so no rank ever holds more than one of them
//! besides its own: the whole model from every rank's piece (a model cut into stages,
//! slices or ZeRO 3 row shards may be larger than any rank's memory).
//!
//! A rank that holds tensors answers rank 0's requests (the index of a tensor) until
//! rank 0 says it is done, whatever order the crate writes in. For the model, rank 0
//! asks the lowest rank holding each distinct piece ([`Plan::representatives`]) for its
//! part of each parameter and places it where the piece's [`ShardSource`] says. Files
//! are written beside their path and renamed into place once synced, so a failure
//! leaves no half-written file.

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::HashMap;
use std::path::Path;

use safetensors::{Dtype, View};
use sheaf_collectives::Group;
use sheaf_core::{CommError, Communicator, Deadline, Op, ParamLayout, PieceLayout, ShardSource};

use sheaf_job::plan::Plan;
use sheaf_plugins::HostError;
use sheaf_report::outputs::{layout_tensors, write_safetensors};

const ASK_TAG: u32 = 0x5EAF_0003;
const TENSOR_TAG: u32 = 0x5EAF_0001;
/// The request that ends a rank's answering.
const DONE: u64 = u64::MAX;

fn write_err(rank: usize, what: &str) -> impl Fn(CommError) -> HostError + '_ {
    move |e| HostError::Train { rank, detail: format!("writing {what}: {e}") }
}

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
    let err = write_err(rank, "the whole model");
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
    let holders = plan.representatives();
    let senders: Vec<usize> = holders.iter().copied().filter(|&r| r != 0).collect();
    if rank != 0 {
        if senders.contains(&rank) {
            let layout = &plan.layout_of(rank).layout;
            let tensors: Vec<&[f32]> = (0..layout.specs().len()).map(|k| &mine[layout.range(k)]).collect();
            answer(comm, &tensors, &dl).map_err(err)?;
        }
        return Ok(());
    }
    let written = match path {
        Some(path) => {
            let param = |p: usize| gather_param(comm, mine, plan, &holders, p, &dl);
            let tensors = whole.specs().iter().enumerate().map(|(p, s)| {
                let fetch: Box<dyn Fn() -> Result<Vec<f32>, CommError> + '_> = Box::new(move || param(p));
                (s.name.clone(), s.shape.clone(), fetch)
            });
            write_fetched(path, tensors.collect(), None).map_err(|e| e.into_host(rank, "the whole model"))
        }
        None => Ok(()),
    };
    // Every rank stops answering, whether or not the write went through.
    for &r in &senders {
        done(comm, r, &dl).map_err(&err)?;
    }
    written
}

/// Whole-model parameter `p`'s values on rank 0, from every distinct piece (the lowest
/// rank holding each: `holders`) holding part of it.
fn gather_param(
    comm: &Group,
    mine: &[f32],
    plan: &Plan,
    holders: &[usize],
    p: usize,
    dl: &dyn Fn() -> Deadline,
) -> Result<Vec<f32>, CommError> {
    let spec = &plan.info.layout.specs()[p];
    let single = ParamLayout::new(vec![spec.clone()]);
    let mut out = vec![0f32; spec.numel()];
    for &r in holders {
        let piece = plan.layout_of(r);
        for (k, src) in piece.sources.iter().enumerate().filter(|(_, s)| s.param == p) {
            let range = piece.layout.range(k);
            let values: Cow<'_, [f32]> = match r {
                0 => Cow::Borrowed(&mine[range]),
                _ => Cow::Owned(ask(comm, r, k, range.len(), dl)?),
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

/// Answers rank 0's requests for `tensors` by index until it says it is done.
fn answer(comm: &Group, tensors: &[&[f32]], dl: &dyn Fn() -> Deadline) -> Result<(), CommError> {
    loop {
        let ask = comm.recv(0, ASK_TAG, dl())?;
        let k = match <[u8; 8]>::try_from(ask.as_slice()) {
            Ok(b) => u64::from_le_bytes(b),
            Err(_) => return Err(protocol(0, format!("a request of {} bytes, not 8", ask.len()))),
        };
        if k == DONE {
            return Ok(());
        }
        let Some(t) = usize::try_from(k).ok().and_then(|k| tensors.get(k)) else {
            return Err(protocol(0, format!("asked for tensor {k} of {}", tensors.len())));
        };
        comm.send(0, TENSOR_TAG, bytemuck::cast_slice(t), dl())?;
    }
}

/// Rank `peer`'s tensor `k`, of `len` values.
fn ask(
    comm: &Group,
    peer: usize,
    k: usize,
    len: usize,
    dl: &dyn Fn() -> Deadline,
) -> Result<Vec<f32>, CommError> {
    comm.send(peer, ASK_TAG, &(k as u64).to_le_bytes(), dl())?;
    let bytes = comm.recv(peer, TENSOR_TAG, dl())?;
    if bytes.len() != 4 * len {
        return Err(protocol(peer, format!("sent {} bytes of a tensor of {len} values", bytes.len())));
    }
    Ok(bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4"))).collect())
}

/// Tells `peer` to stop answering.
fn done(comm: &Group, peer: usize, dl: &dyn Fn() -> Deadline) -> Result<(), CommError> {
    comm.send(peer, ASK_TAG, &DONE.to_le_bytes(), dl())
}

fn protocol(peer: usize, detail: String) -> CommError {
    CommError::Protocol { op: Op::Gather, peer, detail }
}

/// A tensor to write: its name, shape, and what fetches its values.
type Fetched<'a> = (String, Vec<usize>, Box<dyn Fn() -> Result<Vec<f32>, CommError> + 'a>);

/// Why [`write_fetched`] failed.
enum WriteError {
    Fetch(CommError),
    Host(HostError),
}

impl WriteError {
    fn into_host(self, rank: usize, what: &str) -> HostError {
        match self {
            WriteError::Fetch(e) => write_err(rank, what)(e),
            WriteError::Host(e) => e,
        }
    }
}

/// Writes `tensors` to `path`, each fetched as the crate writes it.
fn write_fetched(
    path: &Path,
    tensors: Vec<Fetched<'_>>,
    metadata: Option<HashMap<String, String>>,
) -> Result<(), WriteError> {
    let failed = RefCell::new(None);
    let views = tensors.iter().map(|(name, shape, fetch)| {
        let len = 4 * shape.iter().product::<usize>();
        (name.as_str(), Lazy { shape, len, fetch: fetch.as_ref(), failed: &failed })
    });
    let mut fetch_error = None;
    let written = synced_rename(path, |tmp| {
        let result = safetensors::serialize_to_file(views, metadata, tmp)
            .map_err(|e| HostError::encode(format!("{}: safetensors", tmp.display()), e));
        fetch_error = failed.take();
        match fetch_error {
            Some(_) => Err(HostError::Output("a tensor could not be fetched".into())),
            None => result,
        }
    });
    match (fetch_error, written) {
        (Some(e), _) => Err(WriteError::Fetch(e)),
        (None, r) => r.map_err(WriteError::Host),
    }
}

/// Writes `path` through `write` into a file beside it, then syncs and renames it
/// into place; a failure removes the partial file.
fn synced_rename(path: &Path, write: impl FnOnce(&Path) -> Result<(), HostError>) -> Result<(), HostError> {
    let tmp = path.with_extension(format!("partial-{}", std::process::id()));
    let result = write(&tmp).and_then(|()| {
        std::fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .and_then(|()| std::fs::rename(&tmp, path))
            .map_err(|e| HostError::io(path, e))
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// One tensor, its bytes fetched when the writer asks for them; after a failure
/// (kept in `failed`: a view cannot return one), zeros of its length, and the file is
/// removed afterwards.
struct Lazy<'a> {
    shape: &'a [usize],
    len: usize,
    fetch: &'a dyn Fn() -> Result<Vec<f32>, CommError>,
    failed: &'a RefCell<Option<CommError>>,
}

impl View for Lazy<'_> {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        if self.failed.borrow().is_some() {
            return Cow::Owned(vec![0; self.len]);
        }
        match (self.fetch)() {
            Ok(values) if 4 * values.len() == self.len => Cow::Owned(bytemuck::cast_slice(&values).to_vec()),
            Ok(values) => {
                let detail = format!("{} values for a tensor of {}", values.len(), self.len / 4);
                *self.failed.borrow_mut() = Some(protocol(0, detail));
                Cow::Owned(vec![0; self.len])
            }
            Err(e) => {
                *self.failed.borrow_mut() = Some(e);
                Cow::Owned(vec![0; self.len])
            }
        }
    }
    fn data_len(&self) -> usize {
        self.len
    }
}
