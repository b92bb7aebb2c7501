//! Unit tests of the routing language, a tree interpreter that serves as the reference, and a
//! differential test of compiled against interpreted evaluation on random conditions.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

use super::message::{body_encoding, decode_body};
use super::parse::{parse, BinaryOp, Constant, Expr, Function, PathSegment, TwinSection, UnaryOp};
use super::*;

/// A message built by a test.
#[derive(Debug, Default, Clone)]
struct TestMessage {
    system: Vec<(String, String)>,
    application: Vec<(String, String)>,
    body: Vec<u8>,
    twin: Option<serde_json::Value>,
}

impl TestMessage {
    fn sys(mut self, name: &str, value: &str) -> Self {
        self.system.push((name.to_owned(), value.to_owned()));
        self
    }

    fn app(mut self, name: &str, value: &str) -> Self {
        self.application.push((name.to_owned(), value.to_owned()));
        self
    }

    fn json_body(self, body: &serde_json::Value) -> Self {
        let mut m = self
            .sys("content-type", "application/json")
            .sys("content-encoding", "utf-8");
        m.body = body.to_string().into_bytes();
        m
    }
}

impl MessageView for TestMessage {
    fn system_property(&self, name: &str) -> Option<&str> {
        self.system
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn application_property(&self, lowercase_name: &str) -> Option<&str> {
        self.application
            .iter()
            .find(|(n, _)| eq_ignore_case(n, lowercase_name))
            .map(|(_, v)| v.as_str())
    }

    fn body(&self) -> &[u8] {
        &self.body
    }

    fn twin(&self) -> Option<&serde_json::Value> {
        self.twin.as_ref()
    }
}

fn sample() -> TestMessage {
    TestMessage::default()
        .sys("iothub-connection-device-id", "dev-1")
        .sys("message-id", "m-42")
        .sys("dt-subject", "thermostat1")
        .app("processingPath", "hot")
        .app("severity", "2")
        .app("Level", "Critical")
        .app("$weird", "dollar")
        .app("plain", "plain-value")
        .app("uni", "ÄbÇ")
        .json_body(&json!({
            "Weather": {"Temperature": 55.5, "HistoricalData": [{"Month": "Jan"}, {"Month": "Feb"}]},
            "flag": true,
            "nothing": null,
            "count": 3,
            "name": "Sensor \"A\"",
            "$meta": "m"
        }))
}

fn sample_twin() -> serde_json::Value {
    json!({
        "deviceId": "dev-1",
        "tags": {"region": "eu", "floor": 3, "list": ["a", "b"]},
        "properties": {
            "desired": {"fw": "1.2", "$version": 4},
            "reported": {"fw": "1.1", "battery": {"level": 80}}
        }
    })
}

/// The compiled result, rendered.
fn compiled(condition: &str, message: &TestMessage) -> String {
    let condition = Condition::compile(condition).expect("condition compiles");
    Evaluator::new()
        .session(message)
        .evaluate_to_string(&condition)
}

fn check(condition: &str, expected: &str) {
    let mut message = sample();
    message.twin = Some(sample_twin());
    let got = compiled(condition, &message);
    assert_eq!(got, expected, "condition: {condition}");
    let reference = interpret(&parse(condition).expect("parses"), &message).render();
    assert_eq!(reference, expected, "interpreter on: {condition}");
}

// ---------------------------------------------------------------------------------------------
// The reference: a recursive tree interpreter with owned values, written apart from the
// evaluator (serde_json for bodies, char vectors for string functions).

#[derive(Debug, Clone, PartialEq)]
enum IVal {
    Undefined,
    Null,
    Bool(bool),
    Num(f64),
    Str(String),
    Array,
    Object,
}

impl IVal {
    fn render(&self) -> String {
        match self {
            IVal::Undefined => "undefined".to_owned(),
            IVal::Null => "null".to_owned(),
            IVal::Bool(b) => b.to_string(),
            IVal::Num(n) => format!("number {n}"),
            IVal::Str(s) => format!("string '{s}'"),
            IVal::Array => "array".to_owned(),
            IVal::Object => "object".to_owned(),
        }
    }

    fn num(&self) -> Option<f64> {
        match self {
            IVal::Num(n) => Some(*n),
            _ => None,
        }
    }

    fn str(&self) -> Option<&str> {
        match self {
            IVal::Str(s) => Some(s),
            _ => None,
        }
    }
}

fn from_json(value: &serde_json::Value) -> IVal {
    match value {
        serde_json::Value::Null => IVal::Null,
        serde_json::Value::Bool(b) => IVal::Bool(*b),
        serde_json::Value::Number(n) => fin(n.as_f64().unwrap_or(f64::NAN)),
        serde_json::Value::String(s) => IVal::Str(s.clone()),
        serde_json::Value::Array(_) => IVal::Array,
        serde_json::Value::Object(_) => IVal::Object,
    }
}

fn fin(n: f64) -> IVal {
    if n.is_finite() {
        IVal::Num(n)
    } else {
        IVal::Undefined
    }
}

fn walk<'a>(
    mut value: &'a serde_json::Value,
    path: &[PathSegment],
) -> Option<&'a serde_json::Value> {
    for segment in path {
        value = match segment {
            PathSegment::Key(k) => value.as_object()?.get(k)?,
            PathSegment::Index(i) => value.as_array()?.get(*i as usize)?,
        };
    }
    Some(value)
}

fn interpret(expr: &Expr, m: &TestMessage) -> IVal {
    let s = |v: Option<&str>| v.map_or(IVal::Undefined, |v| IVal::Str(v.to_owned()));
    match expr {
        Expr::Constant(c) => match c {
            Constant::Undefined => IVal::Undefined,
            Constant::Null => IVal::Null,
            Constant::Bool(b) => IVal::Bool(*b),
            Constant::Number(n) => IVal::Num(*n),
            Constant::String(s) => IVal::Str(s.clone()),
            Constant::Array(_) => IVal::Array,
        },
        Expr::System(name) => s(m.system_property(name)),
        Expr::Application(name) => s(m.application_property(name)),
        Expr::DollarApplication(name) => s(m
            .application_property(name)
            .or_else(|| m.application_property(&name[1..]))),
        Expr::Body(path) => {
            let Some(encoding) = body_encoding(m) else {
                return IVal::Undefined;
            };
            let mut utf8 = Vec::new();
            if !decode_body(&m.body, encoding, &mut utf8) {
                return IVal::Undefined;
            }
            let Ok(body) = serde_json::from_slice::<serde_json::Value>(&utf8) else {
                return IVal::Undefined;
            };
            walk(&body, path).map_or(IVal::Undefined, from_json)
        }
        Expr::Twin(section, path) => {
            let Some(twin) = &m.twin else {
                return IVal::Undefined;
            };
            let base = match section {
                TwinSection::Tags => twin.get("tags"),
                TwinSection::Desired => twin.get("properties").and_then(|p| p.get("desired")),
                TwinSection::Reported => twin.get("properties").and_then(|p| p.get("reported")),
            };
            base.and_then(|b| walk(b, path))
                .map_or(IVal::Undefined, from_json)
        }
        Expr::Unary(op, inner) => match (op, interpret(inner, m)) {
            (UnaryOp::Not, IVal::Bool(b)) => IVal::Bool(!b),
            (UnaryOp::Neg, IVal::Num(n)) => IVal::Num(-n),
            _ => IVal::Undefined,
        },
        Expr::Binary(op, left, right) => {
            let a = interpret(left, m);
            let b = interpret(right, m);
            binary_reference(*op, a, b)
        }
        Expr::Call(function, args) => {
            let args: Vec<IVal> = args.iter().map(|a| interpret(a, m)).collect();
            call_reference(*function, &args)
        }
    }
}

