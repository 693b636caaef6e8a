//! The console's SQL engine: a PostgreSQL-dialect query, parsed by
//! sqlparser, is typed and translated into SQLite's dialect, then run over
//! the views loaded into an in-memory SQLite (rusqlite, which the witness
//! already uses). Casts, `$n` parameters, now(), date_trunc, extract and
//! interval arithmetic are translated to the functions of
//! `admin::functions`; result columns carry the PostgreSQL type of the view
//! column or of the expression, fixed when the query is prepared so that
//! Describe and Execute agree.

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::time::SystemTime;

use rusqlite::types::Value;
use rusqlite::Connection;
use sqlparser::ast::{
    self, BinaryOperator, Expr, Function, FunctionArg, FunctionArgExpr, FunctionArgumentList,
    FunctionArguments, Ident, ObjectName, ObjectNamePart, SelectItem, SetExpr, Statement,
    UnaryOperator, Value as SqlValue,
};

use crate::admin::functions;
use crate::admin::view::{Cell, RowSet, SqlType};

/// A view as the SQL engine knows it: where it lives and its columns.
#[derive(Debug, Clone)]
pub struct TableDef {
    pub schema: &'static str,
    pub name: &'static str,
    pub columns: Vec<(&'static str, SqlType)>,
}

impl TableDef {
    pub fn qualified_name(&self) -> String {
        format!("{}.{}", self.schema, self.name)
    }
}

/// Why a query cannot run: a message and its SQLSTATE.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct SqlError {
    pub code: &'static str,
    pub message: String,
}

fn error(code: &'static str, message: impl Into<String>) -> SqlError {
    SqlError {
        code,
        message: message.into(),
    }
}

/// A query ready to run: its SQLite text, the views it reads, its result
/// columns and its parameters' types.
#[derive(Debug, Clone, PartialEq)]
pub struct Prepared {
    sqlite: String,
    /// Qualified names of the views it reads.
    pub tables: Vec<String>,
    pub columns: Vec<(String, SqlType)>,
    /// One per `$n`, by position; Text where nothing says otherwise.
    pub params: Vec<SqlType>,
}

/// A value's type as the translation tracks it: a column type, or an
/// interval (seconds, shown as float8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Sql(SqlType),
    Interval,
}

/// Prepares one SELECT (or VALUES, or a query with WITH) over `catalog`.
pub fn prepare(query: ast::Query, catalog: &[TableDef]) -> Result<Prepared, SqlError> {
    let mut statement = Statement::Query(Box::new(query));
    let tables = referenced_tables(&statement, catalog)?;
    let scope: BTreeMap<String, SqlType> = catalog
        .iter()
        .filter(|def| tables.contains(&def.qualified_name()))
        .flat_map(|def| def.columns.iter().map(|(name, ty)| (name.to_string(), *ty)))
        .collect();
    let names = projection_names(&statement);
    let mut params = BTreeMap::new();
    let mut failure = None;
    let _ = ast::visit_expressions_mut(&mut statement, |expr| {
        if let Err(err) = rewrite(expr, &scope, &mut params) {
            failure = Some(err);
            return ControlFlow::Break(());
        }
        ControlFlow::Continue(())
    });
    if let Some(err) = failure {
        return Err(err);
    }
    let inferred = name_projection(&mut statement, &names, &scope);
    let sqlite = statement.to_string();
    let connection = engine(catalog, SystemTime::now(), "")?;
    let prepared = connection.prepare(&sqlite).map_err(sqlite_error)?;
    let columns = prepared
        .columns()
        .iter()
        .enumerate()
        .map(|(at, column)| {
            let declared = column.decl_type().and_then(SqlType::from_declared);
            let ty = declared
                .or_else(|| {
                    inferred
                        .as_ref()
                        .and_then(|types| types.get(at).copied().flatten())
                })
                .unwrap_or(SqlType::Text);
            (column.name().to_string(), ty)
        })
        .collect();
    let count = params.keys().next_back().copied().unwrap_or(0);
    let params = (1..=count)
        .map(|at| params.get(&at).copied().unwrap_or(SqlType::Text))
        .collect();
    Ok(Prepared {
        sqlite,
        tables,
        columns,
        params,
    })
}

