//! The audit log as a running transparency log: sealing new entries into
//! checkpoints signed by the audit key on the token, checking the stored
//! log against its latest checkpoint (and failing closed when it does not
//! match), and serving checkpoints, tiles, entry bundles and searches.
//!
//! `audit` holds the formats (entries, tiles, notes, proofs) and sits below
//! `store`, which writes entries in the transaction of each change; this
//! area sits above both and the pool, because sealing needs all three.
//!
//! Sealing, once a second by default, on every replica: read the latest
//! checkpoint, resume the tree's right edge from its stored tiles (checking
//! that they give its root), fold in the entries appended since, sign the
//! new checkpoint through the pool, and store it with the tiles that grew,
//! if no other replica stored one meanwhile (`record_checkpoint` is
//! conditional). A new tree is built only by appending to the last signed
//! one, so it extends every checkpoint before it by construction.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use p256::pkcs8::EncodePublicKey as _;

use crate::audit::note::{self, NoteError};
use crate::audit::tiles::{BuiltTile, TileKind, TilePath, TreeEdge, TreeError, HASH_BYTES};
use crate::audit::{AuditQuery, AuditRecord, MAX_ENTRY_BYTES};
use crate::keys::KeyId;
use crate::policy::Caller;
use crate::pool::{KeyPool, PoolError};
use crate::store::{Store, StoreError, StoredCheckpoint};
use crate::telemetry::AuditMetrics;

/// Entries read from the store at a time, sealing or checking: short reads,
/// so that no read holds an old snapshot long enough to hold up SQLite's
/// log checkpoints (see `store/checkpoint.rs`).
const READ_CHUNK: u64 = 1024;
/// Entries one checkpoint round seals at most: a backlog (after an outage
/// of the token) is sealed over several rounds, each bounded in memory.
const MAX_ENTRIES_PER_ROUND: u64 = 200_000;
/// Events one search returns at most.
pub const MAX_EVENTS_PAGE: u32 = 1000;

#[derive(Debug, thiserror::Error)]
pub enum AuditLogError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("signing the checkpoint failed: {0}")]
    Signing(#[from] PoolError),
    #[error("the audit log does not match its signed checkpoint: {0}")]
    Inconsistent(String),
    #[error("no checkpoint has been signed yet")]
    NoCheckpoint,
    #[error("no such tile in the log's latest checkpoint")]
    TileNotFound,
    #[error("agents may read only their own audit events")]
    NotYourEvents,
    #[error("only admins read entry bundles")]
    AdminOnly,
}

/// Whether the stored log is known to match its latest checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LogHealth {
    /// Not checked yet since start: no checkpoint is signed until it is.
    Unchecked,
    Consistent,
    /// Sticky: the process keeps refusing until an operator acts
    /// (`docs/audit.md`, Recovery).
    Inconsistent(String),
}

pub struct AuditLog {
    store: Arc<dyn Store>,
    pool: KeyPool,
    key: KeyId,
    public_key: p256::PublicKey,
    origin: String,
    /// The tree as of the latest checkpoint this replica sealed or checked.
    edge: tokio::sync::Mutex<Option<(StoredCheckpoint, TreeEdge)>>,
    health: RwLock<LogHealth>,
    metrics: AuditMetrics,
}

/// What one sealing round did.
#[derive(Debug, PartialEq, Eq)]
pub enum Sealed {
    /// A checkpoint of this size was signed and stored.
    Checkpoint(u64),
    NothingNew,
    /// Another replica stored a checkpoint first; the next round goes on
    /// from it.
    Raced,
    /// The log is not known to be consistent: nothing is signed.
    Refused,
}

impl AuditLog {
    pub fn new(
        store: Arc<dyn Store>,
        pool: KeyPool,
        key: KeyId,
        public_key: p256::PublicKey,
        origin: String,
        metrics: AuditMetrics,
    ) -> Self {
        Self {
            store,
            pool,
            key,
            public_key,
            origin,
            edge: tokio::sync::Mutex::new(None),
            health: RwLock::new(LogHealth::Unchecked),
            metrics,
        }
    }

