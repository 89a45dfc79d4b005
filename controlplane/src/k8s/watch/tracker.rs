//! What one watcher has told us about one kind of object, reduced to the changes worth
//! publishing. Pure: no I/O and no Kubernetes types, so relists and no-op updates can be tested
//! without an apiserver.
//!
//! kube-runtime's watcher restarts with Init, InitApply.., InitDone after a desync (410 Gone);
//! client-go informers hide this behind a store diff, and so does this tracker: a relist that
//! returns what we already had publishes nothing.

use std::collections::BTreeMap;

/// One object as last seen: the resourceVersion it had and what it converted to (`None`: not
/// proxied or invalid).
#[derive(Debug)]
struct Seen<M> {
    resource_version: String,
    model: Option<M>,
}

/// A change to publish: `None` deletes the key (or says it is no longer proxied).
pub(crate) type Change<K, M> = (K, Option<M>);

#[derive(Debug)]
pub(crate) struct KindTracker<K, M> {
    seen: BTreeMap<K, Seen<M>>,
    /// Objects of the list in progress (between Init and InitDone).
    relist: Option<BTreeMap<K, Seen<M>>>,
    listed: bool,
}

impl<K, M> Default for KindTracker<K, M> {
    fn default() -> Self {
        KindTracker { seen: BTreeMap::new(), relist: None, listed: false }
    }
}

impl<K: Ord + Clone, M: Clone + PartialEq> KindTracker<K, M> {
    /// True once a first list has completed.
    pub(crate) fn listed(&self) -> bool {
        self.listed
    }

    /// Every object that is proxied, for the initial publication.
    pub(crate) fn current(&self) -> impl Iterator<Item = (&K, &M)> {
        self.seen.iter().filter_map(|(k, s)| s.model.as_ref().map(|m| (k, m)))
    }

    /// A (re)list begins.
    pub(crate) fn init(&mut self) {
        self.relist = Some(BTreeMap::new());
    }

    /// One object of the list. `convert` runs only when the object's resourceVersion differs
    /// from the one already seen, so a relist neither reconverts nor recounts skips.
    pub(crate) fn init_apply(&mut self, key: K, resource_version: String, convert: impl FnOnce() -> Option<M>) {
        let seen = self.reuse_or_convert(&key, resource_version, convert);
        // A watcher always sends Init first; tolerate a missing one rather than lose the object.
        self.relist.get_or_insert_with(BTreeMap::new).insert(key, seen);
    }

    /// The list is complete: it replaces what was seen. Returns the differences.
    pub(crate) fn init_done(&mut self) -> Vec<Change<K, M>> {
        let new = self.relist.take().unwrap_or_default();
        let old = std::mem::replace(&mut self.seen, new);
        self.listed = true;
        let mut changes = Vec::new();
        for (key, was) in &old {
            if was.model.is_some() && self.seen.get(key).is_none_or(|now| now.model.is_none()) {
                changes.push((key.clone(), None));
            }
        }
        for (key, now) in &self.seen {
            let before = old.get(key).and_then(|s| s.model.as_ref());
            if now.model.is_some() && now.model.as_ref() != before {
                changes.push((key.clone(), now.model.clone()));
            }
        }
        changes
    }

    /// An object was added or modified. Returns a change unless its model is what was last seen.
    pub(crate) fn apply(
        &mut self,
        key: K,
        resource_version: String,
        convert: impl FnOnce() -> Option<M>,
    ) -> Option<Change<K, M>> {
        let seen = self.reuse_or_convert(&key, resource_version, convert);
        let model = seen.model.clone();
        let before = self.seen.insert(key.clone(), seen).and_then(|s| s.model);
        (before != model).then_some((key, model))
    }

    /// An object was deleted. Returns a deletion if it was proxied.
    pub(crate) fn delete(&mut self, key: &K) -> Option<Change<K, M>> {
        let was = self.seen.remove(key)?;
        was.model.map(|_| (key.clone(), None))
    }

