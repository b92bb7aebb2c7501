//! The evaluator: runs a compiled [`Condition`] against a [`MessageView`] without recursion and,
//! once warm, without allocating.
//!
//! An [`Evaluator`] (one per shard) owns every buffer evaluation needs: the value stack, the
//! arena that holds strings made by `LOWER`, `UPPER` and `CONCAT`, the copy of the body that
//! simd-json parses in place, simd-json's buffers and its tape. A [`Session`] is one message:
//! `$body` is parsed at most once per session, on the first condition that reads it, whatever
//! the number of routes evaluated.

use std::cmp::Ordering;

use simd_json::prelude::*;
use simd_json::{Buffers, Tape};

use super::compile::{Condition, Op};
use super::message::{body_encoding, decode_body, MessageView};
use super::parse::{Function, PathSegment, TwinSection};

/// Strings made during one evaluation (`LOWER`, `UPPER`, `CONCAT`) may total this many bytes;
/// a result that would go past it is undefined.
pub const SCRATCH_BYTES_MAX: usize = 1024 * 1024;

/// What a condition evaluated to. Only [`Outcome::Match`] routes a message; Azure logs a
/// routing error for [`Outcome::Undefined`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// `true`.
    Match,
    /// `false`.
    NoMatch,
    /// `undefined`, `null` or a value that is not a boolean.
    Undefined,
}

/// A value on the stack. Strings borrow from the condition, the message, the twin or the
/// parsed body; strings the evaluation made live in the arena and are kept as a byte range.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Val<'a> {
    Undefined,
    Null,
    Bool(bool),
    Number(f64),
    Str(&'a str),
    Scratch(u32, u32),
    Array,
    Object,
}

/// Gives an emptied vector of one lifetime back as another, keeping its allocation (the
/// standard library collects a `map`ped `into_iter` of a same-layout type in place).
fn recycle<'b>(mut stack: Vec<Val<'_>>) -> Vec<Val<'b>> {
    stack.clear();
    stack.into_iter().map(|_| Val::Undefined).collect()
}

enum BodyState {
    Unread,
    Unavailable,
    Parsed,
}

/// The reusable state of condition evaluation. Keep one per shard (or thread): after the
/// first few messages it has grown to fit and evaluation allocates nothing.
pub struct Evaluator {
    stack: Vec<Val<'static>>,
    arena: String,
    json: Vec<u8>,
    buffers: Buffers,
    tape: Option<Tape<'static>>,
}

impl std::fmt::Debug for Evaluator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Evaluator")
            .field("stack_capacity", &self.stack.capacity())
            .field("arena_capacity", &self.arena.capacity())
            .field("json_capacity", &self.json.capacity())
            .finish_non_exhaustive()
    }
}

impl Default for Evaluator {
    fn default() -> Self {
        Evaluator::new()
    }
}

impl Evaluator {
    pub fn new() -> Evaluator {
        Evaluator {
            stack: Vec::with_capacity(32),
            arena: String::new(),
            json: Vec::new(),
            buffers: Buffers::default(),
            tape: Some(Tape(Vec::new())),
        }
    }

    /// Starts evaluating conditions against one message.
    pub fn session<'e, M: MessageView + ?Sized>(&'e mut self, message: &'e M) -> Session<'e, M> {
        let Evaluator {
            stack,
            arena,
            json,
            buffers,
            tape,
        } = self;
        let reused = tape.take().unwrap_or(Tape(Vec::new())).reset();
        Session {
            message,
            stack,
            arena,
            json: Some(json),
            buffers,
            tape: reused,
            tape_home: tape,
            body: BodyState::Unread,
        }
    }

    /// Evaluates one condition against one message (a session of one condition).
    pub fn evaluate<M: MessageView + ?Sized>(
        &mut self,
        condition: &Condition,
        message: &M,
    ) -> Outcome {
        self.session(message).evaluate(condition)
    }

    /// Bytes the evaluator holds in its reusable buffers (for tests of steady-state reuse).
    pub fn capacity(&self) -> (usize, usize, usize) {
        (
            self.stack.capacity(),
            self.arena.capacity(),
            self.json.capacity(),
        )
    }
}

