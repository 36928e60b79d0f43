//! Handing a client to a worker: connect, send the PROXY v2 header (the
//! client's addresses and a UNIQUE_ID TLV with the balancer's session id),
//! and wait for a `220` greeting. Anything else and the worker is skipped.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ferry_smtp::client::ReplyReader;
use proxy_header::{ProxiedAddress, ProxyHeader, Tlv};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};

/// Why a worker was skipped; `reason` is the metric label.
#[derive(Debug, thiserror::Error)]
#[error("{detail}")]
pub struct HandoffError {
    pub reason: &'static str,
    pub detail: String,
}

fn skip(reason: &'static str, detail: impl Into<String>) -> HandoffError {
    HandoffError {
        reason,
        detail: detail.into(),
    }
}

/// The PROXY v2 header for a client: its address, the address it reached
/// the balancer on, and the session id.
pub fn proxy_header(client: SocketAddr, local: SocketAddr, session_id: &str) -> Vec<u8> {
    // Both addresses of one family, as the protocol wants.
    let (client, local) = match (client, local) {
        (SocketAddr::V4(_), SocketAddr::V6(l)) => match l.ip().to_ipv4_mapped() {
            Some(ip) => (client, SocketAddr::new(ip.into(), l.port())),
            None => (client, SocketAddr::new([0, 0, 0, 0].into(), l.port())),
        },
        (SocketAddr::V6(c), SocketAddr::V4(l)) => (
            SocketAddr::V6(c),
            SocketAddr::new(l.ip().to_ipv6_mapped().into(), l.port()),
        ),
        other => other,
    };
    let header = ProxyHeader::with_tlvs(
        Some(ProxiedAddress::stream(client, local)),
        [Tlv::UniqueId(session_id.as_bytes().into())],
    );
    let mut out = Vec::with_capacity(64);
    // Same-family addresses and a short TLV: encoding cannot fail.
    let _ = header.encode_v2(&mut out);
    out
}

/// Connects to `worker` from `source` (any port), or from the address the
/// system picks when `source` is `None`. Workers trust PROXY headers by
/// the peer address, so the balancer's own address is part of the setup
/// (`[balancer] source`).
///
/// # Errors
/// Binding `source` (not a local address, another family than `worker`)
/// or connecting failed.
pub async fn connect(worker: SocketAddr, source: Option<IpAddr>) -> std::io::Result<TcpStream> {
    let Some(source) = source else {
        return TcpStream::connect(worker).await;
    };
    let socket = if worker.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.bind(SocketAddr::new(source, 0)).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot bind source address {source}: {e}"),
        )
    })?;
    socket.connect(worker).await
}

/// Connects to `worker` (from `source`, see [`connect`]), sends `header`
/// (if any) and returns the stream with the worker's `220` greeting, as
/// received; all within `limit`.
pub async fn handoff(
    worker: SocketAddr,
    source: Option<IpAddr>,
    header: Option<&[u8]>,
    limit: Duration,
) -> Result<(TcpStream, Vec<u8>), HandoffError> {
    let attempt = async {
        let mut stream = connect(worker, source)
            .await
            .map_err(|e| skip("connect", e.to_string()))?;
        let _ = stream.set_nodelay(true);
        if let Some(h) = header {
            stream
                .write_all(h)
                .await
                .map_err(|e| skip("connect", e.to_string()))?;
        }
        let mut reader = ReplyReader::new();
        let reply = ferry_client::read_reply(&mut stream, &mut reader)
            .await
            .map_err(|e| skip("greeting", e.to_string()))?;
        if reply.code() == 220 {
            // The greeting as it came, and anything the worker sent after.
            let mut raw = reader.last_wire().to_vec();
            raw.extend_from_slice(reader.buffered());
            Ok((stream, raw))
        } else {
            Err(skip("greeting", format!("greeted with {}", reply.code())))
        }
    };
    match tokio::time::timeout(limit, attempt).await {
        Ok(result) => result,
        Err(_) => Err(skip("timeout", format!("no greeting within {limit:?}"))),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn parsed(raw: &[u8]) -> (SocketAddr, SocketAddr, Vec<u8>) {
        let (h, _) = ProxyHeader::parse(raw, proxy_header::ParseConfig::default()).unwrap();
        let a = h.proxied_address().unwrap();
        (a.source, a.destination, h.unique_id().unwrap().to_vec())
    }

    #[test]
    fn headers_carry_both_addresses_in_one_family() {
        let v4: SocketAddr = "192.0.2.7:40000".parse().unwrap();
        let v6: SocketAddr = "[2001:db8::7]:40000".parse().unwrap();
        let local4: SocketAddr = "198.51.100.1:25".parse().unwrap();
        let local6: SocketAddr = "[2001:db8::1]:25".parse().unwrap();
        assert_eq!(
            parsed(&proxy_header(v4, local4, "S1")),
            (v4, local4, b"S1".to_vec())
        );
        assert_eq!(parsed(&proxy_header(v6, local6, "S2")).0, v6);
        // A v6 client on a v4 listener (and the reverse) keeps its address.
        assert_eq!(parsed(&proxy_header(v6, local4, "S3")).0, v6);
        let mapped_local: SocketAddr = "[::ffff:198.51.100.1]:25".parse().unwrap();
        assert_eq!(parsed(&proxy_header(v4, mapped_local, "S4")).0, v4);
    }
}
