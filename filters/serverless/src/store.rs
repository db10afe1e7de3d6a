//! Where the management service's routes live, once per Envoy.
//!
//! Natively one filter serves every worker: the table is in its memory, and an edit swaps one
//! bucket (built beforehand) under the write lock. On proxy-wasm every worker runs its own VM:
//! the table is in shared data, one entry per bucket, and a request reads the one bucket its
//! host needs. Two sets of entries alternate: a full load fills the idle one and then flips the
//! generation, so requests see the old table or the new one, never half of one. A VM re-reads
//! the generation every tick, and at once when a host is not found. The set left behind gets the
//! changes made after the flip too, until it is emptied `SETTLE_MS` later, when every VM has
//! moved on; the next full load waits for that.
//!
//! The first load, with no table in force, fills the table in force page by page instead: what
//! is loaded routes at once, and a host not loaded yet is answered 503 (the table is incomplete),
//! not 404, until the last page.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::RwLock;

use edgewise_core::serverless::table::{self, bucket_of, Batch, LocalTable, MANAGED_BITS};
use edgewise_core::serverless::ManagedRoutes;
use edgewise_host::shared::{get_u64, set_u64, update_u64};
use edgewise_host::{read, write, Host};

pub enum Store {
    /// The table, and whether its first load is still going on. A lock every worker takes, for
    /// reading: the watch writes only to apply a change, so requests never wait on each other.
    Local(RwLock<Option<LocalTable>>, AtomicBool),
    Shared(Shared),
}

/// How long the generation a full load replaced stays, for VMs still reading it.
pub const SETTLE_MS: u64 = 2_000;
/// Marks the generation left behind while a copy empties it.
const EMPTYING: u64 = 1 << 63;

pub struct Shared {
    /// `<namespace>.b`: a bucket's entry is `<prefix><set>.<index in hex>`.
    prefix: String,
    key_generation: String,
    /// The generation replaced by the last full load until it is emptied (0: none), and when.
    key_left: String,
    key_flipped: String,
    /// 1 while the first load fills the table in force.
    key_loading: String,
    /// The generation this VM reads (0: none loaded yet), refreshed every tick.
    generation: AtomicU64,
}

/// A full load in progress: the table it builds, away from the one in force, or (the first
/// load) the table in force itself.
pub enum Staging {
    Local(LocalTable),
    Shared { generation: u64, routes: u64 },
    Live { routes: u64 },
}

impl Store {
    pub fn new(namespace: &str, shared: bool) -> Store {
        if !shared {
            return Store::Local(RwLock::new(None), AtomicBool::new(false));
        }
        Store::Shared(Shared {
            prefix: format!("{namespace}.b"),
            key_generation: format!("{namespace}.generation"),
            key_left: format!("{namespace}.generation_left"),
            key_flipped: format!("{namespace}.flipped_ms"),
            key_loading: format!("{namespace}.loading"),
            generation: AtomicU64::new(0),
        })
    }

    /// The view a request looks its route up in.
    pub fn view<'a, H: Host>(&'a self, host: &'a H) -> View<'a, H> {
        View { store: self, host }
    }

    /// Re-reads which table is in force, and empties the one a full load left once it has
    /// settled (proxy-wasm; each tick).
    pub fn refresh(&self, host: &impl Host) {
        if let Store::Shared(s) = self {
            s.generation.store(get_u64(host, &s.key_generation).0, Relaxed);
            let left = get_u64(host, &s.key_left).0;
            let due = get_u64(host, &s.key_flipped).0 + SETTLE_MS;
            // The copy that marks it being emptied empties it; a full load waits meanwhile (the
            // set it would fill is this one).
            if left != 0
                && left & EMPTYING == 0
                && host.now_ms() >= due
                && update_u64(host, &s.key_left, |g| (g == left).then_some(left | EMPTYING)).is_some()
            {
                s.clear(host, left);
                set_u64(host, &s.key_left, 0);
            }
        }
    }

    /// When a full load may start, if not now: the last one's leftover must settle and be
    /// emptied first.
    pub fn busy_until(&self, host: &impl Host) -> Option<u64> {
        let Store::Shared(s) = self else { return None };
        let now = host.now_ms();
        let left = get_u64(host, &s.key_left).0;
        if left & EMPTYING != 0 {
            return Some(now + 100);
        }
        let due = get_u64(host, &s.key_flipped).0 + SETTLE_MS;
        (left != 0 && now < due).then_some(due)
    }

    pub fn loaded(&self, host: &impl Host) -> bool {
        match self {
            Store::Local(t, _) => read(t).is_some(),
            Store::Shared(s) => s.current(host) > 0,
        }
    }

