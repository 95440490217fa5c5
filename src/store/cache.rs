//! The response cache: model answers keyed by everything that determines them, in its own SQLite
//! file (default `~/.cache/batchagent/responses.sqlite`), shared by every run on the machine, so a
//! re-run of an edited batch only pays for the requests that changed.
//!
//! Keys are 128-bit SipHash-1-3 digests with fixed keys. With n entries the chance that any two
//! distinct requests share a key is about n² / 2¹²⁹: 1.5e-21 for a billion cached responses, far
//! below the odds of a disk corrupting the stored answer. SipHash is not used for secrecy here; the
//! fixed key only has to be stable across versions and machines, which `std`'s `DefaultHasher` is
//! not promised to be.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, OptionalExtension};

/// Failures of the response cache. Lookups never fail (an unreadable entry is a miss); opening and
/// storing do.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("response cache {path}: {reason}")]
    Open { path: PathBuf, reason: String },
    #[error("response cache {path}: storing key {key}: {source}")]
    Put { path: PathBuf, key: String, source: rusqlite::Error },
    #[error("response cache {path}: pruning: {source}")]
    Prune { path: PathBuf, source: rusqlite::Error },
    #[error("response cache: no cache directory (neither XDG_CACHE_HOME nor HOME is set)")]
    NoHome,
}

/// Counters of one [`ResponseCache`] handle since it was opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    pub puts: u64,
    pub evicted: u64,
    /// Lookups that failed inside SQLite and were answered as misses.
    pub read_errors: u64,
    /// Answers not stored because the writer was that far behind (bounded memory).
    pub dropped: u64,
}

/// Default bound on the stored response bytes: large enough for millions of typical answers.
pub const DEFAULT_MAX_BYTES: u64 = 1 << 30;

/// Lookups record their use time in memory and write it back in one transaction per this many,
/// so a hit costs a read, not a write.
const TOUCH_BATCH: usize = 256;

/// Answers queued for the writer thread; past this they are dropped (a later run pays for them
/// again), so a slow disk never grows memory.
const WRITE_QUEUE: usize = 4096;
/// Most answers stored in one transaction.
const WRITE_GROUP: usize = 1024;

/// Bits of the presence filter (2 MiB): with k = 3, about 1% false positives at a million entries
/// and 10% at four million; a false positive only costs a lookup.
const FILTER_BITS: usize = 1 << 24;

/// The response cache: a SQLite table `responses(key, response, size, last_used)`.
pub struct ResponseCache {
    path: PathBuf,
    max_bytes: u64,
    inner: Mutex<Inner>,
    hits: AtomicU64,
    misses: AtomicU64,
    puts: AtomicU64,
    evicted: AtomicU64,
    read_errors: AtomicU64,
    dropped: AtomicU64,
    /// A Bloom filter over the keys stored, so that a miss (every request of a new batch) is
    /// answered from memory, without a lookup. Filled from the file by the writer when it starts;
    /// entries another process adds later are not in it (they are misses here).
    filter: Box<[AtomicU64]>,
    filter_ready: AtomicBool,
}

struct Inner {
    conn: Connection,
    /// Bytes stored, as far as this handle knows: other processes sharing the file make it
    /// approximate between prunes, which recount it.
    stored_bytes: u64,
    touched: Vec<(String, i64)>,
}

