//! Universal checkpoints: every tensor named by its whole-model name and shape, each
//! rank writing the parts it owns, so a run resumes at any world size, strategy and
//! layout.
//!
//! A tensor is a parameter of the whole model (`layers.0.weight`) or one slot of its
//! optimizer state (`layers.0.weight.exp_avg`: the slot of the optimizer's buffer
//! `<param>.<slot>`, or `<param>@<first index>.<slot>` for a part of it, as ZeRO
//! shards name theirs). A rank's part of one is a *fragment*: its values in the
//! rank's order and where they lie in the whole tensor's row-major values, as runs
//! (`[start, len, stride, count]`: `count` runs of `len` values, `stride` apart: one
//! for a row shard, one per row for a column slice). Rank `R` writes its fragments
//! to `rank-R.safetensors` and their places to `rank-R.json`; rank 0 merges those
//! into `index.json` once every rank has written its own. A rank resuming reads the
//! index, and of each file only the fragments that hold values it now owns.
//!
//! Parameters are written by the lowest rank holding each distinct piece or shard;
//! optimizer state by each rank whose state is its own (a ZeRO shard) or the lowest
//! holding each piece.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sheaf_core::{OptimState, Optimizer, Param, ParamLayout, PieceLayout};
use sheaf_plugins::HostError;
use sheaf_report::outputs::{write_safetensors, TensorFile};

/// The merged index of a checkpoint's fragments.
pub const INDEX: &str = "index.json";

/// A rank's fragments: where its values lie in the whole tensors.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Fragment {
    /// The file (in the checkpoint's directory) and the tensor in it.
    pub file: String,
    pub tensor: String,
    /// `[start, len, stride, count]` each, in the whole tensor's flat values.
    pub runs: Vec<[u64; 4]>,
}

/// One whole tensor: the parameter it is or belongs to, its optimizer slot (none for
/// the parameter itself), its shape and the fragments that hold it.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Tensor {
    pub param: String,
    pub slot: Option<String>,
    pub shape: Vec<usize>,
    pub fragments: Vec<Fragment>,
}

/// `index.json`: every tensor of the checkpoint by name.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Index {
    pub tensors: BTreeMap<String, Tensor>,
}

/// Runs of `indices` (flat, in the order the values lie): consecutive indices make a
/// run, runs of one length at one stride make one entry.
pub fn runs_of(indices: &[usize]) -> Vec<[u64; 4]> {
    let mut plain: Vec<(u64, u64)> = Vec::new();
    for &i in indices {
        extend(&mut plain, i as u64, 1);
    }
    grouped(plain)
}

/// `len` values from `start` after `plain`'s: one run with the last where they follow it.
fn extend(plain: &mut Vec<(u64, u64)>, start: u64, len: u64) {
    match plain.last_mut() {
        Some((s, l)) if *s + *l == start => *l += len,
        _ => plain.push((start, len)),
    }
}

/// Where values `[lo, lo + n)` of a piece's parameter (taken from its whole parameter,
/// shaped `shape`, as `src` says) lie in the whole parameter's flat values, as runs;
/// the same places as [`PieceLayout::full_indices`] gives, without one index a value.
fn runs_within(src: &sheaf_core::ShardSource, shape: &[usize], lo: usize, n: usize) -> Vec<[u64; 4]> {
    let rows = shape.first().copied().unwrap_or(1).max(1);
    let cols = shape.iter().product::<usize>() / rows;
    let segments: Box<dyn Iterator<Item = (usize, usize)> + '_> = match src.by_columns {
        true => Box::new(
            (0..rows).flat_map(move |row| src.ranges.iter().map(move |r| (row * cols + r.start, r.len()))),
        ),
        false => Box::new(src.ranges.iter().map(move |r| (r.start * cols, r.len() * cols))),
    };
    let (end, mut at) = (lo + n, 0);
    let mut plain = Vec::new();
    for (start, len) in segments {
        let (a, b) = (at.max(lo), (at + len).min(end));
        if a < b {
            extend(&mut plain, (start + a - at) as u64, (b - a) as u64);
        }
        at += len;
        if at >= end {
            break;
        }
    }
    grouped(plain)
}

/// Runs of one length at one stride, as one entry each.
fn grouped(plain: Vec<(u64, u64)>) -> Vec<[u64; 4]> {
    let mut out: Vec<[u64; 4]> = Vec::new();
    for (s, l) in plain {
        match out.last_mut() {
            Some([start, len, stride, count])
                if *len == l && (*count == 1 || *start + *stride * *count == s) && s > *start =>
            {
                if *count == 1 {
                    *stride = s - *start;
                }
                *count += 1;
            }
            _ => out.push([s, l, l, 1]),
        }
    }
    out
}

