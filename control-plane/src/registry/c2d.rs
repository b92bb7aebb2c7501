//! Cloud-to-device queues and delivery feedback, in the registry's database.
//!
//! A device's queue is a key range `(device, lock token)` of the `c2d` table; lock tokens come
//! from one hub-wide counter, so the range is in enqueue order. A message leaves its queue when
//! the device completes it (MQTT PUBACK), when it expires, when it was delivered more often than
//! the maximum delivery count, or when the queue is purged; each of these records a feedback
//! entry when the message's ack mode asks for it (Azure's `iothub-ack`). Every change is one
//! transaction, so a message that `POST .../messages/deviceBound` acknowledged survives a crash,
//! and one the device completed is never delivered again.

use redb::{ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::{
    decode, encode, exists, meta_value, now_rfc3339, Registry, RegistryError, C2D, DEVICES, META,
};

/// Feedback records by sequence number.
pub(super) const FEEDBACK: TableDefinition<u64, &[u8]> = TableDefinition::new("c2d_feedback");

const META_C2D_SEQ: &str = "c2d_seq";
const META_FEEDBACK_SEQ: &str = "c2d_feedback_seq";

/// Azure's `iothub-ack`: which outcomes of a message produce feedback.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AckMode {
    #[default]
    None,
    /// Success only.
    Positive,
    /// Failures only: expired, delivery count exceeded, purged.
    Negative,
    /// Both.
    Full,
}

impl AckMode {
    pub fn parse(text: &str) -> Option<Self> {
        match text.to_ascii_lowercase().as_str() {
            "none" => Some(Self::None),
            "positive" => Some(Self::Positive),
            "negative" => Some(Self::Negative),
            "full" => Some(Self::Full),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Positive => "positive",
            Self::Negative => "negative",
            Self::Full => "full",
        }
    }

    fn wants(self, outcome: Outcome) -> bool {
        match outcome {
            Outcome::Success => matches!(self, Self::Positive | Self::Full),
            _ => matches!(self, Self::Negative | Self::Full),
        }
    }
}

/// How a message left its queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Success,
    Expired,
    DeliveryCountExceeded,
    Purged,
}

impl Outcome {
    /// Azure's feedback `statusCode` and `description`.
    fn status(self) -> (&'static str, &'static str) {
        match self {
            Self::Success => ("Success", "Success"),
            Self::Expired => ("Expired", "Message expired"),
            Self::DeliveryCountExceeded => (
                "DeliveryCountExceeded",
                "Message delivery count exceeded the maximum",
            ),
            Self::Purged => ("Purged", "Message purged from the device queue"),
        }
    }
}

/// What a back end sends: the message as the device will see it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct C2dSpec {
    pub message_id: String,
    pub correlation_id: Option<String>,
    pub user_id: Option<String>,
    pub content_type: Option<String>,
    pub content_encoding: Option<String>,
    pub ack: AckMode,
    /// Absolute expiry, Unix milliseconds.
    pub expiry_ms: u64,
    pub properties: Vec<(String, String)>,
    #[serde(with = "base64_bytes")]
    pub body: Vec<u8>,
}

/// A queued message: what was sent, and the queue's bookkeeping.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct C2dMessage {
    pub device_id: String,
    pub lock_token: u64,
    /// RFC 3339.
    pub enqueued_time: String,
    /// Times the message was sent to the device.
    pub delivery_count: u32,
    /// Stored flat: the record's JSON keys are those of both structs.
    #[serde(flatten)]
    pub content: C2dSpec,
}

/// A feedback record, in the shape of Azure's feedback batch entries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Feedback {
    pub original_message_id: String,
    pub device_id: String,
    pub device_generation_id: String,
    pub status_code: String,
    pub description: String,
    pub enqueued_time_utc: String,
}

/// Feedback records handed out together, completed together by their lock token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedbackBatch {
    pub records: Vec<Feedback>,
    /// Completing this token removes every record of the batch (and any older one).
    pub lock_token: Option<u64>,
}

mod base64_bytes {
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        STANDARD.decode(text).map_err(serde::de::Error::custom)
    }
}

