//! The IoT Hub query language over twins (`POST /devices/query`).
//!
//! Supported: `SELECT [TOP n] * | item, ... FROM devices | devices.modules [WHERE condition]
//! [GROUP BY path, ...]`, where an item is a property path or an aggregate (`COUNT()`,
//! `SUM(path)`, `AVG(path)`, `MIN(path)`, `MAX(path)`) with an optional `AS alias`. Conditions
//! combine comparisons (`= != <> < <= > >=`), `IN [..]`, `NIN [..]`, `AND`, `OR`, `NOT` and
//! parentheses over paths, literals (`'text'`, `"text"`, numbers, `true`, `false`, `null`) and
//! functions (`IS_DEFINED`, `IS_NULL`, `IS_BOOL`, `IS_NUMBER`, `IS_STRING`, `IS_OBJECT`,
//! `IS_ARRAY`, `IS_PRIMITIVE`, `STARTSWITH`, `ENDSWITH`, `CONTAINS`, `LOWER`, `UPPER`,
//! `LENGTH`). Keywords and function names are case-insensitive, paths case-sensitive; a path is
//! `a.b.c`, with `['any name']` and `[0]` segments, optionally prefixed by the collection
//! (`devices.tags.x`).
//!
//! Semantics follow the hub's: a missing property is *undefined*; comparing undefined, or two
//! values of different types, is undefined, and a row matches only when the condition is
//! `true` (so `NOT (x = 1)` does not match rows without `x`). Numbers compare numerically,
//! strings by code point, booleans and nulls only for (in)equality, objects and arrays only for
//! (in)equality by content.

use std::borrow::Cow;
use std::cmp::Ordering;
use std::collections::HashMap;

use serde_json::{Map, Number, Value};

/// A query the parser refused. Azure answers malformed queries with HTTP 400.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("The query is invalid: {message}")]
pub struct QueryError {
    pub message: String,
}

impl QueryError {
    fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
        }
    }

    /// `(HTTP status, Azure errorCode, Azure error name)`: azure-protocol.md 9.2 lists
    /// `IotHubFormatError` (400006) for malformed queries.
    pub fn code(&self) -> (u16, u32, &'static str) {
        (400, 400006, "IotHubFormatError")
    }
}

/// What a query ranges over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Collection {
    /// `FROM devices`: device twins.
    Devices,
    /// `FROM devices.modules`: module twins.
    Modules,
}

/// The `x-ms-item-type` of a result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ItemType {
    /// `SELECT *`: the items are twins.
    Twin,
    /// Projections and aggregates.
    Raw,
}

impl ItemType {
    /// The header value.
    pub fn as_str(self) -> &'static str {
        match self {
            ItemType::Twin => "twin",
            ItemType::Raw => "raw",
        }
    }
}

/// The result of [`Query::run`]: every item, in row order (groups in order of first row).
#[derive(Debug, Clone, PartialEq)]
pub struct QueryOutput {
    pub items: Vec<Value>,
    pub item_type: ItemType,
}

/// A parsed query.
#[derive(Debug, Clone, PartialEq)]
pub struct Query {
    top: Option<usize>,
    select: Select,
    collection: Collection,
    filter: Option<Expr>,
    group_by: Vec<Path>,
}

/// A parsed `WHERE` condition on its own (a configuration's `targetCondition`, a job's
/// `queryCondition`).
#[derive(Debug, Clone, PartialEq)]
pub struct Condition {
    expr: Expr,
}

#[derive(Debug, Clone, PartialEq)]
enum Segment {
    Key(String),
    Index(usize),
}

type Path = Vec<Segment>;

#[derive(Debug, Clone, PartialEq)]
enum Select {
    Star,
    Items(Vec<Item>),
}

#[derive(Debug, Clone, PartialEq)]
struct Item {
    name: String,
    kind: ItemKind,
}