/// Every run of `runs` as `(start, len)`, in order.
fn each_run(runs: &[[u64; 4]]) -> impl Iterator<Item = (u64, u64)> + '_ {
    runs.iter().flat_map(|&[start, len, stride, count]| (0..count).map(move |k| (start + k * stride, len)))
}

/// Where a rank's local values come from: for each parameter of its layout, its
/// whole parameter's index and each local value's index in the whole parameter.
struct Places {
    whole_param: Vec<usize>,
    within: Vec<Vec<usize>>,
}

impl Places {
    fn new(local: &PieceLayout, whole: &ParamLayout) -> Places {
        let full = local.full_indices(whole);
        let mut within = Vec::with_capacity(local.sources.len());
        for (k, src) in local.sources.iter().enumerate() {
            let base = whole.range(src.param).start;
            within.push(full[local.layout.range(k)].iter().map(|i| i - base).collect());
        }
        Places { whole_param: local.sources.iter().map(|s| s.param).collect(), within }
    }
}

/// A tensor's name: its parameter's, and for optimizer state `.<slot>` after it.
pub fn key_of(param: &str, slot: Option<&str>) -> String {
    match slot {
        Some(s) => format!("{param}.{s}"),
        None => param.to_owned(),
    }
}

/// An optimizer buffer's name taken apart: the local parameter it belongs to, the
/// first of that parameter's values it holds, and its slot.
fn parse_buffer(name: &str, local: &ParamLayout) -> Option<(usize, usize, String)> {
    let mut best: Option<(usize, usize, String)> = None;
    for (k, spec) in local.specs().iter().enumerate() {
        let Some(rest) = name.strip_prefix(spec.name.as_str()) else { continue };
        let parsed = match rest.strip_prefix('@') {
            Some(tail) => {
                let (lo, slot) = tail.split_once('.')?;
                lo.parse().ok().map(|lo| (lo, slot))
            }
            None => rest.strip_prefix('.').map(|slot| (0, slot)),
        };
        if let Some((lo, slot)) = parsed {
            let longer = best.as_ref().is_none_or(|(b, _, _)| local.specs()[*b].name.len() < spec.name.len());
            if longer && !slot.is_empty() {
                best = Some((k, lo, slot.to_owned()));
            }
        }
    }
    best
}

/// What one rank writes: copies of its values (taken on the training thread, the
/// staging buffer of an asynchronous save), each with where it lies in the rank's
/// layout; where that is in the whole tensors is worked out as they are written.
pub struct RankParts<'a> {
    local: PieceLayout,
    whole: ParamLayout,
    /// Each fragment: its local parameter, the first of that parameter's values it
    /// holds, its optimizer slot (none for the parameter), its values (lent by the
    /// rank for a synchronous save, copied for one written on a thread).
    parts: Vec<Part<'a>>,
}

/// A fragment to write: its local parameter, the first of its values, its slot, the
/// values.
type Part<'a> = (usize, usize, Option<String>, Cow<'a, [f32]>);

/// An optimizer state's buffers by name, lent.
pub fn lent(state: &OptimState) -> Vec<(String, Cow<'_, [f32]>)> {
    state.buffers.iter().map(|(n, b)| (n.clone(), Cow::Borrowed(&b[..]))).collect()
}

/// An optimizer state's buffers by name, handed over.
pub fn owned(state: OptimState) -> Vec<(String, Cow<'static, [f32]>)> {
    state.buffers.into_iter().map(|(n, b)| (n, Cow::Owned(b))).collect()
}

impl<'a> RankParts<'a> {
    /// The parts of a rank's `params` (when it is the first holding its piece) and
    /// optimizer `state` (when the state is its own), its layout `local` a part of
    /// `whole`.
    pub fn new(
        local: &PieceLayout,
        whole: &ParamLayout,
        params: Option<&'a [f32]>,
        state: Option<Vec<(String, Cow<'a, [f32]>)>>,
    ) -> Result<RankParts<'a>, HostError> {
        let mut parts = Vec::new();
        if let Some(params) = params {
            if params.len() != local.layout.total() {
                return Err(HostError::Output(format!(
                    "{} parameter values for a layout of {}",
                    params.len(),
                    local.layout.total()
                )));
            }
            for k in 0..local.sources.len() {
                parts.push((k, 0, None, Cow::Borrowed(&params[local.layout.range(k)])));
            }
        }
        // Each buffer of the state handed over (owned) or lent (borrowed).
        for (name, values) in state.unwrap_or_default() {
            let (k, lo, slot) = parse_buffer(&name, &local.layout).ok_or_else(|| {
                HostError::Output(format!(
                    "optimizer state `{name}` names no parameter of this rank as `<param>[@<index>].<slot>`: \
                     it cannot be saved by parameter"
                ))
            })?;
            let held = local.layout.range(k).len();
            if lo + values.len() > held {
                return Err(HostError::Output(format!(
                    "optimizer state `{name}` holds {} values from {lo}, but its parameter has {held}",
                    values.len()
                )));
            }
            parts.push((k, lo, Some(slot), values));
        }
        Ok(RankParts { local: local.clone(), whole: whole.clone(), parts })
    }

