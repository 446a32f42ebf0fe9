//! The compiled form of a condition and its allocation-free evaluation.
//!
//! Evaluation only borrows: `&Value` / `&str` from the rows, and literals from the tree.

use std::cmp::Ordering;

use serde_json::{Map, Number, Value};

/// A numeric value, kept exact for integers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Num {
    I(i64),
    U(u64),
    F(f64),
}

impl Num {
    #[inline]
    fn from_json(n: &Number) -> Num {
        if let Some(i) = n.as_i64() {
            Num::I(i)
        } else if let Some(u) = n.as_u64() {
            Num::U(u)
        } else {
            Num::F(n.as_f64().unwrap_or(f64::NAN))
        }
    }

    #[inline]
    fn as_f64(self) -> f64 {
        match self {
            Num::I(i) => i as f64,
            Num::U(u) => u as f64,
            Num::F(f) => f,
        }
    }

    #[inline]
    fn cmp(self, other: Num) -> Option<Ordering> {
        match (self, other) {
            (Num::I(a), Num::I(b)) => Some(a.cmp(&b)),
            (Num::U(a), Num::U(b)) => Some(a.cmp(&b)),
            (Num::I(a), Num::U(b)) => Some(i128::from(a).cmp(&i128::from(b))),
            (Num::U(a), Num::I(b)) => Some(i128::from(a).cmp(&i128::from(b))),
            (a, b) => a.as_f64().partial_cmp(&b.as_f64()),
        }
    }
}

/// A literal of the condition language.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Lit {
    Null,
    Bool(bool),
    Num(Num),
    Str(Box<str>),
}

/// Which row a field reference reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Row {
    /// Bare field: the new row, or the old row when there is no new row (DELETE).
    Current,
    /// `field.old`
    Old,
    /// `field.new`
    New,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum CmpOp {
    Eq,
    Ne,
    Gt,
    Ge,
    Lt,
    Le,
}

/// A node of the compiled tree. Every node yields a value; boolean contexts use truthiness
/// (only JSON `true` is truthy).
#[derive(Debug, Clone)]
pub(super) enum Node {
    Lit(Lit),
    Field {
        path: Box<[Box<str>]>,
        row: Row,
    },
    Changed(Box<[Box<str>]>),
    Not(Box<Node>),
    And(Box<[Node]>),
    Or(Box<[Node]>),
    Cmp {
        op: CmpOp,
        lhs: Box<Node>,
        rhs: Box<Node>,
    },
    /// `field op literal` (the common case, without the indirections of `Cmp`).
    FieldLit {
        path: Box<[Box<str>]>,
        row: Row,
        op: CmpOp,
        lit: Lit,
    },
    /// `path.changed() && path op literal` fused: the new value is looked up once.
    ChangedTo {
        path: Box<[Box<str>]>,
        op: CmpOp,
        lit: Lit,
    },
}

