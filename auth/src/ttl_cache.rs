//! A small bounded cache whose entries expire. Review answers are cached so that a reconnect
//! storm of thousands of nodes, or a client retrying a bad token, does not become as many
//! apiserver requests; the bound keeps a caller inventing tokens from growing memory.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::Instant;

#[derive(Debug)]
pub struct TtlCache<K, V> {
    entries: HashMap<K, (V, Instant)>,
    capacity: usize,
}

impl<K: Hash + Eq + Clone, V: Clone> TtlCache<K, V> {
    pub fn new(capacity: usize) -> Self {
        TtlCache { entries: HashMap::new(), capacity: capacity.max(1) }
    }

    pub fn get(&self, key: &K, now: Instant) -> Option<V> {
        self.entries.get(key).filter(|(_, expires)| *expires > now).map(|(v, _)| v.clone())
    }

    /// Full: expired entries go first, then the one closest to expiry. The scan is O(capacity)
    /// but happens only on inserts into a full cache, which follow an apiserver round trip.
    pub fn insert(&mut self, key: K, value: V, expires: Instant, now: Instant) {
        if expires <= now {
            return;
        }
        if self.entries.len() >= self.capacity && !self.entries.contains_key(&key) {
            self.entries.retain(|_, (_, e)| *e > now);
            if self.entries.len() >= self.capacity
                && let Some(soonest) = self.entries.iter().min_by_key(|(_, (_, e))| *e).map(|(k, _)| k.clone())
            {
                self.entries.remove(&soonest);
            }
        }
        self.entries.insert(key, (value, expires));
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn entries_expire_and_the_size_is_bounded() {
        let now = Instant::now();
        let s = Duration::from_secs(1);
        let mut c = TtlCache::new(3);
        c.insert("a", 1, now + 10 * s, now);
        c.insert("b", 2, now + 5 * s, now);
        c.insert("c", 3, now + 20 * s, now);
        c.insert("gone", 9, now, now);
        assert_eq!(c.len(), 3);
        assert_eq!(c.get(&"a", now), Some(1));
        assert_eq!(c.get(&"a", now + 11 * s), None, "expired");
        // Full: "b" expires first, so it goes.
        c.insert("d", 4, now + 30 * s, now);
        assert_eq!(c.len(), 3);
        assert_eq!(c.get(&"b", now), None);
        assert_eq!(c.get(&"d", now), Some(4));
        // Later, with "a" expired: it goes instead of a live entry.
        c.insert("e", 5, now + 40 * s, now + 15 * s);
        assert_eq!((c.get(&"c", now + 15 * s), c.get(&"d", now + 15 * s)), (Some(3), Some(4)));
        // Replacing a key never evicts another.
        c.insert("e", 6, now + 40 * s, now + 15 * s);
        assert_eq!(c.len(), 3);
        assert_eq!(c.get(&"e", now + 15 * s), Some(6));
    }
}
