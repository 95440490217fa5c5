//! [`encode`] and [`decode`]: a byte string to a [`Manifest`] and the blocks a store lacks, and back.

use std::collections::HashSet;
use std::fmt;

use sha2::{Digest, Sha256};

use super::chunker::chunks;
use super::store::BlockStore;

/// Most chunks in one segment (a cut is forced here when no content-defined one came first).
pub const SEGMENT_MAX: usize = 64;
/// Fewest chunks in a segment before a content-defined cut.
const SEGMENT_MIN: usize = 4;
/// A segment ends after a chunk whose hash has these bits clear: 16 chunks (about 1 KiB) on average.
const SEGMENT_MASK: u8 = 0x0f;
const MANIFEST_FORMAT: u8 = 1;
const HASH_LEN: usize = 16;

/// A block's identity: SHA-256 of its level and its bytes, cut to 128 bits. A cryptographic hash,
/// because conversations hold text from models and tools: with a fast non-cryptographic one, crafted
/// content could collide with another agent's block and be read back in its place.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockHash(pub [u8; HASH_LEN]);

impl BlockHash {
    /// The hash of a block of `kind` holding `data`. The level is hashed in, so a chunk whose bytes
    /// equal a segment's is a different block (stores count references per level).
    pub fn of(kind: BlockKind, data: &[u8]) -> BlockHash {
        let mut hasher = Sha256::new();
        hasher.update([kind as u8]);
        hasher.update(data);
        let digest = hasher.finalize();
        let mut out = [0u8; HASH_LEN];
        out.copy_from_slice(&digest[..HASH_LEN]);
        BlockHash(out)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The hash held in `bytes`, which must be 16 bytes long.
    pub fn from_slice(bytes: &[u8]) -> Option<BlockHash> {
        bytes.try_into().ok().map(BlockHash)
    }
}

impl fmt::Debug for BlockHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in &self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Display for BlockHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// The level of a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum BlockKind {
    /// About 64 bytes of the encoded string.
    Chunk = 0,
    /// The hashes of up to [`SEGMENT_MAX`] chunks, 16 bytes each, in order.
    Segment = 1,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DiffError {
    #[error("block {0} is missing from the block store")]
    Missing(BlockHash),
    #[error("corrupt checkpoint: {0}")]
    Corrupt(String),
    #[error("block store: {0}")]
    Store(String),
}

/// What a checkpoint records: the length of the encoded string and its segments, in order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Manifest {
    pub len: u64,
    pub segments: Vec<BlockHash>,
}

impl Manifest {
    /// The manifest as stored: a format byte, the length as a LEB128 varint, then 16 bytes a segment.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(1 + 10 + self.segments.len() * HASH_LEN);
        out.push(MANIFEST_FORMAT);
        let mut len = self.len;
        loop {
            let byte = (len & 0x7f) as u8;
            len >>= 7;
            if len == 0 {
                out.push(byte);
                break;
            }
            out.push(byte | 0x80);
        }
        for segment in &self.segments {
            out.extend_from_slice(&segment.0);
        }
        out
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Manifest, DiffError> {
        let corrupt = |what: &str| DiffError::Corrupt(format!("manifest: {what}"));
        let (&format, mut rest) = bytes.split_first().ok_or_else(|| corrupt("empty"))?;
        if format != MANIFEST_FORMAT {
            return Err(corrupt(&format!("format {format} is not supported (expected {MANIFEST_FORMAT})")));
        }
        let mut len = 0u64;
        let mut shift = 0u32;
        loop {
            let (&byte, tail) = rest.split_first().ok_or_else(|| corrupt("length cut short"))?;
            rest = tail;
            if shift > 63 || (shift == 63 && byte > 1) {
                return Err(corrupt("length overflows 64 bits"));
            }
            len |= u64::from(byte & 0x7f) << shift;
            shift += 7;
            if byte & 0x80 == 0 {
                break;
            }
        }
        if rest.len() % HASH_LEN != 0 {
            return Err(corrupt("segment list is not a whole number of hashes"));
        }
        let segments = rest.chunks_exact(HASH_LEN).filter_map(BlockHash::from_slice).collect();
        Ok(Manifest { len, segments })
    }
}