#[derive(Debug, Clone, PartialEq)]
enum ItemKind {
    Path(Path),
    Count,
    Sum(Path),
    Avg(Path),
    Min(Path),
    Max(Path),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Func {
    IsDefined,
    IsNull,
    IsBool,
    IsNumber,
    IsString,
    IsObject,
    IsArray,
    IsPrimitive,
    StartsWith,
    EndsWith,
    Contains,
    Lower,
    Upper,
    Length,
}

impl Func {
    fn from_name(name: &str) -> Option<(Func, usize)> {
        let upper = name.to_ascii_uppercase();
        Some(match upper.as_str() {
            "IS_DEFINED" => (Func::IsDefined, 1),
            "IS_NULL" => (Func::IsNull, 1),
            "IS_BOOL" => (Func::IsBool, 1),
            "IS_NUMBER" => (Func::IsNumber, 1),
            "IS_STRING" => (Func::IsString, 1),
            "IS_OBJECT" => (Func::IsObject, 1),
            "IS_ARRAY" => (Func::IsArray, 1),
            "IS_PRIMITIVE" => (Func::IsPrimitive, 1),
            "STARTSWITH" | "STARTS_WITH" => (Func::StartsWith, 2),
            "ENDSWITH" | "ENDS_WITH" => (Func::EndsWith, 2),
            "CONTAINS" => (Func::Contains, 2),
            "LOWER" => (Func::Lower, 1),
            "UPPER" => (Func::Upper, 1),
            "LENGTH" => (Func::Length, 1),
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Expr {
    Literal(Value),
    Path(Path),
    Compare(Box<Expr>, CmpOp, Box<Expr>),
    /// Flat, so that a long chain of conditions does not make a deep tree.
    And(Vec<Expr>),
    Or(Vec<Expr>),
    Not(Box<Expr>),
    In {
        value: Box<Expr>,
        list: Vec<Value>,
        negated: bool,
    },
    Call(Func, Vec<Expr>),
}

// ---------------------------------------------------------------------------------------------
// Lexer

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Ident(String),
    Str(String),
    Num(Number),
    Sym(Sym),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sym {
    LParen,
    RParen,
    LBracket,
    RBracket,
    Comma,
    Dot,
    Star,
    Cmp(CmpOp),
}

fn lex(text: &str) -> Result<Vec<Token>, QueryError> {
    let chars: Vec<char> = text.chars().collect();
    let at = |i: usize| chars.get(i).copied();
    let mut tokens = Vec::new();
    let mut i = 0;
    while let Some(c) = at(i) {
        let single = match c {
            '(' => Some(Sym::LParen),
            ')' => Some(Sym::RParen),
            '[' => Some(Sym::LBracket),
            ']' => Some(Sym::RBracket),
            ',' => Some(Sym::Comma),
            '.' => Some(Sym::Dot),
            '*' => Some(Sym::Star),
            _ => None,
        };
        if let Some(sym) = single {
            tokens.push(Token::Sym(sym));
            i += 1;
            continue;
        }
        match c {
            c if c.is_whitespace() => i += 1,
            '=' => {
                i += if at(i + 1) == Some('=') { 2 } else { 1 };
                tokens.push(Token::Sym(Sym::Cmp(CmpOp::Eq)));
            }
            '!' if at(i + 1) == Some('=') => {
                i += 2;
                tokens.push(Token::Sym(Sym::Cmp(CmpOp::Ne)));
            }
            '<' => {
                let (op, len) = match at(i + 1) {
                    Some('=') => (CmpOp::Le, 2),
                    Some('>') => (CmpOp::Ne, 2),
                    _ => (CmpOp::Lt, 1),
                };
                i += len;
                tokens.push(Token::Sym(Sym::Cmp(op)));
            }
            '>' => {
                let (op, len) = match at(i + 1) {
                    Some('=') => (CmpOp::Ge, 2),
                    _ => (CmpOp::Gt, 1),
                };
                i += len;
                tokens.push(Token::Sym(Sym::Cmp(op)));
            }
            '\'' | '"' => {
                let (s, next) = lex_string(&chars, i)?;
                tokens.push(Token::Str(s));
                i = next;
            }
            c if c.is_ascii_digit()
                || (c == '-' && at(i + 1).is_some_and(|d| d.is_ascii_digit())) =>
            {
                let start = i;
                i += 1;
                while at(i).is_some_and(|d| d.is_ascii_digit()) {
                    i += 1;
                }
                if at(i) == Some('.') && at(i + 1).is_some_and(|d| d.is_ascii_digit()) {
                    i += 1;
                    while at(i).is_some_and(|d| d.is_ascii_digit()) {
                        i += 1;
                    }
                }
                if matches!(at(i), Some('e' | 'E')) {
                    let mut j = i + 1;
                    if matches!(at(j), Some('+' | '-')) {
                        j += 1;
                    }
                    if at(j).is_some_and(|d| d.is_ascii_digit()) {
                        i = j;
                        while at(i).is_some_and(|d| d.is_ascii_digit()) {
                            i += 1;
                        }
                    }
                }
                let text: String = chars[start..i].iter().collect();
                let number = text
                    .parse::<Number>()
                    .map_err(|_| QueryError::new(format!("invalid number '{text}'")))?;
                tokens.push(Token::Num(number));
            }
            c if c.is_alphabetic() || c == '_' || c == '$' => {
                let start = i;
                while at(i).is_some_and(|d| d.is_alphanumeric() || d == '_' || d == '$') {
                    i += 1;
                }
                tokens.push(Token::Ident(chars[start..i].iter().collect()));
            }
            other => {
                return Err(QueryError::new(format!("unexpected character '{other}'")));
            }
        }
    }
    Ok(tokens)
}

/// A quoted string starting at `chars[start]`; returns it and the index after the closing
/// quote. Escapes: `\'`, `\"`, `\\`, `\/`, `\b`, `\f`, `\n`, `\r`, `\t`, `\uXXXX`.
fn lex_string(chars: &[char], start: usize) -> Result<(String, usize), QueryError> {
    let quote = chars.get(start).copied();
    let mut out = String::new();
    let mut i = start + 1;
    loop {
        let Some(c) = chars.get(i).copied() else {
            return Err(QueryError::new("unterminated string literal"));
        };
        i += 1;
        if Some(c) == quote {
            return Ok((out, i));
        }
        if c != '\\' {
            out.push(c);
            continue;
        }
        let Some(escaped) = chars.get(i).copied() else {
            return Err(QueryError::new("unterminated string literal"));
        };
        i += 1;
        match escaped {
            '\'' | '"' | '\\' | '/' => out.push(escaped),
            'b' => out.push('\u{8}'),
            'f' => out.push('\u{c}'),
            'n' => out.push('\n'),
            'r' => out.push('\r'),
            't' => out.push('\t'),
            'u' => {
                let hex: String = chars.get(i..i + 4).unwrap_or_default().iter().collect();
                let decoded = u32::from_str_radix(&hex, 16)
                    .ok()
                    .filter(|_| hex.len() == 4)
                    .and_then(char::from_u32)
                    .ok_or_else(|| QueryError::new("invalid \\u escape in string literal"))?;
                out.push(decoded);
                i += 4;
            }
            other => {
                return Err(QueryError::new(format!(
                    "invalid escape '\\{other}' in string literal"
                )))
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Parser

/// Nesting of parentheses, `NOT` and function calls the parser accepts (bounds its recursion).
const NESTING_MAX: usize = 64;

const RESERVED: &[&str] = &[
    "SELECT", "TOP", "FROM", "WHERE", "GROUP", "BY", "AS", "AND", "OR", "NOT", "IN", "NIN", "TRUE",
    "FALSE", "NULL",
];

struct Parser {
    tokens: Vec<Token>,
    pos: usize,
    nesting: usize,
    /// Names given to unnamed select items: `$1`, `$2`, ...
    unnamed: usize,
}

fn describe(token: Option<&Token>) -> String {
    match token {
        None => "the end of the query".into(),
        Some(Token::Ident(name)) => format!("'{name}'"),
        Some(Token::Str(s)) => format!("string '{s}'"),
        Some(Token::Num(n)) => format!("number {n}"),
        Some(Token::Sym(sym)) => format!(
            "'{}'",
            match sym {
                Sym::LParen => "(",
                Sym::RParen => ")",
                Sym::LBracket => "[",
                Sym::RBracket => "]",
                Sym::Comma => ",",
                Sym::Dot => ".",
                Sym::Star => "*",
                Sym::Cmp(CmpOp::Eq) => "=",
                Sym::Cmp(CmpOp::Ne) => "!=",
                Sym::Cmp(CmpOp::Lt) => "<",
                Sym::Cmp(CmpOp::Le) => "<=",
                Sym::Cmp(CmpOp::Gt) => ">",
                Sym::Cmp(CmpOp::Ge) => ">=",
            }
        ),
    }
}

impl Parser {
    fn new(text: &str) -> Result<Self, QueryError> {
        Ok(Self {
            tokens: lex(text)?,
            pos: 0,
            nesting: 0,
            unnamed: 0,
        })
    }

    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.pos)
    }

    fn peek_at(&self, offset: usize) -> Option<&Token> {
        self.tokens.get(self.pos + offset)
    }

    fn next(&mut self) -> Option<Token> {
        let token = self.tokens.get(self.pos).cloned();
        if token.is_some() {
            self.pos += 1;
        }
        token
    }

    fn unexpected(&self, wanted: &str) -> QueryError {
        QueryError::new(format!(
            "expected {wanted} but found {}",
            describe(self.peek())
        ))
    }

    fn eat_sym(&mut self, sym: Sym) -> bool {
        if self.peek() == Some(&Token::Sym(sym)) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn expect_sym(&mut self, sym: Sym) -> Result<(), QueryError> {
        if self.eat_sym(sym) {
            Ok(())
        } else {
            Err(self.unexpected(&describe(Some(&Token::Sym(sym)))))
        }
    }

    fn is_kw(&self, offset: usize, keyword: &str) -> bool {
        matches!(self.peek_at(offset), Some(Token::Ident(name)) if name.eq_ignore_ascii_case(keyword))
    }

    fn eat_kw(&mut self, keyword: &str) -> bool {
        if self.is_kw(0, keyword) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn expect_kw(&mut self, keyword: &str) -> Result<(), QueryError> {
        if self.eat_kw(keyword) {
            Ok(())
        } else {
            Err(self.unexpected(keyword))
        }
    }

    fn deeper(&mut self) -> Result<(), QueryError> {
        self.nesting += 1;
        if self.nesting > NESTING_MAX {
            return Err(QueryError::new("the query is nested too deeply"));
        }
        Ok(())
    }

    fn query(&mut self) -> Result<Query, QueryError> {
        self.expect_kw("SELECT")?;
        let top = if self.eat_kw("TOP") {
            match self.next() {
                Some(Token::Num(n)) => match n.as_u64().and_then(|n| usize::try_from(n).ok()) {
                    Some(n) => Some(n),
                    None => return Err(QueryError::new("TOP needs a non-negative integer")),
                },
                _ => return Err(QueryError::new("TOP needs a non-negative integer")),
            }
        } else {
            None
        };
        let select = if self.eat_sym(Sym::Star) {
            Select::Star
        } else {
            let mut items = vec![self.item()?];
            while self.eat_sym(Sym::Comma) {
                items.push(self.item()?);
            }
            Select::Items(items)
        };
        self.expect_kw("FROM")?;
        let collection = self.collection()?;
        let filter = if self.eat_kw("WHERE") {
            Some(self.expr()?)
        } else {
            None
        };
        let mut group_by = Vec::new();
        if self.eat_kw("GROUP") {
            self.expect_kw("BY")?;
            group_by.push(self.path()?);
            while self.eat_sym(Sym::Comma) {
                group_by.push(self.path()?);
            }
        }
        if self.peek().is_some() {
            return Err(self.unexpected("the end of the query"));
        }
        let mut query = Query {
            top,
            select,
            collection,
            filter,
            group_by,
        };
        query.normalize();
        query.check_grouping()?;
        Ok(query)
    }

    fn collection(&mut self) -> Result<Collection, QueryError> {
        if !self.eat_kw("devices") {
            return Err(self.unexpected("'devices' or 'devices.modules'"));
        }
        if !self.eat_sym(Sym::Dot) {
            return Ok(Collection::Devices);
        }
        if self.eat_kw("modules") {
            return Ok(Collection::Modules);
        }
        if self.is_kw(0, "jobs") {
            return Err(QueryError::new(
                "queries over devices.jobs are not supported",
            ));
        }
        Err(self.unexpected("'modules'"))
    }

    fn item(&mut self) -> Result<Item, QueryError> {
        let aggregate = match (self.peek(), self.peek_at(1)) {
            (Some(Token::Ident(name)), Some(Token::Sym(Sym::LParen))) => {
                Some(name.to_ascii_uppercase())
            }
            _ => None,
        };
        let kind = match aggregate {
            Some(name) => {
                self.pos += 2;
                let kind = match name.as_str() {
                    "COUNT" => ItemKind::Count,
                    "SUM" => ItemKind::Sum(self.path()?),
                    "AVG" => ItemKind::Avg(self.path()?),
                    "MIN" => ItemKind::Min(self.path()?),
                    "MAX" => ItemKind::Max(self.path()?),
                    _ => {
                        return Err(QueryError::new(format!(
                            "'{name}' cannot be selected; select paths or COUNT, SUM, AVG, MIN, MAX"
                        )))
                    }
                };
                self.expect_sym(Sym::RParen)?;
                kind
            }
            None => ItemKind::Path(self.path()?),
        };
        let name = if self.eat_kw("AS") {
            match self.next() {
                Some(Token::Ident(alias)) => alias,
                _ => return Err(QueryError::new("AS needs a name")),
            }
        } else {
            match &kind {
                ItemKind::Path(path) => match path.last() {
                    Some(Segment::Key(key)) => key.clone(),
                    _ => self.unnamed_name(),
                },
                _ => self.unnamed_name(),
            }
        };
        Ok(Item { name, kind })
    }

    fn unnamed_name(&mut self) -> String {
        self.unnamed += 1;
        format!("${}", self.unnamed)
    }

    /// `name(.name | ['name'] | [index])*`; the first name must not be a reserved word.
    fn path(&mut self) -> Result<Path, QueryError> {
        let first = match self.peek() {
            Some(Token::Ident(name))
                if !RESERVED.iter().any(|kw| name.eq_ignore_ascii_case(kw)) =>
            {
                name.clone()
            }
            _ => return Err(self.unexpected("a property path")),
        };
        self.pos += 1;
        let mut path = vec![Segment::Key(first)];
        loop {
            if self.eat_sym(Sym::Dot) {
                match self.next() {
                    Some(Token::Ident(name)) => path.push(Segment::Key(name)),
                    _ => return Err(QueryError::new("expected a name after '.'")),
                }
            } else if self.eat_sym(Sym::LBracket) {
                match self.next() {
                    Some(Token::Str(name)) => path.push(Segment::Key(name)),
                    Some(Token::Num(n)) => match n.as_u64().and_then(|n| usize::try_from(n).ok()) {
                        Some(index) => path.push(Segment::Index(index)),
                        None => {
                            return Err(QueryError::new("array indexes are non-negative integers"))
                        }
                    },
                    _ => {
                        return Err(QueryError::new(
                            "expected a quoted name or an index after '['",
                        ))
                    }
                }
                self.expect_sym(Sym::RBracket)?;
            } else {
                return Ok(path);
            }
        }
    }

    fn expr(&mut self) -> Result<Expr, QueryError> {
        let mut terms = vec![self.and()?];
        while self.eat_kw("OR") {
            terms.push(self.and()?);
        }
        Ok(match <[Expr; 1]>::try_from(terms) {
            Ok([only]) => only,
            Err(terms) => Expr::Or(terms),
        })
    }

    fn and(&mut self) -> Result<Expr, QueryError> {
        let mut terms = vec![self.not()?];
        while self.eat_kw("AND") {
            terms.push(self.not()?);
        }
        Ok(match <[Expr; 1]>::try_from(terms) {
            Ok([only]) => only,
            Err(terms) => Expr::And(terms),
        })
    }

    fn not(&mut self) -> Result<Expr, QueryError> {
        if self.eat_kw("NOT") {
            self.deeper()?;
            let inner = self.not()?;
            self.nesting -= 1;
            return Ok(Expr::Not(Box::new(inner)));
        }
        self.comparison()
    }

    fn comparison(&mut self) -> Result<Expr, QueryError> {
        let left = self.operand()?;
        if let Some(Token::Sym(Sym::Cmp(op))) = self.peek() {
            let op = *op;
            self.pos += 1;
            let right = self.operand()?;
            return Ok(Expr::Compare(Box::new(left), op, Box::new(right)));
        }
        let negated = if self.eat_kw("IN") {
            false
        } else if self.eat_kw("NIN") {
            true
        } else if self.is_kw(0, "NOT") && self.is_kw(1, "IN") {
            self.pos += 2;
            true
        } else {
            return Ok(left);
        };
        let list = match self.literal()? {
            Value::Array(list) => list,
            _ => return Err(QueryError::new("IN and NIN need a list: [value, ...]")),
        };
        Ok(Expr::In {
            value: Box::new(left),
            list,
            negated,
        })
    }

    fn operand(&mut self) -> Result<Expr, QueryError> {
        if self.eat_sym(Sym::LParen) {
            self.deeper()?;
            let inner = self.expr()?;
            self.expect_sym(Sym::RParen)?;
            self.nesting -= 1;
            return Ok(inner);
        }
        match (self.peek(), self.peek_at(1)) {
            (Some(Token::Ident(name)), Some(Token::Sym(Sym::LParen))) => {
                let name = name.clone();
                let Some((func, arity)) = Func::from_name(&name) else {
                    return Err(QueryError::new(format!("unknown function '{name}'")));
                };
                self.pos += 2;
                self.deeper()?;
                let mut args = Vec::new();
                if !self.eat_sym(Sym::RParen) {
                    args.push(self.expr()?);
                    while self.eat_sym(Sym::Comma) {
                        args.push(self.expr()?);
                    }
                    self.expect_sym(Sym::RParen)?;
                }
                self.nesting -= 1;
                if args.len() != arity {
                    return Err(QueryError::new(format!(
                        "{} takes {arity} argument(s), not {}",
                        name.to_ascii_uppercase(),
                        args.len()
                    )));
                }
                Ok(Expr::Call(func, args))
            }
            (Some(Token::Ident(name)), _)
                if !["TRUE", "FALSE", "NULL"]
                    .iter()
                    .any(|kw| name.eq_ignore_ascii_case(kw)) =>
            {
                Ok(Expr::Path(self.path()?))
            }
            _ => Ok(Expr::Literal(self.literal()?)),
        }
    }

    /// A string, number, `true`, `false`, `null` or a list of literals.
    fn literal(&mut self) -> Result<Value, QueryError> {
        match self.peek().cloned() {
            Some(Token::Str(s)) => {
                self.pos += 1;
                Ok(Value::String(s))
            }
            Some(Token::Num(n)) => {
                self.pos += 1;
                Ok(Value::Number(n))
            }
            Some(Token::Ident(name)) if name.eq_ignore_ascii_case("true") => {
                self.pos += 1;
                Ok(Value::Bool(true))
            }
            Some(Token::Ident(name)) if name.eq_ignore_ascii_case("false") => {
                self.pos += 1;
                Ok(Value::Bool(false))
            }
            Some(Token::Ident(name)) if name.eq_ignore_ascii_case("null") => {
                self.pos += 1;
                Ok(Value::Null)
            }
            Some(Token::Sym(Sym::LBracket)) => {
                self.pos += 1;
                self.deeper()?;
                let mut list = Vec::new();
                if !self.eat_sym(Sym::RBracket) {
                    list.push(self.literal()?);
                    while self.eat_sym(Sym::Comma) {
                        list.push(self.literal()?);
                    }
                    self.expect_sym(Sym::RBracket)?;
                }
                self.nesting -= 1;
                Ok(Value::Array(list))
            }
            _ => Err(self.unexpected("a value")),
        }
    }
}

/// Parses a query.
pub fn parse(text: &str) -> Result<Query, QueryError> {
    Parser::new(text)?.query()
}

/// Parses a bare condition (the part after `WHERE`), for configurations and jobs.
pub fn parse_condition(text: &str) -> Result<Condition, QueryError> {
    let mut parser = Parser::new(text)?;
    let mut expr = parser.expr()?;
    if parser.peek().is_some() {
        return Err(parser.unexpected("the end of the condition"));
    }
    normalize_expr(&mut expr, Collection::Devices);
    Ok(Condition { expr })
}

impl Condition {
    /// Whether a REST twin satisfies the condition.
    pub fn matches(&self, twin: &Value) -> bool {
        is_true(&eval(&self.expr, twin))
    }
}

// ---------------------------------------------------------------------------------------------
// Evaluation

/// Drops a leading collection name from a path: `devices.tags.x` is `tags.x` (and
/// `devices.modules.moduleId` is `moduleId` over modules). No twin has a root member `devices`.
fn normalize_path(path: &mut Path, collection: Collection) {
    let prefix: &[&str] = match collection {
        Collection::Devices => &["devices"],
        Collection::Modules => &["devices", "modules"],
    };
    let matches = path.len() > prefix.len()
        && prefix
            .iter()
            .zip(path.iter())
            .all(|(want, seg)| matches!(seg, Segment::Key(k) if k == want));
    if matches {
        path.drain(..prefix.len());
    }
}

fn normalize_expr(expr: &mut Expr, collection: Collection) {
    match expr {
        Expr::Literal(_) => {}
        Expr::Path(path) => normalize_path(path, collection),
        Expr::Compare(a, _, b) => {
            normalize_expr(a, collection);
            normalize_expr(b, collection);
        }
        Expr::Not(inner) => normalize_expr(inner, collection),
        Expr::In { value, .. } => normalize_expr(value, collection),
        Expr::And(terms) | Expr::Or(terms) | Expr::Call(_, terms) => {
            terms.iter_mut().for_each(|t| normalize_expr(t, collection))
        }
    }
}

fn lookup<'v>(row: &'v Value, path: &[Segment]) -> Option<&'v Value> {
    path.iter().try_fold(row, |value, segment| match segment {
        Segment::Key(key) => value.as_object()?.get(key),
        Segment::Index(index) => value.as_array()?.get(*index),
    })
}

/// `None` is undefined.
type Eval<'v> = Option<Cow<'v, Value>>;

fn is_true(value: &Eval<'_>) -> bool {
    matches!(value.as_deref(), Some(Value::Bool(true)))
}

fn truth(value: &Eval<'_>) -> Option<bool> {
    match value.as_deref() {
        Some(Value::Bool(b)) => Some(*b),
        _ => None,
    }
}

fn boolean<'v>(b: Option<bool>) -> Eval<'v> {
    b.map(|b| Cow::Owned(Value::Bool(b)))
}

fn compare_numbers(a: &Number, b: &Number) -> Option<Ordering> {
    if let (Some(a), Some(b)) = (a.as_i64(), b.as_i64()) {
        return Some(a.cmp(&b));
    }
    if let (Some(a), Some(b)) = (a.as_u64(), b.as_u64()) {
        return Some(a.cmp(&b));
    }
    a.as_f64()?.partial_cmp(&b.as_f64()?)
}

/// Equality of two defined values: `None` when their types differ.
fn equal(a: &Value, b: &Value) -> Option<bool> {
    match (a, b) {
        (Value::Number(a), Value::Number(b)) => {
            Some(compare_numbers(a, b) == Some(Ordering::Equal))
        }
        (Value::Null, Value::Null) => Some(true),
        (Value::Bool(a), Value::Bool(b)) => Some(a == b),
        (Value::String(a), Value::String(b)) => Some(a == b),
        (Value::Array(_), Value::Array(_)) | (Value::Object(_), Value::Object(_)) => Some(a == b),
        _ => None,
    }
}

/// Ordering of two defined values: numbers and strings only.
fn order(a: &Value, b: &Value) -> Option<Ordering> {
    match (a, b) {
        (Value::Number(a), Value::Number(b)) => compare_numbers(a, b),
        (Value::String(a), Value::String(b)) => Some(a.cmp(b)),
        _ => None,
    }
}

fn compare(a: &Value, op: CmpOp, b: &Value) -> Option<bool> {
    match op {
        CmpOp::Eq => equal(a, b),
        CmpOp::Ne => equal(a, b).map(|eq| !eq),
        CmpOp::Lt => order(a, b).map(Ordering::is_lt),
        CmpOp::Le => order(a, b).map(Ordering::is_le),
        CmpOp::Gt => order(a, b).map(Ordering::is_gt),
        CmpOp::Ge => order(a, b).map(Ordering::is_ge),
    }
}

fn eval<'v>(expr: &'v Expr, row: &'v Value) -> Eval<'v> {
    match expr {
        Expr::Literal(value) => Some(Cow::Borrowed(value)),
        Expr::Path(path) => lookup(row, path).map(Cow::Borrowed),
        Expr::Compare(a, op, b) => {
            let (a, b) = (eval(a, row)?, eval(b, row)?);
            boolean(compare(&a, *op, &b))
        }
        // false AND undefined is false, true OR undefined is true.
        Expr::And(terms) => connective(terms, row, false),
        Expr::Or(terms) => connective(terms, row, true),
        Expr::Not(inner) => boolean(truth(&eval(inner, row)).map(|b| !b)),
        Expr::In {
            value,
            list,
            negated,
        } => {
            let value = eval(value, row)?;
            let found = list.iter().any(|item| equal(&value, item) == Some(true));
            boolean(Some(found != *negated))
        }
        Expr::Call(func, args) => call(*func, args, row),
    }
}

/// AND (`decisive` false) or OR (`decisive` true) in three-valued logic: the decisive value if
/// any term has it, else the other one if every term has it, else undefined.
fn connective<'v>(terms: &'v [Expr], row: &'v Value, decisive: bool) -> Eval<'v> {
    let mut undefined = false;
    for term in terms {
        match truth(&eval(term, row)) {
            Some(b) if b == decisive => return boolean(Some(decisive)),
            Some(_) => {}
            None => undefined = true,
        }
    }
    boolean((!undefined).then_some(!decisive))
}

fn call<'v>(func: Func, args: &'v [Expr], row: &'v Value) -> Eval<'v> {
    let mut values = args.iter().map(|arg| eval(arg, row));
    let first = values.next().flatten();
    let second = values.next().flatten();
    let kind = |test: fn(&Value) -> bool| boolean(Some(first.as_deref().is_some_and(test)));
    let strings = |test: fn(&str, &str) -> bool| match (first.as_deref(), second.as_deref()) {
        (Some(Value::String(a)), Some(Value::String(b))) => boolean(Some(test(a, b))),
        _ => None,
    };
    let string = first.as_deref().and_then(Value::as_str);
    match func {
        Func::IsDefined => boolean(Some(first.is_some())),
        Func::IsNull => kind(Value::is_null),
        Func::IsBool => kind(Value::is_boolean),
        Func::IsNumber => kind(Value::is_number),
        Func::IsString => kind(Value::is_string),
        Func::IsObject => kind(Value::is_object),
        Func::IsArray => kind(Value::is_array),
        Func::IsPrimitive => kind(|v| !v.is_object() && !v.is_array()),
        Func::StartsWith => strings(|a, b| a.starts_with(b)),
        Func::EndsWith => strings(|a, b| a.ends_with(b)),
        Func::Contains => strings(|a, b| a.contains(b)),
        Func::Lower => string.map(|s| Cow::Owned(Value::String(s.to_lowercase()))),
        Func::Upper => string.map(|s| Cow::Owned(Value::String(s.to_uppercase()))),
        Func::Length => string.map(|s| Cow::Owned(Value::from(s.chars().count()))),
    }
}

/// Running sum of numbers: exact while every value is an integer and the sum fits `i64`.
#[derive(Default)]
struct Sum {
    int: Option<i64>,
    float: f64,
    all_int: bool,
    count: usize,
}

impl Sum {
    fn of<'r>(values: impl Iterator<Item = &'r Value>) -> Self {
        let mut sum = Sum {
            int: Some(0),
            all_int: true,
            ..Sum::default()
        };
        for n in values.filter_map(Value::as_number) {
            sum.count += 1;
            sum.float += n.as_f64().unwrap_or(0.0);
            match n.as_i64() {
                Some(i) if sum.all_int => sum.int = sum.int.and_then(|s| s.checked_add(i)),
                _ => sum.all_int = false,
            }
        }
        sum
    }

    fn value(&self) -> Value {
        match (self.all_int, self.int) {
            (true, Some(i)) => Value::from(i),
            _ => Value::from(self.float),
        }
    }
}

impl Query {
    /// The collection the query ranges over: the caller supplies device twins for
    /// [`Collection::Devices`] and module twins for [`Collection::Modules`].
    pub fn collection(&self) -> Collection {
        self.collection
    }

    /// `TOP n`, already applied by [`Query::run`].
    pub fn top(&self) -> Option<usize> {
        self.top
    }

    /// Whether the items are twins (`SELECT *`) or raw projections and aggregates.
    pub fn item_type(&self) -> ItemType {
        match self.select {
            Select::Star => ItemType::Twin,
            Select::Items(_) => ItemType::Raw,
        }
    }

    fn is_aggregate(&self) -> bool {
        !self.group_by.is_empty()
            || matches!(&self.select, Select::Items(items)
                if items.iter().any(|item| !matches!(item.kind, ItemKind::Path(_))))
    }

    fn normalize(&mut self) {
        let collection = self.collection;
        if let Select::Items(items) = &mut self.select {
            for item in items {
                match &mut item.kind {
                    ItemKind::Path(path)
                    | ItemKind::Sum(path)
                    | ItemKind::Avg(path)
                    | ItemKind::Min(path)
                    | ItemKind::Max(path) => normalize_path(path, collection),
                    ItemKind::Count => {}
                }
            }
        }
        if let Some(filter) = &mut self.filter {
            normalize_expr(filter, collection);
        }
        for path in &mut self.group_by {
            normalize_path(path, collection);
        }
    }

    /// An aggregate query may select only aggregates and GROUP BY paths.
    fn check_grouping(&self) -> Result<(), QueryError> {
        if !self.is_aggregate() {
            return Ok(());
        }
        let Select::Items(items) = &self.select else {
            return Err(QueryError::new("SELECT * cannot be used with GROUP BY"));
        };
        for item in items {
            if let ItemKind::Path(path) = &item.kind {
                if !self.group_by.contains(path) {
                    return Err(QueryError::new(format!(
                        "'{}' must be an aggregate or appear in GROUP BY",
                        item.name
                    )));
                }
            }
        }
        Ok(())
    }

    fn matches(&self, row: &Value) -> bool {
        self.filter
            .as_ref()
            .is_none_or(|filter| is_true(&eval(filter, row)))
    }

    /// Runs the query over REST twin rows ([`super::TwinDoc::to_rest`]) of the query's
    /// collection, in the caller's order, and returns every result (after `TOP`). Paging is the
    /// caller's.
    pub fn run(&self, rows: impl Iterator<Item = Value>) -> QueryOutput {
        let limit = self.top.unwrap_or(usize::MAX);
        let mut rows = rows.filter(|row| self.matches(row));
        let items = match &self.select {
            Select::Star => rows.take(limit).collect(),
            Select::Items(items) if !self.is_aggregate() => {
                rows.take(limit).map(|row| project(items, &row)).collect()
            }
            Select::Items(items) => {
                let mut aggregated = self.aggregate(items, &mut rows);
                aggregated.truncate(limit);
                aggregated
            }
        };
        QueryOutput {
            items,
            item_type: self.item_type(),
        }
    }

    fn aggregate(&self, items: &[Item], rows: &mut dyn Iterator<Item = Value>) -> Vec<Value> {
        // Groups in order of their first row; without GROUP BY a single group, even when empty.
        let mut groups: Vec<(Vec<Option<Value>>, Vec<Value>)> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        if self.group_by.is_empty() {
            groups.push((Vec::new(), rows.collect()));
        } else {
            for row in rows {
                let key: Vec<Option<Value>> = self
                    .group_by
                    .iter()
                    .map(|path| lookup(&row, path).cloned())
                    .collect();
                let text = key
                    .iter()
                    .map(|part| {
                        part.as_ref()
                            .map_or_else(|| "u".to_string(), |v| format!("d{v}"))
                    })
                    .collect::<Vec<_>>()
                    .join("\u{0}");
                let at = *index.entry(text).or_insert_with(|| {
                    groups.push((key, Vec::new()));
                    groups.len() - 1
                });
                if let Some((_, members)) = groups.get_mut(at) {
                    members.push(row);
                }
            }
        }
        groups
            .iter()
            .map(|(key, members)| {
                let mut out = Map::new();
                for item in items {
                    let values = |path: &Path| -> Vec<Value> {
                        members
                            .iter()
                            .filter_map(|row| lookup(row, path).cloned())
                            .collect()
                    };
                    let value = match &item.kind {
                        ItemKind::Path(path) => self
                            .group_by
                            .iter()
                            .position(|group| group == path)
                            .and_then(|at| key.get(at).cloned().flatten()),
                        ItemKind::Count => Some(Value::from(members.len())),
                        ItemKind::Sum(path) => Some(Sum::of(values(path).iter()).value()),
                        ItemKind::Avg(path) => {
                            let sum = Sum::of(values(path).iter());
                            (sum.count > 0).then(|| Value::from(sum.float / sum.count as f64))
                        }
                        ItemKind::Min(path) => extreme(&values(path), Ordering::Less),
                        ItemKind::Max(path) => extreme(&values(path), Ordering::Greater),
                    };
                    if let Some(value) = value {
                        out.insert(item.name.clone(), value);
                    }
                }
                Value::Object(out)
            })
            .collect()
    }
}

/// The smallest (`Less`) or largest (`Greater`) number, or if there are none the smallest or
/// largest string.
fn extreme(values: &[Value], want: Ordering) -> Option<Value> {
    let pick = |kind: fn(&Value) -> bool| {
        values
            .iter()
            .filter(|v| kind(v))
            .fold(None::<&Value>, |best, v| match best {
                Some(b) if order(v, b) != Some(want) => Some(b),
                _ => Some(v),
            })
            .cloned()
    };
    pick(Value::is_number).or_else(|| pick(Value::is_string))
}

fn project(items: &[Item], row: &Value) -> Value {
    let mut out = Map::new();
    for item in items {
        if let ItemKind::Path(path) = &item.kind {
            if let Some(value) = lookup(row, path) {
                out.insert(item.name.clone(), value.clone());
            }
        }
    }
    Value::Object(out)
}

#[cfg(test)]
mod tests;
