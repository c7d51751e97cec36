//! Reads that span shards: whether the shards' answers, concatenated, are what one PostgreSQL holding all the
//! data would answer ([`Cross::Concat`]); whether the router must combine them ([`Cross::Combine`]:
//! aggregates, GROUP BY, DISTINCT, ORDER BY, LIMIT/OFFSET); or whether no combination of per-shard answers
//! gives that answer ([`Cross::Refuse`], naming the construct, SQLSTATE 0A000).
//!
//! Conservative by design: anything not recognised as safe is refused. Sharded tables are co-located on the
//! key, so a join of sharded tables is answered per shard only when they are joined on the key, and a
//! subquery reading a sharded table only when it is correlated on the key.

use std::ops::ControlFlow;

use sqlparser::ast::{
    self, BinaryOperator, Expr, FunctionArguments, GroupByExpr, Query, Select, SetExpr, SetOperator, SetQuantifier,
    TableFactor, Visit, Visitor,
};

use super::{fold, is_catalog, table_name, Ctx};

/// How the shards' answers to a read that spans shards become the client's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cross {
    /// Each shard's rows, concatenated: scans, filters and projections, joins on the key or with global
    /// tables, subqueries correlated on the key, GROUP BY the key.
    Concat,
    /// Rows the router combines: aggregates, GROUP BY, DISTINCT, ORDER BY, LIMIT/OFFSET.
    Combine,
    /// No combination of per-shard answers is the answer: the construct, for the client's error.
    Refuse(String),
}

/// Aggregates whose per-shard results combine into the whole's (avg as sum and count).
pub const COMBINABLE: &[&str] = &["count", "sum", "avg", "min", "max", "bool_and", "bool_or", "every"];

/// PostgreSQL's built-in aggregates (and the SQL-standard ones): a call of one of these aggregates rows.
const AGGREGATES: &[&str] = &[
    "count",
    "sum",
    "avg",
    "min",
    "max",
    "bool_and",
    "bool_or",
    "every",
    "array_agg",
    "string_agg",
    "json_agg",
    "jsonb_agg",
    "json_object_agg",
    "jsonb_object_agg",
    "json_agg_strict",
    "jsonb_agg_strict",
    "json_objectagg",
    "json_arrayagg",
    "xmlagg",
    "bit_and",
    "bit_or",
    "bit_xor",
    "stddev",
    "stddev_pop",
    "stddev_samp",
    "variance",
    "var_pop",
    "var_samp",
    "corr",
    "covar_pop",
    "covar_samp",
    "regr_avgx",
    "regr_avgy",
    "regr_count",
    "regr_intercept",
    "regr_r2",
    "regr_slope",
    "regr_sxx",
    "regr_sxy",
    "regr_syy",
    "percentile_cont",
    "percentile_disc",
    "mode",
    "rank",
    "dense_rank",
    "percent_rank",
    "cume_dist",
    "range_agg",
    "range_intersect_agg",
    "any_value",
];

/// Whether a function name is an aggregate's.
pub fn is_aggregate(name: &str) -> bool {
    AGGREGATES.contains(&name)
}

/// The lower-case last part of a function's name.
pub(super) fn function_name(f: &ast::Function) -> String {
    f.name.0.last().and_then(|p| p.as_ident()).map(fold).unwrap_or_default()
}

/// The expressions of a SELECT block where subqueries may be: WHERE, HAVING, the select list, join conditions.
fn block_exprs(s: &Select) -> Vec<&Expr> {
    let mut exprs: Vec<&Expr> = Vec::new();
    exprs.extend(s.selection.as_ref());
    exprs.extend(s.having.as_ref());
    for item in &s.projection {
        if let ast::SelectItem::UnnamedExpr(e) | ast::SelectItem::ExprWithAlias { expr: e, .. } = item {
            exprs.push(e);
        }
    }
    for t in &s.from {
        for j in &t.joins {
            exprs.extend(super::join_condition(&j.join_operator));
        }
    }
    exprs
}

/// Whether an expression holds a subquery.
fn has_subquery(e: &Expr) -> bool {
    struct V;
    impl Visitor for V {
        type Break = ();
        fn pre_visit_query(&mut self, _: &Query) -> ControlFlow<()> {
            ControlFlow::Break(())
        }
    }
    e.visit(&mut V).is_break()
}

