//! `webhook` endpoints: each batch of up to `maxBatchSize` records of one partition is POSTed
//! as a JSON array (Azure's record encoding) with `Content-Type: application/json` and the
//! headers `x-ingot-endpoint`, `x-ingot-partition`, `x-ingot-first-offset` and
//! `x-ingot-last-offset` (a receiver dedupes on partition and offset: delivery is at least once).
//!
//! One batch is in flight per partition, so each device's messages arrive in order. A 2xx
//! answer acknowledges the batch. Connection errors, timeouts (`timeoutMs` for connect, send and
//! answer), 408, 429 and 5xx are retried after `initialBackoffMs`, doubling up to `maxBackoffMs`,
//! each delay jittered to between half and all of it; after `maxDeliveryAttempts` attempts, or at
//! once on any other answer (other 4xx, 3xx), the batch is dead-lettered: written with the
//! reason to `data_dir/endpoints/NAME/deadletter/pNNNN-FIRST-LAST.jsonl` (one line per record),
//! and delivery goes on after it. Dead-letter files are deleted once retention has deleted
//! their records from the endpoint's log, so they take no more room than the log's retention.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use rand::Rng;
use rustls::pki_types::ServerName;

use super::partition::{Base, Item, Tail, ERROR_WAIT};
use crate::config::{
    EndpointConfig, WEBHOOK_ATTEMPTS_DEFAULT, WEBHOOK_BATCH_DEFAULT,
    WEBHOOK_INITIAL_BACKOFF_MS_DEFAULT, WEBHOOK_MAX_BACKOFF_MS_DEFAULT, WEBHOOK_TIMEOUT_MS_DEFAULT,
};
use ingot_engine::store::Offset;

/// Bytes of JSON read ahead per batch at most (a batch has at least one record).
const BATCH_BYTES_MAX: usize = 4 << 20;
/// Bytes of a receiver's answer read at most (the answer is not used beyond its status).
const ANSWER_BYTES_MAX: usize = 64 << 10;
/// Where dead-lettered batches go, inside the endpoint's log directory.
pub const DEADLETTER_DIR: &str = "deadletter";

/// A `webhook` endpoint's settings, defaults applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookSettings {
    pub url: String,
    pub max_batch_size: usize,
    pub max_delivery_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    pub timeout: Duration,
    pub ca_file: Option<PathBuf>,
}

impl WebhookSettings {
    pub fn from_config(endpoint: &EndpointConfig) -> anyhow::Result<WebhookSettings> {
        let url = endpoint
            .url
            .clone()
            .ok_or_else(|| anyhow!("endpoint '{}' has no url", endpoint.name))?;
        let ms = Duration::from_millis;
        Ok(WebhookSettings {
            url,
            max_batch_size: endpoint.max_batch_size.unwrap_or(WEBHOOK_BATCH_DEFAULT) as usize,
            max_delivery_attempts: endpoint
                .max_delivery_attempts
                .unwrap_or(WEBHOOK_ATTEMPTS_DEFAULT),
            initial_backoff: ms(endpoint
                .initial_backoff_ms
                .unwrap_or(WEBHOOK_INITIAL_BACKOFF_MS_DEFAULT)),
            max_backoff: ms(endpoint
                .max_backoff_ms
                .unwrap_or(WEBHOOK_MAX_BACKOFF_MS_DEFAULT)),
            timeout: ms(endpoint.timeout_ms.unwrap_or(WEBHOOK_TIMEOUT_MS_DEFAULT)),
            ca_file: endpoint.ca_file.clone(),
        })
    }
}

/// The delay before retry number `retry` (1 for the first): `initial` doubled `retry - 1`
/// times, capped at `max`, then jittered to a uniform draw between half of it and all of it.
pub fn backoff_delay(
    initial: Duration,
    max: Duration,
    retry: u32,
    jitter: &mut impl Rng,
) -> Duration {
    let factor = 1u32
        .checked_shl(retry.saturating_sub(1))
        .unwrap_or(u32::MAX);
    let full = initial.saturating_mul(factor).min(max);
    let half = full / 2;
    half + (full - half).mul_f64(jitter.gen_range(0.0..=1.0))
}

/// Where a webhook POSTs, parsed once.
pub(crate) struct Target {
    host: String,
    port: u16,
    authority: String,
    path: String,
    tls: Option<tokio_rustls::TlsConnector>,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("authority", &self.authority)
            .field("path", &self.path)
            .field("https", &self.tls.is_some())
            .finish()
    }
}

