//! The flight recorder: each rank's last [`KEEP`] calls on the communicators a strategy
//! is lent (collectives numbered per group, as every rank of the group numbers them;
//! point-to-point calls per peer and direction), with when each entered and left and
//! how it ended. A rank writes them to `RUN_DIR/flight/rank-N.json` when a call fails
//! (a deadline, a dead or disagreeing peer), when its run fails, and on SIGUSR2 (which
//! the launcher sends every worker still running when one fails); [`report`] then says
//! which rank finished which call and never entered the next, and who waits where.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// Calls kept per rank: the newest.
pub const KEEP: usize = 1000;

/// The directory of a run's flight records.
pub const DIR: &str = "flight";

/// One call.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Call {
    /// `world`, or a group split from one (`world/3.1`: split call 3, color 1).
    pub group: String,
    pub op: String,
    /// The call's number: among the group's collectives, or among this rank's sends
    /// to (receives from) `peer`.
    pub seq: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer: Option<usize>,
    pub bytes: u64,
    /// Microseconds since the Unix epoch.
    pub enter_us: f64,
    /// `None`: still inside.
    pub leave_us: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Call {
    fn name(&self) -> String {
        match (self.peer, self.op.as_str()) {
            (Some(p), "send") => format!("send #{} to rank {p}", self.seq),
            (Some(p), op) => format!("{op} #{} from rank {p}", self.seq),
            (None, op) => format!("{op} #{} of group {}", self.seq, self.group),
        }
    }
}

/// What a rank writes: its calls, oldest first, and when it wrote them.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Record {
    pub rank: usize,
    pub at_us: f64,
    pub calls: Vec<Call>,
}

/// A rank's recorder: its last calls, and where it writes them.
#[derive(Default)]
pub struct Flight {
    /// The number of the oldest call kept, and the calls.
    calls: Mutex<(u64, VecDeque<Call>)>,
    path: Mutex<Option<PathBuf>>,
}

impl Flight {
    /// Where [`Flight::write`] writes (`RUN_DIR/flight/rank-N.json`).
    pub fn set_path(&self, path: PathBuf) {
        *self.path.lock().unwrap_or_else(|e| e.into_inner()) = Some(path);
    }

    /// A call entered: its number for [`Flight::leave`].
    pub fn enter(&self, call: Call) -> u64 {
        let mut g = self.calls.lock().unwrap_or_else(|e| e.into_inner());
        if g.1.len() == KEEP {
            g.1.pop_front();
            g.0 += 1;
        }
        g.1.push_back(call);
        g.0 + g.1.len() as u64 - 1
    }

    /// Call `id` left at `now_us`, with `error` if it failed.
    pub fn leave(&self, id: u64, now_us: f64, error: Option<String>) {
        let mut g = self.calls.lock().unwrap_or_else(|e| e.into_inner());
        let first = g.0;
        if let Some(c) = id.checked_sub(first).and_then(|i| g.1.get_mut(i as usize)) {
            (c.leave_us, c.error) = (Some(now_us), error);
        }
    }

    /// The calls kept, oldest first.
    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap_or_else(|e| e.into_inner()).1.iter().cloned().collect()
    }

    /// Writes the record (replacing an earlier one) where [`Flight::set_path`] said;
    /// nothing without a path. A failure to write is logged: the recorder never adds a
    /// failure to the one it records.
    pub fn write(&self, rank: usize, now_us: f64) {
        let Some(path) = self.path.lock().unwrap_or_else(|e| e.into_inner()).clone() else { return };
        let record = Record { rank, at_us: now_us, calls: self.calls() };
        let written = path
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .map_err(|e| e.to_string())
            .and_then(|()| serde_json::to_vec(&record).map_err(|e| e.to_string()))
            .and_then(|json| crate::outputs::write_atomic(&path, &json).map_err(|e| e.to_string()));
        if let Err(e) = written {
            eprintln!("flight recorder: cannot write {}: {e}", path.display());
        }
    }
}

/// Every rank's record in `dir`, by rank (those that cannot be read are left out).
pub fn read_records(dir: &Path) -> Vec<Record> {
    let mut records: Vec<Record> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
        .filter_map(|e| serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok())
        .collect();
    records.sort_by_key(|r| r.rank);
    records
}

/// `0-2`, `0, 3`: ranks as a short list.
fn ranks(list: &[usize]) -> String {
    let mut parts = Vec::new();
    let mut i = 0;
    while i < list.len() {
        let mut j = i;
        while j + 1 < list.len() && list[j + 1] == list[j] + 1 {
            j += 1;
        }
        parts.push(match j - i {
            0 => list[i].to_string(),
            1 => format!("{}, {}", list[i], list[j]),
            _ => format!("{}-{}", list[i], list[j]),
        });
        i = j + 1;
    }
    parts.join(", ")
}

