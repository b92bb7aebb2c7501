//! Group commit under `fsync = always`: one flush covers the batches of every connection of a
//! partition that appended while the previous flush ran.
//!
//! A connection appends its batch without flushing, takes a ticket, and waits until a flush
//! covers its ticket. The first waiter becomes the flusher: it yields once, so that the other
//! connections already woken by data append theirs, then flushes everything appended so far and
//! publishes the highest ticket it covered. A flush blocks the shard's thread (an `msync`), which
//! is what makes batches pile up behind it, and why one flush per round covers them all.

use std::cell::Cell;

use crate::store::StoreError;

#[derive(Debug, Default)]
pub struct GroupCommit {
    /// Tickets handed out: one per appended batch.
    issued: Cell<u64>,
    /// Every ticket up to this one is durable.
    durable: Cell<u64>,
    flushing: Cell<bool>,
}

impl GroupCommit {
    /// A ticket for a batch that was just appended (call it before any await).
    pub fn ticket(&self) -> u64 {
        let ticket = self.issued.get() + 1;
        self.issued.set(ticket);
        ticket
    }

    /// Returns once `ticket` is covered by a flush; `flush` is called by at most one waiter at a
    /// time. A failed flush fails its caller, and the next waiter tries again.
    pub async fn durable(
        &self,
        ticket: u64,
        mut flush: impl FnMut() -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        loop {
            if self.durable.get() >= ticket {
                return Ok(());
            }
            if self.flushing.get() {
                futures_lite::future::yield_now().await;
                continue;
            }
            self.flushing.set(true);
            // Let the connections that are ready append their batches before this flush.
            futures_lite::future::yield_now().await;
            let covered = self.issued.get();
            let result = flush();
            self.flushing.set(false);
            result?;
            self.durable.set(self.durable.get().max(covered));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::rc::Rc;

    #[test]
    fn one_flush_covers_the_batches_appended_before_it() {
        let commit = Rc::new(GroupCommit::default());
        let flushes = Rc::new(RefCell::new(0));
        let done = Rc::new(RefCell::new(Vec::new()));
        futures_lite::future::block_on(async {
            let mut tasks = Vec::new();
            for i in 0..5 {
                let (commit, flushes, done) = (commit.clone(), flushes.clone(), done.clone());
                let ticket = commit.ticket();
                tasks.push(async move {
                    commit
                        .durable(ticket, || {
                            *flushes.borrow_mut() += 1;
                            Ok(())
                        })
                        .await
                        .unwrap();
                    done.borrow_mut().push(i);
                });
            }
            futures_lite::future::zip(
                futures_lite::future::zip(
                    futures_lite::future::zip(tasks.remove(0), tasks.remove(0)),
                    futures_lite::future::zip(tasks.remove(0), tasks.remove(0)),
                ),
                tasks.remove(0),
            )
            .await;
        });
        assert_eq!(done.borrow().len(), 5);
        assert_eq!(*flushes.borrow(), 1, "five batches, one flush");
    }

    #[test]
    fn a_failed_flush_is_retried_by_the_next_waiter() {
        let commit = GroupCommit::default();
        let ticket = commit.ticket();
        let failed = futures_lite::future::block_on(
            commit.durable(ticket, || Err(StoreError::Config("disk on fire"))),
        );
        assert!(failed.is_err());
        let ok = futures_lite::future::block_on(commit.durable(ticket, || Ok(())));
        assert!(ok.is_ok());
    }
}
