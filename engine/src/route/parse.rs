//! Lexer and recursive-descent parser of route conditions (azure-protocol.md section 7.2).
//!
//! The parser builds a small tree ([`Expr`]) that the compiler lowers to a flat program once; the
//! tree never reaches the ingest path. Every recursion is bounded: parentheses, `NOT`, unary
//! minus and function calls nest at most [`MAX_NESTING`] levels, and no tree is taller than
//! [`MAX_HEIGHT`] (a long flat `a OR b OR c ...` chain is a left-deep tree), so neither the parser,
//! the compiler nor dropping the tree can overflow the stack.

use std::fmt;

/// How deeply parentheses, `NOT`, unary minus, function calls and array literals may nest.
pub const MAX_NESTING: u32 = 64;
/// How tall the expression tree may be (counts operator chains, not only nesting).
pub const MAX_HEIGHT: u32 = 256;
/// Longest condition accepted, in bytes.
pub const MAX_CONDITION_BYTES: usize = 8 * 1024;

/// A condition that does not parse: the byte position in the condition text and what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("at {position}: {message}")]
pub struct ParseError {
    /// Byte offset into the condition where the problem was found.
    pub position: usize,
    /// What was expected, or why the text is refused.
    pub message: String,
}

fn error<T>(position: usize, message: impl Into<String>) -> Result<T, ParseError> {
    Err(ParseError {
        position,
        message: message.into(),
    })
}

/// A constant of the language. Arrays only appear as literals (`['a', 1]`) and are kept whole.
#[derive(Debug, Clone, PartialEq)]
pub enum Constant {
    Undefined,
    Null,
    Bool(bool),
    Number(f64),
    String(String),
    Array(Vec<Constant>),
}

/// One step of a `$body` or `$twin` path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathSegment {
    /// An object member, matched case-sensitively as JSON keys are.
    Key(String),
    /// An array element.
    Index(u32),
}

/// Which part of the sending device's twin a `$twin` reference reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TwinSection {
    Tags,
    Desired,
    Reported,
}

/// A system property keyword and the stored name it reads (`store::format::property_name`).
pub(crate) const SYSTEM_PROPERTIES: &[(&str, &str)] = {
    use crate::store::format::property_name as p;
    &[
        ("contenttype", p::CONTENT_TYPE),
        ("contentencoding", p::CONTENT_ENCODING),
        ("messageid", p::MESSAGE_ID),
        ("correlationid", p::CORRELATION_ID),
        ("userid", p::USER_ID),
        ("connectiondeviceid", p::CONNECTION_DEVICE_ID),
        ("connectionmoduleid", p::CONNECTION_MODULE_ID),
        (
            "connectiondevicegenerationid",
            p::CONNECTION_AUTH_GENERATION_ID,
        ),
        ("connectionauthmethod", p::CONNECTION_AUTH_METHOD),
        ("enqueuedtime", p::ENQUEUED_TIME),
        ("dt-dataschema", p::DATA_SCHEMA),
        ("dt-subject", p::SUBJECT),
    ]
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnaryOp {
    Not,
    Neg,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
    Mod,
    And,
    Or,
    Eq,
    Ne,
    Lt,
    Gt,
    Le,
    Ge,
}

/// The built-in functions, with their argument counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Function {
    Abs,
    Exp,
    Power,
    Square,
    Ceiling,
    Floor,
    Sign,
    Sqrt,
    AsNumber,
    IsArray,
    IsBool,
    IsDefined,
    IsNull,
    IsNumber,
    IsObject,
    IsPrimitive,
    IsString,
    Concat,
    Length,
    Lower,
    Upper,
    Substring,
    IndexOf,
    StartsWith,
    EndsWith,
    Contains,
}