type C2dTable<'t> = redb::Table<'t, (&'static str, u64), &'static [u8]>;

/// The tables a queue operation changes, open in one write transaction.
struct Queues<'t> {
    devices: redb::Table<'t, &'static str, &'static [u8]>,
    c2d: C2dTable<'t>,
    feedback: redb::Table<'t, u64, &'static [u8]>,
    meta: redb::Table<'t, &'static str, u64>,
}

/// The lock tokens of a device's queue, in order.
pub(super) fn lock_tokens(
    table: &impl ReadableTable<(&'static str, u64), &'static [u8]>,
    device_id: &str,
) -> Result<Vec<u64>, RegistryError> {
    let mut tokens = Vec::new();
    for entry in table.range((device_id, 0)..=(device_id, u64::MAX))? {
        let (key, _) = entry?;
        tokens.push(key.value().1);
    }
    Ok(tokens)
}

impl Queues<'_> {
    fn queue(&self, device_id: &str) -> Result<Vec<C2dMessage>, RegistryError> {
        let mut messages = Vec::new();
        for entry in self.c2d.range((device_id, 0)..=(device_id, u64::MAX))? {
            let (_, value) = entry?;
            messages.push(decode(value.value())?);
        }
        Ok(messages)
    }

    /// The device's generation id ("" once it is deleted), for feedback records.
    fn generation_of(&self, device_id: &str) -> Result<String, RegistryError> {
        Ok(match self.devices.get(device_id)? {
            Some(g) => decode::<super::Device>(g.value())?.generation_id,
            None => String::new(),
        })
    }

    /// Removes `message` from its queue, recording feedback when its ack mode asks for it.
    fn finish(&mut self, message: &C2dMessage, outcome: Outcome) -> Result<(), RegistryError> {
        self.c2d
            .remove((message.device_id.as_str(), message.lock_token))?;
        if message.content.ack.wants(outcome) {
            let (status_code, description) = outcome.status();
            let record = Feedback {
                original_message_id: message.content.message_id.clone(),
                device_id: message.device_id.clone(),
                device_generation_id: self.generation_of(&message.device_id)?,
                status_code: status_code.to_owned(),
                description: description.to_owned(),
                enqueued_time_utc: now_rfc3339(),
            };
            let seq = meta_value(&self.meta, META_FEEDBACK_SEQ)? + 1;
            self.meta.insert(META_FEEDBACK_SEQ, seq)?;
            self.feedback.insert(seq, encode(&record).as_slice())?;
        }
        Ok(())
    }

    /// Drops the expired messages of a queue (with feedback); returns the rest.
    fn sweep(&mut self, device_id: &str, now_ms: u64) -> Result<Vec<C2dMessage>, RegistryError> {
        let mut live = Vec::new();
        for message in self.queue(device_id)? {
            if message.content.expiry_ms <= now_ms {
                self.finish(&message, Outcome::Expired)?;
            } else {
                live.push(message);
            }
        }
        Ok(live)
    }
}

