//! Who a peer is: SAS tokens today, X.509 with the data plane.
//!
//! Everything here is sans-IO: the current time is a parameter, keys are byte slices, and the
//! caller decides which keys to try (a device's, a module's or a policy's).

pub mod device;
pub mod sas;
pub mod x509;