/// Calls of functions directly in an expression (not inside its subqueries).
pub(super) fn calls(e: &Expr, mut each: impl FnMut(&ast::Function)) {
    struct V<'f> {
        depth: usize,
        each: &'f mut dyn FnMut(&ast::Function),
    }
    impl Visitor for V<'_> {
        type Break = ();
        fn pre_visit_query(&mut self, _: &Query) -> ControlFlow<()> {
            self.depth += 1;
            ControlFlow::Continue(())
        }
        fn post_visit_query(&mut self, _: &Query) -> ControlFlow<()> {
            self.depth -= 1;
            ControlFlow::Continue(())
        }
        fn pre_visit_expr(&mut self, e: &Expr) -> ControlFlow<()> {
            if let (0, Expr::Function(f)) = (self.depth, e) {
                (self.each)(f);
            }
            ControlFlow::Continue(())
        }
    }
    let _ = e.visit(&mut V { depth: 0, each: &mut each });
}

impl Ctx<'_> {
    /// How a read that spans shards is answered (see the module doc).
    pub(super) fn cross(&self, q: &Query) -> Cross {
        match self.cross_query(q) {
            Ok(true) => Cross::Combine,
            Ok(false) => Cross::Concat,
            Err(why) => Cross::Refuse(why),
        }
    }

    /// `Ok(true)`: rows to combine; `Ok(false)`: concatenate.
    fn cross_query(&self, q: &Query) -> Result<bool, String> {
        let mut ctes = Vec::new();
        if let Some(with) = &q.with {
            for cte in &with.cte_tables {
                // A CTE whose rows are each shard's own (rows concatenated) stands for a sharded table in
                // the rest of the query; one that reads no sharded table is local to each shard.
                let name = fold(&cte.alias.name);
                let mut own = ctes.clone();
                own.push(name.clone());
                match self.reads_sharded(&cte.query, &own) {
                    None => ctes.push(name),
                    Some(t) if with.recursive => return Err(format!("a recursive WITH query reading {t}")),
                    Some(t) => match self.cross_query(&cte.query) {
                        Ok(false) => {}
                        _ => return Err(format!("a WITH query reading {t} whose rows are not each shard's own")),
                    },
                }
            }
        }
        if q.fetch.is_some() {
            return Err("FETCH FIRST (use LIMIT)".into());
        }
        let ordered = q.order_by.is_some() || q.limit_clause.is_some();
        let combine = match q.body.as_ref() {
            SetExpr::Select(s) => self.cross_select(s, q.order_by.as_ref(), &ctes)? || ordered,
            SetExpr::SetOperation { op: SetOperator::Union, set_quantifier: SetQuantifier::All, left, right }
                if !ordered =>
            {
                for side in [left, right] {
                    match side.as_ref() {
                        SetExpr::Select(s) if !self.cross_select(s, None, &ctes)? => {}
                        SetExpr::Select(_) => {
                            return Err("UNION ALL of queries with aggregates, GROUP BY or DISTINCT".into())
                        }
                        _ => return Err("a nested UNION".into()),
                    }
                }
                false
            }
            SetExpr::SetOperation { op, .. } => return Err(format!("{op} (and UNION with ORDER BY or LIMIT)")),
            SetExpr::Query(_) => return Err("a parenthesized query".into()),
            _ => ordered,
        };
        if combine && !q.locks.is_empty() {
            return Err("FOR UPDATE/SHARE with ORDER BY, LIMIT, DISTINCT or aggregates".into());
        }
        Ok(combine)
    }

    /// One SELECT block: refused constructs, or whether its rows need combining.
    fn cross_select(&self, s: &Select, order_by: Option<&ast::OrderBy>, ctes: &[String]) -> Result<bool, String> {
        let from: Vec<&ast::TableWithJoins> = s.from.iter().collect();
        self.scoped(&from, || self.cross_select_in_scope(s, order_by, ctes))
    }

    fn cross_select_in_scope(
        &self,
        s: &Select,
        order_by: Option<&ast::OrderBy>,
        ctes: &[String],
    ) -> Result<bool, String> {
        // The sharded tables it scans, joined on the key.
        let mut sharded = Vec::new();
        let mut key_joins = 0;
        for t in &s.from {
            self.cross_factor(&t.relation, ctes, &mut sharded)?;
            for j in &t.joins {
                self.cross_factor(&j.relation, ctes, &mut sharded)?;
                key_joins += self.join_on_key(&j.join_operator);
            }
        }
        if let Some(w) = &s.selection {
            key_joins += self.key_equalities(w);
        }
        // An outer join keeps the rows of its preserved side that match nothing: where that side reads no
        // sharded table (a global table, VALUES, a function) and the other does, every shard would keep them.
        for t in &s.from {
            let mut left = Vec::new();
            self.cross_factor(&t.relation, ctes, &mut left)?;
            for j in &t.joins {
                let mut right = Vec::new();
                self.cross_factor(&j.relation, ctes, &mut right)?;
                use ast::JoinOperator as J;
                let (keeps_left, keeps_right) = match &j.join_operator {
                    J::Left(_) | J::LeftOuter(_) => (true, false),
                    J::Right(_) | J::RightOuter(_) => (false, true),
                    J::FullOuter(_) => (true, true),
                    _ => (false, false),
                };
                let kept = match (keeps_left && left.is_empty() && !right.is_empty(), keeps_right && right.is_empty()) {
                    (true, _) => Some(&right),
                    (_, true) if !left.is_empty() => Some(&left),
                    _ => None,
                };
                if let Some(other) = kept {
                    return Err(format!(
                        "an outer join keeping rows of a table that is not sharded against the sharded table {}",
                        other[0]
                    ));
                }
                left.extend(right);
            }
        }
        if sharded.len() > 1 && key_joins + 1 < sharded.len() {
            return Err(format!(
                "a join of {} and {} that is not on {}",
                sharded[0],
                sharded[1..].join(", "),
                self.key
            ));
        }
        // Subqueries anywhere in the block must be answerable per shard.
        let exprs = block_exprs(s);
        let order: Vec<&Expr> = match order_by.map(|o| &o.kind) {
            Some(ast::OrderByKind::Expressions(list)) => list.iter().map(|o| &o.expr).collect(),
            Some(ast::OrderByKind::All(_)) => return Err("ORDER BY ALL".into()),
            None => Vec::new(),
        };
        for e in exprs.iter().chain(order.iter()) {
            if let Some(bad) = self.uncorrelated_subquery(e, ctes) {
                return Err(bad);
            }
        }
        // Window functions see rows of every shard at once.
        let mut window = None;
        for e in exprs.iter().chain(order.iter()) {
            calls(e, |f| {
                if f.over.is_some() && window.is_none() {
                    window = Some(function_name(f));
                }
            });
        }
        if let Some(w) = window {
            return Err(format!("the window function {w}()"));
        }
        let distinct = match &s.distinct {
            None | Some(ast::Distinct::All) => false,
            Some(ast::Distinct::Distinct) => true,
            Some(_) => return Err("DISTINCT ON".into()),
        };
        let groups = match &s.group_by {
            GroupByExpr::Expressions(exprs, modifiers) if modifiers.is_empty() => exprs,
            _ => return Err("GROUP BY ROLLUP/CUBE/GROUPING SETS/ALL".into()),
        };
        for g in groups {
            if matches!(g, Expr::Rollup(_) | Expr::Cube(_) | Expr::GroupingSets(_)) {
                return Err("GROUP BY ROLLUP/CUBE/GROUPING SETS".into());
            }
        }
        // GROUP BY the key: every group lives on one shard, so aggregates are answered there.
        let by_key = groups.iter().any(|g| self.is_key(self.resolve_group(g, &s.projection)));
        let mut aggregates = false;
        let mut bad = None;
        for e in exprs.iter().filter(|e| s.selection.as_ref() != Some(**e)).chain(order.iter()) {
            calls(e, |f| {
                let name = function_name(f);
                if f.over.is_some() || !is_aggregate(&name) {
                    return;
                }
                aggregates = true;
                if by_key || bad.is_some() {
                    return;
                }
                let ordered = matches!(&f.args, FunctionArguments::List(l) if !l.clauses.is_empty());
                bad = if !COMBINABLE.contains(&name.as_str()) {
                    Some(format!("the aggregate {name}()"))
                } else if ordered || !f.within_group.is_empty() {
                    Some(format!("{name}() with ORDER BY"))
                } else {
                    None
                };
            });
        }
        if let Some(b) = bad {
            return Err(b);
        }
        if by_key {
            return Ok(distinct);
        }
        Ok(distinct || aggregates || !groups.is_empty() || s.having.is_some())
    }

    /// `GROUP BY 2` or `GROUP BY alias`: the select-list expression it names.
    pub(super) fn resolve_group<'e>(&self, g: &'e Expr, projection: &'e [ast::SelectItem]) -> &'e Expr {
        let item = |n: usize| match projection.get(n) {
            Some(ast::SelectItem::UnnamedExpr(e) | ast::SelectItem::ExprWithAlias { expr: e, .. }) => Some(e),
            _ => None,
        };
        match g {
            Expr::Value(v) => match &v.value {
                ast::Value::Number(n, _) => n.parse::<usize>().ok().and_then(|n| n.checked_sub(1)).and_then(item),
                _ => None,
            },
            Expr::Identifier(id) => projection.iter().find_map(|p| match p {
                ast::SelectItem::ExprWithAlias { expr, alias } if fold(alias) == fold(id) => Some(expr),
                _ => None,
            }),
            _ => None,
        }
        .unwrap_or(g)
    }

    /// A FROM item: plain tables are collected; derived tables must not read sharded tables.
    fn cross_factor(&self, f: &TableFactor, ctes: &[String], sharded: &mut Vec<String>) -> Result<(), String> {
        match f {
            TableFactor::Table { name, args: None, .. } => {
                let Some(t) = table_name(name) else { return Ok(()) };
                let local = is_catalog(name, &t) || (name.0.len() == 1 && ctes.contains(&t));
                if !local && !self.global.contains(&t) {
                    sharded.push(t);
                }
                Ok(())
            }
            TableFactor::Derived { subquery, .. } => match self.reads_sharded(subquery, ctes) {
                Some(t) => Err(format!("a subquery in FROM reading {t}")),
                None => Ok(()),
            },
            TableFactor::NestedJoin { table_with_joins, .. } => {
                self.cross_factor(&table_with_joins.relation, ctes, sharded)?;
                for j in &table_with_joins.joins {
                    self.cross_factor(&j.relation, ctes, sharded)?;
                }
                Ok(())
            }
            TableFactor::Table { .. } | TableFactor::Function { .. } | TableFactor::UNNEST { .. } => Ok(()),
            _ => Err("this kind of FROM item".into()),
        }
    }

    /// The first sharded table a query reads anywhere inside it (CTE names and global tables aside).
    fn reads_sharded(&self, q: &Query, ctes: &[String]) -> Option<String> {
        struct V<'c, 'a> {
            ctx: &'c Ctx<'a>,
            ctes: Vec<String>,
            found: Option<String>,
        }
        impl Visitor for V<'_, '_> {
            type Break = ();
            fn pre_visit_query(&mut self, q: &Query) -> ControlFlow<()> {
                if let Some(with) = &q.with {
                    self.ctes.extend(with.cte_tables.iter().map(|c| fold(&c.alias.name)));
                }
                ControlFlow::Continue(())
            }
            fn pre_visit_relation(&mut self, name: &ast::ObjectName) -> ControlFlow<()> {
                let Some(t) = table_name(name) else { return ControlFlow::Continue(()) };
                let local = is_catalog(name, &t) || (name.0.len() == 1 && self.ctes.contains(&t));
                if local || self.ctx.global.contains(&t) {
                    return ControlFlow::Continue(());
                }
                self.found = Some(t);
                ControlFlow::Break(())
            }
        }
        let mut v = V { ctx: self, ctes: ctes.to_vec(), found: None };
        let _ = q.visit(&mut v);
        v.found
    }

    /// The first subquery directly inside `e` that reads a sharded table and is not correlated on the key.
    fn uncorrelated_subquery(&self, e: &Expr, ctes: &[String]) -> Option<String> {
        struct V<'c, 'a> {
            ctx: &'c Ctx<'a>,
            ctes: &'c [String],
            depth: usize,
            bad: Option<String>,
            /// Subqueries of `key IN (SELECT key ...)` (compared by address, never dereferenced).
            semijoins: Vec<*const Query>,
        }
        impl Visitor for V<'_, '_> {
            type Break = ();
            fn pre_visit_expr(&mut self, e: &Expr) -> ControlFlow<()> {
                // `key IN (SELECT key FROM ...)`: a join on the key, answered on each shard.
                if let (0, Expr::In { expr, target: ast::InTarget::Subquery(subquery), .. }) = (self.depth, e) {
                    let selects_key = match subquery.body.as_ref() {
                        SetExpr::Select(s) => match s.projection.as_slice() {
                            [ast::SelectItem::UnnamedExpr(k) | ast::SelectItem::ExprWithAlias { expr: k, .. }] => {
                                matches!(k, Expr::Identifier(_) | Expr::CompoundIdentifier(_))
                                    && self.ctx.selects_key(s, k)
                            }
                            _ => false,
                        },
                        _ => false,
                    };
                    if selects_key && self.ctx.is_key_column(expr) {
                        self.semijoins.push(&**subquery as *const Query);
                    }
                }
                ControlFlow::Continue(())
            }
            fn pre_visit_query(&mut self, q: &Query) -> ControlFlow<()> {
                if self.depth == 0 {
                    if let Some(t) = self.ctx.reads_sharded(q, self.ctes) {
                        let key = self.ctx.key;
                        self.bad = if self.semijoins.contains(&(q as *const Query)) {
                            // Its rows must be the union of each shard's (no LIMIT, no aggregate over shards, no
                            // subquery of its own that needs every shard); duplicates do not matter to IN.
                            match self.ctx.semijoin_rows(q) {
                                Ok(false) => None,
                                Ok(true) => Some(format!(
                                    "a subquery {key} IN (SELECT {key} FROM {t} ...) whose rows each shard computes from its own part (ORDER BY, LIMIT, OFFSET, aggregates)"
                                )),
                                Err(why) => Some(format!("{why} in a subquery {key} IN (SELECT {key} FROM {t} ...)")),
                            }
                        } else if !self.ctx.correlated_on_key(q) {
                            Some(format!("a subquery reading {t} that is not correlated on {key}"))
                        } else {
                            // Tied to the outer row's key, it reads that key's shard; a subquery inside it that
                            // is not tied too would see only that shard's part.
                            self.ctx.nested_uncorrelated(q, self.ctes)
                        };
                        if self.bad.is_some() {
                            return ControlFlow::Break(());
                        }
                    }
                }
                self.depth += 1;
                ControlFlow::Continue(())
            }
            fn post_visit_query(&mut self, _: &Query) -> ControlFlow<()> {
                self.depth -= 1;
                ControlFlow::Continue(())
            }
        }
        let mut v = V { ctx: self, ctes, depth: 0, bad: None, semijoins: Vec::new() };
        let _ = e.visit(&mut v);
        v.bad
    }

    /// A write that runs on several shards (UPDATE or DELETE with keys on several, a multi-row INSERT split by
    /// shard) writes on each from what that shard holds: what it reads besides the rows it writes — tables in
    /// FROM/USING, subqueries in WHERE, SET, VALUES or RETURNING — must be each shard's part too (joined or
    /// correlated on the key), as for a read across shards. The construct that is not, else `None`.
    pub(super) fn write_cross(&self, s: &ast::Statement) -> Option<String> {
        let items = |r: &Option<Vec<ast::SelectItem>>| -> Vec<Expr> {
            r.iter()
                .flatten()
                .filter_map(|i| match i {
                    ast::SelectItem::UnnamedExpr(e) | ast::SelectItem::ExprWithAlias { expr: e, .. } => Some(e.clone()),
                    _ => None,
                })
                .collect()
        };
        let (mut tables, selection, mut exprs): (Vec<String>, Option<&Expr>, Vec<Expr>) = match s {
            ast::Statement::Update(u) => {
                let mut tables = vec![u.table.to_string()];
                if let Some(ast::UpdateTableFromKind::BeforeSet(f) | ast::UpdateTableFromKind::AfterSet(f)) = &u.from {
                    tables.extend(f.iter().map(ToString::to_string));
                }
                let mut exprs = items(&u.returning);
                exprs.extend(u.assignments.iter().map(|a| a.value.clone()));
                (tables, u.selection.as_ref(), exprs)
            }
            ast::Statement::Delete(d) => {
                let (ast::FromTable::WithFromKeyword(from) | ast::FromTable::WithoutKeyword(from)) = &d.from;
                let mut tables: Vec<String> = from.iter().map(ToString::to_string).collect();
                tables.extend(d.using.iter().flatten().map(ToString::to_string));
                (tables, d.selection.as_ref(), items(&d.returning))
            }
            ast::Statement::Insert(i) => {
                let mut exprs = items(&i.returning);
                if let Some(SetExpr::Values(v)) = i.source.as_ref().map(|q| q.body.as_ref()) {
                    exprs.extend(v.rows.iter().flat_map(|r| r.content.iter()).cloned());
                }
                if let Some(ast::OnInsert::OnConflict(ast::OnConflict {
                    action: ast::OnConflictAction::DoUpdate(u),
                    ..
                })) = &i.on
                {
                    exprs.extend(u.assignments.iter().map(|a| a.value.clone()));
                    exprs.extend(u.selection.clone());
                }
                (Vec::new(), None, exprs)
            }
            _ => return None,
        };
        // (Plain expressions read nothing but the written row; only subqueries and other tables matter.)
        exprs.retain(has_subquery);
        if tables.len() <= 1 && exprs.is_empty() && !selection.is_some_and(has_subquery) {
            return None;
        }
        if matches!(s, ast::Statement::Insert(_)) {
            tables.clear();
        }
        let mut sql = String::from("SELECT 1");
        for e in &exprs {
            sql.push_str(&format!(", {e}"));
        }
        if !tables.is_empty() {
            sql.push_str(&format!(" FROM {}", tables.join(", ")));
        }
        if let Some(w) = selection {
            sql.push_str(&format!(" WHERE {w}"));
        }
        match super::parse(&sql).as_deref() {
            Ok([ast::Statement::Query(q)]) => self.cross_query(q).err(),
            _ => Some("a write whose reads the router cannot check".into()),
        }
    }

    /// The rows of `key IN (SELECT key ...)`'s subquery read across shards: `Ok(false)` when they are the union
    /// of each shard's (DISTINCT aside: IN does not count duplicates).
    fn semijoin_rows(&self, q: &Query) -> Result<bool, String> {
        match q.body.as_ref() {
            SetExpr::Select(s) if matches!(s.distinct, Some(ast::Distinct::Distinct)) => {
                let mut plain = q.clone();
                if let SetExpr::Select(s) = plain.body.as_mut() {
                    s.distinct = None;
                }
                self.cross_query(&plain)
            }
            _ => self.cross_query(q),
        }
    }

    /// In a subquery correlated on the key: the first subquery inside its block that reads a sharded table
    /// and is not itself correlated on the key.
    fn nested_uncorrelated(&self, q: &Query, ctes: &[String]) -> Option<String> {
        let SetExpr::Select(s) = q.body.as_ref() else { return None };
        let from: Vec<&ast::TableWithJoins> = s.from.iter().collect();
        self.scoped(&from, || block_exprs(s).into_iter().find_map(|e| self.uncorrelated_subquery(e, ctes)))
    }

    /// Whether a subquery's WHERE ties its rows to the outer row's key (`o.user_id = u.user_id`).
    fn correlated_on_key(&self, q: &Query) -> bool {
        match q.body.as_ref() {
            SetExpr::Select(s) => {
                let from: Vec<&ast::TableWithJoins> = s.from.iter().collect();
                self.scoped(&from, || {
                    s.selection.as_ref().is_some_and(|w| self.key_equalities(w) > 0)
                        || s.from.iter().any(|t| t.joins.iter().any(|j| self.join_on_key(&j.join_operator) > 0))
                })
            }
            _ => false,
        }
    }

    /// `a.key = b.key` conjuncts of a condition.
    fn key_equalities(&self, e: &Expr) -> usize {
        match e {
            Expr::BinaryOp { left, op: BinaryOperator::And, right } => {
                self.key_equalities(left) + self.key_equalities(right)
            }
            Expr::Nested(inner) => self.key_equalities(inner),
            Expr::BinaryOp { left, op: BinaryOperator::Eq, right }
                if self.is_key_column(left) && self.is_key_column(right) =>
            {
                1
            }
            _ => 0,
        }
    }

    /// `USING (col)`: `col` is the key of every sharded table in scope.
    fn using_key(&self, col: &str) -> bool {
        if self.table_keys.is_empty() {
            return col == self.key;
        }
        let scopes = self.scopes.borrow();
        scopes.last().is_some_and(|scope| {
            scope.iter().filter(|(_, t)| !self.global.contains(t)).all(|(_, t)| self.key_of(t) == col)
        })
    }

    fn is_key_column(&self, e: &Expr) -> bool {
        matches!(e, Expr::Identifier(_) | Expr::CompoundIdentifier(_)) && self.is_key(e)
    }

    /// 1 when a join's condition equates the key of both sides (`ON a.key = b.key`, `USING (key)`).
    fn join_on_key(&self, op: &ast::JoinOperator) -> usize {
        use ast::JoinOperator as J;
        let c = match op {
            J::Join(c)
            | J::Inner(c)
            | J::Left(c)
            | J::LeftOuter(c)
            | J::Right(c)
            | J::RightOuter(c)
            | J::FullOuter(c) => c,
            _ => return 0,
        };
        match c {
            ast::JoinConstraint::On(e) => self.key_equalities(e).min(1),
            ast::JoinConstraint::Using(cols) => usize::from(
                cols.iter().any(|c| c.0.last().and_then(|p| p.as_ident()).is_some_and(|i| self.using_key(&fold(i)))),
            ),
            _ => 0,
        }
    }
}