    /// The same parts owned: what was handed over moved, what was lent copied into
    /// `staging`'s buffers where it has them (an earlier save's, whose pages are
    /// already the process's: a copy into them is a `memcpy`, not a page fault a page).
    pub fn into_staged(self, staging: Option<RankParts<'static>>) -> RankParts<'static> {
        let mut spare = staging.map(|s| s.parts).unwrap_or_default().into_iter();
        let parts = self
            .parts
            .into_iter()
            .map(|(k, lo, slot, values)| {
                let spare = spare.next();
                let values = match values {
                    Cow::Owned(v) => v,
                    Cow::Borrowed(lent) => {
                        let mut buf = match spare {
                            Some((_, _, _, Cow::Owned(v))) => v,
                            _ => Vec::new(),
                        };
                        buf.clear();
                        buf.extend_from_slice(lent);
                        buf
                    }
                };
                (k, lo, slot, Cow::Owned(values))
            })
            .collect();
        RankParts { local: self.local, whole: self.whole, parts }
    }

    /// Writes `rank-R.safetensors` (synced) into `dir`, and returns the rank's part of
    /// the index, which it writes as `rank-R.json`.
    pub fn write(&self, dir: &Path, rank: usize) -> Result<Index, HostError> {
        let file = format!("rank-{rank}.safetensors");
        let tensors: Vec<String> = (0..self.parts.len()).map(|i| format!("f{i}")).collect();
        write_safetensors(
            &dir.join(&file),
            tensors.iter().zip(&self.parts).map(|(t, (_, _, _, v))| (t.as_str(), vec![v.len()], &v[..])),
            None,
        )?;
        let mut index = Index::default();
        for ((k, lo, slot, values), tensor) in self.parts.iter().zip(&tensors) {
            let src = &self.local.sources[*k];
            let spec = &self.whole.specs()[src.param];
            let runs = runs_within(src, &spec.shape, *lo, values.len());
            let entry = index.tensors.entry(key_of(&spec.name, slot.as_deref())).or_default();
            (entry.param, entry.slot, entry.shape) = (spec.name.clone(), slot.clone(), spec.shape.clone());
            entry.fragments.push(Fragment { file: file.clone(), tensor: tensor.clone(), runs });
        }
        let json = serde_json::to_vec(&index).map_err(|e| HostError::encode("index", e))?;
        crate::checkpoint::write_synced(&dir.join(format!("rank-{rank}.json")), &json)?;
        Ok(index)
    }
}

/// Merges the `rank-R.json` of every rank in `writers` in `dir` into `index.json`.
pub fn merge_index(dir: &Path, writers: &[usize]) -> Result<(), HostError> {
    let mut index = Index::default();
    for r in writers {
        let path = dir.join(format!("rank-{r}.json"));
        let bytes = std::fs::read(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => HostError::Output(format!(
                "{}: rank {r} reported its part written, but it is not here: a world spread over hosts \
                 writes checkpoints into a run directory every host shares (a shared filesystem)",
                path.display()
            )),
            _ => HostError::io(&path, e),
        })?;
        let part: Index = serde_json::from_slice(&bytes).map_err(|e| HostError::input(path.display(), e))?;
        for (key, t) in part.tensors {
            let entry = index.tensors.entry(key).or_default();
            (entry.param, entry.slot, entry.shape) = (t.param, t.slot, t.shape);
            entry.fragments.extend(t.fragments);
        }
    }
    let json = serde_json::to_vec(&index).map_err(|e| HostError::encode("index.json", e))?;
    crate::checkpoint::write_synced(&dir.join(INDEX), &json)
}

/// A universal checkpoint opened for reading.
pub struct Universal {
    dir: PathBuf,
    index: Index,
    files: HashMap<String, TensorFile>,
}

