//! Route tables as buckets of packed records.
//!
//! A route is one record, `[key len][key][cluster len][cluster][host len][host]` (lengths are
//! one byte), and a bucket is its records one after another. The bucket of a key is FNV-1a of
//! the key, so it is the same in every VM and both builds. The layout serves two homes with one
//! format: natively the buckets live in the filter ([`LocalTable`]); on proxy-wasm each bucket
//! is one shared-data entry, so an Envoy holds one table whatever its number of workers, and a
//! request reads the one bucket it needs.
//!
//! A full load gets its routes a page at a time. A page's records are put bucket by bucket
//! ([`Batch`]): each bucket they touch is written once with all of them. A management service
//! that sends its pages in the order of [`key_hash`] (edgewise-control does) sends each bucket's
//! routes together, so that a load writes every bucket once, at its final size: a million
//! routes are 65,536 allocations or shared-data writes, not a million of growing sizes.
//!
//! Records come from our own encoder, but shared data is memory another VM wrote: decoding
//! checks every length and never panics.

use super::is_domain_key;

/// Longest key, cluster name or host a record holds.
pub const MAX_FIELD: usize = u8::MAX as usize;

/// Bucket bits of the tables a management service fills (65,536 buckets: about 15 routes in a
/// bucket at a million routes, one or none at a few thousand).
pub const MANAGED_BITS: u32 = 16;

/// A route found: where the request goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteRef<'a> {
    pub cluster: &'a str,
    pub host: &'a str,
}

/// The hash a key's bucket is taken from: FNV-1a, finished with murmur3's mixer (FNV-1a
/// spreads short keys poorly over its high bits). Fixed, so that it is the same in every VM, both
/// builds and the management service, whose page order it is.
pub fn key_hash(key: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in key {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    h = (h ^ (h >> 33)).wrapping_mul(0xff51_afd7_ed55_8ccd);
    h = (h ^ (h >> 33)).wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// The bucket of a key's hash in a table of `2^bits` buckets (`bits` at most 32): its top bits,
/// so that keys in hash order are in bucket order.
fn bucket_of_hash(h: u64, bits: u32) -> usize {
    match bits.min(32) {
        0 => 0,
        bits => (h >> (64 - bits)) as usize,
    }
}

/// The bucket of `key` in a table of `2^bits` buckets (`bits` at most 32).
pub fn bucket_of(key: &[u8], bits: u32) -> usize {
    bucket_of_hash(key_hash(key), bits)
}

/// Appends the record of a route to `out`.
pub fn encode(key: &[u8], cluster: &str, host: &str, out: &mut Vec<u8>) -> Result<(), &'static str> {
    for (field, what) in [(key, "key"), (cluster.as_bytes(), "cluster"), (host.as_bytes(), "host")] {
        let Ok(len) = u8::try_from(field.len()) else {
            return Err(match what {
                "key" => "the route key is longer than 255 bytes",
                "cluster" => "the cluster name is longer than 255 bytes",
                _ => "the host is longer than 255 bytes",
            });
        };
        out.push(len);
        out.extend_from_slice(field);
    }
    Ok(())
}

/// One record of a bucket.
struct Record<'a> {
    key: &'a [u8],
    cluster: &'a [u8],
    host: &'a [u8],
    /// The whole record.
    bytes: &'a [u8],
}

/// The records of a bucket, in order; stops at the first that does not decode.
struct Records<'a>(&'a [u8]);

impl<'a> Iterator for Records<'a> {
    type Item = Record<'a>;

    fn next(&mut self) -> Option<Record<'a>> {
        let all = self.0;
        let mut rest = all;
        let mut field = || {
            let (&len, tail) = rest.split_first()?;
            let (value, tail) = tail.split_at_checked(len as usize)?;
            rest = tail;
            Some(value)
        };
        let (key, cluster, host) = (field(), field(), field());
        let (Some(key), Some(cluster), Some(host)) = (key, cluster, host) else {
            self.0 = &[];
            return None;
        };
        let (bytes, tail) = all.split_at(all.len() - rest.len());
        self.0 = tail;
        Some(Record { key, cluster, host, bytes })
    }
}