impl Function {
    fn from_name(lower: &str) -> Option<Function> {
        use Function::*;
        Some(match lower {
            "abs" => Abs,
            "exp" => Exp,
            "power" => Power,
            "square" => Square,
            "ceiling" => Ceiling,
            "floor" => Floor,
            "sign" => Sign,
            "sqrt" => Sqrt,
            "as_number" => AsNumber,
            "is_array" => IsArray,
            "is_bool" => IsBool,
            "is_defined" => IsDefined,
            "is_null" => IsNull,
            "is_number" => IsNumber,
            "is_object" => IsObject,
            "is_primitive" => IsPrimitive,
            "is_string" => IsString,
            "concat" => Concat,
            "length" => Length,
            "lower" => Lower,
            "upper" => Upper,
            "substring" => Substring,
            "index_of" => IndexOf,
            "starts_with" => StartsWith,
            "ends_with" => EndsWith,
            "contains" => Contains,
            _ => return None,
        })
    }

    /// The smallest and largest number of arguments (`None`: no upper bound).
    fn arity(self) -> (usize, Option<usize>) {
        use Function::*;
        match self {
            Power | IndexOf | StartsWith | EndsWith | Contains => (2, Some(2)),
            Substring => (2, Some(3)),
            Concat => (2, None),
            _ => (1, Some(1)),
        }
    }

    /// The name as Azure documents it.
    pub fn name(self) -> &'static str {
        use Function::*;
        match self {
            Abs => "ABS",
            Exp => "EXP",
            Power => "POWER",
            Square => "SQUARE",
            Ceiling => "CEILING",
            Floor => "FLOOR",
            Sign => "SIGN",
            Sqrt => "SQRT",
            AsNumber => "AS_NUMBER",
            IsArray => "IS_ARRAY",
            IsBool => "IS_BOOL",
            IsDefined => "IS_DEFINED",
            IsNull => "IS_NULL",
            IsNumber => "IS_NUMBER",
            IsObject => "IS_OBJECT",
            IsPrimitive => "IS_PRIMITIVE",
            IsString => "IS_STRING",
            Concat => "CONCAT",
            Length => "LENGTH",
            Lower => "LOWER",
            Upper => "UPPER",
            Substring => "SUBSTRING",
            IndexOf => "INDEX_OF",
            StartsWith => "STARTS_WITH",
            EndsWith => "ENDS_WITH",
            Contains => "CONTAINS",
        }
    }
}

/// A parsed condition.
#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    Constant(Constant),
    /// A system property keyword, resolved to its stored name.
    System(&'static str),
    /// An application property, by lowercase name.
    Application(String),
    /// A `$name` that is not a system property keyword: the application property `$name`,
    /// else `name` (both lowercase; the second is `name[1..]`).
    DollarApplication(String),
    Body(Vec<PathSegment>),
    Twin(TwinSection, Vec<PathSegment>),
    Unary(UnaryOp, Box<Expr>),
    Binary(BinaryOp, Box<Expr>, Box<Expr>),
    Call(Function, Vec<Expr>),
}

#[derive(Debug, Clone, PartialEq)]
enum Token<'a> {
    Number(f64),
    String(String),
    /// A plain name (keywords, functions and application properties).
    Name(&'a str),
    /// A `$`-attribute with its path, as written (without the `$`).
    Dollar(&'a str),
    LParen,
    RParen,
    LBracket,
    RBracket,
    Comma,
    Plus,
    Minus,
    Star,
    Slash,
    Percent,
    Eq,
    Ne,
    Lt,
    Gt,
    Le,
    Ge,
    End,
}

impl fmt::Display for Token<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = match self {
            Token::Number(n) => return write!(f, "'{n}'"),
            Token::String(s) => return write!(f, "string '{s}'"),
            Token::Name(n) => return write!(f, "'{n}'"),
            Token::Dollar(n) => return write!(f, "'${n}'"),
            Token::LParen => "(",
            Token::RParen => ")",
            Token::LBracket => "[",
            Token::RBracket => "]",
            Token::Comma => ",",
            Token::Plus => "+",
            Token::Minus => "-",
            Token::Star => "*",
            Token::Slash => "/",
            Token::Percent => "%",
            Token::Eq => "=",
            Token::Ne => "!=",
            Token::Lt => "<",
            Token::Gt => ">",
            Token::Le => "<=",
            Token::Ge => ">=",
            Token::End => return f.write_str("end of input"),
        };
        write!(f, "'{text}'")
    }
}

