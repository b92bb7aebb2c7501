//! The on-disk byte layout of segments and records (format version 1), as pure functions.
//!
//! This module is sans-IO: it encodes into and decodes from byte slices, so the exact layout in
//! `docs/storage-format.md` can be tested exhaustively (every truncation point, every bit flip)
//! without files. All integers are little-endian with explicit widths. Every decode treats its
//! input as untrusted: mapped bytes can be torn by a crash, damaged by the medium or written by
//! another program, so nothing here panics or trusts a length before checking it.
//!
//! The message itself is an rkyv 0.8 archive of [`MessageRef`] (rkyv's default features:
//! little-endian, aligned, 32-bit relative pointers). A reader validates it with bytecheck after
//! the record checksum matched, then reads it in place as an [`ArchivedMessage`].

use rkyv::boxed::{ArchivedBox, BoxResolver};
use rkyv::munge::munge;
use rkyv::rancor::{Error as RkyvError, Fallible, Strategy};
use rkyv::ser::sharing::Share;
use rkyv::ser::writer::Buffer;
use rkyv::ser::{Allocator, Serializer, Writer};
use rkyv::util::AlignedVec;
use rkyv::{Archive, Place, Serialize};
use xxhash_rust::xxh3::{xxh3_64, Xxh3};

use super::Offset;

/// The format version written into every segment header and every record header.
pub const FORMAT_VERSION: u16 = 1;
/// First bytes of every segment file.
pub const SEGMENT_MAGIC: [u8; 8] = *b"INGOTSEG";
/// Bytes of the segment header; the first record starts here.
pub const SEGMENT_HEADER_BYTES: usize = 64;
/// Bytes of a record header.
pub const RECORD_HEADER_BYTES: usize = 32;
/// Records start at multiples of this, so the rkyv payload (at record start + 32) is aligned for
/// every archived type the message uses (rkyv's `AlignedVec` alignment) when the segment is
/// mapped at a page boundary.
pub const RECORD_ALIGN_BYTES: usize = 16;
/// Largest rkyv payload of one record. A D2C message is at most 256 KiB of body and properties
/// (`limits::D2C_MESSAGE_BYTES_MAX`); the archive adds a few bytes per property, and twin or
/// lifecycle events are smaller, so 1 MiB leaves room without letting a damaged length field
/// send a reader far away.
pub const RECORD_PAYLOAD_BYTES_MAX: usize = 1024 * 1024;

const _: () = assert!(RECORD_ALIGN_BYTES.is_power_of_two());
const _: () = assert!(SEGMENT_HEADER_BYTES % RECORD_ALIGN_BYTES == 0);
const _: () = assert!(RECORD_HEADER_BYTES % RECORD_ALIGN_BYTES == 0);
const _: () = assert!(crate::limits::D2C_MESSAGE_BYTES_MAX * 2 < RECORD_PAYLOAD_BYTES_MAX);

/// Byte position of the payload length inside a record header: the word a writer stores last
/// (with release ordering) to publish a record, and a reader loads first (with acquire ordering).
pub const RECORD_LEN_POSITION: usize = 0;

/// The system property names the store and `ingot monitor-events` use. They are Azure IoT Hub's
/// own names as an Event Hubs consumer sees them (azure-protocol.md sections 2.3 and 7.4), not
/// the short MQTT wire keys (`$.ct`), which the MQTT layer translates before appending.
pub mod property_name {
    /// The authenticated device that sent the message (stamped by the hub, never by the device).
    pub const CONNECTION_DEVICE_ID: &str = "iothub-connection-device-id";
    /// The authenticated module that sent the message, absent for device messages.
    pub const CONNECTION_MODULE_ID: &str = "iothub-connection-module-id";
    /// Generation id of the identity that sent the message.
    pub const CONNECTION_AUTH_GENERATION_ID: &str = "iothub-connection-auth-generation-id";
    /// How the sender authenticated (a small JSON document, as in Azure).
    pub const CONNECTION_AUTH_METHOD: &str = "iothub-connection-auth-method";
    /// Enqueued time as the hub stamped it (the record header carries the same time in ms).
    pub const ENQUEUED_TIME: &str = "iothub-enqueuedtime";
    /// `Telemetry`, `twinChangeEvents`, `deviceLifecycleEvents`, `deviceConnectionStateEvents`.
    pub const MESSAGE_SOURCE: &str = "iothub-message-source";
    /// The device's message id (`$.mid`).
    pub const MESSAGE_ID: &str = "message-id";
    /// The device's correlation id (`$.cid`).
    pub const CORRELATION_ID: &str = "correlation-id";
    /// The device's user id (`$.uid`).
    pub const USER_ID: &str = "user-id";
    /// Content type of the body (`$.ct`); `application/json` makes the body JSON.
    pub const CONTENT_TYPE: &str = "content-type";
    /// Content encoding of the body (`$.ce`), for example `utf-8`.
    pub const CONTENT_ENCODING: &str = "content-encoding";
    /// Absolute expiry time (`$.exp`).
    pub const ABSOLUTE_EXPIRY_TIME: &str = "absolute-expiry-time";
    /// Interface id (`$.ifid`).
    pub const INTERFACE_ID: &str = "iothub-interface-id";
    /// Plug and Play model id from CONNECT.
    pub const DATA_SCHEMA: &str = "dt-dataschema";
    /// Plug and Play component name (`$.sub`).
    pub const SUBJECT: &str = "dt-subject";
}

