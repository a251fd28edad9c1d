//! The world group's allreduce choices, measured once per run directory: on the first
//! start every rank calibrates together ([`sheaf_collectives::calibrate`]) and rank 0
//! keeps the result in `RUN_DIR/tuning.json`; a restart or resume on the same
//! transport and world size reads it back (rank 0 reads, every rank gets it by
//! broadcast). `summary.json` shows it as `collectives_tuning`. A world that knows
//! its hosts (`auto` transport across hosts) keeps its hierarchical allreduce by the
//! fixed rule: calibration measures flat algorithms only.

use std::path::Path;
use std::time::Instant;

use serde_json::{json, Value};
use sheaf_collectives::{Algorithm, Group, Tuning};
use sheaf_core::{Communicator, Deadline};
use sheaf_plugins::HostError;

/// The file in the run directory.
pub const FILE: &str = "tuning.json";

/// `group` with `auto` tuned (unchanged when its algorithm is fixed or it is alone),
/// and what to report of it.
pub fn tune(
    group: Group,
    transport: &str,
    run_dir: Option<&Path>,
    dl: Deadline,
) -> Result<(Group, Option<Value>), HostError> {
    let (rank, world) = (group.rank(), group.world_size());
    // A group that knows its hosts reduces hierarchically, which is not measured here.
    if group.algorithm() != Algorithm::Auto || world == 1 || group.knows_hosts() {
        return Ok((group, None));
    }
    let failed =
        |e: sheaf_core::CommError| HostError::Train { rank, detail: format!("tuning the collectives: {e}") };
    // Rank 0's cached tuning, if it is this transport's at this world size, to all.
    let cached = run_dir.and_then(|d| read(&d.join(FILE), transport, world));
    let mut text =
        cached.as_ref().map(|t| to_json(t, transport).to_string()).unwrap_or_default().into_bytes();
    let mut len = [text.len() as u64];
    group.broadcast(bytemuck::cast_slice_mut(&mut len), 0, dl).map_err(failed)?;
    text.resize(len[0] as usize, 0);
    if len[0] > 0 {
        group.broadcast(&mut text, 0, dl).map_err(failed)?;
        let value: Value =
            serde_json::from_slice(&text).map_err(|e| HostError::Data(format!("{FILE}: {e}")))?;
        let tuning =
            from_json(&value, world).ok_or_else(|| HostError::Data(format!("{FILE}: unreadable")))?;
        let report = json!({ "measured": false, "seconds": 0.0, "auto": value["auto"] });
        return Ok((group.with_tuning(tuning), Some(report)));
    }
    let t = Instant::now();
    let tuning = sheaf_collectives::calibrate(&group, dl).map_err(failed)?;
    let seconds = t.elapsed().as_secs_f64();
    let value = to_json(&tuning, transport);
    if let Some(dir) = run_dir {
        // A cache: a run that cannot write it measures again next time.
        if let Err(e) = std::fs::write(dir.join(FILE), value.to_string()) {
            tracing::warn!("cannot keep the collectives' tuning in {}: {e}", dir.display());
        }
    }
    tracing::info!("collectives tuned in {seconds:.2} s: {}", value["auto"]);
    let report = json!({ "measured": true, "seconds": seconds, "auto": value["auto"] });
    Ok((group.with_tuning(tuning), Some(report)))
}

/// `{"transport", "world", "auto": [{"upto_bytes": n | null, "algorithm"}]}`; null is
/// every size beyond.
fn to_json(t: &Tuning, transport: &str) -> Value {
    let auto: Vec<Value> = t
        .upto
        .iter()
        .map(|(max, a)| json!({ "upto_bytes": (*max != usize::MAX).then_some(*max), "algorithm": a.name() }))
        .collect();
    json!({ "transport": transport, "world": t.world, "auto": auto })
}

fn from_json(v: &Value, world: usize) -> Option<Tuning> {
    let upto = v["auto"]
        .as_array()?
        .iter()
        .map(|e| {
            let max = match &e["upto_bytes"] {
                Value::Null => usize::MAX,
                n => usize::try_from(n.as_u64()?).ok()?,
            };
            let a: Algorithm = e["algorithm"].as_str()?.parse().ok()?;
            matches!(a, Algorithm::Ring | Algorithm::Direct | Algorithm::HalvingDoubling).then_some((max, a))
        })
        .collect::<Option<Vec<_>>>()?;
    (!upto.is_empty()).then_some(Tuning { world, upto })
}

/// The tuning in `path` when it was measured on `transport` at `world` ranks.
fn read(path: &Path, transport: &str, world: usize) -> Option<Tuning> {
    let v: Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    (v["transport"] == transport && v["world"].as_u64() == Some(world as u64))
        .then(|| from_json(&v, world))?
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What is kept reads back as it was; another transport's, another world's or a
    /// damaged file is not used.
    #[test]
    fn a_kept_tuning_reads_back_only_for_its_transport_and_world() {
        let dir = tempfile::tempdir().unwrap();
        let t = Tuning { world: 2, upto: vec![(32 << 10, Algorithm::Direct), (usize::MAX, Algorithm::Ring)] };
        let path = dir.path().join(FILE);
        std::fs::write(&path, to_json(&t, "shm").to_string()).unwrap();
        assert_eq!(read(&path, "shm", 2), Some(t.clone()));
        assert_eq!(read(&path, "zmq-tcp", 2), None);
        assert_eq!(read(&path, "shm", 3), None);
        std::fs::write(
            &path,
            r#"{"transport": "shm", "world": 2, "auto": [{"upto_bytes": null, "algorithm": "auto"}]}"#,
        )
        .unwrap();
        assert_eq!(read(&path, "shm", 2), None, "auto is not a measured choice");
        std::fs::write(&path, "{").unwrap();
        assert_eq!(read(&path, "shm", 2), None);
    }
}
