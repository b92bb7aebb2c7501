//! Shared access signature (SAS) tokens: parsing, signing and verification.
//!
//! The format is `SharedAccessSignature sr=<encoded uri>&sig=<encoded base64>&se=<epoch secs>`
//! with an optional `&skn=<policy>`; fields may come in any order. Every Azure SDK signs the `sr`
//! string exactly as it puts it in the token, but they encode it differently (the device SDK
//! escapes `/` as `%2F`, the service SDK sends a bare host, some escape in lower-case hex), so the
//! signature is checked over the *raw* `sr` as received and the audience is compared after
//! percent-decoding. This mirrors the .NET SDK's `SharedAccessSignature.Authenticate`, which is
//! the closest thing to a reference the hub has (azure-protocol.md 1.1).

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use sha2::Sha256;

use crate::limits::SAS_CLOCK_SKEW_SECS;

type HmacSha256 = Hmac<Sha256>;

const PREFIX: &str = "SharedAccessSignature";

/// Python's `urllib.parse.quote(s, safe="")`: everything but `A-Za-z0-9_.-~` is escaped, in
/// upper-case hex. The SDKs build tokens this way, so the tokens Ingot mints look the same.
const QUOTE_ALL: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'_')
    .remove(b'.')
    .remove(b'-')
    .remove(b'~');

/// Why a token was refused. Small and `Copy`: it is counted, not logged per event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SasError {
    #[error("not a SharedAccessSignature token")]
    NotSas,
    #[error("the token has a malformed or duplicate field")]
    Malformed,
    #[error("the token lacks one of sr, sig and se")]
    MissingField,
    #[error("the token has expired")]
    Expired,
    #[error("the token's resource does not cover this endpoint")]
    OutOfScope,
    #[error("the token's signature does not match any key")]
    BadSignature,
}

/// A parsed token. `sr` stays as received (still percent-encoded) because the signature covers
/// exactly those bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SasToken<'a> {
    pub sr_raw: &'a str,
    /// The decoded base64 signature text (not yet base64-decoded: it is compared as text).
    pub sig: String,
    pub se: u64,
    pub skn: Option<String>,
}

impl<'a> SasToken<'a> {
    /// Parses a token. Field names are matched case-insensitively, as the .NET SDK does;
    /// unknown fields are refused, as the Python SDK does.
    pub fn parse(token: &'a str) -> Result<Self, SasError> {
        let rest = token.trim().strip_prefix(PREFIX).ok_or(SasError::NotSas)?;
        let fields = rest.strip_prefix(' ').ok_or(SasError::NotSas)?.trim_start();
        let mut sr = None;
        let mut sig = None;
        let mut se = None;
        let mut skn = None;
        for field in fields.split('&') {
            let (name, value) = field.split_once('=').ok_or(SasError::Malformed)?;
            let slot = match name.to_ascii_lowercase().as_str() {
                "sr" => {
                    set_once(&mut sr, value)?;
                    continue;
                }
                "sig" => &mut sig,
                "se" => &mut se,
                "skn" => &mut skn,
                _ => return Err(SasError::Malformed),
            };
            set_once(slot, value)?;
        }
        let sr_raw = sr.ok_or(SasError::MissingField)?;
        let sig = decode(sig.ok_or(SasError::MissingField)?)?;
        let se = decode(se.ok_or(SasError::MissingField)?)?;
        let se = se.parse::<u64>().map_err(|_| SasError::Malformed)?;
        let skn = skn.map(decode).transpose()?;
        if sr_raw.is_empty() || sig.is_empty() {
            return Err(SasError::Malformed);
        }
        Ok(Self {
            sr_raw,
            sig,
            se,
            skn,
        })
    }

    /// The decoded audience (`sr`), without a trailing `/`.
    pub fn audience(&self) -> Result<String, SasError> {
        let audience = decode(self.sr_raw)?;
        Ok(audience.trim_end_matches('/').to_owned())
    }

    /// Checks expiry (with the SDKs' five minutes of clock skew) and the signature against each
    /// key in turn (primary, then secondary). Scope is checked separately with [`covers`].
    pub fn verify(&self, keys: &[&[u8]], now_secs: u64) -> Result<(), SasError> {
        if self.se.saturating_add(SAS_CLOCK_SKEW_SECS) < now_secs {
            return Err(SasError::Expired);
        }
        let se = self.se.to_string();
        for key in keys {
            if signature_matches(key, self.sr_raw, &se, &self.sig) {
                return Ok(());
            }
        }
        // Azure's docs tell clients to sign the lower-case encoding of the lower-case URI; no
        // SDK does, but hand-made tokens may, so accept that variant too.
        let lower = self.sr_raw.to_ascii_lowercase();
        if lower != self.sr_raw {
            for key in keys {
                if signature_matches(key, &lower, &se, &self.sig) {
                    return Ok(());
                }
            }
        }
        Err(SasError::BadSignature)
    }
}

