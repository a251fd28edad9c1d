//! TensorBoard event files (`[outputs] tensorboard = true`): what PyTorch's
//! `SummaryWriter` writes, so `tensorboard --logdir RUN_DIR/tensorboard` shows a run.
//!
//! A file `events.out.tfevents.<seconds>.<host>.<pid>.sheaf` is a sequence of
//! TFRecord records (`u64` length, masked CRC-32C of the length, the bytes, masked
//! CRC-32C of the bytes), each a protobuf `Event`: the first says the file version
//! (`brain.Event:2`), the others hold scalar summaries at a step. The messages are
//! the three of TensorFlow's `event.proto` and `summary.proto` a scalar needs, with
//! their field numbers, encoded by `prost`. [`read_scalars`] reads files back.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use prost::Message;
use sheaf_plugins::HostError;

/// `tensorflow.Event`, the fields Sheaf writes.
#[derive(Clone, PartialEq, prost::Message)]
struct Event {
    #[prost(double, tag = "1")]
    wall_time: f64,
    #[prost(int64, tag = "2")]
    step: i64,
    #[prost(oneof = "What", tags = "3, 5")]
    what: Option<What>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
enum What {
    #[prost(string, tag = "3")]
    FileVersion(String),
    #[prost(message, tag = "5")]
    Summary(Summary),
}

/// `tensorflow.Summary`.
#[derive(Clone, PartialEq, prost::Message)]
struct Summary {
    #[prost(message, repeated, tag = "1")]
    value: Vec<Value>,
}

/// `tensorflow.Summary.Value` with a `simple_value`.
#[derive(Clone, PartialEq, prost::Message)]
struct Value {
    #[prost(string, tag = "1")]
    tag: String,
    #[prost(float, optional, tag = "2")]
    simple_value: Option<f32>,
}

fn masked_crc(bytes: &[u8]) -> u32 {
    let crc = crc32c::crc32c(bytes);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

fn now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// An event file being written.
pub struct EventWriter {
    path: PathBuf,
    file: BufWriter<File>,
}

impl EventWriter {
    /// A new event file in `dir` (created if missing).
    pub fn create(dir: &Path) -> Result<EventWriter, HostError> {
        std::fs::create_dir_all(dir).map_err(|e| HostError::io(dir, e))?;
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let name = format!(
            "events.out.tfevents.{}.{}.{}.sheaf",
            now() as u64,
            host.trim().replace(['/', '.'], "_"),
            std::process::id()
        );
        let path = dir.join(name);
        let file = File::create(&path).map_err(|e| HostError::io(&path, e))?;
        let mut writer = EventWriter { path, file: BufWriter::new(file) };
        writer.write(&Event {
            wall_time: now(),
            step: 0,
            what: Some(What::FileVersion("brain.Event:2".into())),
        })?;
        writer.flush()?;
        Ok(writer)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write(&mut self, event: &Event) -> Result<(), HostError> {
        let data = event.encode_to_vec();
        let len = (data.len() as u64).to_le_bytes();
        let mut record = Vec::with_capacity(data.len() + 16);
        record.extend_from_slice(&len);
        record.extend_from_slice(&masked_crc(&len).to_le_bytes());
        record.extend_from_slice(&data);
        record.extend_from_slice(&masked_crc(&data).to_le_bytes());
        self.file.write_all(&record).map_err(|e| HostError::io(&self.path, e))
    }

    /// Scalars at `step`, one event (not yet flushed). Values that are not finite
    /// are left out (TensorBoard plots NaN as a gap anyway).
    pub fn scalars(&mut self, step: u64, values: &[(&str, f64)]) -> Result<(), HostError> {
        let value: Vec<Value> = values
            .iter()
            .filter(|(_, v)| v.is_finite())
            .map(|(tag, v)| Value { tag: (*tag).into(), simple_value: Some(*v as f32) })
            .collect();
        if value.is_empty() {
            return Ok(());
        }
        self.write(&Event {
            wall_time: now(),
            step: step as i64,
            what: Some(What::Summary(Summary { value })),
        })
    }

    pub fn flush(&mut self) -> Result<(), HostError> {
        self.file.flush().map_err(|e| HostError::io(&self.path, e))
    }
}

/// One scalar read back: its tag, step and value.
#[derive(Clone, Debug, PartialEq)]
pub struct Scalar {
    pub tag: String,
    pub step: u64,
    pub value: f32,
}

/// Every scalar in the event files directly in `dir`, file by file in name order,
/// each file's in its order. A record whose checksum fails or that does not decode
/// is an error naming the file and the record's offset.
pub fn read_scalars(dir: &Path) -> Result<Vec<Scalar>, HostError> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| HostError::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("events.out.tfevents."))
        })
        .collect();
    files.sort();
    let mut out = Vec::new();
    for path in files {
        let mut bytes = Vec::new();
        File::open(&path).and_then(|mut f| f.read_to_end(&mut bytes)).map_err(|e| HostError::io(&path, e))?;
        let bad = |at: usize, what: &str| {
            HostError::Data(format!("{}: record at byte {at}: {what}", path.display()))
        };
        let mut at = 0;
        while at < bytes.len() {
            let header = bytes.get(at..at + 12).ok_or_else(|| bad(at, "truncated length"))?;
            let len_bytes: [u8; 8] = header[..8].try_into().expect("8 bytes");
            if masked_crc(&len_bytes).to_le_bytes() != header[8..12] {
                return Err(bad(at, "length checksum does not match"));
            }
            let len =
                usize::try_from(u64::from_le_bytes(len_bytes)).map_err(|_| bad(at, "length too large"))?;
            let end = (at + 12)
                .checked_add(len)
                .filter(|&e| e + 4 <= bytes.len())
                .ok_or_else(|| bad(at, "truncated record"))?;
            let data = &bytes[at + 12..end];
            if masked_crc(data).to_le_bytes() != bytes[end..end + 4] {
                return Err(bad(at, "data checksum does not match"));
            }
            let event = Event::decode(data).map_err(|e| bad(at, &e.to_string()))?;
            if let Some(What::Summary(summary)) = event.what {
                for v in summary.value {
                    if let Some(value) = v.simple_value {
                        out.push(Scalar { tag: v.tag, step: event.step.max(0) as u64, value });
                    }
                }
            }
            at = end + 4;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What is written reads back; the masked CRC is TensorFlow's (the value its
    /// `masked_crc32c` gives for these bytes); a flipped byte is caught.
    #[test]
    fn scalars_round_trip_and_corruption_is_named() {
        // TensorBoard's `masked_crc32c(b"")` and `masked_crc32c(b"abc")`
        // (tensorboard.compat.tensorflow_stub.pywrap_tensorflow, 2.21).
        assert_eq!(masked_crc(b""), 0xa282_ead8);
        assert_eq!(masked_crc(b"abc"), 0x21f1_576e);
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(dir.path()).unwrap();
        w.scalars(1, &[("loss", 2.5), ("lr", 1e-3), ("grad_norm", f64::NAN)]).unwrap();
        w.scalars(2, &[("loss", 2.0)]).unwrap();
        w.flush().unwrap();
        let got = read_scalars(dir.path()).unwrap();
        let want = [("loss", 1, 2.5f32), ("lr", 1, 1e-3), ("loss", 2, 2.0)];
        assert_eq!(got.len(), want.len(), "{got:?}");
        for (g, (tag, step, value)) in got.iter().zip(want) {
            assert_eq!((g.tag.as_str(), g.step, g.value), (tag, step, value));
        }
        let path = w.path().to_path_buf();
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 6;
        bytes[last] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        let e = read_scalars(dir.path()).unwrap_err().to_string();
        assert!(e.contains("checksum") && e.contains("events.out.tfevents."), "{e}");
    }
}
