//! Reads whose rows the router combines across shards ([`super::Cross::Combine`]): what each shard runs,
//! and the final query one connection runs over the shards' rows (sent back to it as parameters) so that
//! PostgreSQL itself merges groups, finishes aggregates, orders under the database's collation, and applies
//! DISTINCT, HAVING, LIMIT and OFFSET. Citus' coordinator does the same with its own PostgreSQL; the router
//! has none, so it borrows the first shard's connection.
//!
//! Two shapes:
//! - **rows** (ORDER BY, LIMIT/OFFSET, DISTINCT, or GROUP BY the key): each shard runs the query with
//!   LIMIT n+m and no OFFSET, plus its sort keys that are not in the select list (hidden, stripped);
//!   the final query orders, deduplicates and limits the rows.
//! - **groups** (aggregates, GROUP BY, HAVING): each shard returns its groups with partial aggregates
//!   (`avg` as `sum` and `count`); the final query groups them again and finishes each aggregate
//!   (`sum` of counts, `min` of minimums...), then HAVING, ORDER BY and LIMIT apply.

use std::ops::ControlFlow;

use sqlparser::ast::{
    self, Expr, FunctionArguments, GroupByExpr, Ident, LimitClause, Query, SelectItem, SetExpr, Value, VisitMut,
    VisitorMut,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

use super::cross::{function_name, is_aggregate};
use super::{fold, quote_ident};

/// Type OIDs the final query needs to tell apart.
const INT8: u32 = 20;
const NUMERIC: u32 = 1700;
const FLOAT8: u32 = 701;
const INTERVAL: u32 = 1186;

/// How a combined read runs (see the module doc).
#[derive(Clone, Debug)]
pub struct CombinePlan {
    /// What each shard runs, with the parameters it uses renumbered `$1...`...
    pub shard_sql: String,
    /// ...which are these of the client's (zero-based), in order.
    pub shard_params: Vec<usize>,
    /// Trailing columns of each shard's rows that the client does not see (sort keys).
    pub hidden: usize,
    /// The client's parameters the final query uses (zero-based), in the final query's order.
    pub final_params: Vec<usize>,
    /// Rows in an order with no DISTINCT: how the router can merge the shards' sorted streams itself
    /// (memory for one row per shard), when the sort keys' types allow.
    pub stream: Option<StreamPlan>,
    mode: Mode,
}

/// A k-way merge of the shards' sorted rows: each shard runs `sql` (the client's columns, then every sort
/// key again as a hidden column, its ORDER BY, `LIMIT n + m`); the router compares the hidden keys, skips
/// `offset` rows and stops after `limit`.
#[derive(Clone, Debug)]
pub struct StreamPlan {
    pub sql: String,
    /// The client's parameters `sql` uses (zero-based), in its numbering.
    pub params: Vec<usize>,
    /// Each sort key: descending, and whether NULLs come first.
    pub keys: Vec<(bool, bool)>,
    pub limit: Option<u64>,
    pub offset: u64,
}

#[derive(Clone, Debug)]
enum Mode {
    Rows {
        distinct: bool,
        order: Vec<OrderKey>,
        tail: String,
    },
    Groups {
        groups: usize,
        items: Vec<Item>,
        aggs: Vec<Agg>,
        having: Option<String>,
        order: Vec<String>,
        distinct: bool,
        tail: String,
    },
}

/// A sort key of the rows shape: a column of the shards' rows and what follows it (`DESC NULLS LAST`).
#[derive(Clone, Debug)]
struct OrderKey {
    col: Col,
    suffix: String,
}

#[derive(Clone, Copy, Debug)]
enum Col {
    /// The n-th column the client sees.
    Visible(usize),
    /// The n-th hidden column.
    Hidden(usize),
}

/// A column of the groups shape's answer: its final expression (with `sr_agg_<j>_` standing for the j-th
/// aggregate's final form) and its name; `pass` when it is a grouped column of the shards' rows as is.
#[derive(Clone, Debug)]
struct Item {
    template: String,
    name: String,
    pass: Option<usize>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AggKind {
    /// `name(DISTINCT x)`, finished as itself over the shards' distinct values.
    Distinct(&'static str),
    Count,
    Sum,
    Min,
    Max,
    Avg,
    BoolAnd,
    BoolOr,
}

/// An aggregate: its kind and its first partial column (avg has two: sum, count).
#[derive(Clone, Copy, Debug)]
struct Agg {
    kind: AggKind,
    col: usize,
}

/// A column of the shards' rows, as their RowDescription gives it.
#[derive(Clone, Debug)]
pub struct Column<'a> {
    pub name: &'a str,
    pub type_oid: u32,
    /// The column's collation when it is not the database's default (a table column declared with its own),
    /// already quoted (`"de-x-icu"`): the final query compares the shards' values under it.
    pub collation: Option<&'a str>,
}

/// Where a client-visible column of the combined answer comes from: the shards' rows (their description
/// stands: table, column, type modifier) or the final query.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Partial(usize),
    Final(usize),
}

/// Builds the plan of a combined read from its text.
pub fn plan(sql: &str) -> Result<CombinePlan, String> {
    let ast::Statement::Query(q) = super::parse_last(sql)? else { return Err("not a query".into()) };
    Planning::default().query(*q)
}

#[derive(Default)]
struct Planning {
    /// Client parameters the final query uses, in order (zero-based).
    params: Vec<usize>,
    /// DISTINCT aggregates: the column of the shards' rows holding the distinct values.
    distinct_col: Option<usize>,
}

impl Planning {
    fn query(mut self, mut q: Query) -> Result<CombinePlan, String> {
        let (limit, offset) = match q.limit_clause.take() {
            None => (None, None),
            Some(LimitClause::LimitOffset { limit, offset, limit_by }) if limit_by.is_empty() => {
                (limit, offset.map(|o| o.value))
            }
            Some(_) => return Err("this LIMIT syntax".into()),
        };
        let order: Vec<ast::OrderByExpr> = match q.order_by.take().map(|o| o.kind) {
            None => Vec::new(),
            Some(ast::OrderByKind::Expressions(list)) => list,
            Some(ast::OrderByKind::All(_)) => return Err("ORDER BY ALL".into()),
        };
        let SetExpr::Select(select) = q.body.as_mut() else { return Err("a query that is not one SELECT".into()) };
        let distinct = matches!(select.distinct, Some(ast::Distinct::Distinct));
        let groups: Vec<Expr> = match &select.group_by {
            GroupByExpr::Expressions(g, _) => g.clone(),
            GroupByExpr::All(_) => return Err("GROUP BY ALL".into()),
        };
        let aggregated = !groups.is_empty()
            || select.having.is_some()
            || select.projection.iter().any(|i| item_expr(i).is_some_and(has_aggregate))
            || order.iter().any(|o| has_aggregate(&o.expr));
        let tail = self.tail(limit.as_ref(), offset.as_ref())?;
        if aggregated {
            return self.groups(q, groups, order, distinct, tail);
        }
        // Rows: each shard sorts and limits (LIMIT n + m, no OFFSET); hidden sort keys are added.
        let mut keys = Vec::new();
        let mut hidden = Vec::new();
        for o in &order {
            let (expr, collate) = match &o.expr {
                Expr::Collate { expr, collation } => (&**expr, format!(" COLLATE {collation}")),
                e => (e, String::new()),
            };
            let col = match position(expr, &select.projection) {
                Some(k) => Col::Visible(k),
                None => {
                    hidden.push(expr.clone());
                    Col::Hidden(hidden.len() - 1)
                }
            };
            keys.push(OrderKey { col, suffix: format!("{collate}{}", o.options) });
        }
        let stream = if distinct { None } else { stream_plan(&q, &order, limit.as_ref(), offset.as_ref())? };
        let SetExpr::Select(select) = q.body.as_mut() else { unreachable!("checked above") };
        for (i, e) in hidden.iter().enumerate() {
            select
                .projection
                .push(SelectItem::ExprWithAlias { expr: e.clone(), alias: Ident::new(format!("sr_o{i}")) });
        }
        q.order_by = (!order.is_empty())
            .then(|| ast::OrderBy { kind: ast::OrderByKind::Expressions(order.clone()), interpolate: None });
        q.limit_clause = match (&limit, &offset) {
            (Some(l), Some(o)) => Some(limit_clause(parse_expr(&format!("({l})::int8 + ({o})::int8"))?)),
            (Some(l), None) => Some(limit_clause(l.clone())),
            _ => None,
        };
        let shard_params = shard_params(&mut q);
        Ok(CombinePlan {
            shard_sql: q.to_string(),
            shard_params,
            stream,
            hidden: hidden.len(),
            final_params: self.params,
            mode: Mode::Rows { distinct, order: keys, tail },
        })
    }

    /// `LIMIT n OFFSET m` of the final query, parameters renumbered.
    fn tail(&mut self, limit: Option<&Expr>, offset: Option<&Expr>) -> Result<String, String> {
        let mut out = String::new();
        if let Some(l) = limit {
            out.push_str(&format!(" LIMIT {}", self.final_expr(l.clone())));
        }
        if let Some(o) = offset {
            out.push_str(&format!(" OFFSET {}", self.final_expr(o.clone())));
        }
        Ok(out)
    }

    /// An expression of the final query: the client's parameters renumbered in it.
    fn final_expr(&mut self, mut e: Expr) -> Expr {
        let _ = e.visit(&mut super::split::Renumber(&mut self.params));
        e
    }

    fn groups(
        mut self,
        mut q: Query,
        groups: Vec<Expr>,
        order: Vec<ast::OrderByExpr>,
        distinct: bool,
        tail: String,
    ) -> Result<CombinePlan, String> {
        let SetExpr::Select(select) = q.body.as_mut() else { unreachable!("checked by the caller") };
        let projection = std::mem::take(&mut select.projection);
        // Group expressions, resolved (`GROUP BY 1`, `GROUP BY alias`), first in the shards' rows.
        let mut group_exprs = Vec::with_capacity(groups.len());
        for g in &groups {
            group_exprs.push(resolve(g, &projection)?.clone());
        }
        let group_text: Vec<String> = group_exprs.iter().map(|g| g.to_string()).collect();
        let mut partial: Vec<SelectItem> = group_exprs.iter().map(|g| SelectItem::UnnamedExpr(g.clone())).collect();
        let mut aggs = Vec::new();
        // DISTINCT aggregates (`count(DISTINCT x)`): each shard returns its groups' distinct x, and the final
        // query aggregates the distinct values of all shards. Every aggregate must then be over DISTINCT x.
        let mut calls: Vec<ast::Function> = Vec::new();
        let having = select.having.clone();
        for e in projection.iter().filter_map(item_expr).chain(having.as_ref()).chain(order.iter().map(|o| &o.expr)) {
            super::cross::calls(e, |f| {
                if f.over.is_none() && is_aggregate(&function_name(f)) {
                    calls.push(f.clone());
                }
            });
        }
        // Other aggregates are computed per group and distinct value on the shards, and re-aggregated.
        let distinct_calls: Vec<&ast::Function> = calls.iter().filter(|f| is_distinct(f)).collect();
        if let Some(first) = distinct_calls.first() {
            let arg = |f: &ast::Function| match &f.args {
                FunctionArguments::List(l) if l.args.len() == 1 && l.clauses.is_empty() && f.filter.is_none() => {
                    Some(l.args[0].to_string())
                }
                _ => None,
            };
            let x = arg(first);
            if x.is_none() || distinct_calls.iter().any(|f| arg(f) != x) {
                return Err("DISTINCT aggregates over different expressions (or with FILTER)".into());
            }
            let FunctionArguments::List(l) = &first.args else { unreachable!("checked") };
            let ast::FunctionArg::Unnamed(ast::FunctionArgExpr::Expr(x)) = &l.args[0] else {
                return Err("a DISTINCT aggregate of this argument".into());
            };
            self.distinct_col = Some(partial.len());
            partial.push(SelectItem::UnnamedExpr(x.clone()));
        }
        let mut items = Vec::with_capacity(projection.len());
        for item in &projection {
            let (expr, alias) = match item {
                SelectItem::UnnamedExpr(e) => (e, None),
                SelectItem::ExprWithAlias { expr, alias } => (expr, Some(alias)),
                _ => return Err("* with aggregates or GROUP BY".into()),
            };
            let pass = group_text.iter().position(|g| *g == expr.to_string());
            let template = self.rewrite(expr, &group_text, &mut partial, &mut aggs)?;
            let name = alias.map_or_else(|| figure_name(expr), fold);
            items.push(Item { template, name, pass });
        }
        let having = match select.having.take() {
            Some(h) => Some(self.rewrite(&h, &group_text, &mut partial, &mut aggs)?),
            None => None,
        };
        let mut final_order = Vec::with_capacity(order.len());
        for o in &order {
            let by_item = match &o.expr {
                Expr::Value(v) => matches!(v.value, Value::Number(..)).then(|| o.expr.to_string()),
                Expr::Identifier(id) => items.iter().position(|it| it.name == fold(id)).map(|k| (k + 1).to_string()),
                _ => None,
            };
            let key = match by_item {
                Some(k) => k,
                None => self.rewrite(&o.expr, &group_text, &mut partial, &mut aggs)?,
            };
            final_order.push(format!("{key}{}", o.options));
        }
        let grouped = group_exprs.len() + usize::from(self.distinct_col.is_some());
        select.projection = partial;
        select.group_by = GroupByExpr::Expressions(
            (1..=grouped).map(|k| Expr::Value(Value::Number(k.to_string(), false).into())).collect(),
            Vec::new(),
        );
        select.distinct = None;
        let shard_params = shard_params(&mut q);
        Ok(CombinePlan {
            shard_sql: q.to_string(),
            shard_params,
            stream: None,
            hidden: 0,
            final_params: self.params,
            mode: Mode::Groups { groups: group_exprs.len(), items, aggs, having, order: final_order, distinct, tail },
        })
    }

    /// An expression of the groups shape in final terms: grouped expressions become columns of the shards'
    /// rows (`p.c1`), aggregates become `sr_agg_<j>_` (their partials added to `partial`), parameters are
    /// renumbered. A column neither grouped nor aggregated is refused.
    fn rewrite(
        &mut self,
        e: &Expr,
        groups: &[String],
        partial: &mut Vec<SelectItem>,
        aggs: &mut Vec<Agg>,
    ) -> Result<String, String> {
        let distinct_col = self.distinct_col;
        struct R<'a> {
            distinct_col: Option<usize>,
            groups: &'a [String],
            partial: &'a mut Vec<SelectItem>,
            aggs: &'a mut Vec<Agg>,
            error: Option<String>,
        }
        impl VisitorMut for R<'_> {
            type Break = ();
            fn pre_visit_query(&mut self, _: &mut Query) -> ControlFlow<()> {
                self.error = Some("a subquery with aggregates or GROUP BY".into());
                ControlFlow::Break(())
            }
            fn pre_visit_expr(&mut self, e: &mut Expr) -> ControlFlow<()> {
                let text = e.to_string();
                if let Some(k) = self.groups.iter().position(|g| *g == text) {
                    *e = column(k);
                    return ControlFlow::Continue(());
                }
                match e {
                    Expr::Function(f) if f.over.is_none() && is_aggregate(&function_name(f)) && is_distinct(f) => {
                        let (Some(col), Some(name)) = (self.distinct_col, distinct_name(&function_name(f))) else {
                            self.error = Some(format!("{}(DISTINCT ...)", function_name(f)));
                            return ControlFlow::Break(());
                        };
                        self.aggs.push(Agg { kind: AggKind::Distinct(name), col });
                        *e = Expr::Identifier(Ident::new(format!("sr_agg_{}_", self.aggs.len() - 1)));
                    }
                    Expr::Function(f) if f.over.is_none() && is_aggregate(&function_name(f)) => match agg_partials(f) {
                        Ok((kind, parts)) => {
                            let col = self.partial.len();
                            self.partial.extend(parts.into_iter().map(SelectItem::UnnamedExpr));
                            self.aggs.push(Agg { kind, col });
                            *e = Expr::Identifier(Ident::new(format!("sr_agg_{}_", self.aggs.len() - 1)));
                        }
                        Err(why) => {
                            self.error = Some(why);
                            return ControlFlow::Break(());
                        }
                    },
                    Expr::Identifier(id) if !id.value.starts_with("sr_agg_") => {
                        self.error = Some(format!("the column {id} (neither grouped nor aggregated)"));
                        return ControlFlow::Break(());
                    }
                    Expr::CompoundIdentifier(parts) if !(parts.len() == 2 && parts[0].value == "p") => {
                        self.error = Some(format!("the column {e} (neither grouped nor aggregated)"));
                        return ControlFlow::Break(());
                    }
                    _ => {}
                }
                ControlFlow::Continue(())
            }
        }
        let mut e = e.clone();
        let mut r = R { distinct_col, groups, partial, aggs, error: None };
        let _ = e.visit(&mut r);
        if let Some(why) = r.error {
            return Err(why);
        }
        Ok(self.final_expr(e).to_string())
    }
}