fn set_once<'a>(slot: &mut Option<&'a str>, value: &'a str) -> Result<(), SasError> {
    if slot.replace(value).is_some() {
        return Err(SasError::Malformed);
    }
    Ok(())
}

/// Percent-decodes without turning `+` into a space: the SDKs escape `+` as `%2B`, so a raw `+`
/// in a signature is a literal `+`.
fn decode(value: &str) -> Result<String, SasError> {
    percent_decode_str(value)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| SasError::Malformed)
}

fn signature_matches(key: &[u8], sr: &str, se: &str, sig_b64: &str) -> bool {
    let Ok(expected) = BASE64.decode(sig_b64) else {
        return false;
    };
    let mut mac = mac(key, sr, se);
    // `verify_slice` compares in constant time.
    mac.update(b"");
    mac.verify_slice(&expected).is_ok()
}

fn mac(key: &[u8], sr: &str, se: &str) -> HmacSha256 {
    // HMAC accepts keys of any length; this cannot fail.
    let mut mac = match HmacSha256::new_from_slice(key) {
        Ok(mac) => mac,
        Err(_) => unreachable!("HMAC-SHA256 takes keys of every length"),
    };
    mac.update(sr.as_bytes());
    mac.update(b"\n");
    mac.update(se.as_bytes());
    mac
}

/// The base64 HMAC-SHA256 signature of `sr` (as it will appear in the token) and `se`.
pub fn sign(key: &[u8], sr: &str, se: u64) -> String {
    BASE64.encode(mac(key, sr, &se.to_string()).finalize().into_bytes())
}

/// Percent-encodes like Python's `quote(s, safe="")`.
pub fn quote(s: &str) -> String {
    utf8_percent_encode(s, QUOTE_ALL).to_string()
}

/// Mints a token the way the Azure device SDK does: `sr` is the resource URI quoted with
/// `safe=""`, the signature is quoted likewise, and `skn` names the policy when a policy key
/// signs it. `key` is the raw (base64-decoded) key.
pub fn generate(resource_uri: &str, key: &[u8], expiry_secs: u64, policy: Option<&str>) -> String {
    let sr = quote(resource_uri);
    let sig = quote(&sign(key, &sr, expiry_secs));
    match policy {
        Some(policy) => {
            format!(
                "{PREFIX} sr={sr}&sig={sig}&se={expiry_secs}&skn={}",
                quote(policy)
            )
        }
        None => format!("{PREFIX} sr={sr}&sig={sig}&se={expiry_secs}"),
    }
}