impl Target {
    pub fn parse(url: &str, tls: Arc<rustls::ClientConfig>) -> anyhow::Result<Target> {
        let uri: Uri = url
            .parse()
            .with_context(|| format!("{url:?} is not a URL"))?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => bail!("{url:?} is not an http:// or https:// URL"),
        };
        let authority = uri
            .authority()
            .ok_or_else(|| anyhow!("{url:?} has no host"))?;
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        Ok(Target {
            host: host.to_owned(),
            port: authority.port_u16().unwrap_or(if https { 443 } else { 80 }),
            authority: authority.as_str().to_owned(),
            path: uri
                .path_and_query()
                .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned()),
            tls: https.then(|| tokio_rustls::TlsConnector::from(tls)),
        })
    }
}

/// A kept-alive connection to the receiver, reopened after any failure.
struct Connection {
    target: Arc<Target>,
    sender: Option<SendRequest<Full<Bytes>>>,
}

/// How one attempt went.
enum Attempt {
    Acknowledged,
    /// Worth another attempt (connection error, timeout, 408, 429, 5xx).
    Retry(String),
    /// Never worth another attempt (another 4xx, 3xx, 1xx).
    Refused(String),
}

impl Connection {
    async fn open(&self) -> anyhow::Result<SendRequest<Full<Bytes>>> {
        let target = &self.target;
        let tcp = tokio::net::TcpStream::connect((target.host.as_str(), target.port))
            .await
            .with_context(|| format!("connect to {}", target.authority))?;
        tcp.set_nodelay(true)?;
        match &target.tls {
            Some(connector) => {
                let name = ServerName::try_from(target.host.clone())
                    .with_context(|| format!("{} is not a valid server name", target.host))?;
                let tls = connector
                    .connect(name, tcp)
                    .await
                    .with_context(|| format!("TLS handshake with {}", target.authority))?;
                let (sender, connection) =
                    hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
                tokio::spawn(async move {
                    let _ = connection.await;
                });
                Ok(sender)
            }
            None => {
                let (sender, connection) =
                    hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
                tokio::spawn(async move {
                    let _ = connection.await;
                });
                Ok(sender)
            }
        }
    }

    async fn post(
        &mut self,
        body: Bytes,
        headers: &[(&str, String)],
    ) -> anyhow::Result<StatusCode> {
        let mut sender = match self.sender.take() {
            Some(sender) if !sender.is_closed() => sender,
            _ => self.open().await?,
        };
        sender.ready().await?;
        let mut request = Request::post(self.target.path.as_str())
            .header("host", self.target.authority.as_str())
            .header("content-type", "application/json")
            .header("user-agent", concat!("ingot/", env!("CARGO_PKG_VERSION")));
        for (name, value) in headers {
            request = request.header(*name, value.as_str());
        }
        let response = sender.send_request(request.body(Full::new(body))?).await?;
        let status = response.status();
        // Read the answer so the connection can carry the next request; a huge one is cut off
        // and the connection dropped.
        let complete = Limited::new(response.into_body(), ANSWER_BYTES_MAX)
            .collect()
            .await
            .is_ok();
        if complete {
            self.sender = Some(sender);
        }
        Ok(status)
    }

    async fn attempt(
        &mut self,
        body: Bytes,
        headers: &[(&str, String)],
        timeout: Duration,
    ) -> Attempt {
        // A kept-alive connection the receiver closed while it was idle fails the request
        // that finds it so: that is no failure of the receiver, so try once more on a new
        // connection at once (the receiver may see the batch twice: at least once anyway).
        let reused = self.sender.as_ref().is_some_and(|s| !s.is_closed());
        if reused {
            match tokio::time::timeout(timeout, self.post(body.clone(), headers)).await {
                Ok(Err(_)) => self.sender = None,
                result => return self.outcome(result, timeout),
            }
        }
        let result = tokio::time::timeout(timeout, self.post(body, headers)).await;
        self.outcome(result, timeout)
    }

