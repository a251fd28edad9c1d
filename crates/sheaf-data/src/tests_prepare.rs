//! GPT-2 tokens and `prepare`: the tokenizer's ids, the law that streaming in blocks
//! gives the ids of the whole text with the split at the first boundary after the
//! cut, and the refusals.

use std::sync::Arc;

use proptest::prelude::*;
use sheaf_core::{Dataset as _, Samples};

use crate::prepare::{prepare_in_blocks, read_meta};
use crate::*;

fn ids_of(path: &std::path::Path) -> Vec<u32> {
    std::fs::read(path)
        .unwrap()
        .chunks_exact(2)
        .map(|b| u32::from(u16::from_le_bytes([b[0], b[1]])))
        .collect()
}

#[test]
fn gpt2_encodes_as_tiktoken_does_and_decodes_back() {
    let gpt2 = Tokenizer::named("gpt2").unwrap();
    assert_eq!(gpt2.encode("Hello world\n"), vec![15496, 995, 198]);
    assert_eq!((gpt2.vocab_size(), gpt2.end_of_text()), (50257, 50256));
    let text = "First Citizen:\nBefore we proceed any further, hear me speak.\n";
    assert_eq!(gpt2.decode(&gpt2.encode(text)).unwrap(), text);
    // Special tokens in the text are text.
    assert_eq!(gpt2.decode(&gpt2.encode("<|endoftext|>")).unwrap(), "<|endoftext|>");
    assert!(!gpt2.encode("<|endoftext|>").contains(&50256));
    assert_eq!(gpt2.decode(&[50256]).unwrap(), "<|endoftext|>");
    let e = gpt2.decode(&[50257]).unwrap_err().to_string();
    assert!(e.contains("token id 50257") && e.contains("50257"), "{e}");
    let e = Tokenizer::named("llama3").unwrap_err().to_string();
    assert!(e.contains("unknown tokenizer") && e.contains("llama3") && e.contains("gpt2"), "{e}");
}

/// Where the validation split must begin: the first place at or after `cut` where a
/// lone space (before it) or line break (after it) sits between two ASCII characters
/// that are not whitespace (the text's start and end count as such places).
fn expected_split(text: &[u8], cut: usize) -> usize {
    if cut == 0 {
        return 0;
    }
    let plain = |i: usize| i < text.len() && text[i].is_ascii() && !text[i].is_ascii_whitespace();
    (cut.max(2)..text.len())
        .find(|&at| {
            (text[at - 1] == b'\n' && plain(at - 2) && plain(at))
                || (text[at] == b' ' && plain(at - 1) && plain(at + 1))
        })
        .unwrap_or(text.len())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Any text, any block size: train.bin then val.bin are the ids of the whole text,
    /// split at the first boundary at or after the cut; meta.json counts them.
    #[test]
    fn blocks_encode_as_the_whole_text(
        pieces in proptest::collection::vec(
            prop_oneof![
                Just("\n"), Just("\n\n"), Just(" "), Just("  "), Just("\t"), Just("word"), Just(" the"),
                Just("KING:"), Just("'s"), Just("42"), Just("é"), Just("—"), Just("\r\n"), Just("!?"),
            ],
            0..120,
        ),
        block in 1usize..64,
        val_fraction in prop_oneof![Just(0.0), Just(0.1), Just(0.5), Just(0.9)],
    ) {
        let text: String = pieces.concat();
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("input.txt");
        std::fs::write(&input, &text).unwrap();
        let out = dir.path().join("prepared");
        let gpt2 = Tokenizer::Gpt2;
        let mut seen = Vec::new();
        let meta = prepare_in_blocks(&input, gpt2, &out, val_fraction, block, &mut |done, total| seen.push((done, total))).unwrap();
        let (train, val) = (ids_of(&out.join("train.bin")), ids_of(&out.join("val.bin")));
        let cut = if val_fraction > 0.0 {
            expected_split(text.as_bytes(), ((1.0 - val_fraction) * text.len() as f64).floor() as usize)
        } else {
            text.len()
        };
        prop_assert_eq!(&train, &gpt2.encode(&text[..cut]));
        prop_assert_eq!(&val, &gpt2.encode(&text[cut..]));
        prop_assert_eq!([train.clone(), val.clone()].concat(), gpt2.encode(&text));
        prop_assert_eq!((meta.train_tokens, meta.val_tokens), (train.len() as u64, val.len() as u64));
        prop_assert_eq!(read_meta(&out).unwrap(), (meta, gpt2));
        prop_assert!(seen.last().is_none_or(|&(done, total)| done == total && total == text.len() as u64));
        let leftovers: Vec<_> = std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name()).collect();
        prop_assert_eq!(leftovers.len(), 3, "{:?}", leftovers);
    }
}