    fn reuse_or_convert(&self, key: &K, resource_version: String, convert: impl FnOnce() -> Option<M>) -> Seen<M> {
        match self.seen.get(key) {
            Some(s) if !resource_version.is_empty() && s.resource_version == resource_version => {
                Seen { resource_version, model: s.model.clone() }
            }
            _ => Seen { resource_version, model: convert() },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type T = KindTracker<&'static str, u32>;

    fn listed(objects: &[(&'static str, &str, Option<u32>)]) -> (T, Vec<Change<&'static str, u32>>) {
        let mut t = T::default();
        t.init();
        for (k, rv, m) in objects {
            t.init_apply(k, rv.to_string(), || *m);
        }
        let changes = t.init_done();
        (t, changes)
    }

    #[test]
    fn first_list_reports_every_proxied_object() {
        let (t, changes) = listed(&[("a", "1", Some(1)), ("b", "2", None), ("c", "3", Some(3))]);
        assert!(t.listed());
        assert_eq!(changes, vec![("a", Some(1)), ("c", Some(3))]);
        assert_eq!(t.current().collect::<Vec<_>>(), vec![(&"a", &1), (&"c", &3)]);
    }

    #[test]
    fn identical_relist_reports_nothing_and_does_not_reconvert() {
        let (mut t, _) = listed(&[("a", "1", Some(1)), ("b", "2", None)]);
        t.init();
        t.init_apply("a", "1".into(), || panic!("same resourceVersion must not be reconverted"));
        t.init_apply("b", "2".into(), || panic!("same resourceVersion must not be reconverted"));
        assert_eq!(t.init_done(), vec![]);
    }

    #[test]
    fn relist_reports_changes_and_disappearances_only() {
        let (mut t, _) = listed(&[("a", "1", Some(1)), ("b", "2", Some(2)), ("c", "3", Some(3)), ("d", "4", Some(4))]);
        t.init();
        t.init_apply("a", "1".into(), || Some(1));
        t.init_apply("b", "9".into(), || Some(20)); // changed
        t.init_apply("c", "10".into(), || None); // no longer proxied
        t.init_apply("d", "11".into(), || Some(4)); // new version, same model
        t.init_apply("e", "12".into(), || Some(5)); // new
        let mut changes = t.init_done();
        changes.sort();
        assert_eq!(changes, vec![("b", Some(20)), ("c", None), ("e", Some(5))]);
    }

    #[test]
    fn relist_deletes_missing_objects() {
        let (mut t, _) = listed(&[("a", "1", Some(1)), ("b", "2", Some(2)), ("n", "3", None)]);
        t.init();
        t.init_apply("a", "1".into(), || Some(1));
        assert_eq!(t.init_done(), vec![("b", None)]);
        assert_eq!(t.current().count(), 1);
    }

    #[test]
    fn apply_skips_no_op_updates() {
        let (mut t, _) = listed(&[("a", "1", Some(1))]);
        assert_eq!(t.apply("a", "2".into(), || Some(1)), None, "heartbeat: new version, same model");
        assert_eq!(t.apply("a", "3".into(), || Some(7)), Some(("a", Some(7))));
        assert_eq!(t.apply("a", "4".into(), || None), Some(("a", None)), "became unproxied");
        assert_eq!(t.apply("a", "5".into(), || None), None);
        assert_eq!(t.apply("b", "6".into(), || Some(2)), Some(("b", Some(2))));
    }

    #[test]
    fn delete_reports_only_proxied_objects() {
        let (mut t, _) = listed(&[("a", "1", Some(1)), ("n", "2", None)]);
        assert_eq!(t.delete(&"a"), Some(("a", None)));
        assert_eq!(t.delete(&"a"), None);
        assert_eq!(t.delete(&"n"), None);
        assert_eq!(t.delete(&"zz"), None);
    }
}
