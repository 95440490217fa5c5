//! Where blocks live: the trait the codec reads through, and a store in memory.

use std::collections::HashMap;

use super::codec::{BlockHash, DiffError, NewBlock};

/// A store of blocks by hash. The journal keeps its blocks in SQLite, the fleet in Redis.
pub trait BlockStore {
    /// Whether the store holds `hash` (a block it holds is not sent again by [`super::encode`]).
    fn contains(&self, hash: &BlockHash) -> bool;
    /// The bytes of `hash`; `Ok(None)` when the store does not hold it.
    fn get(&self, hash: &BlockHash) -> Result<Option<Vec<u8>>, DiffError>;
}

/// Blocks in a hash map: for tests, benchmarks, and as the prefetched set of a remote store.
#[derive(Debug, Default, Clone)]
pub struct MemoryBlockStore {
    blocks: HashMap<BlockHash, Vec<u8>>,
}

impl MemoryBlockStore {
    pub fn insert(&mut self, hash: BlockHash, data: Vec<u8>) {
        self.blocks.insert(hash, data);
    }

    pub fn put_all(&mut self, blocks: &[NewBlock]) {
        for block in blocks {
            self.blocks.entry(block.hash).or_insert_with(|| block.data.clone());
        }
    }

    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// Bytes held, hashes included.
    pub fn bytes(&self) -> usize {
        self.blocks.values().map(|data| 16 + data.len()).sum()
    }
}

impl BlockStore for MemoryBlockStore {
    fn contains(&self, hash: &BlockHash) -> bool {
        self.blocks.contains_key(hash)
    }

    fn get(&self, hash: &BlockHash) -> Result<Option<Vec<u8>>, DiffError> {
        Ok(self.blocks.get(hash).cloned())
    }
}