/// A borrowed view of a value during evaluation.
#[derive(Debug, Clone, Copy)]
enum Val<'a> {
    Null,
    Bool(bool),
    Num(Num),
    Str(&'a str),
    /// An array or an object, compared structurally by `==`/`!=` only.
    Composite(&'a Value),
}

impl<'a> Val<'a> {
    #[inline]
    fn of(v: Option<&'a Value>) -> Val<'a> {
        match v {
            None | Some(Value::Null) => Val::Null,
            Some(Value::Bool(b)) => Val::Bool(*b),
            Some(Value::Number(n)) => Val::Num(Num::from_json(n)),
            Some(Value::String(s)) => Val::Str(s),
            Some(other) => Val::Composite(other),
        }
    }

    #[inline]
    fn lit(l: &'a Lit) -> Val<'a> {
        match l {
            Lit::Null => Val::Null,
            Lit::Bool(b) => Val::Bool(*b),
            Lit::Num(n) => Val::Num(*n),
            Lit::Str(s) => Val::Str(s),
        }
    }
}

/// `==` semantics: numbers numerically, same-type scalars by value, null == null,
/// composites structurally; different types are never equal.
#[inline]
fn equal(a: Val<'_>, b: Val<'_>) -> bool {
    match (a, b) {
        (Val::Null, Val::Null) => true,
        (Val::Bool(x), Val::Bool(y)) => x == y,
        (Val::Num(x), Val::Num(y)) => x.cmp(y) == Some(Ordering::Equal),
        (Val::Str(x), Val::Str(y)) => x == y,
        (Val::Composite(x), Val::Composite(y)) => x == y,
        _ => false,
    }
}

/// Ordering: numbers numerically, strings lexicographically; anything else is unordered.
#[inline]
fn order(a: Val<'_>, b: Val<'_>) -> Option<Ordering> {
    match (a, b) {
        (Val::Num(x), Val::Num(y)) => x.cmp(y),
        (Val::Str(x), Val::Str(y)) => Some(x.cmp(y)),
        _ => None,
    }
}

#[inline]
fn compare(op: CmpOp, a: Val<'_>, b: Val<'_>) -> bool {
    match op {
        CmpOp::Eq => equal(a, b),
        CmpOp::Ne => !equal(a, b),
        CmpOp::Gt => order(a, b) == Some(Ordering::Greater),
        CmpOp::Ge => matches!(order(a, b), Some(Ordering::Greater | Ordering::Equal)),
        CmpOp::Lt => order(a, b) == Some(Ordering::Less),
        CmpOp::Le => matches!(order(a, b), Some(Ordering::Less | Ordering::Equal)),
    }
}

/// The result of `op` given the operands' ordering (`None`: unordered).
#[inline]
fn holds(op: CmpOp, ord: Option<Ordering>) -> bool {
    match op {
        CmpOp::Eq => ord == Some(Ordering::Equal),
        CmpOp::Ne => ord != Some(Ordering::Equal),
        CmpOp::Gt => ord == Some(Ordering::Greater),
        CmpOp::Ge => matches!(ord, Some(Ordering::Greater | Ordering::Equal)),
        CmpOp::Lt => ord == Some(Ordering::Less),
        CmpOp::Le => matches!(ord, Some(Ordering::Less | Ordering::Equal)),
    }
}

/// `==`/`!=` only: ordering operators are false.
#[inline]
fn holds_eq(op: CmpOp, eq: bool) -> bool {
    match op {
        CmpOp::Eq => eq,
        CmpOp::Ne => !eq,
        _ => false,
    }
}

/// `value op lit`: the same semantics as [`compare`], dispatching on the literal's type.
#[inline]
fn compare_lit(op: CmpOp, value: Option<&Value>, lit: &Lit) -> bool {
    match (lit, value) {
        (Lit::Num(n), Some(Value::Number(x))) => holds(op, Num::from_json(x).cmp(*n)),
        (Lit::Str(s), Some(Value::String(x))) => match op {
            CmpOp::Eq => x.as_str() == &**s,
            CmpOp::Ne => x.as_str() != &**s,
            _ => holds(op, Some(x.as_str().cmp(s))),
        },
        (Lit::Bool(b), Some(Value::Bool(x))) => holds_eq(op, x == b),
        (Lit::Null, None | Some(Value::Null)) => holds_eq(op, true),
        // different types
        _ => op == CmpOp::Ne,
    }
}

/// The rows of one change event.
#[derive(Clone, Copy)]
pub(super) struct Rows<'v> {
    pub new: Option<&'v Value>,
    pub old: Option<&'v Value>,
}

impl<'v> Rows<'v> {
    #[inline]
    fn row(self, row: Row) -> Option<&'v Value> {
        match row {
            Row::Current => self.new.or(self.old),
            Row::Old => self.old,
            Row::New => self.new,
        }
    }
}

/// Objects up to this many entries are searched linearly: for typical rows (a handful of
/// columns) comparing a few short keys is several times cheaper than SipHash-ing the key
/// for `Map::get`. Larger objects use the hash index.
const LINEAR_SCAN_MAX: usize = 16;

/// `object[key]` without hashing for small objects.
#[inline]
fn get<'v>(object: &'v Map<String, Value>, key: &str) -> Option<&'v Value> {
    if object.len() <= LINEAR_SCAN_MAX {
        object
            .iter()
            .find_map(|(k, v)| same_key(k.as_bytes(), key.as_bytes()).then_some(v))
    } else {
        object.get(key)
    }
}

/// Key equality inlined for short keys (a `memcmp` call costs more than the comparison).
#[inline]
fn same_key(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x == y)
}

