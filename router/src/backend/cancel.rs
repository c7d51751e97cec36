//! CancelRequest: a client quotes the key the router gave it at startup; the router finds the server
//! connections that client is using right now and sends each server a CancelRequest for its own backend.
//! A connection is registered while checked out (and while its client keeps it between transactions: a
//! cancel that reaches an idle server is ignored) and unregistered before it goes back to the pool or to
//! another client, or is closed, so a cancel the router sends after that cannot reach another client's query.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::{BufMut, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// How to cancel the query running on one server connection.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct CancelKey {
    pub host: String,
    pub port: u16,
    pub pid: i32,
    pub secret: i32,
}

/// The server connections a client holds now.
#[derive(Default)]
pub struct Slot {
    keys: Mutex<Vec<Arc<CancelKey>>>,
}

impl Slot {
    pub fn add(&self, k: Arc<CancelKey>) {
        self.keys.lock().expect("slot lock").push(k);
    }

    pub fn remove(&self, k: &Arc<CancelKey>) {
        let mut keys = self.keys.lock().expect("slot lock");
        if let Some(i) = keys.iter().position(|x| Arc::ptr_eq(x, k)) {
            keys.swap_remove(i);
        }
    }

    fn snapshot(&self) -> Vec<Arc<CancelKey>> {
        self.keys.lock().expect("slot lock").clone()
    }
}

/// Clients by the (pid, secret) the router gave them.
#[derive(Default)]
pub struct Registry {
    clients: Mutex<HashMap<(i32, i32), Arc<Slot>>>,
}

impl Registry {
    /// A new client key and its slot; the key is unregistered by [`Registry::remove`].
    pub fn register(&self) -> ((i32, i32), Arc<Slot>) {
        let mut clients = self.clients.lock().expect("registry lock");
        loop {
            let key = (rand::random::<i32>() & 0x7fff_ffff, rand::random::<i32>());
            if let std::collections::hash_map::Entry::Vacant(e) = clients.entry(key) {
                let slot = Arc::new(Slot::default());
                e.insert(slot.clone());
                return (key, slot);
            }
        }
    }

    pub fn remove(&self, key: (i32, i32)) {
        self.clients.lock().expect("registry lock").remove(&key);
    }

    /// Sends a CancelRequest to every server connection the client with `key` holds. Unknown keys are
    /// ignored, as PostgreSQL does.
    pub async fn cancel(&self, key: (i32, i32)) {
        let slot = self.clients.lock().expect("registry lock").get(&key).cloned();
        let Some(slot) = slot else { return };
        for k in slot.snapshot() {
            if let Ok(mut sock) = TcpStream::connect((k.host.as_str(), k.port)).await {
                let mut b = BytesMut::with_capacity(16);
                b.put_i32(16);
                b.put_i32(80877102);
                b.put_i32(k.pid);
                b.put_i32(k.secret);
                let _ = sock.write_all(&b).await;
            }
        }
    }
}
