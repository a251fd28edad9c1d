//! Tokenizers that text is encoded with before training: GPT-2's byte-pair encoding
//! (`gpt2`, tiktoken's `r50k_base`: 50,257 ids, `<|endoftext|>` = 50256), whose ranks
//! ship inside the `tiktoken-rs` crate, so nothing is downloaded.

use crate::{DataError, Result};

/// A tokenizer by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tokenizer {
    /// GPT-2's byte-pair encoding.
    Gpt2,
}

/// The tokenizers Sheaf knows, by the names jobs and `meta.json` use.
pub const TOKENIZERS: &[&str] = &["gpt2"];

impl Tokenizer {
    /// The tokenizer called `name`; an unknown name is an error listing the known ones.
    pub fn named(name: &str) -> Result<Tokenizer> {
        match name {
            "gpt2" => Ok(Tokenizer::Gpt2),
            other => Err(DataError::Corrupt {
                what: format!("tokenizer `{other}`"),
                detail: format!("unknown tokenizer (known: {})", TOKENIZERS.join(", ")),
            }),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Tokenizer::Gpt2 => "gpt2",
        }
    }

    /// Token ids: every id is below this.
    pub fn vocab_size(self) -> usize {
        match self {
            Tokenizer::Gpt2 => 50257,
        }
    }

    /// The id that separates documents.
    pub fn end_of_text(self) -> u32 {
        match self {
            Tokenizer::Gpt2 => 50256,
        }
    }

    fn bpe(self) -> &'static tiktoken_rs::CoreBPE {
        match self {
            Tokenizer::Gpt2 => tiktoken_rs::r50k_base_singleton(),
        }
    }

    /// The ids of `text`, special tokens read as plain text (as nanoGPT's
    /// `encode_ordinary`).
    pub fn encode(self, text: &str) -> Vec<u32> {
        self.bpe().encode_ordinary(text)
    }

    /// The text of `ids`. A byte sequence that is not UTF-8 (a sampled id may end
    /// inside a character) is shown with replacement characters; an id outside the
    /// vocabulary is an error.
    pub fn decode(self, ids: &[u32]) -> Result<String> {
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= self.vocab_size()) {
            return Err(DataError::Corrupt {
                what: format!("tokenizer `{}`", self.name()),
                detail: format!("token id {bad} is not below its vocab_size {}", self.vocab_size()),
            });
        }
        let bytes = self.bpe().decode_bytes(ids).map_err(|e| DataError::Corrupt {
            what: format!("tokenizer `{}`", self.name()),
            detail: e.to_string(),
        })?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }
}

/// GPT-2's map from bytes to printable characters, which its `vocab.json` and
/// `merges.txt` spell tokens in (`bytes_to_unicode` of OpenAI's `encoder.py`).
pub(crate) fn byte_chars() -> [char; 256] {
    let printable: Vec<u32> =
        (u32::from(b'!')..=u32::from(b'~')).chain(0xA1..=0xAC).chain(0xAE..=0xFF).collect();
    let mut out = ['\0'; 256];
    let mut extra = 0;
    for b in 0..256u32 {
        let c = if printable.contains(&b) {
            b
        } else {
            extra += 1;
            255 + extra
        };
        out[b as usize] = char::from_u32(c).expect("a character");
    }
    out
}

impl Tokenizer {
    /// The tokenizer as transformers' `GPT2Tokenizer` reads it from a model
    /// directory: `vocab.json`, `merges.txt` and `tokenizer_config.json`. The merges
    /// are recovered from the ranks: each token's pair is what byte-pair merging of
    /// its bytes with the lower ranks alone leaves.
    pub fn hf_files(self) -> Result<Vec<(&'static str, String)>> {
        let bpe = self.bpe();
        let bad =
            |detail: String| DataError::Corrupt { what: format!("tokenizer `{}`", self.name()), detail };
        let n = self.end_of_text() as usize;
        let mut tokens: Vec<Vec<u8>> = Vec::with_capacity(n);
        for id in 0..n as u32 {
            tokens.push(bpe.decode_bytes(&[id]).map_err(|e| bad(e.to_string()))?);
        }
        let rank: std::collections::HashMap<&[u8], u32> =
            tokens.iter().enumerate().map(|(i, t)| (t.as_slice(), i as u32)).collect();
        let chars = byte_chars();
        let spell = |bytes: &[u8]| -> String { bytes.iter().map(|&b| chars[b as usize]).collect() };
        let mut merges = String::from("#version: 0.2\n");
        for (id, token) in tokens.iter().enumerate().filter(|(_, t)| t.len() > 1) {
            let mut parts: Vec<&[u8]> = token.chunks(1).collect();
            while parts.len() > 2 {
                let best = (0..parts.len() - 1)
                    .filter_map(|i| {
                        let joined = [parts[i], parts[i + 1]].concat();
                        rank.get(joined.as_slice()).filter(|&&r| (r as usize) < id).map(|&r| (r, i))
                    })
                    .min();
                let Some((_, i)) = best else { break };
                let joined_len = parts[i].len() + parts[i + 1].len();
                let start = parts[..i].iter().map(|p| p.len()).sum::<usize>();
                parts[i] = &token[start..start + joined_len];
                parts.remove(i + 1);
            }
            if parts.len() != 2 {
                return Err(bad(format!("token {id} does not split into one pair of lower-ranked tokens")));
            }
            merges.push_str(&format!("{} {}\n", spell(parts[0]), spell(parts[1])));
        }
        let mut vocab = serde_json::Map::new();
        for (id, token) in tokens.iter().enumerate() {
            vocab.insert(spell(token), id.into());
        }
        vocab.insert("<|endoftext|>".into(), self.end_of_text().into());
        let config = serde_json::json!({
            "tokenizer_class": "GPT2Tokenizer",
            "bos_token": "<|endoftext|>",
            "eos_token": "<|endoftext|>",
            "unk_token": "<|endoftext|>",
            "add_prefix_space": false,
            "model_max_length": 1024,
        });
        Ok(vec![
            ("vocab.json", serde_json::Value::Object(vocab).to_string()),
            ("merges.txt", merges),
            ("tokenizer_config.json", serde_json::to_string_pretty(&config).expect("JSON")),
        ])
    }
}
