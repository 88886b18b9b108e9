//! The outsider's verifier of the audit log (`keyward audit verify`): reads
//! a C2SP tiled log from the server or from a mirror on disk and checks it
//! against the audit key, trusting nothing the log says about itself.
//!
//! Two depths. With the entries (an admin token, or a mirror that has
//! them), every entry is read in order, checked to be the JSON entry of its
//! index, hashed, and the tree rebuilt a leaf at a time: every tile the
//! rebuild completes must be the tile the log serves, the tree at an old
//! checkpoint's size must have that checkpoint's root, and the whole tree
//! the served checkpoint's root. Without them, the hash tiles alone: the
//! tiles at the tree's edge must hash to the root, and an old checkpoint
//! must be a prefix by a consistency proof computed from tiles, every tile
//! authenticated against the root (`tlog_tiles`' `TileHashReader`) before
//! a hash of it is used.
//!
//! Everything read is untrusted: lengths are checked before any byte
//! reaches `tlog_tiles` (whose tile code panics on data it did not expect),
//! and every read has a bound, so a log of millions of entries is checked
//! with one entry bundle and a few tiles in memory.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::PathBuf;

use secrecy::{ExposeSecret, SecretString};
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;
use tlog_tiles::tile::{Tile, TileHashReader, TileReader};
use tlog_tiles::tlog::{self, Hash, EMPTY_HASH};
use tokio::io::AsyncReadExt as _;

use super::merkle::{leaf_hash, NodeHash};
use super::note::{verify_checkpoint, NoteError, VerifiedCheckpoint};
use super::tiles::{BuiltTile, TileKind, TilePath, TreeEdge, HASH_BYTES, TILE_WIDTH};

/// The largest log this verifier reads: 2^48 entries is far past any
/// audit trail, and below it `tlog_tiles`' tile arithmetic (u8 levels
/// times heights, shifts by them) cannot overflow.
pub const MAX_LOG_SIZE: u64 = 1 << 48;
/// `note::verify_checkpoint` refuses anything longer; reading more would
/// only waste memory.
const CHECKPOINT_LIMIT: usize = 64 * 1024;
/// Tiles are 8 levels of the tree high (c2sp.org/tlog-tiles).
const TILE_HEIGHT: u8 = 8;
/// An entry is at most what its uint16 length prefix can say.
const ENTRY_LIMIT: usize = 2 + u16::MAX as usize;

/// Why a resource of the log could not be read.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum FetchError {
    #[error("not found")]
    NotFound,
    #[error("HTTP status {0}")]
    Status(u16),
    #[error("longer than {0} bytes")]
    TooLarge(usize),
    #[error("{0}")]
    Transport(String),
}

/// Which of the two checkpoints a refusal is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckpointKind {
    /// The one the log serves now.
    Served,
    /// The one kept from an earlier run (`--checkpoint`).
    Old,
}

impl std::fmt::Display for CheckpointKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Served => "served",
            Self::Old => "old",
        })
    }
}

/// The first thing found wrong with the log.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum VerifyError {
    #[error("could not read {resource}: {reason}")]
    Fetch {
        resource: String,
        reason: FetchError,
    },
    #[error("the {0} checkpoint is malformed: {1}")]
    MalformedCheckpoint(CheckpointKind, &'static str),
    #[error("the {0} checkpoint carries no signature by the audit key")]
    NoSignature(CheckpointKind),
    #[error("the {0} checkpoint's signature by the audit key does not verify")]
    BadSignature(CheckpointKind),
    #[error("the old checkpoint is for log {old:?}, the served one for log {log:?}")]
    WrongOrigin { log: String, old: String },
    #[error("the checkpoint claims {size} entries, more than this verifier reads (2^48)")]
    SizeTooLarge { size: u64 },
    #[error("the log shrank: its checkpoint has {size} entries, the old checkpoint {old_size}")]
    Shrank { size: u64, old_size: u64 },
    #[error("entry bundle {path} is malformed: {reason}")]
    MalformedBundle { path: String, reason: String },
    #[error("entry {index} is not a JSON object with an index: {reason}")]
    EntryNotJson { index: u64, reason: String },
    #[error("entry {index} has the wrong index: it says {found}")]
    WrongIndex { index: u64, found: u64 },
    #[error("entry {index} does not hash to its tile")]
    EntryDoesNotHash { index: u64 },
    #[error("tile {path} is malformed: {reason}")]
    MalformedTile { path: String, reason: String },
    #[error("tile {level}/{index} differs from the hashes of the tiles below it")]
    TileDiffers { level: u8, index: u64 },
    #[error("the log's tree of {size} entries does not hash to its checkpoint's root")]
    RootMismatch { size: u64 },
    #[error("the log does not extend the checkpoint of size {old_size}")]
    DoesNotExtend { old_size: u64 },
    #[error("the tree's arithmetic failed: {0}")]
    Arithmetic(String),
}

/// Where the log is read from. `resource` is a path under the log's
/// prefix, as c2sp.org/tlog-tiles names it: `checkpoint`, `tile/0/000`,
/// `tile/entries/001.p/7`. A source refuses to read more than `limit`
/// bytes (`FetchError::TooLarge`) and says `FetchError::NotFound` for a
/// resource that does not exist (a partial tile the log has since
/// completed and deleted is then read from the full one).
#[async_trait::async_trait]
pub trait LogSource: Send + Sync {
    async fn read(&self, resource: &str, limit: usize) -> Result<Vec<u8>, FetchError>;
}

/// The log served by a keyward server, under `<base URL>/v1/audit/`.
pub struct HttpSource {
    http: reqwest::Client,
    prefix: String,
    token: Option<SecretString>,
}

impl HttpSource {
    /// `http` decides whom to trust (keyward's CA alone, in the CLI);
    /// `token` is the admin token, sent with entry bundles only: they are
    /// the one part of the log behind a credential, and the hash tiles and
    /// checkpoint are fetched by people who have none.
    pub fn new(http: reqwest::Client, base_url: &str, token: Option<SecretString>) -> Self {
        Self {
            http,
            prefix: format!("{}/v1/audit", base_url.trim_end_matches('/')),
            token,
        }
    }
}

