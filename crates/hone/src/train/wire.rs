//! Data parallelism across processes: peer 0 is the hub, every other peer holds one TCP
//! connection to it. Each step every peer sends its gradients, the hub sums them in rank order
//! and sends the sum back. A connection that closes names its peer at once (a killed process's
//! socket closes with it); one that goes quiet names it after the timeout.
//!
//! Why not burn-collective's global (multi-node) all-reduce: in 0.21.0 (and burn's main branch
//! as of this writing) its barrier after each all-reduce (`SyncService::sync`) clears a copy of
//! the list of nodes that have synced, not the list, so a second all-reduce between nodes never
//! returns. Within one process hone still sums with burn-collective.

use super::data_parallel::Start;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

const MAGIC: &[u8; 8] = b"honedp01";
const DATA: u8 = 0;
const FAILED: u8 = 1;
/// Largest frame a peer accepts (f32 gradients of a LoRA adapter are far smaller).
const MAX_FRAME: u64 = 16 << 30;

/// One peer's connection(s).
pub(crate) enum Wire {
    /// Peer 0: the others' connections, in rank order.
    Hub { spokes: Vec<Spoke> },
    /// Any other peer: its connection to peer 0.
    Spoke { hub: TcpStream, address: String },
}

pub(crate) struct Spoke {
    rank: usize,
    stream: TcpStream,
    from: SocketAddr,
}

/// Who a peer is, for messages: "peer 3 (node 1, 10.0.0.2:41234)".
pub(crate) type Namer<'a> = &'a dyn Fn(usize, Option<SocketAddr>) -> String;