/// Characters that end a name or a path segment: whitespace (checked apart), the separators
/// Azure forbids in names and paths (`()<>@,;:\"/?={}`), path punctuation and the operators
/// that are not also name characters. `-` belongs to names (`$dt-dataschema`), so write
/// `a - b` with spaces.
fn is_name_char(c: char) -> bool {
    !c.is_whitespace()
        && !matches!(
            c,
            '(' | ')'
                | '<'
                | '>'
                | '@'
                | ','
                | ';'
                | ':'
                | '\\'
                | '"'
                | '/'
                | '?'
                | '='
                | '{'
                | '}'
                | '['
                | ']'
                | '.'
                | '\''
                | '!'
                | '+'
                | '*'
                | '%'
        )
}

struct Lexer<'a> {
    text: &'a str,
    pos: usize,
}

impl<'a> Lexer<'a> {
    fn peek_char(&self) -> Option<char> {
        self.text[self.pos..].chars().next()
    }

    fn skip_whitespace(&mut self) {
        while let Some(c) = self.peek_char() {
            if !c.is_whitespace() {
                break;
            }
            self.pos += c.len_utf8();
        }
    }

    fn take_while(&mut self, f: impl Fn(char) -> bool) -> &'a str {
        let start = self.pos;
        while let Some(c) = self.peek_char() {
            if !f(c) {
                break;
            }
            self.pos += c.len_utf8();
        }
        &self.text[start..self.pos]
    }

    /// The next token and the byte position where it starts.
    fn next(&mut self) -> Result<(Token<'a>, usize), ParseError> {
        self.skip_whitespace();
        let start = self.pos;
        let Some(c) = self.peek_char() else {
            return Ok((Token::End, start));
        };
        let rest = &self.text[self.pos..];
        let two = |s: &str| rest.starts_with(s);
        let (token, len) = match c {
            '(' => (Token::LParen, 1),
            ')' => (Token::RParen, 1),
            '[' => (Token::LBracket, 1),
            ']' => (Token::RBracket, 1),
            ',' => (Token::Comma, 1),
            '+' => (Token::Plus, 1),
            '-' => (Token::Minus, 1),
            '*' => (Token::Star, 1),
            '/' => (Token::Slash, 1),
            '%' => (Token::Percent, 1),
            '=' => (Token::Eq, 1),
            '!' if two("!=") => (Token::Ne, 2),
            '<' if two("<>") => (Token::Ne, 2),
            '<' if two("<=") => (Token::Le, 2),
            '<' => (Token::Lt, 1),
            '>' if two(">=") => (Token::Ge, 2),
            '>' => (Token::Gt, 1),
            '\'' | '"' => return self.string(c).map(|s| (Token::String(s), start)),
            '0'..='9' => return self.number().map(|n| (Token::Number(n), start)),
            '.' if rest[1..].starts_with(|c: char| c.is_ascii_digit()) => {
                return self.number().map(|n| (Token::Number(n), start))
            }
            '$' => {
                self.pos += 1;
                // The name, then for $body/$twin any `.segment` and `[index]` suffixes.
                self.take_while(is_name_char);
                loop {
                    match self.peek_char() {
                        Some('.') => {
                            self.pos += 1;
                            self.take_while(is_name_char);
                        }
                        Some('[') => {
                            self.take_while(|c| c != ']');
                            if self.peek_char() == Some(']') {
                                self.pos += 1;
                            }
                        }
                        _ => break,
                    }
                }
                return Ok((Token::Dollar(&self.text[start + 1..self.pos]), start));
            }
            c if is_name_char(c) => {
                let name = self.take_while(is_name_char);
                return Ok((Token::Name(name), start));
            }
            c => return error(start, format!("unexpected character '{c}'")),
        };
        self.pos += len;
        Ok((token, start))
    }

    fn number(&mut self) -> Result<f64, ParseError> {
        let start = self.pos;
        let rest = &self.text[start..];
        if rest.starts_with("0x") || rest.starts_with("0X") {
            self.pos += 2;
            let digits = self.take_while(|c| c.is_ascii_hexdigit());
            if digits.is_empty() {
                return error(start, "expected hexadecimal digits after '0x'");
            }
            let value = digits
                .bytes()
                .fold(0f64, |acc, b| acc * 16.0 + f64::from(hex_value(b)));
            return self.end_of_number(start, value);
        }
        self.take_while(|c| c.is_ascii_digit());
        if self.peek_char() == Some('.') {
            self.pos += 1;
            self.take_while(|c| c.is_ascii_digit());
        }
        if matches!(self.peek_char(), Some('e' | 'E')) {
            let mark = self.pos;
            self.pos += 1;
            if matches!(self.peek_char(), Some('+' | '-')) {
                self.pos += 1;
            }
            if self.take_while(|c| c.is_ascii_digit()).is_empty() {
                self.pos = mark;
            }
        }
        let text = &self.text[start..self.pos];
        match text.parse::<f64>() {
            Ok(value) if value.is_finite() => self.end_of_number(start, value),
            _ => error(start, format!("invalid number '{text}'")),
        }
    }

    /// A number directly followed by a name character (`12abc`) is refused.
    fn end_of_number(&mut self, start: usize, value: f64) -> Result<f64, ParseError> {
        match self.peek_char() {
            Some(c) if is_name_char(c) && c != '-' => {
                let end = self.pos;
                error(
                    start,
                    format!("invalid number '{}{c}'", &self.text[start..end]),
                )
            }
            _ => Ok(value),
        }
    }

    fn string(&mut self, quote: char) -> Result<String, ParseError> {
        let start = self.pos;
        self.pos += 1;
        let mut out = String::new();
        loop {
            let Some(c) = self.peek_char() else {
                return error(start, "unterminated string");
            };
            let at = self.pos;
            self.pos += c.len_utf8();
            match c {
                c if c == quote => return Ok(out),
                '\\' => {
                    let Some(e) = self.peek_char() else {
                        return error(start, "unterminated string");
                    };
                    self.pos += e.len_utf8();
                    match e {
                        '\'' | '"' | '\\' | '/' => out.push(e),
                        'b' => out.push('\u{8}'),
                        'f' => out.push('\u{c}'),
                        'n' => out.push('\n'),
                        'r' => out.push('\r'),
                        't' => out.push('\t'),
                        'u' => {
                            let unit = self.hex4(at)?;
                            let c = if (0xD800..0xDC00).contains(&unit) {
                                // A high surrogate must be followed by \u and a low surrogate.
                                let low = if self.text[self.pos..].starts_with("\\u") {
                                    self.pos += 2;
                                    self.hex4(at)?
                                } else {
                                    0
                                };
                                if !(0xDC00..0xE000).contains(&low) {
                                    return error(at, "unpaired surrogate in \\u escape");
                                }
                                char::from_u32(0x10000 + ((unit - 0xD800) << 10) + (low - 0xDC00))
                            } else {
                                char::from_u32(unit)
                            };
                            match c {
                                Some(c) => out.push(c),
                                None => return error(at, "unpaired surrogate in \\u escape"),
                            }
                        }
                        other => return error(at, format!("unknown escape '\\{other}'")),
                    }
                }
                c => out.push(c),
            }
        }
    }

    fn hex4(&mut self, at: usize) -> Result<u32, ParseError> {
        let digits = self.text.get(self.pos..self.pos + 4);
        match digits {
            Some(d) if d.bytes().all(|b| b.is_ascii_hexdigit()) => {
                self.pos += 4;
                Ok(d.bytes()
                    .fold(0, |acc, b| acc * 16 + u32::from(hex_value(b))))
            }
            _ => error(at, "expected 4 hexadecimal digits after '\\u'"),
        }
    }
}

