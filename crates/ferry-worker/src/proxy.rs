//! The worker side of the PROXY protocol: a thin wrapper around the
//! `proxy-header` crate that enforces Ferry's rules. A header (v2, or v1
//! for compatibility) is read only from peers inside `trusted_proxies`,
//! within [`HEADER_TIMEOUT`] and [`MAX_HEADER`] octets; a partial,
//! malformed, oversized or CRC32C-mismatched header ends the connection.
//! LOCAL (the balancer's own probes) means "no client address": the peer
//! itself is the client.

use std::net::SocketAddr;
use std::time::Duration;

use proxy_header::{ParseConfig, ProxyHeader};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// How long a trusted proxy has to send its whole header.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest header accepted (addresses and TLVs); a v1 line is at most
/// 107 octets by its specification.
pub const MAX_HEADER: usize = 1024;
const MAX_V1: usize = 107;
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
const TLV_CRC32C: u8 = 0x03;

/// What a trusted proxy said about the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proxied {
    /// The original client; `None` for LOCAL (a health probe).
    pub source: Option<SocketAddr>,
    /// The address the client connected to (the balancer's listener);
    /// `None` for LOCAL.
    pub destination: Option<SocketAddr>,
    /// The proxy's session id (UNIQUE_ID TLV), for log correlation.
    pub session_id: Option<String>,
    /// Octets that followed the header in the same reads: the start of the
    /// SMTP conversation.
    pub early: Vec<u8>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProxyError {
    #[error("no complete PROXY header within {0:?}")]
    Timeout(Duration),
    #[error("connection closed after {0} octets of a PROXY header")]
    Truncated(usize),
    #[error("malformed PROXY header: {0}")]
    Malformed(String),
    #[error("PROXY header longer than {MAX_HEADER} octets")]
    TooBig,
    #[error("PROXY header CRC32C mismatch")]
    BadChecksum,
    #[error("reading the PROXY header failed: {0}")]
    Io(String),
}

/// Reads the PROXY header a trusted proxy sends first.
pub async fn read_header(stream: &mut TcpStream) -> Result<Proxied, ProxyError> {
    tokio::time::timeout(HEADER_TIMEOUT, read(stream))
        .await
        .map_err(|_| ProxyError::Timeout(HEADER_TIMEOUT))?
}

async fn read(stream: &mut TcpStream) -> Result<Proxied, ProxyError> {
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 512];
    loop {
        if let Some(parsed) = parse(&buf)? {
            return Ok(parsed);
        }
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|e| ProxyError::Io(e.to_string()))?;
        if n == 0 {
            return Err(ProxyError::Truncated(buf.len()));
        }
        buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
    }
}

/// Parses a header from the octets read so far: `Ok(None)` while more are
/// needed.
pub fn parse(buf: &[u8]) -> Result<Option<Proxied>, ProxyError> {
    let config = ParseConfig {
        include_tlvs: true,
        allow_v1: true,
        allow_v2: true,
    };
    // Refuse early what cannot become a header within the cap.
    let is_v2 = buf.first() == Some(&b'\r');
    if is_v2 {
        let seen = buf.len().min(V2_SIGNATURE.len());
        if buf.get(..seen) != V2_SIGNATURE.get(..seen) {
            return Err(ProxyError::Malformed("not a PROXY v2 signature".into()));
        }
        if let Some(len) = be16(buf, 14) {
            let total = 16 + len;
            if total > MAX_HEADER {
                return Err(ProxyError::TooBig);
            }
        }
    } else if !buf.is_empty() {
        let seen = buf.len().min(6);
        if buf.get(..seen) != b"PROXY ".get(..seen) {
            return Err(ProxyError::Malformed("no PROXY header".into()));
        }
        if buf.len() > MAX_V1 && !buf.get(..MAX_V1).unwrap_or_default().contains(&b'\n') {
            return Err(ProxyError::Malformed(
                "v1 line longer than 107 octets".into(),
            ));
        }
    }
    match ProxyHeader::parse(buf, config) {
        Ok((header, used)) => {
            let raw = buf.get(..used).unwrap_or_default();
            if is_v2 {
                check_crc(raw, header.crc32c())?;
            }
            let session_id = header.unique_id().map(|id| {
                if id.iter().all(|b| b.is_ascii_graphic()) {
                    String::from_utf8_lossy(id).into_owned()
                } else {
                    id.iter().map(|b| format!("{b:02x}")).collect()
                }
            });
            Ok(Some(Proxied {
                source: header.proxied_address().map(|a| a.source),
                destination: header.proxied_address().map(|a| a.destination),
                session_id,
                early: buf.get(used..).unwrap_or_default().to_vec(),
            }))
        }
        Err(proxy_header::Error::BufferTooShort) => {
            if buf.len() >= MAX_HEADER {
                Err(ProxyError::TooBig)
            } else {
                Ok(None)
            }
        }
        Err(e) => Err(ProxyError::Malformed(e.to_string())),
    }
}