impl ResponseCache {
    /// `$XDG_CACHE_HOME/batchagent/responses.sqlite`, else `~/.cache/batchagent/responses.sqlite`.
    pub fn default_path() -> Result<PathBuf, CacheError> {
        let base = match std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
            Some(dir) => PathBuf::from(dir),
            None => PathBuf::from(std::env::var_os("HOME").filter(|v| !v.is_empty()).ok_or(CacheError::NoHome)?)
                .join(".cache"),
        };
        Ok(base.join("batchagent").join("responses.sqlite"))
    }

    /// Opens or creates the cache at `path` with the default size bound, creating missing parent
    /// directories (the cache lives in a per-user directory that may not exist yet).
    pub fn open(path: &Path) -> Result<Self, CacheError> {
        Self::open_with_limit(path, DEFAULT_MAX_BYTES)
    }

    /// Opens or creates the cache, keeping at most about `max_bytes` of responses: past the bound the
    /// least recently used entries are deleted down to 90% of it.
    pub fn open_with_limit(path: &Path, max_bytes: u64) -> Result<Self, CacheError> {
        let open_err = |reason: String| CacheError::Open { path: path.to_path_buf(), reason };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .map_err(|e| open_err(format!("creating directory {}: {e}", parent.display())))?;
        }
        let conn = Connection::open(path).map_err(|e| open_err(e.to_string()))?;
        conn.busy_timeout(std::time::Duration::from_secs(10)).map_err(|e| open_err(e.to_string()))?;
        conn.execute_batch(
            "PRAGMA journal_mode=WAL;
             PRAGMA synchronous=NORMAL;
             CREATE TABLE IF NOT EXISTS responses(
                 key TEXT PRIMARY KEY NOT NULL,
                 response TEXT NOT NULL,
                 size INTEGER NOT NULL,
                 last_used INTEGER NOT NULL
             ) WITHOUT ROWID;
             CREATE INDEX IF NOT EXISTS responses_last_used ON responses(last_used);",
        )
        .map_err(|e| open_err(e.to_string()))?;
        let stored: i64 = conn
            .query_row("SELECT COALESCE(SUM(size), 0) FROM responses", [], |r| r.get(0))
            .map_err(|e| open_err(e.to_string()))?;
        Ok(Self {
            path: path.to_path_buf(),
            max_bytes,
            inner: Mutex::new(Inner { conn, stored_bytes: stored.max(0) as u64, touched: Vec::new() }),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            puts: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
            read_errors: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            filter: (0..FILTER_BITS / 64).map(|_| AtomicU64::new(0)).collect(),
            filter_ready: AtomicBool::new(false),
        })
    }

    /// False when `key` is certainly not stored (answered from memory); true when it may be.
    pub fn may_contain(&self, key: &str) -> bool {
        if !self.filter_ready.load(Ordering::Acquire) {
            return true;
        }
        filter_bits(key).iter().all(|&bit| self.filter[bit / 64].load(Ordering::Relaxed) & (1 << (bit % 64)) != 0)
    }

    /// Counts a lookup that [`ResponseCache::may_contain`] answered.
    pub fn count_miss(&self) {
        self.misses.fetch_add(1, Ordering::Relaxed);
    }

    fn remember(&self, key: &str) {
        for bit in filter_bits(key) {
            self.filter[bit / 64].fetch_or(1 << (bit % 64), Ordering::Relaxed);
        }
    }

    /// Fills the presence filter from the file; until then every key may be stored.
    fn load_filter(&self) -> Result<(), rusqlite::Error> {
        let inner = self.lock();
        let mut stmt = inner.conn.prepare("SELECT key FROM responses")?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            self.remember(
                row.get_ref(0)?.as_str().map_err(|e| {
                    rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
                })?,
            );
        }
        self.filter_ready.store(true, Ordering::Release);
        Ok(())
    }

    /// Stores several answers in one transaction (the writer thread's path).
    fn put_many(&self, entries: &[(String, String)]) -> Result<(), CacheError> {
        let Some((first_key, _)) = entries.first() else { return Ok(()) };
        let mut inner = self.lock();
        let put_err = |source| CacheError::Put { path: self.path.clone(), key: first_key.clone(), source };
        let now = now_millis();
        let mut added = 0u64;
        {
            let tx = inner.conn.transaction().map_err(put_err)?;
            {
                let mut stmt = tx
                    .prepare_cached(
                        "INSERT INTO responses(key, response, size, last_used) VALUES(?1, ?2, ?3, ?4)
                         ON CONFLICT(key) DO UPDATE SET response = excluded.response, size = excluded.size,
                             last_used = excluded.last_used",
                    )
                    .map_err(put_err)?;
                for (key, response) in entries {
                    let size = (key.len() + response.len()) as u64;
                    stmt.execute(params![key, response, size as i64, now]).map_err(put_err)?;
                    added += size;
                }
            }
            tx.commit().map_err(put_err)?;
        }
        self.puts.fetch_add(entries.len() as u64, Ordering::Relaxed);
        // A replaced entry is counted twice until the next prune recounts: pruning early is harmless.
        inner.stored_bytes += added;
        if inner.stored_bytes > self.max_bytes {
            self.prune(&mut inner)?;
        }
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves SQLite consistent (statements are atomic), so the
        // poisoned guard is safe to reuse.
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The cached response for `key` (from [`cache_key`]), if any.
    pub fn get(&self, key: &str) -> Option<String> {
        let mut inner = self.lock();
        let found = inner
            .conn
            .prepare_cached("SELECT response FROM responses WHERE key = ?1")
            .and_then(|mut stmt| stmt.query_row([key], |r| r.get::<_, String>(0)).optional());
        match found {
            Ok(Some(response)) => {
                self.hits.fetch_add(1, Ordering::Relaxed);
                inner.touched.push((key.to_owned(), now_millis()));
                if inner.touched.len() >= TOUCH_BATCH {
                    // Use times are advisory (they only order evictions): a failed write-back is
                    // dropped rather than turning a hit into an error.
                    let _ = write_touches(&mut inner);
                }
                Some(response)
            }
            Ok(None) => {
                self.misses.fetch_add(1, Ordering::Relaxed);
                None
            }
            Err(_) => {
                self.read_errors.fetch_add(1, Ordering::Relaxed);
                self.misses.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// Stores `response_json` under `key`, replacing an older entry, then prunes if over the bound.
    pub fn put(&self, key: &str, response_json: &str) -> Result<(), CacheError> {
        let mut inner = self.lock();
        let size = (key.len() + response_json.len()) as u64;
        let put_err = |source| CacheError::Put { path: self.path.clone(), key: key.to_owned(), source };
        let previous: Option<i64> = inner
            .conn
            .prepare_cached("SELECT size FROM responses WHERE key = ?1")
            .and_then(|mut stmt| stmt.query_row([key], |r| r.get(0)).optional())
            .map_err(put_err)?;
        inner
            .conn
            .prepare_cached(
                "INSERT INTO responses(key, response, size, last_used) VALUES(?1, ?2, ?3, ?4)
                 ON CONFLICT(key) DO UPDATE SET response = excluded.response, size = excluded.size,
                     last_used = excluded.last_used",
            )
            .and_then(|mut stmt| stmt.execute(params![key, response_json, size as i64, now_millis()]))
            .map_err(put_err)?;
        self.puts.fetch_add(1, Ordering::Relaxed);
        self.remember(key);
        inner.stored_bytes = inner.stored_bytes.saturating_sub(previous.unwrap_or(0).max(0) as u64) + size;
        if inner.stored_bytes > self.max_bytes {
            self.prune(&mut inner)?;
        }
        Ok(())
    }

    /// Writes back pending use times so another process's pruning sees them.
    pub fn sync(&self) -> Result<(), CacheError> {
        let mut inner = self.lock();
        write_touches(&mut inner).map_err(|source| CacheError::Prune { path: self.path.clone(), source })
    }

    pub fn stats(&self) -> CacheStats {
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            puts: self.puts.load(Ordering::Relaxed),
            evicted: self.evicted.load(Ordering::Relaxed),
            read_errors: self.read_errors.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
        }
    }

    /// Bytes of keys and responses stored, as last counted by this handle.
    pub fn stored_bytes(&self) -> u64 {
        self.lock().stored_bytes
    }

    fn prune(&self, inner: &mut Inner) -> Result<(), CacheError> {
        let err = |source| CacheError::Prune { path: self.path.clone(), source };
        write_touches(inner).map_err(err)?;
        let low_water = self.max_bytes / 10 * 9;
        let tx = inner.conn.transaction().map_err(err)?;
        let mut stored: i64 =
            tx.query_row("SELECT COALESCE(SUM(size), 0) FROM responses", [], |r| r.get(0)).map_err(err)?;
        let mut evicted = 0u64;
        {
            let mut oldest = tx.prepare("SELECT key, size FROM responses ORDER BY last_used").map_err(err)?;
            let mut delete = tx.prepare("DELETE FROM responses WHERE key = ?1").map_err(err)?;
            let mut rows = oldest.query([]).map_err(err)?;
            while stored.max(0) as u64 > low_water {
                let Some(row) = rows.next().map_err(err)? else { break };
                let key: String = row.get(0).map_err(err)?;
                let size: i64 = row.get(1).map_err(err)?;
                delete.execute([&key]).map_err(err)?;
                stored -= size;
                evicted += 1;
            }
        }
        tx.commit().map_err(err)?;
        inner.stored_bytes = stored.max(0) as u64;
        self.evicted.fetch_add(evicted, Ordering::Relaxed);
        Ok(())
    }
}

impl Drop for ResponseCache {
    fn drop(&mut self) {
        let inner = self.inner.get_mut().unwrap_or_else(std::sync::PoisonError::into_inner);
        // Dropping cannot report: use times are advisory, losing them only skews eviction order.
        let _ = write_touches(inner);
    }
}

/// Stores answers off the caller's thread: one thread, a bounded queue, one transaction per group.
/// Dropping it stores what is queued and stops the thread.
pub struct CacheWriter {
    cache: Arc<ResponseCache>,
    queue: Option<SyncSender<(String, String)>>,
    thread: Option<JoinHandle<()>>,
}

impl CacheWriter {
    /// Starts the writer thread, which first fills the cache's presence filter.
    pub fn start(cache: Arc<ResponseCache>) -> Result<Self, CacheError> {
        let (queue, entries) = mpsc::sync_channel::<(String, String)>(WRITE_QUEUE);
        let path = cache.path.clone();
        let thread = {
            let cache = Arc::clone(&cache);
            std::thread::Builder::new()
                .name("batchagent-cache".into())
                .spawn(move || {
                    // Without the filter every lookup goes to the file: slower, never wrong.
                    let _ = cache.load_filter();
                    let mut group = Vec::with_capacity(WRITE_GROUP);
                    while let Ok(entry) = entries.recv() {
                        group.push(entry);
                        while group.len() < WRITE_GROUP {
                            match entries.try_recv() {
                                Ok(entry) => group.push(entry),
                                Err(_) => break,
                            }
                        }
                        // A failed store costs a future hit, never a result.
                        let _ = cache.put_many(&group);
                        group.clear();
                    }
                })
                .map_err(|e| CacheError::Open { path, reason: format!("starting the writer: {e}") })?
        };
        Ok(Self { cache, queue: Some(queue), thread: Some(thread) })
    }

    pub fn cache(&self) -> &Arc<ResponseCache> {
        &self.cache
    }

    /// Queues an answer; never blocks. Visible to lookups at once through the presence filter, and
    /// in the file once the writer has stored it.
    pub fn put(&self, key: String, response_json: String) {
        self.cache.remember(&key);
        let Some(queue) = &self.queue else { return };
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = queue.try_send((key, response_json)) {
            self.cache.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Drop for CacheWriter {
    fn drop(&mut self) {
        self.queue = None;
        if let Some(thread) = self.thread.take() {
            // A panicked writer has stored what it could; nothing else to do at drop.
            let _ = thread.join();
        }
    }
}

/// Three 24-bit positions taken from the key's 128-bit digest (its hex text, or a hash of it).
fn filter_bits(key: &str) -> [usize; 3] {
    let digest = u128::from_str_radix(key, 16).unwrap_or_else(|_| hash128(key.as_bytes()));
    let mask = (FILTER_BITS - 1) as u128;
    [(digest & mask) as usize, ((digest >> 40) & mask) as usize, ((digest >> 80) & mask) as usize]
}

fn write_touches(inner: &mut Inner) -> Result<(), rusqlite::Error> {
    if inner.touched.is_empty() {
        return Ok(());
    }
    let touched = std::mem::take(&mut inner.touched);
    let tx = inner.conn.transaction()?;
    {
        let mut stmt = tx.prepare_cached("UPDATE responses SET last_used = MAX(last_used, ?2) WHERE key = ?1")?;
        for (key, at) in &touched {
            stmt.execute(params![key, at])?;
        }
    }
    tx.commit()
}

fn now_millis() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// The cache key of one model request: 32 hex digits of a 128-bit hash over the endpoint's identity
/// (its URL and the model it serves, see [`crate::backends::cached::endpoint_identity`]), the model
/// name, the messages, the tools and the sampling parameters. Each part is length-prefixed, so
/// moving bytes from one part to the next changes the key. The JSON texts must be produced
/// canonically by the caller (serde's field order is fixed, so serializing the same request twice
/// gives the same text).
pub fn cache_key(endpoint: &str, model: &str, messages_json: &str, tools_json: &str, sampling_json: &str) -> String {
    let mut h = Sip13::new(KEY0, KEY1);
    // A version tag: changing how requests are keyed invalidates old entries instead of misreading them.
    h.write_part(b"batchagent-response-v2");
    for part in [endpoint, model, messages_json, tools_json, sampling_json] {
        h.write_part(part.as_bytes());
    }
    format!("{:032x}", h.finish128())
}

/// A stable 128-bit digest of `bytes` (SipHash-1-3, fixed keys).
pub fn hash128(bytes: &[u8]) -> u128 {
    let mut h = Sip13::new(KEY0, KEY1);
    h.write(bytes);
    h.finish128()
}

const KEY0: u64 = 0x6261_7463_6861_6765;
const KEY1: u64 = 0x6e74_2d63_6163_6865;

type Sip13 = SipHasher128<1, 3>;

/// SipHash with 128-bit output (Aumasson & Bernstein), `C` compression and `D` finalization rounds,
/// fed incrementally.
#[derive(Clone)]
struct SipHasher128<const C: usize, const D: usize> {
    v: [u64; 4],
    tail: u64,
    ntail: usize,
    length: usize,
}

impl<const C: usize, const D: usize> SipHasher128<C, D> {
    fn new(k0: u64, k1: u64) -> Self {
        Self {
            v: [
                k0 ^ 0x736f_6d65_7073_6575,
                k1 ^ 0x646f_7261_6e64_6f6d ^ 0xee,
                k0 ^ 0x6c79_6765_6e65_7261,
                k1 ^ 0x7465_6462_7974_6573,
            ],
            tail: 0,
            ntail: 0,
            length: 0,
        }
    }

    #[inline]
    fn round(v: &mut [u64; 4]) {
        v[0] = v[0].wrapping_add(v[1]);
        v[1] = v[1].rotate_left(13) ^ v[0];
        v[0] = v[0].rotate_left(32);
        v[2] = v[2].wrapping_add(v[3]);
        v[3] = v[3].rotate_left(16) ^ v[2];
        v[0] = v[0].wrapping_add(v[3]);
        v[3] = v[3].rotate_left(21) ^ v[0];
        v[2] = v[2].wrapping_add(v[1]);
        v[1] = v[1].rotate_left(17) ^ v[2];
        v[2] = v[2].rotate_left(32);
    }

    #[inline]
    fn compress(&mut self, m: u64) {
        self.v[3] ^= m;
        for _ in 0..C {
            Self::round(&mut self.v);
        }
        self.v[0] ^= m;
    }

    fn write(&mut self, mut bytes: &[u8]) {
        self.length = self.length.wrapping_add(bytes.len());
        while self.ntail != 0 && !bytes.is_empty() {
            self.tail |= u64::from(bytes[0]) << (8 * self.ntail);
            self.ntail = (self.ntail + 1) % 8;
            bytes = &bytes[1..];
            if self.ntail == 0 {
                let m = std::mem::take(&mut self.tail);
                self.compress(m);
            }
        }
        let mut words = bytes.chunks_exact(8);
        for word in &mut words {
            let mut buf = [0u8; 8];
            buf.copy_from_slice(word);
            self.compress(u64::from_le_bytes(buf));
        }
        for (i, &b) in words.remainder().iter().enumerate() {
            self.tail |= u64::from(b) << (8 * i);
        }
        self.ntail = words.remainder().len();
    }

    fn write_part(&mut self, bytes: &[u8]) {
        self.write(&(bytes.len() as u64).to_le_bytes());
        self.write(bytes);
    }

    /// The digest as a little-endian `u128` of the reference implementation's 16 output bytes.
    fn finish128(&self) -> u128 {
        let mut v = self.v;
        let b = ((self.length as u64 & 0xff) << 56) | self.tail;
        v[3] ^= b;
        for _ in 0..C {
            Self::round(&mut v);
        }
        v[0] ^= b;
        v[2] ^= 0xee;
        for _ in 0..D {
            Self::round(&mut v);
        }
        let lo = v[0] ^ v[1] ^ v[2] ^ v[3];
        v[1] ^= 0xdd;
        for _ in 0..D {
            Self::round(&mut v);
        }
        let hi = v[0] ^ v[1] ^ v[2] ^ v[3];
        (u128::from(hi) << 64) | u128::from(lo)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn reference_key() -> (u64, u64) {
        (0x0706_0504_0302_0100, 0x0f0e_0d0c_0b0a_0908)
    }

    fn sip24_128(msg: &[u8]) -> [u8; 16] {
        let (k0, k1) = reference_key();
        let mut h = SipHasher128::<2, 4>::new(k0, k1);
        h.write(msg);
        h.finish128().to_le_bytes()
    }

    #[test]
    fn siphash_2_4_128_matches_reference_vectors() {
        let input: Vec<u8> = (0u8..64).collect();
        let cases: [(usize, [u8; 16]); 5] = [
            (0, [0xa3, 0x81, 0x7f, 0x04, 0xba, 0x25, 0xa8, 0xe6, 0x6d, 0xf6, 0x72, 0x14, 0xc7, 0x55, 0x02, 0x93]),
            (1, [0xda, 0x87, 0xc1, 0xd8, 0x6b, 0x99, 0xaf, 0x44, 0x34, 0x76, 0x59, 0x11, 0x9b, 0x22, 0xfc, 0x45]),
            (8, [0x3b, 0x62, 0xa9, 0xba, 0x62, 0x58, 0xf5, 0x61, 0x0f, 0x83, 0xe2, 0x64, 0xf3, 0x14, 0x97, 0xb4]),
            (15, [0x54, 0x93, 0xe9, 0x99, 0x33, 0xb0, 0xa8, 0x11, 0x7e, 0x08, 0xec, 0x0f, 0x97, 0xcf, 0xc3, 0xd9]),
            (63, [0x51, 0x50, 0xd1, 0x77, 0x2f, 0x50, 0x83, 0x4a, 0x50, 0x3e, 0x06, 0x9a, 0x97, 0x3f, 0xbd, 0x7c]),
        ];
        for (len, expected) in cases {
            assert_eq!(sip24_128(&input[..len]), expected, "length {len}");
        }
    }

    #[test]
    fn incremental_writes_equal_one_write() {
        let input: Vec<u8> = (0u8..=200).collect();
        let whole = hash128(&input);
        for split in [0, 1, 3, 7, 8, 9, 64, 199] {
            let mut h = Sip13::new(KEY0, KEY1);
            h.write(&input[..split]);
            h.write(&input[split..]);
            assert_eq!(h.finish128(), whole, "split at {split}");
        }
    }

    #[test]
    fn cache_key_separates_parts_and_is_stable() {
        let a = cache_key("e", "m", "[1]", "[]", "{}");
        assert_eq!(a, cache_key("e", "m", "[1]", "[]", "{}"));
        assert_eq!(a.len(), 32);
        assert_ne!(a, cache_key("e", "m[", "1]", "[]", "{}"));
        assert_ne!(a, cache_key("other endpoint", "m", "[1]", "[]", "{}"));
        assert_ne!(a, cache_key("e", "m", "[1]", "[]", "{\"temperature\":0}"));
        assert_ne!(cache_key("", "", "ab", "", ""), cache_key("", "", "a", "b", ""));
    }

    #[test]
    fn get_put_and_lru_pruning() {
        let dir = std::env::temp_dir().join(format!("ba-cache-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("nested").join("c.sqlite");
        let cache = ResponseCache::open_with_limit(&path, 10_000).unwrap();
        assert_eq!(cache.get("k0"), None);
        let body = "x".repeat(1000);
        cache.put("k0", &body).unwrap();
        cache.put("k0", &body).unwrap();
        assert_eq!(cache.stored_bytes(), 1002);
        for i in 1..9 {
            cache.put(&format!("k{i}"), &body).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        // k0 is the oldest insert, but using it makes k1 the least recently used.
        assert_eq!(cache.get("k0").as_deref(), Some(body.as_str()));
        cache.sync().unwrap();
        cache.put("k9", &body).unwrap();
        cache.put("k10", &body).unwrap();
        assert!(cache.stored_bytes() <= 10_000);
        assert_eq!(cache.get("k1"), None, "least recently used entry evicted");
        assert!(cache.get("k0").is_some(), "recently used entry kept");
        assert!(cache.get("k10").is_some());
        assert!(cache.stats().evicted >= 1);
        drop(cache);
        let reopened = ResponseCache::open(&path).unwrap();
        assert!(reopened.get("k10").is_some());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_writer_stores_in_groups_and_misses_are_answered_from_memory() {
        let dir = std::env::temp_dir().join(format!("ba-cache-writer-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("c.sqlite");
        let cache = Arc::new(ResponseCache::open(&path).unwrap());
        let stored = cache_key("e", "m", "[\"old\"]", "[]", "{}");
        cache.put(&stored, "old").unwrap();
        let writer = CacheWriter::start(Arc::clone(&cache)).unwrap();
        let keys: Vec<String> = (0..100).map(|i| cache_key("e", "m", &format!("[{i}]"), "[]", "{}")).collect();
        for key in &keys {
            writer.put(key.clone(), format!("answer {key}"));
        }
        drop(writer);
        let stats = cache.stats();
        assert_eq!((stats.puts, stats.dropped), (101, 0));
        for key in keys.iter().chain([&stored]) {
            assert!(cache.may_contain(key), "stored keys pass the filter");
            assert!(cache.get(key).is_some());
        }
        let absent: Vec<String> = (0..1000).map(|i| cache_key("e", "other", &i.to_string(), "", "")).collect();
        let passed = absent.iter().filter(|k| cache.may_contain(k)).count();
        assert!(passed < 10, "{passed} of 1000 absent keys passed an almost empty filter");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