/// One message being routed: evaluates any number of conditions against it, parsing its body
/// at most once.
pub struct Session<'e, M: ?Sized> {
    message: &'e M,
    stack: &'e mut Vec<Val<'static>>,
    arena: &'e mut String,
    /// The body copy; taken when the body is parsed, since the tape then borrows it.
    json: Option<&'e mut Vec<u8>>,
    buffers: &'e mut Buffers,
    tape: Tape<'e>,
    tape_home: &'e mut Option<Tape<'static>>,
    body: BodyState,
}

impl<M: ?Sized> std::fmt::Debug for Session<'_, M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").finish_non_exhaustive()
    }
}

impl<M: ?Sized> Drop for Session<'_, M> {
    fn drop(&mut self) {
        // Hand the tape's allocation back to the evaluator for the next message.
        let tape = std::mem::replace(&mut self.tape, Tape(Vec::new()));
        *self.tape_home = Some(tape.reset());
    }
}

/// The text of a string value: borrowed, or a range of the arena.
#[inline]
fn text<'x>(arena: &'x str, value: Val<'x>) -> Option<&'x str> {
    match value {
        Val::Str(s) => Some(s),
        Val::Scratch(start, end) => arena.get(start as usize..end as usize),
        _ => None,
    }
}

#[inline]
fn number(value: Val<'_>) -> Option<f64> {
    match value {
        Val::Number(n) => Some(n),
        _ => None,
    }
}

/// A numeric result; NaN and infinities (division by zero, overflow) are undefined.
#[inline]
fn finite<'a>(n: f64) -> Val<'a> {
    if n.is_finite() {
        Val::Number(n)
    } else {
        Val::Undefined
    }
}

fn arith<'a>(op: Op, a: Val<'_>, b: Val<'_>) -> Val<'a> {
    let (Some(a), Some(b)) = (number(a), number(b)) else {
        return Val::Undefined;
    };
    finite(match op {
        Op::Add => a + b,
        Op::Sub => a - b,
        Op::Mul => a * b,
        Op::Div => a / b,
        _ => a % b,
    })
}

/// Orders two values of one primitive type; `None` for undefined, different types, arrays and
/// objects.
fn order(arena: &str, a: Val<'_>, b: Val<'_>) -> Option<Ordering> {
    match (a, b) {
        (Val::Null, Val::Null) => Some(Ordering::Equal),
        (Val::Bool(a), Val::Bool(b)) => Some(a.cmp(&b)),
        (Val::Number(a), Val::Number(b)) => a.partial_cmp(&b),
        (Val::Str(_) | Val::Scratch(..), Val::Str(_) | Val::Scratch(..)) => {
            Some(text(arena, a)?.cmp(text(arena, b)?))
        }
        _ => None,
    }
}

fn compare<'a>(op: Op, arena: &str, a: Val<'_>, b: Val<'_>) -> Val<'a> {
    let Some(ordering) = order(arena, a, b) else {
        return Val::Undefined;
    };
    Val::Bool(match op {
        Op::Eq => ordering == Ordering::Equal,
        Op::Ne => ordering != Ordering::Equal,
        Op::Lt => ordering == Ordering::Less,
        Op::Gt => ordering == Ordering::Greater,
        Op::Le => ordering != Ordering::Greater,
        _ => ordering != Ordering::Less,
    })
}

/// Number of characters before byte `index` of `s`.
fn char_count(s: &str) -> usize {
    if s.is_ascii() {
        s.len()
    } else {
        s.chars().count()
    }
}

/// Byte offset of character `chars` of `s` (or `s.len()` past the end).
fn byte_offset(s: &str, chars: usize) -> usize {
    if s.is_ascii() {
        chars.min(s.len())
    } else {
        s.char_indices().nth(chars).map_or(s.len(), |(i, _)| i)
    }
}

