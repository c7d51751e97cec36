//! Session settings under transaction pooling. A client's `SET`s (and the parameters of its startup packet)
//! are remembered and replayed on whichever server connection it gets next; a connection records the hash of
//! what was replayed on it, so that a client whose settings match pays nothing. Statements whose effect
//! cannot follow a client from connection to connection are refused with the reason.

use std::hash::{Hash, Hasher};

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
    /// (lower-case name, statement that sets it), in the order set.
    list: Vec<(String, String)>,
    hash: u64,
}

fn quote_literal(v: &str) -> String {
    format!("'{}'", v.replace('\'', "''"))
}

fn quote_ident(v: &str) -> String {
    format!("\"{}\"", v.replace('"', "\"\""))
}

impl Settings {
    /// The settings of a startup packet (everything but user, database, options and replication).
    pub fn from_startup(params: &[(String, String)]) -> Settings {
        let mut s = Settings::default();
        for (k, v) in params {
            if matches!(k.as_str(), "user" | "database" | "options" | "replication") {
                continue;
            }
            s.apply(Change::Set(k.to_lowercase(), format!("SET {} TO {}", quote_ident(k), quote_literal(v))));
        }
        s
    }

    pub fn hash(&self) -> u64 {
        self.hash
    }

    pub fn values(&self) -> impl Iterator<Item = &(String, String)> {
        self.list.iter()
    }

    /// The SQL that brings a connection to these settings (`RESET ALL` first when it had others).
    pub fn replay_sql(&self, reset_first: bool) -> String {
        let mut parts: Vec<&str> = Vec::with_capacity(self.list.len() + 1);
        if reset_first {
            parts.push("RESET ALL");
        }
        parts.extend(self.list.iter().map(|(_, sql)| sql.as_str()));
        parts.join("; ")
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
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.list.hash(&mut h);
        self.hash = if self.list.is_empty() { 0 } else { h.finish() | 1 };
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
                    "local" => return Change::Nothing,
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
    }
}
