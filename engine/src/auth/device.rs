//! Device and module authentication at CONNECT (azure-protocol.md 1.1-1.4).
//!
//! The data plane asks an [`IdentityLookup`] for the identity named by the CONNECT username and
//! checks what the client presented: a SAS token signed with the identity's own key (no `skn`),
//! or with a shared access policy that grants DeviceConnect (`skn`, scoped to the device), or an
//! X.509 client certificate whose thumbprint is registered. Everything here is sans-IO: the
//! lookup is a trait, the certificate is DER bytes, and time is a parameter.
//!
//! Every failure is a small `Copy` value that the connection turns into CONNACK 5 and a counter;
//! none is logged per event.

use sha1::Sha1;
use sha2::{Digest, Sha256};

use super::sas::{self, SasError, SasToken};

/// How an identity may authenticate, as the registry holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Secret {
    /// Raw (base64-decoded) keys, primary first.
    Sas { keys: Vec<Vec<u8>> },
    /// Upper-case hex SHA-1 (40) or SHA-256 (64) thumbprints of accepted leaf certificates.
    SelfSigned { thumbprints: Vec<String> },
    /// A certificate chaining to a registered CA, with CN = device id.
    CertificateAuthority,
    /// No credentials of its own (only policy tokens can connect it).
    None,
}

/// What the data plane needs to know of an identity to let it connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credential {
    pub enabled: bool,
    pub generation_id: String,
    pub secret: Secret,
}

/// The registry, as the data plane sees it. Implemented by the control plane over its store;
/// called once per CONNECT, never per message.
pub trait IdentityLookup: Send + Sync + 'static {
    /// The credential of a device (`module_id: None`) or module, or `None` when it does not exist.
    fn credential(&self, device_id: &str, module_id: Option<&str>) -> Option<Credential>;
    /// The keys of a shared access policy that grants DeviceConnect, or `None`.
    fn device_connect_policy(&self, policy: &str) -> Option<Vec<Vec<u8>>>;
    /// The registered CA certificates (DER) that `certificateAuthority` identities chain to.
    fn certificate_authorities(&self) -> Vec<Vec<u8>>;
}

/// How a connection authenticated; stamped on its messages as `iothub-connection-auth-method`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    /// A token signed with the identity's key.
    Sas,
    /// A token signed with a shared access policy's key.
    SasPolicy,
    X509SelfSigned,
    X509CertificateAuthority,
}

impl AuthMethod {
    /// The JSON Azure puts in `iothub-connection-auth-method`.
    pub fn as_json(self) -> &'static str {
        match self {
            AuthMethod::Sas => {
                r#"{"scope":"device","type":"sas","issuer":"iothub","acceptingIpFilterRule":null}"#
            }
            AuthMethod::SasPolicy => {
                r#"{"scope":"hub","type":"sas","issuer":"iothub","acceptingIpFilterRule":null}"#
            }
            AuthMethod::X509SelfSigned => {
                r#"{"scope":"device","type":"x509Certificate","issuer":"iothub","acceptingIpFilterRule":null}"#
            }
            AuthMethod::X509CertificateAuthority => {
                r#"{"scope":"device","type":"x509Certificate","issuer":"iothub","acceptingIpFilterRule":null}"#
            }
        }
    }
}

/// An authenticated connection: how, and until when (a SAS token's expiry; certificates do
/// not expire the connection here).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authenticated {
    pub method: AuthMethod,
    pub generation_id: String,
    /// Epoch seconds after which the connection must be closed.
    pub expires_at_secs: Option<u64>,
}

/// Why a CONNECT was refused (all answered with CONNACK 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthFailure {
    #[error("no such device or module")]
    UnknownIdentity,
    #[error("the device is disabled")]
    Disabled,
    #[error("no password and no client certificate")]
    NoCredentials,
    #[error("bad SAS token: {0}")]
    Token(SasError),
    #[error("the token's policy does not exist or lacks DeviceConnect")]
    PolicyNotAllowed,
    #[error("the client certificate's thumbprint is not registered")]
    ThumbprintMismatch,
    #[error("the identity does not authenticate this way")]
    WrongMethod,
    #[error("the certificate chain was refused: {0}")]
    Chain(super::x509::ChainFailure),
    #[error("the password is not UTF-8")]
    BadPassword,
}

/// What a client presented at CONNECT.
#[derive(Debug, Clone, Copy)]
pub struct Presented<'a> {
    pub device_id: &'a str,
    pub module_id: Option<&'a str>,
    pub password: Option<&'a [u8]>,
    /// The DER certificates from the TLS handshake, leaf first; empty when the client sent
    /// none.
    pub client_chain: &'a [&'a [u8]],
}