/// The k-way merge of a rows-shaped read (see [`StreamPlan`]), when LIMIT and OFFSET are absent or numbers
/// and no key has a collation or an operator of its own (text keys are compared by the servers only).
fn stream_plan(
    q: &Query,
    order: &[ast::OrderByExpr],
    limit: Option<&Expr>,
    offset: Option<&Expr>,
) -> Result<Option<StreamPlan>, String> {
    let number = |e: Option<&Expr>| -> Option<Option<u64>> {
        match e {
            None => Some(None),
            Some(Expr::Value(v)) => match &v.value {
                Value::Number(n, _) => n.parse().ok().map(Some),
                _ => None,
            },
            Some(_) => None,
        }
    };
    let (Some(limit), Some(offset)) = (number(limit), number(offset)) else { return Ok(None) };
    if order.is_empty() {
        return Ok(None);
    }
    let mut keys = Vec::with_capacity(order.len());
    for o in order {
        if matches!(o.expr, Expr::Collate { .. })
            || matches!(&o.expr, Expr::Value(v) if matches!(v.value, Value::Number(..)))
        {
            return Ok(None);
        }
        let desc = match &o.options.sort {
            None | Some(ast::OrderBySort::Asc) => false,
            Some(ast::OrderBySort::Desc) => true,
            Some(ast::OrderBySort::Using(_)) => return Ok(None),
        };
        keys.push((desc, o.options.nulls_first.unwrap_or(desc)));
    }
    let mut sq = q.clone();
    let SetExpr::Select(select) = sq.body.as_mut() else { return Ok(None) };
    // An ORDER BY naming an output column by its alias: the alias means nothing in the select list.
    let aliases: Vec<String> = select
        .projection
        .iter()
        .filter_map(|i| match i {
            SelectItem::ExprWithAlias { alias, .. } => Some(fold(alias)),
            _ => None,
        })
        .collect();
    for (i, o) in order.iter().enumerate() {
        if matches!(&o.expr, Expr::Identifier(id) if aliases.contains(&fold(id))) {
            return Ok(None);
        }
        select
            .projection
            .push(SelectItem::ExprWithAlias { expr: o.expr.clone(), alias: Ident::new(format!("sr_k{i}")) });
    }
    sq.order_by = Some(ast::OrderBy { kind: ast::OrderByKind::Expressions(order.to_vec()), interpolate: None });
    sq.limit_clause =
        limit.map(|l| limit_clause(Expr::Value(Value::Number((l + offset.unwrap_or(0)).to_string(), false).into())));
    let params = shard_params(&mut sq);
    Ok(Some(StreamPlan { sql: sq.to_string(), params, keys, limit, offset: offset.unwrap_or(0) }))
}