fn binary_reference(op: BinaryOp, a: IVal, b: IVal) -> IVal {
    use std::cmp::Ordering;
    match op {
        BinaryOp::And => match (a, b) {
            (IVal::Bool(false), _) | (_, IVal::Bool(false)) => IVal::Bool(false),
            (IVal::Bool(true), IVal::Bool(true)) => IVal::Bool(true),
            _ => IVal::Undefined,
        },
        BinaryOp::Or => match (a, b) {
            (IVal::Bool(true), _) | (_, IVal::Bool(true)) => IVal::Bool(true),
            (IVal::Bool(false), IVal::Bool(false)) => IVal::Bool(false),
            _ => IVal::Undefined,
        },
        BinaryOp::Add | BinaryOp::Sub | BinaryOp::Mul | BinaryOp::Div | BinaryOp::Mod => {
            let (Some(x), Some(y)) = (a.num(), b.num()) else {
                return IVal::Undefined;
            };
            fin(match op {
                BinaryOp::Add => x + y,
                BinaryOp::Sub => x - y,
                BinaryOp::Mul => x * y,
                BinaryOp::Div => x / y,
                _ => x % y,
            })
        }
        _ => {
            let ordering = match (&a, &b) {
                (IVal::Null, IVal::Null) => Ordering::Equal,
                (IVal::Bool(x), IVal::Bool(y)) => x.cmp(y),
                (IVal::Num(x), IVal::Num(y)) => match x.partial_cmp(y) {
                    Some(o) => o,
                    None => return IVal::Undefined,
                },
                (IVal::Str(x), IVal::Str(y)) => x.cmp(y),
                _ => return IVal::Undefined,
            };
            IVal::Bool(match op {
                BinaryOp::Eq => ordering.is_eq(),
                BinaryOp::Ne => ordering.is_ne(),
                BinaryOp::Lt => ordering.is_lt(),
                BinaryOp::Gt => ordering.is_gt(),
                BinaryOp::Le => ordering.is_le(),
                _ => ordering.is_ge(),
            })
        }
    }
}

fn count(n: f64) -> usize {
    if n <= 0.0 {
        0
    } else {
        n as usize
    }
}

