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

/// A text's characters are its vocabulary, sorted, and its ids their places: what
/// `name`, `len`, `vocab` and `vocab_size` report, and what windows read back.
#[test]
fn text_files_are_their_characters() {
    let f = TokenFile::from_text("t", "banana!").unwrap();
    assert_eq!((f.name(), f.len(), f.is_empty()), ("t", 7, false));
    assert_eq!(f.vocab(), Some(&['!', 'a', 'b', 'n'][..]));
    assert_eq!(f.vocab_size(), Some(4));
    let empty = TokenFile::from_text("e", "").unwrap();
    assert_eq!((empty.is_empty(), empty.len(), empty.vocab_size()), (true, 0, Some(0)));
    // 65,536 distinct characters are ids 0..=65535; one more is refused.
    let many: String = (0..0x20000u32).filter_map(char::from_u32).take(65_536).collect();
    assert_eq!(TokenFile::from_text("m", &many).unwrap().vocab_size(), Some(65_536));
    let more: String = (0..0x20000u32).filter_map(char::from_u32).take(65_537).collect();
    let e = TokenFile::from_text("m", &more).unwrap_err().to_string();
    assert!(e.contains("65537 distinct characters"), "{e}");
}

/// A `.txt` file opens as characters, a `.bin` as little-endian u16 ids read through a
/// map, anything else is refused naming both; an odd-length `.bin` is refused; windows
/// of either read the same ids the file holds, and ids at or above a vocabulary are
/// found, named by their token and byte offsets, in both stores.
#[test]
fn token_files_open_by_kind_and_check_their_ids() {
    use sheaf_core::Dataset as _;
    let dir = tempfile::tempdir().unwrap();
    let txt = dir.path().join("a.txt");
    std::fs::write(&txt, "abcabcab").unwrap();
    let t = TokenFile::open(&txt).unwrap();
    assert_eq!((t.len(), t.vocab_size()), (8, Some(3)));
    assert!(t.name().ends_with("a.txt"));
    let ids: Vec<u16> = (0..3000u16).map(|i| i % 7 + i / 1000).collect();
    let bin = dir.path().join("a.bin");
    std::fs::write(&bin, ids.iter().flat_map(|i| i.to_le_bytes()).collect::<Vec<u8>>()).unwrap();
    let b = std::sync::Arc::new(TokenFile::open(&bin).unwrap());
    assert_eq!((b.len(), b.is_empty(), b.vocab(), b.vocab_size()), (3000, false, None, None));
    assert!(format!("{b:?}").contains("3000"), "{b:?}");
    // Windows of 5 ids, read back as the file holds them.
    let (_, test) = token_split(b.clone(), 0.5, 4, 1).unwrap();
    let got = match test.gather(&[0, 3]).unwrap() {
        sheaf_core::Samples::Tokens { windows, window } => (windows, window),
        other => panic!("{other:?}"),
    };
    let want: Vec<u32> =
        [1500usize, 1512].iter().flat_map(|&s| (s..s + 5).map(|i| u32::from(ids[i]))).collect();
    assert_eq!(got, (want, 5));
    assert!(test.gather(&[test.len()]).is_err(), "a window past the split");
    // Ids up to 9 (the largest is 6 + 2): a vocabulary of 9 takes them, of 8 not, and
    // the first too large is named where it is, in the mapped and the owned store.
    assert!(b.check_ids(9, Some(&bin)).is_ok() && b.check_ids(9, None).is_ok());
    let first = ids.iter().position(|&i| i >= 8).unwrap();
    for path in [Some(bin.as_path()), None] {
        let e = b.check_ids(8, path).unwrap_err().to_string();
        assert!(e.contains(&format!("at token offset {first} (byte {})", 2 * first)), "{e}");
    }
    let odd = dir.path().join("odd.bin");
    std::fs::write(&odd, [1u8, 2, 3]).unwrap();
    assert!(TokenFile::open(&odd).unwrap_err().to_string().contains("3 bytes"));
    let other = dir.path().join("a.csv");
    std::fs::write(&other, "x").unwrap();
    let e = TokenFile::open(&other).unwrap_err().to_string();
    assert!(e.contains(".txt") && e.contains(".bin"), "{e}");
}

/// A `.bin` file longer than the check's 1 MiB buffer is checked to its end: a bad id
/// in the last token is found, at its offset.
#[test]
fn long_token_files_are_checked_to_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let n = (1 << 19) + 1000;
    let mut ids = vec![3u16; n];
    ids[n - 1] = 50;
    let bin = dir.path().join("long.bin");
    std::fs::write(&bin, ids.iter().flat_map(|i| i.to_le_bytes()).collect::<Vec<u8>>()).unwrap();
    let f = TokenFile::open(&bin).unwrap();
    for path in [Some(bin.as_path()), None] {
        let e = f.check_ids(10, path).unwrap_err().to_string();
        assert!(e.contains(&format!("token id 50 at token offset {}", n - 1)), "{e}");
    }
    assert!(f.check_ids(51, Some(&bin)).is_ok());
}

