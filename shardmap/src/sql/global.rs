//! Writes to global tables (`shard-global-tables`) that leave every copy identical. An INSERT runs first on
//! one shard, returning every column of the rows it wrote (so defaults such as `gen_random_uuid()`,
//! `now()` or `nextval()`, and volatile calls in the statement, are evaluated once); the other shards then
//! insert exactly those rows. UPDATE and DELETE go to every shard as written: calls whose value would differ
//! between copies (volatile functions, the transaction's clock) are refused there.

use std::ops::ControlFlow;

use sqlparser::ast::{self, Expr, Statement, Visit, Visitor};

use super::cross::function_name;
use super::quote_ident;

/// Functions whose value differs from one evaluation (or one server, or one transaction) to the next.
const VOLATILE: &[&str] = &[
    "random",
    "gen_random_uuid",
    "uuid_generate_v1",
    "uuid_generate_v1mc",
    "uuid_generate_v4",
    "nextval",
    "setval",
    "currval",
    "lastval",
    "now",
    "clock_timestamp",
    "statement_timestamp",
    "transaction_timestamp",
    "timeofday",
    "txid_current",
    "pg_current_xact_id",
    "pg_backend_pid",
    "inet_server_addr",
    "inet_server_port",
    "current_timestamp",
    "current_date",
    "current_time",
    "localtimestamp",
    "localtime",
];

/// Functions constant within a statement (the transaction's clock): evaluated once by the router and
/// written into an UPDATE or DELETE of a global table as literals of their type.
const STABLE: &[(&str, &str)] = &[
    ("now", "timestamptz"),
    ("current_timestamp", "timestamptz"),
    ("transaction_timestamp", "timestamptz"),
    ("statement_timestamp", "timestamptz"),
    ("current_date", "date"),
    ("current_time", "timetz"),
    ("localtimestamp", "timestamp"),
    ("localtime", "time"),
];

/// The name of a call (`now()`) or keyword (`CURRENT_TIMESTAMP`) expression, lower case.
fn call_name(e: &Expr) -> Option<String> {
    match e {
        Expr::Function(f) => Some(function_name(f)),
        Expr::Identifier(i) if i.quote_style.is_none() => Some(i.value.to_lowercase()),
        _ => None,
    }
}