    pub fn contains(&self, host: &impl Host, key: &[u8]) -> bool {
        match self {
            Store::Local(t, _) => read(t).as_ref().is_some_and(|t| t.contains(key)),
            Store::Shared(s) => {
                let mut bucket = Vec::new();
                s.bucket(host, s.current(host), key, &mut bucket) && table::find(&bucket, key).is_some()
            }
        }
    }

    /// Puts (`Some(record)`) or deletes the route of `key` in the table in force; the change in
    /// the number of routes.
    pub fn edit(&self, host: &impl Host, key: &[u8], record: Option<&[u8]>) -> i64 {
        let found = match self {
            Store::Local(t, _) => {
                let Some(edited) = read(t).as_ref().map(|t| t.edited(key, record)) else { return 0 };
                let found = edited.2;
                // Only this thread writes: the bucket built under the read lock is still current.
                let old = write(t).as_mut().map(|t| t.replace(edited, record.is_some()));
                drop(old);
                found
            }
            Store::Shared(s) => {
                let left = get_u64(host, &s.key_left).0;
                if left != 0 {
                    s.edit(host, left, key, record);
                }
                s.edit(host, s.current(host), key, record)
            }
        };
        match (found, record.is_some()) {
            (false, true) => 1,
            (true, false) => -1,
            _ => 0,
        }
    }

    /// Starts a full load; `None` while another copy empties the set it would fill.
    pub fn stage(&self, host: &impl Host) -> Option<Staging> {
        match self {
            Store::Local(t, loading) => {
                let mut table = write(t);
                if table.is_some() {
                    return Some(Staging::Local(LocalTable::new(MANAGED_BITS)));
                }
                *table = Some(LocalTable::new(MANAGED_BITS));
                loading.store(true, Relaxed);
                Some(Staging::Live { routes: 0 })
            }
            Store::Shared(s) if get_u64(host, &s.key_generation).0 == 0 => {
                s.clear(host, 1);
                set_u64(host, &s.key_loading, 1);
                set_u64(host, &s.key_generation, 1);
                s.generation.store(1, Relaxed);
                Some(Staging::Live { routes: 0 })
            }
            Store::Shared(s) => {
                // The generation left behind is in the set this load fills: taken from the
                // copies that would empty it, then emptied here.
                let left = get_u64(host, &s.key_left).0;
                if left & EMPTYING != 0
                    || left != 0 && update_u64(host, &s.key_left, |g| (g == left).then_some(0)).is_none()
                {
                    return None;
                }
                let generation = get_u64(host, &s.key_generation).0 + 1;
                s.clear(host, generation);
                Some(Staging::Shared { generation, routes: 0 })
            }
        }
    }

    /// Puts a page's routes (a sorted batch) in the staging table: each bucket they touch is
    /// built once with all of them, and installed or written once.
    pub fn stage_batch(&self, host: &impl Host, staging: &mut Staging, batch: &Batch) {
        match (self, staging) {
            (_, Staging::Local(t)) => t.put_batch(batch),
            (Store::Shared(s), Staging::Shared { generation, routes }) => *routes += s.merge(host, *generation, batch),
            (Store::Shared(s), Staging::Live { routes }) => *routes += s.merge(host, s.current(host), batch),
            (Store::Local(t, _), Staging::Live { routes }) => {
                for (index, group) in batch.buckets(MANAGED_BITS) {
                    let Some(merged) = read(t).as_ref().map(|t| t.merged(index, group)) else { return };
                    *routes += merged.added as u64;
                    // Only this thread writes: the bucket built under the read lock is still current.
                    let old = write(t).as_mut().map(|t| t.install(index, merged));
                    drop(old);
                }
            }
            (Store::Local(..), Staging::Shared { .. }) => {}
        }
    }

    /// Puts the staged table in force; the number of its routes.
    pub fn commit(&self, host: &impl Host, staging: Staging) -> u64 {
        match (self, staging) {
            (Store::Local(t, loading), Staging::Local(table)) => {
                let routes = table.len() as u64;
                let old = write(t).replace(table);
                loading.store(false, Relaxed);
                drop(old); // outside the lock: freeing a large table takes milliseconds
                routes
            }
            (Store::Local(_, loading), Staging::Live { routes }) => {
                loading.store(false, Relaxed);
                routes
            }
            (Store::Shared(s), Staging::Live { routes }) => {
                set_u64(host, &s.key_loading, 0);
                routes
            }
            (Store::Shared(s), Staging::Shared { generation, routes }) => {
                set_u64(host, &s.key_loading, 0);
                set_u64(host, &s.key_generation, generation);
                set_u64(host, &s.key_flipped, host.now_ms());
                set_u64(host, &s.key_left, generation - 1);
                s.generation.store(generation, Relaxed);
                routes
            }
            _ => 0,
        }
    }
}