    pub fn health(&self) -> LogHealth {
        self.health
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The audit key, as `GET /v1/audit/public-key.pem` serves it.
    pub fn public_key_pem(&self) -> String {
        self.public_key
            .to_public_key_pem(p256::pkcs8::LineEnding::LF)
            .expect("a P-256 point always encodes")
    }

    fn fail_closed(&self, reason: String) {
        let mut health = self.health.write().unwrap_or_else(|e| e.into_inner());
        if !matches!(*health, LogHealth::Inconsistent(_)) {
            tracing::error!(
                reason = %reason,
                "the audit log does not match its signed checkpoint: no checkpoint will be \
                 signed and /readyz answers 503 until an operator acts (docs/audit.md)"
            );
            *health = LogHealth::Inconsistent(reason);
            self.metrics.inconsistent.set(1);
        }
    }

    /// Checks a stored checkpoint's signature and origin.
    fn check_signed(&self, checkpoint: &StoredCheckpoint) -> Result<(), String> {
        let verified = note::verify_checkpoint(
            checkpoint.note.as_bytes(),
            &self.public_key,
            Some(&self.origin),
        )
        .map_err(|e: NoteError| format!("checkpoint of size {}: {e}", checkpoint.size))?;
        if verified.size != checkpoint.size || verified.root != checkpoint.root {
            return Err(format!(
                "checkpoint of size {}: its signed note states another tree (size {})",
                checkpoint.size, verified.size
            ));
        }
        Ok(())
    }

    /// The tree's edge as of `checkpoint`, from the stored tiles, checked
    /// against the checkpoint's signature and root.
    async fn resume(&self, checkpoint: &StoredCheckpoint) -> Result<TreeEdge, AuditLogError> {
        self.check_signed(checkpoint)
            .map_err(AuditLogError::Inconsistent)?;
        let mut tiles = std::collections::HashMap::new();
        for (level, index, _) in TreeEdge::edge_tiles(checkpoint.size) {
            if let Some(hashes) = self.store.audit_tile(level, index).await? {
                tiles.insert((level, index), hashes);
            }
        }
        let edge = TreeEdge::resume(checkpoint.size, |l, i| tiles.remove(&(l, i)))
            .map_err(|e| AuditLogError::Inconsistent(e.to_string()))?;
        if edge.root().map_err(tree_failed)? != checkpoint.root {
            return Err(AuditLogError::Inconsistent(format!(
                "the stored tiles do not give the root of the signed checkpoint of size {}",
                checkpoint.size
            )));
        }
        Ok(edge)
    }

    /// One sealing round: the entries appended since the latest checkpoint
    /// (at most `MAX_ENTRIES_PER_ROUND`) into a new signed one.
    pub async fn seal(&self) -> Result<Sealed, AuditLogError> {
        if self.health() != LogHealth::Consistent {
            return Ok(Sealed::Refused);
        }
        let result = self.seal_checked().await;
        match &result {
            Err(AuditLogError::Inconsistent(reason)) => self.fail_closed(reason.clone()),
            Err(_) => {
                self.metrics.checkpoint_failures.inc();
            }
            Ok(_) => {}
        }
        result
    }

    async fn seal_checked(&self) -> Result<Sealed, AuditLogError> {
        let mut held = self.edge.lock().await;
        let latest = self.store.latest_checkpoint().await?;
        let mut edge = match (&*held, &latest) {
            (Some((known, edge)), Some(latest)) if known == latest => edge.clone(),
            (_, Some(latest)) => self.resume(latest).await?,
            (_, None) => TreeEdge::new(),
        };
        if let Some(latest) = &latest {
            self.metrics.size.set(latest.size as i64);
            self.metrics
                .signed_at_ms
                .store(latest.signed_at_ms, std::sync::atomic::Ordering::Relaxed);
        }
        let start = edge.size();
        let end = self
            .store
            .audit_size()
            .await?
            .min(start + MAX_ENTRIES_PER_ROUND);
        if end <= start {
            *held = latest.map(|l| (l, edge));
            return Ok(Sealed::NothingNew);
        }
        let mut filled = Vec::new();
        while edge.size() < end {
            filled.extend(self.fold_chunk(&mut edge, end).await?);
        }
        let root = edge.root().map_err(tree_failed)?;
        let text = note::checkpoint_text(&self.origin, end, &root)
            .map_err(|e| AuditLogError::Inconsistent(e.to_string()))?;
        let signature = self
            .pool
            .sign(&self.key, note::signed_digest(&text))
            .await?;
        let checkpoint = StoredCheckpoint {
            size: end,
            root,
            note: note::signed_note(&text, &self.origin, &self.public_key, &signature),
            signed_at_ms: now_ms(),
        };
        filled.extend(edge.partial_tiles());
        let recorded = self
            .store
            .record_checkpoint(latest.as_ref().map(|l| l.size), &filled, &checkpoint)
            .await?;
        if !recorded {
            *held = None;
            return Ok(Sealed::Raced);
        }
        self.metrics.appended.inc_by(end - start);
        self.metrics.size.set(end as i64);
        self.metrics.signed_at_ms.store(
            checkpoint.signed_at_ms,
            std::sync::atomic::Ordering::Relaxed,
        );
        *held = Some((checkpoint, edge));
        Ok(Sealed::Checkpoint(end))
    }

    /// Recomputes the whole stored log, entry by entry, and checks it
    /// against every stored tile and the latest checkpoint's signed root.
    /// On a mismatch the log fails closed (sticky). Returns the size
    /// checked.
    pub async fn self_check(&self) -> Result<u64, AuditLogError> {
        let result = self.check_everything().await;
        match &result {
            Ok(_) => {
                let mut health = self.health.write().unwrap_or_else(|e| e.into_inner());
                if *health == LogHealth::Unchecked {
                    *health = LogHealth::Consistent;
                }
            }
            Err(AuditLogError::Inconsistent(reason)) => self.fail_closed(reason.clone()),
            Err(_) => {}
        }
        result
    }

    async fn check_everything(&self) -> Result<u64, AuditLogError> {
        let Some(latest) = self.store.latest_checkpoint().await? else {
            // Tiles are only ever written with a checkpoint: tiles without
            // one mean the checkpoints were deleted, and the next one
            // signed would vouch for whatever the entries now say.
            if self.store.audit_tile(0, 0).await?.is_some() {
                return Err(AuditLogError::Inconsistent(
                    "the log has tiles but no signed checkpoint: checkpoints were deleted".into(),
                ));
            }
            return Ok(0);
        };
        self.check_signed(&latest)
            .map_err(AuditLogError::Inconsistent)?;
        let mut edge = TreeEdge::new();
        while edge.size() < latest.size {
            for tile in self.fold_chunk(&mut edge, latest.size).await? {
                self.compare_tile(&tile).await?;
            }
        }
        for tile in edge.partial_tiles() {
            self.compare_tile(&tile).await?;
        }
        if edge.root().map_err(tree_failed)? != latest.root {
            return Err(AuditLogError::Inconsistent(format!(
                "the stored entries do not hash to the root of the signed checkpoint of size {}",
                latest.size
            )));
        }
        Ok(latest.size)
    }

    /// Reads the next entries after the edge (at most `READ_CHUNK`, none
    /// at or past `end`) into it; returns the tiles they filled. An entry
    /// the store lacks is an inconsistency: indexes are never skipped.
    async fn fold_chunk(
        &self,
        edge: &mut TreeEdge,
        end: u64,
    ) -> Result<Vec<BuiltTile>, AuditLogError> {
        let start = edge.size();
        let chunk_end = end.min(start + READ_CHUNK);
        let chunk = self.store.audit_leaf_hashes(start..chunk_end).await?;
        let mut filled = Vec::new();
        for (expected, (index, leaf)) in (start..chunk_end).zip(chunk) {
            if index != expected {
                return Err(missing(expected));
            }
            edge.push(leaf, |t| filled.push(t));
        }
        if edge.size() != chunk_end {
            return Err(missing(edge.size()));
        }
        Ok(filled)
    }

    /// A recomputed tile against the stored one (which may be wider).
    async fn compare_tile(&self, built: &BuiltTile) -> Result<(), AuditLogError> {
        let stored = self
            .store
            .audit_tile(built.level, built.index)
            .await?
            .unwrap_or_default();
        if stored.get(..built.hashes.len()) == Some(&built.hashes[..]) {
            return Ok(());
        }
        let differs = (0..built.hashes.len() / HASH_BYTES)
            .find(|i| {
                stored.get(i * HASH_BYTES..(i + 1) * HASH_BYTES)
                    != Some(&built.hashes[i * HASH_BYTES..(i + 1) * HASH_BYTES])
            })
            .unwrap_or(0) as u64;
        Err(AuditLogError::Inconsistent(if built.level == 0 {
            format!(
                "entry {} does not hash to its stored tile",
                built.index * crate::audit::tiles::TILE_WIDTH + differs
            )
        } else {
            format!(
                "stored tile {}/{} differs from the entries under it",
                built.level, built.index
            )
        }))
    }

    /// The latest signed checkpoint, with its size and when it was signed.
    pub async fn latest(&self) -> Result<Option<crate::store::StoredCheckpoint>, AuditLogError> {
        Ok(self.store.latest_checkpoint().await?)
    }

    /// The latest signed checkpoint, as served.
    pub async fn checkpoint(&self) -> Result<String, AuditLogError> {
        Ok(self
            .store
            .latest_checkpoint()
            .await?
            .ok_or(AuditLogError::NoCheckpoint)?
            .note)
    }

    /// A hash tile or an entry bundle, as C2SP tlog-tiles encodes it, if
    /// the latest checkpoint covers it. Entry bundles are for admins only:
    /// entries name agents and what they asked for.
    pub async fn tile(
        &self,
        caller: Option<&Caller>,
        path: TilePath,
    ) -> Result<Vec<u8>, AuditLogError> {
        let size = self
            .store
            .latest_checkpoint()
            .await?
            .ok_or(AuditLogError::TileNotFound)?
            .size;
        if path.needs_entries().is_none_or(|needed| needed > size) {
            return Err(AuditLogError::TileNotFound);
        }
        let width = usize::from(path.width);
        match path.kind {
            TileKind::Hashes { level } => {
                let mut hashes = self
                    .store
                    .audit_tile(level, path.index)
                    .await?
                    .ok_or(AuditLogError::TileNotFound)?;
                if hashes.len() < width * HASH_BYTES {
                    return Err(AuditLogError::TileNotFound);
                }
                hashes.truncate(width * HASH_BYTES);
                Ok(hashes)
            }
            TileKind::Entries => {
                if !matches!(caller, Some(Caller::Admin(_))) {
                    return Err(AuditLogError::AdminOnly);
                }
                // Served as stored, short or misnumbered if the store is:
                // the reader's verifier is there to say what is wrong.
                let entries = self.store.audit_entries(path.entry_range()).await?;
                let mut bundle = Vec::new();
                for (index, entry) in &entries {
                    if entry.len() > MAX_ENTRY_BYTES {
                        return Err(AuditLogError::Inconsistent(format!(
                            "entry {index} is too long for an entry bundle"
                        )));
                    }
                    bundle.extend_from_slice(&(entry.len() as u16).to_be_bytes());
                    bundle.extend_from_slice(entry);
                }
                Ok(bundle)
            }
        }
    }

    /// Entries matching `query`, oldest first. An agent reads only its own
    /// (the query is narrowed to it).
    pub async fn events(
        &self,
        caller: &Caller,
        mut query: AuditQuery,
    ) -> Result<Vec<AuditRecord>, AuditLogError> {
        if let Caller::Agent(name) = caller {
            match &query.agent {
                Some(asked) if asked != name.as_str() => return Err(AuditLogError::NotYourEvents),
                _ => query.agent = Some(name.as_str().to_owned()),
            }
        }
        query.limit = query.limit.clamp(1, MAX_EVENTS_PAGE);
        Ok(self.store.search_audit(&query).await?)
    }

    /// Seals every `interval`, after the first self-check, which runs at
    /// once and then every `check_every`.
    pub async fn run(
        self: Arc<Self>,
        interval: Duration,
        check_every: Duration,
        mut stop: crate::runtime::supervisor::StopSignal,
    ) {
        let mut checked_at = tokio::time::Instant::now();
        self.run_self_check().await;
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.stopped() => return,
                _ = ticks.tick() => {}
            }
            if self.health() == LogHealth::Unchecked || checked_at.elapsed() >= check_every {
                checked_at = tokio::time::Instant::now();
                self.run_self_check().await;
            }
            match self.seal().await {
                Ok(_) => {}
                Err(AuditLogError::Inconsistent(_)) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "sealing an audit checkpoint failed; retrying")
                }
            }
        }
    }

    async fn run_self_check(&self) {
        let started = std::time::Instant::now();
        match self.self_check().await {
            Ok(size) => tracing::info!(
                entries = size,
                ms = started.elapsed().as_millis() as u64,
                "the audit log matches its signed checkpoint"
            ),
            Err(AuditLogError::Inconsistent(_)) => {}
            Err(e) => tracing::warn!(error = %e, "checking the audit log failed; retrying"),
        }
    }
}

fn missing(index: u64) -> AuditLogError {
    AuditLogError::Inconsistent(format!("entry {index} is missing from the store"))
}

fn tree_failed(e: TreeError) -> AuditLogError {
    AuditLogError::Inconsistent(e.to_string())
}

fn now_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}