/// Runs a prepared query over the views' rows (`data` by qualified name)
/// with the parameters bound in order.
pub fn execute(
    prepared: &Prepared,
    catalog: &[TableDef],
    data: &BTreeMap<String, RowSet>,
    params: Vec<Value>,
    user: &str,
) -> Result<RowSet, SqlError> {
    let connection = engine(catalog, SystemTime::now(), user)?;
    for (name, rows) in data {
        load(&connection, name, rows)?;
    }
    let mut statement = connection.prepare(&prepared.sqlite).map_err(sqlite_error)?;
    let width = prepared.columns.len();
    let mut rows = statement
        .query(rusqlite::params_from_iter(params))
        .map_err(sqlite_error)?;
    let mut out = Vec::new();
    while let Some(row) = rows.next().map_err(sqlite_error)? {
        let mut cells = Vec::with_capacity(width);
        for (at, (_, ty)) in prepared.columns.iter().enumerate() {
            let value: Value = row.get(at).map_err(sqlite_error)?;
            cells.push(cell(value, *ty));
        }
        out.push(cells);
    }
    Ok(RowSet {
        columns: prepared.columns.clone(),
        rows: out,
    })
}

/// An in-memory SQLite with the console's schemas, every view's table
/// (empty) and the PostgreSQL functions.
fn engine(catalog: &[TableDef], now: SystemTime, user: &str) -> Result<Connection, SqlError> {
    let connection = Connection::open_in_memory().map_err(sqlite_error)?;
    functions::register(&connection, now, user).map_err(sqlite_error)?;
    let mut schemas: Vec<&str> = catalog.iter().map(|def| def.schema).collect();
    schemas.dedup();
    let mut ddl = String::from("PRAGMA case_sensitive_like = ON;");
    for schema in schemas {
        ddl.push_str(&format!("ATTACH DATABASE ':memory:' AS \"{schema}\";"));
    }
    for def in catalog {
        let columns: Vec<String> = def
            .columns
            .iter()
            .map(|(name, ty)| format!("\"{name}\" {}", ty.declared()))
            .collect();
        ddl.push_str(&format!(
            "CREATE TABLE \"{}\".\"{}\" ({});",
            def.schema,
            def.name,
            columns.join(", ")
        ));
    }
    connection.execute_batch(&ddl).map_err(sqlite_error)?;
    Ok(connection)
}

fn load(connection: &Connection, qualified: &str, rows: &RowSet) -> Result<(), SqlError> {
    let (schema, name) = qualified.split_once('.').unwrap_or(("main", qualified));
    let Some(width) = rows.rows.first().map(Vec::len) else {
        return Ok(());
    };
    let marks = vec!["?"; width].join(", ");
    let mut insert = connection
        .prepare(&format!(
            "INSERT INTO \"{schema}\".\"{name}\" VALUES ({marks})"
        ))
        .map_err(sqlite_error)?;
    for row in &rows.rows {
        insert
            .execute(rusqlite::params_from_iter(row.iter().map(value)))
            .map_err(sqlite_error)?;
    }
    Ok(())
}

/// A view cell as SQLite holds it.
fn value(cell: &Cell) -> Value {
    match cell {
        Cell::Null => Value::Null,
        Cell::Bool(value) => Value::Integer(i64::from(*value)),
        Cell::Int4(value) => Value::Integer(i64::from(*value)),
        Cell::Int8(value) => Value::Integer(*value),
        Cell::Float8(value) => Value::Real(*value),
        Cell::Text(value) | Cell::Timestamptz(value) => Value::Text(value.clone()),
    }
}

/// A SQLite value as a cell of the column's type; a value SQLite's dynamic
/// typing left in another type becomes what PostgreSQL would print.
fn cell(value: Value, ty: SqlType) -> Cell {
    let as_text = |value: Value| match value {
        Value::Null => Cell::Null,
        Value::Integer(number) => Cell::Text(number.to_string()),
        Value::Real(number) => Cell::Text(number.to_string()),
        Value::Text(text) => Cell::Text(text),
        Value::Blob(bytes) => Cell::Text(String::from_utf8_lossy(&bytes).into_owned()),
    };
    match (ty, value) {
        (_, Value::Null) => Cell::Null,
        (SqlType::Bool, Value::Integer(number)) => Cell::Bool(number != 0),
        (SqlType::Int4, Value::Integer(number)) => {
            i32::try_from(number).map_or(Cell::Int8(number), Cell::Int4)
        }
        (SqlType::Int8, Value::Integer(number)) => Cell::Int8(number),
        (SqlType::Int4 | SqlType::Int8, Value::Real(number)) => Cell::Int8(number.round() as i64),
        (SqlType::Float8, Value::Integer(number)) => Cell::Float8(number as f64),
        (SqlType::Float8, Value::Real(number)) => Cell::Float8(number),
        (SqlType::Timestamptz, Value::Text(text)) => Cell::Timestamptz(text),
        (_, other) => as_text(other),
    }
}

