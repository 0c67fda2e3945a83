//! Inputs: how a target reads its bytes, and helpers that build structured ones.
//!
//! Structured targets keep their inputs as JSON, so a corpus file reads (and can be
//! written) by hand; bytes that are not JSON of the target's input type are read the
//! way `cargo fuzz` targets read theirs, with `arbitrary` (so every byte string is an
//! input, and a mutation that breaks the JSON still tests something).

use arbitrary::{Arbitrary, Unstructured};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// The input `bytes` stand for: their JSON, or else what `arbitrary` makes of them.
pub fn decode<T>(bytes: &[u8]) -> T
where
    T: DeserializeOwned + for<'a> Arbitrary<'a> + Default,
{
    serde_json::from_slice(bytes)
        .unwrap_or_else(|_| T::arbitrary_take_rest(Unstructured::new(bytes)).unwrap_or_default())
}

/// An input as it is stored: pretty JSON.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec_pretty(value).unwrap_or_default()
}

/// A number below `n` (0 when out of data or `n` is 0).
pub fn below(u: &mut Unstructured<'_>, n: usize) -> usize {
    if n == 0 { 0 } else { u.choose_index(n).unwrap_or(0) }
}

/// True about one time in `n`.
pub fn one_in(u: &mut Unstructured<'_>, n: usize) -> bool {
    below(u, n) == 0
}

/// One of `choices` (the first when out of data).
pub fn pick<'a>(u: &mut Unstructured<'_>, choices: &[&'a str]) -> &'a str {
    choices.get(below(u, choices.len())).copied().unwrap_or("")
}

/// A string: mostly tokens of `dict` joined, sometimes arbitrary text, sometimes a
/// token repeated to a length near `near` (a budget's edge).
pub fn string(u: &mut Unstructured<'_>, dict: &[&str], near: usize) -> String {
    match below(u, 8) {
        0 => String::arbitrary(u).unwrap_or_default(),
        1 if near > 0 => {
            let piece = pick(u, dict);
            let piece = if piece.is_empty() { "x" } else { piece };
            let target = near.saturating_sub(8) + below(u, 16);
            let mut s = String::with_capacity(target + piece.len());
            while s.len() < target {
                s.push_str(piece);
            }
            s
        }
        _ => {
            let n = 1 + below(u, 3);
            (0..n).map(|_| pick(u, dict)).collect()
        }
    }
}