fn hex_value(b: u8) -> u8 {
    match b {
        b'0'..=b'9' => b - b'0',
        b'a'..=b'f' => b - b'a' + 10,
        b'A'..=b'F' => b - b'A' + 10,
        _ => 0,
    }
}

/// Parses a route condition into its tree.
pub fn parse(text: &str) -> Result<Expr, ParseError> {
    if text.len() > MAX_CONDITION_BYTES {
        return error(
            MAX_CONDITION_BYTES,
            format!("condition longer than {MAX_CONDITION_BYTES} bytes"),
        );
    }
    let mut parser = Parser {
        lexer: Lexer { text, pos: 0 },
        token: Token::End,
        at: 0,
        nesting: 0,
    };
    parser.advance()?;
    if parser.token == Token::End {
        return error(0, "expected an expression but found end of input");
    }
    let (expr, _) = parser.or()?;
    if parser.token != Token::End {
        return parser.expected("an operator or end of input");
    }
    Ok(expr)
}

struct Parser<'a> {
    lexer: Lexer<'a>,
    token: Token<'a>,
    at: usize,
    nesting: u32,
}

/// An expression and the height of its tree.
type Parsed = (Expr, u32);

fn keyword(token: &Token<'_>, word: &str) -> bool {
    matches!(token, Token::Name(n) if n.eq_ignore_ascii_case(word))
}