/// Renumbers the parameters a query uses (`$1...` in order of first use); returns the client's numbers
/// (zero-based) in that order.
fn shard_params(q: &mut Query) -> Vec<usize> {
    let mut p = Planning::default();
    struct Each<'p>(&'p mut Planning);
    impl VisitorMut for Each<'_> {
        type Break = ();
        fn pre_visit_expr(&mut self, e: &mut Expr) -> ControlFlow<()> {
            if matches!(e, Expr::Value(v) if matches!(v.value, Value::Placeholder(_))) {
                *e = self.0.final_expr(e.clone());
            }
            ControlFlow::Continue(())
        }
    }
    let _ = q.visit(&mut Each(&mut p));
    p.params
}

/// `p.c<k+1>`: the k-th column of the shards' rows in the final query.
fn column(k: usize) -> Expr {
    Expr::CompoundIdentifier(vec![Ident::new("p"), Ident::new(format!("c{}", k + 1))])
}

fn is_distinct(f: &ast::Function) -> bool {
    matches!(&f.args, FunctionArguments::List(l) if l.duplicate_treatment == Some(ast::DuplicateTreatment::Distinct))
}

/// The aggregates whose DISTINCT form is combined.
fn distinct_name(name: &str) -> Option<&'static str> {
    ["count", "sum", "avg", "min", "max", "bool_and", "bool_or", "every"].into_iter().find(|n| *n == name)
}