impl Universal {
    pub fn open(dir: &Path) -> Result<Universal, HostError> {
        let path = dir.join(INDEX);
        let bytes = std::fs::read(&path).map_err(|e| HostError::input(path.display(), e))?;
        let index: Index = serde_json::from_slice(&bytes).map_err(|e| HostError::input(path.display(), e))?;
        let bad = |detail: String| HostError::Data(format!("{}: {detail}", path.display()));
        for (key, t) in &index.tensors {
            let numel = t.shape.iter().try_fold(1u64, |n, &d| n.checked_mul(d as u64));
            let numel = numel.ok_or_else(|| bad(format!("`{key}` has a shape too large: {:?}", t.shape)))?;
            for f in &t.fragments {
                if !crate::checkpoint::is_plain_file_name(&f.file) {
                    return Err(bad(format!("`{}` is not a file name", f.file)));
                }
                for &[start, len, stride, count] in &f.runs {
                    let end = count
                        .checked_sub(1)
                        .and_then(|c| c.checked_mul(stride))
                        .and_then(|o| o.checked_add(start))
                        .and_then(|o| o.checked_add(len));
                    if len == 0 || end.is_none_or(|e| e > numel) {
                        return Err(bad(format!(
                            "`{key}`: runs [{start}, {len}, {stride}, {count}] outside its {numel} values"
                        )));
                    }
                }
            }
        }
        Ok(Universal { dir: dir.to_path_buf(), index, files: HashMap::new() })
    }

    /// The optimizer slots saved for whole parameter `param`.
    pub fn slots(&self, param: &str) -> Vec<String> {
        self.index.tensors.values().filter(|t| t.param == param).filter_map(|t| t.slot.clone()).collect()
    }

    /// Tensor `key`'s values at `want` (indices of its flat values), in that order,
    /// checked against `shape`.
    pub fn gather(&mut self, key: &str, shape: &[usize], want: &[usize]) -> Result<Vec<f32>, HostError> {
        let bad = |detail: String| HostError::Data(format!("checkpoint {}: {detail}", self.dir.display()));
        let tensor = self.index.tensors.get(key).ok_or_else(|| bad(format!("no tensor `{key}`")))?.clone();
        if tensor.shape != shape {
            return Err(bad(format!("`{key}` is {:?}, this model's is {shape:?}", tensor.shape)));
        }
        // Every run of every fragment: (start, len, fragment, offset in its values).
        let mut runs: Vec<(u64, u64, usize, usize)> = Vec::new();
        for (f, frag) in tensor.fragments.iter().enumerate() {
            let mut at = 0;
            for (start, len) in each_run(&frag.runs) {
                runs.push((start, len, f, at));
                at += len as usize;
            }
        }
        runs.sort_unstable();
        // The run holding value `i`: (its start, its fragment, its offset there).
        let find = |i: u64| {
            let pos = runs.partition_point(|r| r.0 <= i);
            let hit = pos.checked_sub(1).map(|p| runs[p]).filter(|(s, l, _, _)| i < s + l);
            hit.map(|(s, _, f, at)| (s, f, at))
                .ok_or_else(|| bad(format!("no fragment holds value {i} of `{key}`")))
        };
        // The files of the fragments wanted, memory-mapped: a rank reads the pages of
        // the values it now owns, not whole fragments.
        let mut wanted = vec![false; tensor.fragments.len()];
        for &i in want {
            wanted[find(i as u64)?.1] = true;
        }
        let needed: Vec<usize> = (0..wanted.len()).filter(|&f| wanted[f]).collect();
        for &f in &needed {
            let file = &tensor.fragments[f].file;
            if !self.files.contains_key(file) {
                self.files.insert(file.clone(), TensorFile::map(&self.dir.join(file))?);
            }
        }
        let mut data: HashMap<usize, &[u8]> = HashMap::new();
        for &f in &needed {
            let frag = &tensor.fragments[f];
            let bytes = self.files[&frag.file].f32_bytes(&frag.tensor, None)?;
            let held: u64 = each_run(&frag.runs).map(|(_, l)| l).sum();
            if bytes.len() as u64 != 4 * held {
                return Err(bad(format!(
                    "{} `{}` holds {} values, its runs {held}",
                    frag.file,
                    frag.tensor,
                    bytes.len() / 4
                )));
            }
            data.insert(f, bytes);
        }
        let mut out = Vec::with_capacity(want.len());
        for &i in want {
            let (start, f, at) = find(i as u64)?;
            let k = 4 * (at + (i as u64 - start) as usize);
            out.push(f32::from_le_bytes(data[&f][k..k + 4].try_into().expect("4 bytes")));
        }
        Ok(out)
    }

