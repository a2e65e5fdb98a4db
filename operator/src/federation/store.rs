//! The federated bundles one replica hands out: a map from foreign trust domain to the
//! bundle held for it (fetched, or the bootstrap bundle until the first fetch), shared by
//! the Node API (entry streams) and the fetcher (an `https_spiffe` endpoint in another
//! federated trust domain is authenticated with that domain's bundle).
//!
//! Filled by the loader on every replica from the FederatedBundle objects and the
//! ConfigMaps the leader writes; readers take clones and never block the loader. Changes
//! are announced on a `tokio::sync::watch` so open streams push them at once.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use sigil_identity::{TrustBundle, TrustDomain};
use tokio::sync::watch;

/// Bundles of the foreign trust domains this replica federates with.
#[derive(Debug)]
pub struct FederatedBundles {
    bundles: RwLock<BTreeMap<TrustDomain, TrustBundle>>,
    version: watch::Sender<u64>,
}

impl Default for FederatedBundles {
    fn default() -> Self {
        Self {
            bundles: RwLock::default(),
            version: watch::channel(0).0,
        }
    }
}

impl FederatedBundles {
    /// An empty set.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The bundle held for `td`.
    pub fn get(&self, td: &TrustDomain) -> Option<TrustBundle> {
        self.bundles
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(td)
            .cloned()
    }

    /// Every bundle held.
    pub fn all(&self) -> Vec<TrustBundle> {
        self.bundles
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Replaces the whole set; announces a change only if something differs.
    pub fn replace(&self, next: BTreeMap<TrustDomain, TrustBundle>) {
        let mut map = self.bundles.write().unwrap_or_else(|p| p.into_inner());
        if *map == next {
            return;
        }
        *map = next;
        drop(map);
        self.version.send_modify(|v| *v += 1);
    }

    /// A receiver that changes whenever the set changes.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn replace_announces_only_changes() {
        let store = FederatedBundles::new();
        let mut rx = store.subscribe();
        let td: TrustDomain = "partner.test".parse().unwrap();
        let mut map = BTreeMap::new();
        map.insert(td.clone(), TrustBundle::new(td.clone()));
        store.replace(map.clone());
        assert!(rx.has_changed().unwrap());
        rx.borrow_and_update();
        store.replace(map);
        assert!(!rx.has_changed().unwrap());
        assert_eq!(store.get(&td), Some(TrustBundle::new(td)));
        store.replace(BTreeMap::new());
        assert!(rx.has_changed().unwrap());
        assert!(store.all().is_empty());
    }
}