#[async_trait::async_trait]
impl LogSource for HttpSource {
    async fn read(&self, resource: &str, limit: usize) -> Result<Vec<u8>, FetchError> {
        let mut request = self.http.get(format!("{}/{resource}", self.prefix));
        if let Some(token) = &self.token {
            if resource.starts_with("tile/entries/") {
                request = request.bearer_auth(token.expose_secret());
            }
        }
        let mut response = request.send().await.map_err(transport)?;
        let status = response.status();
        if status == reqwest::StatusCode::NOT_FOUND {
            return Err(FetchError::NotFound);
        }
        if !status.is_success() {
            return Err(FetchError::Status(status.as_u16()));
        }
        if response.content_length().is_some_and(|n| n > limit as u64) {
            return Err(FetchError::TooLarge(limit));
        }
        // Streamed, not `bytes()`: a server that sends no length (or lies
        // about it) still cannot make us hold more than `limit`.
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(transport)? {
            if body.len() + chunk.len() > limit {
                return Err(FetchError::TooLarge(limit));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }
}

/// reqwest's own message ("error sending request for url") hides the
/// cause that says what to fix (refused, certificate unknown...).
fn transport(e: reqwest::Error) -> FetchError {
    let mut message = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    FetchError::Transport(message)
}

/// A mirror of the log on disk, laid out as the URL space under
/// `/v1/audit/` (`DIR/checkpoint`, `DIR/tile/0/000`,
/// `DIR/tile/entries/000.p/5`), so a copy made with wget or curl verifies
/// offline.
pub struct DirSource {
    root: PathBuf,
}

impl DirSource {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// Whether the mirror holds entry bundles (a copy made without the
    /// admin token has only the hash tiles).
    pub fn has_entries(&self) -> bool {
        self.root.join("tile").join("entries").is_dir()
    }
}

#[async_trait::async_trait]
impl LogSource for DirSource {
    async fn read(&self, resource: &str, limit: usize) -> Result<Vec<u8>, FetchError> {
        let path = self.root.join(resource);
        let io_error =
            |e: std::io::Error| FetchError::Transport(format!("{}: {e}", path.display()));
        let file = match tokio::fs::File::open(&path).await {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(FetchError::NotFound),
            Err(e) => return Err(io_error(e)),
        };
        let mut bytes = Vec::new();
        file.take(limit as u64 + 1)
            .read_to_end(&mut bytes)
            .await
            .map_err(io_error)?;
        if bytes.len() > limit {
            return Err(FetchError::TooLarge(limit));
        }
        Ok(bytes)
    }
}

/// What to check besides the served checkpoint.
#[derive(Clone, Debug, Default)]
pub struct VerifyOptions {
    /// A signed checkpoint kept from an earlier run: the log must extend it.
    pub old_checkpoint: Option<Vec<u8>>,
    /// Read and check every entry (the source must be able to serve the
    /// entry bundles); otherwise the hash tiles alone.
    pub entries: bool,
}

/// A log that verified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    pub origin: String,
    pub size: u64,
    pub root: NodeHash,
    /// The size of the old checkpoint the log was shown to extend.
    pub old_size: Option<u64>,
    /// 0 when only the hash tiles were checked.
    pub entries_checked: u64,
    /// The served checkpoint note that verified, byte for byte: what to
    /// keep for the next run's old checkpoint.
    pub checkpoint: Vec<u8>,
}

/// Verifies the log `source` serves against the audit `key`: the
/// checkpoint's signature, that it extends `options.old_checkpoint`, and
/// (with `options.entries`) every entry; see the module's documentation.
/// The error names the first thing found wrong.
pub async fn verify(
    source: &dyn LogSource,
    key: &p256::PublicKey,
    options: &VerifyOptions,
) -> Result<Report, VerifyError> {
    let note = source
        .read("checkpoint", CHECKPOINT_LIMIT)
        .await
        .map_err(|reason| VerifyError::Fetch {
            resource: "checkpoint".into(),
            reason,
        })?;
    let checkpoint =
        verify_checkpoint(&note, key, None).map_err(|e| refused(CheckpointKind::Served, e))?;
    if checkpoint.size > MAX_LOG_SIZE {
        return Err(VerifyError::SizeTooLarge {
            size: checkpoint.size,
        });
    }
    let old = match &options.old_checkpoint {
        Some(old) => {
            let old = verify_checkpoint(old, key, Some(&checkpoint.origin))
                .map_err(|e| refused(CheckpointKind::Old, e))?;
            if old.size > checkpoint.size {
                return Err(VerifyError::Shrank {
                    size: checkpoint.size,
                    old_size: old.size,
                });
            }
            Some(old)
        }
        None => None,
    };
    let entries_checked = if options.entries {
        check_entries(source, &checkpoint, old.as_ref()).await?
    } else {
        check_tiles(source, &checkpoint, old.as_ref()).await?;
        0
    };
    Ok(Report {
        origin: checkpoint.origin,
        size: checkpoint.size,
        root: checkpoint.root,
        old_size: old.map(|o| o.size),
        entries_checked,
        checkpoint: note,
    })
}

fn refused(kind: CheckpointKind, e: NoteError) -> VerifyError {
    match e {
        NoteError::Malformed(what) => VerifyError::MalformedCheckpoint(kind, what),
        NoteError::WrongOrigin { expected, found } => VerifyError::WrongOrigin {
            log: expected,
            old: found,
        },
        NoteError::NoSignature => VerifyError::NoSignature(kind),
        NoteError::BadSignature => VerifyError::BadSignature(kind),
    }
}

/// Rebuilds the tree from the entries, comparing every tile the rebuild
/// completes (and, at the end, the partial ones) with the log's; returns
/// the number of entries read.
async fn check_entries(
    source: &dyn LogSource,
    checkpoint: &VerifiedCheckpoint,
    old: Option<&VerifiedCheckpoint>,
) -> Result<u64, VerifyError> {
    let mut edge = TreeEdge::new();
    check_old_root(&edge, old)?;
    let mut filled = Vec::new();
    for bundle_index in 0..checkpoint.size.div_ceil(TILE_WIDTH) {
        let first = bundle_index * TILE_WIDTH;
        let path = TilePath {
            kind: TileKind::Entries,
            index: bundle_index,
            width: (checkpoint.size - first).min(TILE_WIDTH) as u16,
        };
        let (bundle, read_as) = read_tile(source, path, ENTRY_LIMIT).await?;
        let mut entries = bundle_entries(&bundle, read_as.width, first).map_err(|reason| {
            VerifyError::MalformedBundle {
                path: format!("tile/{}", read_as.to_path()),
                reason,
            }
        })?;
        // A full bundle read in place of a deleted partial one holds the
        // entries after the checkpoint too; they are not this tree's.
        entries.truncate(usize::from(path.width));
        for (index, entry) in (first..).zip(entries) {
            check_entry_index(entry, index)?;
            edge.push(leaf_hash(entry), |tile| filled.push(tile));
            for tile in filled.drain(..) {
                compare_tile(source, &tile).await?;
            }
            if let Err(does_not_extend) = check_old_root(&edge, old) {
                // An edited entry under the old checkpoint is the likelier
                // story, and the one to name: the tiles the log serves for
                // this size show which entry it is, if they were not
                // rewritten with it.
                for tile in edge.partial_tiles().iter().filter(|t| t.level == 0) {
                    if let Err(named @ VerifyError::EntryDoesNotHash { .. }) =
                        compare_tile(source, tile).await
                    {
                        return Err(named);
                    }
                }
                return Err(does_not_extend);
            }
        }
    }
    for tile in edge.partial_tiles() {
        compare_tile(source, &tile).await?;
    }
    if root_of(&edge)? != checkpoint.root {
        return Err(VerifyError::RootMismatch {
            size: checkpoint.size,
        });
    }
    Ok(edge.size())
}

/// At the old checkpoint's size, the rebuilt tree must have its root.
fn check_old_root(edge: &TreeEdge, old: Option<&VerifiedCheckpoint>) -> Result<(), VerifyError> {
    match old {
        Some(old) if old.size == edge.size() && root_of(edge)? != old.root => {
            Err(VerifyError::DoesNotExtend { old_size: old.size })
        }
        _ => Ok(()),
    }
}

fn root_of(edge: &TreeEdge) -> Result<NodeHash, VerifyError> {
    edge.root()
        .map_err(|e| VerifyError::Arithmetic(e.to_string()))
}

/// Compares a tile the rebuild made with the one the log serves at its
/// path. At level 0 the culprit is named by the first entry whose leaf
/// hash differs.
async fn compare_tile(source: &dyn LogSource, built: &BuiltTile) -> Result<(), VerifyError> {
    let path = TilePath {
        kind: TileKind::Hashes { level: built.level },
        index: built.index,
        width: (built.hashes.len() / HASH_BYTES) as u16,
    };
    let served = read_hash_tile(source, path).await?;
    if served == built.hashes {
        return Ok(());
    }
    if built.level == 0 {
        let offset = served
            .chunks_exact(HASH_BYTES)
            .zip(built.hashes.chunks_exact(HASH_BYTES))
            .position(|(a, b)| a != b)
            .unwrap_or(0);
        return Err(VerifyError::EntryDoesNotHash {
            index: built.index * TILE_WIDTH + offset as u64,
        });
    }
    Err(VerifyError::TileDiffers {
        level: built.level,
        index: built.index,
    })
}

/// Reads a tile or entry bundle of at most `item_limit` bytes an item,
/// falling back from a partial one that is gone to the full one
/// (c2sp.org/tlog-tiles lets a log delete a partial tile once the full
/// one exists). Returns the bytes and the path they were read as.
async fn read_tile(
    source: &dyn LogSource,
    path: TilePath,
    item_limit: usize,
) -> Result<(Vec<u8>, TilePath), VerifyError> {
    let mut read_as = path;
    let mut result = read_one(source, read_as, item_limit).await;
    if result == Err(FetchError::NotFound) && u64::from(path.width) < TILE_WIDTH {
        read_as.width = TILE_WIDTH as u16;
        result = read_one(source, read_as, item_limit).await;
        if result == Err(FetchError::NotFound) {
            // The partial tile is the one the checkpoint calls for.
            read_as = path;
        }
    }
    let resource = format!("tile/{}", read_as.to_path());
    match result {
        Ok(bytes) => Ok((bytes, read_as)),
        Err(FetchError::TooLarge(limit)) => {
            let reason = format!("longer than {limit} bytes");
            Err(match path.kind {
                TileKind::Entries => VerifyError::MalformedBundle {
                    path: resource,
                    reason,
                },
                TileKind::Hashes { .. } => VerifyError::MalformedTile {
                    path: resource,
                    reason,
                },
            })
        }
        Err(reason) => Err(VerifyError::Fetch { resource, reason }),
    }
}

async fn read_one(
    source: &dyn LogSource,
    path: TilePath,
    item_limit: usize,
) -> Result<Vec<u8>, FetchError> {
    let limit = usize::from(path.width) * item_limit;
    source
        .read(&format!("tile/{}", path.to_path()), limit)
        .await
}

/// A hash tile of exactly the width `path` asks for, so that no tile of
/// the wrong length reaches the hashing (or `tlog_tiles`, which requires
/// it and panics without it).
async fn read_hash_tile(source: &dyn LogSource, path: TilePath) -> Result<Vec<u8>, VerifyError> {
    let (mut bytes, read_as) = read_tile(source, path, HASH_BYTES).await?;
    let expected = usize::from(read_as.width) * HASH_BYTES;
    if bytes.len() != expected {
        return Err(VerifyError::MalformedTile {
            path: format!("tile/{}", read_as.to_path()),
            reason: format!("{} bytes, not {expected}", bytes.len()),
        });
    }
    bytes.truncate(usize::from(path.width) * HASH_BYTES);
    Ok(bytes)
}

/// Splits an entry bundle (big-endian uint16 length, then the entry, for
/// each entry) into exactly `width` entries, refusing a length past the
/// end and bytes after the last entry. `first` is the first entry's index,
/// to name a bad one.
fn bundle_entries(bundle: &[u8], width: u16, first: u64) -> Result<Vec<&[u8]>, String> {
    let mut entries = Vec::with_capacity(usize::from(width));
    let mut rest = bundle;
    while !rest.is_empty() {
        let index = first + entries.len() as u64;
        if entries.len() == usize::from(width) {
            return Err(format!("{} bytes after its {width} entries", rest.len()));
        }
        let (length, tail) = rest
            .split_first_chunk::<2>()
            .ok_or_else(|| format!("entry {index}'s length is cut short"))?;
        let length = usize::from(u16::from_be_bytes(*length));
        if tail.len() < length {
            return Err(format!(
                "entry {index} is {length} bytes long, only {} remain",
                tail.len()
            ));
        }
        let (entry, tail) = tail.split_at(length);
        entries.push(entry);
        rest = tail;
    }
    if entries.len() != usize::from(width) {
        return Err(format!("{} entries, not {width}", entries.len()));
    }
    Ok(entries)
}

/// An entry's `"index"`, read without building the rest of the entry,
/// and refusing an entry that says it twice (two JSON readers could each
/// believe a different one).
struct EntryIndex(u64);

impl<'de> Deserialize<'de> for EntryIndex {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct IndexVisitor;
        impl<'de> Visitor<'de> for IndexVisitor {
            type Value = EntryIndex;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object with an \"index\"")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<EntryIndex, A::Error> {
                let mut index = None;
                while let Some(key) = map.next_key::<String>()? {
                    if key != "index" {
                        map.next_value::<IgnoredAny>()?;
                    } else if index.replace(map.next_value::<u64>()?).is_some() {
                        return Err(de::Error::duplicate_field("index"));
                    }
                }
                index
                    .map(EntryIndex)
                    .ok_or_else(|| de::Error::missing_field("index"))
            }
        }
        deserializer.deserialize_map(IndexVisitor)
    }
}

