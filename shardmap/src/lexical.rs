//! Statements sqlparser cannot parse, read by their words. PostgreSQL accepts much that sqlparser does not
//! know (`COPY ... WITH (FREEZE ON)`, `MOVE`, `VACUUM (...)`, new syntax), and such a statement must still
//! reach the server, which gives the real answer (or the real syntax error). So a statement the parser
//! refused is classified by its first word, and its table names are read from the words after FROM, JOIN,
//! INTO, UPDATE, TABLE, TRUNCATE and COPY: a statement that names no sharded table goes to any shard (or to
//! every shard for DDL and writes to global tables); one that names a sharded table is refused, because its
//! key cannot be read — unless the destination is already known (see the planner and the router).

use std::collections::HashSet;

use crate::sql::{CopyFormat, CopyIn, Kind, Setting, StatementAnalysis, Tables, TxnVerb};

/// One token of a statement's text.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Tok {
    /// A keyword or unquoted identifier, folded to lower case.
    Word(String),
    /// A double-quoted identifier, as written.
    Quoted(String),
    /// A string constant's value.
    Str(String),
    Num,
    Sym(char),
}

/// Splits SQL text into tokens: comments (nested `/* */` as PostgreSQL allows), string constants (`''`,
/// `E''` with backslash escapes, `$tag$...$tag$`) and quoted identifiers are read whole.
fn tokens(sql: &str) -> Vec<Tok> {
    let b = sql.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c.is_ascii_whitespace() {
            i += 1;
        } else if c == b'-' && b.get(i + 1) == Some(&b'-') {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if c == b'/' && b.get(i + 1) == Some(&b'*') {
            let mut depth = 0;
            while i < b.len() {
                if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                    depth += 1;
                    i += 2;
                } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if c == b'\'' || ((c == b'e' || c == b'E') && b.get(i + 1) == Some(&b'\'')) {
            let escapes = c != b'\'';
            i += if escapes { 2 } else { 1 };
            let mut v = Vec::new();
            while i < b.len() {
                if escapes && b[i] == b'\\' && i + 1 < b.len() {
                    v.push(b[i + 1]);
                    i += 2;
                } else if b[i] == b'\'' && b.get(i + 1) == Some(&b'\'') {
                    v.push(b'\'');
                    i += 2;
                } else if b[i] == b'\'' {
                    i += 1;
                    break;
                } else {
                    v.push(b[i]);
                    i += 1;
                }
            }
            out.push(Tok::Str(String::from_utf8_lossy(&v).into_owned()));
        } else if c == b'"' {
            i += 1;
            let mut v = Vec::new();
            while i < b.len() {
                if b[i] == b'"' && b.get(i + 1) == Some(&b'"') {
                    v.push(b'"');
                    i += 2;
                } else if b[i] == b'"' {
                    i += 1;
                    break;
                } else {
                    v.push(b[i]);
                    i += 1;
                }
            }
            out.push(Tok::Quoted(String::from_utf8_lossy(&v).into_owned()));
        } else if c == b'$' && dollar_tag(&b[i..]).is_some() {
            let tag = dollar_tag(&b[i..]).expect("checked");
            let body = i + tag.len();
            let end = find(&b[body..], tag).map_or(b.len(), |e| body + e);
            out.push(Tok::Str(String::from_utf8_lossy(&b[body..end]).into_owned()));
            i = (end + tag.len()).min(b.len());
        } else if c.is_ascii_alphabetic() || c == b'_' || c >= 0x80 {
            let start = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b'$' || b[i] >= 0x80) {
                i += 1;
            }
            out.push(Tok::Word(String::from_utf8_lossy(&b[start..i]).to_lowercase()));
        } else if c.is_ascii_digit() {
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'.') {
                i += 1;
            }
            out.push(Tok::Num);
        } else {
            out.push(Tok::Sym(c as char));
            i += 1;
        }
    }
    out
}

