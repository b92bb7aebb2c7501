//! The common shape of a route condition, evaluated without the stack machine: one comparison of
//! a property with a string constant (`level = 'critical'`, `$connectionDeviceId <> 'x'`), or an
//! `AND` or `OR` chain of them. A table looks each property such conditions read up once per
//! message (a slot per distinct property) however many routes read it, and turns the value into
//! the number of the constant it equals (one hash), so twenty routes on two properties cost two
//! look-ups, two hashes and twenty integer comparisons.
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

/// The string constants one slot's property is compared with, numbered: a message's value is
/// turned into its number once (one hash), and each comparison is then one of integers.
#[derive(Debug, Clone, Default)]
struct Constants {
    names: Vec<Box<str>>,
    /// Open addressing on the xxh3 of a constant: (hash, number); `u32::MAX` marks an empty
    /// entry. Its length is a power of two at least twice the constants.
    index: Vec<(u64, u32)>,
}

/// A value that is none of the slot's constants.
const OTHER: u32 = u32::MAX - 1;
/// An absent property.
const ABSENT: u32 = u32::MAX;
/// Up to this many constants a slot compares directly instead of hashing.
const LINEAR_MAX: usize = 4;

impl Constants {
    fn id(&mut self, constant: &str) -> u32 {
        if let Some(id) = self.names.iter().position(|n| &**n == constant) {
            return id as u32;
        }
        self.names.push(constant.into());
        let size = (self.names.len() * 2).next_power_of_two();
        self.index = vec![(0, ABSENT); size];
        for (id, name) in self.names.iter().enumerate() {
            let hash = xxhash_rust::xxh3::xxh3_64(name.as_bytes());
            let mut at = hash as usize & (size - 1);
            while self.index[at].1 != ABSENT {
                at = (at + 1) & (size - 1);
            }
            self.index[at] = (hash, id as u32);
        }
        (self.names.len() - 1) as u32
    }

    /// The number of `value` among the constants, or [`OTHER`].
    #[inline]
    fn find(&self, value: &str) -> u32 {
        if self.names.len() <= LINEAR_MAX {
            return self
                .names
                .iter()
                .position(|n| &**n == value)
                .map_or(OTHER, |i| i as u32);
        }
        let hash = xxhash_rust::xxh3::xxh3_64(value.as_bytes());
        let mask = self.index.len() - 1;
        let mut at = hash as usize & mask;
        while let Some(&(h, id)) = self.index.get(at) {
            if id == ABSENT {
                break;
            }
            if h == hash && self.names.get(id as usize).is_some_and(|n| &**n == value) {
                return id;
            }
            at = (at + 1) & mask;
        }
        OTHER
    }
}

/// The properties simple conditions read, by slot, with the constants each is compared with.
#[derive(Debug, Clone, Default)]
pub(super) struct Slots {
    properties: Vec<Property>,
    constants: Vec<Constants>,
}

impl Slots {
    /// The number of the message's value of `slot` among its constants, [`OTHER`] or
    /// [`ABSENT`].
    fn lookup<M: MessageView + ?Sized>(&self, slot: usize, message: &M) -> u32 {
        let value = match self.properties.get(slot) {
            Some(Property::System(name)) => message.system_property(name),
            Some(Property::Application(name)) => message.application_property(name),
            None => None,
        };
        match (value, self.constants.get(slot)) {
            (Some(value), Some(constants)) => constants.find(value),
            (Some(_), None) => OTHER,
            (None, _) => ABSENT,
        }
    }
}

#[derive(Debug, Clone)]
struct Term {
    slot: usize,
    /// The constant's number in its slot.
    constant: u32,
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

/// What one message's properties are, by slot: `known` has a bit per slot looked up, `ids` its
/// constant number. Slots past [`MEMO_SLOTS`] are looked up every time.
pub(super) struct Memo {
    known: u16,
    ids: [u32; MEMO_SLOTS],
}

/// Distinct properties remembered per message.
pub(super) const MEMO_SLOTS: usize = 16;

impl Memo {
    pub fn new() -> Memo {
        Memo {
            known: 0,
            ids: [ABSENT; MEMO_SLOTS],
        }
    }

    #[inline]
    fn get<M: MessageView + ?Sized>(&mut self, slot: usize, slots: &Slots, message: &M) -> u32 {
        if slot >= MEMO_SLOTS {
            return slots.lookup(slot, message);
        }
        let bit = 1u16 << slot;
        if self.known & bit == 0 {
            self.known |= bit;
            self.ids[slot] = slots.lookup(slot, message);
        }
        self.ids[slot]
    }
}

/// The comparison `property = 'constant'` (either way round), or `!=`/`<>`.
fn term(expr: &Expr, slots: &mut Slots) -> Option<Term> {
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
    let slot = match slots.properties.iter().position(|p| *p == property) {
        Some(slot) => slot,
        None => {
            slots.properties.push(property);
            slots.constants.push(Constants::default());
            slots.properties.len() - 1
        }
    };
    let constant = slots.constants.get_mut(slot)?.id(constant);
    Some(Term {
        slot,
        constant,
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
    /// `expr` as a simple condition, registering the properties and constants it reads in
    /// `slots`; `None` (and `slots` unchanged) when it has another shape.
    pub fn from_expr(expr: &Expr, slots: &mut Slots) -> Option<Simple> {
        let all = !matches!(expr, Expr::Binary(BinaryOp::Or, ..));
        let mut leaves = Vec::new();
        chain(
            expr,
            if all { BinaryOp::And } else { BinaryOp::Or },
            &mut leaves,
        );
        let mut added = slots.clone();
        let terms = leaves
            .into_iter()
            .map(|leaf| term(leaf, &mut added))
            .collect::<Option<Vec<_>>>()?;
        *slots = added;
        Some(Simple {
            terms: terms.into_boxed_slice(),
            all,
        })
    }

    pub fn evaluate<M: MessageView + ?Sized>(
        &self,
        slots: &Slots,
        message: &M,
        memo: &mut Memo,
    ) -> Outcome {
        let mut undefined = false;
        for term in self.terms.iter() {
            let id = memo.get(term.slot, slots, message);
            if id == ABSENT {
                undefined = true;
                continue;
            }
            let holds = (id == term.constant) == term.equal;
            if holds != self.all {
                // `false` decides an AND, `true` an OR.
                return if holds {
                    Outcome::Match
                } else {
                    Outcome::NoMatch
                };
            }
        }
        match (undefined, self.all) {
            (true, _) => Outcome::Undefined,
            (false, true) => Outcome::Match,
            (false, false) => Outcome::NoMatch,
        }
    }
}