/// The record of `key` in a bucket, whole.
pub fn find_record<'a>(bucket: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    Records(bucket).find(|r| r.key == key).map(|r| r.bytes)
}

/// The route of `key` in a bucket.
pub fn find<'a>(bucket: &'a [u8], key: &[u8]) -> Option<RouteRef<'a>> {
    let r = Records(bucket).find(|r| r.key == key)?;
    Some(RouteRef { cluster: std::str::from_utf8(r.cluster).ok()?, host: std::str::from_utf8(r.host).ok()? })
}

/// The bucket with the route of `key` replaced by `record` (or removed, for `None`), and whether
/// the key was there.
pub fn edit(bucket: &[u8], key: &[u8], record: Option<&[u8]>) -> (Vec<u8>, bool) {
    let mut out = Vec::with_capacity(bucket.len() + record.map_or(0, <[u8]>::len));
    let mut found = false;
    for r in Records(bucket) {
        if r.key == key {
            found = true;
        } else {
            out.extend_from_slice(r.bytes);
        }
    }
    out.extend_from_slice(record.unwrap_or_default());
    (out, found)
}

/// The routes of one page, as records in one buffer, to be put bucket by bucket.
#[derive(Debug, Default)]
pub struct Batch {
    bytes: Vec<u8>,
    /// Per record: its key's hash, where it is in `bytes`, and its position in the page.
    index: Vec<(u64, u32, u32, u32)>,
}

impl Batch {
    /// Empties it, keeping its memory for the next page.
    pub fn clear(&mut self) {
        self.bytes.clear();
        self.index.clear();
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Adds the route of `key`.
    pub fn push(&mut self, key: &[u8], cluster: &str, host: &str) -> Result<(), &'static str> {
        let start = self.bytes.len();
        encode(key, cluster, host, &mut self.bytes)?;
        let span = u32::try_from(start).ok().zip(u32::try_from(self.bytes.len()).ok());
        let Some((start, end)) = span.filter(|_| self.index.len() < u32::MAX as usize) else {
            self.bytes.truncate(start);
            return Err("the page is larger than 4 GiB");
        };
        self.index.push((key_hash(key), start, end, self.index.len() as u32));
        Ok(())
    }

    fn record(&self, &(_, start, end, _): &(u64, u32, u32, u32)) -> &[u8] {
        self.bytes.get(start as usize..end as usize).unwrap_or_default()
    }

    /// Orders the records by bucket (and key within one): the page position of a key given
    /// twice, if one is.
    pub fn sort(&mut self) -> Result<(), usize> {
        let mut index = std::mem::take(&mut self.index);
        index.sort_unstable_by(|a, b| {
            a.0.cmp(&b.0).then_with(|| record_key(self.record(a)).cmp(record_key(self.record(b))))
        });
        let twice = index
            .iter()
            .zip(index.iter().skip(1))
            .find(|(a, b)| record_key(self.record(a)) == record_key(self.record(b)));
        let twice = twice.map(|(a, b)| a.3.max(b.3) as usize);
        self.index = index;
        twice.map_or(Ok(()), Err)
    }

    /// The records of each bucket of a table of `2^bits` buckets, bucket by bucket (once
    /// sorted).
    pub fn buckets(&self, bits: u32) -> impl Iterator<Item = (usize, Group<'_>)> {
        let mut rest = &self.index[..];
        std::iter::from_fn(move || {
            let bucket = bucket_of_hash(rest.first()?.0, bits);
            let n = rest.iter().take_while(|e| bucket_of_hash(e.0, bits) == bucket).count();
            let (group, tail) = rest.split_at(n);
            rest = tail;
            Some((bucket, Group { batch: self, entries: group }))
        })
    }
}

