//! The null MQTT sink: CONNACK 0 to every CONNECT, a PUBACK for every QoS 1 PUBLISH, PINGRESP
//! to PINGREQ; everything else is discarded. It is the ceiling of loopback plus generator: what
//! a broker that did no work at all would reach, the denominator of every ratio in the budgets.
//!
//! Same structure as the generator: one mio loop per thread, each with its own SO_REUSEPORT
//! listener (the kernel spreads connections over threads), one read into a shared buffer, the
//! acknowledgements of everything read batched into one write. While a connection's answers
//! cannot be written, it is not read, so a slow client is pushed back by TCP rather than
//! buffered without bound.

use std::io::{self, Read as _, Write as _};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use ingot_engine::mqtt::{
    decode, encode_connack, encode_pingresp, encode_puback, frame, ConnectReturnCode, Packet,
    PublishQos,
};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};

use crate::cli::SinkArgs;

const LISTENER: Token = Token(usize::MAX);
/// Largest packet the sink accepts (a generous PUBLISH).
const PACKET_BYTES_MAX: usize = 1024 * 1024;
const READ_CHUNK_BYTES: usize = 64 * 1024;

#[derive(Debug, Default)]
struct SinkCounters {
    publishes: AtomicU64,
    connections: AtomicU64,
}

/// `ingot-load sink`.
pub fn run(args: &SinkArgs) -> anyhow::Result<()> {
    let addr = crate::generator::resolve(&args.host, args.port)?;
    let cpus = args
        .cpus
        .as_deref()
        .map(crate::pin::parse_cpus)
        .transpose()?;
    let threads = args.threads.max(1);
    let counters = Arc::new(SinkCounters::default());
    let mut handles = Vec::new();
    for k in 0..threads {
        // Bind in this thread so that a port in use is an error before anything runs.
        let listener = reuseport_listener(addr).with_context(|| format!("listen on {addr}"))?;
        let cpu = cpus.as_deref().and_then(|c| crate::pin::cpu_for(c, k));
        let counters = counters.clone();
        handles.push(
            std::thread::Builder::new()
                .name(format!("sink-{k}"))
                .spawn(move || {
                    if let Some(cpu) = cpu {
                        if let Err(e) = crate::pin::pin_current_thread(cpu) {
                            eprintln!("ingot-load sink: {e:#}");
                        }
                    }
                    serve(listener, &counters)
                })
                .context("spawn a sink thread")?,
        );
    }
    if !args.quiet {
        eprintln!("ingot-load sink: listening on {addr} with {threads} thread(s)");
    }
    let started = Instant::now();
    let mut last = (Instant::now(), 0u64);
    loop {
        std::thread::sleep(Duration::from_millis(100));
        if handles.iter().any(|h| h.is_finished()) {
            break;
        }
        if args
            .duration
            .is_some_and(|secs| started.elapsed().as_secs_f64() >= secs)
        {
            // The threads block in poll; exiting the process ends them.
            return Ok(());
        }
        if !args.quiet && last.0.elapsed() >= Duration::from_secs(1) {
            let total = counters.publishes.load(Ordering::Relaxed);
            let rate = (total - last.1) as f64 / last.0.elapsed().as_secs_f64();
            eprintln!(
                "[{:6.1}s] sink {:.0} PUBLISH/s, {} connections",
                started.elapsed().as_secs_f64(),
                rate,
                counters.connections.load(Ordering::Relaxed)
            );
            last = (Instant::now(), total);
        }
    }
    for handle in handles {
        match handle.join() {
            Ok(result) => result?,
            Err(_) => anyhow::bail!("a sink thread panicked"),
        }
    }
    Ok(())
}

fn reuseport_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    use rustix::net::sockopt;
    let fd = crate::generator::nonblocking_socket(&addr)?;
    sockopt::set_socket_reuseaddr(&fd, true)?;
    sockopt::set_socket_reuseport(&fd, true)?;
    rustix::net::bind(&fd, &addr)?;
    // A deep backlog: connect storms from the generator must not be dropped by the sink.
    rustix::net::listen(&fd, 4096)?;
    Ok(TcpListener::from_std(std::net::TcpListener::from(fd)))
}

#[derive(Debug)]
struct SinkConn {
    socket: TcpStream,
    wbuf: Vec<u8>,
    written: usize,
    pending: Vec<u8>,
}