/// `$tag$` at the start of `b` (the tag may be empty: `$$`).
fn dollar_tag(b: &[u8]) -> Option<&[u8]> {
    let end = b[1..].iter().position(|&c| c == b'$')? + 2;
    let inner = &b[1..end - 1];
    (inner.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_') && !inner.first().is_some_and(u8::is_ascii_digit))
        .then_some(&b[..end])
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Words that follow FROM, UPDATE... without being a table name.
const NOT_A_TABLE: &[&str] = &[
    "select",
    "set",
    "where",
    "values",
    "lateral",
    "only",
    "table",
    "unnest",
    "generate_series",
    "stdin",
    "stdout",
    "program",
    "default",
    "with",
    "as",
    "on",
    "using",
    "group",
    "order",
    "limit",
    "offset",
    "join",
    "natural",
];

/// A statement's table names, lower-cased unless quoted, with their schema when written; CTE names are left
/// out.
fn table_names(toks: &[Tok]) -> Vec<(Option<String>, String)> {
    let ident = |t: &Tok| match t {
        Tok::Word(w) => Some(w.clone()),
        Tok::Quoted(q) => Some(q.clone()),
        _ => None,
    };
    let word = |t: Option<&Tok>, w: &str| matches!(t, Some(Tok::Word(x)) if x == w);
    // CTE names: `WITH [RECURSIVE] name [(cols)] AS (` and `, name AS (`.
    let mut ctes = HashSet::new();
    for (i, t) in toks.iter().enumerate() {
        if word(Some(t), "as") && matches!(toks.get(i + 1), Some(Tok::Sym('('))) {
            let mut j = i;
            if j > 0 && matches!(toks.get(j - 1), Some(Tok::Sym(')'))) {
                // A column list between the name and AS.
                while j > 0 && !matches!(toks[j - 1], Tok::Sym('(')) {
                    j -= 1;
                }
                j = j.saturating_sub(1);
            }
            if j > 0 {
                let prev = toks.get(j.wrapping_sub(2));
                if word(prev, "with") || word(prev, "recursive") || matches!(prev, Some(Tok::Sym(','))) {
                    if let Some(name) = ident(&toks[j - 1]) {
                        ctes.insert(name);
                    }
                }
            }
        }
    }
    let mut names = Vec::new();
    let mut i = 0;
    while i < toks.len() {
        let (starts, calls) = match &toks[i] {
            Tok::Word(w) => (
                matches!(w.as_str(), "from" | "join" | "into" | "update" | "table" | "truncate")
                    || (i == 0 && w == "copy"),
                matches!(w.as_str(), "from" | "join"),
            ),
            _ => (false, false),
        };
        i += 1;
        if !starts {
            continue;
        }
        loop {
            while word(toks.get(i), "only") || word(toks.get(i), "table") {
                i += 1;
            }
            let Some(first) = toks.get(i).and_then(ident) else { break };
            if matches!(toks.get(i), Some(Tok::Word(w)) if NOT_A_TABLE.contains(&w.as_str())) {
                break;
            }
            let mut parts = vec![first];
            i += 1;
            while matches!(toks.get(i), Some(Tok::Sym('.'))) {
                match toks.get(i + 1).and_then(ident) {
                    Some(p) => parts.push(p),
                    None => break,
                }
                i += 2;
            }
            if calls && matches!(toks.get(i), Some(Tok::Sym('('))) && parts.len() == 1 {
                // A function call (`FROM generate_series(...)`), not a table.
                break;
            }
            let name = parts.pop().expect("one part");
            let schema = parts.pop();
            if !(schema.is_none() && ctes.contains(&name)) {
                names.push((schema, name));
            }
            // `FROM a, b` and `TRUNCATE a, b`: more names after a comma (past an alias).
            while matches!(toks.get(i), Some(Tok::Word(w)) if !is_clause(w))
                || matches!(toks.get(i), Some(Tok::Quoted(_)))
            {
                i += 1;
            }
            if matches!(toks.get(i), Some(Tok::Sym(','))) {
                i += 1;
                continue;
            }
            break;
        }
    }
    names
}

/// Words that end a FROM list's item.
fn is_clause(w: &str) -> bool {
    matches!(
        w,
        "where"
            | "join"
            | "inner"
            | "left"
            | "right"
            | "full"
            | "cross"
            | "natural"
            | "on"
            | "using"
            | "group"
            | "order"
            | "limit"
            | "offset"
            | "having"
            | "window"
            | "union"
            | "intersect"
            | "except"
            | "returning"
            | "set"
            | "values"
            | "select"
            | "for"
            | "from"
            | "to"
            | "with"
            | "restart"
            | "continue"
            | "cascade"
            | "restrict"
    )
}

/// The class of the tables a statement names: the first sharded one wins.
fn classify(names: &[(Option<String>, String)], global: &HashSet<String>) -> Tables {
    let mut t = Tables::None;
    for (schema, name) in names {
        let catalog = name.starts_with("pg_")
            || schema.as_deref().is_some_and(|s| s == "pg_catalog" || s == "information_schema");
        if catalog {
            continue;
        }
        if global.contains(name) {
            t = Tables::Global;
        } else {
            return Tables::Sharded(name.clone());
        }
    }
    t
}

fn first_words(toks: &[Tok]) -> (String, String) {
    let w = |i: usize| match toks.get(i) {
        Some(Tok::Word(w)) => w.clone(),
        _ => String::new(),
    };
    (w(0), w(1))
}

/// The string constant after a transaction-control word (`PREPARE TRANSACTION 'gid'`).
fn gid(toks: &[Tok]) -> String {
    toks.iter()
        .find_map(|t| match t {
            Tok::Str(s) => Some(s.clone()),
            _ => None,
        })
        .unwrap_or_default()
}

/// Analyses a statement the parser refused (`error`), for shard key `key` and the global tables.
pub fn analyze(sql: &str, error: &str, key: &str, global: &HashSet<String>) -> StatementAnalysis {
    let toks = tokens(sql);
    let (w0, w1) = first_words(&toks);
    let word = w0.to_ascii_uppercase();
    let mut st = StatementAnalysis::new(Kind::Write, format!("unparsed {word}"));
    let verb = match (w0.as_str(), w1.as_str()) {
        ("begin" | "start", _) => Some(TxnVerb::Begin),
        ("commit" | "rollback", "prepared") if w0 == "commit" => Some(TxnVerb::CommitPrepared(gid(&toks))),
        ("rollback", "prepared") => Some(TxnVerb::RollbackPrepared(gid(&toks))),
        ("commit" | "end", _) => Some(TxnVerb::Commit),
        ("rollback" | "abort", _) if toks.iter().any(|t| *t == Tok::Word("to".into())) => Some(TxnVerb::RollbackTo),
        ("rollback" | "abort", _) => Some(TxnVerb::Rollback),
        ("savepoint", _) => Some(TxnVerb::Savepoint),
        ("release", _) => Some(TxnVerb::Release),
        ("prepare", "transaction") => Some(TxnVerb::Prepare(gid(&toks))),
        _ => None,
    };
    if let Some(v) = verb {
        if matches!(v, TxnVerb::Savepoint | TxnVerb::Release | TxnVerb::RollbackTo) {
            // The name is the last word: SAVEPOINT a, RELEASE [SAVEPOINT] a, ROLLBACK [WORK] TO [SAVEPOINT] a.
            st.savepoint = toks.iter().rev().find_map(|t| match t {
                Tok::Word(w) | Tok::Quoted(w) => Some(w.clone()),
                _ => None,
            });
        }
        st.kind = Kind::Transaction;
        st.txn = Some(v);
        return st;
    }
    let names = table_names(&toks);
    match w0.as_str() {
        "set" | "reset" | "show" | "discard" | "listen" | "unlisten" | "notify" | "deallocate" | "prepare"
        | "execute" | "load" => {
            st.kind = Kind::Session;
            let words: Vec<&str> = toks
                .iter()
                .filter_map(|t| match t {
                    Tok::Word(w) | Tok::Quoted(w) => Some(w.as_str()),
                    _ => None,
                })
                .collect();
            st.setting = match words.as_slice() {
                ["reset", "all", ..] => Some(Setting::ResetAll),
                ["reset", name, ..] => Some(Setting::Reset(name.to_string())),
                ["set", "local" | "transaction", ..] => None,
                ["set", "session", name, ..] | ["set", name, ..] => Some(Setting::Set(vec![name.to_string()])),
                _ => None,
            };
            return st;
        }
        "fetch" | "move" | "close" => {
            st.kind = Kind::Cursor;
            return st;
        }
        "create" | "alter" | "drop" | "comment" | "grant" | "revoke" | "do" | "vacuum" | "analyze" | "analyse"
        | "reindex" | "cluster" | "refresh" | "security" | "truncate" | "checkpoint" | "import" | "reassign"
        | "lock" => {
            st.kind = Kind::Ddl;
            st.reason = format!("unparsed {word}: every shard").into();
            return st;
        }
        "copy" => return copy(&toks, &names, &st.reason, key, global),
        _ => {}
    }
    st.kind = match w0.as_str() {
        "select" | "with" | "table" | "values" | "explain" | "declare" => Kind::Read,
        _ => Kind::Write,
    };
    if w0 == "declare" {
        st.declare =
            Some(crate::sql::Declare { hold: toks.windows(2).any(|w| w == [word_tok("with"), word_tok("hold")]) });
    }
    st.tables = classify(&names, global);
    // `TABLE name` is `SELECT * FROM name`: every shard's rows are the answer.
    let plain_table = w0 == "table"
        && names.len() == 1
        && toks.iter().skip(1).all(|t| matches!(t, Tok::Word(_) | Tok::Quoted(_) | Tok::Sym('.') | Tok::Sym(';')));
    if let (Tables::Sharded(t), false) = (&st.tables, plain_table) {
        st.refusal = Some(format!(
            "cannot parse the statement ({error}), which names the sharded table {t}, so its shard key cannot be read; add a /* shard: name */ or /* shard_key: value */ hint"
        ));
    }
    st
}

fn word_tok(w: &str) -> Tok {
    Tok::Word(w.into())
}

/// `COPY name [(columns)] FROM STDIN [[WITH] (options) | legacy options]`, `COPY ... TO STDOUT`.
fn copy(
    toks: &[Tok],
    names: &[(Option<String>, String)],
    reason: &std::sync::Arc<str>,
    key: &str,
    global: &HashSet<String>,
) -> StatementAnalysis {
    let mut st = StatementAnalysis::new(Kind::Write, reason.clone());
    let dir = toks.iter().position(|t| matches!(t, Tok::Word(w) if w == "from" || w == "to"));
    let to = dir.is_some_and(|i| toks[i] == word_tok("to"));
    if matches!(toks.get(1), Some(Tok::Sym('('))) {
        // COPY (query) TO STDOUT: a read of what the query names.
        st.kind = Kind::Read;
        st.tables = classify(names, global);
        if let Tables::Sharded(t) = &st.tables {
            st.refusal = Some(format!("cannot parse COPY (query) TO, which names the sharded table {t}"));
        }
        return st;
    }
    let Some((_, table)) = names.first().cloned() else {
        st.refusal = Some("cannot read the table name of this COPY".into());
        return st;
    };
    let is_global = global.contains(&table);
    st.tables = if is_global { Tables::Global } else { Tables::Sharded(table.clone()) };
    if to {
        st.kind = Kind::Read;
        st.reason = format!("COPY {table} TO: {}", if is_global { "one shard" } else { "every shard" }).into();
        return st;
    }
    let Some(dir) = dir else {
        st.refusal = Some("cannot read this COPY statement".into());
        return st;
    };
    // The column list between the table name and FROM.
    let mut columns = Vec::new();
    if let Some(open) = toks[..dir].iter().position(|t| *t == Tok::Sym('(')) {
        for t in &toks[open + 1..dir] {
            match t {
                Tok::Word(w) => columns.push(w.clone()),
                Tok::Quoted(q) => columns.push(q.clone()),
                _ => {}
            }
        }
    }
    if !matches!(toks.get(dir + 1), Some(Tok::Word(w)) if w == "stdin") {
        st.refusal =
            Some("COPY FROM a server file or program is not supported through the router; use FROM STDIN".into());
        return st;
    }
    let mut copy = CopyIn {
        table: table.clone(),
        key_column: columns.iter().position(|c| c == key),
        columns_given: !columns.is_empty(),
        format: CopyFormat::Text,
        delimiter: b'\t',
        header: false,
    };
    let mut delimiter = None;
    let mut odd = None;
    // Options: `(name [value], ...)` or the old unparenthesized form; both read as word/value pairs.
    let opts = &toks[dir + 2..];
    let mut i = 0;
    let value = |j: usize| -> Option<String> {
        match opts.get(j) {
            Some(Tok::Str(s)) => Some(s.clone()),
            Some(Tok::Word(w)) => Some(w.clone()),
            _ => None,
        }
    };
    while i < opts.len() {
        let Tok::Word(w) = &opts[i] else {
            i += 1;
            continue;
        };
        let mut next = i + 1;
        if matches!(opts.get(next), Some(Tok::Word(a)) if a == "as") {
            next += 1;
        }
        match w.as_str() {
            "format" => {
                copy.format = match value(next).as_deref() {
                    Some("csv") => CopyFormat::Csv,
                    Some("binary") => CopyFormat::Binary,
                    _ => CopyFormat::Text,
                };
                i = next + 1;
                continue;
            }
            "csv" => copy.format = CopyFormat::Csv,
            "binary" => copy.format = CopyFormat::Binary,
            "delimiter" => {
                delimiter = value(next).and_then(|v| v.bytes().next());
                i = next + 1;
                continue;
            }
            "header" => {
                copy.header = !matches!(value(next).as_deref(), Some("false" | "off" | "0"));
                if matches!(value(next).as_deref(), Some("true" | "on" | "1" | "false" | "off" | "0" | "match")) {
                    i = next + 1;
                    continue;
                }
            }
            "quote" | "escape" => {
                if value(next).as_deref() != Some("\"") {
                    odd = Some(w.clone());
                }
                i = next + 1;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    copy.delimiter = delimiter.unwrap_or(if copy.format == CopyFormat::Csv { b',' } else { b'\t' });
    st.kind = Kind::CopyIn;
    crate::sql::describe_copy(&mut st, &copy, key, is_global);
    if let (Some(o), None) = (odd, &st.refusal) {
        if !is_global {
            st.refusal = Some(format!("COPY {table} with a {o} other than '\"' cannot be split by key"));
        }
    }
    st.copy = Some(copy);
    st
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(sql: &str) -> Vec<String> {
        table_names(&tokens(sql)).into_iter().map(|(_, n)| n).collect()
    }

    #[test]
    fn table_names_by_their_words() {
        assert_eq!(names("select * from a, b x join c on true where y"), ["a", "b", "c"]);
        assert_eq!(
            names("truncate table pgbench_accounts, pgbench_branches"),
            ["pgbench_accounts", "pgbench_branches"]
        );
        assert_eq!(names("with t as (select 1) select * from t, u"), ["u"]);
        assert_eq!(names("select 'from x' from \"Odd\".\"T\""), ["T"]);
        assert_eq!(names("select * from generate_series(1, 3) g"), Vec::<String>::new());
        assert_eq!(names("copy pgbench_accounts from stdin with (freeze on)"), ["pgbench_accounts"]);
        assert_eq!(names("update only t set x = 1"), ["t"]);
    }

    #[test]
    fn unparsed_statements() {
        let g = HashSet::from(["bots".to_string()]);
        let st = analyze("MOVE FORWARD 2 IN c", "e", "user_id", &g);
        assert_eq!(st.kind, Kind::Cursor);
        let st = analyze("COMMIT PREPARED 'tx-1'", "e", "user_id", &g);
        assert_eq!(st.txn, Some(TxnVerb::CommitPrepared("tx-1".into())));
        let st = analyze("prepare transaction 'a'", "e", "user_id", &g);
        assert_eq!(st.txn, Some(TxnVerb::Prepare("a".into())));
        let st = analyze("SELECT weird syntax FROM bots", "e", "user_id", &g);
        assert_eq!((st.kind, st.tables, st.refusal.is_none()), (Kind::Read, Tables::Global, true));
        let st = analyze("SELECT weird syntax FROM users", "e", "user_id", &g);
        assert!(st.refusal.is_some());
        let st = analyze("SELECT weird syntax", "e", "user_id", &g);
        assert_eq!((st.tables, st.refusal), (Tables::None, None));
        let st =
            analyze("copy users (name, user_id) from stdin with (format csv, freeze on, header)", "e", "user_id", &g);
        let copy = st.copy.expect("copy");
        assert_eq!(
            (st.kind, copy.key_column, copy.format, copy.header),
            (Kind::CopyIn, Some(1), CopyFormat::Csv, true)
        );
        let st = analyze("copy bots from stdin with (freeze on)", "e", "user_id", &g);
        assert_eq!((st.kind, st.tables), (Kind::CopyIn, Tables::Global));
    }
}
