//! The registry of live client connections: each gets the proxy's own
//! BackendKeyData (pid, secret; the secret 4 bytes for protocol 3.0 clients,
//! 32 for 3.2 ones), under which it is found again when a
//! CancelRequest arrives or when the admin console lists clients.
//!
//! Entries are created by a connection task through [`Clients::register`]
//! and removed when the returned [`Registration`] drops, so the keys of
//! closed connections are forgotten even when a task panics. A DashMap
//! keeps lookups lock-free across the runtime's threads.
//!
//! Each entry also counts the cancels the proxy forwarded for its client,
//! so that the client's connection task can fence a commit that a cancel
//! may have cut short (invariant I2, `proxy::fence`).
//!
//! Where a client's queries run ([`ServerLink`]) sits behind a lock of its
//! own, shared by the entry and the [`Registration`]: a transaction-mode
//! client rewrites it twice per transaction, with no lookup in the map.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use dashmap::DashMap;

/// What the admin console shows of one client and what a cancel needs.
#[derive(Debug, Clone)]
pub struct ClientEntry {
    /// The proxy's cancel key for this client; set by [`Clients::register`].
    pub secret: Vec<u8>,
    pub client_addr: SocketAddr,
    pub user: String,
    pub database: String,
    pub session: String,
    pub tls: bool,
    pub connected_at: SystemTime,
    /// The server the client's queries run on; shared with its
    /// [`Registration`] (the connection task writes it).
    pub link: Arc<Mutex<ServerLink>>,
    /// How many cancels the proxy forwarded for this client; shared with
    /// its [`Registration`] (the connection task reads it).
    pub cancels: Arc<AtomicU64>,
}

/// The server connection a client's queries run on now.
#[derive(Debug, Clone, Default)]
pub struct ServerLink {
    /// The PostgreSQL the client is spliced to, once connected.
    pub address: Option<String>,
    /// The server's own key, once its BackendKeyData has passed.
    pub key: Option<(u32, u32)>,
}

fn lock(link: &Mutex<ServerLink>) -> MutexGuard<'_, ServerLink> {
    // Plain values: a panic while holding the lock leaves nothing broken.
    link.lock().unwrap_or_else(|poison| poison.into_inner())
}

impl ClientEntry {
    /// The server the client's queries run on, as now.
    pub fn server(&self) -> ServerLink {
        lock(&self.link).clone()
    }
}

/// Where a CancelRequest goes, as [`Clients::cancel_target`] finds it.
#[derive(Debug, Clone)]
pub struct CancelTarget {
    /// The server the client is spliced to.
    pub address: String,
    /// The server's own (pid, secret).
    pub server_key: (u32, u32),
}

/// Shared registry; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Clients {
    map: Arc<DashMap<u32, ClientEntry>>,
}

/// Removes its entry on drop.
#[derive(Debug)]
pub struct Registration {
    pub pid: u32,
    pub secret: Vec<u8>,
    /// The entry's server link.
    link: Arc<Mutex<ServerLink>>,
    /// The entry's forwarded-cancel count.
    cancels: Arc<AtomicU64>,
    clients: Clients,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.clients.map.remove(&self.pid);
    }
}

impl Registration {
    /// How many cancels the proxy forwarded for this client so far.
    pub fn cancels_forwarded(&self) -> u64 {
        self.cancels.load(Ordering::SeqCst)
    }

    /// The entry's forwarded-cancel count, readable after the entry is
    /// gone (a cancel is counted before it is sent).
    pub fn cancel_counter(&self) -> Arc<AtomicU64> {
        self.cancels.clone()
    }

    /// Records the server a client is now spliced to, and the server's
    /// BackendKeyData when it is known already (a pooled connection): one
    /// update, as a transaction-mode client makes it at every transaction.
    pub fn set_server(&self, address: &str, key: Option<(u32, u32)>) {
        let mut link = lock(&self.link);
        if link.address.as_deref() != Some(address) {
            link.address = Some(address.to_string());
        }
        link.key = key;
    }

    /// Records the server's BackendKeyData, for forwarding cancels.
    pub fn set_server_key(&self, pid: u32, secret: u32) {
        lock(&self.link).key = Some((pid, secret));
    }