/// A character count from a number argument: truncated toward zero, negative counts as 0.
fn count_arg(n: f64) -> usize {
    if n <= 0.0 {
        0
    } else if n >= usize::MAX as f64 {
        usize::MAX
    } else {
        n as usize
    }
}

/// `SUBSTRING(s, start[, length])` on a string at `base` bytes into its source; the result is
/// a byte range of that source (characters, zero-based, clamped to the string).
fn substring(s: &str, start: f64, length: Option<f64>) -> (usize, usize) {
    let from = byte_offset(s, count_arg(start));
    let rest = &s[from..];
    let to = match length {
        Some(length) => from + byte_offset(rest, count_arg(length)),
        None => s.len(),
    };
    (from, to)
}

/// Ends a string written to the arena at `start`: its range, or undefined past the cap.
fn scratch<'a>(arena: &mut String, start: usize) -> Val<'a> {
    if arena.len() > SCRATCH_BYTES_MAX {
        arena.truncate(start);
        Val::Undefined
    } else {
        Val::Scratch(start as u32, arena.len() as u32)
    }
}

/// Appends a string value to the arena (it may itself be in the arena).
fn append(arena: &mut String, value: Val<'_>) -> bool {
    match value {
        Val::Str(s) => arena.push_str(s),
        Val::Scratch(start, end) => {
            let (start, end) = (start as usize, end as usize);
            if end > arena.len() || start > end {
                return false;
            }
            // (`String::extend_from_within` is newer than the workspace's MSRV.)
            let mut i = start;
            while let Some(c) = arena.get(i..end).and_then(|s| s.chars().next()) {
                arena.push(c);
                i += c.len_utf8();
            }
        }
        _ => return false,
    }
    true
}

/// `LOWER`/`UPPER`: maps every character (as Rust's `char::to_lowercase`/`to_uppercase`).
fn change_case<'a>(arena: &mut String, value: Val<'_>, upper: bool) -> Val<'a> {
    let start = arena.len();
    let ascii = match value {
        Val::Str(s) => s.is_ascii(),
        Val::Scratch(..) => text(arena, value).is_some_and(str::is_ascii),
        _ => return Val::Undefined,
    };
    if ascii {
        append(arena, value);
        if upper {
            arena[start..].make_ascii_uppercase();
        } else {
            arena[start..].make_ascii_lowercase();
        }
        return scratch(arena, start);
    }
    let push = |arena: &mut String, c: char| {
        if upper {
            arena.extend(c.to_uppercase());
        } else {
            arena.extend(c.to_lowercase());
        }
    };
    match value {
        Val::Str(s) => s.chars().for_each(|c| push(arena, c)),
        Val::Scratch(from, to) => {
            let mut i = from as usize;
            while i < to as usize {
                let Some(c) = arena.get(i..).and_then(|s| s.chars().next()) else {
                    break;
                };
                push(arena, c);
                i += c.len_utf8();
            }
        }
        _ => {}
    }
    scratch(arena, start)
}

/// A scalar of the parsed body.
fn body_value<'e>(value: simd_json::tape::Value<'_, 'e>) -> Val<'e> {
    match value.value_type() {
        ValueType::Null => Val::Null,
        ValueType::Bool => value.as_bool().map_or(Val::Undefined, Val::Bool),
        ValueType::String => value.into_string().map_or(Val::Undefined, Val::Str),
        ValueType::Array => Val::Array,
        ValueType::Object => Val::Object,
        _ => value.cast_f64().map_or(Val::Undefined, finite),
    }
}

fn twin_value(value: &serde_json::Value) -> Val<'_> {
    match value {
        serde_json::Value::Null => Val::Null,
        serde_json::Value::Bool(b) => Val::Bool(*b),
        serde_json::Value::Number(n) => n.as_f64().map_or(Val::Undefined, finite),
        serde_json::Value::String(s) => Val::Str(s),
        serde_json::Value::Array(_) => Val::Array,
        serde_json::Value::Object(_) => Val::Object,
    }
}