impl Registry {
    /// Runs `f` on the queue tables in one write transaction, committed when it succeeds.
    fn queues<T>(
        &self,
        f: impl FnOnce(&mut Queues<'_>) -> Result<T, RegistryError>,
    ) -> Result<T, RegistryError> {
        let txn = self.db.begin_write()?;
        let out = {
            let mut queues = Queues {
                devices: txn.open_table(DEVICES)?,
                c2d: txn.open_table(C2D)?,
                feedback: txn.open_table(FEEDBACK)?,
                meta: txn.open_table(META)?,
            };
            f(&mut queues)?
        };
        txn.commit()?;
        Ok(out)
    }

    /// Appends a message to a device's queue. Fails with `DeviceNotFound`, or `QueueFull` when
    /// the queue holds `limit` unexpired messages.
    pub fn c2d_enqueue(
        &self,
        device_id: &str,
        spec: C2dSpec,
        limit: usize,
        now_ms: u64,
    ) -> Result<C2dMessage, RegistryError> {
        self.queues(|q| {
            if !exists(&q.devices, device_id)? {
                return Err(RegistryError::DeviceNotFound);
            }
            if q.sweep(device_id, now_ms)?.len() >= limit {
                return Err(RegistryError::QueueFull);
            }
            let lock_token = meta_value(&q.meta, META_C2D_SEQ)? + 1;
            q.meta.insert(META_C2D_SEQ, lock_token)?;
            let message = C2dMessage {
                device_id: device_id.to_owned(),
                lock_token,
                enqueued_time: now_rfc3339(),
                delivery_count: 0,
                content: spec,
            };
            q.c2d
                .insert((device_id, lock_token), encode(&message).as_slice())?;
            Ok(message)
        })
    }

    /// The messages to deliver to a device now, in order, each counted as one more delivery.
    /// Expired messages, and those already delivered `max_deliveries` times without being
    /// completed, leave the queue with their feedback instead.
    pub fn c2d_take_for_delivery(
        &self,
        device_id: &str,
        max_deliveries: u32,
        now_ms: u64,
    ) -> Result<Vec<C2dMessage>, RegistryError> {
        self.queues(|q| {
            let mut deliver = Vec::new();
            for mut message in q.sweep(device_id, now_ms)? {
                if message.delivery_count >= max_deliveries {
                    q.finish(&message, Outcome::DeliveryCountExceeded)?;
                    continue;
                }
                message.delivery_count += 1;
                q.c2d
                    .insert((device_id, message.lock_token), encode(&message).as_slice())?;
                deliver.push(message);
            }
            Ok(deliver)
        })
    }

    /// Completes messages the devices acknowledged, in one transaction. Unknown lock tokens
    /// (already completed, purged or expired) are ignored.
    pub fn c2d_complete(&self, completed: &[(String, u64)]) -> Result<(), RegistryError> {
        self.queues(|q| {
            for (device_id, lock_token) in completed {
                let message: Option<C2dMessage> = q
                    .c2d
                    .get((device_id.as_str(), *lock_token))?
                    .map(|g| decode(g.value()))
                    .transpose()?;
                if let Some(message) = message {
                    q.finish(&message, Outcome::Success)?;
                }
            }
            Ok(())
        })
    }

    /// Empties a device's queue; returns how many messages it held.
    pub fn c2d_purge(&self, device_id: &str) -> Result<u64, RegistryError> {
        self.queues(|q| {
            if !exists(&q.devices, device_id)? {
                return Err(RegistryError::DeviceNotFound);
            }
            let messages = q.queue(device_id)?;
            for message in &messages {
                q.finish(message, Outcome::Purged)?;
            }
            Ok(messages.len() as u64)
        })
    }

    /// Messages in a device's queue (expired ones included until they are swept).
    pub fn c2d_count(&self, device_id: &str) -> Result<u64, RegistryError> {
        let txn = self.db.begin_read()?;
        let c2d = txn.open_table(C2D)?;
        Ok(lock_tokens(&c2d, device_id)?.len() as u64)
    }

    /// The oldest feedback records, up to `max`, with the token that completes them.
    pub fn feedback_batch(&self, max: usize) -> Result<FeedbackBatch, RegistryError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(FEEDBACK)?;
        let mut records = Vec::new();
        let mut lock_token = None;
        for entry in table.range::<u64>(..)?.take(max) {
            let (seq, value) = entry?;
            records.push(decode(value.value())?);
            lock_token = Some(seq.value());
        }
        Ok(FeedbackBatch {
            records,
            lock_token,
        })
    }

