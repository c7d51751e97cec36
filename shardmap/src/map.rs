//! The shard map: the nodes and the strategy that places a key value on one of them. Built once from a
//! [`Config`]; placing a value is a pure function of the value.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicUsize, Ordering};
use std::sync::Arc;

use crate::config::{Algorithm, Config, NodeAddr, Strategy};
use crate::geo::{GeoDb, GeoResolver};
use crate::hash;
use crate::value::{KeyType, KeyValue};

/// A shard, by its index in [`ShardMap::nodes`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ShardId(pub u16);

/// A hash bucket under `shard-algorithm,hash-buckets`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BucketId(pub u32);

/// One shard's node.
#[derive(Clone, Debug)]
pub struct Node {
    pub name: String,
    /// Its address; `None` when the config names the shard but not where it is (enough for `explain`).
    pub addr: Option<NodeAddr>,
}

#[derive(Debug)]
enum Placement {
    Modulo {
        count: u32,
    },
    /// Each bucket's owner and whether a move holds it frozen: set from the catalog while statements are
    /// placed (atomics: a placement reads them without a lock).
    Buckets {
        owners: Box<[AtomicU16]>,
        frozen: Box<[AtomicBool]>,
        frozen_count: AtomicUsize,
    },
    /// `config`: shard-ranges as written; `pieces`: the same cut at the catalog's split points, each piece
    /// with its owner and whether a move holds it frozen (swapped whole when the catalog changes).
    Range {
        config: Vec<(i64, Option<i64>, ShardId)>,
        pieces: arc_swap::ArcSwap<Vec<Piece>>,
        frozen: AtomicBool,
    },
    Tenant,
    Geo {
        resolver: Box<GeoResolver>,
        regions: Vec<(Arc<str>, ShardId)>,
        default: Option<ShardId>,
    },
}

/// A piece of a range: `start..=end` (`None`: open), its owner, and whether a move holds it frozen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    pub start: i64,
    pub end: Option<i64>,
    pub shard: ShardId,
    pub frozen: bool,
}

/// Where one key value goes, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Located {
    pub shard: ShardId,
    pub bucket: Option<BucketId>,
    /// Geo: the region (`None` for the default shard).
    pub region: Option<Arc<str>>,
}

/// Errors placing a value.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlaceError {
    #[error("{key} = {value} is outside every range of shard-ranges")]
    OutOfRange { key: String, value: String },
    #[error("{key} = {value}: range sharding needs an integer key")]
    NotInteger { key: String, value: String },
    #[error("{key} = {value}: no region matches and there is no shard-default")]
    NoRegion { key: String, value: String },
}

/// The nodes and the strategy of a config.
#[derive(Debug)]
pub struct ShardMap {
    pub strategy: Strategy,
    pub algorithm: Algorithm,
    pub key: String,
    pub key_type: KeyType,
    pub tenant_prefix: String,
    pub nodes: Vec<Node>,
    pub global_tables: HashSet<String>,
    /// `shard-table-<table>,<column>`: tables whose key column is not `key`.
    pub table_keys: std::collections::HashMap<String, String>,
    /// `shard-two-phase-commit`: writes may span shards (committed with two-phase commit).
    pub two_phase: bool,
    placement: Placement,
    /// Tenants placed by the catalog (moved off the node their name hashes to), and whether a move holds
    /// them frozen; `tenants_placed` spares the lock while there are none.
    tenants: std::sync::RwLock<std::collections::HashMap<String, (ShardId, bool)>>,
    tenants_placed: AtomicBool,
    tenants_frozen: AtomicUsize,
}

impl ShardMap {
    /// The shard key column of `table` (lower case): its `shard-table-<table>` column, else `shard-key`.
    pub fn key_of(&self, table: &str) -> &str {
        self.table_keys.get(table).map_or(&self.key, |k| k.as_str())
    }

