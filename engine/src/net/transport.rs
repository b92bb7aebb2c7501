//! A connection's byte stream: plain TCP or TLS, behind one small interface.

use std::io;

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;

use super::tls::TlsStream;

#[derive(Debug)]
pub enum Transport {
    Plain(TcpStream),
    Tls(Box<TlsStream>),
}

impl Transport {
    pub async fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Transport::Plain(tcp) => tcp.read(buf).await,
            Transport::Tls(tls) => tls.read(buf).await,
        }
    }

    pub async fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        match self {
            Transport::Plain(tcp) => tcp.write_all(data).await,
            Transport::Tls(tls) => tls.write_all(data).await,
        }
    }

    /// The client's certificate chain (leaf first), empty when it sent none.
    pub fn peer_certificates(&self) -> Vec<&[u8]> {
        match self {
            Transport::Plain(_) => Vec::new(),
            Transport::Tls(tls) => tls.peer_certificates(),
        }
    }

    pub fn peer_addr(&self) -> Option<std::net::SocketAddr> {
        match self {
            Transport::Plain(tcp) => tcp.peer_addr().ok(),
            Transport::Tls(tls) => tls.tcp().peer_addr().ok(),
        }
    }

    pub async fn close(self) {
        match self {
            Transport::Plain(mut tcp) => {
                let _ = tcp.close().await;
            }
            Transport::Tls(tls) => tls.close().await,
        }
    }
}