fn check_entry_index(entry: &[u8], index: u64) -> Result<(), VerifyError> {
    // UTF-8 first: serde_json does not check the strings it skips.
    let entry = std::str::from_utf8(entry).map_err(|e| VerifyError::EntryNotJson {
        index,
        reason: e.to_string(),
    })?;
    match serde_json::from_str::<EntryIndex>(entry) {
        Ok(EntryIndex(found)) if found == index => Ok(()),
        Ok(EntryIndex(found)) => Err(VerifyError::WrongIndex { index, found }),
        Err(e) => Err(VerifyError::EntryNotJson {
            index,
            reason: e.to_string(),
        }),
    }
}

/// Checks the hash tiles alone: the tiles at the tree's edge against the
/// root, and the old checkpoint by a consistency proof computed from
/// tiles.
async fn check_tiles(
    source: &dyn LogSource,
    checkpoint: &VerifiedCheckpoint,
    old: Option<&VerifiedCheckpoint>,
) -> Result<(), VerifyError> {
    let size = checkpoint.size;
    if size == 0 {
        // No tiles to read, and `TileHashReader` has no answer for the
        // empty tree (it indexes its last subtree).
        if checkpoint.root != EMPTY_HASH.0 {
            return Err(VerifyError::RootMismatch { size });
        }
    } else {
        let mut tiles = TileCache::default();
        let root = with_tiles(source, checkpoint, &mut tiles, |reader| {
            tlog::tree_hash(size, reader)
        })
        .await?;
        if root.0 != checkpoint.root {
            return Err(VerifyError::RootMismatch { size });
        }
        if let Some(old) = old.filter(|old| old.size > 0) {
            let proof = with_tiles(source, checkpoint, &mut tiles, |reader| {
                tlog::prove_tree(size, old.size, reader)
            })
            .await?;
            return tlog::check_tree(
                &proof,
                size,
                Hash(checkpoint.root),
                old.size,
                Hash(old.root),
            )
            .map_err(|_| VerifyError::DoesNotExtend { old_size: old.size });
        }
    }
    match old {
        // Every tree extends the empty one, whose root is fixed.
        Some(old) if old.size == 0 && old.root != EMPTY_HASH.0 => {
            Err(VerifyError::DoesNotExtend { old_size: 0 })
        }
        _ => Ok(()),
    }
}

