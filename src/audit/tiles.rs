//! The audit log as C2SP tlog-tiles (c2sp.org/tlog-tiles): tile paths, and
//! the tree's right edge, from which the log's tiles and root are built one
//! leaf at a time.
//!
//! Paths are parsed and written here because `tlog_tiles::Tile::path`
//! writes Go sumdb's form (`tile/8/data/...`, with the height), not
//! C2SP's (`tile/entries/...`, no height). The hashing is `tlog_tiles`':
//! a tile's subtree hashes (`Tile::subtree_hash`) and the root
//! (`tlog::tree_hash`) over the right edge.

use tlog_tiles::tile::Tile;
use tlog_tiles::tlog::{self, Hash, HashReader};

use super::merkle::NodeHash;

/// Hashes in a full tile: tiles are 8 levels of the tree high.
pub const TILE_WIDTH: u64 = 256;
const TILE_HEIGHT: u8 = 8;
pub const HASH_BYTES: usize = 32;
/// Levels a log of at most 2^64 entries can have.
const MAX_LEVEL: u8 = 63;

/// What a tile holds: tree hashes at a level, or the entries themselves
/// (an entry bundle).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TileKind {
    Hashes { level: u8 },
    Entries,
}

/// One tile or entry bundle: its kind, its index within its level, and how
/// many hashes or entries it holds (1-256; fewer than 256 is a partial
/// tile).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TilePath {
    pub kind: TileKind,
    pub index: u64,
    pub width: u16,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("not a C2SP tile path: {0}")]
pub struct TilePathError(&'static str);

impl TilePath {
    /// Parses the part of a tile URL after `tile/`: `<L>/<N>[.p/<W>]` or
    /// `entries/<N>[.p/<W>]`, refusing every non-canonical spelling (so one
    /// tile has one URL, and caches hold it once).
    pub fn parse(path: &str) -> Result<Self, TilePathError> {
        let (kind, rest) = path.split_once('/').ok_or(TilePathError("no level"))?;
        let kind = if kind == "entries" {
            TileKind::Entries
        } else {
            let level = canonical_decimal(kind).ok_or(TilePathError("level"))?;
            match u8::try_from(level) {
                Ok(level) if level <= MAX_LEVEL => TileKind::Hashes { level },
                _ => return Err(TilePathError("level above 63")),
            }
        };
        let (index, width) = match rest.split_once(".p/") {
            Some((index, width)) => {
                let width = canonical_decimal(width).ok_or(TilePathError("width"))?;
                if !(1..TILE_WIDTH).contains(&width) {
                    return Err(TilePathError("a partial width is 1-255"));
                }
                (index, width as u16)
            }
            None => (rest, TILE_WIDTH as u16),
        };
        Ok(Self {
            kind,
            index: tile_index(index)?,
            width,
        })
    }

    /// The path after `tile/`, as [`TilePath::parse`] reads it.
    pub fn to_path(self) -> String {
        let kind = match self.kind {
            TileKind::Hashes { level } => level.to_string(),
            TileKind::Entries => "entries".into(),
        };
        let mut groups = vec![format!("{:03}", self.index % 1000)];
        let mut n = self.index / 1000;
        while n > 0 {
            groups.push(format!("x{:03}", n % 1000));
            n /= 1000;
        }
        groups.reverse();
        let partial = if u64::from(self.width) == TILE_WIDTH {
            String::new()
        } else {
            format!(".p/{}", self.width)
        };
        format!("{kind}/{}{partial}", groups.join("/"))
    }

    /// The level of the tree the tile's hashes are at, in tiles (an entry
    /// bundle's entries are level 0's leaves).
    pub fn level(self) -> u8 {
        match self.kind {
            TileKind::Hashes { level } => level,
            TileKind::Entries => 0,
        }
    }

    /// How many entries a log needs for this tile to exist: its last hash
    /// must be complete. `None` past 2^64.
    pub fn needs_entries(self) -> Option<u64> {
        let hashes = self
            .index
            .checked_mul(TILE_WIDTH)?
            .checked_add(u64::from(self.width))?;
        let per_hash = 1u64.checked_shl(8 * u32::from(self.level()))?;
        hashes.checked_mul(per_hash)
    }

    /// The entries an entry bundle holds.
    pub fn entry_range(self) -> std::ops::Range<u64> {
        let first = self.index * TILE_WIDTH;
        first..first + u64::from(self.width)
    }
}

/// A canonical decimal: digits, no leading zero unless it is `0`.
fn canonical_decimal(s: &str) -> Option<u64> {
    let canonical =
        !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && (s == "0" || !s.starts_with('0'));
    canonical.then(|| s.parse().ok()).flatten()
}

/// `x001/x234/067` is 1234067: three-digit groups, all but the last with
/// an `x`, and no leading `x000` group.
fn tile_index(path: &str) -> Result<u64, TilePathError> {
    let groups: Vec<&str> = path.split('/').collect();
    let (last, rest) = groups.split_last().ok_or(TilePathError("index"))?;
    if rest.len() > 6 || rest.first().is_some_and(|g| *g == "x000") {
        return Err(TilePathError("index"));
    }
    let three_digits =
        |g: &str| (g.len() == 3 && g.bytes().all(|b| b.is_ascii_digit())).then(|| g.parse::<u64>());
    let mut index: u64 = 0;
    for group in rest {
        let digits = group
            .strip_prefix('x')
            .and_then(three_digits)
            .and_then(Result::ok)
            .ok_or(TilePathError("index"))?;
        index = index * 1000 + digits;
    }
    let digits = three_digits(last)
        .and_then(Result::ok)
        .ok_or(TilePathError("index"))?;
    index
        .checked_mul(1000)
        .and_then(|i| i.checked_add(digits))
        .ok_or(TilePathError("index past 2^64"))
}

/// A tile the tree builder completed or extended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuiltTile {
    pub level: u8,
    pub index: u64,
    /// Its hashes so far, 32 bytes each.
    pub hashes: Vec<u8>,
}