impl Wire {
    /// Peer 0: listens on `port` (every interface) until the other `peers - 1` have connected
    /// and said hello, then checks that all start where it does.
    pub(crate) fn hub(port: u16, peers: usize, start: Start, timeout: Duration, name: Namer) -> Result<Wire, String> {
        let listener = TcpListener::bind(("0.0.0.0", port)).map_err(|e| format!("listening on port {port}: {e}"))?;
        listener.set_nonblocking(true).map_err(|e| e.to_string())?;
        let deadline = Instant::now() + timeout;
        let mut spokes: Vec<(Spoke, Start)> = Vec::new();
        while spokes.len() + 1 < peers {
            match listener.accept() {
                Ok((stream, from)) => {
                    stream.set_nonblocking(false).map_err(|e| e.to_string())?;
                    set_timeouts(&stream, timeout)?;
                    // A stray connection (a port scan, a peer of another run) is dropped, not fatal.
                    let Ok((rank, their_peers, their_start)) = read_hello(&stream) else { continue };
                    if their_peers != peers || rank == 0 || rank >= peers || spokes.iter().any(|(s, _)| s.rank == rank) {
                        let _ = send(&stream, FAILED, format!("peer 0 expects peers 1 to {} of {peers}; this one says it is peer {rank} of {their_peers} (the same --nodes and --data-parallel on every node, and a distinct --node-rank)", peers - 1).as_bytes());
                        continue;
                    }
                    spokes.push((Spoke { rank, stream, from }, their_start));
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        let missing: Vec<String> = (1..peers).filter(|r| spokes.iter().all(|(s, _)| s.rank != *r)).map(|r| name(r, None)).collect();
                        return Err(format!("{} never connected within {}s", missing.join(", "), timeout.as_secs()));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(format!("accepting peers: {e}")),
            }
        }
        spokes.sort_by_key(|(s, _)| s.rank);
        let mismatch = spokes.iter().find_map(|(s, theirs)| {
            let who = name(s.rank, Some(s.from));
            if theirs.step != start.step {
                Some(format!("{who} starts at step {}, peer 0 at step {}: resume every node from the same checkpoint", theirs.step, start.step))
            } else if theirs.fingerprint != start.fingerprint {
                Some(format!("{who} trains with other settings or data than peer 0: start every node with the same flags, data and model"))
            } else {
                None
            }
        });
        for (s, _) in &spokes {
            let (kind, text) = match &mismatch {
                Some(m) => (FAILED, m.as_str()),
                None => (DATA, ""),
            };
            send(&s.stream, kind, text.as_bytes()).map_err(|e| format!("{}: {e}", name(s.rank, Some(s.from))))?;
        }
        match mismatch {
            Some(m) => Err(m),
            None => Ok(Wire::Hub { spokes: spokes.into_iter().map(|(s, _)| s).collect() }),
        }
    }

    /// Any other peer: connects to peer 0 at `address` (retrying until the timeout, as peer 0
    /// may start later) and says hello.
    pub(crate) fn spoke(address: &str, rank: usize, peers: usize, start: Start, timeout: Duration) -> Result<Wire, String> {
        let deadline = Instant::now() + timeout;
        let hub = loop {
            let tried = address.to_socket_addrs().map_err(|e| format!("{address}: {e}"))?.find_map(|a| TcpStream::connect_timeout(&a, Duration::from_secs(3)).ok());
            if let Some(s) = tried {
                break s;
            }
            if Instant::now() > deadline {
                return Err(format!("peer 0 (node 0, {address}) did not accept a connection within {}s: is node 0 started, and its port open?", timeout.as_secs()));
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        set_timeouts(&hub, timeout)?;
        let mut hello = MAGIC.to_vec();
        for v in [rank as u64, peers as u64, start.step as u64, start.fingerprint] {
            hello.extend(v.to_le_bytes());
        }
        (&hub).write_all(&hello).map_err(|e| format!("peer 0 (node 0, {address}): {}", why(&hub, e)))?;
        match receive(&hub) {
            Ok((DATA, _)) => Ok(Wire::Spoke { hub, address: address.to_string() }),
            Ok((_, text)) => Err(String::from_utf8_lossy(&text).into_owned()),
            Err(e) => Err(format!("peer 0 (node 0, {address}): {e}")),
        }
    }

    /// `values` summed over every peer (in rank order, so every peer gets the same sum).
    pub(crate) fn sum(&mut self, mut values: Vec<f32>, name: Namer) -> Result<Vec<f32>, String> {
        match self {
            Wire::Hub { spokes } => {
                for s in spokes.iter() {
                    let who = name(s.rank, Some(s.from));
                    let got = match receive(&s.stream) {
                        Ok((DATA, bytes)) if bytes.len() == 4 * values.len() => bytes,
                        Ok((DATA, bytes)) => return Err(fail(spokes, &format!("{who} sent {} values, peer 0 has {}", bytes.len() / 4, values.len()))),
                        Ok((_, text)) => return Err(fail(spokes, &format!("{who} failed: {}", String::from_utf8_lossy(&text)))),
                        Err(e) => return Err(fail(spokes, &format!("lost {who}: {e}"))),
                    };
                    for (v, b) in values.iter_mut().zip(got.chunks_exact(4)) {
                        *v += f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                    }
                }
                let bytes = to_bytes(&values);
                for s in spokes.iter() {
                    send(&s.stream, DATA, &bytes).map_err(|e| fail(spokes, &format!("lost {}: {e}", name(s.rank, Some(s.from)))))?;
                }
                Ok(values)
            }
            Wire::Spoke { hub, address } => {
                let lost = |e: String| format!("lost peer 0 (node 0, {address}): {e}");
                send(hub, DATA, &to_bytes(&values)).map_err(lost)?;
                match receive(hub) {
                    Ok((DATA, bytes)) if bytes.len() == 4 * values.len() => Ok(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()),
                    Ok((DATA, bytes)) => Err(format!("peer 0 sent {} values, this peer has {}", bytes.len() / 4, values.len())),
                    // Peer 0 names the peer it lost.
                    Ok((_, text)) => Err(String::from_utf8_lossy(&text).into_owned()),
                    Err(e) => Err(lost(e)),
                }
            }
        }
    }
}

/// Tells every spoke still there why the run stops, and returns the reason.
fn fail(spokes: &[Spoke], reason: &str) -> String {
    for s in spokes {
        let _ = send(&s.stream, FAILED, reason.as_bytes());
    }
    reason.to_string()
}

fn set_timeouts(s: &TcpStream, timeout: Duration) -> Result<(), String> {
    s.set_read_timeout(Some(timeout)).and_then(|_| s.set_write_timeout(Some(timeout))).and_then(|_| s.set_nodelay(true)).map_err(|e| e.to_string())
}

fn read_hello(mut s: &TcpStream) -> Result<(usize, usize, Start), String> {
    let mut b = [0u8; 8 + 32];
    s.read_exact(&mut b).map_err(|e| e.to_string())?;
    if &b[..8] != MAGIC {
        return Err("not a hone peer".into());
    }
    let word = |i: usize| u64::from_le_bytes(b[8 + 8 * i..16 + 8 * i].try_into().expect("8 bytes"));
    Ok((word(0) as usize, word(1) as usize, Start { step: word(2) as usize, fingerprint: word(3) }))
}

fn to_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn send(mut s: &TcpStream, kind: u8, payload: &[u8]) -> Result<(), String> {
    let mut frame = Vec::with_capacity(9 + payload.len());
    frame.push(kind);
    frame.extend((payload.len() as u64).to_le_bytes());
    frame.extend_from_slice(payload);
    s.write_all(&frame).map_err(|e| why(s, e))
}

/// A failed read or write, said as what it means for the peer at the other end.
fn why(s: &TcpStream, e: std::io::Error) -> String {
    match e.kind() {
        ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe => "the connection closed (the process stopped or was killed)".to_string(),
        ErrorKind::WouldBlock | ErrorKind::TimedOut => format!("no answer within {}s (stalled, or the network dropped)", s.read_timeout().ok().flatten().map_or(0, |t| t.as_secs())),
        _ => e.to_string(),
    }
}

/// One frame; a closed connection or a timeout is an error that says which.
fn receive(mut s: &TcpStream) -> Result<(u8, Vec<u8>), String> {
    let why = |e: std::io::Error| why(s, e);
    let mut head = [0u8; 9];
    s.read_exact(&mut head).map_err(why)?;
    let len = u64::from_le_bytes(head[1..].try_into().expect("8 bytes"));
    if len > MAX_FRAME {
        return Err(format!("a frame of {len} bytes: not a hone peer"));
    }
    let mut payload = vec![0u8; len as usize];
    s.read_exact(&mut payload).map_err(why)?;
    Ok((head[0], payload))
}
