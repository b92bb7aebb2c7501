//! X.509 certificate-authority authentication (azure-protocol.md 1.3): a device's certificate
//! must chain to a CA certificate the operator registered, and its subject's common name must be
//! the device id (`deviceId/moduleId` for a module). There is no CRL checking, as in Azure: to
//! revoke a device, disable it; to revoke a CA, remove it.
//!
//! Sans-IO: the chain and the CAs are DER bytes, time is a parameter; webpki does the path
//! building and signature checks.

use std::time::Duration;

use rustls::pki_types::{CertificateDer, UnixTime};

/// Why a certificate chain was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChainFailure {
    #[error("no CA certificate is registered")]
    NoAuthorities,
    #[error("the client certificate is malformed")]
    Malformed,
    #[error("the certificate does not chain to a registered CA (or is expired)")]
    Untrusted,
    #[error("the certificate's common name is not the identity's")]
    WrongCommonName,
}

/// Checks that `chain` (leaf first, then intermediates) chains to one of `authorities` at
/// `now_secs`, for client authentication, and that the leaf's CN is `expected_cn`.
pub fn verify_chain(
    chain: &[&[u8]],
    authorities: &[Vec<u8>],
    expected_cn: &str,
    now_secs: u64,
) -> Result<(), ChainFailure> {
    let (leaf, intermediates) = chain.split_first().ok_or(ChainFailure::Malformed)?;
    let anchors: Vec<_> = authorities
        .iter()
        .filter_map(|der| {
            webpki::anchor_from_trusted_cert(&CertificateDer::from(der.as_slice()))
                .ok()
                .map(|anchor| anchor.to_owned())
        })
        .collect();
    if anchors.is_empty() {
        return Err(ChainFailure::NoAuthorities);
    }
    let leaf_der = CertificateDer::from(*leaf);
    let end_entity =
        webpki::EndEntityCert::try_from(&leaf_der).map_err(|_| ChainFailure::Malformed)?;
    let intermediates: Vec<CertificateDer<'_>> = intermediates
        .iter()
        .map(|der| CertificateDer::from(*der))
        .collect();
    let now = UnixTime::since_unix_epoch(Duration::from_secs(now_secs));
    end_entity
        .verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            &intermediates,
            now,
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .map_err(|_| ChainFailure::Untrusted)?;
    match common_name(leaf) {
        Some(cn) if cn == expected_cn => Ok(()),
        _ => Err(ChainFailure::WrongCommonName),
    }
}

/// The subject's common name of a DER certificate.
pub fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_owned)
}

/// What an operator needs to know of a CA certificate: its subject, SHA-1 thumbprint (as
/// Azure shows it) and expiry (Unix seconds). `None` when the bytes are not a CA certificate.
pub fn describe_authority(der: &[u8]) -> Option<(String, String, i64)> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    if !cert.is_ca() {
        return None;
    }
    let (sha1, _) = super::device::thumbprints_of(der);
    Some((
        cert.subject().to_string(),
        sha1,
        cert.validity().not_after.timestamp(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};

    fn ca(name: &str) -> (rcgen::Certificate, KeyPair) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        (params.self_signed(&key).unwrap(), key)
    }

    fn leaf(cn: &str, issuer: &(rcgen::Certificate, KeyPair)) -> Vec<u8> {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params
            .signed_by(&key, &issuer.0, &issuer.1)
            .unwrap()
            .der()
            .to_vec()
    }

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    #[test]
    fn accepts_a_leaf_of_a_registered_ca_with_the_device_id() {
        let authority = ca("fleet CA");
        let cert = leaf("dev1", &authority);
        let authorities = vec![authority.0.der().to_vec()];
        assert_eq!(verify_chain(&[&cert], &authorities, "dev1", now()), Ok(()));
        assert_eq!(
            verify_chain(&[&cert], &authorities, "dev2", now()),
            Err(ChainFailure::WrongCommonName)
        );
        assert_eq!(common_name(&cert).as_deref(), Some("dev1"));
        let (subject, thumbprint, _) = describe_authority(&authorities[0]).unwrap();
        assert!(subject.contains("fleet CA"));
        assert_eq!(thumbprint.len(), 40);
        assert!(describe_authority(&cert).is_none(), "a leaf is not a CA");
    }

    #[test]
    fn refuses_other_cas_expiry_and_garbage() {
        let authority = ca("fleet CA");
        let stranger = ca("stranger");
        let cert = leaf("dev1", &stranger);
        let authorities = vec![authority.0.der().to_vec()];
        assert_eq!(
            verify_chain(&[&cert], &authorities, "dev1", now()),
            Err(ChainFailure::Untrusted)
        );
        assert_eq!(
            verify_chain(&[&cert], &[], "dev1", now()),
            Err(ChainFailure::NoAuthorities)
        );
        assert_eq!(
            verify_chain(&[b"junk"], &authorities, "dev1", now()),
            Err(ChainFailure::Malformed)
        );
        assert_eq!(
            verify_chain(&[], &authorities, "dev1", now()),
            Err(ChainFailure::Malformed)
        );
        // rcgen's default validity ends in 4096; past that the chain is expired.
        let mine = leaf("dev1", &authority);
        let far_future = 71_000_000_000; // year 4219
        assert_eq!(
            verify_chain(&[&mine], &authorities, "dev1", far_future),
            Err(ChainFailure::Untrusted)
        );
    }
}
