//! Layer compression: detecting it from a blob's first bytes or its media type, and the
//! streaming decoders and encoders for gzip and zstd.

use std::io::{self, BufRead, Read, Write};

use crate::error::{Error, Result};

/// The OCI media type of an uncompressed layer.
pub const MEDIA_TYPE_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
/// The OCI media type of a gzip layer.
pub const MEDIA_TYPE_TAR_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// The OCI media type of a zstd layer.
pub const MEDIA_TYPE_TAR_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
/// Docker's media type of a gzip layer (`docker save`, schema 2 manifests).
pub const MEDIA_TYPE_DOCKER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
/// Docker's media type of an uncompressed layer.
pub const MEDIA_TYPE_DOCKER_TAR: &str = "application/vnd.docker.image.rootfs.diff.tar";

/// How a layer's tar stream is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Compression {
    /// A plain tar stream.
    #[default]
    None,
    /// gzip (RFC 1952), possibly several members back to back.
    Gzip,
    /// zstd frames.
    Zstd,
}

const GZIP_MAGIC: &[u8] = &[0x1f, 0x8b];
const ZSTD_MAGIC: &[u8] = &[0x28, 0xb5, 0x2f, 0xfd];

impl Compression {
    /// What a stream starting with `head` is compressed with; `None` unless it starts
    /// with gzip's or zstd's magic number.
    pub fn detect(head: &[u8]) -> Compression {
        if head.starts_with(GZIP_MAGIC) {
            Compression::Gzip
        } else if head.starts_with(ZSTD_MAGIC) {
            Compression::Zstd
        } else {
            Compression::None
        }
    }

    /// The compression a layer media type names (OCI's and Docker's); other media types
    /// are not layers wasnap can apply.
    pub fn from_media_type(media_type: &str) -> Result<Compression> {
        // Non-distributable layers (`...nondistributable.v1.tar...`) are layers too.
        let mt = media_type.replace(".nondistributable", "");
        Ok(match mt.as_str() {
            MEDIA_TYPE_TAR | MEDIA_TYPE_DOCKER_TAR => Compression::None,
            MEDIA_TYPE_TAR_GZIP | MEDIA_TYPE_DOCKER_GZIP => Compression::Gzip,
            MEDIA_TYPE_TAR_ZSTD => Compression::Zstd,
            "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => Compression::Gzip,
            _ => {
                return Err(Error::invalid_argument(format!(
                    "media type {media_type:?} is not a layer (tar, tar+gzip or tar+zstd)"
                )));
            }
        })
    }

    /// Parses `none`, `gzip` or `zstd` (as a command line names it).
    pub fn parse(name: &str) -> Result<Compression> {
        match name {
            "none" | "uncompressed" | "tar" => Ok(Compression::None),
            "gzip" | "gz" => Ok(Compression::Gzip),
            "zstd" | "zst" => Ok(Compression::Zstd),
            _ => Err(Error::invalid_argument(format!(
                "compression {name:?}: expected none, gzip or zstd"
            ))),
        }
    }

    /// The name [`Compression::parse`] reads.
    pub fn as_str(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
        }
    }

    /// The OCI media type of a layer compressed this way.
    pub fn media_type(self) -> &'static str {
        match self {
            Compression::None => MEDIA_TYPE_TAR,
            Compression::Gzip => MEDIA_TYPE_TAR_GZIP,
            Compression::Zstd => MEDIA_TYPE_TAR_ZSTD,
        }
    }

    /// A reader of the uncompressed stream inside `r`.
    pub fn decoder<'a, R: BufRead + Send + 'a>(self, r: R) -> Result<Box<dyn Read + Send + 'a>> {
        Ok(match self {
            Compression::None => Box::new(r),
            Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(r)),
            Compression::Zstd => Box::new(
                zstd::stream::read::Decoder::with_buffer(r)
                    .map_err(|e| Error::internal("start a zstd decoder").caused_by(e))?,
            ),
        })
    }

    /// Detects the compression from `r`'s first bytes (without consuming them) and
    /// returns it with a reader of the uncompressed stream.
    pub fn detect_decoder<'a, R: BufRead + Send + 'a>(
        mut r: R,
    ) -> Result<(Compression, Box<dyn Read + Send + 'a>)> {
        let head = read_head(&mut r, ZSTD_MAGIC.len())
            .map_err(|e| Error::internal("read the layer's first bytes").caused_by(e))?;
        let c = Compression::detect(&head);
        Ok((c, c.decoder(io::Cursor::new(head).chain(r))?))
    }

    /// A writer that compresses into `w`; [`Encoder::finish`] ends the stream.
    pub fn encoder<W: Write>(self, w: W) -> Result<Encoder<W>> {
        Ok(match self {
            Compression::None => Encoder::None(w),
            Compression::Gzip => {
                Encoder::Gzip(flate2::write::GzEncoder::new(w, flate2::Compression::fast()))
            }
            Compression::Zstd => Encoder::Zstd(
                zstd::stream::write::Encoder::new(w, 3)
                    .map_err(|e| Error::internal("start a zstd encoder").caused_by(e))?,
            ),
        })
    }
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Reads the first `n` bytes of `r` (fewer only at its end). Reads until it has them: one
/// read may give a single byte (an upload's first message, a pipe), and one fill of a
/// `BufRead` is one read.
fn read_head<R: Read>(r: &mut R, n: usize) -> io::Result<Vec<u8>> {
    let mut head = Vec::with_capacity(n);
    r.take(n as u64).read_to_end(&mut head)?;
    Ok(head)
}