/// An aggregate's kind and what each shard computes for it.
fn agg_partials(f: &ast::Function) -> Result<(AggKind, Vec<Expr>), String> {
    let name = function_name(f);
    let kind = match name.as_str() {
        "count" => AggKind::Count,
        "sum" => AggKind::Sum,
        "min" => AggKind::Min,
        "max" => AggKind::Max,
        "avg" => AggKind::Avg,
        "bool_and" | "every" => AggKind::BoolAnd,
        "bool_or" => AggKind::BoolOr,
        _ => return Err(format!("the aggregate {name}()")),
    };
    if let FunctionArguments::List(l) = &f.args {
        if l.duplicate_treatment == Some(ast::DuplicateTreatment::Distinct) || !l.clauses.is_empty() {
            return Err(format!("{name}(DISTINCT ...) or {name}() with ORDER BY"));
        }
    }
    let call = Expr::Function(f.clone());
    if kind != AggKind::Avg {
        return Ok((kind, vec![call]));
    }
    let renamed = |to: &str| {
        let mut g = f.clone();
        g.name = ast::ObjectName::from(vec![Ident::new(to)]);
        Expr::Function(g)
    };
    Ok((kind, vec![renamed("sum"), renamed("count")]))
}

fn has_aggregate(e: &Expr) -> bool {
    let mut found = false;
    super::cross::calls(e, |f| found |= f.over.is_none() && is_aggregate(&function_name(f)));
    found
}

