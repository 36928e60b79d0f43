//! A small authoritative DNS server on loopback (UDP) for MX routing
//! tests: it answers from a fixed table, NXDOMAIN for names it does not
//! know, and SERVFAIL for names marked broken.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, MX};
use hickory_proto::rr::{Name, RData, Record};
use tokio::net::UdpSocket;

/// One record of the test zone.
pub enum Entry {
    Mx(&'static str, u16, &'static str),
    Ip(&'static str, IpAddr),
    /// The name exists but every query for it fails with SERVFAIL.
    ServFail(&'static str),
}

pub struct TestDns {
    pub addr: SocketAddr,
}

fn name(s: &str) -> Name {
    Name::from_ascii(format!("{}.", s.trim_end_matches('.'))).unwrap()
}

impl TestDns {
    pub async fn start(zone: Vec<Entry>) -> TestDns {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let zone = Arc::new(zone);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            while let Ok((n, peer)) = socket.recv_from(&mut buf).await {
                let Some(reply) = buf.get(..n).and_then(|q| answer(&zone, q)) else {
                    continue;
                };
                let _ = socket.send_to(&reply, peer).await;
            }
        });
        TestDns { addr }
    }
}

fn answer(zone: &[Entry], query: &[u8]) -> Option<Vec<u8>> {
    let request = Message::from_vec(query).ok()?;
    let q = request.queries.first()?.clone();
    let mut reply = Message::new(request.metadata.id, MessageType::Response, OpCode::Query);
    reply.metadata.authoritative = true;
    reply.metadata.recursion_desired = request.metadata.recursion_desired;
    reply.add_query(q.clone());
    let asked = q.name().to_ascii().to_ascii_lowercase();
    let mut known = false;
    for entry in zone {
        let (owner, data) = match entry {
            Entry::Mx(owner, preference, exchange) => {
                (owner, Some(RData::MX(MX::new(*preference, name(exchange)))))
            }
            Entry::Ip(owner, IpAddr::V4(ip)) => (owner, Some(RData::A(A(*ip)))),
            Entry::Ip(owner, IpAddr::V6(ip)) => (owner, Some(RData::AAAA(AAAA(*ip)))),
            Entry::ServFail(owner) => (owner, None),
        };
        if name(owner).to_ascii().to_ascii_lowercase() != asked {
            continue;
        }
        known = true;
        match data {
            None => {
                reply.metadata.response_code = ResponseCode::ServFail;
                return reply.to_vec().ok();
            }
            Some(data) if data.record_type() == q.query_type() => {
                reply.add_answer(Record::from_rdata(name(owner), 60, data));
            }
            Some(_) => {}
        }
    }
    if !known {
        reply.metadata.response_code = ResponseCode::NXDomain;
    }
    reply.to_vec().ok()
}