/// Checks a CONNECT's credentials. `hostname` is the hub's name (the token's scope is checked
/// against `{hostname}/devices/{id}[/modules/{mid}]`).
pub fn authenticate(
    presented: &Presented<'_>,
    hostname: &str,
    lookup: &dyn IdentityLookup,
    now_secs: u64,
) -> Result<Authenticated, AuthFailure> {
    let credential = lookup
        .credential(presented.device_id, presented.module_id)
        .ok_or(AuthFailure::UnknownIdentity)?;
    if !credential.enabled {
        return Err(AuthFailure::Disabled);
    }
    let authenticated = |method, expires_at_secs| Authenticated {
        method,
        generation_id: credential.generation_id.clone(),
        expires_at_secs,
    };
    if let Some(password) = presented.password.filter(|p| !p.is_empty()) {
        let password = std::str::from_utf8(password).map_err(|_| AuthFailure::BadPassword)?;
        let token = SasToken::parse(password).map_err(AuthFailure::Token)?;
        let target = match presented.module_id {
            Some(module) => format!(
                "{hostname}/devices/{}/modules/{module}",
                presented.device_id
            ),
            None => format!("{hostname}/devices/{}", presented.device_id),
        };
        let audience = token.audience().map_err(AuthFailure::Token)?;
        if !sas::covers(&audience, &target) {
            return Err(AuthFailure::Token(SasError::OutOfScope));
        }
        let (keys, method) = match &token.skn {
            Some(policy) => (
                lookup
                    .device_connect_policy(policy)
                    .ok_or(AuthFailure::PolicyNotAllowed)?,
                AuthMethod::SasPolicy,
            ),
            None => match &credential.secret {
                Secret::Sas { keys } => (keys.clone(), AuthMethod::Sas),
                _ => return Err(AuthFailure::WrongMethod),
            },
        };
        let key_refs: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
        token
            .verify(&key_refs, now_secs)
            .map_err(AuthFailure::Token)?;
        return Ok(authenticated(
            method,
            Some(token.se + super::super::limits::SAS_CLOCK_SKEW_SECS),
        ));
    }
    let cert = *presented
        .client_chain
        .first()
        .ok_or(AuthFailure::NoCredentials)?;
    match &credential.secret {
        Secret::SelfSigned { thumbprints } => {
            let (sha1, sha256) = thumbprints_of(cert);
            if thumbprints
                .iter()
                .any(|t| t.eq_ignore_ascii_case(&sha1) || t.eq_ignore_ascii_case(&sha256))
            {
                Ok(authenticated(AuthMethod::X509SelfSigned, None))
            } else {
                Err(AuthFailure::ThumbprintMismatch)
            }
        }
        Secret::CertificateAuthority => {
            let expected_cn = match presented.module_id {
                Some(module) => format!("{}/{module}", presented.device_id),
                None => presented.device_id.to_owned(),
            };
            let authorities = lookup.certificate_authorities();
            super::x509::verify_chain(presented.client_chain, &authorities, &expected_cn, now_secs)
                .map_err(AuthFailure::Chain)?;
            Ok(authenticated(AuthMethod::X509CertificateAuthority, None))
        }
        _ => Err(AuthFailure::WrongMethod),
    }
}

/// The SHA-1 and SHA-256 thumbprints of a DER certificate, upper-case hex (Azure computes both).
pub fn thumbprints_of(der: &[u8]) -> (String, String) {
    (
        hex_upper(&Sha1::digest(der)),
        hex_upper(&Sha256::digest(der)),
    )
}