impl<'a> Parser<'a> {
    fn advance(&mut self) -> Result<(), ParseError> {
        let (token, at) = self.lexer.next()?;
        self.token = token;
        self.at = at;
        Ok(())
    }

    fn expected<T>(&self, what: &str) -> Result<T, ParseError> {
        error(self.at, format!("expected {what} but found {}", self.token))
    }

    fn expect(&mut self, token: Token<'static>) -> Result<(), ParseError> {
        if self.token != token {
            return self.expected(&token.to_string());
        }
        self.advance()
    }

    fn enter(&mut self) -> Result<(), ParseError> {
        self.nesting += 1;
        if self.nesting > MAX_NESTING {
            return error(
                self.at,
                format!("expression nested deeper than {MAX_NESTING} levels"),
            );
        }
        Ok(())
    }

    fn binary(
        &self,
        op: BinaryOp,
        left: Parsed,
        right: Parsed,
        at: usize,
    ) -> Result<Parsed, ParseError> {
        let height = left.1.max(right.1) + 1;
        if height > MAX_HEIGHT {
            return error(at, format!("expression deeper than {MAX_HEIGHT} levels"));
        }
        Ok((
            Expr::Binary(op, Box::new(left.0), Box::new(right.0)),
            height,
        ))
    }

    fn or(&mut self) -> Result<Parsed, ParseError> {
        let mut left = self.and()?;
        while keyword(&self.token, "or") {
            let at = self.at;
            self.advance()?;
            let right = self.and()?;
            left = self.binary(BinaryOp::Or, left, right, at)?;
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Parsed, ParseError> {
        let mut left = self.not()?;
        while keyword(&self.token, "and") {
            let at = self.at;
            self.advance()?;
            let right = self.not()?;
            left = self.binary(BinaryOp::And, left, right, at)?;
        }
        Ok(left)
    }

    fn not(&mut self) -> Result<Parsed, ParseError> {
        if keyword(&self.token, "not") {
            self.enter()?;
            self.advance()?;
            let (inner, height) = self.not()?;
            self.nesting -= 1;
            return Ok((Expr::Unary(UnaryOp::Not, Box::new(inner)), height + 1));
        }
        self.comparison()
    }

    fn comparison(&mut self) -> Result<Parsed, ParseError> {
        let mut left = self.additive()?;
        loop {
            let op = match self.token {
                Token::Eq => BinaryOp::Eq,
                Token::Ne => BinaryOp::Ne,
                Token::Lt => BinaryOp::Lt,
                Token::Gt => BinaryOp::Gt,
                Token::Le => BinaryOp::Le,
                Token::Ge => BinaryOp::Ge,
                _ => return Ok(left),
            };
            let at = self.at;
            self.advance()?;
            let right = self.additive()?;
            left = self.binary(op, left, right, at)?;
        }
    }

    fn additive(&mut self) -> Result<Parsed, ParseError> {
        let mut left = self.multiplicative()?;
        loop {
            let op = match self.token {
                Token::Plus => BinaryOp::Add,
                Token::Minus => BinaryOp::Sub,
                _ => return Ok(left),
            };
            let at = self.at;
            self.advance()?;
            let right = self.multiplicative()?;
            left = self.binary(op, left, right, at)?;
        }
    }

    fn multiplicative(&mut self) -> Result<Parsed, ParseError> {
        let mut left = self.unary()?;
        loop {
            let op = match self.token {
                Token::Star => BinaryOp::Mul,
                Token::Slash => BinaryOp::Div,
                Token::Percent => BinaryOp::Mod,
                _ => return Ok(left),
            };
            let at = self.at;
            self.advance()?;
            let right = self.unary()?;
            left = self.binary(op, left, right, at)?;
        }
    }

    fn unary(&mut self) -> Result<Parsed, ParseError> {
        if self.token == Token::Minus {
            self.enter()?;
            self.advance()?;
            let (inner, height) = self.unary()?;
            self.nesting -= 1;
            // Fold `-3` into a constant so negative literals cost nothing at run time.
            let expr = match inner {
                Expr::Constant(Constant::Number(n)) => Expr::Constant(Constant::Number(-n)),
                other => Expr::Unary(UnaryOp::Neg, Box::new(other)),
            };
            return Ok((expr, height + 1));
        }
        self.primary()
    }

    fn primary(&mut self) -> Result<Parsed, ParseError> {
        let at = self.at;
        match std::mem::replace(&mut self.token, Token::End) {
            Token::Number(n) => {
                self.advance()?;
                Ok((Expr::Constant(Constant::Number(n)), 1))
            }
            Token::String(s) => {
                self.advance()?;
                Ok((Expr::Constant(Constant::String(s)), 1))
            }
            Token::LParen => {
                self.enter()?;
                self.advance()?;
                let inner = self.or()?;
                self.expect(Token::RParen)?;
                self.nesting -= 1;
                Ok(inner)
            }
            Token::LBracket => {
                self.enter()?;
                self.advance()?;
                let array = self.array_items()?;
                self.nesting -= 1;
                Ok((Expr::Constant(Constant::Array(array)), 1))
            }
            Token::Dollar(text) => {
                self.advance()?;
                Ok((dollar(text, at)?, 1))
            }
            Token::Name(name) => {
                self.advance()?;
                let lower = name.to_lowercase();
                let constant = match lower.as_str() {
                    "true" => Some(Constant::Bool(true)),
                    "false" => Some(Constant::Bool(false)),
                    "null" => Some(Constant::Null),
                    "undefined" => Some(Constant::Undefined),
                    _ => None,
                };
                if let Some(constant) = constant {
                    return Ok((Expr::Constant(constant), 1));
                }
                if matches!(lower.as_str(), "and" | "or" | "not") {
                    self.token = Token::Name(name);
                    self.at = at;
                    return self.expected("an expression");
                }
                if self.token == Token::LParen {
                    return self.call(name, &lower, at);
                }
                Ok((Expr::Application(lower), 1))
            }
            other => {
                self.token = other;
                self.expected("an expression")
            }
        }
    }

    fn array_items(&mut self) -> Result<Vec<Constant>, ParseError> {
        let mut items = Vec::new();
        loop {
            let (expr, _) = self.unary()?;
            match expr {
                Expr::Constant(c) => items.push(c),
                _ => {
                    return error(self.at, "array literals may only hold constants");
                }
            }
            match self.token {
                Token::Comma => self.advance()?,
                Token::RBracket => {
                    self.advance()?;
                    return Ok(items);
                }
                _ => return self.expected("',' or ']'"),
            }
        }
    }

    fn call(&mut self, name: &str, lower: &str, at: usize) -> Result<Parsed, ParseError> {
        let Some(function) = Function::from_name(lower) else {
            return error(at, format!("unknown function '{name}'"));
        };
        self.enter()?;
        self.advance()?; // (
        let mut args = Vec::new();
        let mut height = 0;
        if self.token != Token::RParen {
            loop {
                let (arg, h) = self.or()?;
                args.push(arg);
                height = height.max(h);
                match self.token {
                    Token::Comma => self.advance()?,
                    Token::RParen => break,
                    _ => return self.expected("',' or ')'"),
                }
            }
        }
        self.advance()?; // )
        self.nesting -= 1;
        let (min, max) = function.arity();
        if args.len() < min || max.is_some_and(|max| args.len() > max) {
            let wanted = match max {
                Some(max) if max == min => format!("{min}"),
                Some(max) => format!("{min} or {max}"),
                None => format!("at least {min}"),
            };
            return error(
                at,
                format!(
                    "{} takes {wanted} arguments, not {}",
                    function.name(),
                    args.len()
                ),
            );
        }
        // CONCAT compiles to a chain of pairs, one level per extra argument.
        let height = height + 1 + args.len().saturating_sub(2) as u32;
        if height > MAX_HEIGHT {
            return error(at, format!("expression deeper than {MAX_HEIGHT} levels"));
        }
        Ok((Expr::Call(function, args), height))
    }
}

/// A `$` attribute: a system property keyword, `$body.path`, `$twin.section.path`, or an
/// application property.
fn dollar(text: &str, at: usize) -> Result<Expr, ParseError> {
    let name_end = text.find(['.', '[']).unwrap_or(text.len());
    let name = &text[..name_end];
    let rest = &text[name_end..];
    let lower = name.to_lowercase();
    if name.is_empty() {
        return error(at, "expected a name after '$'");
    }
    match lower.as_str() {
        "body" => {
            if !rest.starts_with('.') {
                return error(
                    at,
                    "expected '.' and a path after $body (whole-body references are not supported)",
                );
            }
            let path = path(rest, at + 1 + name_end)?;
            Ok(Expr::Body(path))
        }
        "twin" => {
            let path = path(rest, at + 1 + name_end)?;
            let section_error = || {
                error(
                    at,
                    "expected $twin.tags, $twin.properties.desired or $twin.properties.reported",
                )
            };
            let key = |i: usize, word: &str| matches!(path.get(i), Some(PathSegment::Key(k)) if k.eq_ignore_ascii_case(word));
            if key(0, "tags") {
                Ok(Expr::Twin(TwinSection::Tags, path[1..].to_vec()))
            } else if key(0, "properties") && key(1, "desired") {
                Ok(Expr::Twin(TwinSection::Desired, path[2..].to_vec()))
            } else if key(0, "properties") && key(1, "reported") {
                Ok(Expr::Twin(TwinSection::Reported, path[2..].to_vec()))
            } else {
                section_error()
            }
        }
        _ => {
            if !rest.is_empty() {
                return error(
                    at + 1 + name_end,
                    format!("unexpected '{rest}' after ${name} (only $body and $twin take paths)"),
                );
            }
            match SYSTEM_PROPERTIES
                .iter()
                .find(|(keyword, _)| *keyword == lower)
            {
                Some((_, stored)) => Ok(Expr::System(stored)),
                None => Ok(Expr::DollarApplication(format!("${lower}"))),
            }
        }
    }
}

/// Splits `.a.b[0].c` into segments; `at` is the byte position of `text` in the condition.
fn path(text: &str, at: usize) -> Result<Vec<PathSegment>, ParseError> {
    let mut segments = Vec::new();
    let mut pos = 0;
    let bytes = text.as_bytes();
    while pos < text.len() {
        match bytes[pos] {
            b'.' => {
                let start = pos + 1;
                let end = text[start..]
                    .find(['.', '['])
                    .map_or(text.len(), |i| start + i);
                if start == end {
                    return error(at + pos, "expected a name after '.'");
                }
                segments.push(PathSegment::Key(text[start..end].to_owned()));
                pos = end;
            }
            _ => {
                // '[' digits ']'
                let close = text[pos..].find(']').map(|i| pos + i);
                let index = close
                    .and_then(|close| text[pos + 1..close].parse::<u32>().ok())
                    .filter(|_| {
                        close.is_some_and(|c| text[pos + 1..c].bytes().all(|b| b.is_ascii_digit()))
                    });
                match (index, close) {
                    (Some(index), Some(close)) => {
                        segments.push(PathSegment::Index(index));
                        pos = close + 1;
                    }
                    _ => {
                        return error(
                            at + pos,
                            "expected '[' index ']' with a non-negative integer index",
                        )
                    }
                }
            }
        }
    }
    Ok(segments)
}