/// The tree's right edge: the rightmost tile at each level (full or
/// partial), which is all that appending a leaf changes and all the root
/// needs. Built from nothing, or resumed from stored tiles.
#[derive(Clone, Debug, Default)]
pub struct TreeEdge {
    size: u64,
    /// Level 0 first. A tile that fills stays until the next hash at its
    /// level starts a new one.
    tiles: Vec<Vec<u8>>,
}

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum TreeError {
    #[error("stored tile {level}/{index} is missing or shorter than {width} hashes")]
    MissingTile { level: u8, index: u64, width: u64 },
    #[error("the tree's arithmetic failed: {0}")]
    Arithmetic(String),
}

impl TreeEdge {
    /// The empty tree.
    pub fn new() -> Self {
        Self::default()
    }

    /// The edge of a tree of `size` leaves, from its stored tiles:
    /// `read(level, index)` gives a tile's hashes (it may be wider than the
    /// tree needs: a later tree's tile; the extra hashes are dropped).
    pub fn resume(
        size: u64,
        mut read: impl FnMut(u8, u64) -> Option<Vec<u8>>,
    ) -> Result<Self, TreeError> {
        let mut tiles = Vec::new();
        for (level, index, width) in Self::edge_tiles(size) {
            let missing = TreeError::MissingTile {
                level,
                index,
                width,
            };
            let mut hashes = read(level, index).ok_or(missing.clone())?;
            let bytes = width as usize * HASH_BYTES;
            if hashes.len() < bytes {
                return Err(missing);
            }
            hashes.truncate(bytes);
            tiles.push(hashes);
        }
        Ok(Self { size, tiles })
    }