/// A block [`encode`] found missing from the store: write it before (or with) the manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewBlock {
    pub hash: BlockHash,
    pub kind: BlockKind,
    pub data: Vec<u8>,
}

/// The result of [`encode`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Encoded {
    pub manifest: Manifest,
    /// Each block the store lacked, once, chunks before the segments that list them.
    pub new_blocks: Vec<NewBlock>,
}

impl Encoded {
    /// The bytes a checkpoint carries to its store: the manifest, and each new block with its hash.
    pub fn wire_len(&self) -> usize {
        let manifest = 1 + 10 + self.manifest.segments.len() * HASH_LEN;
        manifest + self.new_blocks.iter().map(|b| HASH_LEN + b.data.len()).sum::<usize>()
    }
}

/// Encodes `data` against `store`: the manifest, and the blocks `store` does not hold (per
/// [`BlockStore::contains`]). Writes nothing; the caller stores the new blocks.
pub fn encode(data: &[u8], store: &impl BlockStore) -> Encoded {
    let mut new_blocks = Vec::new();
    let mut added: HashSet<BlockHash> = HashSet::new();
    let mut segments = Vec::with_capacity(data.len() / 1024 + 1);
    let mut members: Vec<u8> = Vec::with_capacity(SEGMENT_MAX * HASH_LEN);
    let mut add = |kind: BlockKind, bytes: &[u8], new_blocks: &mut Vec<NewBlock>| -> BlockHash {
        let hash = BlockHash::of(kind, bytes);
        if !store.contains(&hash) && added.insert(hash) {
            new_blocks.push(NewBlock { hash, kind, data: bytes.to_vec() });
        }
        hash
    };
    for chunk in chunks(data) {
        let hash = add(BlockKind::Chunk, chunk, &mut new_blocks);
        members.extend_from_slice(&hash.0);
        let count = members.len() / HASH_LEN;
        if count >= SEGMENT_MAX || (count >= SEGMENT_MIN && hash.0[HASH_LEN - 1] & SEGMENT_MASK == 0) {
            segments.push(add(BlockKind::Segment, &members, &mut new_blocks));
            members.clear();
        }
    }
    if !members.is_empty() {
        segments.push(add(BlockKind::Segment, &members, &mut new_blocks));
    }
    Encoded { manifest: Manifest { len: data.len() as u64, segments }, new_blocks }
}

/// The chunk hashes a segment block lists.
pub fn segment_children(segment: &[u8]) -> Result<Vec<BlockHash>, DiffError> {
    if segment.is_empty() || segment.len() % HASH_LEN != 0 || segment.len() / HASH_LEN > SEGMENT_MAX {
        return Err(DiffError::Corrupt(format!("a segment of {} bytes", segment.len())));
    }
    Ok(segment.chunks_exact(HASH_LEN).filter_map(BlockHash::from_slice).collect())
}