    /// Builds the map; opens the GeoIP database when one is configured.
    pub fn new(c: &Config) -> Result<ShardMap, String> {
        let addr_of = |name: &str| c.nodes.iter().find(|(n, _)| n == name).map(|(_, a)| a.clone());
        let mut nodes = Vec::new();
        let placement = match c.strategy {
            Strategy::Hash => {
                let count = c.shard_count.expect("validated: hash has shard-count");
                for i in 0..count {
                    let name = i.to_string();
                    nodes.push(Node { addr: addr_of(&name), name });
                }
                match c.algorithm {
                    Algorithm::Modulo => Placement::Modulo { count },
                    Algorithm::HashBuckets => Placement::Buckets {
                        owners: (0..c.buckets).map(|b| AtomicU16::new((b % count) as u16)).collect(),
                        frozen: (0..c.buckets).map(|_| AtomicBool::new(false)).collect(),
                        frozen_count: AtomicUsize::new(0),
                    },
                }
            }
            Strategy::Range => {
                let mut ranges = Vec::new();
                for r in &c.ranges {
                    let id = match nodes.iter().position(|n: &Node| n.name == r.node) {
                        Some(i) => i,
                        None => {
                            nodes.push(Node { name: r.node.clone(), addr: addr_of(&r.node) });
                            nodes.len() - 1
                        }
                    };
                    ranges.push((r.start, r.end, ShardId(id as u16)));
                }
                let pieces =
                    ranges.iter().map(|&(start, end, shard)| Piece { start, end, shard, frozen: false }).collect();
                Placement::Range {
                    config: ranges,
                    pieces: arc_swap::ArcSwap::from_pointee(pieces),
                    frozen: AtomicBool::new(false),
                }
            }
            Strategy::Tenant => {
                for (name, addr) in &c.nodes {
                    nodes.push(Node { name: name.clone(), addr: Some(addr.clone()) });
                }
                if nodes.is_empty() {
                    nodes.push(Node { name: "default".into(), addr: None });
                }
                Placement::Tenant
            }
            Strategy::Geo => {
                let mut regions = Vec::new();
                for (region, addr) in &c.geo_regions {
                    // shard-node-<region> gives full credentials for a region named by host alone.
                    let addr = addr_of(region).unwrap_or_else(|| addr.clone());
                    regions.push((Arc::<str>::from(region.as_str()), ShardId(nodes.len() as u16)));
                    nodes.push(Node { name: region.clone(), addr: Some(addr) });
                }
                let default = c.default.as_ref().map(|(_, addr)| {
                    // The default is a region's node when it names that region or has the same address.
                    let same = c
                        .geo_regions
                        .iter()
                        .position(|(r, a)| a == addr || (addr.hosts.len() == 1 && addr.hosts[0].0 == *r));
                    match same {
                        Some(i) => ShardId(i as u16),
                        None => {
                            nodes.push(Node {
                                name: "default".into(),
                                addr: Some(addr_of("default").unwrap_or_else(|| addr.clone())),
                            });
                            ShardId((nodes.len() - 1) as u16)
                        }
                    }
                });
                let db = c.geo_db.as_deref().map(GeoDb::open).transpose()?;
                let resolver = GeoResolver {
                    regions: c.geo_regions.iter().map(|(r, _)| r.clone()).collect(),
                    country: c.geo_country.clone(),
                    continent: c.geo_continent.clone(),
                    db,
                };
                Placement::Geo { resolver: Box::new(resolver), regions, default }
            }
        };
        if nodes.len() > u16::MAX as usize {
            return Err("too many shards".into());
        }
        Ok(ShardMap {
            strategy: c.strategy,
            algorithm: c.algorithm,
            key: c.shard_key.to_lowercase(),
            key_type: c.key_type,
            tenant_prefix: c.tenant_db_prefix.clone(),
            nodes,
            global_tables: c.global_tables.iter().cloned().collect(),
            table_keys: c.table_keys.iter().map(|(t, k)| (t.clone(), k.clone())).collect(),
            two_phase: c.two_phase_commit,
            placement,
            tenants: Default::default(),
            tenants_placed: AtomicBool::new(false),
            tenants_frozen: AtomicUsize::new(0),
        })
    }

    pub fn node(&self, id: ShardId) -> &Node {
        &self.nodes[id.0 as usize]
    }

    pub fn shard_by_name(&self, name: &str) -> Option<ShardId> {
        self.nodes.iter().position(|n| n.name == name).map(|i| ShardId(i as u16))
    }

    pub fn all(&self) -> impl Iterator<Item = ShardId> {
        (0..self.nodes.len()).map(|i| ShardId(i as u16))
    }

    /// The number of buckets under `hash-buckets`.
    pub fn bucket_count(&self) -> Option<u32> {
        match &self.placement {
            Placement::Buckets { owners, .. } => Some(owners.len() as u32),
            _ => None,
        }
    }

    /// The node that owns bucket `b` now.
    pub fn bucket_owner(&self, b: BucketId) -> Option<ShardId> {
        match &self.placement {
            Placement::Buckets { owners, .. } => owners.get(b.0 as usize).map(|o| ShardId(o.load(Ordering::Acquire))),
            _ => None,
        }
    }

    /// Places bucket `b` on `owner` and freezes or thaws it (the catalog's state, applied by the router).
    pub fn set_bucket(&self, b: BucketId, owner: ShardId, freeze: bool) {
        if let Placement::Buckets { owners, frozen, frozen_count } = &self.placement {
            if let (Some(o), Some(f)) = (owners.get(b.0 as usize), frozen.get(b.0 as usize)) {
                o.store(owner.0, Ordering::Release);
                match (f.swap(freeze, Ordering::AcqRel), freeze) {
                    (false, true) => drop(frozen_count.fetch_add(1, Ordering::AcqRel)),
                    (true, false) => drop(frozen_count.fetch_sub(1, Ordering::AcqRel)),
                    _ => {}
                }
            }
        }
    }