    fn outcome(
        &mut self,
        result: Result<anyhow::Result<StatusCode>, tokio::time::error::Elapsed>,
        timeout: Duration,
    ) -> Attempt {
        match result {
            Err(_) => {
                self.sender = None;
                Attempt::Retry(format!("no answer within {} ms", timeout.as_millis()))
            }
            Ok(Err(e)) => {
                self.sender = None;
                Attempt::Retry(format!("{e:#}"))
            }
            Ok(Ok(status)) if status.is_success() => Attempt::Acknowledged,
            Ok(Ok(status))
                if status == StatusCode::REQUEST_TIMEOUT
                    || status == StatusCode::TOO_MANY_REQUESTS
                    || status.is_server_error() =>
            {
                Attempt::Retry(format!("the receiver answered {status}"))
            }
            Ok(Ok(status)) => Attempt::Refused(format!("the receiver answered {status}")),
        }
    }
}

/// What became of a batch.
enum Outcome {
    Delivered,
    DeadLetter(String),
    Stopped,
}

pub(crate) async fn run(base: Base, settings: WebhookSettings, target: Arc<Target>) {
    let Some(mut tail) = Tail::open(base).await else {
        return;
    };
    let mut connection = Connection {
        target,
        sender: None,
    };
    let deadletter = tail.base.dir.join(DEADLETTER_DIR);
    loop {
        if tail.stopping() {
            return;
        }
        let items = tail.read(settings.max_batch_size, BATCH_BYTES_MAX);
        let (Some(first), Some(last)) = (items.first(), items.last()) else {
            tail.idle(Duration::MAX).await;
            continue;
        };
        tail.busy();
        let (first, last) = (first.offset, last.offset);
        let outcome = deliver(&mut tail, &mut connection, &settings, &items, first, last).await;
        let count = items.len() as u64;
        match outcome {
            Outcome::Stopped => return,
            Outcome::Delivered => tail.base.counters.delivered(count),
            Outcome::DeadLetter(reason) => {
                tracing::warn!(endpoint = %tail.base.endpoint, partition = tail.base.id.0,
                    first = first.0, last = last.0, "dead-lettering {count} messages: {reason}");
                loop {
                    let written = write_deadletter(&deadletter, tail.base.id.0, &items, &reason);
                    match written {
                        Ok(()) => break,
                        Err(e) => {
                            tracing::warn!(endpoint = %tail.base.endpoint, "cannot write the dead-letter file: {e:#}");
                            if super::partition::stop_or_sleep(&mut tail.base.stop, ERROR_WAIT)
                                .await
                            {
                                return;
                            }
                        }
                    }
                }
                tail.base.counters.dead_lettered(count);
                if let Some(start) = tail.log_start() {
                    prune_deadletter(&deadletter, tail.base.id.0, start);
                }
            }
        }
        while let Err(e) = tail.commit(Offset(last.0 + 1)).await {
            tracing::warn!(endpoint = %tail.base.endpoint, "cannot store the delivery checkpoint: {e:#}");
            if super::partition::stop_or_sleep(&mut tail.base.stop, ERROR_WAIT).await {
                return;
            }
        }
    }
}

async fn deliver(
    tail: &mut Tail,
    connection: &mut Connection,
    settings: &WebhookSettings,
    items: &[Item],
    first: Offset,
    last: Offset,
) -> Outcome {
    let mut body = Vec::with_capacity(items.iter().map(|i| i.json.len() + 1).sum::<usize>() + 2);
    body.push(b'[');
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(&item.json);
    }
    body.push(b']');
    let body = Bytes::from(body);
    let headers = [
        ("x-ingot-endpoint", tail.base.endpoint.clone()),
        ("x-ingot-partition", tail.base.id.0.to_string()),
        ("x-ingot-first-offset", first.0.to_string()),
        ("x-ingot-last-offset", last.0.to_string()),
    ];
    let mut attempt = 1;
    loop {
        let result = tokio::select! {
            result = connection.attempt(body.clone(), &headers, settings.timeout) => result,
            _ = tail.base.stop.changed() => return Outcome::Stopped,
        };
        match result {
            Attempt::Acknowledged => return Outcome::Delivered,
            Attempt::Refused(reason) => return Outcome::DeadLetter(reason),
            Attempt::Retry(reason) if attempt >= settings.max_delivery_attempts => {
                return Outcome::DeadLetter(format!(
                    "{attempt} attempts failed, the last: {reason}"
                ))
            }
            Attempt::Retry(reason) => {
                tracing::debug!(endpoint = %tail.base.endpoint, partition = tail.base.id.0, attempt, "webhook delivery failed: {reason}");
                tail.base.counters.retried();
                let delay = backoff_delay(
                    settings.initial_backoff,
                    settings.max_backoff,
                    attempt,
                    &mut rand::thread_rng(),
                );
                if super::partition::stop_or_sleep(&mut tail.base.stop, delay).await {
                    return Outcome::Stopped;
                }
                attempt += 1;
            }
        }
    }
}