fn sqlite_error(err: rusqlite::Error) -> SqlError {
    let message = match &err {
        rusqlite::Error::SqliteFailure(_, Some(message)) => message.clone(),
        rusqlite::Error::UserFunctionError(inner) => inner.to_string(),
        other => other.to_string(),
    };
    // SQLite's words for the mistakes PostgreSQL has codes for.
    let code = if message.starts_with("no such column") {
        "42703"
    } else if message.starts_with("no such function") {
        "42883"
    } else if message.contains("syntax error") {
        "42601"
    } else {
        "22023"
    };
    error(code, message)
}

/// The views a query reads, checked against the catalog; unqualified names
/// resolve as on the search path `sys, pgmirror`.
fn referenced_tables(statement: &Statement, catalog: &[TableDef]) -> Result<Vec<String>, SqlError> {
    let mut ctes = Vec::new();
    if let Statement::Query(query) = statement {
        if let Some(with) = &query.with {
            ctes.extend(
                with.cte_tables
                    .iter()
                    .map(|cte| cte.alias.name.value.to_lowercase()),
            );
        }
    }
    let mut tables = Vec::new();
    let mut missing = None;
    let _ = ast::visit_relations(statement, |name| {
        let parts: Vec<String> = name
            .0
            .iter()
            .map(|part| match part {
                ObjectNamePart::Identifier(ident) => ident.value.to_lowercase(),
                ObjectNamePart::Function(function) => function.name.value.to_lowercase(),
            })
            .collect();
        let found = match parts.as_slice() {
            [schema, table] => catalog
                .iter()
                .find(|def| def.schema == schema && def.name == table),
            [table] if ctes.contains(table) => return ControlFlow::Continue(()),
            [table] => catalog.iter().find(|def| def.name == table),
            _ => None,
        };
        match found {
            Some(def) => {
                let qualified = def.qualified_name();
                if !tables.contains(&qualified) {
                    tables.push(qualified);
                }
                ControlFlow::Continue(())
            }
            None => {
                missing = Some(name.to_string());
                ControlFlow::Break(())
            }
        }
    });
    if let Some(name) = missing {
        let known: Vec<String> = catalog.iter().map(TableDef::qualified_name).collect();
        return Err(error(
            "42P01",
            format!(
                "relation \"{name}\" does not exist; the console's views are {}",
                known.join(", ")
            ),
        ));
    }
    Ok(tables)
}

/// The top-level SELECT of a query, where its result columns are named.
fn top_select(statement: &mut Statement) -> Option<&mut ast::Select> {
    let Statement::Query(query) = statement else {
        return None;
    };
    match query.body.as_mut() {
        SetExpr::Select(select) => Some(select),
        _ => None,
    }
}