    /// The client no longer runs on a server connection (transaction
    /// mode): a cancel finds nothing. A cancel that found the key before
    /// has been counted by the time this returns (it counts under the
    /// link's lock).
    pub fn clear_server_key(&self) {
        lock(&self.link).key = None;
    }
}

impl Clients {
    /// Registers a client under a fresh random pid and a random secret of
    /// `secret_len` bytes.
    pub fn register(&self, mut entry: ClientEntry, secret_len: usize) -> Registration {
        loop {
            // Positive pids like PostgreSQL's; 0 is never used.
            let pid = rand::random::<u32>() & 0x7FFF_FFFF;
            if pid == 0 {
                continue;
            }
            if let dashmap::Entry::Vacant(slot) = self.map.entry(pid) {
                entry.secret = (0..secret_len).map(|_| rand::random::<u8>()).collect();
                let secret = entry.secret.clone();
                let link = entry.link.clone();
                let cancels = entry.cancels.clone();
                slot.insert(entry);
                return Registration {
                    pid,
                    secret,
                    link,
                    cancels,
                    clients: self.clone(),
                };
            }
        }
    }

    /// The server and server key a CancelRequest with this key targets;
    /// None for unknown keys (dropped silently, like PostgreSQL does).
    /// The cancel is counted as forwarded before the link's lock is let
    /// go, so that [`Registration::clear_server_key`] cannot come between.
    pub fn cancel_target(&self, pid: u32, secret: &[u8]) -> Option<CancelTarget> {
        let entry = self.map.get(&pid)?;
        // Every byte compared, so the time taken says nothing of the key.
        let differences = entry
            .secret
            .iter()
            .zip(secret)
            .fold(0, |acc, (ours, theirs)| acc | (ours ^ theirs));
        if entry.secret.len() != secret.len() || differences != 0 {
            return None;
        }
        let link = lock(&entry.link);
        let target = CancelTarget {
            address: link.address.clone()?,
            server_key: link.key?,
        };
        entry.cancels.fetch_add(1, Ordering::SeqCst);
        Some(target)
    }

    /// A snapshot of every client, for SHOW CLIENTS / SHOW SERVERS.
    pub fn snapshot(&self) -> Vec<(u32, ClientEntry)> {
        let mut all: Vec<_> = self
            .map
            .iter()
            .map(|item| (*item.key(), item.value().clone()))
            .collect();
        all.sort_by_key(|(_, entry)| entry.connected_at);
        all
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> ClientEntry {
        ClientEntry {
            secret: Vec::new(),
            client_addr: SocketAddr::from(([127, 0, 0, 1], 1)),
            user: "u".into(),
            database: "d".into(),
            session: "s".into(),
            tls: false,
            connected_at: SystemTime::now(),
            link: Arc::default(),
            cancels: Arc::default(),
        }
    }

    #[test]
    fn cancel_keys_resolve_only_with_the_secret_and_are_forgotten() {
        let clients = Clients::default();
        let registration = clients.register(entry(), 32);
        assert_eq!(registration.secret.len(), 32);
        assert!(clients
            .cancel_target(registration.pid, &registration.secret)
            .is_none());
        registration.set_server("127.0.0.1:5432", None);
        assert!(clients
            .cancel_target(registration.pid, &registration.secret)
            .is_none());
        registration.set_server("127.0.0.1:5432", Some((42, 43)));
        assert_eq!(registration.cancels_forwarded(), 0);
        let target = clients
            .cancel_target(registration.pid, &registration.secret)
            .unwrap();
        // A cancel found is counted at once, where the connection task sees
        // it; wrong keys below are not.
        assert_eq!(registration.cancels_forwarded(), 1);
        assert_eq!(
            (target.address.as_str(), target.server_key),
            ("127.0.0.1:5432", (42, 43))
        );
        let mut wrong = registration.secret.clone();
        wrong[31] ^= 1;
        assert!(clients.cancel_target(registration.pid, &wrong).is_none());
        assert!(clients
            .cancel_target(registration.pid, &registration.secret[..4])
            .is_none());
        assert_eq!(registration.cancels_forwarded(), 1);
        registration.clear_server_key();
        assert!(clients
            .cancel_target(registration.pid, &registration.secret)
            .is_none());
        let (pid, secret) = (registration.pid, registration.secret.clone());
        drop(registration);
        assert!(clients.cancel_target(pid, &secret).is_none());
        assert!(clients.is_empty());
    }
}