/// The tiles read so far, and those `TileHashReader` asked for that were
/// not there. Its `TileReader` is synchronous while the sources are not:
/// a computation runs, says which tiles it lacks, they are fetched, and
/// it runs again.
#[derive(Default)]
struct TileCache {
    tiles: HashMap<Tile, Vec<u8>>,
    missing: RefCell<Vec<Tile>>,
}

impl TileReader for TileCache {
    fn height(&self) -> u8 {
        TILE_HEIGHT
    }

    fn read_tiles(&self, tiles: &[Tile]) -> Result<Vec<Vec<u8>>, tlog::Error> {
        let missing: Vec<Tile> = tiles
            .iter()
            .filter(|t| !self.tiles.contains_key(t))
            .copied()
            .collect();
        if !missing.is_empty() {
            *self.missing.borrow_mut() = missing;
            return Err(tlog::Error::IndexesNotInTree);
        }
        Ok(tiles.iter().map(|t| self.tiles[t].clone()).collect())
    }

    fn save_tiles(&self, _: &[Tile], _: &[Vec<u8>]) {}
}

/// Runs `op` over the checkpoint's tree read through `TileHashReader`,
/// fetching the tiles it needs. Each `tlog_tiles` computation reads its
/// hashes in one call, so a second run has them all; a third is a bug.
async fn with_tiles<T>(
    source: &dyn LogSource,
    checkpoint: &VerifiedCheckpoint,
    cache: &mut TileCache,
    op: impl Fn(&TileHashReader<'_>) -> Result<T, tlog::Error>,
) -> Result<T, VerifyError> {
    for _ in 0..3 {
        let (outcome, missing) = run_over_tiles(checkpoint, cache, &op);
        match outcome {
            Ok(value) => {
                authenticate(cache, checkpoint.size)?;
                return Ok(value);
            }
            Err(e) if missing.is_empty() => {
                return Err(match e {
                    tlog::Error::InconsistentTile => VerifyError::RootMismatch {
                        size: checkpoint.size,
                    },
                    other => VerifyError::Arithmetic(other.to_string()),
                })
            }
            Err(_) => {}
        }
        for tile in missing {
            let path = TilePath {
                kind: TileKind::Hashes {
                    level: tile.level(),
                },
                index: tile.level_index(),
                width: u16::try_from(tile.width())
                    .map_err(|_| VerifyError::Arithmetic("a tile wider than 256".into()))?,
            };
            let hashes = read_hash_tile(source, path).await?;
            cache.tiles.insert(tile, hashes);
        }
    }
    Err(VerifyError::Arithmetic(
        "the tiles a proof needs are still missing after reading them".into(),
    ))
}

/// Checks every full tile read against the hash of it in its parent tile.
/// `TileHashReader` should have, but skips some: its loop over the tiles
/// below the edge starts at the number of the root's subtrees rather than
/// of the edge tiles holding them (as Go's sumdb/tlog does), so when two
/// subtrees share a tile the first tiles read for a proof go unchecked. A
/// proof built from a bad one still fails `check_tree`, but as a fork;
/// this names the bad tile instead. Parents first: a bad parent makes its
/// good children look bad.
fn authenticate(cache: &TileCache, size: u64) -> Result<(), VerifyError> {
    let mut full: Vec<&Tile> = cache
        .tiles
        .keys()
        .filter(|t| u64::from(t.width()) == TILE_WIDTH)
        .collect();
    full.sort_by_key(|t| (std::cmp::Reverse(t.level()), t.level_index()));
    for tile in full {
        // A tile without a parent read is one the edge authenticated.
        let Some((parent, parent_data)) = tile
            .parent(1, size)
            .and_then(|p| cache.tiles.get(&p).map(|data| (p, data)))
        else {
            continue;
        };
        let index = tlog::stored_hash_index(parent.level() * TILE_HEIGHT, tile.level_index());
        let expected = parent
            .hash_at_index(parent_data, index)
            .map_err(|e| VerifyError::Arithmetic(e.to_string()))?;
        if Tile::subtree_hash(&cache.tiles[tile]) != expected {
            return Err(VerifyError::TileDiffers {
                level: tile.level(),
                index: tile.level_index(),
            });
        }
    }
    Ok(())
}

/// One synchronous run (the reader borrows the cache; nothing here is
/// held across an await).
fn run_over_tiles<T>(
    checkpoint: &VerifiedCheckpoint,
    cache: &TileCache,
    op: &impl Fn(&TileHashReader<'_>) -> Result<T, tlog::Error>,
) -> (Result<T, tlog::Error>, Vec<Tile>) {
    let reader = TileHashReader::new(checkpoint.size, Hash(checkpoint.root), cache);
    let outcome = op(&reader);
    (outcome, cache.missing.take())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use p256::ecdsa::signature::Signer as _;
    use p256::ecdsa::SigningKey;

    use base64::engine::general_purpose::STANDARD;
    use base64::Engine as _;

    use super::super::note::{checkpoint_text, signed_note};
    use super::*;

    const ORIGIN: &str = "keyward.test/audit";

    fn audit_key() -> SigningKey {
        SigningKey::from_slice(&[7u8; 32]).unwrap()
    }

    fn other_key() -> SigningKey {
        SigningKey::from_slice(&[9u8; 32]).unwrap()
    }

    fn public(key: &SigningKey) -> p256::PublicKey {
        p256::PublicKey::from(key.verifying_key())
    }

    fn entry(index: u64) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "index": index,
            "time": 1_700_000_000 + index,
            "actor": "admin",
            "action": "agent.create",
            "subject": format!("agent-{index}"),
            "details": {},
        }))
        .unwrap()
    }

    fn entries(n: u64) -> Vec<Vec<u8>> {
        (0..n).map(entry).collect()
    }

    fn note(origin: &str, size: u64, root: &NodeHash, key: &SigningKey) -> Vec<u8> {
        let text = checkpoint_text(origin, size, root).unwrap();
        let signature: p256::ecdsa::Signature = key.sign(text.as_bytes());
        signed_note(&text, origin, &public(key), &signature).into_bytes()
    }

    fn root(entries: &[Vec<u8>]) -> NodeHash {
        let mut edge = TreeEdge::new();
        for e in entries {
            edge.push(leaf_hash(e), |_| {});
        }
        edge.root().unwrap()
    }

    /// The checkpoint of the log of `entries`, signed by the audit key.
    fn checkpoint_of(entries: &[Vec<u8>]) -> Vec<u8> {
        note(ORIGIN, entries.len() as u64, &root(entries), &audit_key())
    }

    fn bundle(entries: &[Vec<u8>]) -> Vec<u8> {
        let mut bytes = Vec::new();
        for e in entries {
            bytes.extend_from_slice(&(e.len() as u16).to_be_bytes());
            bytes.extend_from_slice(e);
        }
        bytes
    }

    fn put(dir: &Path, resource: &str, bytes: &[u8]) {
        let path = dir.join(resource);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }

    fn put_tile(dir: &Path, tile: &BuiltTile) {
        let path = TilePath {
            kind: TileKind::Hashes { level: tile.level },
            index: tile.index,
            width: (tile.hashes.len() / HASH_BYTES) as u16,
        };
        put(dir, &format!("tile/{}", path.to_path()), &tile.hashes);
    }

    /// Writes the log of `entries` as the server lays it out: entry
    /// bundles, every hash tile, and a checkpoint signed by `key`.
    fn write_log(dir: &Path, entries: &[Vec<u8>], key: &SigningKey) {
        let mut edge = TreeEdge::new();
        for (n, chunk) in entries.chunks(TILE_WIDTH as usize).enumerate() {
            let path = TilePath {
                kind: TileKind::Entries,
                index: n as u64,
                width: chunk.len() as u16,
            };
            put(dir, &format!("tile/{}", path.to_path()), &bundle(chunk));
            for e in chunk {
                edge.push(leaf_hash(e), |tile| put_tile(dir, &tile));
            }
        }
        for tile in edge.partial_tiles() {
            put_tile(dir, &tile);
        }
        let size = entries.len() as u64;
        put(
            dir,
            "checkpoint",
            &note(ORIGIN, size, &edge.root().unwrap(), key),
        );
    }

    /// A log of `n` entries in a temporary directory, signed by the audit key.
    fn log(n: u64) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        write_log(dir.path(), &entries(n), &audit_key());
        dir
    }

    async fn check(dir: &Path, old: Option<Vec<u8>>, entries: bool) -> Result<Report, VerifyError> {
        let options = VerifyOptions {
            old_checkpoint: old,
            entries,
        };
        verify(&DirSource::new(dir), &public(&audit_key()), &options).await
    }

    /// The same outcome whether the entries are read or only the tiles.
    async fn check_both(dir: &Path, old: Option<Vec<u8>>) -> Result<Report, VerifyError> {
        let from_tiles = check(dir, old.clone(), false).await;
        let from_entries = check(dir, old, true).await;
        assert_eq!(
            from_tiles.as_ref().map(|r| (r.size, r.root, r.old_size)),
            from_entries.as_ref().map(|r| (r.size, r.root, r.old_size)),
        );
        from_entries
    }

    #[tokio::test]
    async fn an_intact_log_verifies_from_its_entries_and_from_its_tiles_alone() {
        let dir = log(600);
        let all = entries(600);
        let report = check(dir.path(), None, true).await.unwrap();
        assert_eq!(
            report,
            Report {
                origin: ORIGIN.into(),
                size: 600,
                root: root(&all),
                old_size: None,
                entries_checked: 600,
                checkpoint: checkpoint_of(&all),
            }
        );
        let report = check(dir.path(), None, false).await.unwrap();
        assert_eq!((report.size, report.entries_checked), (600, 0));
    }

    #[tokio::test]
    async fn a_log_extends_each_of_its_older_checkpoints() {
        let dir = log(600);
        let all = entries(600);
        for old_size in [1, 2, 255, 256, 257, 300, 512, 599, 600] {
            let old = checkpoint_of(&all[..old_size]);
            let report = check_both(dir.path(), Some(old)).await.unwrap();
            assert_eq!(
                report.old_size,
                Some(old_size as u64),
                "old size {old_size}"
            );
        }
    }

    #[tokio::test]
    async fn an_empty_log_verifies_and_extends_only_the_empty_log() {
        let dir = log(0);
        assert_eq!(check_both(dir.path(), None).await.unwrap().size, 0);
        let empty = checkpoint_of(&[]);
        assert_eq!(
            check_both(dir.path(), Some(empty)).await.unwrap().old_size,
            Some(0)
        );
        let bogus_empty = note(ORIGIN, 0, &[1u8; 32], &audit_key());
        assert_eq!(
            check_both(dir.path(), Some(bogus_empty)).await,
            Err(VerifyError::DoesNotExtend { old_size: 0 })
        );
    }

    #[tokio::test]
    async fn an_edited_entry_is_named_by_its_index() {
        for edited in [0, 17, 255, 256, 520, 599] {
            let dir = log(600);
            let mut all = entries(600);
            all[edited as usize] = entry(edited)
                .iter()
                .map(|&b| if b == b'-' { b'_' } else { b })
                .collect();
            let n = edited / TILE_WIDTH;
            let first = (n * TILE_WIDTH) as usize;
            let path = TilePath {
                kind: TileKind::Entries,
                index: n,
                width: (all.len() - first).min(256) as u16,
            };
            let end = first + usize::from(path.width);
            put(
                dir.path(),
                &format!("tile/{}", path.to_path()),
                &bundle(&all[first..end]),
            );
            assert_eq!(
                check(dir.path(), None, true).await,
                Err(VerifyError::EntryDoesNotHash { index: edited }),
            );
        }
    }

    #[tokio::test]
    async fn a_deleted_entry_is_caught() {
        let dir = log(600);
        let all = entries(600);
        let mut short = all[256..512].to_vec();
        short.remove(44);
        put(dir.path(), "tile/entries/001", &bundle(&short));
        assert_eq!(
            check(dir.path(), None, true).await,
            Err(VerifyError::MalformedBundle {
                path: "tile/entries/001".into(),
                reason: "255 entries, not 256".into()
            })
        );
    }

    #[tokio::test]
    async fn a_deleted_entry_with_the_rest_renumbered_is_an_entry_with_the_wrong_index() {
        let dir = log(600);
        let mut all = entries(600);
        all.remove(300);
        // The entry after the gap moves into its place, still saying 301.
        put(dir.path(), "tile/entries/001", &bundle(&all[256..512]));
        assert_eq!(
            check(dir.path(), None, true).await,
            Err(VerifyError::WrongIndex {
                index: 300,
                found: 301
            })
        );
    }

    #[tokio::test]
    async fn an_entry_that_is_not_json_is_named_by_its_index() {
        let dir = log(600);
        let mut all = entries(600);
        all[3] = b"not json".to_vec();
        put(dir.path(), "tile/entries/000", &bundle(&all[..256]));
        assert!(matches!(
            check(dir.path(), None, true).await,
            Err(VerifyError::EntryNotJson { index: 3, .. })
        ));
    }

    /// The log rebuilt with entry 17 changed, its tiles and root recomputed
    /// to match: the history rewritten consistently.
    fn rewritten(key: &SigningKey) -> (tempfile::TempDir, Vec<Vec<u8>>) {
        let mut all = entries(600);
        all[17] = serde_json::to_vec(&serde_json::json!({
            "index": 17, "actor": "admin", "action": "nothing.happened", "subject": "-",
        }))
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        write_log(dir.path(), &all, key);
        (dir, all)
    }

    #[tokio::test]
    async fn a_rewritten_history_under_the_genuine_checkpoint_does_not_hash_to_its_root() {
        let (dir, _) = rewritten(&audit_key());
        put(dir.path(), "checkpoint", &checkpoint_of(&entries(600)));
        assert_eq!(
            check_both(dir.path(), None).await,
            Err(VerifyError::RootMismatch { size: 600 })
        );
    }

    #[tokio::test]
    async fn a_checkpoint_edited_to_the_rewritten_root_is_a_bad_signature() {
        let (dir, rewritten) = rewritten(&audit_key());
        let genuine = String::from_utf8(checkpoint_of(&entries(600))).unwrap();
        let forged = genuine.replace(
            &STANDARD.encode(root(&entries(600))),
            &STANDARD.encode(root(&rewritten)),
        );
        assert_ne!(forged, genuine);
        put(dir.path(), "checkpoint", forged.as_bytes());
        assert_eq!(
            check_both(dir.path(), None).await,
            Err(VerifyError::BadSignature(CheckpointKind::Served))
        );
    }

    #[tokio::test]
    async fn a_rewritten_history_signed_by_another_key_has_no_signature() {
        let (dir, _) = rewritten(&other_key());
        assert_eq!(
            check_both(dir.path(), None).await,
            Err(VerifyError::NoSignature(CheckpointKind::Served))
        );
    }

    #[tokio::test]
    async fn a_rewritten_history_signed_by_the_audit_key_does_not_extend_an_old_checkpoint() {
        // The audit key itself re-signed a rewritten tree (a stolen key or
        // a compromised server): only a checkpoint kept from before shows it.
        let (dir, _) = rewritten(&audit_key());
        let kept = checkpoint_of(&entries(300));
        assert_eq!(check_both(dir.path(), None).await.unwrap().size, 600);
        assert_eq!(
            check_both(dir.path(), Some(kept)).await,
            Err(VerifyError::DoesNotExtend { old_size: 300 })
        );
        // Entry 17 is past a checkpoint of size 17: that one still holds.
        let before_the_edit = checkpoint_of(&entries(17));
        assert_eq!(
            check_both(dir.path(), Some(before_the_edit))
                .await
                .unwrap()
                .old_size,
            Some(17)
        );
    }

    #[tokio::test]
    async fn a_log_that_shrank_is_refused() {
        let dir = log(300);
        let kept = checkpoint_of(&entries(600));
        assert_eq!(
            check_both(dir.path(), Some(kept)).await,
            Err(VerifyError::Shrank {
                size: 300,
                old_size: 600
            })
        );
    }

    #[tokio::test]
    async fn an_old_checkpoint_of_another_log_is_refused() {
        let dir = log(600);
        let other = note(
            "elsewhere.test/audit",
            300,
            &root(&entries(300)),
            &audit_key(),
        );
        assert_eq!(
            check_both(dir.path(), Some(other)).await,
            Err(VerifyError::WrongOrigin {
                log: ORIGIN.into(),
                old: "elsewhere.test/audit".into()
            })
        );
    }

    #[tokio::test]
    async fn an_old_checkpoint_by_another_key_is_refused() {
        let dir = log(600);
        let other = note(ORIGIN, 300, &root(&entries(300)), &other_key());
        assert_eq!(
            check_both(dir.path(), Some(other)).await,
            Err(VerifyError::NoSignature(CheckpointKind::Old))
        );
    }

    #[tokio::test]
    async fn a_checkpoint_claiming_an_impossible_size_is_refused() {
        let dir = log(600);
        let huge = note(ORIGIN, u64::MAX, &root(&entries(600)), &audit_key());
        put(dir.path(), "checkpoint", &huge);
        assert_eq!(
            check_both(dir.path(), None).await,
            Err(VerifyError::SizeTooLarge { size: u64::MAX })
        );
    }

    #[tokio::test]
    async fn tiles_of_the_wrong_length_or_garbage_are_errors_not_panics() {
        // The edge tiles (0/002.p/88, 1/000.p/2) and one inside the tree
        // that the consistency proof from 300 needs (0/001).
        for resource in ["tile/0/002.p/88", "tile/1/000.p/2", "tile/0/001"] {
            let right = std::fs::read(log(600).path().join(resource)).unwrap();
            let garbage: Vec<u8> = (0..right.len()).map(|i| (i * 7 + 1) as u8).collect();
            let mut long = right.clone();
            long.push(0);
            for bad in [
                Vec::new(),
                right[..right.len() - 1].to_vec(),
                right[..32].to_vec(),
                long,
                vec![0u8; 256 * 32 + 1],
                vec![0xff; 1 << 20],
                garbage,
            ] {
                let dir = log(600);
                put(dir.path(), resource, &bad);
                for old in [None, Some(checkpoint_of(&entries(300)))] {
                    for entries in [false, true] {
                        // Without the entries or an old checkpoint, only
                        // the edge tiles are read.
                        let read = entries || old.is_some() || resource != "tile/0/001";
                        let outcome = check(dir.path(), old.clone(), entries).await;
                        assert_eq!(
                            outcome.is_err(),
                            read,
                            "{resource}, {} bytes, entries {entries}",
                            bad.len()
                        );
                    }
                }
            }
        }
    }

    #[tokio::test]
    async fn a_missing_tile_is_named_by_its_path() {
        let dir = log(600);
        std::fs::remove_file(dir.path().join("tile/1/000.p/2")).unwrap();
        for entries in [false, true] {
            assert_eq!(
                check(dir.path(), None, entries).await,
                Err(VerifyError::Fetch {
                    resource: "tile/1/000.p/2".into(),
                    reason: FetchError::NotFound
                })
            );
        }
    }

    #[tokio::test]
    async fn a_tampered_tile_is_named_when_the_entries_are_read() {
        let dir = log(600);
        let path = dir.path().join("tile/0/001");
        let mut tile = std::fs::read(&path).unwrap();
        tile[40 * 32] ^= 1;
        std::fs::write(&path, tile).unwrap();
        assert_eq!(
            check(dir.path(), None, true).await,
            Err(VerifyError::EntryDoesNotHash { index: 256 + 40 })
        );
        // A tile inside the tree is not read without an old checkpoint.
        assert!(check(dir.path(), None, false).await.is_ok());
        assert_eq!(
            check(dir.path(), Some(checkpoint_of(&entries(300))), false).await,
            Err(VerifyError::TileDiffers { level: 0, index: 1 })
        );
    }

    /// A log grown from 600 entries to 768 that has deleted the partial
    /// tile and bundle of 600 that a full one replaces (0/002.p/88,
    /// entries/002.p/88) and kept the other (1/000.p/2), serving the
    /// checkpoint of 600 still.
    fn grown_log() -> tempfile::TempDir {
        let dir = log(768);
        let partial = "tile/1/000.p/2";
        let tile = std::fs::read(log(600).path().join(partial)).unwrap();
        put(dir.path(), partial, &tile);
        put(dir.path(), "checkpoint", &checkpoint_of(&entries(600)));
        dir
    }

    #[tokio::test]
    async fn a_partial_tile_since_completed_is_read_from_the_full_one() {
        let dir = grown_log();
        assert!(!dir.path().join("tile/0/002.p/88").exists());
        assert!(!dir.path().join("tile/entries/002.p/88").exists());
        let report = check_both(dir.path(), Some(checkpoint_of(&entries(300))))
            .await
            .unwrap();
        assert_eq!((report.size, report.entries_checked), (600, 600));
    }

    #[tokio::test]
    async fn a_log_past_a_full_level_one_tile_verifies_and_names_a_bad_one() {
        let n = 65_536 + 300;
        let dir = log(n);
        let all = entries(n);
        let report = check_both(dir.path(), Some(checkpoint_of(&all[..65_000])))
            .await
            .unwrap();
        assert_eq!((report.size, report.old_size), (n, Some(65_000)));
        let tile = dir.path().join("tile/1/000");
        let mut hashes = std::fs::read(&tile).unwrap();
        hashes[5 * 32] ^= 1;
        std::fs::write(&tile, hashes).unwrap();
        assert_eq!(
            check(dir.path(), None, true).await,
            Err(VerifyError::TileDiffers { level: 1, index: 0 })
        );
        // Its hash 5 is not one the proof from 1,300 uses; the tile is
        // still checked whole against its parent.
        assert_eq!(
            check_both(dir.path(), Some(checkpoint_of(&all[..1_300]))).await,
            Err(VerifyError::TileDiffers { level: 1, index: 0 })
        );
        assert!(check(dir.path(), None, false).await.is_ok());
    }

    #[test]
    fn a_bundle_holds_exactly_its_entries() {
        let two = bundle(&[b"ab".to_vec(), b"c".to_vec()]);
        assert_eq!(
            bundle_entries(&two, 2, 0).unwrap(),
            vec![&b"ab"[..], &b"c"[..]]
        );
        let mut trailing = two.clone();
        trailing.push(0);
        let mut past_the_end = two.clone();
        past_the_end.extend_from_slice(&[0, 9, b'x']);
        for (bad, width, reason) in [
            (&two[..], 3, "2 entries, not 3"),
            (&two[..], 1, "3 bytes after its 1 entries"),
            (&trailing[..], 2, "1 bytes after its 2 entries"),
            (
                &past_the_end[..],
                3,
                "entry 12 is 9 bytes long, only 1 remain",
            ),
            (&two[..3], 2, "entry 10 is 2 bytes long, only 1 remain"),
            (&[][..], 1, "0 entries, not 1"),
            (&[0u8][..], 1, "entry 10's length is cut short"),
        ] {
            let first = if reason.contains("entry 1") { 10 } else { 0 };
            assert_eq!(
                bundle_entries(bad, width, first),
                Err(reason.into()),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn an_entry_is_a_json_object_that_says_its_own_index_once() {
        assert_eq!(
            check_entry_index(br#"{"index":5,"a":[1,{"index":9}]}"#, 5),
            Ok(())
        );
        assert_eq!(check_entry_index(br#"{"ind\u0065x":5}"#, 5), Ok(()));
        assert_eq!(
            check_entry_index(br#"{"index":6}"#, 5),
            Err(VerifyError::WrongIndex { index: 5, found: 6 })
        );
        for bad in [
            &br#"{"index":5,"index":5}"#[..],
            br#"{"index":5,"index":6}"#,
            br#"{"index":"5"}"#,
            br#"{"index":5.0}"#,
            br#"{"index":-5}"#,
            br#"{"other":5}"#,
            br#"[5]"#,
            br#"5"#,
            br#"{"index":5} x"#,
            br#"{"index":5"#,
            b"{\"index\":5,\"s\":\"\xff\"}",
            b"",
        ] {
            assert!(
                matches!(
                    check_entry_index(bad, 5),
                    Err(VerifyError::EntryNotJson { index: 5, .. })
                ),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[tokio::test]
    async fn the_directory_source_refuses_more_than_its_limit() {
        let dir = tempfile::tempdir().unwrap();
        put(dir.path(), "checkpoint", b"12345");
        let source = DirSource::new(dir.path());
        assert_eq!(source.read("checkpoint", 5).await.unwrap(), b"12345");
        assert_eq!(
            source.read("checkpoint", 4).await,
            Err(FetchError::TooLarge(4))
        );
        assert_eq!(
            source.read("tile/0/000", 4).await,
            Err(FetchError::NotFound)
        );
        assert!(!source.has_entries());
    }

    /// A server of the fixture as keyward lays it out (bundles behind the
    /// admin token), over plain HTTP on loopback.
    async fn serve(dir: PathBuf) -> String {
        use axum::extract::{Path as UrlPath, State};
        use axum::http::{HeaderMap, StatusCode};

        async fn resource(
            State(dir): State<PathBuf>,
            UrlPath(path): UrlPath<String>,
            headers: HeaderMap,
        ) -> Result<Vec<u8>, StatusCode> {
            let authorized = headers
                .get("authorization")
                .is_some_and(|v| v == "Bearer admin-secret");
            if path.starts_with("tile/entries/") && !authorized {
                return Err(StatusCode::UNAUTHORIZED);
            }
            std::fs::read(dir.join(path)).map_err(|_| StatusCode::NOT_FOUND)
        }

        let app = axum::Router::new()
            .route("/v1/audit/{*path}", axum::routing::get(resource))
            .with_state(dir);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        url
    }

    #[tokio::test]
    async fn the_http_source_reads_the_log_and_shows_the_token_for_entries_only() {
        let dir = grown_log();
        let url = serve(dir.path().to_owned()).await;
        let key = public(&audit_key());
        let with_token = HttpSource::new(
            reqwest::Client::new(),
            &format!("{url}/"),
            Some(SecretString::from("admin-secret")),
        );
        let options = VerifyOptions {
            old_checkpoint: Some(checkpoint_of(&entries(300))),
            entries: true,
        };
        let report = verify(&with_token, &key, &options).await.unwrap();
        assert_eq!((report.size, report.entries_checked), (600, 600));

        let without = HttpSource::new(reqwest::Client::new(), &url, None);
        assert_eq!(
            verify(&without, &key, &options).await,
            Err(VerifyError::Fetch {
                resource: "tile/entries/000".into(),
                reason: FetchError::Status(401)
            })
        );
        let tiles_only = VerifyOptions {
            entries: false,
            ..options
        };
        assert_eq!(
            verify(&without, &key, &tiles_only).await.unwrap().old_size,
            Some(300)
        );
    }

    /// Not a test: writes a fixture for trying the CLI by hand, e.g.
    /// `KEYWARD_AUDIT_FIXTURE=/tmp/log [KEYWARD_AUDIT_FIXTURE_SIZE=1234]
    /// cargo test --lib -- --ignored write_a_fixture`, then `keyward audit verify --dir /tmp/log/log
    /// --key /tmp/log/audit.pem --checkpoint /tmp/log/old-checkpoint`.
    #[test]
    #[ignore = "writes a fixture to $KEYWARD_AUDIT_FIXTURE"]
    fn write_a_fixture() {
        use p256::pkcs8::{EncodePublicKey as _, LineEnding};
        let Ok(out) = std::env::var("KEYWARD_AUDIT_FIXTURE") else {
            return;
        };
        let out = Path::new(&out);
        let size = std::env::var("KEYWARD_AUDIT_FIXTURE_SIZE").map_or(1234, |s| s.parse().unwrap());
        let all = entries(size);
        write_log(&out.join("log"), &all, &audit_key());
        put(
            out,
            "old-checkpoint",
            &checkpoint_of(&all[..all.len() * 4 / 5]),
        );
        let pem = public(&audit_key())
            .to_public_key_pem(LineEnding::LF)
            .unwrap();
        put(out, "audit.pem", pem.as_bytes());
    }
}
