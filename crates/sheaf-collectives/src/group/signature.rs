//! Collective signatures: every collective call of a group has one (its sequence
//! number in the group, the operation, dtype, reduction, element count and root).
//! Before a call's own messages each rank sends its signature to its right neighbour;
//! before its first receive of the call (or at the call's end, when it receives
//! nothing) it compares its left neighbour's with its own. So a rank that took another
//! code path (another collective, size or root, one call more or fewer) is caught at
//! once, with both calls named, instead of waiting out the deadline or reducing
//! mismatched buffers: when any two ranks disagree some pair of neighbours does, and
//! the rank that sees it aborts the world. The cost is one small message per rank per
//! call on its own tag (class `Signature`, value 0), sent ahead of the call's data, so
//! it is usually there by the time it is checked.

use sheaf_core::{DType, Op, ReduceOp};

/// What one collective call is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Signature {
    /// 1 for the group's first collective call.
    pub seq: u64,
    pub op: Op,
    pub dtype: Option<DType>,
    pub reduce: Option<ReduceOp>,
    /// Elements of `dtype`, or bytes without one.
    pub count: u64,
    pub root: Option<u32>,
}

/// Bytes of an encoded signature.
pub(crate) const LEN: usize = 24;
const NONE: u8 = u8::MAX;

impl Signature {
    pub fn encode(&self) -> [u8; LEN] {
        let mut out = [0u8; LEN];
        out[..8].copy_from_slice(&self.seq.to_le_bytes());
        out[8] = Op::ALL.iter().position(|o| *o == self.op).map_or(NONE, |i| i as u8);
        out[9] = self.dtype.and_then(|d| DType::ALL.iter().position(|x| *x == d)).map_or(NONE, |i| i as u8);
        out[10] = self.reduce.map_or(NONE, ReduceOp::code);
        out[12..16].copy_from_slice(&self.root.unwrap_or(u32::MAX).to_le_bytes());
        out[16..24].copy_from_slice(&self.count.to_le_bytes());
        out
    }

    /// `None` for anything that is not a signature this code wrote.
    pub fn decode(bytes: &[u8]) -> Option<Signature> {
        let bytes: &[u8; LEN] = bytes.try_into().ok()?;
        let code = |b: u8| (b != NONE).then_some(b as usize);
        let op = *Op::ALL.get(usize::from(bytes[8]))?;
        let dtype = match code(bytes[9]) {
            Some(i) => Some(*DType::ALL.get(i)?),
            None => None,
        };
        let reduce = match code(bytes[10]) {
            Some(_) => Some(*ReduceOp::ALL.iter().find(|r| r.code() == bytes[10])?),
            None => None,
        };
        if bytes[11] != 0 {
            return None;
        }
        let root = u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes"));
        Some(Signature {
            seq: u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")),
            op,
            dtype,
            reduce,
            count: u64::from_le_bytes(bytes[16..24].try_into().expect("8 bytes")),
            root: (root != u32::MAX).then_some(root),
        })
    }

    /// "allreduce #812 (sum) of 669,706 f32", "broadcast #3 of 4 bytes from root 0".
    pub fn describe(&self) -> String {
        let mut s = format!("{} #{}", self.op, self.seq);
        if let Some(r) = self.reduce {
            s += &format!(" ({r:?})").to_lowercase();
        }
        let count = thousands(self.count);
        match self.dtype {
            Some(d) => s += &format!(" of {count} {d}"),
            None => s += &format!(" of {count} bytes"),
        }
        if let Some(root) = self.root {
            s += &format!(" from root {root}");
        }
        s
    }
}

pub(crate) fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_round_trip_and_read_well() {
        let sig = Signature {
            seq: 812,
            op: Op::Allreduce,
            dtype: Some(DType::F32),
            reduce: Some(ReduceOp::Sum),
            count: 669_706,
            root: None,
        };
        assert_eq!(Signature::decode(&sig.encode()), Some(sig));
        assert_eq!(sig.describe(), "allreduce #812 (sum) of 669,706 f32");
        let b = Signature { seq: 3, op: Op::Broadcast, dtype: None, reduce: None, count: 4, root: Some(0) };
        assert_eq!(Signature::decode(&b.encode()), Some(b));
        assert_eq!(b.describe(), "broadcast #3 of 4 bytes from root 0");
        assert_eq!(Signature::decode(&[0u8; 23]), None);
        assert_eq!(Signature::decode(&[0xFF; 24]), None);
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config::with_cases(
            std::env::var("SHEAF_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(2_000),
        ))]
        /// No input makes decoding panic; whatever decodes encodes back to itself
        /// (`SHEAF_FUZZ_CASES` inputs).
        #[test]
        fn any_bytes_decode_without_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..40)) {
            if let Some(sig) = Signature::decode(&bytes) {
                proptest::prop_assert_eq!(&sig.encode()[..], &bytes[..]);
            }
        }
    }
}