/// One name/value property, borrowed from the caller (archived as two boxed strings).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PropertyRef<'a> {
    pub name: &'a str,
    pub value: &'a str,
}

/// A message to append, borrowed from the caller so the hot path builds no owned copy of it.
/// The archived form, [`ArchivedMessage`], is what readers see in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageRef<'a> {
    /// Properties stamped by the hub or carried as `$.` keys; see [`property_name`].
    pub system_properties: &'a [PropertyRef<'a>],
    /// The application's own properties, in the order the device sent them.
    pub application_properties: &'a [PropertyRef<'a>],
    /// The body, as opaque bytes.
    pub body: &'a [u8],
}

/// The archived form of [`PropertyRef`], read in place.
#[derive(Debug, rkyv::Portable, rkyv::bytecheck::CheckBytes)]
#[bytecheck(crate = rkyv::bytecheck)]
#[repr(C)]
pub struct ArchivedProperty {
    name: ArchivedBox<str>,
    value: ArchivedBox<str>,
}

/// The archived form of [`MessageRef`], read in place: three relative pointers (8 bytes each
/// with rkyv's default 32-bit pointers) to the property arrays and the body.
#[derive(Debug, rkyv::Portable, rkyv::bytecheck::CheckBytes)]
#[bytecheck(crate = rkyv::bytecheck)]
#[repr(C)]
pub struct ArchivedMessage {
    system_properties: ArchivedBox<[ArchivedProperty]>,
    application_properties: ArchivedBox<[ArchivedProperty]>,
    body: ArchivedBox<[u8]>,
}

/// Bytes of the archived root; a change means rkyv's pointer width or layout changed, which
/// is a format change (see `docs/storage-format.md`).
pub const ARCHIVED_MESSAGE_BYTES: usize = 24;
const _: () = assert!(std::mem::size_of::<ArchivedMessage>() == ARCHIVED_MESSAGE_BYTES);
const _: () = assert!(std::mem::size_of::<ArchivedProperty>() == 16);

// Hand-written instead of derived so that the archived types carry no lifetime parameter:
// readers name `ArchivedMessage`, not `ArchivedMessage<'static>`.
impl Archive for PropertyRef<'_> {
    type Archived = ArchivedProperty;
    type Resolver = (BoxResolver, BoxResolver);

    fn resolve(&self, resolver: Self::Resolver, out: Place<Self::Archived>) {
        munge!(let ArchivedProperty { name, value } = out);
        ArchivedBox::resolve_from_ref(self.name, resolver.0, name);
        ArchivedBox::resolve_from_ref(self.value, resolver.1, value);
    }
}

impl<S: Fallible + Writer + ?Sized> Serialize<S> for PropertyRef<'_> {
    fn serialize(&self, serializer: &mut S) -> Result<Self::Resolver, S::Error> {
        Ok((
            ArchivedBox::serialize_from_ref(self.name, serializer)?,
            ArchivedBox::serialize_from_ref(self.value, serializer)?,
        ))
    }
}

