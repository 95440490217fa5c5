//! The response cache: model answers keyed by everything that determines them, in its own SQLite
//! file (default `~/.cache/batchagent/responses.sqlite`), shared by every run on the machine, so a
//! re-run of an edited batch only pays for the requests that changed.
//!
//! Keys are 128-bit SipHash-1-3 digests with fixed keys. With n entries the chance that any two
//! distinct requests share a key is about n² / 2¹²⁹: 1.5e-21 for a billion cached responses, far
//! below the odds of a disk corrupting the stored answer. SipHash is not used for secrecy here; the
//! fixed key only has to be stable across versions and machines, which `std`'s `DefaultHasher` is
//! not promised to be.
//!
//! Layout, chosen for the write path (a new batch stores every answer it gets): the table
//! `cache_entries` is append-only in rowid order, so a stored answer lands at the end of the table
//! instead of at a random place in a B-tree keyed by a random hash; the only random-order structure
//! is the index over the 16-byte binary keys, and the writer thread inserts into it in sorted
//! groups of up to [`WRITE_GROUP`] answers, one transaction each. Eviction deletes from the lowest
//! rowids (the oldest entries); an entry that is used while in the older half of the table moves
//! to its end, so what is evicted first was neither stored nor used recently (an approximation of
//! least-recently-used that needs no index on use times).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

/// Failures of the response cache. Lookups never fail (an unreadable entry is a miss); opening and
/// storing do.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("response cache {path}: {reason}")]
    Open { path: PathBuf, reason: String },
    #[error("response cache {path}: storing key {key:032x}: {source}")]
    Put { path: PathBuf, key: u128, source: rusqlite::Error },
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

/// Lookups remember what they used in memory and write it back in one transaction per this many,
/// so a hit costs a read, not a write.
const TOUCH_BATCH: usize = 256;

/// Most answers stored in one transaction, sorted by key so that the key index is walked in order.
const WRITE_GROUP: usize = 16_384;
/// Most response bytes held for one transaction: with long answers a group closes before it
/// reaches [`WRITE_GROUP`] entries.
const WRITE_GROUP_BYTES: usize = 16 << 20;
/// Longest time an answer waits in a group before the group is stored anyway.
const WRITE_GROUP_WAIT: Duration = Duration::from_secs(1);
/// Answers (and their bytes) held for the writer while it stores the previous group: past this
/// they are dropped (a later run pays for them again), so a slow disk never grows memory.
const WRITE_QUEUE: usize = 2 * WRITE_GROUP;
const WRITE_QUEUE_BYTES: usize = 2 * WRITE_GROUP_BYTES;

/// SQLite page cache per connection, in KiB (SQLite's negative `cache_size`): the key index of
/// about 200k entries fits, and memory stays bounded however large the file grows.
const PAGE_CACHE_KIB: i64 = 8 * 1024;

/// Bits of the presence filter (2 MiB): with k = 3, about 1% false positives at a million entries
/// and 10% at four million; a false positive only costs a lookup.
const FILTER_BITS: usize = 1 << 24;

const SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS cache_entries(
        id INTEGER PRIMARY KEY,
        key BLOB NOT NULL,
        size INTEGER NOT NULL,
        response TEXT NOT NULL
    );
    CREATE UNIQUE INDEX IF NOT EXISTS cache_entries_key ON cache_entries(key);";

/// The response cache: a SQLite table `cache_entries(id, key, size, response)` (see the module
/// documentation for why this layout).
pub struct ResponseCache {
    path: PathBuf,
    max_bytes: u64,
    inner: Mutex<Inner>,
    /// Bytes of keys and responses stored, as far as this handle knows: other processes sharing
    /// the file make it approximate between prunes, which recount it.
    stored_bytes: AtomicU64,
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
    /// Entries used since the last write-back: (rowid, key).
    touched: Vec<(i64, u128)>,
}

