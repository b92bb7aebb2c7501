//! The Azure IoT Hub layer over MQTT, sans-IO: usernames, topics and property bags.
//!
//! MQTT itself knows nothing of devices; this module turns the strings of a decoded packet into
//! IoT Hub meaning (azure-protocol.md section 2) and builds the strings the hub sends back. It
//! works on the `&str` views the codec hands out and returns views into them, so the telemetry
//! hot path (topic parse, then a property bag walk) allocates only for percent-escaped values.
//! The trade-off is tolerance over strictness wherever the SDKs disagree (username forms, `$.`
//! versus `%24.`, bags with or without `?`), and strictness where security lives: a device's
//! identity must agree between client id, username and topics.

#![deny(clippy::indexing_slicing)]

pub mod property_bag;
pub mod topic;
pub mod username;

pub use property_bag::{
    Property, PropertyBag, PropertyBagWriter, PropertyName, RawPair, SystemProperties,
    SystemProperty,
};
pub use topic::{
    push_c2d_topic_prefix, push_desired_patch_topic, push_method_request_topic,
    push_module_input_topic_prefix, push_twin_response_topic, PublishTopic, Subscription,
};
pub use username::{IdentityError, Username};

/// The device or module a connection speaks for, as views of validated ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Identity<'a> {
    pub device_id: &'a str,
    /// `Some` for a module connection.
    pub module_id: Option<&'a str>,
}

impl Identity<'_> {
    /// Whether `client_id` is this identity's MQTT client id: `deviceId`, or `deviceId/moduleId`
    /// for a module (azure-protocol.md 2.1).
    pub fn is_client_id(&self, client_id: &str) -> bool {
        match self.module_id {
            None => client_id == self.device_id,
            Some(module_id) => client_id
                .strip_prefix(self.device_id)
                .and_then(|rest| rest.strip_prefix('/'))
                .is_some_and(|rest| rest == module_id),
        }
    }
}