impl Shared {
    fn current(&self, host: &impl Host) -> u64 {
        match self.generation.load(Relaxed) {
            // Not loaded as far as this VM knows: another may have loaded it since the last tick.
            0 => {
                let generation = get_u64(host, &self.key_generation).0;
                self.generation.store(generation, Relaxed);
                generation
            }
            generation => generation,
        }
    }

    /// Writes the entry name of a bucket into `buf`, returning it as text.
    fn entry<'b>(&self, buf: &'b mut [u8; 160], generation: u64, index: usize) -> Option<&'b str> {
        let mut w = &mut buf[..];
        write!(w, "{}{}.{index:x}", self.prefix, generation & 1).ok()?;
        let len = 160 - w.len();
        std::str::from_utf8(buf.get(..len)?).ok()
    }

    fn bucket(&self, host: &impl Host, generation: u64, key: &[u8], into: &mut Vec<u8>) -> bool {
        if generation == 0 {
            return false;
        }
        let mut buf = [0; 160];
        let Some(entry) = self.entry(&mut buf, generation, bucket_of(key, MANAGED_BITS)) else { return false };
        *into = host.shared_get(entry).0.unwrap_or_default();
        true
    }

    /// Read, edit, write back if unchanged meanwhile; whether the key was there.
    fn edit(&self, host: &impl Host, generation: u64, key: &[u8], record: Option<&[u8]>) -> bool {
        let mut buf = [0; 160];
        let Some(entry) = self.entry(&mut buf, generation, bucket_of(key, MANAGED_BITS)) else { return false };
        for _ in 0..8 {
            let (value, cas) = host.shared_get(entry);
            let (bucket, found) = table::edit(&value.unwrap_or_default(), key, record);
            if host.shared_set(entry, &bucket, cas) {
                return found;
            }
        }
        log::error!("serverless: shared route bucket {entry} kept changing under this edit");
        false
    }

    /// Puts a batch in the set of `generation`, each bucket it touches read and written once;
    /// the keys added.
    fn merge(&self, host: &impl Host, generation: u64, batch: &Batch) -> u64 {
        let mut buf = [0; 160];
        let mut added = 0;
        for (index, group) in batch.buckets(MANAGED_BITS) {
            let Some(entry) = self.entry(&mut buf, generation, index) else { return added };
            let written = (0..8).find_map(|_| {
                let (value, cas) = host.shared_get(entry);
                let merged = table::merge(&value.unwrap_or_default(), group);
                host.shared_set(entry, &merged.bucket, cas).then_some(merged.added as u64)
            });
            match written {
                Some(n) => added += n,
                None => log::error!("serverless: shared route bucket {entry} kept changing under this load"),
            }
        }
        added
    }

    fn clear(&self, host: &impl Host, generation: u64) {
        let mut buf = [0; 160];
        for index in 0..1usize << MANAGED_BITS {
            let Some(entry) = self.entry(&mut buf, generation, index) else { return };
            if host.shared_get(entry).0.is_some_and(|v| !v.is_empty()) {
                host.shared_set(entry, &[], None);
            }
        }
    }
}

/// The store as a request sees it.
pub struct View<'a, H> {
    store: &'a Store,
    host: &'a H,
}

impl<H: Host> ManagedRoutes for View<'_, H> {
    fn bucket(&self, key: &[u8], into: &mut Vec<u8>) -> bool {
        match self.store {
            Store::Local(t, _) => read(t).as_ref().is_some_and(|t| ManagedRoutes::bucket(t, key, into)),
            Store::Shared(s) => s.bucket(self.host, s.current(self.host), key, into),
        }
    }

    fn moved(&self) -> bool {
        let Store::Shared(s) = self.store else { return false };
        let generation = get_u64(self.host, &s.key_generation).0;
        generation != s.generation.swap(generation, Relaxed)
    }

    fn complete(&self) -> bool {
        match self.store {
            Store::Local(_, loading) => !loading.load(Relaxed),
            Store::Shared(s) => get_u64(self.host, &s.key_loading).0 == 0,
        }
    }

    /// Counted natively; on proxy-wasm the lookup costs what counting in shared data would.
    fn has_domains(&self) -> bool {
        match self.store {
            Store::Local(t, _) => read(t).as_ref().is_some_and(|t| t.domains() > 0),
            Store::Shared(_) => true,
        }
    }
}