/// The big-endian 16-bit number at `at`, if the buffer holds it.
fn be16(buf: &[u8], at: usize) -> Option<usize> {
    let bytes: [u8; 2] = buf.get(at..at + 2)?.try_into().ok()?;
    Some(usize::from(u16::from_be_bytes(bytes)))
}

/// Checks a v2 header's CRC32C TLV, when it has one: the checksum of the
/// whole header with the TLV's value zeroed.
fn check_crc(raw: &[u8], expected: Option<u32>) -> Result<(), ProxyError> {
    let Some(expected) = expected else {
        return Ok(());
    };
    let addresses = match raw.get(13) {
        Some(0x11 | 0x12) => 12,
        Some(0x21 | 0x22) => 36,
        Some(0x31 | 0x32) => 216,
        _ => 0,
    };
    let mut copy = raw.to_vec();
    let mut at = 16 + addresses;
    while let (Some(&kind), Some(len)) = (copy.get(at), be16(&copy, at + 1)) {
        if kind == TLV_CRC32C {
            if let Some(value) = copy.get_mut(at + 3..at + 3 + len) {
                value.fill(0);
            }
        }
        at += 3 + len;
    }
    if crc32c::crc32c(&copy) == expected {
        Ok(())
    } else {
        Err(ProxyError::BadChecksum)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;
    use proxy_header::{ProxiedAddress, Tlv};

    fn v2(tlvs: Vec<Tlv<'_>>) -> Vec<u8> {
        let addr = ProxiedAddress::stream(
            "192.0.2.7:40000".parse().unwrap(),
            "198.51.100.1:25".parse().unwrap(),
        );
        let mut out = Vec::new();
        ProxyHeader::with_tlvs(Some(addr), tlvs)
            .encode_v2(&mut out)
            .unwrap();
        out
    }

    /// Encodes with a correct CRC32C TLV (the encoder leaves it to us).
    fn with_crc() -> Vec<u8> {
        let mut raw = v2(vec![Tlv::Crc32c(0), Tlv::UniqueId(b"S1".as_slice().into())]);
        let crc = crc32c::crc32c(&raw);
        let at = 16 + 12 + 3;
        raw[at..at + 4].copy_from_slice(&crc.to_be_bytes());
        raw
    }

    #[test]
    fn v2_with_session_id_and_early_bytes() {
        let mut raw = with_crc();
        raw.extend_from_slice(b"EHLO x\r\n");
        let p = parse(&raw).unwrap().unwrap();
        assert_eq!(p.source, Some("192.0.2.7:40000".parse().unwrap()));
        assert_eq!(p.session_id.as_deref(), Some("S1"));
        assert_eq!(p.early, b"EHLO x\r\n");
    }

    #[test]
    fn every_prefix_asks_for_more() {
        let raw = with_crc();
        for cut in 0..raw.len() {
            assert_eq!(parse(&raw[..cut]), Ok(None), "cut at {cut}");
        }
    }

    #[test]
    fn crc_mismatch_is_refused() {
        let mut raw = with_crc();
        raw[20] ^= 1; // the client address
        assert_eq!(parse(&raw), Err(ProxyError::BadChecksum));
    }

    #[test]
    fn local_v1_and_garbage() {
        let mut local = Vec::new();
        ProxyHeader::with_local().encode_v2(&mut local).unwrap();
        assert_eq!(parse(&local).unwrap().unwrap().source, None);
        let v1 = b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 25\r\n";
        assert_eq!(
            parse(v1).unwrap().unwrap().source,
            Some("192.0.2.7:40000".parse().unwrap())
        );
        assert!(matches!(
            parse(b"EHLO client\r\n"),
            Err(ProxyError::Malformed(_))
        ));
        assert!(matches!(
            parse(b"\r\n\r\nGARBAGE"),
            Err(ProxyError::Malformed(_))
        ));
        let mut long_v1 = b"PROXY TCP4 ".to_vec();
        long_v1.resize(200, b'1');
        assert!(matches!(parse(&long_v1), Err(ProxyError::Malformed(_))));
        let mut big = V2_SIGNATURE.to_vec();
        big.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        assert_eq!(parse(&big), Err(ProxyError::TooBig));
    }
}
