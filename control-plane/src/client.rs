//! A small client of the hub's REST API, authorized by a service connection string. The CLI uses
//! it, and so do the black-box tests (a real HTTPS client over real TLS, nothing mocked).
//!
//! It is blocking on purpose: a CLI command or a test makes one request at a time, so each call
//! runs on a private current-thread runtime and opens its own connection.

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;

use ingot_engine::auth::sas;

/// The API version the Azure service SDK speaks; sent on every request.
pub const API_VERSION: &str = "2021-04-12";
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
const TOKEN_TTL_SECS: u64 = 3600;

/// `HostName=...;SharedAccessKeyName=...;SharedAccessKey=...`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceConnectionString {
    /// Host, with `:port` when the port is not 443.
    pub host: String,
    pub policy: String,
    pub key: String,
}

impl FromStr for ServiceConnectionString {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut host = None;
        let mut policy = None;
        let mut key = None;
        for part in s.trim().split(';').filter(|p| !p.is_empty()) {
            let (name, value) = part
                .split_once('=')
                .ok_or_else(|| anyhow!("connection string part {part:?} has no '='"))?;
            match name {
                "HostName" => host = Some(value.to_owned()),
                "SharedAccessKeyName" => policy = Some(value.to_owned()),
                "SharedAccessKey" => key = Some(value.to_owned()),
                _ => {}
            }
        }
        let missing = |what| anyhow!("the connection string has no {what}");
        let parsed = Self {
            host: host.ok_or_else(|| missing("HostName"))?,
            policy: policy.ok_or_else(|| missing("SharedAccessKeyName"))?,
            key: key.ok_or_else(|| missing("SharedAccessKey"))?,
        };
        BASE64
            .decode(&parsed.key)
            .context("the SharedAccessKey is not base64")?;
        Ok(parsed)
    }
}

impl ServiceConnectionString {
    /// The host name without a port: the hub's name as devices use it.
    pub fn hostname(&self) -> &str {
        match self.host.rsplit_once(':') {
            Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
            _ => &self.host,
        }
    }

    /// A token for this policy, shaped like the service SDK's.
    pub fn token(&self, ttl_secs: u64) -> anyhow::Result<String> {
        let key = BASE64.decode(&self.key)?;
        let expiry = crate::api::now_secs() + ttl_secs;
        Ok(sas::generate(&self.host, &key, expiry, Some(&self.policy)))
    }
}

/// A response: status, the continuation header, and the body.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub continuation: Option<String>,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> anyhow::Result<serde_json::Value> {
        if self.body.is_empty() {
            return Ok(serde_json::Value::Null);
        }
        serde_json::from_slice(&self.body).context("the hub's response is not JSON")
    }

    /// The body as JSON when the status is a success, else an error naming the status and
    /// the hub's message.
    pub fn success(self) -> anyhow::Result<serde_json::Value> {
        if self.status.is_success() {
            return self.json();
        }
        let text = String::from_utf8_lossy(&self.body);
        // Azure's envelope nests the interesting part as a JSON string in `Message`.
        let detail = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|outer| {
                outer
                    .get("Message")
                    .and_then(|m| m.as_str())
                    .map(str::to_owned)
            })
            .and_then(|m| serde_json::from_str::<serde_json::Value>(&m).ok())
            .and_then(|inner| {
                inner
                    .get("message")
                    .and_then(|m| m.as_str())
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| text.into_owned());
        bail!("the hub answered {}: {detail}", self.status)
    }
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// A JSON body and its content type.
fn json_body(body: Option<&serde_json::Value>) -> anyhow::Result<Option<(Bytes, &'static str)>> {
    Ok(match body {
        Some(body) => Some((
            Bytes::from(serde_json::to_vec(body)?),
            "application/json; charset=utf-8",
        )),
        None => None,
    })
}

/// One kept-alive HTTPS connection for many requests in a row (benchmarks, scripted loads),
/// with its own current-thread runtime.
pub struct ServiceSession {
    client: ServiceClient,
    runtime: tokio::runtime::Runtime,
    sender: Sender,
}

impl std::fmt::Debug for ServiceSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceSession").finish_non_exhaustive()
    }
}

impl ServiceSession {
    pub fn request(
        &mut self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> anyhow::Result<Reply> {
        let body = json_body(body)?;
        let (client, sender) = (&self.client, &mut self.sender);
        self.runtime.block_on(async {
            tokio::time::timeout(
                REQUEST_TIMEOUT,
                client.send_on(sender, method, path, &[], body),
            )
            .await
            .map_err(|_| anyhow!("the hub did not answer within {REQUEST_TIMEOUT:?}"))?
        })
    }
}

#[derive(Debug, Clone)]
pub struct ServiceClient {
    pub connection: ServiceConnectionString,
    tls: Arc<rustls::ClientConfig>,
}

impl ServiceClient {
    /// `ca`: the CA to trust (a local hub's development CA); `None` uses the system's roots.
    pub fn new(connection: ServiceConnectionString, ca: Option<&Path>) -> anyhow::Result<Self> {
        let tls = crate::tls::client_config(ca).context("set up TLS")?;
        Ok(Self {
            connection,
            tls: Arc::new(tls),
        })
    }

