//! The server connections a session holds right now: the transaction's, those of an extended-protocol sync
//! group still waiting for its Sync, and in session mode every connection the client has used. The
//! transaction state machine (`txn.rs`) names destinations; this table owns the connections.

use crate::backend::pool::Pooled;

use super::txn::Dest;

pub struct Link {
    pub dest: Dest,
    pub conn: Pooled,
    /// Extended-protocol messages were sent since this connection's last Sync (a sync group is open there).
    pub pending: bool,
    /// An ErrorResponse came back in the current sync group.
    pub errored: bool,
    /// A standby's connection (`shard-read-replicas`): only reads outside transactions go there.
    pub replica: bool,
}

impl Link {
    pub fn new(dest: Dest, conn: Pooled) -> Link {
        Link { dest, conn, pending: false, errored: false, replica: false }
    }

    pub fn status(&self) -> u8 {
        self.conn.conn_status()
    }
}

#[derive(Default)]
pub struct Links {
    links: Vec<Link>,
}

impl Links {
    /// The primary's connection to `dest`, if the session holds one.
    pub fn find(&self, dest: &Dest) -> Option<usize> {
        self.links.iter().position(|l| l.dest == *dest && !l.replica)
    }

    pub fn push(&mut self, link: Link) -> usize {
        self.links.push(link);
        self.links.len() - 1
    }

    pub fn remove(&mut self, i: usize) -> Link {
        self.links.remove(i)
    }

    pub fn get(&mut self, i: usize) -> &mut Link {
        &mut self.links[i]
    }

    pub fn len(&self) -> usize {
        self.links.len()
    }

    pub fn is_empty(&self) -> bool {
        self.links.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Link> {
        self.links.iter()
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut Link> {
        self.links.iter_mut()
    }

    /// Takes out the links `keep` rejects (to be given back or closed by the caller).
    pub fn drain_unless(&mut self, mut keep: impl FnMut(&Link) -> bool) -> Vec<Link> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < self.links.len() {
            if keep(&self.links[i]) {
                i += 1;
            } else {
                out.push(self.links.remove(i));
            }
        }
        out
    }

    /// Gives back (or closes, see `Pooled::release`) the links `keep` rejects, without allocating.
    pub fn release_unless(&mut self, mut keep: impl FnMut(&Link) -> bool) {
        let mut i = 0;
        while i < self.links.len() {
            if keep(&self.links[i]) {
                i += 1;
            } else {
                self.links.remove(i).conn.release();
            }
        }
    }

    pub fn take_all(&mut self) -> Vec<Link> {
        std::mem::take(&mut self.links)
    }
}
