//! Persistent MQTT sessions: the subscription filters of clean-session-0 clients by client id,
//! so that a device that reconnects after a hub restart still receives what it subscribed to
//! (the Python SDK never subscribes again on reconnect, azure-protocol.md 10.3).

use redb::TableDefinition;

use super::{decode, encode, Registry, RegistryError};

pub(super) const SESSIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("sessions");

impl Registry {
    /// Every persisted session.
    pub fn sessions(&self) -> Result<Vec<(String, Vec<String>)>, RegistryError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(SESSIONS)?;
        let mut all = Vec::new();
        for entry in table.range::<&str>(..)? {
            let (key, value) = entry?;
            all.push((key.value().to_owned(), decode(value.value())?));
        }
        Ok(all)
    }

    /// Applies session changes in one transaction: `Some(filters)` saves, `None` removes.
    pub fn save_sessions(
        &self,
        changes: &[(String, Option<Vec<String>>)],
    ) -> Result<(), RegistryError> {
        let txn = self.db.begin_write()?;
        {
            let mut table = txn.open_table(SESSIONS)?;
            for (client_id, filters) in changes {
                match filters {
                    Some(filters) => {
                        table.insert(client_id.as_str(), encode(filters).as_slice())?;
                    }
                    None => {
                        table.remove(client_id.as_str())?;
                    }
                }
            }
        }
        txn.commit()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_are_saved_replaced_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.redb");
        {
            let r = Registry::open(&path).unwrap();
            r.save_sessions(&[
                ("a".into(), Some(vec!["$iothub/methods/POST/#".into()])),
                ("b".into(), Some(vec![])),
            ])
            .unwrap();
            r.save_sessions(&[("b".into(), None)]).unwrap();
        }
        let r = Registry::open(&path).unwrap();
        assert_eq!(
            r.sessions().unwrap(),
            [("a".to_owned(), vec!["$iothub/methods/POST/#".to_owned()])]
        );
    }
}
