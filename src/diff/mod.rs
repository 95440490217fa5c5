//! Block-hash diffs: a byte string (an agent's serialized conversation) cut into content-defined
//! blocks of about 64 bytes (16 tokens at four bytes a token), each block stored once by its hash,
//! and a checkpoint that is a short [`Manifest`] of hashes plus the blocks its store did not hold.
//!
//! Thousands of agents that share a system prompt and tools, and every turn of one agent that
//! repeats the turns before it, then cost the store only the bytes that are new. Cuts are chosen by
//! the content (a rolling gear hash, as in `FastCDC`), so an insertion shifts no later boundary and
//! two conversations that share a prefix share its blocks up to the first differing byte.
//!
//! Blocks are grouped in two levels so a manifest stays short: chunks (the 64-byte blocks) are
//! listed in segments (about 16 chunk hashes each, cut where a chunk hash ends in four zero bits,
//! so shared runs of chunks give shared segments), and the manifest lists segments. A 2,048-token
//! prompt is then 8 segment hashes in each manifest, not 128 chunk hashes.
//!
//! The codec is pure: [`encode`] asks a [`BlockStore`] which hashes it holds and returns the new
//! blocks for the caller to write beside the manifest; [`decode`] reads blocks back, checking each
//! against its hash. [`MemoryBlockStore`] holds blocks in memory.
//!
//! The journal (`store::journal`) keeps blocks in a SQLite table under increasing row ids (appends
//! write few pages) and counts references to free a block with the last checkpoint using it. A
//! remote store such as Redis fits the same calls in two round trips each way: to write, encode
//! against the hashes known to be stored, then write the new blocks (`SET NX` or `HSETNX`: a
//! block's bytes never change) and the manifest ([`Manifest::to_bytes`]); to read, fetch the
//! manifest's segments, list their chunks with [`segment_children`], fetch those, and
//! [`decode`] from a [`MemoryBlockStore`] holding what was fetched.

mod chunker;
mod codec;
mod store;

pub use chunker::{chunks, CHUNK_MAX, CHUNK_MIN, CHUNK_TARGET};
pub use codec::{
    decode, encode, segment_children, BlockHash, BlockKind, DiffError, Encoded, Manifest, NewBlock, SEGMENT_MAX,
};
pub use store::{BlockStore, MemoryBlockStore};
