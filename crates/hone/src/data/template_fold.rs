//! Refuses chat templates whose constant expressions would be folded into huge values while
//! compiling. minijinja evaluates constant expressions when it compiles a template, before and
//! outside fuel: it bounds strings there, but a repeated list literal (`['x'] * 6666666`) stays
//! lazy and is then turned into text or compared in full by the expression around it — seconds
//! and hundreds of MB per expression, in `ChatTemplate::new`, for a 137-byte template (found by
//! `cargo xtask fuzz --target chat_template`). This walks the parsed template once, estimates
//! what every constant expression would make, and refuses one over [`FOLD_LIMIT`] by line.
//! No real chat template multiplies constant lists; the estimate is an upper bound.

use minijinja::machinery::ast::{BinOpKind, CallArg, Expr, Stmt, UnaryOpKind};

/// The most data one constant expression may stand for (bytes of text, 24 per list item).
pub const FOLD_LIMIT: u64 = 1 << 20;

/// What a constant expression folds into: a number (its value when it is an integer hone can
/// follow exactly), or data of about this many bytes.
#[derive(Clone, Copy)]
enum Folded {
    Num(Option<i128>),
    Data(u64),
}

impl Folded {
    fn bytes(self) -> u64 {
        match self {
            Folded::Num(_) => 40,
            Folded::Data(n) => n,
        }
    }
}

/// `Err((line, bytes))` for the first constant expression over [`FOLD_LIMIT`]; templates that do
/// not parse are left to minijinja, which names the error.
pub fn check(source: &str) -> Result<(), (usize, u64)> {
    let Ok(ast) = minijinja::machinery::parse(source, "chat", Default::default()) else {
        return Ok(());
    };
    let mut walk = Walk { over: None };
    walk.stmt(&ast);
    walk.over.map_or(Ok(()), Err)
}

struct Walk {
    over: Option<(usize, u64)>,
}

impl Walk {
    fn stmts(&mut self, body: &[Stmt]) {
        body.iter().for_each(|s| self.stmt(s));
    }

    fn stmt(&mut self, s: &Stmt) {
        match s {
            Stmt::Template(t) => self.stmts(&t.children),
            Stmt::EmitExpr(e) => self.visit(&e.expr),
            Stmt::EmitRaw(_) | Stmt::Continue(_) | Stmt::Break(_) => {}
            Stmt::ForLoop(f) => {
                self.visit(&f.target);
                self.visit(&f.iter);
                f.filter_expr.iter().for_each(|e| self.visit(e));
                self.stmts(&f.body);
                self.stmts(&f.else_body);
            }
            Stmt::IfCond(c) => {
                self.visit(&c.expr);
                self.stmts(&c.true_body);
                self.stmts(&c.false_body);
            }
            Stmt::WithBlock(w) => {
                w.assignments.iter().for_each(|(a, b)| {
                    self.visit(a);
                    self.visit(b);
                });
                self.stmts(&w.body);
            }
            Stmt::Set(s) => {
                self.visit(&s.target);
                self.visit(&s.expr);
            }
            Stmt::SetBlock(s) => {
                self.visit(&s.target);
                s.filter.iter().for_each(|e| self.visit(e));
                self.stmts(&s.body);
            }
            Stmt::AutoEscape(a) => {
                self.visit(&a.enabled);
                self.stmts(&a.body);
            }
            Stmt::FilterBlock(f) => {
                self.visit(&f.filter);
                self.stmts(&f.body);
            }
            Stmt::Block(b) => self.stmts(&b.body),
            Stmt::Import(i) => {
                self.visit(&i.expr);
                self.visit(&i.name);
            }
            Stmt::FromImport(i) => {
                self.visit(&i.expr);
                i.names.iter().for_each(|(a, b)| {
                    self.visit(a);
                    b.iter().for_each(|e| self.visit(e));
                });
            }
            Stmt::Extends(e) => self.visit(&e.name),
            Stmt::Include(i) => self.visit(&i.name),
            Stmt::Macro(m) => {
                m.args.iter().chain(&m.defaults).for_each(|e| self.visit(e));
                self.stmts(&m.body);
            }
            Stmt::CallBlock(c) => {
                self.visit(&c.call.expr);
                self.args(&c.call.args);
                c.macro_decl
                    .args
                    .iter()
                    .chain(&c.macro_decl.defaults)
                    .for_each(|e| self.visit(e));
                self.stmts(&c.macro_decl.body);
            }
            Stmt::Do(d) => {
                self.visit(&d.call.expr);
                self.args(&d.call.args);
            }
        }
    }

    fn args(&mut self, args: &[CallArg]) {
        for a in args {
            match a {
                CallArg::Pos(e)
                | CallArg::Kwarg(_, e)
                | CallArg::PosSplat(e)
                | CallArg::KwargSplat(e) => self.visit(e),
            }
        }
    }

    fn visit(&mut self, e: &Expr) {
        let _ = self.expr(e);
    }