    /// The tiles at the edge of a tree of `size` leaves, level 0 first:
    /// `(level, index, width)`, the rightmost tile of each level (full
    /// when the level's count is a multiple of 256).
    pub fn edge_tiles(size: u64) -> Vec<(u8, u64, u64)> {
        let mut edge = Vec::new();
        let mut level = 0u8;
        let mut count = size;
        while count > 0 {
            let index = (count - 1) / TILE_WIDTH;
            edge.push((level, index, count - index * TILE_WIDTH));
            level += 1;
            count /= TILE_WIDTH;
        }
        edge
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Appends a leaf hash; every tile that fills on the way up is handed
    /// to `filled`, with its final hashes.
    pub fn push(&mut self, leaf: NodeHash, mut filled: impl FnMut(BuiltTile)) {
        let mut hash = leaf;
        // The leaves the subtrees of the current level span, before this one.
        let mut count = self.size;
        for level in 0u8.. {
            if self.tiles.len() == usize::from(level) {
                self.tiles
                    .push(Vec::with_capacity(TILE_WIDTH as usize * HASH_BYTES));
            }
            let tile = &mut self.tiles[usize::from(level)];
            if tile.len() == TILE_WIDTH as usize * HASH_BYTES {
                tile.clear();
            }
            tile.extend_from_slice(&hash);
            if tile.len() < TILE_WIDTH as usize * HASH_BYTES {
                break;
            }
            filled(BuiltTile {
                level,
                index: count / TILE_WIDTH,
                hashes: tile.clone(),
            });
            hash = Tile::subtree_hash(tile).0;
            count /= TILE_WIDTH;
        }
        self.size += 1;
    }

    /// The partial tiles at the edge (full ones were handed out as they
    /// filled).
    pub fn partial_tiles(&self) -> Vec<BuiltTile> {
        let mut count = self.size;
        let mut partial = Vec::new();
        for (level, hashes) in self.tiles.iter().enumerate() {
            if count == 0 {
                break;
            }
            if count % TILE_WIDTH != 0 {
                partial.push(BuiltTile {
                    level: level as u8,
                    index: count / TILE_WIDTH,
                    hashes: hashes.clone(),
                });
            }
            count /= TILE_WIDTH;
        }
        partial
    }

    /// The RFC 6962 root of the tree (of no leaves: SHA-256 of nothing).
    pub fn root(&self) -> Result<NodeHash, TreeError> {
        if self.size == 0 {
            return Ok(empty_root());
        }
        tlog::tree_hash(self.size, self)
            .map(|h| h.0)
            .map_err(|e| TreeError::Arithmetic(e.to_string()))
    }
}

fn empty_root() -> NodeHash {
    use sha2::Digest as _;
    sha2::Sha256::digest([]).into()
}

/// The root's subtrees all lie in the edge tiles (each is the rightmost
/// whole subtree of its size), so the edge answers every hash `tree_hash`
/// asks for.
impl HashReader for TreeEdge {
    fn read_hashes(&self, indexes: &[u64]) -> Result<Vec<Hash>, tlog::Error> {
        indexes
            .iter()
            .map(|&index| {
                let tile = Tile::from_index(TILE_HEIGHT, index);
                let edge = self
                    .tiles
                    .get(usize::from(tile.level()))
                    .ok_or(tlog::Error::IndexesNotInTree)?;
                let edge_index = {
                    let count = self.size >> (8 * u32::from(tile.level()));
                    (count.max(1) - 1) / TILE_WIDTH
                };
                if edge_index != tile.level_index() {
                    return Err(tlog::Error::IndexesNotInTree);
                }
                tile.hash_at_index(edge, index)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    fn leaf(i: u64) -> NodeHash {
        super::super::merkle::leaf_hash(&i.to_be_bytes())
    }

    /// RFC 6962 section 2.1, written out plainly.
    fn mth(leaves: &[NodeHash]) -> NodeHash {
        match leaves.len() {
            0 => Sha256::digest([]).into(),
            1 => leaves[0],
            n => {
                let mut k = 1;
                while k * 2 < n {
                    k *= 2;
                }
                let mut h = Sha256::new();
                h.update([1u8]);
                h.update(mth(&leaves[..k]));
                h.update(mth(&leaves[k..]));
                h.finalize().into()
            }
        }
    }

    #[test]
    fn the_edge_root_is_the_rfc6962_root_at_every_size() {
        let leaves: Vec<NodeHash> = (0..1100).map(leaf).collect();
        let mut edge = TreeEdge::new();
        assert_eq!(edge.root().unwrap(), mth(&[]));
        for (i, l) in leaves.iter().enumerate() {
            edge.push(*l, |_| {});
            assert_eq!(edge.root().unwrap(), mth(&leaves[..=i]), "size {}", i + 1);
        }
    }

    #[test]
    fn the_root_holds_across_a_second_level_of_tiles() {
        let n = 2 * 65_536 + 300;
        let leaves: Vec<NodeHash> = (0..n).map(leaf).collect();
        let mut edge = TreeEdge::new();
        for l in &leaves {
            edge.push(*l, |_| {});
        }
        assert_eq!(edge.root().unwrap(), mth(&leaves));
    }

    #[test]
    fn filled_and_partial_tiles_are_c2sp_tiles() {
        // A tree of 70,000: 273 full level-0 tiles, one of width 112; one
        // full level-1 tile, one of width 17; a level-2 tile of width 1.
        let mut full = Vec::new();
        let mut edge = TreeEdge::new();
        for i in 0..70_000 {
            edge.push(leaf(i), |t| full.push(t));
        }
        let count = |level| full.iter().filter(|t| t.level == level).count();
        assert_eq!((count(0), count(1), count(2)), (273, 1, 0));
        let widths: Vec<(u8, u64, usize)> = edge
            .partial_tiles()
            .iter()
            .map(|t| (t.level, t.index, t.hashes.len() / HASH_BYTES))
            .collect();
        assert_eq!(widths, vec![(0, 273, 112), (1, 1, 17), (2, 0, 1)]);
        // A level-1 hash is the root of the full level-0 tile below it.
        let first: Vec<NodeHash> = (0..256).map(leaf).collect();
        assert_eq!(
            full.iter().find(|t| t.level == 1).unwrap().hashes[..32],
            mth(&first)
        );
    }

    #[test]
    fn a_resumed_edge_goes_on_as_the_original() {
        let mut stored = std::collections::HashMap::new();
        let mut edge = TreeEdge::new();
        for i in 0..66_000 {
            edge.push(leaf(i), |t| {
                stored.insert((t.level, t.index), t.hashes);
            });
        }
        for t in edge.partial_tiles() {
            stored.insert((t.level, t.index), t.hashes);
        }
        let mut resumed = TreeEdge::resume(66_000, |l, i| stored.get(&(l, i)).cloned()).unwrap();
        assert_eq!(resumed.root(), edge.root());
        for i in 66_000..66_600 {
            edge.push(leaf(i), |_| {});
            resumed.push(leaf(i), |_| {});
        }
        assert_eq!(resumed.root(), edge.root());
    }

    #[test]
    fn resuming_without_the_tiles_is_an_error() {
        assert_eq!(
            TreeEdge::resume(300, |_, _| None).unwrap_err(),
            TreeError::MissingTile {
                level: 0,
                index: 1,
                width: 44
            }
        );
    }

    #[test]
    fn paths_read_and_write_as_c2sp_spells_them() {
        for (path, kind, index, width) in [
            ("0/000", TileKind::Hashes { level: 0 }, 0, 256),
            (
                "1/x001/x234/067",
                TileKind::Hashes { level: 1 },
                1_234_067,
                256,
            ),
            ("0/273.p/112", TileKind::Hashes { level: 0 }, 273, 112),
            ("entries/x001/000.p/1", TileKind::Entries, 1000, 1),
            ("63/000", TileKind::Hashes { level: 63 }, 0, 256),
        ] {
            let parsed = TilePath::parse(path).unwrap();
            assert_eq!(parsed, TilePath { kind, index, width });
            assert_eq!(parsed.to_path(), path);
        }
    }

    #[test]
    fn non_canonical_paths_are_refused() {
        for bad in [
            "",
            "0",
            "00/000",
            "01/000",
            "64/000",
            "0/0",
            "0/0000",
            "0/x000/001",
            "0/001/002",
            "0/x01/002",
            "0/000.p/0",
            "0/000.p/256",
            "0/000.p/07",
            "data/000",
            "0/000.p/",
            "0/-01",
            "0/x999/x999/x999/x999/x999/x999/x999/999",
            "entries/000/",
            "0/+01",
        ] {
            assert!(TilePath::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_tile_needs_the_entries_under_its_last_hash() {
        let t = TilePath::parse("1/000.p/17").unwrap();
        assert_eq!(t.needs_entries(), Some(17 * 256));
        assert_eq!(
            TilePath::parse("entries/001").unwrap().needs_entries(),
            Some(512)
        );
        assert_eq!(TilePath::parse("63/000").unwrap().needs_entries(), None);
    }
}
