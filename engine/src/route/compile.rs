//! Lowers a parsed condition to a flat program for a stack machine.
//!
//! Everything that can be decided once is decided here: constants become immediate operands,
//! strings are interned in the program's pool, system property keywords are resolved to their
//! stored names, application property names are lowercased, `$body` and `$twin` paths are split
//! into segments, `CONCAT` with many arguments becomes a chain of pairs, and `AND`/`OR` get a
//! jump past their right side so a decided left side skips it (and with it, maybe, the `$body`
//! parse). The largest stack the program can need is computed, so the evaluator reserves it once.

use super::parse::{
    self, BinaryOp, Constant, Expr, Function, ParseError, PathSegment, TwinSection, UnaryOp,
};

/// One instruction. Operands index the [`Condition`]'s pools.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Op {
    Undefined,
    Null,
    Bool(bool),
    Number(f64),
    /// A string constant: `strings[i]`.
    String(u32),
    /// An array literal (arrays are only told apart by type; see the docs).
    Array,
    /// A system property by stored name.
    System(&'static str),
    /// An application property by lowercase name, `strings[i]`.
    Application(u32),
    /// An unknown `$name`: the application property `strings[i]` (with its `$`), else without.
    DollarApplication(u32),
    /// `system property = 'string constant'` in one instruction (the most common condition):
    /// `true`/`false`, or undefined when the property is absent. Same result as
    /// `System`, `String`, `Eq`.
    SystemEq(&'static str, u32),
    /// `application property = 'string constant'`, as [`Op::SystemEq`]: the property is
    /// `strings[.0]` (lowercase), the constant `strings[.1]`.
    ApplicationEq(u32, u32),
    /// `$body` at `paths[i]`.
    Body(u32),
    /// `$twin` section at `paths[i]`.
    Twin(TwinSection, u32),
    Not,
    Neg,
    Add,
    Sub,
    Mul,
    Div,
    Mod,
    Eq,
    Ne,
    Lt,
    Gt,
    Le,
    Ge,
    /// If the top of the stack is `false`, jump to the operand (the `AND` is decided).
    JumpIfFalse(u32),
    /// If the top of the stack is `true`, jump to the operand (the `OR` is decided).
    JumpIfTrue(u32),
    And,
    Or,
    /// A function of one or two arguments (`CONCAT` of two, `SUBSTRING` of two).
    Call(Function),
    /// `SUBSTRING(s, start, length)`.
    Substring3,
}

/// A compiled route condition: immutable, shareable between shards, evaluated with an
/// [`Evaluator`](super::Evaluator).
#[derive(Debug, Clone)]
pub struct Condition {
    pub(crate) ops: Box<[Op]>,
    pub(crate) strings: Box<[Box<str>]>,
    pub(crate) paths: Box<[Box<[PathSegment]>]>,
    pub(crate) max_stack: usize,
    pub(crate) reads_body: bool,
    pub(crate) reads_twin: bool,
    text: Box<str>,
}

impl Condition {
    /// Parses and compiles a condition.
    pub fn compile(text: &str) -> Result<Condition, ParseError> {
        let expr = parse::parse(text)?;
        Ok(Condition::from_expr(&expr, text))
    }

    /// The condition that always matches (a route without a condition).
    pub fn always() -> Condition {
        Condition::from_expr(&Expr::Constant(Constant::Bool(true)), "true")
    }

    pub(crate) fn from_expr(expr: &Expr, text: &str) -> Condition {
        let mut compiler = Compiler::default();
        compiler.expr(expr);
        Condition {
            ops: compiler.ops.into_boxed_slice(),
            strings: compiler.strings.into_boxed_slice(),
            paths: compiler.paths.into_boxed_slice(),
            max_stack: compiler.max_depth,
            reads_body: compiler.reads_body,
            reads_twin: compiler.reads_twin,
            text: text.into(),
        }
    }

    /// The condition as written.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Whether the condition references `$body` (and may need the body parsed).
    pub fn reads_body(&self) -> bool {
        self.reads_body
    }

    /// Whether the condition references `$twin` (and needs the sender's twin).
    pub fn reads_twin(&self) -> bool {
        self.reads_twin
    }

    /// Instructions in the program (for tests and diagnostics).
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// Whether the program is empty (never: every condition has at least one instruction).
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

#[derive(Default)]
struct Compiler {
    ops: Vec<Op>,
    strings: Vec<Box<str>>,
    paths: Vec<Box<[PathSegment]>>,
    depth: usize,
    max_depth: usize,
    reads_body: bool,
    reads_twin: bool,
}

impl Compiler {
    /// Appends an instruction that changes the stack depth by `delta`.
    fn emit(&mut self, op: Op, delta: isize) -> usize {
        self.depth = self.depth.saturating_add_signed(delta);
        self.max_depth = self.max_depth.max(self.depth);
        self.ops.push(op);
        self.ops.len() - 1
    }

    fn string(&mut self, s: &str) -> u32 {
        let index = match self.strings.iter().position(|x| **x == *s) {
            Some(i) => i,
            None => {
                self.strings.push(s.into());
                self.strings.len() - 1
            }
        };
        index as u32
    }

    fn path(&mut self, path: &[PathSegment]) -> u32 {
        self.paths.push(path.into());
        (self.paths.len() - 1) as u32
    }

    fn expr(&mut self, expr: &Expr) {
        match expr {
            Expr::Constant(c) => {
                let op = match c {
                    Constant::Undefined => Op::Undefined,
                    Constant::Null => Op::Null,
                    Constant::Bool(b) => Op::Bool(*b),
                    Constant::Number(n) => Op::Number(*n),
                    Constant::String(s) => Op::String(self.string(s)),
                    Constant::Array(_) => Op::Array,
                };
                self.emit(op, 1);
            }
            Expr::System(name) => {
                self.emit(Op::System(name), 1);
            }
            Expr::Application(name) => {
                let i = self.string(name);
                self.emit(Op::Application(i), 1);
            }
            Expr::DollarApplication(name) => {
                let i = self.string(name);
                self.emit(Op::DollarApplication(i), 1);
            }
            Expr::Body(path) => {
                self.reads_body = true;
                let i = self.path(path);
                self.emit(Op::Body(i), 1);
            }
            Expr::Twin(section, path) => {
                self.reads_twin = true;
                let i = self.path(path);
                self.emit(Op::Twin(*section, i), 1);
            }
            Expr::Unary(op, inner) => {
                self.expr(inner);
                let op = match op {
                    UnaryOp::Not => Op::Not,
                    UnaryOp::Neg => Op::Neg,
                };
                self.emit(op, 0);
            }
            Expr::Binary(op @ (BinaryOp::And | BinaryOp::Or), left, right) => {
                self.expr(left);
                let (jump, combine) = match op {
                    BinaryOp::And => (Op::JumpIfFalse(0), Op::And),
                    _ => (Op::JumpIfTrue(0), Op::Or),
                };
                let at = self.emit(jump, 0);
                self.expr(right);
                self.emit(combine, -1);
                let target = self.ops.len() as u32;
                self.ops[at] = match jump {
                    Op::JumpIfFalse(_) => Op::JumpIfFalse(target),
                    _ => Op::JumpIfTrue(target),
                };
            }
            // A property compared with a string constant, either way round.
            Expr::Binary(BinaryOp::Eq, left, right)
                if matches!(
                    (&**left, &**right),
                    (
                        Expr::System(_) | Expr::Application(_),
                        Expr::Constant(Constant::String(_))
                    ) | (
                        Expr::Constant(Constant::String(_)),
                        Expr::System(_) | Expr::Application(_)
                    )
                ) =>
            {
                let (property, constant) = match (&**left, &**right) {
                    (Expr::Constant(Constant::String(c)), property) => (property, c),
                    (property, Expr::Constant(Constant::String(c))) => (property, c),
                    _ => return,
                };
                let constant = self.string(constant);
                let op = match property {
                    Expr::System(name) => Op::SystemEq(name, constant),
                    Expr::Application(name) => Op::ApplicationEq(self.string(name), constant),
                    _ => return,
                };
                self.emit(op, 1);
            }
            Expr::Binary(op, left, right) => {
                self.expr(left);
                self.expr(right);
                let op = match op {
                    BinaryOp::Add => Op::Add,
                    BinaryOp::Sub => Op::Sub,
                    BinaryOp::Mul => Op::Mul,
                    BinaryOp::Div => Op::Div,
                    BinaryOp::Mod => Op::Mod,
                    BinaryOp::Eq => Op::Eq,
                    BinaryOp::Ne => Op::Ne,
                    BinaryOp::Lt => Op::Lt,
                    BinaryOp::Gt => Op::Gt,
                    BinaryOp::Le => Op::Le,
                    BinaryOp::Ge => Op::Ge,
                    BinaryOp::And | BinaryOp::Or => Op::And, // handled above
                };
                self.emit(op, -1);
            }
            Expr::Call(function, args) => match (function, args.as_slice()) {
                (Function::Concat, [first, rest @ ..]) => {
                    self.expr(first);
                    for arg in rest {
                        self.expr(arg);
                        self.emit(Op::Call(Function::Concat), -1);
                    }
                }
                (Function::Substring, [s, start, length]) => {
                    self.expr(s);
                    self.expr(start);
                    self.expr(length);
                    self.emit(Op::Substring3, -2);
                }
                (function, args) => {
                    for arg in args {
                        self.expr(arg);
                    }
                    let delta = 1 - args.len() as isize;
                    self.emit(Op::Call(*function), delta);
                }
            },
        }
    }
}
