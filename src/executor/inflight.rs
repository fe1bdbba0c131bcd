//! The memory every request in flight holds together, bounded (`--max-inflight-bytes`).
//!
//! Each request is bounded on its own (message size, decoded size, documents), but not their
//! sum: a hundred clients sending large requests at once each passed every check, and all of
//! them were processed together. A request now holds its decoded size (and room for the
//! embeddings its reply will carry, one per document) from when [`Core::handle`] starts it to
//! when its reply is built. Over the limit, unary calls are refused with RESOURCE_EXHAUSTED and
//! streamed requests wait, as with a full queue; dry runs compute nothing and hold nothing.
//!
//! What it does not count: a request is decoded before its size is known, so a refused unary
//! call was decoded first, and each stream may hold up to `--stream-concurrency` decoded
//! requests waiting for room. Those are bounded per connection by the decode budget and the
//! stream's concurrency, not in sum; the budget bounds the requests being worked on, whose
//! preprocessing and replies are what grows with load. The wait is first come, first served:
//! a large streamed request waiting for room is served before smaller unary calls get any.
//!
//! [`Core::handle`]: super::Core::handle

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::status::ExecutorError;

/// The default `--max-inflight-bytes`: about four requests of the default
/// `--max-decoded-bytes`.
pub const DEFAULT_LIMIT: u64 = 4 << 30;

/// Memory is counted in KiB, so a semaphore's `u32` acquisitions reach 4 TiB.
const UNIT: u64 = 1024;

/// The executor's budget of bytes held by requests in flight, shared by every caller.
#[derive(Debug)]
pub struct InFlight {
    permits: Arc<Semaphore>,
    /// The budget in [`UNIT`]s.
    units: u32,
    /// Bytes each document may add to its reply: an f32 embedding and its array's fields.
    reply_per_doc: u64,
}

/// A request's share of the budget, given back when dropped.
#[derive(Debug)]
pub struct Hold {
    permit: Option<OwnedSemaphorePermit>,
    permits: Arc<Semaphore>,
    units: u32,
}

impl Drop for Hold {
    fn drop(&mut self) {
        drop(self.permit.take());
        gauge(&self.permits, self.units);
    }
}

/// Publishes the bytes held now.
fn gauge(permits: &Semaphore, units: u32) {
    metrics::gauge!("clipft_inflight_request_bytes").set(held(permits, units) as f64);
}

fn held(permits: &Semaphore, units: u32) -> u64 {
    u64::from(units).saturating_sub(permits.available_permits() as u64) * UNIT
}

impl InFlight {
    /// A budget of `limit` bytes, for a model whose embeddings have `embedding_dim` values.
    pub fn new(limit: u64, embedding_dim: usize) -> Self {
        let units = u32::try_from(limit.div_ceil(UNIT))
            .unwrap_or(u32::MAX)
            .max(1);
        Self {
            permits: Arc::new(Semaphore::new(units as usize)),
            units,
            reply_per_doc: 4 * embedding_dim as u64
                + std::mem::size_of::<crate::protocol::docarray::NdArrayProto>() as u64
                + 64,
        }
    }

    /// The budget in bytes.
    pub fn limit(&self) -> u64 {
        u64::from(self.units) * UNIT
    }

    /// Bytes held by requests now.
    pub fn held(&self) -> u64 {
        held(&self.permits, self.units)
    }

    /// What a request of `bytes` decoded and `docs` documents holds until its reply is built.
    pub fn cost(&self, bytes: u64, docs: u64) -> u64 {
        bytes.saturating_add(docs.saturating_mul(self.reply_per_doc))
    }

    /// Takes `bytes` of the budget. With `wait` (streams) the caller waits for room; without
    /// (unary calls) a full budget is [`ExecutorError::Overloaded`]. A request bigger than
    /// the whole budget takes all of it rather than never running.
    pub async fn hold(&self, bytes: u64, wait: bool) -> Result<Hold, ExecutorError> {
        let units = u32::try_from(bytes.div_ceil(UNIT))
            .unwrap_or(u32::MAX)
            .clamp(1, self.units);
        let permit = if wait {
            self.permits
                .clone()
                .acquire_many_owned(units)
                .await
                .map_err(|_| ExecutorError::ShuttingDown)?
        } else {
            self.permits
                .clone()
                .try_acquire_many_owned(units)
                .map_err(|_| ExecutorError::Overloaded {
                    need: bytes,
                    held: self.held(),
                    limit: self.limit(),
                })?
        };
        gauge(&self.permits, self.units);
        Ok(Hold {
            permit: Some(permit),
            permits: self.permits.clone(),
            units: self.units,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request bigger than the budget runs alone (it takes all of it); meanwhile unary
    /// requests are refused and streamed ones wait; dropping a hold gives its bytes back.
    #[tokio::test]
    async fn oversized_requests_run_alone_and_others_wait_or_are_refused() {
        let budget = Arc::new(InFlight::new(1 << 20, 512));
        assert_eq!(budget.limit(), 1 << 20);
        let whole = budget
            .hold(10 << 20, false)
            .await
            .expect("an empty budget admits");
        assert_eq!(budget.held(), 1 << 20);
        let err = budget.hold(1, false).await.expect_err("over the budget");
        assert!(
            matches!(err, ExecutorError::Overloaded { need: 1, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("--max-inflight-bytes"), "{err}");
        let waiting = tokio::spawn({
            let budget = budget.clone();
            async move { budget.hold(4096, true).await.map(|_| ()) }
        });
        tokio::task::yield_now().await;
        assert!(
            !waiting.is_finished(),
            "a streamed request ran over the budget"
        );
        drop(whole);
        waiting
            .await
            .expect("task")
            .expect("admitted once room was given back");
        assert_eq!(budget.held(), 0);
        // A document's reply room is its embedding's bytes and more.
        assert!(budget.cost(100, 2) > 100 + 2 * 4 * 512);
    }
}