    /// Removes the feedback records of a batch (every record up to `lock_token`). Returns
    /// whether any was removed.
    pub fn feedback_complete(&self, lock_token: u64) -> Result<bool, RegistryError> {
        let txn = self.db.begin_write()?;
        let removed = {
            let mut table = txn.open_table(FEEDBACK)?;
            let mut seqs = Vec::new();
            for entry in table.range(..=lock_token)? {
                seqs.push(entry?.0.value());
            }
            for seq in &seqs {
                table.remove(*seq)?;
            }
            !seqs.is_empty()
        };
        txn.commit()?;
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{Authentication, DeviceSpec, Status};

    fn registry() -> (tempfile::TempDir, Registry) {
        let dir = tempfile::tempdir().unwrap();
        let registry = Registry::open(&dir.path().join("r.redb")).unwrap();
        registry
            .create_device(DeviceSpec {
                device_id: "d1".into(),
                status: Status::Enabled,
                status_reason: None,
                authentication: Authentication::None,
                iot_edge: false,
                parent_scopes: vec![],
            })
            .unwrap();
        (dir, registry)
    }

    fn spec(id: &str, ack: AckMode, expiry_ms: u64) -> C2dSpec {
        C2dSpec {
            message_id: id.into(),
            ack,
            expiry_ms,
            body: b"hi".to_vec(),
            ..C2dSpec::default()
        }
    }

    #[test]
    fn queue_is_bounded_ordered_and_completed_with_feedback() {
        let (_dir, r) = registry();
        for i in 0..3 {
            r.c2d_enqueue("d1", spec(&format!("m{i}"), AckMode::Full, 10_000), 3, 0)
                .unwrap();
        }
        assert!(matches!(
            r.c2d_enqueue("d1", spec("m3", AckMode::Full, 10_000), 3, 0),
            Err(RegistryError::QueueFull)
        ));
        assert!(matches!(
            r.c2d_enqueue("nope", spec("x", AckMode::None, 10_000), 3, 0),
            Err(RegistryError::DeviceNotFound)
        ));
        let batch = r.c2d_take_for_delivery("d1", 10, 0).unwrap();
        let ids: Vec<_> = batch
            .iter()
            .map(|m| m.content.message_id.as_str())
            .collect();
        assert_eq!(ids, ["m0", "m1", "m2"]);
        assert!(batch.iter().all(|m| m.delivery_count == 1));
        r.c2d_complete(&[("d1".into(), batch[1].lock_token)])
            .unwrap();
        assert_eq!(r.c2d_count("d1").unwrap(), 2);
        let feedback = r.feedback_batch(10).unwrap();
        assert_eq!(feedback.records.len(), 1);
        assert_eq!(feedback.records[0].original_message_id, "m1");
        assert_eq!(feedback.records[0].status_code, "Success");
        assert!(r.feedback_complete(feedback.lock_token.unwrap()).unwrap());
        assert!(r.feedback_batch(10).unwrap().records.is_empty());
    }

    #[test]
    fn expiry_and_delivery_count_drop_messages_with_negative_feedback() {
        let (_dir, r) = registry();
        r.c2d_enqueue("d1", spec("old", AckMode::Negative, 100), 50, 0)
            .unwrap();
        r.c2d_enqueue("d1", spec("quiet", AckMode::Positive, 100), 50, 0)
            .unwrap();
        r.c2d_enqueue("d1", spec("tried", AckMode::Full, 10_000), 50, 0)
            .unwrap();
        // After the expiry: the first two go; only the negative-ack one leaves feedback.
        assert_eq!(r.c2d_take_for_delivery("d1", 2, 200).unwrap().len(), 1);
        assert_eq!(r.c2d_take_for_delivery("d1", 2, 200).unwrap().len(), 1);
        assert!(r.c2d_take_for_delivery("d1", 2, 200).unwrap().is_empty());
        let codes: Vec<_> = r
            .feedback_batch(10)
            .unwrap()
            .records
            .into_iter()
            .map(|f| (f.original_message_id, f.status_code))
            .collect();
        assert_eq!(
            codes,
            [
                ("old".to_owned(), "Expired".to_owned()),
                ("tried".to_owned(), "DeliveryCountExceeded".to_owned())
            ]
        );
    }

    #[test]
    fn purge_and_device_delete_empty_the_queue() {
        let (_dir, r) = registry();
        r.c2d_enqueue("d1", spec("a", AckMode::Full, 10_000), 50, 0)
            .unwrap();
        r.c2d_enqueue("d1", spec("b", AckMode::None, 10_000), 50, 0)
            .unwrap();
        assert_eq!(r.c2d_purge("d1").unwrap(), 2);
        assert_eq!(r.c2d_count("d1").unwrap(), 0);
        assert_eq!(
            r.feedback_batch(10).unwrap().records[0].status_code,
            "Purged"
        );
        r.c2d_enqueue("d1", spec("c", AckMode::None, 10_000), 50, 0)
            .unwrap();
        r.delete_device("d1", &crate::registry::IfMatch::Any)
            .unwrap();
        assert_eq!(r.c2d_count("d1").unwrap(), 0);
    }
}