/// The string `manifest` encodes, read from `store`. Every block is checked against its hash and
/// the total against the manifest's length, so a damaged store gives an error, never other bytes.
pub fn decode(manifest: &Manifest, store: &impl BlockStore) -> Result<Vec<u8>, DiffError> {
    // The length comes from storage: reserve no more than the blocks can hold.
    let bound = manifest.segments.len().saturating_mul(SEGMENT_MAX * super::CHUNK_MAX);
    let mut out = Vec::with_capacity((manifest.len as usize).min(bound));
    let fetch = |kind: BlockKind, hash: &BlockHash| -> Result<Vec<u8>, DiffError> {
        let data = store.get(hash)?.ok_or(DiffError::Missing(*hash))?;
        if BlockHash::of(kind, &data) != *hash {
            return Err(DiffError::Corrupt(format!("block {hash} does not match its hash")));
        }
        Ok(data)
    };
    for segment in &manifest.segments {
        for chunk in segment_children(&fetch(BlockKind::Segment, segment)?)? {
            out.extend_from_slice(&fetch(BlockKind::Chunk, &chunk)?);
        }
    }
    if out.len() as u64 != manifest.len {
        return Err(DiffError::Corrupt(format!("decoded {} bytes, the manifest says {}", out.len(), manifest.len)));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::super::MemoryBlockStore;
    use super::*;

    fn conversation(prompt: &str, agent: usize, turns: usize) -> String {
        let mut messages = vec![serde_json::json!({"role": "system", "content": prompt})];
        messages.push(serde_json::json!({"role": "user", "content": format!("Review file {agent}.py")}));
        for turn in 0..turns {
            messages.push(serde_json::json!({"role": "assistant", "content": format!("turn {turn} of agent {agent}: looking at line {}", turn * 31 + agent)}));
            messages.push(serde_json::json!({"role": "tool", "content": format!("output {turn} for {agent}")}));
        }
        serde_json::to_string(&messages).unwrap()
    }

    #[test]
    fn round_trip_and_sharing_across_agents() {
        let prompt: String = (0..2048).map(|i| format!("w{} ", i * 7919 % 5000)).collect::<Vec<_>>().concat();
        let mut store = MemoryBlockStore::default();
        let mut wire = Vec::new();
        for agent in 0..20 {
            let text = conversation(&prompt, agent, 3);
            let encoded = encode(text.as_bytes(), &store);
            wire.push(encoded.wire_len());
            store.put_all(&encoded.new_blocks);
            assert_eq!(decode(&encoded.manifest, &store).unwrap(), text.as_bytes());
        }
        // The first agent stores the prompt; the others carry only their own turns.
        let prompt_len = prompt.len();
        assert!(wire[0] > prompt_len, "{wire:?}");
        assert!(wire[1..].iter().all(|&w| w * 8 < prompt_len), "{wire:?} against a {prompt_len}-byte prompt");
    }

    #[test]
    fn a_later_turn_carries_only_its_own_bytes() {
        let prompt: String = (0..2048).map(|i| format!("w{} ", i * 7919 % 5000)).collect::<Vec<_>>().concat();
        let mut store = MemoryBlockStore::default();
        let before = conversation(&prompt, 1, 2);
        store.put_all(&encode(before.as_bytes(), &store).new_blocks);
        let after = conversation(&prompt, 1, 3);
        let encoded = encode(after.as_bytes(), &store);
        let grown = after.len() - before.len();
        assert!(encoded.wire_len() < grown + 1200, "{} bytes for {grown} new", encoded.wire_len());
    }

    #[test]
    fn damage_is_an_error() {
        let mut store = MemoryBlockStore::default();
        let text = "x".repeat(5000);
        let encoded = encode(text.as_bytes(), &store);
        store.put_all(&encoded.new_blocks);
        let mut short = encoded.manifest.clone();
        short.len += 1;
        assert!(matches!(decode(&short, &store), Err(DiffError::Corrupt(_))));
        let chunk = encoded.new_blocks.iter().find(|b| b.kind == BlockKind::Chunk).unwrap();
        store.insert(chunk.hash, b"other bytes".to_vec());
        assert!(matches!(decode(&encoded.manifest, &store), Err(DiffError::Corrupt(_))));
        assert!(matches!(decode(&encoded.manifest, &MemoryBlockStore::default()), Err(DiffError::Missing(_))));
        assert!(Manifest::from_bytes(&[9, 0]).is_err());
        assert!(Manifest::from_bytes(&[1, 0x80]).is_err());
        assert!(Manifest::from_bytes(&[1, 3, 1, 2]).is_err());
        assert_eq!(Manifest::from_bytes(&encoded.manifest.to_bytes()).unwrap(), encoded.manifest);
    }

    #[test]
    fn empty_input_is_an_empty_manifest() {
        let store = MemoryBlockStore::default();
        let encoded = encode(b"", &store);
        assert!(encoded.manifest.segments.is_empty() && encoded.new_blocks.is_empty());
        assert_eq!(decode(&encoded.manifest, &store).unwrap(), b"");
    }
}