fn connect(path: &Path) -> Result<Connection, String> {
    let conn = Connection::open(path).map_err(|e| e.to_string())?;
    conn.busy_timeout(Duration::from_secs(10)).map_err(|e| e.to_string())?;
    conn.execute_batch(&format!(
        "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA cache_size=-{PAGE_CACHE_KIB};"
    ))
    .map_err(|e| e.to_string())?;
    Ok(conn)
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
    /// oldest entries (by storage or, in the older half, by use) are deleted down to 90% of it.
    pub fn open_with_limit(path: &Path, max_bytes: u64) -> Result<Self, CacheError> {
        let open_err = |reason: String| CacheError::Open { path: path.to_path_buf(), reason };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .map_err(|e| open_err(format!("creating directory {}: {e}", parent.display())))?;
        }
        let conn = connect(path).map_err(open_err)?;
        conn.execute_batch(SCHEMA).map_err(|e| open_err(e.to_string()))?;
        drop_text_keyed_layout(&conn).map_err(|e| open_err(format!("dropping the older layout: {e}")))?;
        let stored: i64 = conn
            .query_row("SELECT COALESCE(SUM(size), 0) FROM cache_entries", [], |r| r.get(0))
            .map_err(|e| open_err(e.to_string()))?;
        Ok(Self {
            path: path.to_path_buf(),
            max_bytes,
            inner: Mutex::new(Inner { conn, touched: Vec::new() }),
            stored_bytes: AtomicU64::new(stored.max(0) as u64),
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
    pub fn may_contain(&self, key: u128) -> bool {
        if !self.filter_ready.load(Ordering::Acquire) {
            return true;
        }
        filter_bits(key).iter().all(|&bit| self.filter[bit / 64].load(Ordering::Relaxed) & (1 << (bit % 64)) != 0)
    }

    /// Counts a lookup that [`ResponseCache::may_contain`] answered.
    pub fn count_miss(&self) {
        self.misses.fetch_add(1, Ordering::Relaxed);
    }

    fn remember(&self, key: u128) {
        for bit in filter_bits(key) {
            self.filter[bit / 64].fetch_or(1 << (bit % 64), Ordering::Relaxed);
        }
    }

    /// Fills the presence filter from the file (the key index alone is read); until then every
    /// key may be stored.
    fn load_filter(&self, conn: &Connection) -> Result<(), rusqlite::Error> {
        let mut stmt = conn.prepare("SELECT key FROM cache_entries INDEXED BY cache_entries_key")?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            if let Some(key) = key_from_blob(row.get_ref(0)?.as_blob().ok()) {
                self.remember(key);
            }
        }
        self.filter_ready.store(true, Ordering::Release);
        Ok(())
    }

    /// Stores several answers in one transaction (the writer thread's path): sorted by key, the
    /// last answer of a key winning, each appended at the end of the table.
    fn put_many(&self, conn: &mut Connection, entries: &mut Vec<(u128, String)>) -> Result<(), CacheError> {
        let Some(&(first_key, _)) = entries.first() else { return Ok(()) };
        // Stable: of several answers for one key, the last queued stays last.
        entries.sort_by_key(|(key, _)| *key);
        let put_err = |source| CacheError::Put { path: self.path.clone(), key: first_key, source };
        let mut added = 0u64;
        let mut stored = 0u64;
        {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(put_err)?;
            {
                let mut stmt = tx
                    .prepare_cached("INSERT OR REPLACE INTO cache_entries(key, size, response) VALUES(?1, ?2, ?3)")
                    .map_err(put_err)?;
                let mut rest = entries.iter().peekable();
                while let Some((key, response)) = rest.next() {
                    if rest.peek().is_some_and(|(next, _)| next == key) {
                        continue;
                    }
                    let size = (16 + response.len()) as u64;
                    stmt.execute(params![&key.to_be_bytes()[..], size as i64, response]).map_err(put_err)?;
                    added += size;
                    stored += 1;
                }
            }
            tx.commit().map_err(put_err)?;
        }
        entries.clear();
        self.puts.fetch_add(stored, Ordering::Relaxed);
        // A replaced entry is counted twice until the next prune recounts: pruning early is harmless.
        let total = self.stored_bytes.fetch_add(added, Ordering::Relaxed) + added;
        if total > self.max_bytes {
            self.prune(conn)?;
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
    pub fn get(&self, key: u128) -> Option<String> {
        let mut inner = self.lock();
        let found =
            inner.conn.prepare_cached("SELECT id, response FROM cache_entries WHERE key = ?1").and_then(|mut stmt| {
                stmt.query_row([&key.to_be_bytes()[..]], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))
                    .optional()
            });
        match found {
            Ok(Some((id, response))) => {
                self.hits.fetch_add(1, Ordering::Relaxed);
                inner.touched.push((id, key));
                if inner.touched.len() >= TOUCH_BATCH {
                    // Use is advisory (it only orders evictions): a failed write-back is dropped
                    // rather than turning a hit into an error.
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

    /// Stores `response_json` under `key` at once, replacing an older entry, then prunes if over
    /// the bound.
    pub fn put(&self, key: u128, response_json: &str) -> Result<(), CacheError> {
        let mut inner = self.lock();
        self.put_many(&mut inner.conn, &mut vec![(key, response_json.to_owned())])?;
        self.remember(key);
        Ok(())
    }

    /// Writes back pending uses so another process's pruning sees them.
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
        self.stored_bytes.load(Ordering::Relaxed)
    }

    /// Deletes the oldest entries (lowest rowids) down to 90% of the bound, in one statement.
    fn prune(&self, conn: &mut Connection) -> Result<(), CacheError> {
        let err = |source| CacheError::Prune { path: self.path.clone(), source };
        let low_water = self.max_bytes / 10 * 9;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(err)?;
        let total: i64 =
            tx.query_row("SELECT COALESCE(SUM(size), 0) FROM cache_entries", [], |r| r.get(0)).map_err(err)?;
        let mut stored = total.max(0) as u64;
        let mut evicted = 0u64;
        let mut cut = None;
        {
            let mut oldest = tx.prepare("SELECT id, size FROM cache_entries ORDER BY id").map_err(err)?;
            let mut rows = oldest.query([]).map_err(err)?;
            while stored > low_water {
                let Some(row) = rows.next().map_err(err)? else { break };
                cut = Some(row.get::<_, i64>(0).map_err(err)?);
                stored = stored.saturating_sub(row.get::<_, i64>(1).map_err(err)?.max(0) as u64);
                evicted += 1;
            }
        }
        if let Some(cut) = cut {
            tx.execute("DELETE FROM cache_entries WHERE id <= ?1", [cut]).map_err(err)?;
        }
        tx.commit().map_err(err)?;
        self.stored_bytes.store(stored, Ordering::Relaxed);
        self.evicted.fetch_add(evicted, Ordering::Relaxed);
        Ok(())
    }
}

impl Drop for ResponseCache {
    fn drop(&mut self) {
        let inner = self.inner.get_mut().unwrap_or_else(std::sync::PoisonError::into_inner);
        // Dropping cannot report: uses are advisory, losing them only skews eviction order.
        let _ = write_touches(inner);
    }
}

/// Stores answers off the caller's thread: one thread with its own connection, one transaction
/// per sorted group. Callers append to a shared list under a lock and wake the thread only when a
/// group is full (a wake-up per answer cost more than storing it); otherwise it takes what is
/// there every [`WRITE_GROUP_WAIT`]. Dropping it stores what is queued and stops the thread.
pub struct CacheWriter {
    cache: Arc<ResponseCache>,
    queue: Arc<WriteQueue>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Default)]
struct WriteQueue {
    pending: Mutex<Pending>,
    full: Condvar,
}

#[derive(Default)]
struct Pending {
    entries: Vec<(u128, String)>,
    bytes: usize,
    closed: bool,
}

impl WriteQueue {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        // The list is valid whatever a panicking holder did to it.
        self.pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Waits until a group is full, [`WRITE_GROUP_WAIT`] has passed or the writer is dropped, then
    /// swaps the pending answers into `group` (an empty list with room); true once closed.
    fn take(&self, group: &mut Vec<(u128, String)>) -> bool {
        let deadline = Instant::now() + WRITE_GROUP_WAIT;
        let mut pending = self.lock();
        while !pending.closed && pending.entries.len() < WRITE_GROUP && pending.bytes < WRITE_GROUP_BYTES {
            let Some(left) = deadline.checked_duration_since(Instant::now()).filter(|d| !d.is_zero()) else { break };
            pending = self.full.wait_timeout(pending, left).unwrap_or_else(std::sync::PoisonError::into_inner).0;
        }
        std::mem::swap(&mut pending.entries, group);
        pending.bytes = 0;
        pending.closed
    }
}

impl CacheWriter {
    /// Starts the writer thread, which first fills the cache's presence filter.
    pub fn start(cache: Arc<ResponseCache>) -> Result<Self, CacheError> {
        let path = cache.path.clone();
        let open_err = |reason: String| CacheError::Open { path: path.clone(), reason };
        let mut conn = connect(&path).map_err(open_err)?;
        let queue = Arc::new(WriteQueue::default());
        let thread = {
            let (cache, queue) = (Arc::clone(&cache), Arc::clone(&queue));
            std::thread::Builder::new()
                .name("batchagent-cache".into())
                .spawn(move || {
                    // Without the filter every lookup goes to the file: slower, never wrong.
                    let _ = cache.load_filter(&conn);
                    let mut group = Vec::with_capacity(WRITE_GROUP);
                    loop {
                        let closed = queue.take(&mut group);
                        // A failed store costs a future hit, never a result.
                        let _ = cache.put_many(&mut conn, &mut group);
                        group.clear();
                        if closed {
                            break;
                        }
                    }
                })
                .map_err(|e| open_err(format!("starting the writer: {e}")))?
        };
        Ok(Self { cache, queue, thread: Some(thread) })
    }

    pub fn cache(&self) -> &Arc<ResponseCache> {
        &self.cache
    }

    /// Queues an answer; never waits on the disk. Visible to lookups at once through the presence
    /// filter, and in the file once the writer has stored its group (within about
    /// [`WRITE_GROUP_WAIT`]).
    pub fn put(&self, key: u128, response_json: String) {
        self.cache.remember(key);
        let mut pending = self.queue.lock();
        if pending.closed || pending.entries.len() >= WRITE_QUEUE || pending.bytes >= WRITE_QUEUE_BYTES {
            self.cache.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let before = pending.bytes;
        pending.bytes += response_json.len();
        pending.entries.push((key, response_json));
        if pending.entries.len() == WRITE_GROUP || (before < WRITE_GROUP_BYTES && pending.bytes >= WRITE_GROUP_BYTES) {
            self.queue.full.notify_one();
        }
    }
}

impl Drop for CacheWriter {
    fn drop(&mut self) {
        self.queue.lock().closed = true;
        self.queue.full.notify_one();
        if let Some(thread) = self.thread.take() {
            // A panicked writer has stored what it could; nothing else to do at drop.
            let _ = thread.join();
        }
    }
}

/// Three 24-bit positions taken from the key's 128-bit digest.
fn filter_bits(key: u128) -> [usize; 3] {
    let mask = (FILTER_BITS - 1) as u128;
    [(key & mask) as usize, ((key >> 40) & mask) as usize, ((key >> 80) & mask) as usize]
}

fn key_from_blob(blob: Option<&[u8]>) -> Option<u128> {
    Some(u128::from_be_bytes(blob?.try_into().ok()?))
}

/// Moves entries used while in the older half of the table to its end (new rowids), so eviction,
/// which deletes from the lowest rowids, reaches them last.
fn write_touches(inner: &mut Inner) -> Result<(), rusqlite::Error> {
    if inner.touched.is_empty() {
        return Ok(());
    }
    let mut touched = std::mem::take(&mut inner.touched);
    touched.sort_unstable();
    touched.dedup();
    let tx = inner.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    {
        let (low, high): (Option<i64>, Option<i64>) =
            tx.query_row("SELECT MIN(id), MAX(id) FROM cache_entries", [], |r| Ok((r.get(0)?, r.get(1)?)))?;
        let (Some(low), Some(mut next)) = (low, high) else { return tx.commit() };
        let middle = low + (next - low) / 2;
        // The key check skips a row id that eviction freed and a later insert reused.
        let mut stmt = tx.prepare_cached("UPDATE cache_entries SET id = ?1 WHERE id = ?2 AND key = ?3")?;
        for (id, key) in touched.into_iter().filter(|&(id, _)| id < middle) {
            next += 1;
            stmt.execute(params![next, id, &key.to_be_bytes()[..]])?;
        }
    }
    tx.commit()
}

/// The table of the text-keyed layout (`responses`) held answers under v2 keys, which are never
/// looked up again (see [`cache_key`]): it is dropped, its space reused.
fn drop_text_keyed_layout(conn: &Connection) -> Result<(), rusqlite::Error> {
    conn.execute_batch("DROP TABLE IF EXISTS responses")
}

/// The cache key of one model request: a 128-bit hash over the endpoint's identity
/// (its URL and the model it serves, see [`crate::backends::cached::endpoint_identity`]), the model
/// name, the messages, the tools and the sampling parameters. Each part is length-prefixed, so
/// moving bytes from one part to the next changes the key. The JSON texts must be produced
/// canonically by the caller (serde's field order is fixed, so serializing the same request twice
/// gives the same text).
pub fn cache_key(endpoint: &str, model: &str, messages_json: &str, tools_json: &str, sampling_json: &str) -> u128 {
    let mut h = Sip13::new(KEY0, KEY1);
    // A version tag: changing how requests are keyed invalidates old entries instead of misreading
    // them. v2 keys were computed by a hasher that lost the partial word of a short part (distinct
    // requests could share a key): none of them is read again.
    h.write_part(b"batchagent-response-v3");
    for part in [endpoint, model, messages_json, tools_json, sampling_json] {
        h.write_part(part.as_bytes());
    }
    h.finish128()
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
        if bytes.is_empty() {
            // All of it went into the partial word, which stays partial.
            return;
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
    fn many_short_writes_equal_one_write() {
        let input: Vec<u8> = (0u8..=200).collect();
        let whole = hash128(&input);
        for step in 1..=9 {
            let mut h = Sip13::new(KEY0, KEY1);
            for piece in input.chunks(step) {
                h.write(piece);
            }
            assert_eq!(h.finish128(), whole, "pieces of {step}");
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
        assert_ne!(a, cache_key("e", "m[", "1]", "[]", "{}"));
        assert_ne!(a, cache_key("other endpoint", "m", "[1]", "[]", "{}"));
        assert_ne!(a, cache_key("e", "m", "[1]", "[]", "{\"temperature\":0}"));
        assert_ne!(cache_key("", "", "ab", "", ""), cache_key("", "", "a", "b", ""));
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ba-cache-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn k(i: u64) -> u128 {
        cache_key("e", "m", &format!("[{i}]"), "[]", "{}")
    }

    #[test]
    fn get_put_and_pruning_oldest_unused_first() {
        let dir = temp_dir("unit");
        let path = dir.join("nested").join("c.sqlite");
        let cache = ResponseCache::open_with_limit(&path, 10_000).unwrap();
        assert_eq!(cache.get(k(0)), None);
        let body = "x".repeat(984);
        cache.put(k(0), &body).unwrap();
        cache.put(k(0), &body).unwrap();
        assert_eq!(cache.stats().puts, 2);
        for i in 1..9 {
            cache.put(k(i), &body).unwrap();
        }
        // k0 is the oldest entry, but using it (in the older half) makes k1 the first to go.
        assert_eq!(cache.get(k(0)).as_deref(), Some(body.as_str()));
        cache.sync().unwrap();
        cache.put(k(9), &body).unwrap();
        cache.put(k(10), &body).unwrap();
        assert!(cache.stored_bytes() <= 10_000);
        assert_eq!(cache.get(k(1)), None, "the oldest unused entry is evicted");
        assert!(cache.get(k(0)).is_some(), "a used entry is kept");
        assert!(cache.get(k(10)).is_some());
        assert!(cache.stats().evicted >= 1);
        drop(cache);
        let reopened = ResponseCache::open(&path).unwrap();
        assert!(reopened.get(k(10)).is_some());
        assert!(reopened.stored_bytes() <= 10_000);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_replaced_answer_is_the_one_read_back() {
        let dir = temp_dir("replace");
        let path = dir.join("c.sqlite");
        let cache = ResponseCache::open(&path).unwrap();
        cache.put(k(1), "first").unwrap();
        cache.put(k(2), "other").unwrap();
        cache.put(k(1), "second").unwrap();
        assert_eq!(cache.get(k(1)).as_deref(), Some("second"));
        let rows: i64 = cache.lock().conn.query_row("SELECT COUNT(*) FROM cache_entries", [], |r| r.get(0)).unwrap();
        assert_eq!(rows, 2);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_writer_stores_in_groups_and_misses_are_answered_from_memory() {
        let dir = temp_dir("writer");
        let path = dir.join("c.sqlite");
        let cache = Arc::new(ResponseCache::open(&path).unwrap());
        let stored = cache_key("e", "m", "[\"old\"]", "[]", "{}");
        cache.put(stored, "old").unwrap();
        let writer = CacheWriter::start(Arc::clone(&cache)).unwrap();
        let keys: Vec<u128> = (0..100).map(k).collect();
        for &key in &keys {
            writer.put(key, format!("answer {key:x}"));
        }
        // The same key twice in one group: the later answer is the one kept.
        writer.put(keys[7], "newer".into());
        drop(writer);
        let stats = cache.stats();
        assert_eq!((stats.puts, stats.dropped), (101, 0));
        for &key in keys.iter().chain([&stored]) {
            assert!(cache.may_contain(key), "stored keys pass the filter");
            assert!(cache.get(key).is_some());
        }
        assert_eq!(cache.get(keys[7]).as_deref(), Some("newer"));
        let absent: Vec<u128> = (0..1000).map(|i| cache_key("e", "other", &i.to_string(), "", "")).collect();
        let passed = absent.iter().filter(|&&key| cache.may_contain(key)).count();
        assert!(passed < 10, "{passed} of 1000 absent keys passed an almost empty filter");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_reopened_writer_loads_its_filter_from_the_file() {
        let dir = temp_dir("refilter");
        let path = dir.join("c.sqlite");
        {
            let cache = Arc::new(ResponseCache::open(&path).unwrap());
            let writer = CacheWriter::start(Arc::clone(&cache)).unwrap();
            writer.put(k(5), "five".into());
        }
        let cache = Arc::new(ResponseCache::open(&path).unwrap());
        let writer = CacheWriter::start(Arc::clone(&cache)).unwrap();
        // The writer fills the filter before it stores anything: once this answer is stored, the
        // filter holds what the file held.
        writer.put(k(6), "six".into());
        drop(writer);
        assert!(cache.may_contain(k(5)));
        assert_eq!(cache.get(k(5)).as_deref(), Some("five"));
        assert!(!cache.may_contain(k(7)));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_text_keyed_layout_is_dropped() {
        let dir = temp_dir("old-layout");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.sqlite");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(
                "CREATE TABLE responses(key TEXT PRIMARY KEY NOT NULL, response TEXT NOT NULL,
                     size INTEGER NOT NULL, last_used INTEGER NOT NULL) WITHOUT ROWID;
                 INSERT INTO responses VALUES('00', 'old', 5, 0);",
            )
            .unwrap();
        }
        let cache = ResponseCache::open(&path).unwrap();
        let old: i64 = cache
            .lock()
            .conn
            .query_row("SELECT COUNT(*) FROM sqlite_master WHERE name = 'responses'", [], |r| r.get(0))
            .unwrap();
        assert_eq!(old, 0);
        cache.put(k(1), "new").unwrap();
        assert_eq!(cache.get(k(1)).as_deref(), Some("new"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn keys_of_requests_that_differ_in_one_character_differ() {
        let keys: std::collections::HashSet<u128> = (0..10_000).map(k).collect();
        assert_eq!(keys.len(), 10_000);
        let parts: std::collections::HashSet<u128> =
            (0..1000).map(|i| cache_key("e", "m", &format!("[{i}]"), "[]", &format!("{{\"t\":{i}}}"))).collect();
        assert_eq!(parts.len(), 1000);
    }
}
