//! Fuzzing the dataset readers on files as a user could hand them over: IDX images
//! and labels (plain and gzipped), token ids (`.bin`) and text (`.txt`), each read,
//! split and gathered from.

use std::io::Write;
use std::sync::Arc;

use sheaf_core::Dataset as _;
use sheaf_testkit::fuzz::{fuzz, inputs, CappedAlloc};

use crate::{load_idx_pair, open_idx_pair, token_split, TokenFile};

#[global_allocator]
static ALLOC: CappedAlloc = CappedAlloc;

fn idx(dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut b = vec![0, 0, 8, dims.len() as u8];
    for d in dims {
        b.extend_from_slice(&d.to_be_bytes());
    }
    b.extend_from_slice(data);
    b
}

fn gz(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

#[test]
fn idx_files() {
    let dir = tempfile::tempdir().unwrap();
    let (images, labels) =
        (dir.path().join("fuzz-images-idx3-ubyte"), dir.path().join("fuzz-labels-idx1-ubyte"));
    std::fs::write(&labels, idx(&[3], &[0, 1, 2])).unwrap();
    let pixels: Vec<u8> = (0..12).collect();
    let seeds = vec![idx(&[3, 2, 2], &pixels), gz(&idx(&[3, 2, 2], &pixels)), idx(&[3], &[0, 1, 2])];
    fuzz("IDX file", inputs(seeds), |b| {
        std::fs::write(&images, b).unwrap();
        if let Ok(rows) = open_idx_pair(&images, &labels) {
            let _ = rows.gather(&(0..rows.len()).collect::<Vec<_>>());
        }
        let _ = load_idx_pair(&labels, &images);
        let _ = crate::read_idx(&images);
    });
}

#[test]
fn token_id_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fuzz.bin");
    let ids: Vec<u8> = (0u16..64).flat_map(|i| (i % 50).to_le_bytes()).collect();
    fuzz("token .bin file", inputs(vec![ids]), |b| {
        std::fs::write(&path, b).unwrap();
        let Ok(file) = TokenFile::open(&path) else { return };
        if file.check_ids(50, Some(&path)).is_err() {
            return;
        }
        if let Ok((train, test)) = token_split(Arc::new(file), 0.25, 4, 1) {
            let _ = train.gather(&(0..train.len().min(3)).collect::<Vec<_>>());
            let _ = test.gather(&(0..test.len().min(3)).collect::<Vec<_>>());
        }
    });
}

#[test]
fn token_text() {
    let seed = b"ROMEO:\nBut soft, what light through yonder window breaks?\n".to_vec();
    fuzz("token .txt text", inputs(vec![seed]), |b| {
        let Ok(file) = TokenFile::from_text("fuzz.txt", &String::from_utf8_lossy(b)) else { return };
        let vocab = file.vocab_size().unwrap_or(0);
        if file.check_ids(vocab, None).is_err() {
            return;
        }
        if let Ok((train, _)) = token_split(Arc::new(file), 0.1, 8, 2) {
            let _ = train.gather(&(0..train.len().min(2)).collect::<Vec<_>>());
        }
    });
}