/// Names of the top-level projection's unnamed expressions, as PostgreSQL
/// names them (its FigureColname): a column's name, a function's name,
/// else `?column?`. Taken before the translation renames functions.
fn projection_names(statement: &Statement) -> Vec<Option<String>> {
    let mut statement = statement.clone();
    top_select(&mut statement)
        .map(|select| {
            select
                .projection
                .iter()
                .map(|item| match item {
                    SelectItem::UnnamedExpr(expr) => {
                        Some(figure_name(expr).unwrap_or_else(|| "?column?".into()))
                    }
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default()
}

fn figure_name(expr: &Expr) -> Option<String> {
    match expr {
        Expr::Identifier(ident) => Some(ident.value.clone()),
        Expr::CompoundIdentifier(idents) => idents.last().map(|ident| ident.value.clone()),
        Expr::Function(function) => function_name(&function.name),
        Expr::Cast {
            expr, data_type, ..
        } => figure_name(expr).or_else(|| Some(type_name(data_type))),
        Expr::Nested(inner) => figure_name(inner),
        Expr::Extract { .. } => Some("extract".into()),
        Expr::Case { .. } => Some("case".into()),
        _ => None,
    }
}

/// Names the top-level projection's unnamed expressions (as
/// [`projection_names`] found them) and returns each item's type, or None
/// when the projection has a wildcard (SQLite's declared types then tell).
fn name_projection(
    statement: &mut Statement,
    names: &[Option<String>],
    scope: &BTreeMap<String, SqlType>,
) -> Option<Vec<Option<SqlType>>> {
    let select = top_select(statement)?;
    let mut types = Vec::new();
    let mut wildcard = false;
    for (item, name) in select.projection.iter_mut().zip(names) {
        match item {
            SelectItem::UnnamedExpr(expr) => {
                types.push(sql_type(infer(expr, scope)));
                if let Some(name) = name {
                    *item = SelectItem::ExprWithAlias {
                        expr: expr.clone(),
                        alias: Ident::with_quote('"', name),
                    };
                }
            }
            SelectItem::ExprWithAlias { expr, .. } => types.push(sql_type(infer(expr, scope))),
            _ => wildcard = true,
        }
    }
    (!wildcard).then_some(types)
}

fn sql_type(kind: Option<Kind>) -> Option<SqlType> {
    kind.map(|kind| match kind {
        Kind::Sql(ty) => ty,
        Kind::Interval => SqlType::Float8,
    })
}

fn function_name(name: &ObjectName) -> Option<String> {
    match name.0.last()? {
        ObjectNamePart::Identifier(ident) => Some(ident.value.to_lowercase()),
        ObjectNamePart::Function(function) => Some(function.name.value.to_lowercase()),
    }
}

fn type_name(data_type: &ast::DataType) -> String {
    data_type.to_string().to_lowercase()
}

/// What a cast to `data_type` becomes: the translation's function for it.
fn cast_function(data_type: &ast::DataType) -> Result<&'static str, SqlError> {
    let name = type_name(data_type);
    let base = name.split('(').next().unwrap_or_default().trim();
    Ok(match base {
        "int" | "integer" | "int4" | "smallint" | "int2" => "pg_int4",
        "bigint" | "int8" => "pg_int8",
        "real" | "float" | "float4" | "float8" | "double" | "double precision" | "numeric"
        | "decimal" => "pg_float8",
        "text" | "varchar" | "character varying" | "char" | "character" | "name" | "string" => {
            "pg_text"
        }
        "boolean" | "bool" => "pg_bool",
        "interval" => "pg_interval",
        other if other.starts_with("timestamp") || other == "date" => "pg_timestamptz",
        other => {
            return Err(error(
                "42704",
                format!(
                    "type \"{other}\" is not supported by the console; casts to int, bigint, \
                     float8, numeric, text, boolean, timestamptz, date and interval are"
                ),
            ))
        }
    })
}

fn call(name: &str, args: Vec<Expr>) -> Expr {
    Expr::Function(Function {
        name: ObjectName(vec![ObjectNamePart::Identifier(Ident::new(name))]),
        uses_odbc_syntax: false,
        parameters: FunctionArguments::None,
        args: FunctionArguments::List(FunctionArgumentList {
            duplicate_treatment: None,
            args: args
                .into_iter()
                .map(|arg| FunctionArg::Unnamed(FunctionArgExpr::Expr(arg)))
                .collect(),
            clauses: Vec::new(),
        }),
        filter: None,
        null_treatment: None,
        over: None,
        within_group: Vec::new(),
    })
}

fn string(text: String) -> Expr {
    Expr::value(SqlValue::SingleQuotedString(text))
}

fn function_args(function: &Function) -> Vec<&Expr> {
    match &function.args {
        FunctionArguments::List(list) => list
            .args
            .iter()
            .filter_map(|arg| match arg {
                FunctionArg::Unnamed(FunctionArgExpr::Expr(expr)) => Some(expr),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

fn is_string_literal(expr: &Expr) -> bool {
    matches!(
        expr,
        Expr::Value(value) if matches!(value.value, SqlValue::SingleQuotedString(_))
    )
}

/// The `n` of a `$n` placeholder (already translated to `?n`).
fn placeholder(expr: &Expr) -> Option<usize> {
    let Expr::Value(value) = expr else {
        return None;
    };
    let SqlValue::Placeholder(text) = &value.value else {
        return None;
    };
    text.strip_prefix('?')?.parse().ok()
}

/// The type of an expression already translated, as far as it is known.
fn infer(expr: &Expr, scope: &BTreeMap<String, SqlType>) -> Option<Kind> {
    use SqlType::*;
    match expr {
        Expr::Identifier(ident) => scope
            .get(&ident.value.to_lowercase())
            .map(|t| Kind::Sql(*t)),
        Expr::CompoundIdentifier(idents) => idents
            .last()
            .and_then(|ident| scope.get(&ident.value.to_lowercase()))
            .map(|t| Kind::Sql(*t)),
        Expr::Value(value) => match &value.value {
            SqlValue::Number(text, _) => Some(Kind::Sql(match text.parse::<i64>() {
                Ok(number) if i32::try_from(number).is_ok() => Int4,
                Ok(_) => Int8,
                Err(_) => Float8,
            })),
            SqlValue::Boolean(_) => Some(Kind::Sql(Bool)),
            SqlValue::SingleQuotedString(_) => Some(Kind::Sql(Text)),
            _ => None,
        },
        Expr::Nested(inner) => infer(inner, scope),
        // sqlparser's own forms of floor() and ceil().
        Expr::Floor { .. } | Expr::Ceil { .. } => Some(Kind::Sql(Float8)),
        Expr::UnaryOp { op, expr } => match op {
            UnaryOperator::Not => Some(Kind::Sql(Bool)),
            _ => infer(expr, scope),
        },
        Expr::IsNull(_)
        | Expr::IsNotNull(_)
        | Expr::IsTrue(_)
        | Expr::IsFalse(_)
        | Expr::In { .. }
        | Expr::Between { .. }
        | Expr::Like { .. }
        | Expr::ILike { .. }
        | Expr::Exists { .. } => Some(Kind::Sql(Bool)),
        Expr::Case {
            conditions,
            else_result,
            ..
        } => conditions
            .iter()
            .map(|when| &when.result)
            .chain(else_result.as_deref())
            .find_map(|result| infer(result, scope)),
        Expr::BinaryOp { left, op, right } => match op {
            BinaryOperator::Plus
            | BinaryOperator::Minus
            | BinaryOperator::Multiply
            | BinaryOperator::Divide
            | BinaryOperator::Modulo => {
                let (left, right) = (infer(left, scope), infer(right, scope));
                [Float8, Int8, Int4]
                    .into_iter()
                    .find(|ty| left == Some(Kind::Sql(*ty)) || right == Some(Kind::Sql(*ty)))
                    .map(Kind::Sql)
                    .or(left)
            }
            BinaryOperator::StringConcat => Some(Kind::Sql(Text)),
            _ => Some(Kind::Sql(Bool)),
        },
        Expr::Function(function) => {
            let name = function_name(&function.name)?;
            let first = function_args(function)
                .first()
                .and_then(|arg| infer(arg, scope));
            Some(match name.as_str() {
                "count" | "pg_int8" => Kind::Sql(Int8),
                "pg_int4" | "length" | "char_length" => Kind::Sql(Int4),
                "sum" => match first {
                    Some(Kind::Sql(Int4 | Int8)) => Kind::Sql(Int8),
                    _ => Kind::Sql(Float8),
                },
                "avg" | "pg_float8" | "pg_extract" | "pg_ts_diff" | "floor" | "ceil"
                | "ceiling" | "round" => Kind::Sql(Float8),
                "pg_interval" => Kind::Interval,
                "now"
                | "pg_now"
                | "transaction_timestamp"
                | "statement_timestamp"
                | "clock_timestamp"
                | "pg_timestamptz"
                | "to_timestamp"
                | "date_trunc"
                | "pg_ts_add" => Kind::Sql(Timestamptz),
                "pg_bool" => Kind::Sql(Bool),
                "min" | "max" | "coalesce" | "abs" => first?,
                _ => Kind::Sql(Text),
            })
        }
        _ => None,
    }
}

/// Translates one expression (its operands already translated) from
/// PostgreSQL's dialect to SQLite's, noting parameter types on the way.
fn rewrite(
    expr: &mut Expr,
    scope: &BTreeMap<String, SqlType>,
    params: &mut BTreeMap<usize, SqlType>,
) -> Result<(), SqlError> {
    let replacement = match expr {
        Expr::Value(value) => {
            if let SqlValue::Placeholder(text) = &mut value.value {
                let number: usize = text
                    .strip_prefix('$')
                    .and_then(|digits| digits.parse().ok())
                    .filter(|n| (1..=65_535).contains(n))
                    .ok_or_else(|| error("42P02", format!("invalid parameter {text}")))?;
                params.entry(number).or_insert(SqlType::Text);
                *text = format!("?{number}");
            }
            None
        }
        Expr::Cast {
            expr: inner,
            data_type,
            ..
        } => Some(call(cast_function(data_type)?, vec![(**inner).clone()])),
        Expr::Interval(interval) => {
            let value = match interval.value.as_ref() {
                Expr::Value(value) => match &value.value {
                    SqlValue::SingleQuotedString(text) | SqlValue::Number(text, _) => text.clone(),
                    _ => return Err(error("22007", "an interval needs a quoted value")),
                },
                _ => return Err(error("22007", "an interval needs a quoted value")),
            };
            let text = match &interval.leading_field {
                Some(field) => format!("{value} {field}"),
                None => value,
            };
            Some(call("pg_interval", vec![string(text)]))
        }
        Expr::Extract {
            field, expr: inner, ..
        } => Some(call(
            "pg_extract",
            vec![string(field.to_string().to_lowercase()), (**inner).clone()],
        )),
        Expr::Function(function) => {
            let name = function_name(&function.name).unwrap_or_default();
            let renamed = match name.as_str() {
                "current_timestamp" | "localtimestamp" => Some("pg_now"),
                "current_user" | "session_user" | "user" => Some("pg_current_user"),
                "string_agg" => Some("group_concat"),
                _ => None,
            };
            // pg_catalog.now() is now(); a bare CURRENT_TIMESTAMP gets
            // parentheses, or SQLite would read its own keyword.
            let bare = matches!(function.args, FunctionArguments::None);
            if renamed.is_some() || function.name.0.len() > 1 || bare {
                let name = renamed.map(str::to_string).unwrap_or(name);
                let args = function_args(function).into_iter().cloned().collect();
                let mut replacement = call(&name, args);
                if let (Expr::Function(new), FunctionArguments::List(old)) =
                    (&mut replacement, &function.args)
                {
                    new.args = FunctionArguments::List(old.clone());
                }
                Some(replacement)
            } else {
                None
            }
        }
        Expr::ILike {
            negated,
            any,
            expr: inner,
            pattern,
            escape_char,
        } => Some(Expr::Like {
            negated: *negated,
            any: *any,
            expr: inner.clone(),
            pattern: pattern.clone(),
            escape_char: escape_char.clone(),
        }),
        Expr::BinaryOp { left, op, right } => {
            let (left_kind, right_kind) = (infer(left, scope), infer(right, scope));
            let timestamp = Some(Kind::Sql(SqlType::Timestamptz));
            match op {
                BinaryOperator::Plus | BinaryOperator::Minus
                    if left_kind == timestamp && right_kind == timestamp =>
                {
                    (*op == BinaryOperator::Minus)
                        .then(|| call("pg_ts_diff", vec![(**left).clone(), (**right).clone()]))
                }
                BinaryOperator::Plus | BinaryOperator::Minus
                    if left_kind == timestamp && right_kind == Some(Kind::Interval) =>
                {
                    let seconds = if *op == BinaryOperator::Minus {
                        Expr::UnaryOp {
                            op: UnaryOperator::Minus,
                            expr: Box::new(Expr::Nested(right.clone())),
                        }
                    } else {
                        (**right).clone()
                    };
                    Some(call("pg_ts_add", vec![(**left).clone(), seconds]))
                }
                BinaryOperator::Plus
                    if left_kind == Some(Kind::Interval) && right_kind == timestamp =>
                {
                    Some(call("pg_ts_add", vec![(**right).clone(), (**left).clone()]))
                }
                BinaryOperator::Eq
                | BinaryOperator::NotEq
                | BinaryOperator::Lt
                | BinaryOperator::LtEq
                | BinaryOperator::Gt
                | BinaryOperator::GtEq => {
                    coerce(left, right_kind, params);
                    coerce(right, left_kind, params);
                    None
                }
                _ => None,
            }
        }
        Expr::Between {
            expr: inner,
            low,
            high,
            ..
        } => {
            let kind = infer(inner, scope);
            coerce(low, kind, params);
            coerce(high, kind, params);
            None
        }
        Expr::In {
            expr: inner,
            target: ast::InTarget::List(list),
            ..
        } => {
            let kind = infer(inner, scope);
            for item in list {
                coerce(item, kind, params);
            }
            None
        }
        _ => None,
    };
    if let Some(replacement) = replacement {
        *expr = replacement;
    }
    Ok(())
}

/// An operand compared with a value of type `other`: a parameter takes
/// that type, and a string or parameter compared with a timestamp is read
/// as one, as PostgreSQL resolves an unknown-typed literal.
fn coerce(operand: &mut Expr, other: Option<Kind>, params: &mut BTreeMap<usize, SqlType>) {
    let Some(Kind::Sql(ty)) = other else {
        return;
    };
    if let Some(number) = placeholder(operand) {
        params.insert(number, ty);
    }
    if ty == SqlType::Timestamptz && (is_string_literal(operand) || placeholder(operand).is_some())
    {
        *operand = call("pg_timestamptz", vec![operand.clone()]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlparser::dialect::PostgreSqlDialect;
    use sqlparser::parser::Parser;

    fn catalog() -> Vec<TableDef> {
        vec![
            TableDef {
                schema: "sys",
                name: "database_mirroring",
                columns: vec![
                    ("database_name", SqlType::Text),
                    ("server_name", SqlType::Text),
                    ("mirroring_role_desc", SqlType::Text),
                    ("mirroring_role_sequence", SqlType::Int8),
                    ("peer_connected", SqlType::Bool),
                ],
            },
            TableDef {
                schema: "sys",
                name: "database_mirroring_history",
                columns: vec![
                    ("time", SqlType::Timestamptz),
                    ("database_name", SqlType::Text),
                    ("source", SqlType::Text),
                    ("send_queue_bytes", SqlType::Int8),
                ],
            },
        ]
    }

    fn data() -> BTreeMap<String, RowSet> {
        let t = |text: &str| {
            Cell::Timestamptz(functions::timestamp_text(
                functions::parse_timestamp(text).unwrap(),
            ))
        };
        BTreeMap::from([
            (
                "sys.database_mirroring".to_string(),
                RowSet {
                    columns: Vec::new(),
                    rows: vec![
                        vec![
                            Cell::Text("demo".into()),
                            Cell::Text("alpha".into()),
                            Cell::Text("PRINCIPAL".into()),
                            Cell::Int8(3),
                            Cell::Bool(true),
                        ],
                        vec![
                            Cell::Text("demo".into()),
                            Cell::Text("beta".into()),
                            Cell::Text("MIRROR".into()),
                            Cell::Int8(3),
                            Cell::Bool(true),
                        ],
                    ],
                },
            ),
            (
                "sys.database_mirroring_history".to_string(),
                RowSet {
                    columns: Vec::new(),
                    rows: vec![
                        vec![
                            t("2026-11-26 16:00:10Z"),
                            Cell::Text("demo".into()),
                            Cell::Text("alpha".into()),
                            Cell::Int8(100),
                        ],
                        vec![
                            t("2026-11-26 16:00:40Z"),
                            Cell::Text("demo".into()),
                            Cell::Text("alpha".into()),
                            Cell::Int8(300),
                        ],
                        vec![
                            t("2026-11-26 16:01:10Z"),
                            Cell::Text("demo".into()),
                            Cell::Text("alpha".into()),
                            Cell::Int8(50),
                        ],
                        vec![
                            t("2026-11-26 18:00:00Z"),
                            Cell::Text("demo".into()),
                            Cell::Text("alpha".into()),
                            Cell::Int8(9),
                        ],
                    ],
                },
            ),
        ])
    }

    fn run(sql: &str, params: Vec<Value>) -> Result<RowSet, SqlError> {
        let statement = Parser::parse_sql(&PostgreSqlDialect {}, sql)
            .unwrap()
            .remove(0);
        let Statement::Query(query) = statement else {
            panic!("not a query");
        };
        let prepared = prepare(*query, &catalog())?;
        execute(&prepared, &catalog(), &data(), params, "admin")
    }

    #[test]
    fn select_1_is_named_and_typed_as_postgresql_does() {
        let result = run("SELECT 1", Vec::new()).unwrap();
        assert_eq!(
            result.columns,
            vec![("?column?".to_string(), SqlType::Int4)]
        );
        assert_eq!(result.rows, vec![vec![Cell::Int4(1)]]);
        let result = run("SELECT version(), now(), current_database()", Vec::new()).unwrap();
        let names: Vec<&str> = result.columns.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["version", "now", "current_database"]);
        assert_eq!(result.columns[1].1, SqlType::Timestamptz);
    }

    #[test]
    fn projections_filters_order_limits_and_aggregates() {
        let result = run(
            "SELECT server_name, mirroring_role_desc FROM sys.database_mirroring \
             WHERE database_name = 'demo' AND peer_connected ORDER BY server_name DESC LIMIT 1",
            Vec::new(),
        )
        .unwrap();
        assert_eq!(
            result.rows,
            vec![vec![Cell::Text("beta".into()), Cell::Text("MIRROR".into())]]
        );
        let result = run(
            "SELECT count(*), max(mirroring_role_sequence) AS epoch FROM database_mirroring",
            Vec::new(),
        )
        .unwrap();
        assert_eq!(
            result.columns,
            vec![
                ("count".to_string(), SqlType::Int8),
                ("epoch".to_string(), SqlType::Int8)
            ]
        );
        assert_eq!(result.rows, vec![vec![Cell::Int8(2), Cell::Int8(3)]]);
    }

    #[test]
    fn grafana_time_series_over_the_history() {
        let result = run(
            "SELECT date_trunc('minute', time) AS \"time\", sum(send_queue_bytes) AS queue \
             FROM sys.database_mirroring_history \
             WHERE time BETWEEN '2026-11-26T16:00:00Z' AND '2026-11-26T17:00:00Z'::timestamptz \
               AND time > now() - interval '10 years' \
             GROUP BY 1 ORDER BY 1",
            Vec::new(),
        )
        .unwrap();
        assert_eq!(result.columns[0].1, SqlType::Timestamptz);
        assert_eq!(
            result.rows,
            vec![
                vec![
                    Cell::Timestamptz("2026-11-26 16:00:00.000000+00".into()),
                    Cell::Int8(400)
                ],
                vec![
                    Cell::Timestamptz("2026-11-26 16:01:00.000000+00".into()),
                    Cell::Int8(50)
                ],
            ]
        );
        let result = run(
            "SELECT extract(epoch from time)::bigint AS t FROM sys.database_mirroring_history \
             WHERE time >= $1 ORDER BY t LIMIT 1",
            vec![Value::Text("2026-11-26 17:00:00+00".into())],
        )
        .unwrap();
        assert_eq!(result.rows, vec![vec![Cell::Int8(1_795_716_000)]]);
    }

    #[test]
    fn grafana_time_group_alias_buckets_by_epoch() {
        // $__timeGroupAlias(time, 1m) expands to this.
        let result = run(
            "SELECT floor(extract(epoch from time)/60)*60 AS \"time\", avg(send_queue_bytes) \
             FROM sys.database_mirroring_history GROUP BY 1 ORDER BY 1",
            Vec::new(),
        )
        .unwrap();
        assert_eq!(result.columns[0].1, SqlType::Float8);
        assert_eq!(
            result.rows[0],
            vec![Cell::Float8(1_795_708_800.0), Cell::Float8(200.0)]
        );
        assert_eq!(result.rows.len(), 3);
    }

    #[test]
    fn parameters_take_the_type_of_what_they_are_compared_with() {
        let statement = Parser::parse_sql(
            &PostgreSqlDialect {},
            "SELECT server_name FROM sys.database_mirroring m JOIN sys.database_mirroring_history h \
             ON h.source = m.server_name WHERE m.mirroring_role_sequence = $2 AND h.time > $1",
        )
        .unwrap()
        .remove(0);
        let Statement::Query(query) = statement else {
            panic!()
        };
        let prepared = prepare(*query, &catalog()).unwrap();
        assert_eq!(prepared.params, vec![SqlType::Timestamptz, SqlType::Int8]);
        let result = execute(
            &prepared,
            &catalog(),
            &data(),
            vec![
                Value::Text("2026-11-26T17:00:00Z".into()),
                Value::Integer(3),
            ],
            "admin",
        )
        .unwrap();
        assert_eq!(result.rows, vec![vec![Cell::Text("alpha".into())]]);
    }

    #[test]
    fn unknown_relations_and_types_are_refused_clearly() {
        let err = run("SELECT * FROM pg_catalog.pg_class", Vec::new()).unwrap_err();
        assert_eq!(err.code, "42P01");
        assert!(
            err.message.contains("sys.database_mirroring"),
            "{}",
            err.message
        );
        let err = run("SELECT '1'::xml", Vec::new()).unwrap_err();
        assert_eq!(err.code, "42704");
        let err = run("SELECT nosuch FROM sys.database_mirroring", Vec::new()).unwrap_err();
        assert_eq!(err.code, "42703");
    }
}
