//! An INSERT whose VALUES rows belong to several shards, split into one INSERT per shard: each keeps its
//! rows in their order, the client's column list, ON CONFLICT and RETURNING, with the parameters it uses
//! renumbered from `$1` (so that a shard's statement binds only its own values).

use std::ops::ControlFlow;

use sqlparser::ast::{self, Expr, SetExpr, Statement, Value, VisitMut, VisitorMut};

/// One shard's part of a split INSERT.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InsertPart {
    pub sql: String,
    /// The client's parameters it binds (zero-based), in the order of its `$1`, `$2`...
    pub params: Vec<usize>,
}

/// Splits `sql` (one `INSERT ... VALUES`) into one INSERT per group of row numbers (zero-based, in VALUES
/// order). `Err` names what cannot be split.
pub fn split_insert(sql: &str, groups: &[Vec<usize>]) -> Result<Vec<InsertPart>, String> {
    let Statement::Insert(ins) = super::parse_last(sql)? else { return Err("not an INSERT".into()) };
    if let Some(ast::OnInsert::OnConflict(c)) = &ins.on {
        if matches!(c.action, ast::OnConflictAction::DoNothing) && ins.returning.is_some() {
            // Rows skipped by a conflict return nothing: which VALUES row each returned row is would be lost.
            return Err("INSERT ... ON CONFLICT DO NOTHING RETURNING with rows for several shards".into());
        }
    }
    let rows = match ins.source.as_ref().map(|s| s.body.as_ref()) {
        Some(SetExpr::Values(v)) => v.rows.len(),
        _ => return Err("an INSERT without VALUES".into()),
    };
    let mut parts = Vec::with_capacity(groups.len());
    for group in groups {
        if group.iter().any(|&r| r >= rows) {
            return Err("a row number past the INSERT's rows".into());
        }
        let mut part = ins.clone();
        if let Some(SetExpr::Values(v)) = part.source.as_mut().map(|s| s.body.as_mut()) {
            let all = std::mem::take(&mut v.rows);
            v.rows = group.iter().map(|&r| all[r].clone()).collect();
        }
        let mut stmt = Statement::Insert(part);
        let mut params = Vec::new();
        let _ = stmt.visit(&mut Renumber(&mut params));
        parts.push(InsertPart { sql: stmt.to_string(), params });
    }
    Ok(parts)
}

/// Renumbers `$n` placeholders in the order they first appear after those already in the list, recording
/// the original (zero-based) of each: `$1` of the result binds the client's parameter `list[0]`.
pub(super) struct Renumber<'p>(pub &'p mut Vec<usize>);

impl VisitorMut for Renumber<'_> {
    type Break = ();
    fn pre_visit_expr(&mut self, e: &mut Expr) -> ControlFlow<()> {
        if let Expr::Value(v) = e {
            if let Value::Placeholder(p) = &v.value {
                if let Some(n) = p.strip_prefix('$').and_then(|n| n.parse::<usize>().ok()).filter(|n| *n > 0) {
                    let i = match self.0.iter().position(|&x| x == n - 1) {
                        Some(i) => i,
                        None => {
                            self.0.push(n - 1);
                            self.0.len() - 1
                        }
                    };
                    *e = Expr::Value(Value::Placeholder(format!("${}", i + 1)).into());
                }
            }
        }
        ControlFlow::Continue(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_and_parameters_follow_their_shard() {
        let sql = "INSERT INTO messages (user_id, body) VALUES ($1, $2), (7, 'x'), ($3, $4) \
                   ON CONFLICT (id) DO UPDATE SET body = $5 RETURNING id";
        let parts = split_insert(sql, &[vec![0, 1], vec![2]]).unwrap();
        assert_eq!(
            parts[0].sql,
            "INSERT INTO messages (user_id, body) VALUES ($1, $2), (7, 'x') ON CONFLICT(id) DO UPDATE SET body = $3 RETURNING id"
        );
        assert_eq!(parts[0].params, vec![0, 1, 4]);
        assert_eq!(
            parts[1].sql,
            "INSERT INTO messages (user_id, body) VALUES ($1, $2) ON CONFLICT(id) DO UPDATE SET body = $3 RETURNING id"
        );
        assert_eq!(parts[1].params, vec![2, 3, 4]);
        let refused =
            split_insert("INSERT INTO t (user_id) VALUES (1), (2) ON CONFLICT DO NOTHING RETURNING *", &[vec![0]]);
        assert!(refused.is_err());
        assert!(
            split_insert("INSERT INTO t (user_id) VALUES (1), (2) ON CONFLICT DO NOTHING", &[vec![1], vec![0]]).is_ok()
        );
    }
}