fn item_expr(i: &SelectItem) -> Option<&Expr> {
    match i {
        SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } => Some(e),
        _ => None,
    }
}

/// The select-list position an ORDER BY expression names: a number, an output name, or the same expression.
fn position(e: &Expr, projection: &[SelectItem]) -> Option<usize> {
    if let Expr::Value(v) = e {
        if let Value::Number(n, _) = &v.value {
            return n.parse::<usize>().ok().and_then(|n| n.checked_sub(1)).filter(|&k| k < projection.len());
        }
    }
    if let Expr::Identifier(id) = e {
        let name = fold(id);
        if let Some(k) =
            projection.iter().position(|i| matches!(i, SelectItem::ExprWithAlias { alias, .. } if fold(alias) == name))
        {
            return Some(k);
        }
    }
    // Positions count only when every item before is one column (no `*`).
    let text = e.to_string();
    for (k, item) in projection.iter().enumerate() {
        match item_expr(item) {
            Some(x) if x.to_string() == text => return Some(k),
            Some(_) => {}
            None => return None,
        }
    }
    None
}

/// `GROUP BY 2` / `GROUP BY alias`: the select-list expression it names; else the expression itself.
fn resolve<'e>(g: &'e Expr, projection: &'e [SelectItem]) -> Result<&'e Expr, String> {
    if let Expr::Value(v) = g {
        if let Value::Number(n, _) = &v.value {
            let k = n.parse::<usize>().map_err(|_| format!("GROUP BY {n}"))?;
            return k
                .checked_sub(1)
                .and_then(|k| projection.get(k))
                .and_then(item_expr)
                .ok_or_else(|| format!("GROUP BY position {k}"));
        }
    }
    if let Expr::Identifier(id) = g {
        for item in projection {
            if let SelectItem::ExprWithAlias { expr, alias } = item {
                if fold(alias) == fold(id) {
                    return Ok(expr);
                }
            }
        }
    }
    Ok(g)
}

/// The name PostgreSQL gives a select-list expression without an alias (its `FigureColname`).
fn figure_name(e: &Expr) -> String {
    fn fig(e: &Expr) -> Option<String> {
        match e {
            Expr::Identifier(i) => Some(fold(i)),
            Expr::CompoundIdentifier(parts) => parts.last().map(fold),
            Expr::Function(f) => Some(function_name(f)),
            Expr::Nested(inner) => fig(inner),
            Expr::Cast { expr, data_type, .. } => fig(expr).or_else(|| Some(type_name(data_type))),
            Expr::Case { .. } => Some("case".into()),
            _ => None,
        }
    }
    fig(e).unwrap_or_else(|| "?column?".into())
}

