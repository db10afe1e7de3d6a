//! A DNS stand-in for Envoy only: answers A queries from a table over UDP on 127.0.0.1, NXDOMAIN
//! for names it does not know and an empty answer for other record types. No /etc/hosts edits,
//! no resolver changes for the rest of the machine. Counts the queries per name.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use anyhow::Result;
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

pub struct Dns {
    pub addr: SocketAddr,
    records: Arc<Mutex<HashMap<String, Ipv4Addr>>>,
    queries: Arc<Mutex<HashMap<String, usize>>>,
    task: JoinHandle<()>,
}

impl Dns {
    pub async fn start(port: u16, records: &[(&str, Ipv4Addr)]) -> Result<Dns> {
        let socket = UdpSocket::bind(("127.0.0.1", port)).await?;
        let addr = socket.local_addr()?;
        let records =
            Arc::new(Mutex::new(records.iter().map(|(n, a)| (n.to_ascii_lowercase(), *a)).collect::<HashMap<_, _>>()));
        let queries = Arc::new(Mutex::new(HashMap::new()));
        let (r, q) = (records.clone(), queries.clone());
        let task = tokio::spawn(async move {
            let mut buf = [0u8; 512];
            loop {
                let Ok((n, peer)) = socket.recv_from(&mut buf).await else { continue };
                if let Some(reply) = answer(buf.get(..n).unwrap_or_default(), &r, &q) {
                    let _ = socket.send_to(&reply, peer).await;
                }
            }
        });
        Ok(Dns { addr, records, queries, task })
    }

    pub fn set(&self, name: &str, addr: Ipv4Addr) {
        if let Ok(mut r) = self.records.lock() {
            r.insert(name.to_ascii_lowercase(), addr);
        }
    }

    /// How many queries (of any type) were made for `name`.
    pub fn queries(&self, name: &str) -> usize {
        self.queries.lock().ok().and_then(|q| q.get(&name.to_ascii_lowercase()).copied()).unwrap_or(0)
    }
}

impl Drop for Dns {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn answer(
    query: &[u8],
    records: &Mutex<HashMap<String, Ipv4Addr>>,
    queries: &Mutex<HashMap<String, usize>>,
) -> Option<Vec<u8>> {
    // Header (12 bytes), then one question: labels, 0, QTYPE, QCLASS.
    let mut i = 12;
    let mut labels = Vec::new();
    loop {
        let len = *query.get(i)? as usize;
        i += 1;
        if len == 0 {
            break;
        }
        labels.push(String::from_utf8_lossy(query.get(i..i + len)?).to_ascii_lowercase());
        i += len;
    }
    let qtype = u16::from_be_bytes([*query.get(i)?, *query.get(i + 1)?]);
    let question_end = i + 4;
    let name = labels.join(".");
    if let Ok(mut q) = queries.lock() {
        *q.entry(name.clone()).or_default() += 1;
    }
    let addr = records.lock().ok()?.get(&name).copied();
    let mut reply = Vec::with_capacity(question_end + 16);
    reply.extend_from_slice(query.get(..2)?); // id
    let rcode = if addr.is_none() { 3 } else { 0 }; // NXDOMAIN / NOERROR
    let answers: u16 = if addr.is_some() && qtype == 1 { 1 } else { 0 };
    reply.extend_from_slice(&[0x81, 0x80 | rcode, 0, 1]);
    reply.extend_from_slice(&answers.to_be_bytes());
    reply.extend_from_slice(&[0, 0, 0, 0]);
    reply.extend_from_slice(query.get(12..question_end)?);
    if let (Some(addr), 1) = (addr, answers) {
        // Name (pointer to the question), A, IN, TTL 5 s, 4 bytes of address.
        reply.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 5, 0, 4]);
        reply.extend_from_slice(&addr.octets());
    }
    Some(reply)
}
