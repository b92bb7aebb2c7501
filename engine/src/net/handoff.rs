//! Moving a connection's socket from one shard's executor to another's.
//!
//! glommio binds a `TcpStream` to the executor that created it and offers no way to release its
//! file descriptor. So the sending shard duplicates the descriptor (`dup`), drops its own stream
//! (closing only its copy), and sends the duplicate; the receiving shard wraps it in a new
//! `TcpStream`. The socket, its kernel buffers and its TCP state never notice.

#![allow(unsafe_code)]

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd};

use glommio::net::TcpStream;

/// Takes the socket out of `tcp` as an owned descriptor that can cross threads.
pub fn release(tcp: TcpStream) -> std::io::Result<OwnedFd> {
    let raw = tcp.as_raw_fd();
    // SAFETY: `raw` is the open descriptor owned by `tcp`, which lives until the end of this
    // function, so the borrow cannot outlive it.
    let borrowed = unsafe { BorrowedFd::borrow_raw(raw) };
    let duplicate = rustix::io::fcntl_dupfd_cloexec(borrowed, 0)?;
    drop(tcp);
    Ok(duplicate)
}

/// Wraps a released socket in a stream of the current executor.
pub fn adopt(fd: OwnedFd) -> TcpStream {
    // SAFETY: `fd` is an open, connected TCP socket that this call owns exclusively (it came from
    // `release`, which duplicated it); `into_raw_fd` gives that ownership to the new stream.
    unsafe { TcpStream::from_raw_fd(fd.into_raw_fd()) }
}