/// The records of a batch that go in one bucket, each of another key.
#[derive(Clone, Copy)]
pub struct Group<'a> {
    batch: &'a Batch,
    entries: &'a [(u64, u32, u32, u32)],
}

impl<'a> Group<'a> {
    pub fn records(self) -> impl Iterator<Item = &'a [u8]> {
        self.entries.iter().map(move |e| self.batch.record(e))
    }

    fn has(self, key: &[u8]) -> bool {
        self.records().any(|r| record_key(r) == key)
    }
}

/// A bucket with a group's records put in it.
pub struct Merged {
    pub bucket: Box<[u8]>,
    /// Keys that were not in the bucket, and custom domains among them.
    pub added: usize,
    pub added_domains: usize,
}

/// `bucket` with the records of `group` put in it (each replacing its key's), built in one
/// allocation of its final size.
pub fn merge(bucket: &[u8], group: Group<'_>) -> Merged {
    let kept = || Records(bucket).filter(|r| !group.has(r.key));
    let size = kept().map(|r| r.bytes.len()).sum::<usize>() + group.records().map(<[u8]>::len).sum::<usize>();
    let mut out = Vec::with_capacity(size);
    for r in kept() {
        out.extend_from_slice(r.bytes);
    }
    let (mut added, mut added_domains) = (0, 0);
    for record in group.records() {
        out.extend_from_slice(record);
        let key = record_key(record);
        if Records(bucket).all(|r| r.key != key) {
            added += 1;
            added_domains += usize::from(is_domain_key(key));
        }
    }
    Merged { bucket: out.into_boxed_slice(), added, added_domains }
}

/// The key of a record (as `encode` wrote it).
pub fn record_key(record: &[u8]) -> &[u8] {
    Records(record).next().map_or(&[], |r| r.key)
}

/// A table in the filter's own memory: `2^bits` buckets, each one allocation of exactly its size.
#[derive(Debug)]
pub struct LocalTable {
    bits: u32,
    buckets: Vec<Box<[u8]>>,
    len: usize,
    /// Routes of custom domains among them.
    domains: usize,
}

/// A bucket built with an edit, for [`LocalTable::replace`]: its index, its bytes, whether the
/// key was there and whether it is a custom domain's.
pub type Edited = (usize, Box<[u8]>, bool, bool);

impl LocalTable {
    pub fn new(bits: u32) -> Self {
        LocalTable { bits, buckets: vec![Box::default(); 1 << bits], len: 0, domains: 0 }
    }

    pub fn domains(&self) -> usize {
        self.domains
    }

    /// Bits for a table of `n` routes: about eight routes a bucket, at most `MANAGED_BITS`.
    pub fn bits_for(n: usize) -> u32 {
        (n / 8).max(1).next_power_of_two().trailing_zeros().min(MANAGED_BITS)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn bucket(&self, key: &[u8]) -> &[u8] {
        self.buckets.get(bucket_of(key, self.bits)).map_or(&[], |b| &b[..])
    }

    pub fn get(&self, key: &[u8]) -> Option<RouteRef<'_>> {
        find(self.bucket(key), key)
    }

    pub fn contains(&self, key: &[u8]) -> bool {
        Records(self.bucket(key)).any(|r| r.key == key)
    }

    /// The bucket `key` is in with the edit made, to be installed by [`LocalTable::replace`]:
    /// the work happens before, the swap under the writer's lock is a pointer.
    pub fn edited(&self, key: &[u8], record: Option<&[u8]>) -> Edited {
        let (bucket, found) = edit(self.bucket(key), key, record);
        (bucket_of(key, self.bits), bucket.into_boxed_slice(), found, is_domain_key(key))
    }