/// Rows of CSV: `dim` numbers scaled by 1/16 then a whole label below the classes;
/// a wrong field count, a non-number, a fractional, negative or too-large label is an
/// error naming the line (counted with the blank lines skipped over); a dataset's
/// length is its rows', and gathering past the end is refused.
#[test]
fn csv_rows_parse_and_bad_ones_name_their_line() {
    use sheaf_core::Dataset as _;
    let d = parse_csv("c", "16,32,1\n\n0,8,2\n", 2, 3).unwrap();
    assert_eq!((d.inputs.clone(), d.labels.clone()), (vec![1.0, 2.0, 0.0, 0.5], vec![1, 2]));
    assert_eq!((Dataset::len(&d), d.is_empty(), sheaf_core::Dataset::len(&d)), (2, false, 2));
    let none = parse_csv("c", "", 2, 3).unwrap();
    assert!(none.is_empty() && sheaf_core::Dataset::is_empty(&none));
    assert!(d.gather(&[1, 0]).is_ok());
    let e = d.gather(&[0, 2]).unwrap_err().to_string();
    assert!(e.contains("sample 2 of a set of 2"), "{e}");
    for (text, line, want) in [
        ("1,2\n", 1, "2 fields, expected 3"),
        ("1,2,0\n\n1,2,3,4\n", 3, "4 fields, expected 3"),
        ("1,x,0\n", 1, "`x` is not a number"),
        ("1,2,0\n1,2,1.5\n", 2, "label `1.5`"),
        ("1,2,-1\n", 1, "label `-1`"),
        ("1,2,3\n", 1, "label `3` is not a class below 3"),
    ] {
        let e = parse_csv("c", text, 2, 3).unwrap_err().to_string();
        assert!(e.contains(&format!("c line {line}")) && e.contains(want), "{text:?}: {e}");
    }
    assert_eq!(parse_csv("c", "1,2,2\n", 2, 3).unwrap().labels, vec![2], "the last class is a class");
}

/// The teacher's labels are its definition's, recomputed here in f64 from the same
/// seeded draws (first layer, second layer, then each sample's inputs): the argmax
/// of `w2 tanh(w1 x)`, the first class on a tie. Where f32 and f64 could disagree (a
/// margin under 1e-4) the sample is skipped; there are few.
#[test]
fn teacher_labels_are_its_definitions() {
    let (samples, dim, classes, hidden, seed) = (300usize, 5usize, 3usize, 32usize, 7u64);
    let d = teacher(samples, dim, classes, seed);
    let mut rng = sheaf_core::SplitMix64::new(seed ^ 0x5EED_7EAC_4E12);
    let mut draw = |n: usize| -> Vec<f64> { (0..n).map(|_| f64::from(rng.next_f32())).collect() };
    let (w1, w2) = (draw(hidden * dim), draw(classes * hidden));
    let mut checked = 0;
    for s in 0..samples {
        let x = draw(dim);
        assert_eq!(d.inputs[s * dim..(s + 1) * dim].iter().map(|&v| f64::from(v)).collect::<Vec<_>>(), x);
        let h: Vec<f64> =
            (0..hidden).map(|j| (0..dim).map(|i| w1[j * dim + i] * x[i]).sum::<f64>().tanh()).collect();
        let scores: Vec<f64> =
            (0..classes).map(|c| (0..hidden).map(|j| w2[c * hidden + j] * h[j]).sum()).collect();
        let best = (0..classes).fold(0, |b, c| if scores[c] > scores[b] { c } else { b });
        let margin = (0..classes)
            .filter(|&c| c != best)
            .map(|c| scores[best] - scores[c])
            .fold(f64::INFINITY, f64::min);
        if margin > 1e-4 {
            assert_eq!(d.labels[s] as usize, best, "sample {s}: scores {scores:?}");
            checked += 1;
        }
    }
    assert!(checked > samples * 9 / 10, "only {checked} of {samples} clear of ties");
}