/// Follows `path` through nested objects; `None` (null) when a segment is missing or a
/// value on the way is not an object.
#[inline]
fn lookup<'v>(row: Option<&'v Value>, path: &[Box<str>]) -> Option<&'v Value> {
    let mut v = row?;
    for seg in path {
        v = get(v.as_object()?, seg)?;
    }
    Some(v)
}

impl CmpOp {
    /// The operator with its operands swapped (`a < b` is `b > a`).
    fn flipped(self) -> CmpOp {
        match self {
            CmpOp::Eq | CmpOp::Ne => self,
            CmpOp::Gt => CmpOp::Lt,
            CmpOp::Ge => CmpOp::Le,
            CmpOp::Lt => CmpOp::Gt,
            CmpOp::Le => CmpOp::Ge,
        }
    }
}

impl Node {
    /// Builds the conjunction of `nodes` (at least one). `p.changed() && p op literal`
    /// (in either order, anywhere in the conjunction) is fused into one node that reads
    /// the new value once; conjunction terms have no side effects, so this is exact.
    pub(super) fn and(mut nodes: Vec<Node>) -> Node {
        let mut i = 0;
        while i < nodes.len() {
            if let Node::Changed(changed) = &nodes[i] {
                let partner = nodes.iter().position(|n| {
                    matches!(n, Node::FieldLit { path, row: Row::Current | Row::New, .. }
                        if path == changed)
                });
                if let Some(j) = partner {
                    let Node::FieldLit { path, op, lit, .. } = nodes.remove(j) else {
                        unreachable!("matched above")
                    };
                    if j < i {
                        i -= 1;
                    }
                    nodes[i] = Node::ChangedTo { path, op, lit };
                }
            }
            i += 1;
        }
        if nodes.len() == 1 {
            nodes.pop().expect("one node")
        } else {
            Node::And(nodes.into_boxed_slice())
        }
    }

    /// Builds `lhs op rhs`, specialising `field op literal` (either way round).
    pub(super) fn comparison(op: CmpOp, lhs: Node, rhs: Node) -> Node {
        match (lhs, rhs) {
            (Node::Field { path, row }, Node::Lit(lit)) => Node::FieldLit { path, row, op, lit },
            (Node::Lit(lit), Node::Field { path, row }) => Node::FieldLit {
                path,
                row,
                op: op.flipped(),
                lit,
            },
            (lhs, rhs) => Node::Cmp {
                op,
                lhs: Box::new(lhs),
                rhs: Box::new(rhs),
            },
        }
    }

    /// Evaluates the node in a boolean context.
    pub(super) fn test(&self, rows: Rows<'_>) -> bool {
        match self {
            Node::Lit(l) => matches!(l, Lit::Bool(true)),
            Node::Field { path, row } => {
                matches!(lookup(rows.row(*row), path), Some(Value::Bool(true)))
            }
            Node::Changed(path) => match (rows.new, rows.old) {
                (Some(new), Some(old)) => !equal(
                    Val::of(lookup(Some(new), path)),
                    Val::of(lookup(Some(old), path)),
                ),
                _ => false,
            },
            Node::Not(inner) => !inner.test(rows),
            Node::And(nodes) => nodes.iter().all(|n| n.test(rows)),
            Node::Or(nodes) => nodes.iter().any(|n| n.test(rows)),
            Node::Cmp { op, lhs, rhs } => compare(*op, lhs.value(rows), rhs.value(rows)),
            Node::FieldLit { path, row, op, lit } => {
                compare_lit(*op, lookup(rows.row(*row), path), lit)
            }
            Node::ChangedTo { path, op, lit } => match (rows.new, rows.old) {
                (Some(new), Some(old)) => {
                    let now = lookup(Some(new), path);
                    compare_lit(*op, now, lit)
                        && !equal(Val::of(now), Val::of(lookup(Some(old), path)))
                }
                _ => false,
            },
        }
    }

    /// Evaluates the node as a value (comparison operand).
    #[inline]
    fn value<'a>(&'a self, rows: Rows<'a>) -> Val<'a> {
        match self {
            Node::Lit(l) => Val::lit(l),
            Node::Field { path, row } => Val::of(lookup(rows.row(*row), path)),
            other => Val::Bool(other.test(rows)),
        }
    }
}