pub(crate) fn twin_path<'t>(
    twin: &'t serde_json::Value,
    section: TwinSection,
    path: &[PathSegment],
) -> Option<&'t serde_json::Value> {
    let mut value = match section {
        TwinSection::Tags => twin.get("tags")?,
        TwinSection::Desired => twin.get("properties")?.get("desired")?,
        TwinSection::Reported => twin.get("properties")?.get("reported")?,
    };
    for segment in path {
        value = match segment {
            PathSegment::Key(key) => value.as_object()?.get(key.as_str())?,
            PathSegment::Index(i) => value.as_array()?.get(*i as usize)?,
        };
    }
    Some(value)
}

impl<'e, M: MessageView + ?Sized> Session<'e, M> {
    /// Parses the body on first use; whether a parsed body is there.
    fn body_parsed(&mut self) -> bool {
        match self.body {
            BodyState::Parsed => return true,
            BodyState::Unavailable => return false,
            BodyState::Unread => {}
        }
        self.body = BodyState::Unavailable;
        let message: &'e M = self.message;
        let Some(encoding) = body_encoding(message) else {
            return false;
        };
        let Some(json) = self.json.take() else {
            return false;
        };
        if !decode_body(message.body(), encoding, json) {
            return false;
        }
        let input: &'e mut [u8] = json.as_mut_slice();
        if simd_json::fill_tape(input, self.buffers, &mut self.tape).is_err()
            || self.tape.0.is_empty()
        {
            return false;
        }
        self.body = BodyState::Parsed;
        true
    }