/// Row-by-row IDX files (`open_idx_pair`) check their header as the whole-file reader
/// does: a bad magic number, a header cut short (4 bytes of one dimension's), a single
/// dimension for images are refused naming the file; images of exactly two dimensions
/// and a header with no rows after it are taken; the rows' shape is checked against a
/// model, naming the set.
#[test]
fn row_by_row_idx_headers_are_checked() {
    use sheaf_core::Dataset as _;
    let dir = tempfile::tempdir().unwrap();
    let lab = dir.path().join("l-labels");
    std::fs::write(&lab, idx_bytes(8, &[2], &[0, 1])).unwrap();
    let img = dir.path().join("i-images");
    for (bytes, want) in [
        (b"\x01\x00\x08\x01\x00\x00\x00\x02xx".to_vec(), "bad magic"),
        (vec![0, 0, 8, 1], "truncated header (1 dimensions)"),
        (vec![0, 0, 8], "bad magic"),
        (idx_bytes(8, &[2], &[5, 6]), "at least 2 dimensions"),
    ] {
        std::fs::write(&img, &bytes).unwrap();
        let e = open_idx_pair(&img, &lab).unwrap_err().to_string();
        assert!(e.contains("i-images") && e.contains(want), "{bytes:?}: {e}");
    }
    std::fs::write(&img, idx_bytes(8, &[2, 3], &[1, 2, 3, 4, 5, 6])).unwrap();
    let rows = open_idx_pair(&img, &lab).unwrap();
    assert_eq!((rows.len(), rows.input_dim()), (2, 3));
    assert!(format!("{rows:?}").contains("i-images"), "{rows:?}");
    let e = rows.check_shape(4, 10).unwrap_err().to_string();
    assert!(e.contains("i-images") && e.contains("inputs"), "{e}");
    assert!(rows.check_shape(3, 10).is_ok());
    let empty_lab = dir.path().join("e-labels");
    std::fs::write(&empty_lab, idx_bytes(8, &[0], &[])).unwrap();
    std::fs::write(&img, idx_bytes(8, &[0, 3], &[])).unwrap();
    assert_eq!(open_idx_pair(&img, &empty_lab).unwrap().len(), 0);
}

/// A token split: the first `1 - test_fraction` of the tokens train, the rest
/// validate. Validation windows are strided from the cut; training windows start at
/// draws from the seed (`SplitMix64(seed ^ WINDOW_STREAM)`, the i-th draw modulo the
/// room before the split's end), every window `block_size + 1` consecutive ids inside
/// its split. Splits of exactly one window are taken, shorter ones refused naming the
/// split.
#[test]
fn token_splits_are_windows_of_their_part() {
    use sheaf_core::Dataset as _;
    let text: String = (0..103u32).map(|i| char::from(b'a' + (i * 7 % 26) as u8)).collect();
    let file = std::sync::Arc::new(TokenFile::from_text("t", &text).unwrap());
    let ids: Vec<u32> = {
        let vocab = file.vocab().unwrap().to_vec();
        text.chars().map(|c| vocab.binary_search(&c).unwrap() as u32).collect()
    };
    let (block, seed) = (4usize, 11u64);
    let (train, test) = token_split(file.clone(), 0.25, block, seed).unwrap();
    let cut = (0.75f64 * 103.0).floor() as usize;
    assert_eq!((train.tokens(), test.tokens()), (cut, 103 - cut));
    assert_eq!((train.len(), test.len()), ((cut - 1) / block, (103 - cut - 1) / block));
    let windows = |w: &TokenWindows, idx: &[usize]| match w.gather(idx).unwrap() {
        sheaf_core::Samples::Tokens { windows, window } => (windows, window),
        other => panic!("{other:?}"),
    };
    let all_test: Vec<usize> = (0..test.len()).collect();
    let want: Vec<u32> =
        all_test.iter().flat_map(|&i| ids[cut + i * block..cut + i * block + 5].to_vec()).collect();
    assert_eq!(windows(&test, &all_test), (want, 5));
    let mut rng = sheaf_core::SplitMix64::new(seed ^ 0x243F_6A88_85A3_08D3);
    let room = (cut - block) as u64;
    let all_train: Vec<usize> = (0..train.len()).collect();
    let starts: Vec<usize> = all_train.iter().map(|_| (rng.next_u64() % room) as usize).collect();
    let want: Vec<u32> = starts.iter().flat_map(|&s| ids[s..s + 5].to_vec()).collect();
    assert_eq!(windows(&train, &all_train), (want, 5));
    assert!(starts.iter().all(|&s| s + block < cut), "{starts:?}");
    // Exactly one window each side is enough; one token fewer is not.
    let n = 10;
    let exact = std::sync::Arc::new(TokenFile::from_text("x", &"ab".repeat(n / 2)).unwrap());
    let (a, b) = token_split(exact.clone(), 0.5, 4, 1).unwrap();
    assert_eq!((a.len(), b.len(), a.tokens(), b.tokens()), (1, 1, 5, 5));
    let e = token_split(exact.clone(), 0.6, 4, 1).unwrap_err().to_string();
    assert!(e.contains("the training split has 4 tokens"), "{e}");
    let e = token_split(exact, 0.4, 4, 1).unwrap_err().to_string();
    assert!(e.contains("the validation split has 4 tokens"), "{e}");
    // 8 validation tokens hold one strided window of 5, not two.
    let eight = std::sync::Arc::new(TokenFile::from_text("y", &"abcd".repeat(4)).unwrap());
    let (eight_train, eights) = token_split(eight, 0.5, 4, 1).unwrap();
    assert_eq!((eights.tokens(), eights.len()), (8, 1));
    assert_eq!((eight_train.tokens(), eight_train.len()), (8, 1), "training windows: (8 - 1) / 4");
}