/// PostgreSQL's name of a type as written in a cast.
fn type_name(t: &ast::DataType) -> String {
    let s = t.to_string().to_lowercase();
    match s.as_str() {
        "int" | "integer" | "int4" => "int4",
        "bigint" | "int8" => "int8",
        "smallint" | "int2" => "int2",
        "float" | "double precision" | "float8" => "float8",
        "real" | "float4" => "float4",
        "bool" | "boolean" => "bool",
        _ => return s.split(['(', ' ']).next().unwrap_or("?column?").to_string(),
    }
    .into()
}

fn limit_clause(limit: Expr) -> LimitClause {
    LimitClause::LimitOffset { limit: Some(limit), offset: None, limit_by: Vec::new() }
}

fn parse_expr(s: &str) -> Result<Expr, String> {
    Parser::new(&PostgreSqlDialect {}).try_with_sql(s).and_then(|mut p| p.parse_expr()).map_err(|e| e.to_string())
}

impl CombinePlan {
    /// The final query over `rows` rows of the shards' `columns`, whose values are its parameters
    /// `$k+1...` after the client's `k` = `final_params.len()`, row by row. With no rows, one row of NULLs
    /// that no clause lets through.
    pub fn final_sql(&self, columns: &[Column<'_>], rows: usize) -> Result<String, String> {
        self.final_sql_from(columns, rows, false)
    }

    /// Like [`CombinePlan::final_sql`], but the shards' rows come as one array parameter per column
    /// (`$k+1...`, typed [`array_oid`] of the column's type: see [`array_literal`]), unnested together, so that
    /// their number is not bounded by the protocol's 65,535 parameters.
    pub fn final_sql_arrays(&self, columns: &[Column<'_>]) -> Result<String, String> {
        self.final_sql_from(columns, 0, true)
    }

    fn final_sql_from(&self, columns: &[Column<'_>], rows: usize, arrays: bool) -> Result<String, String> {
        let n = columns.len();
        let visible = n.checked_sub(self.hidden).ok_or("the shards' rows have fewer columns than planned")?;
        let first = self.final_params.len() + 1;
        let names: Vec<String> = (1..=n).map(|k| format!("c{k}")).collect();
        let from = if arrays {
            let params: Vec<String> = (0..n).map(|c| format!("${}", first + c)).collect();
            format!(" FROM unnest({}) AS p({})", params.join(", "), names.join(","))
        } else {
            let mut values = String::with_capacity(rows.max(1) * n * 6);
            for r in 0..rows.max(1) {
                values.push_str(if r == 0 { "(" } else { ",(" });
                for c in 0..n {
                    if c > 0 {
                        values.push(',');
                    }
                    values.push_str(&format!("${}", first + r * n + c));
                }
                values.push(')');
            }
            format!(" FROM (VALUES {values}) AS p({}){}", names.join(","), if rows == 0 { " WHERE false" } else { "" })
        };
        // Columns with a collation of their own keep it in the final query (every use of p.cN compares under it).
        let from = if columns.iter().any(|c| c.collation.is_some()) {
            let cols: Vec<String> = columns
                .iter()
                .enumerate()
                .map(|(k, c)| match c.collation {
                    Some(coll) => format!("p.c{} COLLATE {coll} AS c{}", k + 1, k + 1),
                    None => format!("p.c{} AS c{}", k + 1, k + 1),
                })
                .collect();
            format!(" FROM (SELECT {}{from}) AS p", cols.join(", "))
        } else {
            from
        };
        match &self.mode {
            Mode::Rows { distinct, order, tail } => {
                let cols: Vec<String> = columns[..visible]
                    .iter()
                    .enumerate()
                    .map(|(k, c)| format!("p.c{} AS {}", k + 1, quote_ident(c.name)))
                    .collect();
                let keys: Vec<String> = order
                    .iter()
                    .map(|o| {
                        let k = match o.col {
                            Col::Visible(k) => k,
                            Col::Hidden(h) => visible + h,
                        };
                        format!("p.c{}{}", k + 1, o.suffix)
                    })
                    .collect();
                Ok(format!(
                    "SELECT {}{}{}{}{}",
                    if *distinct { "DISTINCT " } else { "" },
                    cols.join(", "),
                    from,
                    if keys.is_empty() { String::new() } else { format!(" ORDER BY {}", keys.join(", ")) },
                    tail
                ))
            }
            Mode::Groups { groups, items, aggs, having, order, distinct, tail } => {
                let finals: Vec<String> = aggs.iter().map(|a| agg_final(a, columns)).collect::<Result<_, _>>()?;
                let fill = |t: &str| {
                    let mut s = t.to_string();
                    for (j, f) in finals.iter().enumerate().rev() {
                        s = s.replace(&format!("sr_agg_{j}_"), f);
                    }
                    s
                };
                let cols: Vec<String> =
                    items.iter().map(|i| format!("{} AS {}", fill(&i.template), quote_ident(&i.name))).collect();
                let mut sql = format!("SELECT {}{}{}", if *distinct { "DISTINCT " } else { "" }, cols.join(", "), from);
                if *groups > 0 {
                    let g: Vec<String> = (1..=*groups).map(|k| format!("p.c{k}")).collect();
                    sql.push_str(&format!(" GROUP BY {}", g.join(", ")));
                }
                if let Some(h) = having {
                    sql.push_str(&format!(" HAVING {}", fill(h)));
                }
                if !order.is_empty() {
                    let o: Vec<String> = order.iter().map(|o| fill(o)).collect();
                    sql.push_str(&format!(" ORDER BY {}", o.join(", ")));
                }
                sql.push_str(tail);
                Ok(sql)
            }
        }
    }

    /// Where each column the client sees comes from, and its name when it is not the source's.
    pub fn sources(&self, columns: usize) -> Vec<(Source, Option<&str>)> {
        match &self.mode {
            Mode::Rows { .. } => (0..columns.saturating_sub(self.hidden)).map(|k| (Source::Partial(k), None)).collect(),
            Mode::Groups { items, .. } => items
                .iter()
                .enumerate()
                .map(|(k, i)| match i.pass {
                    Some(j) => (Source::Partial(j), Some(i.name.as_str())),
                    None => (Source::Final(k), None),
                })
                .collect(),
        }
    }
}

/// The OID of the array type of a built-in scalar type (`None` for others: their rows go as VALUES).
pub fn array_oid(type_oid: u32) -> Option<u32> {
    Some(match type_oid {
        16 => 1000,   // bool
        17 => 1001,   // bytea
        18 => 1002,   // char
        19 => 1003,   // name
        20 => 1016,   // int8
        21 => 1005,   // int2
        23 => 1007,   // int4
        25 => 1009,   // text
        26 => 1028,   // oid
        114 => 199,   // json
        700 => 1021,  // float4
        701 => 1022,  // float8
        790 => 791,   // money
        869 => 1041,  // inet
        1042 => 1014, // bpchar
        1043 => 1015, // varchar
        1082 => 1182, // date
        1083 => 1183, // time
        1114 => 1115, // timestamp
        1184 => 1185, // timestamptz
        1186 => 1187, // interval
        1266 => 1270, // timetz
        1700 => 1231, // numeric
        2950 => 2951, // uuid
        3802 => 3807, // jsonb
        _ => return None,
    })
}

/// An array literal of values in text format (`{"a","b\"c",NULL}`): every element quoted, `"` and `\`
/// escaped, NULL as NULL.
pub fn array_literal<'v>(values: impl Iterator<Item = Option<&'v [u8]>>) -> Vec<u8> {
    let mut out = vec![b'{'];
    for (i, v) in values.enumerate() {
        if i > 0 {
            out.push(b',');
        }
        match v {
            None => out.extend_from_slice(b"NULL"),
            Some(v) => {
                out.push(b'"');
                for &b in v {
                    if b == b'"' || b == b'\\' {
                        out.push(b'\\');
                    }
                    out.push(b);
                }
                out.push(b'"');
            }
        }
    }
    out.push(b'}');
    out
}

/// An aggregate's final form over the shards' partial columns, by the partials' types.
fn agg_final(a: &Agg, columns: &[Column<'_>]) -> Result<String, String> {
    let c = a.col + 1;
    let ty = columns.get(a.col).ok_or("the shards' rows have fewer columns than planned")?.type_oid;
    Ok(match a.kind {
        AggKind::Distinct(name) => format!("{name}(DISTINCT p.c{c})"),
        AggKind::Count => format!("sum(p.c{c})::int8"),
        // sum(int2/int4) is bigint; the sum of bigints would be numeric.
        AggKind::Sum if ty == INT8 => format!("sum(p.c{c})::int8"),
        AggKind::Sum => format!("sum(p.c{c})"),
        AggKind::Min => format!("min(p.c{c})"),
        AggKind::Max => format!("max(p.c{c})"),
        AggKind::BoolAnd => format!("bool_and(p.c{c})"),
        AggKind::BoolOr => format!("bool_or(p.c{c})"),
        // avg = sum / count, with PostgreSQL's own division for the type (numeric_div, float8div...).
        AggKind::Avg => {
            let n = c + 1;
            match ty {
                INT8 | NUMERIC => format!("(sum(p.c{c})::numeric / nullif(sum(p.c{n}), 0)::numeric)"),
                FLOAT8 => format!("(sum(p.c{c}) / nullif(sum(p.c{n}), 0)::float8)"),
                INTERVAL => format!("(sum(p.c{c}) / nullif(sum(p.c{n}), 0)::float8)"),
                _ => {
                    return Err(format!(
                        "avg() of a column of type OID {ty} across shards (cast it to numeric or double precision)"
                    ))
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cols<'a>(spec: &[(&'a str, u32)]) -> Vec<Column<'a>> {
        spec.iter().map(|&(name, type_oid)| Column { name, type_oid, collation: None }).collect()
    }

    #[test]
    fn aggregates_without_groups() {
        let p = plan("SELECT count(*), sum(n), avg(n) AS mean FROM t WHERE x = $1").unwrap();
        assert_eq!(p.shard_sql, "SELECT count(*), sum(n), sum(n), count(n) FROM t WHERE x = $1");
        assert!(p.final_params.is_empty());
        let f = p.final_sql(&cols(&[("count", 20), ("sum", 20), ("sum", 20), ("count", 20)]), 2).unwrap();
        assert_eq!(
            f,
            "SELECT sum(p.c1)::int8 AS \"count\", sum(p.c2)::int8 AS \"sum\", (sum(p.c3)::numeric / nullif(sum(p.c4), 0)::numeric) AS \"mean\" FROM (VALUES ($1,$2,$3,$4),($5,$6,$7,$8)) AS p(c1,c2,c3,c4)"
        );
    }

    #[test]
    fn groups_having_order_limit() {
        let p =
            plan("SELECT role, count(*) AS n FROM m GROUP BY role HAVING count(*) > $2 ORDER BY n DESC, 1 LIMIT $1")
                .unwrap();
        assert_eq!(p.shard_sql, "SELECT role, count(*), count(*) FROM m GROUP BY 1");
        assert_eq!(p.final_params, vec![0, 1]);
        let f = p.final_sql(&cols(&[("role", 25), ("count", 20), ("count", 20)]), 0).unwrap();
        assert_eq!(
            f,
            "SELECT p.c1 AS \"role\", sum(p.c2)::int8 AS \"n\" FROM (VALUES ($3,$4,$5)) AS p(c1,c2,c3) WHERE false GROUP BY p.c1 HAVING sum(p.c3)::int8 > $2 ORDER BY 2 DESC, 1 LIMIT $1"
        );
        assert_eq!(p.sources(3), vec![(Source::Partial(0), Some("role")), (Source::Final(1), None)]);
    }

    #[test]
    fn rows_order_limit_offset_hidden_keys() {
        let p =
            plan("SELECT id, name FROM users ORDER BY created_at DESC NULLS LAST, name LIMIT 10 OFFSET 20").unwrap();
        assert_eq!(
            p.shard_sql,
            "SELECT id, name, created_at AS sr_o0 FROM users ORDER BY created_at DESC NULLS LAST, name LIMIT (10)::INT8 + (20)::INT8"
        );
        assert_eq!(p.hidden, 1);
        let f = p.final_sql(&cols(&[("id", 20), ("name", 25), ("sr_o0", 1184)]), 1).unwrap();
        assert_eq!(
            f,
            "SELECT p.c1 AS \"id\", p.c2 AS \"name\" FROM (VALUES ($1,$2,$3)) AS p(c1,c2,c3) ORDER BY p.c3 DESC NULLS LAST, p.c2 LIMIT 10 OFFSET 20"
        );
    }

    #[test]
    fn distinct_aggregates() {
        let p = plan("SELECT role, count(DISTINCT user_id), sum(DISTINCT user_id) FROM m GROUP BY role").unwrap();
        assert_eq!(p.shard_sql, "SELECT role, user_id FROM m GROUP BY 1, 2");
        let f = p.final_sql_arrays(&cols(&[("role", 25), ("user_id", 20)])).unwrap();
        assert_eq!(
            f,
            "SELECT p.c1 AS \"role\", count(DISTINCT p.c2) AS \"count\", sum(DISTINCT p.c2) AS \"sum\" FROM unnest($1, $2) AS p(c1,c2) GROUP BY p.c1"
        );
        let p = plan("SELECT count(DISTINCT a), count(*), max(b) FROM m").unwrap();
        assert_eq!(p.shard_sql, "SELECT a, count(*), max(b) FROM m GROUP BY 1");
        assert!(plan("SELECT count(DISTINCT a), count(DISTINCT b) FROM m").is_err());
    }

    #[test]
    fn rows_as_arrays() {
        let p = plan("SELECT id FROM t ORDER BY id LIMIT 5").unwrap();
        assert_eq!(
            p.final_sql_arrays(&cols(&[("id", 20)])).unwrap(),
            "SELECT p.c1 AS \"id\" FROM unnest($1) AS p(c1) ORDER BY p.c1 LIMIT 5"
        );
        let vals: Vec<Option<&[u8]>> = vec![Some(b"a\"b"), None, Some(b"c\\d"), Some(b"NULL"), Some(b"")];
        assert_eq!(array_literal(vals.into_iter()), b"{\"a\\\"b\",NULL,\"c\\\\d\",\"NULL\",\"\"}".to_vec());
    }

    #[test]
    fn expressions_over_aggregates_and_names() {
        let p = plan("SELECT max(x) - min(x), sum(x)::float / count(*), count(*)::int FROM t").unwrap();
        let f = p.final_sql(&cols(&[("max", 23), ("min", 23), ("sum", 20), ("count", 20), ("count", 20)]), 1).unwrap();
        assert!(f.starts_with("SELECT max(p.c1) - min(p.c2) AS \"?column?\", sum(p.c3)::int8::FLOAT / sum(p.c4)::int8 AS \"?column?\", sum(p.c5)::int8::INT AS \"count\""), "{f}");
        assert!(plan("SELECT name, count(*) FROM t GROUP BY role").is_err());
    }
}
