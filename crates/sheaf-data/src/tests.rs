//! The bundled digits, the IDX reader on good and corrupt files, the teacher.

use std::io::Write;

use crate::*;

#[test]
fn digits_is_the_whole_bundled_set() {
    let d = digits().unwrap();
    assert_eq!((d.len(), d.input_dim, d.num_classes), (1797, 64, 10));
    assert!(d.inputs.iter().all(|&p| (0.0..=1.0).contains(&p)));
    let mut counts = [0; 10];
    d.labels.iter().for_each(|&l| counts[l as usize] += 1);
    assert!(counts.iter().all(|&c| c > 150), "{counts:?}");
}

#[test]
fn split_is_deterministic_and_disjoint() {
    let d = digits().unwrap();
    let (train, test) = d.split(0.2, 7);
    assert_eq!((train.len(), test.len()), (1438, 359));
    assert_eq!(d.split(0.2, 7), (train.clone(), test));
    assert_ne!(d.split(0.2, 8).0, train);
}

#[test]
fn shape_mismatch_names_dataset_and_sizes() {
    let d = digits().unwrap();
    let e = d.check_shape(784, 10).unwrap_err().to_string();
    assert!(e.contains("digits") && e.contains("64") && e.contains("784"), "{e}");
    assert!(d.check_shape(64, 5).unwrap_err().to_string().contains("classes"));
    d.check_shape(64, 10).unwrap();
}

fn idx_bytes(code: u8, dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut out = vec![0, 0, code, dims.len() as u8];
    dims.iter().for_each(|d| out.extend_from_slice(&d.to_be_bytes()));
    out.extend_from_slice(data);
    out
}

#[test]
fn idx_pair_plain_and_gzipped() {
    let dir = tempfile::tempdir().unwrap();
    let images = idx_bytes(8, &[3, 2, 2], &[0, 255, 0, 255, 1, 2, 3, 4, 9, 9, 9, 9]);
    let labels = idx_bytes(8, &[3], &[1, 0, 7]);
    let img = dir.path().join("train-images-idx3-ubyte");
    std::fs::write(&img, &images).unwrap();
    let lab_gz = dir.path().join("train-labels-idx1-ubyte.gz");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&labels).unwrap();
    std::fs::write(&lab_gz, gz.finish().unwrap()).unwrap();
    let d = load_idx_pair(&img, &lab_gz).unwrap();
    assert_eq!((d.len(), d.input_dim, d.num_classes), (3, 4, 8));
    assert_eq!(d.labels, vec![1, 0, 7]);
    assert_eq!(d.inputs[1], 1.0);
    assert_eq!(labels_path_for(&img).unwrap(), dir.path().join("train-labels-idx1-ubyte"));
}

#[test]
fn corrupt_idx_files_are_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&str, Vec<u8>, &str); 4] = [
        ("magic", b"PK\x03\x04junk".to_vec(), "magic"),
        ("truncated", idx_bytes(8, &[10, 2], &[1, 2, 3]), "need 20 bytes"),
        ("floats", idx_bytes(0x0d, &[1], &[0, 0, 0, 0]), "type code"),
        ("gz", vec![0x1f, 0x8b, 1, 2, 3], "gzip"),
    ];
    for (name, bytes, needle) in cases {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        let e = read_idx(&p).unwrap_err().to_string();
        assert!(e.contains(name) && e.contains(needle), "{name}: {e}");
    }
    let e = read_idx(&dir.path().join("missing")).unwrap_err().to_string();
    assert!(e.contains("missing"), "{e}");
}

#[test]
fn teacher_is_seeded_and_uses_every_class() {
    let a = teacher(2000, 16, 4, 1);
    assert_eq!(a, teacher(2000, 16, 4, 1));
    assert_ne!(a, teacher(2000, 16, 4, 2));
    let mut seen = [false; 4];
    a.labels.iter().for_each(|&l| seen[l as usize] = true);
    assert!(seen.iter().all(|&s| s), "{seen:?}");
}

/// Rows read by index from a mapped (or, gzipped, decompressed) IDX file are the
/// rows the in-memory reader holds, split the same way; a short file is refused.
#[test]
fn idx_rows_read_by_index_equal_the_in_memory_rows() {
    use sheaf_core::Dataset as _;
    let dir = tempfile::tempdir().unwrap();
    let n = 10u32;
    let pixels: Vec<u8> = (0..n * 4).map(|i| (i * 7 % 256) as u8).collect();
    let images = idx_bytes(8, &[n, 2, 2], &pixels);
    let labels = idx_bytes(8, &[n], &(0..n).map(|i| (i % 3) as u8).collect::<Vec<_>>());
    let (img, lab) = (dir.path().join("a-images-idx3-ubyte"), dir.path().join("a-labels-idx1-ubyte"));
    std::fs::write(&img, &images).unwrap();
    std::fs::write(&lab, &labels).unwrap();
    let img_gz = dir.path().join("b-images-idx3-ubyte.gz");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&images).unwrap();
    std::fs::write(&img_gz, gz.finish().unwrap()).unwrap();
    let whole = load_idx_pair(&img, &lab).unwrap();
    for path in [&img, &img_gz] {
        let rows = open_idx_pair(path, &lab).unwrap();
        assert_eq!((rows.len(), rows.input_dim(), rows.num_classes()), (10, 4, 3));
        let (train, test) = rows.split(0.3, 5);
        let (want_train, want_test) = whole.split(0.3, 5);
        for (got, want) in [(train, want_train), (test, want_test)] {
            let all: Vec<usize> = (0..got.len()).collect();
            match got.gather(&all).unwrap() {
                sheaf_core::Samples::Rows { inputs, labels, input_dim } => {
                    assert_eq!((inputs, labels, input_dim), (want.inputs, want.labels, 4));
                }
                other => panic!("{other:?}"),
            }
        }
    }
    std::fs::write(&img, &images[..images.len() - 1]).unwrap();
    let e = open_idx_pair(&img, &lab).unwrap_err().to_string();
    assert!(e.contains("need 40 bytes of data, file has 39"), "{e}");
}