    fn body_at(&mut self, path: &[PathSegment]) -> Val<'e> {
        if !self.body_parsed() {
            return Val::Undefined;
        }
        let mut value = self.tape.as_value();
        for segment in path {
            let next = match segment {
                PathSegment::Key(key) => value.get(key.as_str()),
                PathSegment::Index(i) => value.get_idx(*i as usize),
            };
            match next {
                Some(next) => value = next,
                None => return Val::Undefined,
            }
        }
        body_value(value)
    }

    /// Evaluates one condition against the session's message.
    pub fn evaluate(&mut self, condition: &Condition) -> Outcome {
        self.run(condition, |value, _| match value {
            Some(Val::Bool(true)) => Outcome::Match,
            Some(Val::Bool(false)) => Outcome::NoMatch,
            _ => Outcome::Undefined,
        })
    }

    /// Evaluates and renders the result value (`undefined`, `null`, `true`, `number 1.5`,
    /// `string 'x'`, `array`, `object`), for tests.
    #[cfg(test)]
    pub(crate) fn evaluate_to_string(&mut self, condition: &Condition) -> String {
        self.run(condition, |value, arena| match value {
            None | Some(Val::Undefined) => "undefined".to_owned(),
            Some(Val::Null) => "null".to_owned(),
            Some(Val::Bool(b)) => b.to_string(),
            Some(Val::Number(n)) => format!("number {n}"),
            Some(v @ (Val::Str(_) | Val::Scratch(..))) => {
                format!("string '{}'", text(arena, v).unwrap_or("<bad range>"))
            }
            Some(Val::Array) => "array".to_owned(),
            Some(Val::Object) => "object".to_owned(),
        })
    }

    /// Runs the program and hands the final value (and the arena its string may live in) to
    /// `finish`.
    fn run<R>(
        &mut self,
        condition: &Condition,
        finish: impl FnOnce(Option<Val<'_>>, &str) -> R,
    ) -> R {
        let message: &'e M = self.message;
        let mut stack: Vec<Val<'_>> = recycle(std::mem::take(self.stack));
        stack.reserve(condition.max_stack);
        self.arena.clear();
        let ops = &condition.ops[..];
        let strings = &condition.strings[..];
        let mut pc = 0;
        while let Some(op) = ops.get(pc) {
            pc += 1;
            let value = match *op {
                Op::Undefined => Val::Undefined,
                Op::Null => Val::Null,
                Op::Bool(b) => Val::Bool(b),
                Op::Number(n) => Val::Number(n),
                Op::String(i) => Val::Str(&strings[i as usize]),
                Op::Array => Val::Array,
                Op::System(name) => message
                    .system_property(name)
                    .map_or(Val::Undefined, Val::Str),
                Op::Application(i) => message
                    .application_property(&strings[i as usize])
                    .map_or(Val::Undefined, Val::Str),
                Op::SystemEq(name, constant) => match message.system_property(name) {
                    Some(value) => Val::Bool(value == &*strings[constant as usize]),
                    None => Val::Undefined,
                },
                Op::ApplicationEq(name, constant) => {
                    match message.application_property(&strings[name as usize]) {
                        Some(value) => Val::Bool(value == &*strings[constant as usize]),
                        None => Val::Undefined,
                    }
                }
                Op::DollarApplication(i) => {
                    let name: &str = &strings[i as usize];
                    message
                        .application_property(name)
                        .or_else(|| message.application_property(name.get(1..).unwrap_or("")))
                        .map_or(Val::Undefined, Val::Str)
                }
                Op::Body(i) => self.body_at(&condition.paths[i as usize]),
                Op::Twin(section, i) => message
                    .twin()
                    .and_then(|twin| twin_path(twin, section, &condition.paths[i as usize]))
                    .map_or(Val::Undefined, twin_value),
                Op::JumpIfFalse(target) => {
                    if stack.last() == Some(&Val::Bool(false)) {
                        pc = target as usize;
                    }
                    continue;
                }
                Op::JumpIfTrue(target) => {
                    if stack.last() == Some(&Val::Bool(true)) {
                        pc = target as usize;
                    }
                    continue;
                }
                Op::Not | Op::Neg => {
                    let a = stack.pop().unwrap_or(Val::Undefined);
                    match (*op, a) {
                        (Op::Not, Val::Bool(b)) => Val::Bool(!b),
                        (Op::Neg, Val::Number(n)) => Val::Number(-n),
                        _ => Val::Undefined,
                    }
                }
                Op::Substring3 => {
                    let length = stack.pop().unwrap_or(Val::Undefined);
                    let start = stack.pop().unwrap_or(Val::Undefined);
                    let s = stack.pop().unwrap_or(Val::Undefined);
                    substring_value(self.arena, s, start, Some(length))
                }
                Op::Call(function) if arity(function) == 1 => {
                    let a = stack.pop().unwrap_or(Val::Undefined);
                    call1(function, self.arena, a)
                }
                _ => {
                    let b = stack.pop().unwrap_or(Val::Undefined);
                    let a = stack.pop().unwrap_or(Val::Undefined);
                    binary(*op, self.arena, a, b)
                }
            };
            stack.push(value);
        }
        let result = finish(stack.pop(), self.arena);
        *self.stack = recycle(stack);
        result
    }
}

fn arity(function: Function) -> usize {
    use Function::*;
    match function {
        Power | IndexOf | StartsWith | EndsWith | Contains | Concat | Substring => 2,
        _ => 1,
    }
}

fn substring_value<'a>(
    arena: &str,
    s: Val<'a>,
    start: Val<'_>,
    length: Option<Val<'_>>,
) -> Val<'a> {
    let Some(start) = number(start) else {
        return Val::Undefined;
    };
    let length = match length {
        Some(l) => match number(l) {
            Some(l) => Some(l),
            None => return Val::Undefined,
        },
        None => None,
    };
    match s {
        Val::Str(s) => {
            let (from, to) = substring(s, start, length);
            Val::Str(&s[from..to])
        }
        Val::Scratch(base, _) => match text(arena, s) {
            Some(t) => {
                let (from, to) = substring(t, start, length);
                Val::Scratch(base + from as u32, base + to as u32)
            }
            None => Val::Undefined,
        },
        _ => Val::Undefined,
    }
}