    /// Sends one request; `path` starts with `/` and has its segments already encoded.
    pub fn request(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&serde_json::Value>,
    ) -> anyhow::Result<Reply> {
        let body = json_body(body)?;
        self.request_bytes(method, path, headers, body)
    }

    /// Opens a kept-alive connection for many requests.
    pub fn session(&self) -> anyhow::Result<ServiceSession> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("start a runtime")?;
        let sender = runtime.block_on(self.open())?;
        Ok(ServiceSession {
            client: self.clone(),
            runtime,
            sender,
        })
    }

    /// Sends one request with a raw body and its content type.
    pub fn request_bytes(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<(Bytes, &str)>,
    ) -> anyhow::Result<Reply> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("start a runtime")?;
        runtime.block_on(async {
            tokio::time::timeout(REQUEST_TIMEOUT, self.send(method, path, headers, body))
                .await
                .map_err(|_| anyhow!("the hub did not answer within {REQUEST_TIMEOUT:?}"))?
        })
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<(Bytes, &str)>,
    ) -> anyhow::Result<Reply> {
        let mut sender = self.open().await?;
        self.send_on(&mut sender, method, path, headers, body).await
    }

    /// Opens one HTTPS connection to the hub.
    async fn open(&self) -> anyhow::Result<Sender> {
        let host = &self.connection.host;
        let address = if host.contains(':') {
            host.clone()
        } else {
            format!("{host}:443")
        };
        let tcp = tokio::net::TcpStream::connect(&address)
            .await
            .with_context(|| format!("connect to {address}"))?;
        tcp.set_nodelay(true)?;
        let name = ServerName::try_from(self.connection.hostname().to_owned())
            .context("the HostName is not a valid server name")?;
        let connector = tokio_rustls::TlsConnector::from(self.tls.clone());
        let tls = connector
            .connect(name, tcp)
            .await
            .with_context(|| format!("TLS handshake with {address}"))?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(sender)
    }

    /// Sends one request on an open connection.
    async fn send_on(
        &self,
        sender: &mut Sender,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<(Bytes, &str)>,
    ) -> anyhow::Result<Reply> {
        let host = &self.connection.host;
        let separator = if path.contains('?') { '&' } else { '?' };
        let uri = format!("{path}{separator}api-version={API_VERSION}");
        let (payload, content_type) = match body {
            Some((bytes, content_type)) => (bytes, Some(content_type)),
            None => (Bytes::new(), None),
        };
        let mut request = Request::builder()
            .method(method)
            .uri(uri)
            .header("host", host.as_str())
            .header("authorization", self.connection.token(TOKEN_TTL_SECS)?)
            .header("accept", "application/json");
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = sender
            .send_request(request.body(Full::new(payload))?)
            .await?;
        let status = response.status();
        let continuation = response
            .headers()
            .get("x-ms-continuation")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let headers = response.headers().clone();
        let body = response.into_body().collect().await?.to_bytes();
        Ok(Reply {
            status,
            continuation,
            headers,
            body,
        })
    }
}

impl ServiceClient {
    /// Every device (up to `limit`), following the hub's continuation header page by page.
    pub fn list_devices(&self, limit: Option<usize>) -> anyhow::Result<Vec<serde_json::Value>> {
        let mut all = Vec::new();
        let mut continuation: Option<String> = None;
        loop {
            let headers: Vec<(&str, &str)> = continuation
                .as_deref()
                .map(|c| vec![("x-ms-continuation", c)])
                .unwrap_or_default();
            let reply = self.request(Method::GET, "/devices?top=1000", &headers, None)?;
            continuation = reply.continuation.clone();
            if let serde_json::Value::Array(page) = reply.success()? {
                all.extend(page);
            }
            if let Some(limit) = limit.filter(|l| all.len() >= *l) {
                all.truncate(limit);
                return Ok(all);
            }
            if continuation.is_none() {
                return Ok(all);
            }
        }
    }
}

/// Percent-encodes an id for a path segment, as msrest does.
pub fn segment(id: &str) -> String {
    sas::quote(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_service_connection_strings() {
        let cs: ServiceConnectionString =
            "HostName=localhost:8443;SharedAccessKeyName=iothubowner;SharedAccessKey=AAAA"
                .parse()
                .unwrap();
        assert_eq!(cs.host, "localhost:8443");
        assert_eq!(cs.hostname(), "localhost");
        assert_eq!(cs.policy, "iothubowner");
        assert!("HostName=x;SharedAccessKey=AAAA"
            .parse::<ServiceConnectionString>()
            .is_err());
        assert!("HostName=x;SharedAccessKeyName=p;SharedAccessKey=!"
            .parse::<ServiceConnectionString>()
            .is_err());
    }
}
