//! Session settings under transaction pooling. A client's `SET`s (and the parameters of its startup packet)
//! are remembered and replayed on whichever server connection it gets next; a connection records the hash of
//! what was replayed on it, so that a client whose settings match pays nothing. Statements whose effect
//! cannot follow a client from connection to connection are refused with the reason.

use std::hash::{Hash, Hasher};

use shardmap::sql::{quote_ident, quote_literal};

/// What a session statement does to the remembered settings (and, for DEALLOCATE and DISCARD, to the
/// client's prepared statements, which live in the router).
pub enum Change {
    Set(String, String),
    Reset(String),
    ResetAll,
    /// No lasting effect (SHOW, SET LOCAL outside a transaction).
    Nothing,
    /// `DEALLOCATE name` / `DEALLOCATE ALL` (`None`): the client's prepared statements, answered by the router.
    Deallocate(Option<String>),
    /// `DISCARD ALL`: the client's settings and prepared statements, answered by the router.
    DiscardAll,
    Refused(String),
}

#[derive(Default, Clone)]
pub struct Settings {
    /// The startup packet's parameters, (lower-case name, statement that sets it): the session defaults that
    /// RESET and RESET ALL go back to.
    startup: Vec<(String, String)>,
    /// (lower-case name, statement that sets it), in the order set since.
    list: Vec<(String, String)>,
    hash: u64,
}

/// A value read back from a server (`current_setting`), as a statement that sets it again.
pub fn set_config(name: &str, value: &str) -> String {
    format!("SELECT pg_catalog.set_config({}, {}, false)", quote_literal(name), quote_literal(value))
}

impl Settings {
    /// The settings of a startup packet (everything but user, database, options and replication).
    pub fn from_startup(params: &[(String, String)]) -> Settings {
        let mut s = Settings::default();
        for (k, v) in params {
            if matches!(k.as_str(), "user" | "database" | "options" | "replication") {
                continue;
            }
            s.startup.push((k.to_lowercase(), format!("SET {} TO {}", quote_ident(k), quote_literal(v))));
        }
        s.rehash();
        s
    }

    pub fn hash(&self) -> u64 {
        self.hash
    }

    /// The settings in force, startup parameters first.
    pub fn values(&self) -> impl Iterator<Item = &(String, String)> {
        self.startup.iter().filter(|(n, _)| !self.list.iter().any(|(m, _)| m == n)).chain(self.list.iter())
    }

