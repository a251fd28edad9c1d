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
