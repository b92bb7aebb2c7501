//! Every protocol limit of the hub, in one place.
//!
//! These are the limits Azure IoT Hub documents as part of its protocol (azure-protocol.md section
//! 8): the SDKs and existing back ends rely on them, so they are constants, not settings. Limits
//! that are really capacity choices of one installation (ports, buffer sizes, retention) live in
//! the control plane's `Config` and are validated once at start-up.

/// Longest device or module id, in characters (all allowed characters are ASCII).
pub const ID_LEN_MAX: usize = 128;
/// Longest `statusReason` of a device, in characters.
pub const STATUS_REASON_LEN_MAX: usize = 128;
/// Symmetric keys are base64 of 16 to 64 bytes (Azure refuses keys outside that range).
pub const SYMMETRIC_KEY_BYTES_MIN: usize = 16;
/// See [`SYMMETRIC_KEY_BYTES_MIN`].
pub const SYMMETRIC_KEY_BYTES_MAX: usize = 64;
/// Bytes of a generated symmetric key (what the real hub generates: 44 base64 characters).
pub const SYMMETRIC_KEY_BYTES_GENERATED: usize = 32;
/// Devices in one bulk registry request (`POST /devices`).
pub const BULK_DEVICES_MAX: usize = 100;
/// Largest page of `GET /devices?top=N`; a `top` outside 1..=1000 means 1000, as in Azure.
pub const LIST_TOP_MAX: usize = 1000;
/// Modules per device (Azure: 50 per device on every tier).
pub const MODULES_PER_DEVICE_MAX: usize = 50;
/// Devices and modules in one registry (Azure's per-hub quota; kept as a sanity bound).
pub const IDENTITIES_MAX: u64 = 10_000_000;
/// Tolerated clock skew when checking a SAS token's expiry (the .NET SDK's `MaxClockSkew`).
pub const SAS_CLOCK_SKEW_SECS: u64 = 300;
/// Device-to-cloud message size, body plus properties.
pub const D2C_MESSAGE_BYTES_MAX: usize = 256 * 1024;
/// Twin `tags` size: the sum of key lengths and value sizes (strings count their UTF-8 bytes,
/// numbers 8, booleans 4), as Azure measures it.
pub const TWIN_TAGS_BYTES_MAX: usize = 8 * 1024;
/// Twin `properties.desired` size, measured like [`TWIN_TAGS_BYTES_MAX`] without `$metadata`
/// and `$version`.
pub const TWIN_DESIRED_BYTES_MAX: usize = 32 * 1024;
/// Twin `properties.reported` size, measured like [`TWIN_DESIRED_BYTES_MAX`].
pub const TWIN_REPORTED_BYTES_MAX: usize = 32 * 1024;
/// Longest twin property name (key), in UTF-8 bytes.
pub const TWIN_KEY_BYTES_MAX: usize = 1024;
/// Longest twin string value, in UTF-8 bytes.
pub const TWIN_STRING_BYTES_MAX: usize = 4 * 1024;
/// Nesting of objects below the root of `tags`, `desired` or `reported`.
pub const TWIN_DEPTH_MAX: usize = 10;
/// Largest integer a twin may hold (2^52 - 1); the smallest is `-(2^52)`.
pub const TWIN_INT_MAX: i64 = 4_503_599_627_370_495;
/// See [`TWIN_INT_MAX`].
pub const TWIN_INT_MIN: i64 = -4_503_599_627_370_496;
/// Cloud-to-device message body.
pub const C2D_MESSAGE_BYTES_MAX: usize = 64 * 1024;
/// Messages waiting in one device's C2D queue (403004 beyond).
pub const C2D_QUEUE_DEPTH: usize = 50;
/// Direct method request and response payloads.
pub const METHOD_PAYLOAD_BYTES_MAX: usize = 128 * 1024;
/// Direct method `responseTimeoutInSeconds` range and default.
pub const METHOD_RESPONSE_TIMEOUT_SECS: (u64, u64, u64) = (5, 300, 30);
/// Direct method `connectTimeoutInSeconds` maximum (the default is 0).
pub const METHOD_CONNECT_TIMEOUT_SECS_MAX: u64 = 300;
/// Largest page of a twin query (`x-ms-max-item-count`), and the default page.
pub const QUERY_PAGE_MAX: usize = 1000;
/// See [`QUERY_PAGE_MAX`].
pub const QUERY_PAGE_DEFAULT: usize = 100;

const _: () = assert!(SYMMETRIC_KEY_BYTES_MIN <= SYMMETRIC_KEY_BYTES_GENERATED);
const _: () = assert!(SYMMETRIC_KEY_BYTES_GENERATED <= SYMMETRIC_KEY_BYTES_MAX);