    /// Installs an edited bucket; returns the one it replaced (to be dropped outside the lock).
    pub fn replace(&mut self, (index, bucket, found, domain): Edited, put: bool) -> Box<[u8]> {
        let counted = match (found, put) {
            (false, true) => 1,
            (true, false) => -1,
            _ => 0,
        };
        self.len = self.len.saturating_add_signed(counted);
        if domain {
            self.domains = self.domains.saturating_add_signed(counted);
        }
        self.buckets.get_mut(index).map(|b| std::mem::replace(b, bucket)).unwrap_or_default()
    }

    /// The bucket `index` with `group` put in it, to be installed by [`LocalTable::install`].
    pub fn merged(&self, index: usize, group: Group<'_>) -> Merged {
        merge(self.buckets.get(index).map_or(&[], |b| &b[..]), group)
    }

    /// Installs a merged bucket; returns the one it replaced (to be dropped outside the lock).
    pub fn install(&mut self, index: usize, merged: Merged) -> Box<[u8]> {
        self.len += merged.added;
        self.domains += merged.added_domains;
        self.buckets.get_mut(index).map(|b| std::mem::replace(b, merged.bucket)).unwrap_or_default()
    }

    /// Puts a sorted batch, each bucket written once.
    pub fn put_batch(&mut self, batch: &Batch) {
        for (index, group) in batch.buckets(self.bits) {
            let merged = self.merged(index, group);
            self.install(index, merged);
        }
    }

    /// Puts a route (a record of `encode`); true if its key was new.
    pub fn put(&mut self, record: &[u8]) -> bool {
        let edited = self.edited(record_key(record), Some(record));
        let new = !edited.2;
        self.replace(edited, true);
        new
    }

