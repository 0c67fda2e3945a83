//! Content digests: `sha256:<64 lowercase hex>`, the only algorithm OCI images use in
//! practice and the only one wasnap accepts.

use std::fmt;
use std::io::{self, Read, Write};
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest as _, Sha256};

use crate::error::{Error, Result};

/// A sha256 content digest.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest([u8; 32]);

impl Digest {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Digest(Sha256::digest(bytes).into())
    }

    /// Parses `sha256:<64 lowercase hex digits>`; anything else is an invalid argument.
    pub fn parse(s: &str) -> Result<Self> {
        let bad = |why: &str| Error::invalid_argument(format!("digest {s:?}: {why}"));
        let Some(hex) = s.strip_prefix("sha256:") else {
            return Err(match s.split_once(':') {
                Some((alg, _)) => bad(&format!("algorithm {alg:?} is not supported (sha256 only)")),
                None => bad("not of the form sha256:<hex>"),
            });
        };
        Self::from_hex(hex).ok_or_else(|| bad("expected 64 lowercase hex digits after sha256:"))
    }

    /// From 64 lowercase hex digits.
    pub fn from_hex(hex: &str) -> Option<Self> {
        let bytes = hex.as_bytes();
        if bytes.len() != 64 {
            return None;
        }
        let nibble = |b: u8| match b {
            b'0'..=b'9' => Some(b - b'0'),
            b'a'..=b'f' => Some(b - b'a' + 10),
            _ => None,
        };
        let mut out = [0u8; 32];
        for (i, pair) in bytes.chunks_exact(2).enumerate() {
            out[i] = nibble(pair[0])? << 4 | nibble(pair[1])?;
        }
        Some(Digest(out))
    }

    /// The 64 hex digits, without the algorithm.
    pub fn hex(&self) -> String {
        use std::fmt::Write as _;
        self.0.iter().fold(String::with_capacity(64), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
    }

    /// The raw 32 bytes.
    pub fn bytes(&self) -> &[u8; 32] {
        &self.0
    }

    fn from_hasher(h: Sha256) -> Self {
        Digest(h.finalize().into())
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Digest {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Digest::parse(s)
    }
}

impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Digest::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// A sha256 over a stream, with its byte count.
#[derive(Clone, Default)]
pub struct Hasher {
    sha: Sha256,
    count: u64,
}

impl fmt::Debug for Hasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hasher").field("count", &self.count).finish_non_exhaustive()
    }
}

impl Hasher {
    /// Adds `bytes`.
    pub fn update(&mut self, bytes: &[u8]) {
        self.sha.update(bytes);
        self.count += bytes.len() as u64;
    }

    /// How many bytes were added.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The digest of what was added.
    pub fn finish(self) -> Digest {
        Digest::from_hasher(self.sha)
    }
}

/// A reader or writer that hashes what passes through it.
#[derive(Debug)]
pub struct Hashing<T> {
    inner: T,
    hasher: Hasher,
}

impl<T> Hashing<T> {
    /// Hashes what passes through `inner`.
    pub fn new(inner: T) -> Self {
        Hashing { inner, hasher: Hasher::default() }
    }

    /// Bytes so far.
    pub fn count(&self) -> u64 {
        self.hasher.count()
    }

    /// The inner reader or writer.
    pub fn get_mut(&mut self) -> &mut T {
        &mut self.inner
    }

    /// The inner reader or writer, the digest and the count of what passed.
    pub fn finish(self) -> (T, Digest, u64) {
        let count = self.hasher.count();
        (self.inner, self.hasher.finish(), count)
    }
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_print_round_trip() {
        let d = Digest::of(b"");
        let s = d.to_string();
        assert_eq!(s, "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
        assert_eq!(Digest::parse(&s).expect("parse"), d);
        let json = serde_json::to_string(&d).expect("json");
        assert_eq!(serde_json::from_str::<Digest>(&json).expect("back"), d);
    }

    #[test]
    fn malformed_digests_are_invalid_arguments() {
        let hex = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        for bad in [
            String::new(),
            hex.to_owned(),
            format!("sha512:{hex}"),
            format!("sha256:{}", hex.to_uppercase()),
            format!("sha256:{}", &hex[1..]),
            format!("sha256:{hex}0"),
            "sha256:../../etc/passwd".to_owned(),
        ] {
            let err = Digest::parse(&bad).expect_err(&bad);
            assert_eq!(err.kind(), crate::ErrorKind::InvalidArgument, "{bad}");
        }
    }

    #[test]
    fn hashing_counts_and_digests_what_passes() {
        let mut w = Hashing::new(Vec::new());
        w.write_all(b"hello ").expect("write");
        w.write_all(b"world").expect("write");
        let (buf, d, n) = w.finish();
        assert_eq!((buf.as_slice(), n), (&b"hello world"[..], 11));
        assert_eq!(d, Digest::of(b"hello world"));
    }
}
