//! Certificates and rustls configuration.
//!
//! With no operator certificate configured, the first start creates a development CA
//! (`data_dir/tls/ca.pem`, its key `ca.key`) and a server certificate signed by it
//! (`server.pem`, `server.key`) valid for the hub's host name, `localhost` and 127.0.0.1.
//! Devices and back ends trust `ca.pem`. The server certificate is reissued from the same CA when
//! the host name changes or it nears expiry, so clients that trust the CA never notice.

use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::Config;
use crate::fsutil;

/// Days a development server certificate is valid; it is reissued when fewer than
/// `SERVER_CERT_RENEW_DAYS` remain.
const SERVER_CERT_DAYS: i64 = 397;
const SERVER_CERT_RENEW_DAYS: i64 = 30;
const CA_CERT_DAYS: i64 = 3650;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("failed to {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("failed to create a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{path} holds no {what}")]
    Empty { path: PathBuf, what: &'static str },
    #[error("the certificate and key are not usable: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The files the HTTPS (and later MQTT) listeners serve.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert_chain: PathBuf,
    pub key: PathBuf,
    /// The development CA, when the hub made its own certificates.
    pub dev_ca: Option<PathBuf>,
}

pub fn tls_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("tls")
}

/// The operator's certificate when configured, else the development certificates (created or
/// renewed as needed).
pub fn prepare(config: &Config) -> Result<TlsFiles, TlsError> {
    if let (Some(cert), Some(key)) = (&config.tls.cert_file, &config.tls.key_file) {
        return Ok(TlsFiles {
            cert_chain: cert.clone(),
            key: key.clone(),
            dev_ca: None,
        });
    }
    ensure_dev_certs(&tls_dir(&config.data_dir), &config.hostname)
}

fn io_err<'p>(action: &'static str, path: &'p Path) -> impl FnOnce(io::Error) -> TlsError + 'p {
    move |source| TlsError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

fn read(path: &Path) -> Result<String, TlsError> {
    std::fs::read_to_string(path).map_err(io_err("read", path))
}

fn write(path: &Path, contents: &str, private: bool) -> Result<(), TlsError> {
    fsutil::write_atomic(path, contents.as_bytes(), private).map_err(io_err("write", path))
}

fn ensure_dev_certs(dir: &Path, hostname: &str) -> Result<TlsFiles, TlsError> {
    fsutil::create_private_dir(dir).map_err(io_err("create", dir))?;
    let ca_pem = dir.join("ca.pem");
    let ca_key_pem = dir.join("ca.key");
    let server_pem = dir.join("server.pem");
    let server_key = dir.join("server.key");
    let names_file = dir.join("server.names");

    if !ca_pem.exists() || !ca_key_pem.exists() {
        let key = KeyPair::generate()?;
        let cert = ca_params()?.self_signed(&key)?;
        write(&ca_key_pem, &key.serialize_pem(), true)?;
        write(&ca_pem, &cert.pem(), false)?;
        tracing::info!(path = %ca_pem.display(), "created a development CA");
    }

    let names = server_names(hostname);
    let wanted = names.join("\n");
    let current = std::fs::read_to_string(&names_file).unwrap_or_default();
    let fresh = server_pem.exists() && server_key.exists() && current == wanted;
    if !fresh || expires_soon(&read(&server_pem)?)? {
        let ca_key = KeyPair::from_pem(&read(&ca_key_pem)?)?;
        // rcgen signs with a `Certificate`; rebuilding it from the stored CA's parameters and
        // key yields the same subject and key, so the chain to the stored `ca.pem` holds.
        let ca = CertificateParams::from_ca_cert_pem(&read(&ca_pem)?)?.self_signed(&ca_key)?;
        let key = KeyPair::generate()?;
        let cert = server_params(&names)?.signed_by(&key, &ca, &ca_key)?;
        write(&server_key, &key.serialize_pem(), true)?;
        write(&server_pem, &cert.pem(), false)?;
        write(&names_file, &wanted, false)?;
        tracing::info!(path = %server_pem.display(), names = %names.join(","), "issued a server certificate");
    }
    Ok(TlsFiles {
        cert_chain: server_pem,
        key: server_key,
        dev_ca: Some(ca_pem),
    })
}

fn server_names(hostname: &str) -> Vec<String> {
    let mut names = vec![hostname.to_owned()];
    for extra in ["localhost", "127.0.0.1"] {
        if !names.iter().any(|n| n == extra) {
            names.push(extra.to_owned());
        }
    }
    names
}

fn validity(params: &mut CertificateParams, days: i64) {
    let now = time::OffsetDateTime::now_utc();
    // A day of slack before "now" tolerates clients whose clocks run a little behind.
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(days);
}

fn ca_params() -> Result<CertificateParams, TlsError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Ingot");
    dn.push(DnType::CommonName, "Ingot Development CA");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut params, CA_CERT_DAYS);
    Ok(params)
}

fn server_params(names: &[String]) -> Result<CertificateParams, TlsError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    for name in names {
        let san = match name.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(name.clone().try_into()?),
        };
        params.subject_alt_names.push(san);
    }
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Ingot");
    dn.push(
        DnType::CommonName,
        names.first().cloned().unwrap_or_default(),
    );
    params.distinguished_name = dn;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    validity(&mut params, SERVER_CERT_DAYS);
    Ok(params)
}

fn expires_soon(pem: &str) -> Result<bool, TlsError> {
    let params = CertificateParams::from_ca_cert_pem(pem)?;
    Ok(params.not_after
        < time::OffsetDateTime::now_utc() + time::Duration::days(SERVER_CERT_RENEW_DAYS))
}

pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = std::fs::read(path).map_err(io_err("read", path))?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(io_err("parse", path))?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            path: path.to_owned(),
            what: "PEM certificate",
        });
    }
    Ok(certs)
}

pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = std::fs::read(path).map_err(io_err("read", path))?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(io_err("parse", path))?
        .ok_or_else(|| TlsError::Empty {
            path: path.to_owned(),
            what: "PEM private key",
        })
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A server configuration for TLS 1.2 and 1.3 offering `alpn` protocols.
pub fn server_config(files: &TlsFiles, alpn: &[&[u8]]) -> Result<rustls::ServerConfig, TlsError> {
    let certs = load_certs(&files.cert_chain)?;
    let key = load_key(&files.key)?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// A client configuration trusting the system's roots and, when given, `ca` (a local hub's
/// development CA or an operator's private CA).
pub fn client_config(ca: Option<&Path>) -> Result<rustls::ClientConfig, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        // One broken system certificate should not keep the CLI from using the others.
        let _ = roots.add(cert);
    }
    if let Some(ca) = ca {
        for cert in load_certs(ca)? {
            roots.add(cert)?;
        }
    }
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}
