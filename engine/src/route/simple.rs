//! The common shape of a route condition, evaluated without the stack machine: one comparison of
//! a property with a string constant (`level = 'critical'`, `$connectionDeviceId <> 'x'`), or an
//! `AND` or `OR` chain of them. A table looks each property such conditions read up once per
//! message (a slot per distinct property) however many routes read it, so twenty routes on two
//! properties cost two look-ups and twenty string comparisons.
//!
//! The result is the one the compiled program gives (checked against it in `tests.rs`): a
//! comparison with an absent property is `undefined`; `AND` is `false` if any side is, else
//! `undefined` if any side is, else `true`; `OR` the other way round.

use super::message::MessageView;
use super::parse::{BinaryOp, Constant, Expr};
use super::Outcome;

/// A property that simple conditions read, by its table-wide slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Property {
    /// By stored name.
    System(&'static str),
    /// By lowercase name.
    Application(Box<str>),
}

#[derive(Debug, Clone)]
struct Term {
    slot: usize,
    constant: Box<str>,
    /// `=` (else `!=`).
    equal: bool,
}

/// A simple condition.
#[derive(Debug, Clone)]
pub(super) struct Simple {
    terms: Box<[Term]>,
    /// An `AND` chain (or a single comparison); else an `OR` chain.
    all: bool,
}

/// Properties looked up for one message, by slot: `known` has a bit per slot looked up, and
/// `values` its value (`None`: absent). Slots past [`MEMO_SLOTS`] are looked up every time.
pub(super) struct Memo<'m> {
    known: u16,
    values: [Option<&'m str>; MEMO_SLOTS],
}

/// Distinct properties remembered per message.
pub(super) const MEMO_SLOTS: usize = 16;

impl<'m> Memo<'m> {
    pub fn new() -> Memo<'m> {
        Memo {
            known: 0,
            values: [None; MEMO_SLOTS],
        }
    }

    #[inline]
    fn get<M: MessageView + ?Sized>(
        &mut self,
        slot: usize,
        properties: &[Property],
        message: &'m M,
    ) -> Option<&'m str> {
        let lookup = || match properties.get(slot)? {
            Property::System(name) => message.system_property(name),
            Property::Application(name) => message.application_property(name),
        };
        if slot >= MEMO_SLOTS {
            return lookup();
        }
        let bit = 1u16 << slot;
        if self.known & bit == 0 {
            self.known |= bit;
            self.values[slot] = lookup();
        }
        self.values[slot]
    }
}

/// The comparison `property = 'constant'` (either way round), or `!=`/`<>`.
fn term(expr: &Expr, properties: &mut Vec<Property>) -> Option<Term> {
    let Expr::Binary(op @ (BinaryOp::Eq | BinaryOp::Ne), left, right) = expr else {
        return None;
    };
    let (property, constant) = match (&**left, &**right) {
        (p, Expr::Constant(Constant::String(s))) | (Expr::Constant(Constant::String(s)), p) => {
            (p, s)
        }
        _ => return None,
    };
    let property = match property {
        Expr::System(name) => Property::System(name),
        Expr::Application(name) => Property::Application(name.as_str().into()),
        _ => return None,
    };
    let slot = match properties.iter().position(|p| *p == property) {
        Some(slot) => slot,
        None => {
            properties.push(property);
            properties.len() - 1
        }
    };
    Some(Term {
        slot,
        constant: constant.as_str().into(),
        equal: *op == BinaryOp::Eq,
    })
}

/// The leaves of a chain of `op`.
fn chain<'e>(expr: &'e Expr, op: BinaryOp, out: &mut Vec<&'e Expr>) {
    match expr {
        Expr::Binary(o, left, right) if *o == op => {
            chain(left, op, out);
            chain(right, op, out);
        }
        other => out.push(other),
    }
}

impl Simple {
    /// `expr` as a simple condition, registering the properties it reads in `properties`; `None`
    /// (and `properties` unchanged) when it has another shape.
    pub fn from_expr(expr: &Expr, properties: &mut Vec<Property>) -> Option<Simple> {
        let all = !matches!(expr, Expr::Binary(BinaryOp::Or, ..));
        let mut leaves = Vec::new();
        chain(
            expr,
            if all { BinaryOp::And } else { BinaryOp::Or },
            &mut leaves,
        );
        let mut added = properties.clone();
        let terms = leaves
            .into_iter()
            .map(|leaf| term(leaf, &mut added))
            .collect::<Option<Vec<_>>>()?;
        *properties = added;
        Some(Simple {
            terms: terms.into_boxed_slice(),
            all,
        })
    }

    pub fn evaluate<'m, M: MessageView + ?Sized>(
        &self,
        properties: &[Property],
        message: &'m M,
        memo: &mut Memo<'m>,
    ) -> Outcome {
        let mut undefined = false;
        for term in self.terms.iter() {
            match memo.get(term.slot, properties, message) {
                None => undefined = true,
                Some(value) => {
                    let holds = (value == &*term.constant) == term.equal;
                    if holds != self.all {
                        // `false` decides an AND, `true` an OR.
                        return if holds {
                            Outcome::Match
                        } else {
                            Outcome::NoMatch
                        };
                    }
                }
            }
        }
        match (undefined, self.all) {
            (true, _) => Outcome::Undefined,
            (false, true) => Outcome::Match,
            (false, false) => Outcome::NoMatch,
        }
    }
}