/// A compressing writer (see [`Compression::encoder`]).
pub enum Encoder<W: Write> {
    /// Passes bytes through.
    None(W),
    /// gzip at the fast level: layers are written once and read many times, but diffs
    /// sit on the build's critical path, as in containerd's default.
    Gzip(flate2::write::GzEncoder<W>),
    /// zstd at level 3, zstd's default.
    Zstd(zstd::stream::write::Encoder<'static, W>),
}

impl<W: Write> std::fmt::Debug for Encoder<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Encoder::None(_) => "Encoder::None",
            Encoder::Gzip(_) => "Encoder::Gzip",
            Encoder::Zstd(_) => "Encoder::Zstd",
        })
    }
}

impl<W: Write> Encoder<W> {
    /// Ends the compressed stream and returns the inner writer.
    pub fn finish(self) -> io::Result<W> {
        match self {
            Encoder::None(w) => Ok(w),
            Encoder::Gzip(e) => e.finish(),
            Encoder::Zstd(e) => e.finish(),
        }
    }
}

impl<W: Write> Write for Encoder<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Encoder::None(w) => w.write(buf),
            Encoder::Gzip(e) => e.write(buf),
            Encoder::Zstd(e) => e.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Encoder::None(w) => w.flush(),
            Encoder::Gzip(e) => e.flush(),
            Encoder::Zstd(e) => e.flush(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_compression_round_trips_and_is_detected() {
        let data: Vec<u8> = (0..200_000u32).flat_map(|i| (i % 251).to_le_bytes()).collect();
        for c in [Compression::None, Compression::Gzip, Compression::Zstd] {
            let mut enc = c.encoder(Vec::new()).expect("encoder");
            enc.write_all(&data).expect("write");
            let packed = enc.finish().expect("finish");
            let (found, mut dec) =
                Compression::detect_decoder(io::BufReader::new(packed.as_slice())).expect("dec");
            assert_eq!(found, c);
            let mut out = Vec::new();
            dec.read_to_end(&mut out).expect("read");
            assert!(out == data, "{c} round trip");
            assert_eq!(Compression::from_media_type(c.media_type()).expect("mt"), c);
            assert_eq!(Compression::parse(c.as_str()).expect("parse"), c);
        }
    }

    /// A source that gives one byte a read, as an upload whose first messages are tiny.
    struct Dribble<'a>(&'a [u8]);

    impl Read for Dribble<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.0.len().min(buf.len()).min(1);
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    #[test]
    fn detection_reads_the_magic_whole_from_a_source_that_gives_a_byte_a_read() {
        for c in [Compression::None, Compression::Gzip, Compression::Zstd] {
            let mut enc = c.encoder(Vec::new()).expect("encoder");
            enc.write_all(b"the layer's bytes").expect("write");
            let packed = enc.finish().expect("finish");
            let (found, mut dec) =
                Compression::detect_decoder(io::BufReader::new(Dribble(&packed))).expect("dec");
            assert_eq!(found, c);
            let mut out = Vec::new();
            dec.read_to_end(&mut out).expect("read");
            assert_eq!(out, b"the layer's bytes", "{c}");
        }
        // Shorter than a magic number: what there is, undecoded.
        let (found, mut dec) =
            Compression::detect_decoder(io::BufReader::new(Dribble(b"\x1f"))).expect("dec");
        assert_eq!(found, Compression::None);
        let mut out = Vec::new();
        dec.read_to_end(&mut out).expect("read");
        assert_eq!(out, b"\x1f");
    }

    #[test]
    fn unknown_media_types_and_names_are_refused() {
        for mt in ["application/json", "application/vnd.oci.image.layer.v1.tar+bzip2"] {
            let err = Compression::from_media_type(mt).expect_err(mt);
            assert_eq!(err.kind(), crate::ErrorKind::InvalidArgument);
        }
        assert_eq!(
            Compression::from_media_type(MEDIA_TYPE_DOCKER_GZIP).expect("docker"),
            Compression::Gzip
        );
        assert!(Compression::parse("lz4").is_err());
    }

    #[test]
    fn a_corrupt_gzip_stream_is_an_error_not_a_short_read() {
        let mut enc = Compression::Gzip.encoder(Vec::new()).expect("encoder");
        enc.write_all(&[7u8; 10_000]).expect("write");
        let mut packed = enc.finish().expect("finish");
        let mid = packed.len() / 2;
        packed[mid] ^= 0xff;
        let mut dec = Compression::Gzip.decoder(packed.as_slice()).expect("dec");
        let mut out = Vec::new();
        assert!(dec.read_to_end(&mut out).is_err());
    }
}