impl Archive for MessageRef<'_> {
    type Archived = ArchivedMessage;
    type Resolver = (BoxResolver, BoxResolver, BoxResolver);

    fn resolve(&self, resolver: Self::Resolver, out: Place<Self::Archived>) {
        munge!(let ArchivedMessage { system_properties, application_properties, body } = out);
        ArchivedBox::resolve_from_ref(self.system_properties, resolver.0, system_properties);
        ArchivedBox::resolve_from_ref(
            self.application_properties,
            resolver.1,
            application_properties,
        );
        ArchivedBox::resolve_from_ref(self.body, resolver.2, body);
    }
}

impl<S: Fallible + Writer + Allocator + ?Sized> Serialize<S> for MessageRef<'_> {
    fn serialize(&self, serializer: &mut S) -> Result<Self::Resolver, S::Error> {
        Ok((
            ArchivedBox::serialize_from_ref(self.system_properties, serializer)?,
            ArchivedBox::serialize_from_ref(self.application_properties, serializer)?,
            ArchivedBox::serialize_from_ref(self.body, serializer)?,
        ))
    }
}

impl ArchivedProperty {
    /// The property name.
    pub fn name(&self) -> &str {
        self.name.get()
    }

    /// The property value.
    pub fn value(&self) -> &str {
        self.value.get()
    }
}

impl ArchivedMessage {
    /// The system properties, in the order they were appended.
    pub fn system_properties(&self) -> &[ArchivedProperty] {
        self.system_properties.get()
    }

    /// The application properties, in the order they were appended.
    pub fn application_properties(&self) -> &[ArchivedProperty] {
        self.application_properties.get()
    }

    /// The body bytes, in place.
    pub fn body(&self) -> &[u8] {
        self.body.get()
    }

    /// The value of the first system property called `name`.
    pub fn system_property(&self, name: &str) -> Option<&str> {
        find(self.system_properties(), name)
    }

    /// The value of the first application property called `name`.
    pub fn application_property(&self, name: &str) -> Option<&str> {
        find(self.application_properties(), name)
    }
}

fn find<'a>(properties: &'a [ArchivedProperty], name: &str) -> Option<&'a str> {
    properties
        .iter()
        .find(|p| p.name() == name)
        .map(|p| p.value())
}

/// Why bytes are not a valid record or segment header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FormatError {
    #[error("no record here (zero length): the end of the written data")]
    Empty,
    #[error("the record is cut short: {needed} bytes needed, {available} available")]
    Truncated { needed: usize, available: usize },
    #[error("the record length {0} is larger than the maximum")]
    TooLong(u32),
    #[error("unknown format version {0}")]
    Version(u16),
    #[error("the checksum does not match")]
    Checksum,
    #[error("the segment header magic is wrong")]
    Magic,
    #[error("the archived message does not validate")]
    Archive,
}

/// The fixed record header, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    pub payload_len: u32,
    pub offset: Offset,
    pub enqueued_time_ms: u64,
    pub checksum: u64,
}

impl RecordHeader {
    /// Bytes the record occupies in the segment, header and padding included.
    pub fn record_bytes(&self) -> usize {
        record_bytes(self.payload_len as usize)
    }
}

/// Bytes a record with `payload_len` bytes of payload occupies, header and padding included.
pub const fn record_bytes(payload_len: usize) -> usize {
    RECORD_HEADER_BYTES + payload_len.next_multiple_of(RECORD_ALIGN_BYTES)
}

fn u16_at(bytes: &[u8], pos: usize) -> u16 {
    let mut word = [0u8; 2];
    word.copy_from_slice(&bytes[pos..pos + 2]);
    u16::from_le_bytes(word)
}

fn u32_at(bytes: &[u8], pos: usize) -> u32 {
    let mut word = [0u8; 4];
    word.copy_from_slice(&bytes[pos..pos + 4]);
    u32::from_le_bytes(word)
}

fn u64_at(bytes: &[u8], pos: usize) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[pos..pos + 8]);
    u64::from_le_bytes(word)
}

/// The record checksum: xxh3_64 (seed 0) of header bytes 0..24 followed by the payload.
pub fn record_checksum(header_prefix: &[u8; 24], payload: &[u8]) -> u64 {
    let mut hasher = Xxh3::new();
    hasher.update(header_prefix);
    hasher.update(payload);
    hasher.digest()
}

