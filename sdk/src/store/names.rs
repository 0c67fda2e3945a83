//! File names for keys: keys are opaque strings with `/` in them, file names are not.
//!
//! A key is kept as it is where it is made of safe bytes and escaped as `%XX` elsewhere, so
//! the name decodes back to the key without reading the file. A key whose escaped form
//! would pass file-name limits is named `~` and the SHA-256 of the key instead; the record
//! inside holds the key, and a lookup checks it.

use sha2::{Digest, Sha256};

/// Longest escaped name used as is: below NAME_MAX (255) with room to spare.
const MAX_NAME: usize = 200;

fn kept(b: u8, first: bool) -> bool {
    // `.` may not come first (`.` and `..` are not free names); `%` and `~` are this
    // encoding's own markers and so always escaped.
    b.is_ascii_alphanumeric()
        || matches!(b, b'-' | b'_' | b':' | b'@' | b'+' | b'=' | b',')
        || (b == b'.' && !first)
}

/// The file name for `key`.
pub(crate) fn encode(key: &str) -> String {
    let mut out = String::with_capacity(key.len() + 8);
    for (i, b) in key.bytes().enumerate() {
        if kept(b, i == 0) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    if out.len() > MAX_NAME {
        let digest = Sha256::digest(key.as_bytes());
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        return format!("~{hex}");
    }
    out
}

/// Whether `name` is a hashed name, whose key only the file knows.
pub(crate) fn is_hashed(name: &str) -> bool {
    name.starts_with('~')
}

/// The key `name` was made from; `None` for hashed names and for names this encoding
/// never makes (strays in the directory).
pub(crate) fn decode(name: &str) -> Option<String> {
    if name.is_empty() || is_hashed(name) {
        return None;
    }
    let bytes = name.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let hex = name.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else if kept(b, i == 0) {
            out.push(b);
            i += 1;
        } else {
            return None;
        }
    }
    let key = String::from_utf8(out).ok()?;
    // Only the canonical spelling counts, so one key never has two files.
    (encode(&key) == name).then_some(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip() {
        for key in [
            "default/12/extract-1234 sha256:abc",
            "/snapshot-suite/work/committed-1",
            ".",
            "..",
            ".hidden/x",
            "a%b~c",
            "naïve/ключ",
            "tab\tnew\nline",
        ] {
            let name = encode(key);
            assert!(!name.contains('/'), "{name}");
            assert!(name != "." && name != "..");
            assert_eq!(decode(&name).as_deref(), Some(key), "{name}");
        }
    }

    #[test]
    fn long_keys_are_hashed_and_names_stay_short() {
        let key = "k/".repeat(200);
        let name = encode(&key);
        assert!(is_hashed(&name) && name.len() < 100, "{name}");
        assert_eq!(decode(&name), None);
        assert_ne!(encode(&"k/".repeat(201)), name);
        // Just under the limit is kept readable.
        assert!(!is_hashed(&encode(&"a".repeat(MAX_NAME))));
    }

    #[test]
    fn strays_do_not_decode() {
        for stray in ["", "%", "%4", "%zz", "a/b", "x y", "%61"] {
            assert_eq!(decode(stray), None, "{stray:?}");
        }
    }
}
