//! rustls over a glommio `TcpStream`, and the MQTT listeners' TLS configuration.
//!
//! Client certificates are requested but not required, so SAS devices and X.509 devices share
//! port 8883. rustls checks that the client owns the certificate's private key (the handshake
//! signature); whether the certificate identifies a registered device is decided at CONNECT by
//! `auth::device`, against thumbprints, because self-signed device certificates chain to nothing.

use std::io::{self, Read, Write};
use std::sync::Arc;

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    DigitallySignedStruct, DistinguishedName, ServerConfig, ServerConnection, SignatureScheme,
};

/// Ciphertext read from the socket per read call; a TLS record is at most 16 KiB plus overhead.
/// The ciphertext read buffer starts small, so that an idle connection holds little, and
/// doubles (up to a full TLS record and its overhead) while reads fill it.
const CIPHERTEXT_READ_BYTES_MIN: usize = 4 * 1024;
/// See [`CIPHERTEXT_READ_BYTES_MIN`].
const CIPHERTEXT_READ_BYTES_MAX: usize = 18 * 1024;

/// Accepts any client certificate whose owner proves possession of its key; identity is
/// checked later, at CONNECT.
#[derive(Debug)]
struct AnyClientCertificate {
    provider: Arc<CryptoProvider>,
}

impl ClientCertVerifier for AnyClientCertificate {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The MQTT listeners' TLS configuration: TLS 1.2 and 1.3, client certificates optional.
pub fn mqtt_server_config(
    cert_chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<ServerConfig, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(AnyClientCertificate {
        provider: provider.clone(),
    });
    ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(cert_chain, key)
}

/// A server-side TLS connection over a glommio socket.
#[derive(Debug)]
pub struct TlsStream {
    tcp: TcpStream,
    conn: ServerConnection,
    /// Ciphertext read from the socket; `scratch[pending..filled]` is not yet taken by rustls
    /// (it takes at most its buffer's worth). A read cancelled mid-flight leaves both at 0.
    scratch: Vec<u8>,
    pending: usize,
    filled: usize,
    out: Vec<u8>,
}

impl TlsStream {
    /// Completes the handshake. The caller bounds it with a timeout.
    pub async fn accept(tcp: TcpStream, config: Arc<ServerConfig>) -> io::Result<Self> {
        let conn = ServerConnection::new(config).map_err(io::Error::other)?;
        let mut stream = Self::from_parts(tcp, conn, Vec::new());
        while stream.conn.is_handshaking() {
            stream.flush().await?;
            if !stream.conn.is_handshaking() {
                break;
            }
            if stream.read_ciphertext().await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        stream.flush().await?;
        Ok(stream)
    }

    /// Rebuilds a stream from the parts of [`TlsStream::into_parts`] (after a handoff).
    pub fn from_parts(tcp: TcpStream, conn: ServerConnection, ciphertext: Vec<u8>) -> Self {
        let filled = ciphertext.len();
        let mut scratch = ciphertext;
        scratch.resize(CIPHERTEXT_READ_BYTES_MIN.max(filled), 0);
        Self {
            tcp,
            conn,
            scratch,
            pending: 0,
            filled,
            out: Vec::new(),
        }
    }

    /// The socket, the rustls state and the ciphertext read but not yet processed.
    pub fn into_parts(self) -> (TcpStream, ServerConnection, Vec<u8>) {
        let ciphertext = self.scratch[self.pending..self.filled].to_vec();
        (self.tcp, self.conn, ciphertext)
    }

    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    /// The client's certificate chain, leaf first; empty when it sent none.
    pub fn peer_certificates(&self) -> Vec<&[u8]> {
        self.conn
            .peer_certificates()
            .map(|c| c.iter().map(|c| c.as_ref()).collect())
            .unwrap_or_default()
    }

    /// Feeds ciphertext to rustls, reading from the socket when none is pending; 0 at end of
    /// stream.
    async fn read_ciphertext(&mut self) -> io::Result<usize> {
        if self.pending == self.filled {
            self.pending = 0;
            self.filled = 0;
            let n = self.tcp.read(&mut self.scratch).await?;
            if n == 0 {
                return Ok(0);
            }
            self.filled = n;
            // A full read: more is waiting, so read more at a time from now on.
            if n == self.scratch.len() && n < CIPHERTEXT_READ_BYTES_MAX {
                let grown = (n * 2).min(CIPHERTEXT_READ_BYTES_MAX);
                self.scratch.resize(grown, 0);
            }
        }
        let before = self.pending;
        while self.pending < self.filled {
            let mut rest = &self.scratch[self.pending..self.filled];
            match self.conn.read_tls(&mut rest) {
                Ok(0) => break,
                Ok(n) => self.pending += n,
                // rustls' buffer is full: the caller must take plaintext first.
                Err(e) if e.kind() == io::ErrorKind::Other => break,
                Err(e) => return Err(e),
            }
            if let Err(e) = self.conn.process_new_packets() {
                // Tell the peer why (an alert), then fail.
                let _ = self.flush().await;
                return Err(io::Error::new(io::ErrorKind::InvalidData, e));
            }
        }
        Ok((self.pending - before).max(1))
    }

    /// Reads plaintext; 0 at a clean end of stream.
    pub async fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.conn.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // The peer closed the socket without close_notify: treat as end of stream.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                Err(e) => return Err(e),
            }
            if self.read_ciphertext().await? == 0 {
                return Ok(0);
            }
            // Key updates and session tickets may need an answer.
            self.flush().await?;
        }
    }

    pub async fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        self.conn.writer().write_all(data)?;
        self.flush().await
    }

    async fn flush(&mut self) -> io::Result<()> {
        while self.conn.wants_write() {
            self.out.clear();
            self.conn.write_tls(&mut self.out)?;
            self.tcp.write_all(&self.out).await?;
        }
        Ok(())
    }

    /// Sends close_notify (best effort) and closes the socket.
    pub async fn close(mut self) {
        self.conn.send_close_notify();
        let _ = self.flush().await;
        let _ = self.tcp.close().await;
    }
}