fn serve(mut listener: TcpListener, counters: &SinkCounters) -> anyhow::Result<()> {
    let mut poll = Poll::new().context("create an epoll instance")?;
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)?;
    let mut conns: Vec<Option<SinkConn>> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let mut scratch = vec![0u8; READ_CHUNK_BYTES];
    let mut events = Events::with_capacity(1024);
    let mut publishes = 0u64;
    loop {
        if let Err(e) = poll.poll(&mut events, Some(Duration::from_millis(100))) {
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e.into());
        }
        for event in events.iter() {
            if event.token() == LISTENER {
                loop {
                    match listener.accept() {
                        Ok((mut socket, _)) => {
                            let _ = socket.set_nodelay(true);
                            let slot = free.pop().unwrap_or_else(|| {
                                conns.push(None);
                                conns.len() - 1
                            });
                            if poll
                                .registry()
                                .register(
                                    &mut socket,
                                    Token(slot),
                                    Interest::READABLE | Interest::WRITABLE,
                                )
                                .is_err()
                            {
                                free.push(slot);
                                continue;
                            }
                            if let Some(entry) = conns.get_mut(slot) {
                                *entry = Some(SinkConn {
                                    socket,
                                    wbuf: Vec::with_capacity(4096),
                                    written: 0,
                                    pending: Vec::new(),
                                });
                            }
                            counters.connections.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        // Out of descriptors or an aborted connection: try again on the next
                        // event instead of spinning.
                        Err(_) => break,
                    }
                }
                continue;
            }
            let slot = event.token().0;
            let Some(Some(conn)) = conns.get_mut(slot) else {
                continue;
            };
            let keep = service(conn, &mut scratch, &mut publishes);
            if !keep {
                if let Some(mut conn) = conns.get_mut(slot).and_then(Option::take) {
                    let _ = poll.registry().deregister(&mut conn.socket);
                    counters.connections.fetch_sub(1, Ordering::Relaxed);
                }
                free.push(slot);
            }
        }
        counters.publishes.store(publishes, Ordering::Relaxed);
    }
}

/// Flushes, reads while answers can be written, and answers. `false` closes the connection.
fn service(conn: &mut SinkConn, scratch: &mut [u8], publishes: &mut u64) -> bool {
    loop {
        match flush(conn) {
            Ok(true) => {}
            // Not read again until its answers are written (the writable event resumes it).
            Ok(false) => return true,
            Err(()) => return false,
        }
        let n = match conn.socket.read(scratch) {
            Ok(0) => return false,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return false,
        };
        let Some(bytes) = scratch.get(..n) else {
            return false;
        };
        let ok = if conn.pending.is_empty() {
            match answer(bytes, &mut conn.wbuf, publishes) {
                Some(used) => {
                    conn.pending
                        .extend_from_slice(bytes.get(used..).unwrap_or_default());
                    true
                }
                None => false,
            }
        } else {
            let mut pending = std::mem::take(&mut conn.pending);
            pending.extend_from_slice(bytes);
            let used = answer(&pending, &mut conn.wbuf, publishes);
            if let Some(used) = used {
                pending.drain(..used.min(pending.len()));
            }
            conn.pending = pending;
            used.is_some()
        };
        if !ok {
            return false;
        }
    }
}

/// Writes the answers; `Ok(true)` when all are written.
fn flush(conn: &mut SinkConn) -> Result<bool, ()> {
    while let Some(rest) = conn.wbuf.get(conn.written..).filter(|r| !r.is_empty()) {
        match conn.socket.write(rest) {
            Ok(0) => return Err(()),
            Ok(n) => conn.written += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Err(()),
        }
    }
    conn.wbuf.clear();
    conn.written = 0;
    Ok(true)
}

/// Answers every whole packet at the start of `buf`; returns the bytes used, `None` to close.
fn answer(buf: &[u8], out: &mut Vec<u8>, publishes: &mut u64) -> Option<usize> {
    let mut at = 0usize;
    loop {
        let rest = buf.get(at..)?;
        let len = match frame(rest, PACKET_BYTES_MAX) {
            Ok(Some(len)) => len,
            Ok(None) => return Some(at),
            Err(_) => return None,
        };
        match decode(rest.get(..len)?).ok()? {
            Packet::Connect(_) => encode_connack(out, false, ConnectReturnCode::Accepted),
            Packet::Publish(publish) => {
                *publishes += 1;
                if let PublishQos::AtLeastOnce(id) = publish.qos {
                    encode_puback(out, id);
                }
            }
            Packet::Pingreq => encode_pingresp(out),
            Packet::Disconnect => return None,
            _ => {}
        }
        at += len;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ingot_engine::mqtt::{encode_publish, PacketId, Publish};

    #[test]
    fn answers_whole_packets_and_keeps_the_rest() {
        let mut input = Vec::new();
        for id in 1..=3u16 {
            let publish = Publish {
                dup: false,
                qos: PublishQos::AtLeastOnce(PacketId::new(id).unwrap()),
                retain: false,
                topic: "t/1",
                payload: b"hello",
            };
            encode_publish(&mut input, &publish).unwrap();
        }
        let cut = input.len() - 3;
        let mut out = Vec::new();
        let mut publishes = 0;
        let used = answer(&input[..cut], &mut out, &mut publishes).unwrap();
        assert_eq!(publishes, 2);
        assert_eq!(out, [0x40, 2, 0, 1, 0x40, 2, 0, 2]);
        assert_eq!(
            answer(&input[used..], &mut out, &mut publishes),
            Some(input.len() - used)
        );
        assert_eq!(publishes, 3);
        assert_eq!(answer(&[0xff, 0x00], &mut out, &mut publishes), None);
    }
}