    /// This rank's parameters, laid out as `local`.
    pub fn params(&mut self, local: &PieceLayout, whole: &ParamLayout) -> Result<Vec<f32>, HostError> {
        let places = Places::new(local, whole);
        let mut out = Vec::with_capacity(local.layout.total());
        for (k, within) in places.within.iter().enumerate() {
            let spec = &whole.specs()[places.whole_param[k]];
            out.extend(self.gather(&spec.name, &spec.shape, within)?);
        }
        Ok(out)
    }
}

/// The optimizer of a rank resumed from a universal checkpoint: before each step it
/// gives the optimizer the saved state of every parameter it has not seen yet, cut
/// to what the step hands it (a whole parameter of this rank's layout, `<param>`, or
/// part of one, `<param>@<first index>`), whatever layout wrote it.
pub struct Resharding<'o> {
    pub inner: &'o mut dyn Optimizer,
    source: Option<Source>,
}

struct Source {
    universal: Universal,
    local: PieceLayout,
    whole: ParamLayout,
    step: u64,
    loaded: HashSet<String>,
}

impl<'o> Resharding<'o> {
    /// `inner`, resumed from `universal` at optimizer step `step` (`None`: not resumed).
    pub fn new(
        inner: &'o mut dyn Optimizer,
        from: Option<(Universal, PieceLayout, ParamLayout, u64)>,
    ) -> Resharding<'o> {
        let source = from.map(|(universal, local, whole, step)| Source {
            universal,
            local,
            whole,
            step,
            loaded: HashSet::new(),
        });
        Resharding { inner, source }
    }

    fn load_missing(&mut self, params: &[Param<'_>]) -> sheaf_core::Result<()> {
        let Some(src) = self.source.as_mut() else { return Ok(()) };
        let missing: Vec<&Param<'_>> = params.iter().filter(|p| !src.loaded.contains(p.name)).collect();
        if missing.is_empty() {
            return Ok(());
        }
        let places = Places::new(&src.local, &src.whole);
        let mut state = match src.loaded.is_empty() {
            true => OptimState { step: src.step, buffers: Vec::new() },
            false => self.inner.state()?,
        };
        for p in missing {
            let (base, lo) = match p.name.split_once('@') {
                Some((base, lo)) => (base, lo.parse::<usize>().ok()),
                None => (p.name, Some(0)),
            };
            let k = src.local.layout.specs().iter().position(|s| s.name == base);
            let (Some(k), Some(lo)) = (k, lo) else {
                return Err(sheaf_core::Error::BadState(format!(
                    "resuming: the optimizer is handed `{}`, no parameter of this rank's layout",
                    p.name
                )));
            };
            let Some(within) = places.within[k].get(lo..lo + p.value.len()) else {
                return Err(sheaf_core::Error::BadState(format!(
                    "resuming: `{}` lies outside its parameter",
                    p.name
                )));
            };
            let spec = &src.whole.specs()[places.whole_param[k]];
            for slot in src.universal.slots(&spec.name) {
                let key = key_of(&spec.name, Some(&slot));
                let values = src
                    .universal
                    .gather(&key, &spec.shape, within)
                    .map_err(|e| sheaf_core::Error::BadState(e.to_string()))?;
                state.buffers.push((format!("{}.{slot}", p.name), values));
            }
            src.loaded.insert(p.name.to_owned());
        }
        self.inner.load_state(&state)
    }
}

impl Optimizer for Resharding<'_> {
    fn step(&mut self, params: &mut [Param<'_>]) -> sheaf_core::Result<()> {
        self.load_missing(params)?;
        self.inner.step(params)
    }
    fn learning_rate(&self) -> f64 {
        self.inner.learning_rate()
    }
    fn set_learning_rate(&mut self, lr: f64) {
        self.inner.set_learning_rate(lr);
    }
    fn state(&self) -> sheaf_core::Result<OptimState> {
        self.inner.state()
    }
    fn load_state(&mut self, state: &OptimState) -> sheaf_core::Result<()> {
        self.inner.load_state(state)
    }
    fn take_state(&mut self) -> sheaf_core::Result<OptimState> {
        self.inner.take_state()
    }
    fn state_views(&self) -> sheaf_core::Result<Option<sheaf_core::StateViews<'_>>> {
        self.inner.state_views()
    }
    fn state_bytes(&self) -> sheaf_core::Result<u64> {
        self.inner.state_bytes()
    }
    fn state_values_per_param(&self) -> Option<u32> {
        self.inner.state_values_per_param()
    }
}

#[cfg(test)]
pub(crate) mod tests;
