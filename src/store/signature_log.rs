//! Group commit for signature records: whoever is waiting when a write
//! starts goes into the next transaction together, so one fsync covers many
//! signatures under load, and a lone request is written at once.
//!
//! A caller's `record` returns only after its row is durable; the sign
//! handler answers only after that.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use super::{SignatureRecord, Store, StoreError};

/// Records per transaction at most.
const MAX_BATCH: usize = 1024;

type Pending = (SignatureRecord, oneshot::Sender<Result<(), String>>);

#[derive(Clone)]
pub struct SignatureLog {
    queue: mpsc::Sender<Pending>,
}

impl SignatureLog {
    /// Starts the writer task on the current runtime.
    pub fn start(store: Arc<dyn Store>) -> Self {
        let (queue, receiver) = mpsc::channel(8 * MAX_BATCH);
        tokio::spawn(write_batches(store, receiver));
        Self { queue }
    }

    /// Returns once the record is committed.
    pub async fn record(&self, record: SignatureRecord) -> Result<(), StoreError> {
        let (done, written) = oneshot::channel();
        self.queue.send((record, done)).await.map_err(|_| StoreError::LogStopped)?;
        match written.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(message)) => Err(StoreError::BatchFailed(message)),
            Err(_) => Err(StoreError::LogStopped),
        }
    }
}

async fn write_batches(store: Arc<dyn Store>, mut receiver: mpsc::Receiver<Pending>) {
    let mut batch: Vec<Pending> = Vec::with_capacity(MAX_BATCH);
    while receiver.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let records: Vec<SignatureRecord> = batch.iter().map(|(r, _)| r.clone()).collect();
        let result = store.insert_signatures(&records).await.map_err(|e| {
            tracing::error!(error = %e, rows = records.len(), "writing signature records failed");
            e.to_string()
        });
        for (_, done) in batch.drain(..) {
            let _ = done.send(result.clone());
        }
    }
}