    /// Whether any of `buckets` is frozen by a move (statements for it wait). One atomic load when no
    /// bucket is frozen.
    pub fn any_frozen(&self, buckets: &[BucketId]) -> bool {
        match &self.placement {
            Placement::Buckets { frozen, frozen_count, .. } if frozen_count.load(Ordering::Acquire) > 0 => {
                buckets.iter().any(|b| frozen.get(b.0 as usize).is_some_and(|f| f.load(Ordering::Acquire)))
            }
            _ => false,
        }
    }

    /// Where a key value goes. For the tenant strategy the value is the tenant name.
    pub fn locate(&self, v: &KeyValue) -> Result<Located, PlaceError> {
        let here = |shard| Located { shard, bucket: None, region: None };
        match &self.placement {
            Placement::Modulo { count } => {
                let slot = match v {
                    KeyValue::Int(i) => i.rem_euclid(i64::from(*count)) as u32,
                    other => hash::reduce(hash::hash_key(other), *count),
                };
                Ok(here(ShardId(slot as u16)))
            }
            Placement::Buckets { owners, .. } => {
                let b = hash::reduce(hash::hash_key(v), owners.len() as u32);
                let shard = ShardId(owners[b as usize].load(Ordering::Acquire));
                Ok(Located { shard, bucket: Some(BucketId(b)), region: None })
            }
            Placement::Range { pieces, .. } => {
                let KeyValue::Int(i) = v else {
                    return Err(PlaceError::NotInteger { key: self.key.clone(), value: v.to_string() });
                };
                match piece_of(&pieces.load(), *i) {
                    Some(p) => Ok(here(p.shard)),
                    None => Err(PlaceError::OutOfRange { key: self.key.clone(), value: v.to_string() }),
                }
            }
            Placement::Tenant => Ok(here(self.tenant_shard(&v.to_string()))),
            Placement::Geo { resolver, regions, default } => {
                let p = resolver.resolve(&v.to_string());
                let found = p.region.as_deref().and_then(|r| regions.iter().find(|(name, _)| &**name == r));
                match (found, default) {
                    (Some((name, shard)), _) => Ok(Located { shard: *shard, bucket: None, region: Some(name.clone()) }),
                    (None, Some(d)) => Ok(here(*d)),
                    (None, None) => Err(PlaceError::NoRegion { key: self.key.clone(), value: v.to_string() }),
                }
            }
        }
    }

    /// The node that holds a tenant's database: the hash of its name over the nodes, in config order.
    pub fn tenant_shard(&self, tenant: &str) -> ShardId {
        if self.tenants_placed.load(Ordering::Acquire) {
            if let Some((shard, _)) = self.tenants.read().expect("tenants lock").get(tenant) {
                return *shard;
            }
        }
        let slot = hash::reduce(hash::hash_key(&KeyValue::Text(tenant.into())), self.nodes.len() as u32);
        ShardId(slot as u16)
    }

    /// Places a tenant on `owner` and freezes or thaws it (the catalog's state, applied by the router).
    pub fn set_tenant(&self, tenant: &str, owner: ShardId, freeze: bool) {
        let mut t = self.tenants.write().expect("tenants lock");
        let was = t.insert(tenant.to_string(), (owner, freeze)).is_some_and(|(_, f)| f);
        match (was, freeze) {
            (false, true) => drop(self.tenants_frozen.fetch_add(1, Ordering::AcqRel)),
            (true, false) => drop(self.tenants_frozen.fetch_sub(1, Ordering::AcqRel)),
            _ => {}
        }
        self.tenants_placed.store(true, Ordering::Release);
    }

    /// The range pieces now (config ranges cut at the catalog's split points).
    pub fn range_pieces(&self) -> Vec<Piece> {
        match &self.placement {
            Placement::Range { pieces, .. } => pieces.load().to_vec(),
            _ => Vec::new(),
        }
    }