fn header_prefix(payload_len: u32, offset: Offset, enqueued_time_ms: u64) -> [u8; 24] {
    let mut prefix = [0u8; 24];
    prefix[0..4].copy_from_slice(&payload_len.to_le_bytes());
    prefix[4..6].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    // Bytes 6..8 are flags, zero in version 1.
    prefix[8..16].copy_from_slice(&offset.0.to_le_bytes());
    prefix[16..24].copy_from_slice(&enqueued_time_ms.to_le_bytes());
    prefix
}

/// Writes a record (header, payload, zero padding) into `out`, which must be exactly
/// `record_bytes(payload.len())` long, except its length word (bytes 0..4, left untouched), and
/// returns that word. The caller stores it last, with release ordering, to publish the record
/// to concurrent readers (see `mmap::WriteMap::publish_u32`).
pub fn encode_record(out: &mut [u8], offset: Offset, enqueued_time_ms: u64, payload: &[u8]) -> u32 {
    assert_eq!(out.len(), record_bytes(payload.len()));
    out[RECORD_HEADER_BYTES..RECORD_HEADER_BYTES + payload.len()].copy_from_slice(payload);
    seal_record(out, offset, enqueued_time_ms, payload.len())
}

/// Like [`encode_record`] for a payload already in place at `out[32..32 + payload_len]` (the
/// append path archives straight into the mapping): writes the header except its length word
/// and the zero padding, and returns the length word.
pub fn seal_record(
    out: &mut [u8],
    offset: Offset,
    enqueued_time_ms: u64,
    payload_len: usize,
) -> u32 {
    assert_eq!(out.len(), record_bytes(payload_len));
    assert!(payload_len > 0);
    assert!(payload_len <= RECORD_PAYLOAD_BYTES_MAX);
    let len_word = payload_len as u32;
    let prefix = header_prefix(len_word, offset, enqueued_time_ms);
    let end = RECORD_HEADER_BYTES + payload_len;
    // The checksum covers header bytes 0..24 and then the payload, which the checksum field
    // separates. Lay those 24 bytes out right before the payload (over bytes 8..32, which are
    // written for real just below), so that one call hashes one contiguous run: the streaming
    // hasher that `record_checksum` uses costs several times more (it was a fifth of the
    // shard's time at 1 KiB messages). The length word (bytes 0..4) is not touched, so nothing
    // of this is visible to a reader.
    out[8..RECORD_HEADER_BYTES].copy_from_slice(&prefix);
    let checksum = xxh3_64(&out[8..end]);
    debug_assert_eq!(
        checksum,
        record_checksum(&prefix, &out[RECORD_HEADER_BYTES..end])
    );
    out[4..24].copy_from_slice(&prefix[4..]);
    out[24..32].copy_from_slice(&checksum.to_le_bytes());
    out[end..].fill(0);
    len_word
}

/// Decodes the header at the start of `bytes` without looking at the payload: what a scanner
/// needs to step from record to record. Checks length bounds and version, not the checksum,
/// and that `bytes` holds the whole record.
pub fn decode_record_header(bytes: &[u8]) -> Result<RecordHeader, FormatError> {
    let header = decode_record_header_only(bytes)?;
    let needed = header.record_bytes();
    if bytes.len() < needed {
        return Err(FormatError::Truncated {
            needed,
            available: bytes.len(),
        });
    }
    Ok(header)
}

/// Like [`decode_record_header`], for the 32 header bytes alone.
pub fn decode_record_header_only(bytes: &[u8]) -> Result<RecordHeader, FormatError> {
    if bytes.len() < RECORD_HEADER_BYTES {
        if bytes.len() >= 4 && u32_at(bytes, 0) == 0 {
            return Err(FormatError::Empty);
        }
        return Err(FormatError::Truncated {
            needed: RECORD_HEADER_BYTES,
            available: bytes.len(),
        });
    }
    let payload_len = u32_at(bytes, 0);
    if payload_len == 0 {
        return Err(FormatError::Empty);
    }
    if payload_len as usize > RECORD_PAYLOAD_BYTES_MAX {
        return Err(FormatError::TooLong(payload_len));
    }
    let version = u16_at(bytes, 4);
    if version != FORMAT_VERSION {
        return Err(FormatError::Version(version));
    }
    Ok(RecordHeader {
        payload_len,
        offset: Offset(u64_at(bytes, 8)),
        enqueued_time_ms: u64_at(bytes, 16),
        checksum: u64_at(bytes, 24),
    })
}