    /// Visits `e` and everything in it once; returns what `e` folds into, `None` when it is not
    /// constant (so minijinja leaves it to run time, where fuel counts).
    fn expr(&mut self, e: &Expr) -> Option<Folded> {
        let folded = match e {
            Expr::Const(c) => Some(constant(&c.value)),
            Expr::List(l) => self.items(&l.items),
            Expr::Tuple(t) => self.items(&t.items),
            Expr::Map(m) => {
                let keys = self.items(&m.keys);
                let values = self.items(&m.values);
                Some(Folded::Data(keys?.bytes().saturating_add(values?.bytes())))
            }
            Expr::UnaryOp(u) => match (&u.op, self.expr(&u.expr)?) {
                (UnaryOpKind::Neg, Folded::Num(n)) => {
                    Some(Folded::Num(n.and_then(i128::checked_neg)))
                }
                (UnaryOpKind::Neg, data) => Some(data),
                (UnaryOpKind::Not, _) => Some(Folded::Num(None)),
            },
            Expr::BinOp(b) => {
                let (l, r) = (self.expr(&b.left), self.expr(&b.right));
                binop(b.op, l?, r?)
            }
            Expr::Compare(c) => {
                let first = self.expr(&c.expr);
                let rest: Vec<_> = c.ops.iter().map(|op| self.expr(&op.expr)).collect();
                first?;
                rest.into_iter().collect::<Option<Vec<_>>>()?;
                Some(Folded::Num(None))
            }
            Expr::Var(_) => None,
            Expr::Slice(s) => {
                self.visit(&s.expr);
                [&s.start, &s.stop, &s.step]
                    .into_iter()
                    .flatten()
                    .for_each(|e| self.visit(e));
                None
            }
            Expr::IfExpr(i) => {
                self.visit(&i.test_expr);
                self.visit(&i.true_expr);
                i.false_expr.iter().for_each(|e| self.visit(e));
                None
            }
            Expr::Filter(f) => {
                f.expr.iter().for_each(|e| self.visit(e));
                self.args(&f.args);
                None
            }
            Expr::Test(t) => {
                self.visit(&t.expr);
                self.args(&t.args);
                None
            }
            Expr::GetAttr(g) => {
                self.visit(&g.expr);
                None
            }
            Expr::GetItem(g) => {
                self.visit(&g.expr);
                self.visit(&g.subscript_expr);
                None
            }
            Expr::Call(c) => {
                self.visit(&c.expr);
                self.args(&c.args);
                None
            }
        };
        if let Some(Folded::Data(n)) = folded {
            if n > FOLD_LIMIT && self.over.is_none() {
                self.over = Some((e.span().start_line as usize, n));
            }
        }
        folded
    }

    /// A list, tuple or map literal folds only when every item is a literal (as minijinja does).
    fn items(&mut self, items: &[Expr]) -> Option<Folded> {
        let mut bytes = 0u64;
        let mut all_literal = true;
        for item in items {
            let f = self.expr(item);
            all_literal &= matches!(item, Expr::Const(_));
            bytes = bytes
                .saturating_add(24)
                .saturating_add(f.map_or(0, Folded::bytes));
        }
        all_literal.then_some(Folded::Data(bytes))
    }
}

fn constant(v: &minijinja::Value) -> Folded {
    if let Some(s) = v.as_str() {
        return Folded::Data(s.len() as u64);
    }
    if v.is_integer() {
        return Folded::Num(i128::try_from(v.clone()).ok());
    }
    if v.is_number() {
        return Folded::Num(None);
    }
    Folded::Data(8)
}

fn binop(op: BinOpKind, l: Folded, r: Folded) -> Option<Folded> {
    use Folded::{Data, Num};
    let data = Data(l.bytes().saturating_add(r.bytes()));
    Some(match (op, l, r) {
        (BinOpKind::Mul, Num(a), Num(b)) => Num(a.zip(b).and_then(|(a, b)| a.checked_mul(b))),
        // Repeating text or a list: by a count hone can follow, or refused as unbounded.
        (BinOpKind::Mul, Data(d), Num(n)) | (BinOpKind::Mul, Num(n), Data(d)) => match n {
            Some(n) => Data(d.saturating_mul(n.clamp(0, u64::MAX as i128) as u64)),
            None => Data(u64::MAX),
        },
        (BinOpKind::Add, Num(a), Num(b)) => Num(a.zip(b).and_then(|(a, b)| a.checked_add(b))),
        (BinOpKind::Sub, Num(a), Num(b)) => Num(a.zip(b).and_then(|(a, b)| a.checked_sub(b))),
        (BinOpKind::FloorDiv, Num(a), Num(b)) => {
            Num(a.zip(b).and_then(|(a, b)| a.checked_div_euclid(b)))
        }
        (BinOpKind::Rem, Num(a), Num(b)) => {
            Num(a.zip(b).and_then(|(a, b)| a.checked_rem_euclid(b)))
        }
        (BinOpKind::Pow, Num(a), Num(b)) => Num(a
            .zip(b)
            .and_then(|(a, b)| u32::try_from(b).ok().and_then(|b| a.checked_pow(b)))),
        (BinOpKind::Div, Num(_), Num(_)) => Num(None),
        (
            BinOpKind::Eq
            | BinOpKind::Ne
            | BinOpKind::Lt
            | BinOpKind::Lte
            | BinOpKind::Gt
            | BinOpKind::Gte,
            _,
            _,
        ) => Num(None),
        // `and`/`or` give one side; text, lists and anything else: the two together at most.
        (BinOpKind::ScAnd | BinOpKind::ScOr, Num(_), Num(_)) => Num(None),
        _ => data,
    })
}