#[test]
fn bad_input_is_refused_and_leaves_no_dataset() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("input.txt");
    let out = dir.path().join("prepared");
    let mut bytes = b"Hello\nworld\n".repeat(20);
    bytes.extend_from_slice(&[b'x', 0xff, b'\n']);
    std::fs::write(&input, &bytes).unwrap();
    let e =
        prepare_in_blocks(&input, Tokenizer::Gpt2, &out, 0.1, 16, &mut |_, _| {}).unwrap_err().to_string();
    assert!(e.contains("not UTF-8") && e.contains(&format!("offset {}", bytes.len() - 2)), "{e}");
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 0, "nothing half-written is left");

    std::fs::write(&input, "Hello\nworld\n").unwrap();
    let e =
        prepare_in_blocks(&input, Tokenizer::Gpt2, &out, 1.0, 16, &mut |_, _| {}).unwrap_err().to_string();
    assert!(e.contains("--val-fraction") && e.contains("[0, 1)"), "{e}");
    let e =
        prepare_in_blocks(&dir.path().join("missing.txt"), Tokenizer::Gpt2, &out, 0.1, 16, &mut |_, _| {})
            .unwrap_err()
            .to_string();
    assert!(e.contains("missing.txt"), "{e}");

    // meta.json of an unknown tokenizer, or of a vocabulary not the tokenizer's.
    prepare_in_blocks(&input, Tokenizer::Gpt2, &out, 0.5, 16, &mut |_, _| {}).unwrap();
    let meta = std::fs::read_to_string(out.join("meta.json")).unwrap();
    std::fs::write(out.join("meta.json"), meta.replace("\"gpt2\"", "\"bert\"")).unwrap();
    let e = read_meta(&out).unwrap_err().to_string();
    assert!(e.contains("unknown tokenizer") && e.contains("bert"), "{e}");
    std::fs::write(out.join("meta.json"), meta.replace("50257", "50304")).unwrap();
    let e = read_meta(&out).unwrap_err().to_string();
    assert!(e.contains("vocab_size 50304") && e.contains("50257"), "{e}");
}

#[test]
fn prepared_splits_read_train_and_val_files_as_windows() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, ids: std::ops::Range<u16>| {
        let path = dir.path().join(name);
        std::fs::write(&path, ids.flat_map(u16::to_le_bytes).collect::<Vec<u8>>()).unwrap();
        Arc::new(TokenFile::open(&path).unwrap())
    };
    let (train, val) = (write("train.bin", 0..100), write("val.bin", 1000..1020));
    let (tr, va) = token_split_prepared(train.clone(), val.clone(), 4, 3).unwrap();
    assert_eq!((tr.len(), va.len()), (24, 4));
    let Samples::Tokens { windows, window } = va.gather(&[0, 3]).unwrap() else { panic!("tokens") };
    assert_eq!((window, windows), (5, vec![1000, 1001, 1002, 1003, 1004, 1012, 1013, 1014, 1015, 1016]));
    let Samples::Tokens { windows, .. } = tr.gather(&[0, 1, 2]).unwrap() else { panic!("tokens") };
    assert!(windows.iter().all(|&t| t < 100), "training windows come from train.bin only");
    let e = token_split_prepared(train, val, 20, 3).unwrap_err().to_string();
    assert!(e.contains("validation split has 20 tokens") && e.contains("21"), "{e}");
}

/// transformers' files for GPT-2's tokenizer, recovered from the ranks: GPT-2's own
/// ids and first merge, and byte-pair encoding by these merges (as transformers does:
/// the pair merged earliest first) gives tiktoken's ids.
#[test]
fn gpt2_tokenizer_files_encode_as_tiktoken() {
    let files = Tokenizer::Gpt2.hf_files().unwrap();
    let get = |name: &str| files.iter().find(|(n, _)| *n == name).map(|(_, t)| t.clone()).unwrap();
    let vocab: serde_json::Value = serde_json::from_str(&get("vocab.json")).unwrap();
    assert_eq!(vocab.as_object().unwrap().len(), 50257);
    for (token, id) in [("Hello", 15496), ("\u{120}world", 995), ("\u{10a}", 198), ("<|endoftext|>", 50256)] {
        assert_eq!(vocab[token].as_u64(), Some(id), "{token}");
    }
    let merges_text = get("merges.txt");
    let merges: Vec<(String, String)> = merges_text
        .lines()
        .skip(1)
        .map(|l| {
            let (a, b) = l.split_once(' ').unwrap();
            (a.to_string(), b.to_string())
        })
        .collect();
    assert_eq!(merges.len(), 50000);
    assert_eq!(merges[0], ("\u{120}".to_string(), "t".to_string()), "GPT-2's first merge is `Ġ t`");
    let order: std::collections::HashMap<(String, String), usize> =
        merges.iter().cloned().enumerate().map(|(i, m)| (m, i)).collect();
    let chars = super::tokenizer::byte_chars();
    for piece in
        [" the", "Hello", " world", "\n\n", " Shakespeare", "ROMEO", " thou", "'s", " 1937", " naïve", "!?"]
    {
        let mut parts: Vec<String> = piece.bytes().map(|b| chars[b as usize].to_string()).collect();
        loop {
            let best = (0..parts.len().saturating_sub(1))
                .filter_map(|i| order.get(&(parts[i].clone(), parts[i + 1].clone())).map(|&r| (r, i)))
                .min();
            let Some((_, i)) = best else { break };
            let joined = format!("{}{}", parts[i], parts[i + 1]);
            parts.splice(i..i + 2, [joined]);
        }
        let ids: Vec<u32> = parts.iter().map(|p| vocab[p].as_u64().unwrap() as u32).collect();
        assert_eq!(ids, Tokenizer::Gpt2.encode(piece), "{piece:?}");
    }
}