fn hex_upper(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02X}");
            s
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct Fixed {
        identities: HashMap<(String, Option<String>), Credential>,
    }

    impl IdentityLookup for Fixed {
        fn credential(&self, device_id: &str, module_id: Option<&str>) -> Option<Credential> {
            self.identities
                .get(&(device_id.to_owned(), module_id.map(str::to_owned)))
                .cloned()
        }
        fn device_connect_policy(&self, policy: &str) -> Option<Vec<Vec<u8>>> {
            (policy == "device").then(|| vec![b"policy-key-0123456789".to_vec()])
        }
        fn certificate_authorities(&self) -> Vec<Vec<u8>> {
            Vec::new()
        }
    }

    const KEY: &[u8] = b"device-key-0123456789";
    const MODULE_KEY: &[u8] = b"module-key-0123456789";
    const CERT: &[u8] = b"not really DER, but thumbprints do not care";

    fn lookup() -> Fixed {
        let sas = |enabled| Credential {
            enabled,
            generation_id: "1".into(),
            secret: Secret::Sas {
                keys: vec![b"other".to_vec(), KEY.to_vec()],
            },
        };
        let mut identities = HashMap::new();
        identities.insert(("d1".into(), None), sas(true));
        identities.insert(("off".into(), None), sas(false));
        let module = Credential {
            enabled: true,
            generation_id: "3".into(),
            secret: Secret::Sas {
                keys: vec![MODULE_KEY.to_vec()],
            },
        };
        identities.insert(("d1".into(), Some("m1".into())), module);
        let (sha1, _) = thumbprints_of(CERT);
        identities.insert(
            ("x1".into(), None),
            Credential {
                enabled: true,
                generation_id: "2".into(),
                secret: Secret::SelfSigned {
                    thumbprints: vec![sha1],
                },
            },
        );
        Fixed { identities }
    }

    fn presented<'a>(
        device: &'a str,
        module: Option<&'a str>,
        password: Option<&'a str>,
    ) -> Presented<'a> {
        Presented {
            device_id: device,
            module_id: module,
            password: password.map(str::as_bytes),
            client_chain: &[],
        }
    }

    #[test]
    fn device_and_module_tokens() {
        let at = |device, module, token: &str| {
            authenticate(
                &presented(device, module, Some(token)),
                "hub",
                &lookup(),
                900,
            )
        };
        let token = sas::generate("hub/devices/d1", KEY, 1000, None);
        let ok = at("d1", None, &token).unwrap();
        assert_eq!(ok.method, AuthMethod::Sas);
        assert_eq!(ok.expires_at_secs, Some(1300));

        // A device token covers its modules' paths, but a module verifies with its own key.
        assert_eq!(
            at("d1", Some("m1"), &token),
            Err(AuthFailure::Token(SasError::BadSignature))
        );
        let module_token = sas::generate("hub/devices/d1/modules/m1", MODULE_KEY, 1000, None);
        assert!(at("d1", Some("m1"), &module_token).is_ok());
        // A module token does not cover its device, and no token covers another device.
        let failure = at("d1", None, &module_token);
        assert_eq!(failure, Err(AuthFailure::Token(SasError::OutOfScope)));
        let other = sas::generate("hub/devices/d2", KEY, 1000, None);
        assert_eq!(
            at("d1", None, &other),
            Err(AuthFailure::Token(SasError::OutOfScope))
        );

        let expired = authenticate(&presented("d1", None, Some(&token)), "hub", &lookup(), 1301);
        assert_eq!(expired, Err(AuthFailure::Token(SasError::Expired)));
        let wrong_key = sas::generate("hub/devices/d1", b"wrong", 1000, None);
        assert_eq!(
            at("d1", None, &wrong_key),
            Err(AuthFailure::Token(SasError::BadSignature))
        );
    }

    #[test]
    fn policy_tokens_need_device_connect() {
        let token = sas::generate(
            "hub/devices/d1",
            b"policy-key-0123456789",
            1000,
            Some("device"),
        );
        let ok = authenticate(&presented("d1", None, Some(&token)), "hub", &lookup(), 900).unwrap();
        assert_eq!(ok.method, AuthMethod::SasPolicy);
        let token = sas::generate(
            "hub/devices/d1",
            b"policy-key-0123456789",
            1000,
            Some("service"),
        );
        let failure = authenticate(&presented("d1", None, Some(&token)), "hub", &lookup(), 900);
        assert_eq!(failure, Err(AuthFailure::PolicyNotAllowed));
    }

    #[test]
    fn unknown_disabled_and_missing_credentials() {
        let token = sas::generate("hub/devices/nobody", KEY, 1000, None);
        let failure = authenticate(
            &presented("nobody", None, Some(&token)),
            "hub",
            &lookup(),
            900,
        );
        assert_eq!(failure, Err(AuthFailure::UnknownIdentity));
        let token = sas::generate("hub/devices/off", KEY, 1000, None);
        let failure = authenticate(&presented("off", None, Some(&token)), "hub", &lookup(), 900);
        assert_eq!(failure, Err(AuthFailure::Disabled));
        let failure = authenticate(&presented("d1", None, None), "hub", &lookup(), 900);
        assert_eq!(failure, Err(AuthFailure::NoCredentials));
    }

    #[test]
    fn x509_thumbprints() {
        let mut with_cert = presented("x1", None, None);
        with_cert.client_chain = &[CERT];
        let ok = authenticate(&with_cert, "hub", &lookup(), 900).unwrap();
        assert_eq!(ok.method, AuthMethod::X509SelfSigned);
        assert_eq!(ok.expires_at_secs, None);
        with_cert.client_chain = &[b"another certificate"];
        assert_eq!(
            authenticate(&with_cert, "hub", &lookup(), 900),
            Err(AuthFailure::ThumbprintMismatch)
        );
        // A SAS device cannot use a certificate, and an X.509 device cannot use its (absent) key.
        let mut sas_with_cert = presented("d1", None, None);
        sas_with_cert.client_chain = &[CERT];
        assert_eq!(
            authenticate(&sas_with_cert, "hub", &lookup(), 900),
            Err(AuthFailure::WrongMethod)
        );
        let token = sas::generate("hub/devices/x1", KEY, 1000, None);
        let failure = authenticate(&presented("x1", None, Some(&token)), "hub", &lookup(), 900);
        assert_eq!(failure, Err(AuthFailure::WrongMethod));
    }

    #[test]
    fn thumbprints_are_upper_case_hex() {
        let (sha1, sha256) = thumbprints_of(b"abc");
        assert_eq!(sha1, "A9993E364706816ABA3E25717850C26C9CD0D89D");
        assert_eq!(sha256.len(), 64);
    }
}