fn call_reference(function: Function, args: &[IVal]) -> IVal {
    use Function::*;
    let a = &args[0];
    let math = |f: fn(f64) -> f64| a.num().map_or(IVal::Undefined, |n| fin(f(n)));
    match function {
        Abs => math(f64::abs),
        Exp => math(f64::exp),
        Square => math(|n| n * n),
        Ceiling => math(f64::ceil),
        Floor => math(f64::floor),
        Sign => math(|n| if n == 0.0 { 0.0 } else { n.signum() }),
        Sqrt => math(f64::sqrt),
        Power => match (a.num(), args[1].num()) {
            (Some(x), Some(y)) => fin(x.powf(y)),
            _ => IVal::Undefined,
        },
        AsNumber => match a {
            IVal::Num(n) => IVal::Num(*n),
            IVal::Str(s) => s.parse::<f64>().map_or(IVal::Undefined, fin),
            _ => IVal::Undefined,
        },
        IsArray => IVal::Bool(*a == IVal::Array),
        IsBool => IVal::Bool(matches!(a, IVal::Bool(_))),
        IsDefined => IVal::Bool(*a != IVal::Undefined),
        IsNull => IVal::Bool(*a == IVal::Null),
        IsNumber => IVal::Bool(matches!(a, IVal::Num(_))),
        IsObject => IVal::Bool(*a == IVal::Object),
        IsPrimitive => IVal::Bool(matches!(
            a,
            IVal::Null | IVal::Bool(_) | IVal::Num(_) | IVal::Str(_)
        )),
        IsString => IVal::Bool(matches!(a, IVal::Str(_))),
        Concat => {
            let mut out = String::new();
            for arg in args {
                match arg.str() {
                    Some(s) => out.push_str(s),
                    None => return IVal::Undefined,
                }
            }
            IVal::Str(out)
        }
        Length => a
            .str()
            .map_or(IVal::Undefined, |s| IVal::Num(s.chars().count() as f64)),
        Lower => a.str().map_or(IVal::Undefined, |s| {
            IVal::Str(s.chars().flat_map(char::to_lowercase).collect())
        }),
        Upper => a.str().map_or(IVal::Undefined, |s| {
            IVal::Str(s.chars().flat_map(char::to_uppercase).collect())
        }),
        Substring => {
            let (Some(s), Some(start)) = (a.str(), args[1].num()) else {
                return IVal::Undefined;
            };
            let length = match args.get(2) {
                None => usize::MAX,
                Some(l) => match l.num() {
                    Some(l) => count(l),
                    None => return IVal::Undefined,
                },
            };
            IVal::Str(s.chars().skip(count(start)).take(length).collect())
        }
        IndexOf | StartsWith | EndsWith | Contains => {
            let (Some(s), Some(sub)) = (a.str(), args[1].str()) else {
                return IVal::Undefined;
            };
            match function {
                IndexOf => {
                    let chars: Vec<char> = s.chars().collect();
                    let needle: Vec<char> = sub.chars().collect();
                    let found = (0..=chars.len().saturating_sub(needle.len())).find(|&i| {
                        chars.len() >= needle.len() && chars[i..i + needle.len()] == needle[..]
                    });
                    IVal::Num(found.map_or(-1.0, |i| i as f64))
                }
                StartsWith => IVal::Bool(s.starts_with(sub)),
                EndsWith => IVal::Bool(s.ends_with(sub)),
                _ => IVal::Bool(s.contains(sub)),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Operators, functions and the undefined rules.

#[test]
fn constants() {
    check("true", "true");
    check("FALSE", "false");
    check("null", "null");
    check("undefined", "undefined");
    check("12.5", "number 12.5");
    check("0x1F", "number 31");
    check("1e3", "number 1000");
    check("-3", "number -3");
}

#[test]
fn string_escapes() {
    check(r#"'a\'b'"#, "string 'a'b'");
    check(r#""a\"b""#, "string 'a\"b'");
    check(r"'a\\b'", r"string 'a\b'");
    check(r"'\u0041\u00e9'", "string 'Aé'");
    check(r"'\ud83d\ude00'", "string '😀'");
    check(r#""single ' inside""#, "string 'single ' inside'");
}

#[test]
fn arithmetic() {
    check("1 + 2 * 3", "number 7");
    check("(1 + 2) * 3", "number 9");
    check("7 % 4", "number 3");
    check("-7 % 4", "number -3");
    check("10 / 4", "number 2.5");
    check("1 / 0", "undefined");
    check("0 % 0", "undefined");
    check("2 - - 3", "number 5");
    check("-(2 + 3)", "number -5");
    check("'a' + 1", "undefined");
    check("1 + true", "undefined");
}

#[test]
fn comparisons() {
    check("1 = 1.0", "true");
    check("1 != 2", "true");
    check("1 <> 1", "false");
    check("2 < 10", "true");
    check("'2' < '10'", "false"); // strings compare ordinally
    check("'abc' >= 'abc'", "true");
    check("'a' <= 'b'", "true");
    check("false < true", "true");
    check("null = null", "true");
    check("null != null", "false");
    // Different types are undefined, never false.
    check("1 = '1'", "undefined");
    check("1 != '1'", "undefined");
    check("null = 0", "undefined");
    check("undefined = undefined", "undefined");
    check("['a'] = ['a']", "undefined");
    check("$body.Weather = $body.Weather", "undefined");
}

#[test]
fn three_valued_logic() {
    check("false AND undefined", "false");
    check("undefined AND false", "false");
    check("true AND undefined", "undefined");
    check("true OR undefined", "true");
    check("undefined OR true", "true");
    check("false OR undefined", "undefined");
    check("NOT undefined", "undefined");
    check("NOT true", "false");
    check("NOT NOT true", "true");
    check("1 AND true", "undefined");
    check("true and true", "true");
    check("false or false", "false");
    // NOT binds looser than comparison.
    check("NOT 1 = 2", "true");
    // AND binds tighter than OR.
    check("true OR true AND false", "true");
    check("(true OR true) AND false", "false");
}

#[test]
fn application_properties_are_strings_and_case_insensitive() {
    check("processingPath = 'hot'", "true");
    check("PROCESSINGPATH = 'hot'", "true");
    check("processingpath = 'HOT'", "false");
    check("level = 'Critical'", "true");
    check("severity = 2", "undefined");
    check("as_number(severity) = 2", "true");
    check("AS_NUMBER(severity) <= 2", "true");
    check("missing = 'x'", "undefined");
    // A property compared with a string constant compiles to one instruction, either way
    // round, with the same results as the general comparison.
    check("'hot' = processingPath", "true");
    check("'x' = missing", "undefined");
    check("'dev-1' = $connectionDeviceId", "true");
    check("'dev-2' = $connectionDeviceId", "false");
    check("$connectionModuleId = 'm'", "undefined");
    assert_eq!(Condition::compile("level = 'x'").unwrap().len(), 1);
    assert_eq!(Condition::compile("'x' = $messageId").unwrap().len(), 1);
    check("is_defined(missing)", "false");
    check("uni = 'ÄbÇ'", "true");
    check("UNI = 'ÄbÇ'", "true");
}

#[test]
fn system_properties() {
    check("$connectionDeviceId = 'dev-1'", "true");
    check("$CONNECTIONDEVICEID = 'dev-1'", "true");
    check("$messageId = 'm-42'", "true");
    check("$contentType = 'application/json'", "true");
    check("$contentEncoding = 'utf-8'", "true");
    check("$dt-subject = 'thermostat1'", "true");
    check("is_defined($correlationId)", "false");
    check("is_defined($connectionModuleId)", "false");
    // A `$name` that is not a keyword is an application property, with or without its `$`.
    check("$weird = 'dollar'", "true");
    check("$plain = 'plain-value'", "true");
    check("$nothing", "undefined");
}

#[test]
fn body_paths() {
    check("$body.Weather.Temperature > 50", "true");
    check("$body.Weather.Temperature", "number 55.5");
    check("$body.Weather.HistoricalData[1].Month = 'Feb'", "true");
    check("$body.Weather.HistoricalData[5].Month", "undefined");
    check("$body.weather.temperature", "undefined"); // JSON keys are case-sensitive
    check("$BODY.Weather.Temperature > 50", "true");
    check("$body.flag", "true");
    check("$body.nothing", "null");
    check("is_null($body.nothing)", "true");
    check("is_object($body.Weather)", "true");
    check("is_array($body.Weather.HistoricalData)", "true");
    check("$body.name", "string 'Sensor \"A\"'");
    check("$body.$meta", "string 'm'");
    check("$body.count[0]", "undefined");
    check("$body.name.x", "undefined");
}

#[test]
fn twin_paths() {
    check("$twin.tags.region = 'eu'", "true");
    check("$twin.tags.floor", "number 3");
    check("$twin.tags.list[1]", "string 'b'");
    check("$twin.properties.desired.fw", "string '1.2'");
    check("$twin.properties.desired.$version", "number 4");
    check("$twin.properties.reported.battery.level >= 80", "true");
    check("$twin.Properties.Reported.fw", "string '1.1'");
    check("is_object($twin.tags)", "true");
    check("$twin.tags.missing", "undefined");
    // No twin: every $twin reference is undefined.
    let message = sample();
    assert_eq!(compiled("$twin.tags.region", &message), "undefined");
    assert_eq!(compiled("is_defined($twin.tags)", &message), "false");
}

#[test]
fn math_functions() {
    check("ABS(-2)", "number 2");
    check("abs('x')", "undefined");
    check("EXP(0)", "number 1");
    check("EXP(1000)", "undefined");
    check("POWER(2, 10)", "number 1024");
    check("SQUARE(3)", "number 9");
    check("CEILING(1.2)", "number 2");
    check("FLOOR(-1.2)", "number -2");
    check("SIGN(-5)", "number -1");
    check("SIGN(0)", "number 0");
    check("SIGN(3)", "number 1");
    check("SQRT(16)", "number 4");
    check("SQRT(-1)", "undefined");
}

#[test]
fn type_functions() {
    check("AS_NUMBER('2.5')", "number 2.5");
    check("AS_NUMBER(7)", "number 7");
    check("AS_NUMBER('abc')", "undefined");
    check("AS_NUMBER(true)", "undefined");
    check("IS_ARRAY(['a', 1])", "true");
    check("IS_ARRAY('a')", "false");
    check("IS_BOOL(false)", "true");
    check("IS_DEFINED(undefined)", "false");
    check("IS_DEFINED(null)", "true");
    check("IS_NULL(null)", "true");
    check("IS_NUMBER(1)", "true");
    check("IS_NUMBER('1')", "false");
    check("IS_OBJECT($body.Weather)", "true");
    check("IS_PRIMITIVE('x')", "true");
    check("IS_PRIMITIVE(null)", "true");
    check("IS_PRIMITIVE(undefined)", "false");
    check("IS_PRIMITIVE($body.Weather)", "false");
    check("IS_STRING('x')", "true");
    check("IS_STRING(LOWER('X'))", "true");
}

#[test]
fn string_functions() {
    check("CONCAT('a', 'b')", "string 'ab'");
    check("CONCAT('a', 'b', 'c', processingPath)", "string 'abchot'");
    check("CONCAT('a', 1)", "undefined");
    check("CONCAT(LOWER('A'), UPPER('b'), LOWER('C'))", "string 'aBc'");
    check(
        "CONCAT(CONCAT('x', 'y'), CONCAT('z', 'w'))",
        "string 'xyzw'",
    );
    check("LENGTH('hello')", "number 5");
    check("LENGTH(uni)", "number 3");
    check("LENGTH(1)", "undefined");
    check("LOWER(level)", "string 'critical'");
    check("UPPER(uni)", "string 'ÄBÇ'");
    check("LOWER(uni)", "string 'äbç'");
    check("UPPER(LOWER(level)) = 'CRITICAL'", "true");
    check("SUBSTRING('abcdef', 2)", "string 'cdef'");
    check("SUBSTRING('abcdef', 1, 3)", "string 'bcd'");
    check("SUBSTRING('abcdef', 4, 10)", "string 'ef'");
    check("SUBSTRING('abcdef', 10, 1)", "string ''");
    check("SUBSTRING('abcdef', -1, 2)", "string 'ab'");
    check("SUBSTRING('abcdef', 1, -1)", "string ''");
    check("SUBSTRING(uni, 1, 1)", "string 'b'");
    check("SUBSTRING(UPPER('abcdef'), 1, 2)", "string 'BC'");
    check("SUBSTRING(1, 1)", "undefined");
    check("SUBSTRING('abc', '1')", "undefined");
    check("INDEX_OF('abcabc', 'ca')", "number 2");
    check("INDEX_OF('abc', 'x')", "number -1");
    check("INDEX_OF(uni, 'Ç')", "number 2");
    check("INDEX_OF('abc', '')", "number 0");
    check("STARTS_WITH($connectionDeviceId, 'dev')", "true");
    check("ENDS_WITH('abc', 'bc')", "true");
    check("CONTAINS('abc', 'd')", "false");
    check("contains(1, 'd')", "undefined");
    check("lower('ABC') = 'abc'", "true");
}

#[test]
fn parse_errors_have_positions() {
    let error = |text: &str| {
        Condition::compile(text)
            .expect_err("must not parse")
            .to_string()
    };
    assert_eq!(
        error("(a = 1 AND"),
        "at 10: expected an expression but found end of input"
    );
    assert_eq!(error("(a = 'x' b = 1)"), "at 9: expected ')' but found 'b'");
    assert_eq!(
        error("(a = 'x' AND b = 2"),
        "at 18: expected ')' but found end of input"
    );
    assert_eq!(error("a = 'x"), "at 4: unterminated string");
    assert_eq!(
        error("a = 1 b"),
        "at 6: expected an operator or end of input but found 'b'"
    );
    assert_eq!(
        error("AND a"),
        "at 0: expected an expression but found 'AND'"
    );
    assert_eq!(
        error(""),
        "at 0: expected an expression but found end of input"
    );
    assert_eq!(error("nosuch(1)"), "at 0: unknown function 'nosuch'");
    assert_eq!(
        error("x = LENGTH('a', 'b')"),
        "at 4: LENGTH takes 1 arguments, not 2"
    );
    assert_eq!(
        error("CONCAT('a')"),
        "at 0: CONCAT takes at least 2 arguments, not 1"
    );
    assert_eq!(
        error("SUBSTRING('a')"),
        "at 0: SUBSTRING takes 2 or 3 arguments, not 1"
    );
    assert_eq!(
        error("a = 'x' # 1"),
        "at 8: expected an operator or end of input but found '#'"
    );
    assert_eq!(error(r"'\q'"), r"at 1: unknown escape '\q'");
    assert_eq!(
        error(r"'\u12'"),
        r"at 1: expected 4 hexadecimal digits after '\u'"
    );
    assert_eq!(error(r"'\ud83d'"), r"at 1: unpaired surrogate in \u escape");
    assert_eq!(error("0x"), "at 0: expected hexadecimal digits after '0x'");
    assert_eq!(error("12abc"), "at 0: invalid number '12a'");
    assert!(error("$body").contains("whole-body references are not supported"));
    assert!(error("$body[0] = 1").contains("whole-body references are not supported"));
    assert_eq!(error("$body.a..b"), "at 7: expected a name after '.'");
    assert_eq!(
        error("$body.a[x]"),
        "at 7: expected '[' index ']' with a non-negative integer index"
    );
    assert!(error("$twin.deviceId").starts_with("at 0: expected $twin.tags"));
    assert!(error("$contentType.x").contains("only $body and $twin take paths"));
    assert_eq!(error("[a]"), "at 2: array literals may only hold constants");
    assert_eq!(
        error("a == 1"),
        "at 3: expected an expression but found '='"
    );
    assert_eq!(
        error("'it''s'"),
        "at 4: expected an operator or end of input but found string 's'"
    );
    assert_eq!(error("a ! b"), "at 2: unexpected character '!'");
}

#[test]
fn nesting_is_bounded() {
    let deep = format!("{}true{}", "(".repeat(64), ")".repeat(64));
    assert!(Condition::compile(&deep).is_ok());
    let too_deep = format!("{}true{}", "(".repeat(65), ")".repeat(65));
    assert!(Condition::compile(&too_deep)
        .expect_err("too deep")
        .message
        .contains("nested deeper than 64"));
    // Hostile inputs far past the limits fail cleanly instead of overflowing the stack.
    for text in [
        "(".repeat(100_000),
        "NOT ".repeat(100_000),
        "- ".repeat(100_000),
        "[".repeat(100_000),
        "abs(".repeat(100_000),
    ] {
        assert!(Condition::compile(&text).is_err());
    }
    let long_chain = vec!["a = 'x'"; 300].join(" OR ");
    assert!(Condition::compile(&long_chain)
        .expect_err("too tall")
        .message
        .contains("deeper than 256"));
    let ok_chain = vec!["a = 'x'"; 200].join(" OR ");
    assert!(Condition::compile(&ok_chain).is_ok());
}

#[test]
fn names_may_hold_dashes_and_need_spaced_minus() {
    let message = sample().app("x-request", "7");
    assert_eq!(compiled("x-request = '7'", &message), "true");
    assert_eq!(compiled("as_number(severity) - 1", &message), "number 1");
}

// ---------------------------------------------------------------------------------------------
// $body content-type rules.

fn body_message(content_type: Option<&str>, encoding: Option<&str>, body: Vec<u8>) -> TestMessage {
    let mut m = TestMessage::default();
    if let Some(ct) = content_type {
        m = m.sys("content-type", ct);
    }
    if let Some(ce) = encoding {
        m = m.sys("content-encoding", ce);
    }
    m.body = body;
    m
}

#[test]
fn body_needs_json_content_type_and_unicode_encoding() {
    let body = br#"{"t": 60}"#.to_vec();
    let cases: &[(Option<&str>, Option<&str>, &str)] = &[
        (Some("application/json"), Some("utf-8"), "true"),
        (Some("Application/JSON"), Some("UTF-8"), "true"),
        (Some("application/json; charset=utf-8"), None, "true"),
        (Some("application/json;charset=\"UTF-8\""), None, "true"),
        (Some("application/json"), Some("utf8"), "true"),
        (Some("application/json"), None, "undefined"),
        (Some("application/json"), Some("gzip"), "undefined"),
        (Some("text/plain"), Some("utf-8"), "undefined"),
        (Some("application/jsonx"), Some("utf-8"), "undefined"),
        (None, Some("utf-8"), "undefined"),
        (None, None, "undefined"),
    ];
    for (ct, ce, expected) in cases {
        let m = body_message(*ct, *ce, body.clone());
        assert_eq!(compiled("$body.t > 50", &m), *expected, "{ct:?} {ce:?}");
    }
    // Not JSON at all: undefined.
    let m = body_message(
        Some("application/json"),
        Some("utf-8"),
        b"{not json".to_vec(),
    );
    assert_eq!(compiled("$body.t > 50", &m), "undefined");
    // A UTF-8 byte order mark is fine.
    let m = body_message(
        Some("application/json"),
        Some("utf-8"),
        b"\xEF\xBB\xBF{\"t\":60}".to_vec(),
    );
    assert_eq!(compiled("$body.t", &m), "number 60");
}

#[test]
fn body_in_utf16_and_utf32() {
    let text = r#"{"t": 60, "s": "é😀"}"#;
    let le16: Vec<u8> = text.encode_utf16().flat_map(u16::to_le_bytes).collect();
    let be16: Vec<u8> = text.encode_utf16().flat_map(u16::to_be_bytes).collect();
    let le32: Vec<u8> = text
        .chars()
        .flat_map(|c| (c as u32).to_le_bytes())
        .collect();
    let mut bom16 = vec![0xFE, 0xFF];
    bom16.extend_from_slice(&be16);
    for (encoding, body) in [
        ("utf-16", le16.clone()),
        ("UTF-16LE", le16),
        ("utf-16be", be16),
        ("utf-16", bom16),
        ("utf-32", le32),
    ] {
        let m = body_message(Some("application/json"), Some(encoding), body);
        assert_eq!(compiled("$body.t", &m), "number 60", "{encoding}");
        assert_eq!(compiled("$body.s", &m), "string 'é😀'", "{encoding}");
    }
    let m = body_message(Some("application/json"), Some("utf-16"), vec![b'{']);
    assert_eq!(compiled("$body.t", &m), "undefined");
}

#[test]
fn body_is_parsed_lazily() {
    // The body is garbage, but the condition is decided before it is reached.
    let m =
        body_message(Some("application/json"), Some("utf-8"), b"{oops".to_vec()).app("p", "cold");
    assert_eq!(compiled("p = 'hot' AND $body.x = 1", &m), "false");
    assert_eq!(compiled("p = 'cold' OR $body.x = 1", &m), "true");
    assert_eq!(compiled("p = 'cold' AND $body.x = 1", &m), "undefined");
}

// ---------------------------------------------------------------------------------------------
// Reuse: after warm-up the evaluator's buffers do not grow.

#[test]
fn steady_state_reuses_buffers() {
    let conditions: Vec<Condition> = [
        "processingPath = 'hot' AND $connectionDeviceId = 'dev-1'",
        "$body.Weather.Temperature > 50",
        "CONCAT(LOWER(level), UPPER(processingPath), SUBSTRING(uni, 1)) = 'x'",
        "$twin.tags.region = 'eu' OR $body.Weather.HistoricalData[0].Month = 'Jan'",
    ]
    .iter()
    .map(|c| Condition::compile(c).expect("compiles"))
    .collect();
    let mut message = sample();
    message.twin = Some(sample_twin());
    let mut evaluator = Evaluator::new();
    let run = |evaluator: &mut Evaluator| {
        let mut session = evaluator.session(&message);
        for c in &conditions {
            session.evaluate(c);
        }
    };
    run(&mut evaluator);
    let warm = evaluator.capacity();
    for _ in 0..1000 {
        run(&mut evaluator);
    }
    assert_eq!(evaluator.capacity(), warm);
    assert!(warm.0 >= 1, "the stack kept its allocation");
}

// ---------------------------------------------------------------------------------------------
// The route table.

fn spec(name: &str, source: RouteSource, condition: Option<&str>, endpoint: &str) -> RouteSpec {
    RouteSpec {
        name: name.to_owned(),
        source,
        condition: condition.map(str::to_owned),
        endpoint_names: vec![endpoint.to_owned()],
        is_enabled: true,
    }
}

fn endpoints(table: &RouteTable, set: EndpointSet) -> Vec<&str> {
    set.iter()
        .map(|i| table.endpoint_names()[i].as_str())
        .collect()
}

#[test]
fn route_table_matches_each_endpoint_once_and_falls_back() {
    use RouteSource::*;
    let routes = vec![
        spec(
            "hot",
            DeviceMessages,
            Some("processingPath = 'hot'"),
            "hotStore",
        ),
        spec(
            "critical",
            DeviceMessages,
            Some("level = 'Critical'"),
            "alerts",
        ),
        spec(
            "also-hot",
            DeviceMessages,
            Some("$body.Weather.Temperature > 50"),
            "hotStore",
        ),
        spec("bad", DeviceMessages, Some("severity = 2"), "alerts"),
        spec("twins", TwinChangeEvents, None, "twinLog"),
        RouteSpec {
            is_enabled: false,
            ..spec("off", DeviceMessages, None, "offStore")
        },
    ];
    let table = RouteTable::compile(&routes, FallbackRoute { enabled: true }).expect("compiles");
    assert_eq!(
        table.endpoint_names(),
        ["events", "hotStore", "alerts", "twinLog", "offStore"]
    );
    let mut evaluator = Evaluator::new();
    let mut out = EndpointSet::new();
    let message = sample();
    let report = table.matches(DeviceMessages, &message, &mut evaluator, &mut out);
    assert_eq!(endpoints(&table, out), ["hotStore", "alerts"]);
    assert_eq!(
        report.matched, 2,
        "also-hot and bad are skipped: their endpoints are chosen"
    );
    assert!(!report.fallback);

    // Nothing matches: fallback to events; the undefined condition is reported.
    let cold = TestMessage::default().app("processingPath", "cold");
    let report = table.matches(DeviceMessages, &cold, &mut evaluator, &mut out);
    assert_eq!(endpoints(&table, out), ["events"]);
    assert_eq!(
        report.undefined, 3,
        "critical, also-hot and bad have nothing to compare"
    );
    assert!(report.fallback);

    // Other sources go only where their routes say, never to the fallback.
    table.matches(TwinChangeEvents, &cold, &mut evaluator, &mut out);
    assert_eq!(endpoints(&table, out), ["twinLog"]);
    table.matches(DeviceLifecycleEvents, &cold, &mut evaluator, &mut out);
    assert!(out.is_empty());
    assert!(!table.has_source(DeviceLifecycleEvents));
    assert!(table.has_source(TwinChangeEvents));

    // Fallback disabled: unmatched device messages go nowhere.
    let table = RouteTable::compile(&routes, FallbackRoute { enabled: false }).expect("compiles");
    table.matches(DeviceMessages, &cold, &mut evaluator, &mut out);
    assert!(out.is_empty());

    // A route to `events` itself.
    let table = RouteTable::compile(
        &[spec("all", DeviceMessages, Some("true"), "events")],
        FallbackRoute { enabled: false },
    )
    .expect("compiles");
    table.matches(DeviceMessages, &cold, &mut evaluator, &mut out);
    assert_eq!(endpoints(&table, out), ["events"]);
}

#[test]
fn empty_route_table_sends_device_messages_to_events() {
    for enabled in [true, false] {
        let table = RouteTable::compile(&[], FallbackRoute { enabled }).expect("compiles");
        let mut evaluator = Evaluator::new();
        let mut out = EndpointSet::new();
        let report = table.matches(
            RouteSource::DeviceMessages,
            &sample(),
            &mut evaluator,
            &mut out,
        );
        assert_eq!(endpoints(&table, out), ["events"]);
        assert!(report.fallback);
        table.matches(
            RouteSource::TwinChangeEvents,
            &sample(),
            &mut evaluator,
            &mut out,
        );
        assert!(out.is_empty());
    }
}

#[test]
fn route_table_validation() {
    use RouteSource::DeviceMessages as D;
    let compile = |routes: &[RouteSpec]| RouteTable::compile(routes, FallbackRoute::default());
    assert!(compile(&[spec("a.b_c-D9", D, None, "x")]).is_ok());
    assert!(compile(&[spec(&"a".repeat(64), D, None, "x")]).is_ok());
    for name in ["", "has space", "slash/", "ümlaut", &"a".repeat(65)] {
        assert_eq!(
            compile(&[spec(name, D, None, "x")]).expect_err("bad name"),
            RouteError::InvalidName {
                name: name.to_owned()
            }
        );
    }
    assert_eq!(
        compile(&[spec("a", D, None, "x"), spec("a", D, None, "y")]).expect_err("dup"),
        RouteError::DuplicateName {
            name: "a".to_owned()
        }
    );
    let many: Vec<RouteSpec> = (0..101)
        .map(|i| spec(&format!("r{i}"), D, None, "x"))
        .collect();
    assert_eq!(
        compile(&many).expect_err("too many"),
        RouteError::TooManyRoutes { count: 101 }
    );
    assert!(compile(&many[..100]).is_ok());
    let two = RouteSpec {
        endpoint_names: vec!["x".to_owned(), "y".to_owned()],
        ..spec("two", D, None, "x")
    };
    assert!(matches!(
        compile(&[two]).expect_err("two endpoints"),
        RouteError::EndpointCount { count: 2, .. }
    ));
    let error = compile(&[spec("c", D, Some("a = "), "x")]).expect_err("bad condition");
    assert_eq!(
        error.to_string(),
        "route 'c': invalid condition: at 4: expected an expression but found end of input"
    );
    // 100 routes to 100 distinct endpoints fit the endpoint set.
    let distinct: Vec<RouteSpec> = (0..100)
        .map(|i| spec(&format!("r{i}"), D, Some("true"), &format!("e{i}")))
        .collect();
    let table = compile(&distinct).expect("compiles");
    let mut out = EndpointSet::new();
    table.matches(D, &sample(), &mut Evaluator::new(), &mut out);
    assert_eq!(out.len(), 100);
    assert!(!out.contains(0));
}

// ---------------------------------------------------------------------------------------------
// Differential test: random conditions over random messages, compiled against interpreted.

const APP_NAMES: &[&str] = &[
    "processingPath",
    "severity",
    "level",
    "Ünï",
    "x-id",
    "missing",
];
const APP_VALUES: &[&str] = &[
    "hot",
    "HOT",
    "2",
    "2.5",
    "-1",
    "abc",
    "",
    "Ünïcödé",
    "1e3",
    "x",
];
const STRINGS: &[&str] = &[
    "hot", "HOT", "2", "", "abc", "b", "dev-1", "Ünï", "ïc", "1e3", "eu",
];
const BODY_PATHS: &[&str] = &[
    "$body.a",
    "$body.b",
    "$body.s",
    "$body.n",
    "$body.arr[0]",
    "$body.arr[2]",
    "$body.o.x",
    "$body.o.arr[1].y",
    "$body.missing",
    "$body.o",
];
const TWIN_PATHS: &[&str] = &[
    "$twin.tags.region",
    "$twin.tags.n",
    "$twin.properties.desired.fw",
    "$twin.properties.reported.list[0]",
    "$twin.tags",
    "$twin.properties.reported.deep.x",
];
const SYSTEM: &[&str] = &[
    "$connectionDeviceId",
    "$contentType",
    "$messageId",
    "$correlationId",
    "$dt-subject",
    "$unknownThing",
    "$contentEncoding",
];

fn pick<'a>(rng: &mut StdRng, items: &[&'a str]) -> &'a str {
    items[rng.gen_range(0..items.len())]
}

fn random_case(rng: &mut StdRng, s: &str) -> String {
    s.chars()
        .map(|c| {
            if rng.gen_bool(0.3) {
                c.to_uppercase().next().unwrap_or(c)
            } else {
                c
            }
        })
        .collect()
}

fn random_string_literal(rng: &mut StdRng) -> String {
    let s = pick(rng, STRINGS);
    if rng.gen_bool(0.5) {
        format!("'{}'", s.replace('\'', "\\'"))
    } else {
        format!("\"{}\"", s.replace('"', "\\\""))
    }
}

fn random_leaf(rng: &mut StdRng) -> String {
    match rng.gen_range(0..12) {
        0 => ["true", "false", "null", "undefined", "TRUE"][rng.gen_range(0..5)].to_owned(),
        1 => format!("{}", rng.gen_range(-3..20)),
        2 => format!("{}.5", rng.gen_range(0..10)),
        3 => format!("0x{:X}", rng.gen_range(0..300)),
        4 | 5 => random_string_literal(rng),
        6 => {
            let name = pick(rng, APP_NAMES);
            random_case(rng, name)
        }
        7 => {
            let name = pick(rng, SYSTEM);
            random_case(rng, name)
        }
        8 | 9 => pick(rng, BODY_PATHS).to_owned(),
        10 => pick(rng, TWIN_PATHS).to_owned(),
        _ => "['a', 1]".to_owned(),
    }
}

fn random_expr(rng: &mut StdRng, depth: u32) -> String {
    if depth == 0 || rng.gen_bool(0.25) {
        return random_leaf(rng);
    }
    let sub = |rng: &mut StdRng| random_expr(rng, depth - 1);
    match rng.gen_range(0..10) {
        // NOT binds looser than the other operators: it must be parenthesized as an operand.
        0 => format!("(NOT {})", sub(rng)),
        1 => format!("-({})", sub(rng)),
        2..=5 => {
            let op = [
                "+", "-", "*", "/", "%", "AND", "OR", "and", "or", "=", "!=", "<>", "<", ">", "<=",
                ">=", "=", "AND", "OR",
            ][rng.gen_range(0..19)];
            let (a, b) = (sub(rng), sub(rng));
            if rng.gen_bool(0.5) {
                format!("({a} {op} {b})")
            } else {
                format!("{a} {op} {b}")
            }
        }
        6 => format!("({})", sub(rng)),
        _ => {
            let (name, args) = [
                ("ABS", 1),
                ("exp", 1),
                ("POWER", 2),
                ("square", 1),
                ("CEILING", 1),
                ("floor", 1),
                ("SIGN", 1),
                ("sqrt", 1),
                ("AS_NUMBER", 1),
                ("is_array", 1),
                ("IS_BOOL", 1),
                ("is_defined", 1),
                ("IS_NULL", 1),
                ("IS_NUMBER", 1),
                ("is_object", 1),
                ("IS_PRIMITIVE", 1),
                ("IS_STRING", 1),
                ("CONCAT", 2),
                ("concat", 3),
                ("CONCAT", 4),
                ("LENGTH", 1),
                ("lower", 1),
                ("UPPER", 1),
                ("SUBSTRING", 2),
                ("substring", 3),
                ("INDEX_OF", 2),
                ("STARTS_WITH", 2),
                ("ENDS_WITH", 2),
                ("CONTAINS", 2),
            ][rng.gen_range(0..29)];
            let args: Vec<String> = (0..args).map(|_| sub(rng)).collect();
            format!("{name}({})", args.join(", "))
        }
    }
}

fn random_json(rng: &mut StdRng, depth: u32) -> serde_json::Value {
    let leaf = |rng: &mut StdRng| match rng.gen_range(0..6) {
        0 => json!(null),
        1 => json!(rng.gen_bool(0.5)),
        2 => json!(rng.gen_range(-5..60)),
        3 => json!(f64::from(rng.gen_range(-100..100)) / 4.0),
        _ => json!(pick(rng, STRINGS)),
    };
    if depth == 0 {
        return leaf(rng);
    }
    match rng.gen_range(0..4) {
        0 => {
            let n = rng.gen_range(0..4);
            serde_json::Value::Array((0..n).map(|_| random_json(rng, depth - 1)).collect())
        }
        1 => {
            let mut o = serde_json::Map::new();
            for key in ["x", "y", "arr"] {
                if rng.gen_bool(0.6) {
                    o.insert(key.to_owned(), random_json(rng, depth - 1));
                }
            }
            serde_json::Value::Object(o)
        }
        _ => leaf(rng),
    }
}

fn random_message(rng: &mut StdRng) -> TestMessage {
    let mut m = TestMessage::default().sys(
        "iothub-connection-device-id",
        pick(rng, &["dev-1", "dev-2"]),
    );
    if rng.gen_bool(0.5) {
        m = m.sys("message-id", pick(rng, STRINGS));
    }
    if rng.gen_bool(0.3) {
        m = m.sys("dt-subject", pick(rng, STRINGS));
    }
    for name in APP_NAMES {
        if rng.gen_bool(0.5) {
            let name = random_case(rng, name);
            m = m.app(&name, pick(rng, APP_VALUES));
        }
    }
    if rng.gen_bool(0.2) {
        m = m.app("unknownThing", pick(rng, APP_VALUES));
    }
    let mut body = serde_json::Map::new();
    for key in ["a", "b", "s", "n", "arr", "o"] {
        if rng.gen_bool(0.7) {
            body.insert(key.to_owned(), random_json(rng, 3));
        }
    }
    let text = serde_json::Value::Object(body).to_string();
    let (content_type, encoding) = match rng.gen_range(0..8) {
        0 => (Some("text/plain"), Some("utf-8")),
        1 => (Some("application/json"), None),
        2 => (Some("application/json; charset=utf-8"), None),
        3 => (Some("application/json"), Some("utf-16")),
        4 => (None, None),
        _ => (Some("Application/Json"), Some("UTF-8")),
    };
    if let Some(ct) = content_type {
        m = m.sys("content-type", ct);
    }
    if let Some(ce) = encoding {
        m = m.sys("content-encoding", ce);
    }
    m.body = if encoding == Some("utf-16") {
        text.encode_utf16().flat_map(u16::to_le_bytes).collect()
    } else if rng.gen_bool(0.05) {
        b"{broken".to_vec()
    } else {
        text.into_bytes()
    };
    if rng.gen_bool(0.7) {
        m.twin = Some(json!({
            "tags": {"region": pick(rng, STRINGS), "n": rng.gen_range(0..5)},
            "properties": {
                "desired": {"fw": pick(rng, STRINGS)},
                "reported": {"list": random_json(rng, 2), "deep": random_json(rng, 2)}
            }
        }));
    }
    m
}

#[test]
fn compiled_matches_interpreted_on_random_conditions() {
    let mut rng = StdRng::seed_from_u64(0x1207);
    let mut evaluator = Evaluator::new();
    let mut checked = 0;
    let mut decided = 0;
    let mut defined = 0;
    for _ in 0..3000 {
        let message = random_message(&mut rng);
        let conditions: Vec<String> = (0..4).map(|_| random_expr(&mut rng, 5)).collect();
        // All conditions of one message share a session (and so one body parse).
        let mut session = evaluator.session(&message);
        for text in &conditions {
            let parsed = parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            let condition = Condition::compile(text).expect("compiles");
            let got = session.evaluate_to_string(&condition);
            let want = interpret(&parsed, &message).render();
            assert_eq!(got, want, "condition: {text}\nmessage: {message:?}");
            if got == "true" || got == "false" {
                decided += 1;
            }
            if got != "undefined" {
                defined += 1;
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 12_000);
    // The generator should not only produce undefined.
    println!("{decided} booleans, {defined} defined results of {checked}");
    assert!(decided > 1000, "only {decided} boolean results");
    assert!(defined > 3000, "only {defined} defined results");
}

#[test]
fn endpoint_set() {
    let mut set = EndpointSet::new();
    assert!(set.is_empty());
    set.insert(0);
    set.insert(127);
    set.insert(5);
    set.insert(5);
    set.insert(500); // out of range: ignored
    assert_eq!(set.len(), 3);
    assert_eq!(set.iter().collect::<Vec<_>>(), [0, 5, 127]);
    assert!(set.contains(127) && !set.contains(4) && !set.contains(500));
    set.clear();
    assert!(set.is_empty());
}

/// A random condition of the simple shape: property comparisons with string constants, alone
/// or in an AND or OR chain (sometimes parenthesized, constants on either side).
fn random_simple(rng: &mut StdRng) -> String {
    let terms = rng.gen_range(1..5);
    let op = if rng.gen_bool(0.5) { "AND" } else { "or" };
    let term = |rng: &mut StdRng| {
        let name = if rng.gen_bool(0.5) {
            pick(rng, APP_NAMES)
        } else {
            pick(rng, &SYSTEM[..5])
        };
        let property = random_case(rng, name);
        let constant = format!("'{}'", pick(rng, &[APP_VALUES, STRINGS].concat()));
        let cmp = ["=", "!=", "<>"][rng.gen_range(0..3)];
        if rng.gen_bool(0.2) {
            format!("{constant} {cmp} {property}")
        } else {
            format!("{property} {cmp} {constant}")
        }
    };
    let parts: Vec<String> = (0..terms).map(|_| term(rng)).collect();
    let joined = parts.join(&format!(" {op} "));
    if rng.gen_bool(0.2) {
        format!("({joined})")
    } else {
        joined
    }
}

/// Routes in the simple shape are evaluated without the program, with each property looked up
/// once per message: the table's outcome must be the program's, with other routes in the table
/// reading the same properties.
#[test]
fn simple_conditions_match_the_program() {
    let mut rng = StdRng::seed_from_u64(0x5150);
    let mut evaluator = Evaluator::new();
    let mut matched = 0;
    for _ in 0..2000 {
        let message = random_message(&mut rng);
        let texts: Vec<String> = (0..4).map(|_| random_simple(&mut rng)).collect();
        for (i, text) in texts.iter().enumerate() {
            let condition = Condition::compile(text).expect("compiles");
            let want = evaluator.evaluate(&condition, &message);
            // The route under test comes last, after routes that read the same properties.
            let mut specs: Vec<RouteSpec> = texts
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(j, t)| RouteSpec {
                    name: format!("other-{j}"),
                    source: RouteSource::DeviceMessages,
                    condition: Some(t.clone()),
                    endpoint_names: vec![format!("o{j}")],
                    is_enabled: true,
                })
                .collect();
            specs.push(RouteSpec {
                name: "tested".to_owned(),
                source: RouteSource::DeviceMessages,
                condition: Some(text.clone()),
                endpoint_names: vec!["tested".to_owned()],
                is_enabled: true,
            });
            let table = RouteTable::compile(&specs, FallbackRoute { enabled: false }).unwrap();
            assert!(
                table.routes.iter().all(|r| r.simple.is_some()),
                "{text} is simple"
            );
            let mut out = EndpointSet::new();
            table.matches(
                RouteSource::DeviceMessages,
                &message,
                &mut evaluator,
                &mut out,
            );
            let tested = table
                .endpoint_names()
                .iter()
                .position(|e| e == "tested")
                .unwrap();
            let got = out.contains(tested);
            assert_eq!(
                got,
                want == Outcome::Match,
                "condition: {text}\nmessage: {message:?}"
            );
            matched += usize::from(got);
        }
    }
    assert!(matched > 1000, "only {matched} matches");
}

/// With more constants per property than are compared directly, a message's value is found by
/// hash: every constant, a value that is none of them, a prefix of one, and an absent property
/// give the program's result.
#[test]
fn simple_conditions_with_many_constants_match_the_program() {
    let mut evaluator = Evaluator::new();
    let texts: Vec<String> = (0..20)
        .map(|i| format!("level = 'critical-{i}' AND $connectionDeviceId != 'dev-{i}'"))
        .collect();
    let specs: Vec<RouteSpec> = texts
        .iter()
        .enumerate()
        .map(|(i, t)| RouteSpec {
            name: format!("r{i}"),
            source: RouteSource::DeviceMessages,
            condition: Some(t.clone()),
            endpoint_names: vec![format!("e{i}")],
            is_enabled: true,
        })
        .collect();
    let table = RouteTable::compile(&specs, FallbackRoute { enabled: false }).unwrap();
    assert!(table.routes.iter().all(|r| r.simple.is_some()));
    let mut levels: Vec<Option<String>> = (0..20).map(|i| Some(format!("critical-{i}"))).collect();
    levels.extend([
        Some("critical-".to_owned()),
        Some("critical-200".to_owned()),
        Some(String::new()),
        None,
    ]);
    for level in &levels {
        for device in ["dev-3", "dev-17", "other"] {
            let mut message = TestMessage::default().sys("iothub-connection-device-id", device);
            if let Some(level) = level {
                message = message.app("Level", level);
            }
            let mut out = EndpointSet::new();
            table.matches(
                RouteSource::DeviceMessages,
                &message,
                &mut evaluator,
                &mut out,
            );
            for (i, text) in texts.iter().enumerate() {
                let want = evaluator.evaluate(&Condition::compile(text).unwrap(), &message);
                let index = table
                    .endpoint_names()
                    .iter()
                    .position(|e| *e == format!("e{i}"))
                    .unwrap();
                assert_eq!(
                    out.contains(index),
                    want == Outcome::Match,
                    "{text} with level {level:?}, device {device}"
                );
            }
        }
    }
}
