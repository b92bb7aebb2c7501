//! Sockets and TLS for the data plane: the only engine module besides `shard` that touches
//! glommio.
//!
//! TLS is driven by hand over a glommio `TcpStream` with rustls' sans-IO `ServerConnection`
//! instead of through an adapter crate. That costs a hundred lines and buys one property the
//! design needs: a connection (its file descriptor, its rustls state and the bytes already read)
//! can be moved to another shard after CONNECT, because every piece of it is a plain value.

pub mod handoff;
pub mod tls;
pub mod transport;