    /// The statement that set parameter `name` (lower case), if the client set it.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.values().filter(|(n, _)| n == name).map(|(_, sql)| sql.as_str()).last()
    }

    /// The SQL that brings a connection to these settings (`RESET ALL` first when it had others).
    pub fn replay_sql(&self, reset_first: bool) -> String {
        let mut parts: Vec<&str> = Vec::with_capacity(self.startup.len() + self.list.len() + 1);
        if reset_first {
            parts.push("RESET ALL");
        }
        parts.extend(self.values().map(|(_, sql)| sql.as_str()));
        parts.join("; ")
    }

    fn rehash(&mut self) {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.startup.hash(&mut h);
        self.list.hash(&mut h);
        self.hash = if self.startup.is_empty() && self.list.is_empty() { 0 } else { h.finish() | 1 };
    }

    pub fn apply(&mut self, change: Change) {
        match change {
            Change::Set(name, sql) => {
                self.list.retain(|(n, _)| *n != name);
                self.list.push((name, sql));
            }
            Change::Reset(name) => self.list.retain(|(n, _)| *n != name),
            Change::ResetAll => self.list.clear(),
            Change::DiscardAll => self.list.clear(),
            Change::Nothing | Change::Refused(_) | Change::Deallocate(_) => return,
        }
        self.rehash();
    }

    /// What a session statement (outside a transaction) would do.
    pub fn classify(&self, text: &str) -> Change {
        self.classify_in(text, false)
    }

    /// Like [`Settings::classify`]; in session mode (`session`) statements tied to a connection are fine.
    pub fn classify_in(&self, text: &str, session: bool) -> Change {
        let words: Vec<String> = text
            .split(|c: char| c.is_whitespace() || c == '=' || c == ';')
            .filter(|w| !w.is_empty())
            .take(4)
            .map(|w| w.to_lowercase())
            .collect();
        let w = |i: usize| words.get(i).map(String::as_str).unwrap_or("");
        if session && matches!(w(0), "prepare" | "execute" | "listen" | "unlisten")
            || session && w(0) == "set" && matches!(w(1), "role") | (w(1) == "session" && w(2) == "authorization")
        {
            // Session pooling: the connection is the client's own, whatever it keeps.
            return Change::Nothing;
        }
        match w(0) {
            "set" => {
                let mut i = 1;
                match w(1) {
                    "local" | "transaction" => return Change::Nothing,
                    "session" if matches!(w(2), "authorization") => {
                        return Change::Refused("SET SESSION AUTHORIZATION cannot follow a client across pooled connections; use pool-mode,session".into())
                    }
                    "session" => i = 2,
                    "role" => return Change::Refused("SET ROLE cannot follow a client across pooled connections; use pool-mode,session".into()),
                    _ => {}
                }
                let name = match (w(i), w(i + 1)) {
                    ("time", "zone") => "timezone".to_string(),
                    ("names", _) => "client_encoding".to_string(),
                    (n, _) => n.trim_matches('"').to_string(),
                };
                Change::Set(name, text.trim().trim_end_matches(';').to_string())
            }
            "reset" if w(1) == "all" => Change::ResetAll,
            "reset" => Change::Reset(w(1).trim_matches('"').to_string()),
            "discard" if w(1) == "all" => Change::DiscardAll,
            "discard" => Change::Nothing,
            "deallocate" => {
                let name = if w(1) == "prepare" { w(2) } else { w(1) };
                Change::Deallocate((name != "all").then(|| name.trim_matches('"').to_string()))
            }
            "listen" | "unlisten" if session => Change::Nothing,
            "listen" | "unlisten" => Change::Refused("LISTEN needs a connection of its own: use pool-mode,session".into()),
            "prepare" | "execute" => {
                Change::Refused("SQL-level PREPARE/EXECUTE/DEALLOCATE cannot follow a client across pooled connections; use the protocol's prepared statements (every driver does)".into())
            }
            _ => Change::Nothing,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_reset_and_hash() {
        let mut s = Settings::default();
        assert_eq!(s.hash(), 0);
        let c = s.classify("SET statement_timeout = 5000");
        s.apply(c);
        assert_ne!(s.hash(), 0);
        assert_eq!(s.replay_sql(true), "RESET ALL; SET statement_timeout = 5000");
        let c = s.classify("set time zone 'UTC'");
        s.apply(c);
        assert_eq!(s.values().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), vec!["statement_timeout", "timezone"]);
        let c = s.classify("RESET statement_timeout");
        s.apply(c);
        assert_eq!(s.values().count(), 1);
        let c = s.classify("RESET ALL");
        s.apply(c);
        assert_eq!(s.hash(), 0);
        assert!(matches!(s.classify("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE"), Change::Nothing));
        assert!(matches!(s.classify("LISTEN x"), Change::Refused(_)));
        assert!(matches!(s.classify("SHOW x"), Change::Nothing));
    }

    #[test]
    fn startup_parameters_become_settings() {
        let s = Settings::from_startup(&[
            ("user".into(), "u".into()),
            ("application_name".into(), "it's".into()),
            ("database".into(), "d".into()),
        ]);
        assert_eq!(s.replay_sql(false), "SET \"application_name\" TO 'it''s'");
        // RESET ALL goes back to the startup packet's values, as on a server.
        let mut s = s;
        s.apply(Change::Set("application_name".into(), "SET application_name = 'x'".into()));
        assert_eq!(s.replay_sql(false), "SET application_name = 'x'");
        s.apply(Change::ResetAll);
        assert_eq!(s.replay_sql(false), "SET \"application_name\" TO 'it''s'");
    }
}