fn deadletter_name(partition: u32, first: Offset, last: Offset) -> String {
    format!("p{partition:04}-{:020}-{:020}.jsonl", first.0, last.0)
}

/// Writes a dead-lettered batch atomically: one line per record,
/// `{"reason":...,"partition":P,"offset":O,"record":{...}}`.
fn write_deadletter(
    dir: &Path,
    partition: u32,
    items: &[Item],
    reason: &str,
) -> anyhow::Result<()> {
    let (Some(first), Some(last)) = (items.first(), items.last()) else {
        return Ok(());
    };
    crate::fsutil::create_private_dir(dir)?;
    let reason = serde_json::to_string(reason)?;
    let mut out = Vec::new();
    for item in items {
        out.extend_from_slice(
            format!(
                "{{\"reason\":{reason},\"partition\":{partition},\"offset\":{},\"record\":",
                item.offset.0
            )
            .as_bytes(),
        );
        out.extend_from_slice(&item.json);
        out.extend_from_slice(b"}\n");
    }
    let path: PathBuf = dir.join(deadletter_name(partition, first.offset, last.offset));
    crate::fsutil::write_atomic(&path, &out, true)?;
    Ok(())
}

/// Deletes this partition's dead-letter files whose records the log no longer holds.
fn prune_deadletter(dir: &Path, partition: u32, log_start: Offset) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let prefix = format!("p{partition:04}-");
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(rest) = name
            .strip_prefix(&prefix)
            .and_then(|r| r.strip_suffix(".jsonl"))
        else {
            continue;
        };
        let last = rest.split('-').nth(1).and_then(|l| l.parse::<u64>().ok());
        if last.is_some_and(|last| last < log_start.0) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn backoff_doubles_up_to_the_cap_with_jitter() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let ms = Duration::from_millis;
        for retry in 1..=40 {
            let full = ms(100 * (1u64 << (retry - 1).min(20))).min(ms(5000));
            for _ in 0..50 {
                let d = backoff_delay(ms(100), ms(5000), retry, &mut rng);
                assert!(
                    d >= full / 2 && d <= full,
                    "retry {retry}: {d:?} vs {full:?}"
                );
            }
        }
        // The jitter spreads the delays.
        let delays: std::collections::BTreeSet<Duration> = (0..20)
            .map(|_| backoff_delay(ms(1000), ms(1000), 1, &mut rng))
            .collect();
        assert!(delays.len() > 10);
    }

    #[test]
    fn dead_letter_files_hold_the_batch_and_are_pruned_with_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let dl = dir.path().join(DEADLETTER_DIR);
        let items = |range: std::ops::Range<u64>| -> Vec<Item> {
            range
                .map(|o| Item {
                    offset: Offset(o),
                    json: format!("{{\"Body\":{o}}}").into_bytes(),
                })
                .collect()
        };
        write_deadletter(&dl, 1, &items(3..5), "the receiver answered 400").unwrap();
        write_deadletter(&dl, 1, &items(10..12), "x").unwrap();
        write_deadletter(&dl, 2, &items(0..1), "y").unwrap();
        let text =
            std::fs::read_to_string(dl.join(deadletter_name(1, Offset(3), Offset(4)))).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[1]["reason"], "the receiver answered 400");
        assert_eq!(lines[1]["offset"], 4);
        assert_eq!(lines[1]["record"]["Body"], 4);
        prune_deadletter(&dl, 1, Offset(5));
        let mut left: Vec<String> = std::fs::read_dir(&dl)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                deadletter_name(1, Offset(10), Offset(11)),
                deadletter_name(2, Offset(0), Offset(0))
            ]
        );
    }

    #[test]
    fn targets_parse_with_default_ports() {
        let tls = Arc::new(crate::tls::client_config(None).unwrap());
        let t = Target::parse("http://127.0.0.1:8080/hook?x=1", tls.clone()).unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.path.as_str()),
            ("127.0.0.1", 8080, "/hook?x=1")
        );
        assert!(t.tls.is_none());
        let t = Target::parse("https://example.com", tls.clone()).unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.path.as_str()),
            ("example.com", 443, "/")
        );
        assert!(t.tls.is_some());
        assert!(Target::parse("ftp://x/", tls).is_err());
    }
}