fn call1<'a>(function: Function, arena: &mut String, a: Val<'a>) -> Val<'a> {
    use Function::*;
    let num = |f: fn(f64) -> f64| number(a).map_or(Val::Undefined, |n| finite(f(n)));
    match function {
        Abs => num(f64::abs),
        Exp => num(f64::exp),
        Square => num(|n| n * n),
        Ceiling => num(f64::ceil),
        Floor => num(f64::floor),
        Sign => num(|n| {
            if n > 0.0 {
                1.0
            } else if n < 0.0 {
                -1.0
            } else {
                0.0
            }
        }),
        Sqrt => num(f64::sqrt),
        AsNumber => match a {
            Val::Number(_) => a,
            Val::Str(_) | Val::Scratch(..) => text(arena, a)
                .and_then(|s| s.parse::<f64>().ok())
                .map_or(Val::Undefined, finite),
            _ => Val::Undefined,
        },
        IsArray => Val::Bool(matches!(a, Val::Array)),
        IsBool => Val::Bool(matches!(a, Val::Bool(_))),
        IsDefined => Val::Bool(!matches!(a, Val::Undefined)),
        IsNull => Val::Bool(matches!(a, Val::Null)),
        IsNumber => Val::Bool(matches!(a, Val::Number(_))),
        IsObject => Val::Bool(matches!(a, Val::Object)),
        IsPrimitive => Val::Bool(matches!(
            a,
            Val::Null | Val::Bool(_) | Val::Number(_) | Val::Str(_) | Val::Scratch(..)
        )),
        IsString => Val::Bool(matches!(a, Val::Str(_) | Val::Scratch(..))),
        Length => text(arena, a).map_or(Val::Undefined, |s| Val::Number(char_count(s) as f64)),
        Lower => change_case(arena, a, false),
        Upper => change_case(arena, a, true),
        Power | Concat | Substring | IndexOf | StartsWith | EndsWith | Contains => Val::Undefined,
    }
}

fn binary<'a>(op: Op, arena: &mut String, a: Val<'a>, b: Val<'a>) -> Val<'a> {
    match op {
        Op::Add | Op::Sub | Op::Mul | Op::Div | Op::Mod => arith(op, a, b),
        Op::Eq | Op::Ne | Op::Lt | Op::Gt | Op::Le | Op::Ge => compare(op, arena, a, b),
        // Three-valued logic: a decided side wins over undefined.
        Op::And => match (a, b) {
            (Val::Bool(false), _) | (_, Val::Bool(false)) => Val::Bool(false),
            (Val::Bool(true), Val::Bool(true)) => Val::Bool(true),
            _ => Val::Undefined,
        },
        Op::Or => match (a, b) {
            (Val::Bool(true), _) | (_, Val::Bool(true)) => Val::Bool(true),
            (Val::Bool(false), Val::Bool(false)) => Val::Bool(false),
            _ => Val::Undefined,
        },
        Op::Call(function) => call2(function, arena, a, b),
        _ => Val::Undefined,
    }
}

fn call2<'a>(function: Function, arena: &mut String, a: Val<'a>, b: Val<'a>) -> Val<'a> {
    use Function::*;
    match function {
        Power => match (number(a), number(b)) {
            (Some(a), Some(b)) => finite(a.powf(b)),
            _ => Val::Undefined,
        },
        Concat => {
            if text(arena, a).is_none() || text(arena, b).is_none() {
                return Val::Undefined;
            }
            // A left side that is the arena's last string (a CONCAT chain) is extended in place.
            let start = match a {
                Val::Scratch(start, end) if end as usize == arena.len() => start as usize,
                _ => {
                    let start = arena.len();
                    append(arena, a);
                    start
                }
            };
            append(arena, b);
            scratch(arena, start)
        }
        Substring => substring_value(arena, a, b, None),
        IndexOf | StartsWith | EndsWith | Contains => {
            let (Some(s), Some(sub)) = (text(arena, a), text(arena, b)) else {
                return Val::Undefined;
            };
            match function {
                IndexOf => Val::Number(match s.find(sub) {
                    Some(i) => char_count(&s[..i]) as f64,
                    None => -1.0,
                }),
                StartsWith => Val::Bool(s.starts_with(sub)),
                EndsWith => Val::Bool(s.ends_with(sub)),
                _ => Val::Bool(s.contains(sub)),
            }
        }
        _ => Val::Undefined,
    }
}