    /// Removes the route of `key`; true if it was there.
    pub fn remove(&mut self, key: &[u8]) -> bool {
        let edited = self.edited(key, None);
        let found = edited.2;
        self.replace(edited, false);
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(key: &str, cluster: &str, host: &str) -> Vec<u8> {
        let mut out = Vec::new();
        encode(key.as_bytes(), cluster, host, &mut out).unwrap();
        out
    }

    #[test]
    fn buckets_find_put_replace_and_remove() {
        let mut bucket = Vec::new();
        for (k, c, h) in [("a", "c1", "a.example"), ("bb", "c2", "b.example"), ("c", "c1", "c.example")] {
            bucket = edit(&bucket, k.as_bytes(), Some(&record(k, c, h))).0;
        }
        assert_eq!(find(&bucket, b"bb"), Some(RouteRef { cluster: "c2", host: "b.example" }));
        assert_eq!(find(&bucket, b"b"), None);
        let (replaced, found) = edit(&bucket, b"bb", Some(&record("bb", "c3", "b2.example")));
        assert!(found);
        assert_eq!(find(&replaced, b"bb"), Some(RouteRef { cluster: "c3", host: "b2.example" }));
        assert_eq!(find(&replaced, b"a").map(|r| r.host), Some("a.example"));
        let (removed, found) = edit(&replaced, b"a", None);
        assert!(found);
        assert_eq!((find(&removed, b"a"), find(&removed, b"c").map(|r| r.host)), (None, Some("c.example")));
        assert!(!edit(&removed, b"zz", None).1);
        assert_eq!(record_key(&record("key", "c", "h")), b"key");
    }

    #[test]
    fn damaged_buckets_are_read_as_far_as_they_decode_and_never_panic() {
        let good = record("a", "c", "h");
        let mut bucket = good.clone();
        bucket.extend_from_slice(&record("b", "c", "h2"));
        for cut in 0..bucket.len() {
            let damaged = &bucket[..cut];
            let b = find(damaged, b"b");
            assert_eq!(b.is_some(), cut == bucket.len(), "cut at {cut}");
            assert_eq!(find(damaged, b"a").is_some(), cut >= good.len(), "cut at {cut}");
        }
        assert_eq!(find(&[0xff, 1, 2], b"a"), None);
        let invalid_utf8 = [1, b'k', 1, 0xff, 1, b'h'];
        assert_eq!(find(&invalid_utf8, b"k"), None);
        assert!(encode(&[0; 256], "c", "h", &mut Vec::new()).is_err());
    }

    #[test]
    fn a_batch_puts_each_bucket_once_replacing_keys_and_refuses_a_key_twice() {
        let mut t = LocalTable::new(4);
        for i in 0..40 {
            t.put(&record(&format!("k{i}"), "old", &format!("h{i}")));
        }
        t.put(&record("\0domain.example\0", "c", "d.example"));
        let before: Vec<*const u8> = t.buckets.iter().map(|b| b.as_ptr()).collect();
        let mut batch = Batch::default();
        // Half the keys already there, half new; pushed out of bucket order.
        for i in (20..60).rev() {
            batch.push(format!("k{i}").as_bytes(), "new", &format!("n{i}")).unwrap();
        }
        batch.push(b"\0other.example\0", "c", "o.example").unwrap();
        assert_eq!(batch.sort(), Ok(()));
        let groups: Vec<usize> = batch.buckets(4).map(|(b, _)| b).collect();
        assert!(groups.windows(2).all(|w| w[0] < w[1]), "each bucket once, in order: {groups:?}");
        assert!(batch.buckets(4).all(|(b, g)| g.records().all(|r| bucket_of(record_key(r), 4) == b)));
        t.put_batch(&batch);
        assert_eq!((t.len(), t.domains()), (62, 2), "20 replaced, 20 and a domain added");
        assert_eq!(t.get(b"k3").map(|r| (r.cluster, r.host)), Some(("old", "h3")));
        assert_eq!(t.get(b"k25").map(|r| (r.cluster, r.host)), Some(("new", "n25")));
        assert_eq!(t.get(b"k59").map(|r| r.host), Some("n59"));
        for (i, b) in t.buckets.iter().enumerate() {
            let touched = groups.contains(&i);
            assert_eq!(b.as_ptr() != before[i], touched, "bucket {i} rewritten only if the batch touched it");
            let records: usize = Records(b).map(|r| r.bytes.len()).sum();
            assert_eq!(records, b.len(), "bucket {i} holds whole records and nothing else");
        }
        // A key twice: refused with the later position, whatever the order.
        batch.clear();
        for key in ["a", "b", "c", "b"] {
            batch.push(key.as_bytes(), "c", "h").unwrap();
        }
        assert_eq!(batch.sort(), Err(3));
        assert!(batch.push(&[0; 256], "c", "h").is_err());
    }

    #[test]
    fn keys_in_hash_order_are_in_bucket_order_for_every_size() {
        let mut keys: Vec<Vec<u8>> = (0..5000u32).map(|i| i.to_be_bytes().to_vec()).collect();
        keys.sort_by_key(|k| key_hash(k));
        for bits in [1, 4, 16, 32] {
            assert!(keys.windows(2).all(|w| bucket_of(&w[0], bits) <= bucket_of(&w[1], bits)), "{bits} bits");
        }
    }

    #[test]
    fn local_tables_count_and_spread() {
        let mut t = LocalTable::new(4);
        for i in 0..100 {
            assert!(t.put(&record(&format!("k{i}"), "c", &format!("h{i}"))));
        }
        assert!(!t.put(&record("k7", "c", "h7-again")));
        assert_eq!(t.len(), 100);
        assert_eq!(t.get(b"k7").map(|r| r.host), Some("h7-again"));
        assert!(t.remove(b"k7") && !t.remove(b"k7"));
        assert_eq!((t.len(), t.get(b"k7")), (99, None));
        let used = t.buckets.iter().filter(|b| !b.is_empty()).count();
        assert_eq!(used, 16, "100 keys reach every one of 16 buckets");
        assert_eq!((LocalTable::bits_for(0), LocalTable::bits_for(100), LocalTable::bits_for(10_000_000)), (0, 4, 16));
        assert_eq!(bucket_of(b"anything", 0), 0);
    }
}