/// Decodes the record at the start of `bytes` and verifies its checksum (but not the archive):
/// returns the header and the payload slice. The checksum comes first because rkyv validation
/// of garbage costs more and proves less.
pub fn decode_record(bytes: &[u8]) -> Result<(RecordHeader, &[u8]), FormatError> {
    let header = decode_record_header(bytes)?;
    let end = RECORD_HEADER_BYTES + header.payload_len as usize;
    let payload = &bytes[RECORD_HEADER_BYTES..end];
    let mut prefix = [0u8; 24];
    prefix.copy_from_slice(&bytes[..24]);
    if record_checksum(&prefix, payload) != header.checksum {
        return Err(FormatError::Checksum);
    }
    Ok((header, payload))
}

/// Validates an rkyv payload (bytecheck) and returns the archived message in place. `payload`
/// must start at a 16-byte aligned address, which segment positions guarantee.
pub fn access_message(payload: &[u8]) -> Result<&ArchivedMessage, FormatError> {
    rkyv::access::<ArchivedMessage, RkyvError>(payload).map_err(|_| FormatError::Archive)
}

/// A reusable serializer for [`MessageRef`]: one aligned scratch buffer, reused across records
/// so that steady-state appends do not allocate.
#[derive(Default)]
pub struct MessageEncoder {
    scratch: AlignedVec,
    arena: rkyv::ser::allocator::Arena,
}

impl std::fmt::Debug for MessageEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MessageEncoder")
            .field("scratch_bytes", &self.scratch.capacity())
            .finish()
    }
}

impl MessageEncoder {
    /// Archives `message` and returns the payload bytes, valid until the next call.
    pub fn encode(&mut self, message: &MessageRef<'_>) -> Result<&[u8], FormatError> {
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.clear();
        let mut serializer = Serializer::new(scratch, self.arena.acquire(), Share::new());
        let result = rkyv::api::serialize_using::<_, RkyvError>(
            message,
            Strategy::<_, RkyvError>::wrap(&mut serializer),
        );
        self.scratch = serializer.into_writer();
        result.map_err(|_| FormatError::Archive)?;
        Ok(&self.scratch)
    }

    /// Archives `message` straight into `out` (which must start 16-byte aligned, as a record
    /// payload in a mapped segment does) and returns the payload length: one copy of the body
    /// instead of two. Fails if `out` is too small.
    pub fn encode_into(
        &mut self,
        message: &MessageRef<'_>,
        out: &mut [u8],
    ) -> Result<usize, FormatError> {
        let mut serializer = Serializer::new(Buffer::from(out), self.arena.acquire(), Share::new());
        rkyv::api::serialize_using::<_, RkyvError>(
            message,
            Strategy::<_, RkyvError>::wrap(&mut serializer),
        )
        .map_err(|_| FormatError::Archive)?;
        Ok(serializer.into_writer().len())
    }
}

/// The segment header, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    pub base_offset: Offset,
}

/// Writes the 64-byte segment header.
pub fn encode_segment_header(out: &mut [u8; SEGMENT_HEADER_BYTES], base_offset: Offset) {
    out.fill(0);
    out[0..8].copy_from_slice(&SEGMENT_MAGIC);
    out[8..12].copy_from_slice(&u32::from(FORMAT_VERSION).to_le_bytes());
    out[12..16].copy_from_slice(&(SEGMENT_HEADER_BYTES as u32).to_le_bytes());
    out[16..24].copy_from_slice(&base_offset.0.to_le_bytes());
    let checksum = xxh3_64(&out[0..24]);
    out[24..32].copy_from_slice(&checksum.to_le_bytes());
}