/// What the records say, a line each: every rank outside any call with the last one
/// it left (for a collective, "and never entered" the next), then each call ranks
/// wait in, and since when (at the time each wrote its record).
pub fn report(records: &[Record]) -> Vec<String> {
    let mut lines = Vec::new();
    let mut waiting: BTreeMap<String, (Vec<usize>, f64)> = BTreeMap::new();
    for r in records {
        let Some(last) = r.calls.last() else {
            lines.push(format!("rank {} made no call", r.rank));
            continue;
        };
        match last.leave_us {
            Some(left) if last.error.is_some() => {
                let waited = (left - last.enter_us) / 1e6;
                let error = last.error.as_deref().unwrap_or_default();
                lines.push(format!(
                    "rank {} waited in {} {waited:.1} s and gave up: {error}",
                    r.rank,
                    last.name()
                ));
            }
            Some(left) => {
                let ago = (r.at_us - left) / 1e6;
                let next = match last.peer {
                    None => format!(" and never entered #{}", last.seq + 1),
                    Some(_) => " and entered no call since".to_string(),
                };
                lines.push(format!(
                    "rank {} left {}{next} ({ago:.1} s before its record)",
                    r.rank,
                    last.name()
                ));
            }
            None => {
                let entry = waiting.entry(last.name()).or_insert((Vec::new(), 0.0));
                entry.0.push(r.rank);
                entry.1 = entry.1.max((r.at_us - last.enter_us) / 1e6);
            }
        }
    }
    for (call, (who, since)) in waiting {
        let subject = match who.len() {
            1 => format!("rank {} waits", who[0]),
            _ => format!("ranks {} wait", ranks(&who)),
        };
        lines.push(format!("{subject} in {call} since {since:.1} s"));
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(group: &str, op: &str, seq: u64, peer: Option<usize>, enter: f64, leave: Option<f64>) -> Call {
        Call {
            group: group.into(),
            op: op.into(),
            seq,
            peer,
            bytes: 8,
            enter_us: enter,
            leave_us: leave,
            error: None,
        }
    }

    /// The rank that left a collective and never entered the next is named with both
    /// numbers, and the ranks waiting in it with how long; point-to-point calls name
    /// their peer.
    #[test]
    fn the_report_names_who_stopped_and_who_waits() {
        let at = 20e6;
        let done = |seq| call("world", "allreduce", seq, None, 1e6, Some(2e6));
        let mut records: Vec<Record> = (0..3)
            .map(|rank| Record {
                rank,
                at_us: at,
                calls: vec![done(181), done(182), call("world", "allreduce", 183, None, 7.6e6, None)],
            })
            .collect();
        records.push(Record { rank: 3, at_us: at, calls: vec![done(181), done(182)] });
        records.push(Record {
            rank: 4,
            at_us: at,
            calls: vec![call("world/2.0", "recv", 7, Some(5), 10e6, None)],
        });
        records.push(Record {
            rank: 5,
            at_us: at,
            calls: vec![call("world/2.0", "send", 6, Some(4), 1e6, Some(5e6))],
        });
        let mut failed = call("world", "barrier", 9, None, 4e6, Some(7e6));
        failed.error = Some("timed out".into());
        records.push(Record { rank: 6, at_us: at, calls: vec![failed] });
        let lines = report(&records);
        assert_eq!(
            lines,
            [
                "rank 3 left allreduce #182 of group world and never entered #183 (18.0 s before its record)",
                "rank 5 left send #6 to rank 4 and entered no call since (15.0 s before its record)",
                "rank 6 waited in barrier #9 of group world 3.0 s and gave up: timed out",
                "ranks 0-2 wait in allreduce #183 of group world since 12.4 s",
                "rank 4 waits in recv #7 from rank 5 since 10.0 s",
            ]
        );
    }

    /// The recorder keeps the newest calls, and a call leaves by its number even after
    /// older ones went.
    #[test]
    fn the_recorder_keeps_the_newest_calls() {
        let f = Flight::default();
        let ids: Vec<u64> =
            (0..KEEP as u64 + 5).map(|s| f.enter(call("world", "barrier", s, None, 0.0, None))).collect();
        f.leave(ids[KEEP + 4], 9.0, Some("timed out".into()));
        f.leave(ids[0], 9.0, None);
        let calls = f.calls();
        assert_eq!((calls.len(), calls[0].seq), (KEEP, 5));
        let last = calls.last().unwrap();
        assert_eq!((last.leave_us, last.error.as_deref()), (Some(9.0), Some("timed out")));
        assert_eq!(ranks(&[0, 1, 2, 5, 7, 8]), "0-2, 5, 7, 8");
    }
}