/// Whether a token's decoded `audience` covers `target` (`host/path...`): a case-insensitive
/// prefix by whole path segments (`/a/b` covers `/a/b/c`, not `/a/bc`). A port on either host
/// is ignored, because the service SDK puts `localhost:8443` into `sr` when the connection
/// string carries a port.
pub fn covers(audience: &str, target: &str) -> bool {
    let audience = strip_port(audience.trim_end_matches('/'));
    let target = strip_port(target.trim_end_matches('/'));
    let audience = audience.to_ascii_lowercase();
    let target = target.to_ascii_lowercase();
    match target.strip_prefix(&audience) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

fn strip_port(uri: &str) -> String {
    let (host, path) = match uri.find('/') {
        Some(i) => uri.split_at(i),
        None => (uri, ""),
    };
    let host = match host.rsplit_once(':') {
        Some((h, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    };
    format!("{host}{path}")
}

#[cfg(test)]
mod tests {
    use super::*;

    // The vector of azure-protocol.md 1.1.
    const KEY_B64: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";
    const DEVICE_TOKEN: &str = "SharedAccessSignature \
        sr=myhub.azure-devices.net%2Fdevices%2Fdev1\
        &sig=wosmA3uJK9T0mdB5CIYn%2BsAVA2ODflnucuvNO5S6mbM%3D&se=1700000000";
    const SERVICE_TOKEN: &str = "SharedAccessSignature sr=myhub.azure-devices.net\
        &sig=sJAIZTF5oG40VHrie96heZ865%2BnR4QavBvHnzxZm8rk%3D&se=1700000000&skn=iothubowner";

    fn key() -> Vec<u8> {
        BASE64.decode(KEY_B64).unwrap()
    }

    #[test]
    fn generates_the_reference_vector() {
        let token = generate(
            "myhub.azure-devices.net/devices/dev1",
            &key(),
            1_700_000_000,
            None,
        );
        assert_eq!(token, DEVICE_TOKEN);
    }

    #[test]
    fn verifies_the_reference_vectors() {
        let device = SasToken::parse(DEVICE_TOKEN).unwrap();
        assert_eq!(device.se, 1_700_000_000);
        assert_eq!(device.skn, None);
        assert_eq!(
            device.audience().unwrap(),
            "myhub.azure-devices.net/devices/dev1"
        );
        assert_eq!(device.verify(&[&key()], 1_700_000_000), Ok(()));

        let service = SasToken::parse(SERVICE_TOKEN).unwrap();
        assert_eq!(service.skn.as_deref(), Some("iothubowner"));
        assert_eq!(service.verify(&[&key()], 1_699_999_000), Ok(()));
    }

    #[test]
    fn tries_the_secondary_key() {
        let device = SasToken::parse(DEVICE_TOKEN).unwrap();
        let other = [7u8; 32];
        assert_eq!(device.verify(&[&other, &key()], 1_700_000_000), Ok(()));
        assert_eq!(
            device.verify(&[&other], 1_700_000_000),
            Err(SasError::BadSignature)
        );
    }

    #[test]
    fn expiry_allows_five_minutes_of_skew() {
        let device = SasToken::parse(DEVICE_TOKEN).unwrap();
        assert_eq!(device.verify(&[&key()], 1_700_000_300), Ok(()));
        assert_eq!(
            device.verify(&[&key()], 1_700_000_301),
            Err(SasError::Expired)
        );
    }

    #[test]
    fn a_changed_field_breaks_the_signature() {
        let tampered = DEVICE_TOKEN.replace("dev1", "dev2");
        let token = SasToken::parse(&tampered).unwrap();
        assert_eq!(
            token.verify(&[&key()], 1_700_000_000),
            Err(SasError::BadSignature)
        );
        let later = DEVICE_TOKEN.replace("se=1700000000", "se=1800000000");
        let token = SasToken::parse(&later).unwrap();
        assert_eq!(
            token.verify(&[&key()], 1_700_000_000),
            Err(SasError::BadSignature)
        );
    }

    #[test]
    fn field_order_and_name_case_do_not_matter() {
        let reordered =
            "SharedAccessSignature se=1700000000&SIG=wosmA3uJK9T0mdB5CIYn%2BsAVA2ODflnu\
            cuvNO5S6mbM%3D&sr=myhub.azure-devices.net%2Fdevices%2Fdev1";
        let token = SasToken::parse(reordered).unwrap();
        assert_eq!(token.verify(&[&key()], 1_700_000_000), Ok(()));
    }

    #[test]
    fn accepts_lower_case_escapes() {
        let sr = "myhub.azure-devices.net%2fdevices%2fdev1";
        let sig = quote(&sign(&key(), sr, 1_700_000_000));
        let token = format!("SharedAccessSignature sr={sr}&sig={sig}&se=1700000000");
        let token = SasToken::parse(&token).unwrap();
        assert_eq!(token.verify(&[&key()], 1_700_000_000), Ok(()));
        assert_eq!(
            token.audience().unwrap(),
            "myhub.azure-devices.net/devices/dev1"
        );
    }

    #[test]
    fn refuses_malformed_tokens() {
        let cases = [
            ("", SasError::NotSas),
            ("Bearer abc", SasError::NotSas),
            ("SharedAccessSignaturesr=a&sig=b&se=1", SasError::NotSas),
            ("SharedAccessSignature sr=a&sig=b", SasError::MissingField),
            ("SharedAccessSignature sr=a&se=1", SasError::MissingField),
            ("SharedAccessSignature sig=b&se=1", SasError::MissingField),
            ("SharedAccessSignature sr=a&sig=b&se=x", SasError::Malformed),
            (
                "SharedAccessSignature sr=a&sig=b&se=1&foo=2",
                SasError::Malformed,
            ),
            (
                "SharedAccessSignature sr=a&sr=a&sig=b&se=1",
                SasError::Malformed,
            ),
            ("SharedAccessSignature sr=a&sig&se=1", SasError::Malformed),
            (
                "SharedAccessSignature sr=a&sig=%ff&se=1",
                SasError::Malformed,
            ),
        ];
        for (token, expected) in cases {
            assert_eq!(SasToken::parse(token), Err(expected), "{token:?}");
        }
    }

    #[test]
    fn a_bad_base64_signature_is_a_bad_signature() {
        let token = SasToken::parse("SharedAccessSignature sr=a&sig=!!!&se=1").unwrap();
        assert_eq!(token.verify(&[&key()], 0), Err(SasError::BadSignature));
    }

    #[test]
    fn scope_is_a_case_insensitive_segment_prefix() {
        assert!(covers("myhub.net/devices/d1", "myhub.net/devices/d1"));
        assert!(covers(
            "myhub.net/devices/d1",
            "myhub.net/devices/d1/modules/m1"
        ));
        assert!(covers("MyHub.NET/Devices/d1/", "myhub.net/devices/D1"));
        assert!(covers("myhub.net", "myhub.net/devices/d1"));
        assert!(!covers("myhub.net/devices/d1", "myhub.net/devices/d10"));
        assert!(!covers("myhub.net/devices/d1", "myhub.net/devices"));
        assert!(!covers("otherhub.net", "myhub.net/devices/d1"));
        assert!(!covers("myhub", "myhub.net"));
    }

    #[test]
    fn scope_ignores_ports() {
        assert!(covers("localhost:8443", "localhost"));
        assert!(covers("localhost:8443", "localhost/devices/d1"));
        assert!(covers("localhost", "localhost:8443/devices/d1"));
        assert!(!covers("localhost:8443x", "localhost"));
    }
}