    /// Applies the catalog's range units: each `(range's node, split point, owner, frozen)` cuts the config
    /// range named by its node at the split point; the piece from there (up to the next cut) goes to the
    /// owner. Returns the units that name no config range.
    pub fn set_range_pieces(&self, units: &[(String, i64, ShardId, bool)]) -> Vec<String> {
        let Placement::Range { config, pieces, frozen } = &self.placement else { return Vec::new() };
        let inside = |name: &str, from: i64| {
            config.iter().any(|&(start, end, shard)| {
                self.node(shard).name == name && from > start && end.is_none_or(|e| from <= e)
            })
        };
        let mut out = Vec::new();
        for &(start, end, shard) in config {
            let name = &self.node(shard).name;
            let mut cuts: Vec<(i64, ShardId, bool)> = units
                .iter()
                .filter(|(n, from, _, _)| n == name && *from > start && end.is_none_or(|e| *from <= e))
                .map(|(_, from, owner, f)| (*from, *owner, *f))
                .collect();
            cuts.sort();
            cuts.dedup_by_key(|c| c.0);
            let mut at = (start, shard, false);
            for (from, owner, f) in cuts {
                out.push(Piece { start: at.0, end: Some(from - 1), shard: at.1, frozen: at.2 });
                at = (from, owner, f);
            }
            out.push(Piece { start: at.0, end, shard: at.1, frozen: at.2 });
        }
        frozen.store(out.iter().any(|p| p.frozen), Ordering::Release);
        pieces.store(Arc::new(out));
        units
            .iter()
            .filter(|(n, from, _, _)| !inside(n, *from))
            .map(|(n, from, _, _)| format!("range:{n}@{from}"))
            .collect()
    }

    /// Whether a move holds any unit frozen (for statements whose units are known only row by row: COPY).
    pub fn anything_frozen(&self) -> bool {
        let placed = match &self.placement {
            Placement::Buckets { frozen_count, .. } => frozen_count.load(Ordering::Acquire) > 0,
            Placement::Range { frozen, .. } => frozen.load(Ordering::Acquire),
            _ => false,
        };
        placed || self.tenants_frozen.load(Ordering::Acquire) > 0
    }

    /// Whether a move holds the unit of this decision frozen (its buckets, or its tenant): its statements
    /// wait. One atomic load per kind when nothing is frozen.
    pub fn holds(&self, d: &crate::Decision) -> bool {
        if self.any_frozen(&d.buckets) {
            return true;
        }
        if let Placement::Range { pieces, frozen, .. } = &self.placement {
            if frozen.load(Ordering::Acquire) {
                let pieces = pieces.load();
                return d.values.iter().any(|v| match v {
                    KeyValue::Int(i) => piece_of(&pieces, *i).is_some_and(|p| p.frozen),
                    _ => false,
                });
            }
            return false;
        }
        if self.tenants_frozen.load(Ordering::Acquire) == 0 {
            return false;
        }
        let Some(tenant) = d.database.as_deref().and_then(|db| self.tenant_of_database(db)) else { return false };
        self.tenants.read().expect("tenants lock").get(tenant).is_some_and(|(_, frozen)| *frozen)
    }

    /// The tenant named by a database name (`gb_tenant_acme` → `acme`).
    pub fn tenant_of_database<'d>(&self, database: &'d str) -> Option<&'d str> {
        database.strip_prefix(self.tenant_prefix.as_str()).filter(|t| !t.is_empty())
    }
}

/// The piece that holds `i`.
fn piece_of(pieces: &[Piece], i: i64) -> Option<Piece> {
    let idx = pieces.partition_point(|p| p.start <= i);
    idx.checked_sub(1).map(|k| pieces[k]).filter(|p| p.end.is_none_or(|e| i <= e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(text: &str) -> ShardMap {
        ShardMap::new(&Config::parse("config.csv", text.as_bytes()).unwrap()).unwrap()
    }

    #[test]
    fn catalog_split_points_cut_ranges_and_freeze_pieces() {
        let m = Arc::new(map("shard-strategy,range\nshard-key,id\nshard-ranges,0-999:a,1000-:b\n"));
        let (a, b) = (m.shard_by_name("a").unwrap(), m.shard_by_name("b").unwrap());
        let at = |k: i64| m.locate(&KeyValue::Int(k)).unwrap().shard;
        assert_eq!((at(999), at(1000), at(5000)), (a, b, b));
        // b's range from 1500 up moves to a, frozen first.
        let unknown =
            m.set_range_pieces(&[("b".into(), 1500, b, true), ("a".into(), 5, a, false), ("x".into(), 1, a, false)]);
        assert_eq!(unknown, vec!["range:x@1".to_string()]);
        let planner = crate::Planner::new(m.clone());
        let d = |k: i64| {
            let sql = format!("SELECT * FROM t WHERE id = {k}");
            planner.decide(&sql, &crate::NoParams, &crate::Session::default()).unwrap()
        };
        assert!(m.holds(&d(1500)) && m.holds(&d(99_999)) && !m.holds(&d(1499)) && !m.holds(&d(3)));
        m.set_range_pieces(&[("b".into(), 1500, a, false)]);
        assert_eq!((at(1499), at(1500), at(1_000_000)), (b, a, a));
        assert!(!m.holds(&d(1500)));
        let pieces = m.range_pieces();
        assert_eq!(pieces.len(), 3);
        assert_eq!((pieces[1].start, pieces[1].end, pieces[2].start, pieces[2].end), (1000, Some(1499), 1500, None));
    }
}