/// Decodes and checks a segment header.
pub fn decode_segment_header(bytes: &[u8]) -> Result<SegmentHeader, FormatError> {
    if bytes.len() < SEGMENT_HEADER_BYTES {
        return Err(FormatError::Truncated {
            needed: SEGMENT_HEADER_BYTES,
            available: bytes.len(),
        });
    }
    if bytes[0..8] != SEGMENT_MAGIC {
        if bytes[0..SEGMENT_HEADER_BYTES].iter().all(|&b| b == 0) {
            return Err(FormatError::Empty);
        }
        return Err(FormatError::Magic);
    }
    if xxh3_64(&bytes[0..24]) != u64_at(bytes, 24) {
        return Err(FormatError::Checksum);
    }
    let version = u32_at(bytes, 8);
    if version != u32::from(FORMAT_VERSION) || u32_at(bytes, 12) != SEGMENT_HEADER_BYTES as u32 {
        return Err(FormatError::Version(
            u16::try_from(version).unwrap_or(u16::MAX),
        ));
    }
    Ok(SegmentHeader {
        base_offset: Offset(u64_at(bytes, 16)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_props() -> Vec<PropertyRef<'static>> {
        vec![
            PropertyRef {
                name: property_name::CONNECTION_DEVICE_ID,
                value: "dev1",
            },
            PropertyRef {
                name: property_name::CONTENT_TYPE,
                value: "application/json",
            },
        ]
    }

    /// A buffer whose start is 16-byte aligned, like a mapped segment.
    fn aligned(bytes: &[u8]) -> AlignedVec {
        let mut v = AlignedVec::new();
        v.extend_from_slice(bytes);
        v
    }

    fn encode_one(offset: u64, body: &[u8]) -> AlignedVec {
        let system = sample_props();
        let app = [PropertyRef {
            name: "temp alert",
            value: "a&b=c",
        }];
        let message = MessageRef {
            system_properties: &system,
            application_properties: &app,
            body,
        };
        let mut encoder = MessageEncoder::default();
        let payload = encoder.encode(&message).unwrap().to_vec();
        let mut out = vec![0u8; record_bytes(payload.len())];
        let len = encode_record(&mut out, Offset(offset), 1_700_000_000_123, &payload);
        assert_eq!(
            &out[0..4],
            &[0, 0, 0, 0],
            "the length word is left for the caller"
        );
        out[0..4].copy_from_slice(&len.to_le_bytes());
        aligned(&out)
    }

    #[test]
    fn round_trip_reads_the_message_in_place() {
        for body in [&b""[..], b"x", b"{\"t\":21.5}", &[0xffu8; 1000][..]] {
            let bytes = encode_one(42, body);
            assert_eq!(bytes.len() % RECORD_ALIGN_BYTES, 0);
            let (header, payload) = decode_record(&bytes).unwrap();
            assert_eq!(header.offset, Offset(42));
            assert_eq!(header.enqueued_time_ms, 1_700_000_000_123);
            assert_eq!(header.record_bytes(), bytes.len());
            let message = access_message(payload).unwrap();
            assert_eq!(message.body(), body);
            assert_eq!(
                message.system_property(property_name::CONNECTION_DEVICE_ID),
                Some("dev1")
            );
            assert_eq!(message.application_property("temp alert"), Some("a&b=c"));
            assert_eq!(message.application_property("missing"), None);
            assert_eq!(message.system_properties().len(), 2);
            // The body is read in place: its bytes lie inside the record buffer.
            let range = bytes.as_ptr_range();
            assert!(body.is_empty() || range.contains(&message.body().as_ptr()));
        }
    }

    #[test]
    fn header_layout_matches_the_spec() {
        let bytes = encode_one(0x0102_0304_0506_0708, b"abc");
        let len = u32::from_le_bytes(bytes[0..4].try_into().unwrap());
        assert!(len as usize + RECORD_HEADER_BYTES <= bytes.len());
        assert_eq!(&bytes[4..6], &[1, 0]);
        assert_eq!(&bytes[6..8], &[0, 0]);
        assert_eq!(&bytes[8..16], &[8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(
            u64::from_le_bytes(bytes[16..24].try_into().unwrap()),
            1_700_000_000_123
        );
        let payload = &bytes[32..32 + len as usize];
        let mut prefix = [0u8; 24];
        prefix.copy_from_slice(&bytes[..24]);
        let mut whole = prefix.to_vec();
        whole.extend_from_slice(payload);
        assert_eq!(
            u64::from_le_bytes(bytes[24..32].try_into().unwrap()),
            xxh3_64(&whole)
        );
        assert!(bytes[32 + len as usize..].iter().all(|&b| b == 0));
    }

    #[test]
    fn every_truncation_point_is_refused() {
        let bytes = encode_one(7, b"hello world, this is a body");
        for cut in 0..bytes.len() {
            let result = decode_record(&bytes[..cut]);
            assert!(result.is_err(), "a record cut at {cut} decoded");
        }
        assert!(decode_record(&bytes).is_ok());
    }

    #[test]
    fn every_bit_flip_is_detected() {
        let bytes = encode_one(9, b"bit flips everywhere");
        let payload_end = RECORD_HEADER_BYTES + u32_at(&bytes, 0) as usize;
        for bit in 0..payload_end * 8 {
            let mut damaged = aligned(&bytes);
            damaged[bit / 8] ^= 1 << (bit % 8);
            let result = decode_record(&damaged);
            assert!(result.is_err(), "flip of bit {bit} went unnoticed");
        }
    }

    #[test]
    fn garbage_never_panics_and_bad_archives_are_refused() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for len in 0..600 {
            let mut garbage = AlignedVec::<16>::new();
            for _ in 0..len {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                garbage.push(state as u8);
            }
            let _ = decode_record(&garbage);
            let _ = decode_segment_header(&garbage);
            // Shorter than the archived root (three 8-byte boxes): always refused.
            if len < 24 {
                assert!(access_message(&garbage).is_err());
            } else {
                let _ = access_message(&garbage);
            }
        }
    }

    #[test]
    fn a_valid_checksum_over_a_bad_archive_is_refused_by_validation() {
        let payload = aligned(&[0xAAu8; 48]);
        let mut out = vec![0u8; record_bytes(payload.len())];
        let len = encode_record(&mut out, Offset(1), 5, &payload);
        out[0..4].copy_from_slice(&len.to_le_bytes());
        let out = aligned(&out);
        let (_, payload) = decode_record(&out).unwrap();
        assert_eq!(access_message(payload).unwrap_err(), FormatError::Archive);
    }

    #[test]
    fn zero_bytes_mean_no_record() {
        assert_eq!(decode_record(&[0u8; 64]).unwrap_err(), FormatError::Empty);
        assert_eq!(decode_record(&[0u8; 8]).unwrap_err(), FormatError::Empty);
    }

    #[test]
    fn lengths_over_the_maximum_are_refused_before_reading() {
        let mut bytes = encode_one(1, b"x").to_vec();
        bytes[0..4].copy_from_slice(&(RECORD_PAYLOAD_BYTES_MAX as u32 + 1).to_le_bytes());
        assert!(matches!(
            decode_record(&bytes),
            Err(FormatError::TooLong(_))
        ));
    }

    #[test]
    fn segment_header_round_trip_and_damage() {
        let mut header = [0u8; SEGMENT_HEADER_BYTES];
        encode_segment_header(&mut header, Offset(1234));
        assert_eq!(&header[0..8], b"INGOTSEG");
        assert_eq!(
            decode_segment_header(&header).unwrap().base_offset,
            Offset(1234)
        );
        for bit in 0..32 * 8 {
            let mut damaged = header;
            damaged[bit / 8] ^= 1 << (bit % 8);
            assert!(decode_segment_header(&damaged).is_err(), "bit {bit}");
        }
        assert_eq!(
            decode_segment_header(&[0u8; 64]).unwrap_err(),
            FormatError::Empty
        );
        assert!(decode_segment_header(&header[..63]).is_err());
    }

    #[test]
    fn encoding_in_place_matches_encoding_in_the_scratch_buffer() {
        let system = sample_props();
        let message = MessageRef {
            system_properties: &system,
            application_properties: &[],
            body: b"abc",
        };
        let mut encoder = MessageEncoder::default();
        let expected = encoder.encode(&message).unwrap().to_vec();
        let mut out = AlignedVec::<16>::new();
        out.resize(256, 0);
        let len = encoder.encode_into(&message, &mut out).unwrap();
        assert_eq!(&out[..len], &expected[..]);
        assert!(encoder.encode_into(&message, &mut out[..8]).is_err());
    }

    #[test]
    fn the_encoder_reuses_its_buffer() {
        let mut encoder = MessageEncoder::default();
        let message = MessageRef {
            system_properties: &[],
            application_properties: &[],
            body: b"a",
        };
        let first = encoder.encode(&message).unwrap().to_vec();
        let second = encoder.encode(&message).unwrap().to_vec();
        assert_eq!(first, second);
    }
}