/// An UPDATE or DELETE of a global table, with the transaction's clock read once: `template` has
/// `sr_clock_<k>` where the k-th call was; the router evaluates `eval_sql` on one shard and fills them in.
#[derive(Clone, Debug)]
pub struct GlobalWrite {
    template: String,
    /// The calls, as written, with their types.
    calls: Vec<(String, &'static str)>,
}

/// Plans an UPDATE or DELETE of a global table; volatile calls other than the clock are refused.
pub fn global_write(sql: &str) -> Result<GlobalWrite, String> {
    let mut s = super::parse_last(sql)?;
    struct R(Vec<(String, &'static str)>);
    impl sqlparser::ast::VisitorMut for R {
        type Break = ();
        fn pre_visit_expr(&mut self, e: &mut Expr) -> ControlFlow<()> {
            if let Some(ty) = call_name(e).and_then(|n| STABLE.iter().find(|(s, _)| *s == n).map(|(_, t)| *t)) {
                self.0.push((e.to_string(), ty));
                *e = Expr::Identifier(ast::Ident::new(format!("sr_clock_{}", self.0.len() - 1)));
            }
            ControlFlow::Continue(())
        }
    }
    let mut r = R(Vec::new());
    let _ = sqlparser::ast::VisitMut::visit(&mut s, &mut r);
    if let Some(f) = volatile_call(&s) {
        return Err(format!(
            "calling {f}(), whose value would differ between the shards' copies (compute the value in the client and pass it as a literal or parameter)"
        ));
    }
    Ok(GlobalWrite { template: s.to_string(), calls: r.0 })
}

impl GlobalWrite {
    /// What reads the clock once (`None`: the statement does not read it).
    pub fn eval_sql(&self) -> Option<String> {
        if self.calls.is_empty() {
            return None;
        }
        let cols: Vec<String> = self.calls.iter().map(|(c, _)| format!("({c})::text")).collect();
        Some(format!("SELECT {}", cols.join(", ")))
    }

    /// The statement every shard runs, with the clock's values (as `eval_sql` returned them) written in.
    pub fn fill(&self, values: &[String]) -> String {
        let mut s = self.template.clone();
        for (k, ((_, ty), v)) in self.calls.iter().zip(values).enumerate().rev() {
            s = s.replace(&format!("sr_clock_{k}"), &format!("{}::{ty}", super::quote_literal(v)));
        }
        s
    }
}

/// The first call in a statement whose value would differ between shards' copies, by name.
pub fn volatile_call(s: &Statement) -> Option<String> {
    volatile_call_but(s, &[])
}

/// Like [`volatile_call`], the transaction's clock aside (read once by the router: see [`GlobalWrite`]).
pub fn unstable_call(s: &Statement) -> Option<String> {
    let clock: Vec<&str> = STABLE.iter().map(|(n, _)| *n).collect();
    volatile_call_but(s, &clock)
}

fn volatile_call_but(s: &Statement, except: &[&str]) -> Option<String> {
    struct V<'e>(Option<String>, &'e [&'e str]);
    impl Visitor for V<'_> {
        type Break = ();
        fn pre_visit_expr(&mut self, e: &Expr) -> ControlFlow<()> {
            let Some(name) = call_name(e) else { return ControlFlow::Continue(()) };
            if VOLATILE.contains(&name.as_str()) && !self.1.contains(&name.as_str()) {
                self.0 = Some(name);
                return ControlFlow::Break(());
            }
            ControlFlow::Continue(())
        }
    }
    let mut v = V(None, except);
    let _ = s.visit(&mut v);
    v.0
}

/// How an INSERT into a global table runs (see the module doc).
#[derive(Clone, Debug)]
pub struct GlobalInsert {
    /// What the first shard runs: the client's INSERT returning every column of what it wrote.
    pub first_sql: String,
    table: String,
    /// `ON CONFLICT` of the client's statement: its target, and whether it updates.
    conflict: Option<(String, bool)>,
    /// The client's RETURNING list.
    returning: Option<String>,
}

/// Plans an INSERT into a global table.
pub fn global_insert(sql: &str) -> Result<GlobalInsert, String> {
    let Statement::Insert(mut ins) = super::parse_last(sql)? else { return Err("not an INSERT".into()) };
    let returning =
        ins.returning.take().map(|items| items.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "));
    if returning.as_deref().is_some_and(|r| r.contains('$')) {
        return Err("parameters in RETURNING of a write to a global table".into());
    }
    let conflict = match &ins.on {
        None => None,
        Some(ast::OnInsert::OnConflict(c)) => {
            let target = c.conflict_target.as_ref().map_or(String::new(), |t| format!(" {t}"));
            match &c.action {
                ast::OnConflictAction::DoNothing => Some((target, false)),
                ast::OnConflictAction::DoUpdate(_) if !target.is_empty() => Some((target, true)),
                ast::OnConflictAction::DoUpdate(_) => return Err("ON CONFLICT DO UPDATE without a target".into()),
            }
        }
        Some(_) => return Err("this ON clause".into()),
    };
    let table = match &ins.table {
        ast::TableObject::TableName(n) => n.to_string(),
        _ => return Err("INSERT into a table function".into()),
    };
    ins.returning = Some(vec![ast::SelectItem::Wildcard(ast::WildcardAdditionalOptions::default())]);
    Ok(GlobalInsert { first_sql: Statement::Insert(ins).to_string(), table, conflict, returning })
}

impl GlobalInsert {
    /// What the other shards run: the first shard's rows (their values are parameters `$1...`, row by row,
    /// typed as the first shard described them), with the client's ON CONFLICT and RETURNING. With no rows,
    /// one row of NULLs that is not inserted (so the answer is still described).
    pub fn others_sql(&self, columns: &[&str], rows: usize) -> String {
        let n = columns.len();
        let mut values = String::new();
        for r in 0..rows.max(1) {
            values.push_str(if r == 0 { "(" } else { ",(" });
            for c in 0..n {
                if c > 0 {
                    values.push(',');
                }
                values.push_str(&format!("${}", r * n + c + 1));
            }
            values.push(')');
        }
        let cols: Vec<String> = columns.iter().map(|c| quote_ident(c)).collect();
        let mut sql = format!(
            "INSERT INTO {} ({}) OVERRIDING SYSTEM VALUE SELECT * FROM (VALUES {values}) AS v{}",
            self.table,
            cols.join(", "),
            if rows == 0 { " WHERE false" } else { "" }
        );
        match &self.conflict {
            None => {}
            Some((target, false)) => sql.push_str(&format!(" ON CONFLICT{target} DO NOTHING")),
            Some((target, true)) => {
                let set: Vec<String> = cols.iter().map(|c| format!("{c} = EXCLUDED.{c}")).collect();
                sql.push_str(&format!(" ON CONFLICT{target} DO UPDATE SET {}", set.join(", ")));
            }
        }
        if let Some(r) = &self.returning {
            sql.push_str(&format!(" RETURNING {r}"));
        }
        sql
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlparser::dialect::PostgreSqlDialect;
    use sqlparser::parser::Parser;

    #[test]
    fn the_first_shard_returns_the_rows_the_others_insert() {
        let g = global_insert("INSERT INTO bots (name) VALUES ($1) RETURNING id").unwrap();
        assert_eq!(g.first_sql, "INSERT INTO bots (name) VALUES ($1) RETURNING *");
        assert_eq!(
            g.others_sql(&["id", "name"], 2),
            "INSERT INTO bots (\"id\", \"name\") OVERRIDING SYSTEM VALUE SELECT * FROM (VALUES ($1,$2),($3,$4)) AS v RETURNING id"
        );
        let g = global_insert("INSERT INTO bots VALUES (1, 'x') ON CONFLICT (id) DO UPDATE SET name = 'y'").unwrap();
        assert_eq!(
            g.others_sql(&["id", "name"], 0),
            "INSERT INTO bots (\"id\", \"name\") OVERRIDING SYSTEM VALUE SELECT * FROM (VALUES ($1,$2)) AS v WHERE false ON CONFLICT (id) DO UPDATE SET \"id\" = EXCLUDED.\"id\", \"name\" = EXCLUDED.\"name\""
        );
    }

    #[test]
    fn the_clock_is_read_once() {
        let w = global_write("UPDATE bots SET seen = now(), day = CURRENT_DATE WHERE id = $1").unwrap();
        assert_eq!(w.eval_sql().unwrap(), "SELECT (now())::text, (CURRENT_DATE)::text");
        assert_eq!(
            w.fill(&["2026-12-04 10:00:00+00".into(), "2026-12-04".into()]),
            "UPDATE bots SET seen = '2026-12-04 10:00:00+00'::timestamptz, day = '2026-12-04'::date WHERE id = $1"
        );
        assert!(global_write("DELETE FROM bots WHERE id = 1").unwrap().eval_sql().is_none());
        assert!(global_write("UPDATE bots SET id = gen_random_uuid()").is_err());
    }

    #[test]
    fn volatile_calls_are_found() {
        let parse = |s: &str| Parser::parse_sql(&PostgreSqlDialect {}, s).unwrap().pop().unwrap();
        assert_eq!(volatile_call(&parse("UPDATE bots SET seen = now() WHERE id = 1")), Some("now".into()));
        assert_eq!(volatile_call(&parse("UPDATE bots SET seen = CURRENT_TIMESTAMP")), Some("current_timestamp".into()));
        assert_eq!(volatile_call(&parse("DELETE FROM bots WHERE random() < 0.5")), Some("random".into()));
        assert_eq!(volatile_call(&parse("UPDATE bots SET name = upper(name)")), None);
    }
}
