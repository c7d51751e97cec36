//! Statement shapes: a DML text with its literals replaced by numbered placeholders, so that
//! `... WHERE aid = 17` and `... WHERE aid = 42` share one parse and one cached analysis. The literals come
//! back as virtual parameters (`$100001`, `$100002`, ...) when the decision is made. Clients of the simple
//! protocol (psql, pgbench -M simple, many ORMs' "inline" mode) send a different text for every key, so
//! without shapes every statement would be parsed anew.
//!
//! Normalizing is conservative: only SELECT, INSERT, UPDATE, DELETE and WITH statements, and only texts made
//! of plain lexemes (no dollar quoting, no E'' or B'' strings). Anything else is analysed by its text.

/// Placeholders for literals are numbered from here, far above any real parameter ($1..$65535).
pub const LITERAL_BASE: usize = 100_000;

/// A literal taken out of a statement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Literal<'a> {
    /// A numeric literal (`42`, `-7`, `1.5`) rather than a quoted string.
    pub number: bool,
    /// Its text, unquoted and unescaped: a slice of the statement, copied only when a doubled quote had to
    /// be undone.
    pub text: std::borrow::Cow<'a, str>,
}

/// The index of the quote that closes the one at `open` (a doubled quote inside is part of the text).
fn closing_quote(b: &[u8], open: usize) -> Option<usize> {
    let q = b[open];
    let mut j = open + 1;
    loop {
        match b.get(j) {
            None => return None,
            Some(&x) if x == q && b.get(j + 1) == Some(&q) => j += 2,
            Some(&x) if x == q => return Some(j),
            _ => j += 1,
        }
    }
}

fn is_ident(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'$' || b >= 0x80
}

/// Byte classes for the scan of plain text, looked up rather than computed for each byte (the scan is most
/// of a statement's normalization): a byte that starts something (`-`, `/`, quotes, `$`, `.`), a digit, and
/// a byte of an identifier (see [`is_ident`]).
const SPECIAL: u8 = 1;
const DIGIT: u8 = 2;
const IDENT: u8 = 4;
static CLASS: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut i = 0;
    while i < 256 {
        let b = i as u8;
        if matches!(b, b'-' | b'/' | b'"' | b'\'' | b'$' | b'.') {
            t[i] |= SPECIAL;
        }
        if b.is_ascii_digit() {
            t[i] |= DIGIT;
        }
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'$' || b >= 0x80 {
            t[i] |= IDENT;
        }
        i += 1;
    }
    t
};

/// Whether any of the eight bytes of `x` is one of 0x22..=0x39: the bytes that may start something in plain
/// text (quotes, `$`, `-`, `.`, `/`, digits — and `#%&()*+,` between them, which the byte-by-byte scan then
/// passes). Bytes of 0x80 and above are not. (`hasbetween` of "Bit Twiddling Hacks": each byte's sums stay
/// within the byte, so no byte's result depends on another's.)
#[inline]
fn may_start_something(x: u64) -> bool {
    const ONES: u64 = u64::MAX / 255;
    let low = x & (ONES * 127);
    // Bit 7 of each byte: below 0x3a, at least 0x22, and ASCII.
    (ONES * (127 + 0x3a)).wrapping_sub(low) & (low + ONES * (127 - 0x21)) & !x & (ONES * 128) != 0
}

/// The first placeholders as text: most statements have a few literals, and a copy of these costs less than
/// writing the number.
const PLACEHOLDERS: [&str; 16] = [
    "$100001", "$100002", "$100003", "$100004", "$100005", "$100006", "$100007", "$100008", "$100009", "$100010",
    "$100011", "$100012", "$100013", "$100014", "$100015", "$100016",
];

/// Appends the placeholder of the `k`th literal (from 1): `$100001`, ...
fn push_placeholder(out: &mut String, k: usize) {
    match PLACEHOLDERS.get(k.wrapping_sub(1)) {
        Some(p) => out.push_str(p),
        None => {
            out.push('$');
            push_decimal(out, LITERAL_BASE + k);
        }
    }
}

/// Appends `n` in decimal (without `fmt`'s machinery: this runs for every literal of every statement), in
/// one copy.
fn push_decimal(out: &mut String, mut n: usize) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.push_str(std::str::from_utf8(&digits[at..]).unwrap_or_default());
}

/// Words after which a string literal is an ordinary value; after any other word (a type name) it is part of
/// a typed literal.
const VALUE_KEYWORDS: &[&str] = &[
    "all",
    "and",
    "any",
    "between",
    "by",
    "case",
    "distinct",
    "else",
    "escape",
    "from",
    "ilike",
    "in",
    "is",
    "like",
    "limit",
    "not",
    "offset",
    "on",
    "or",
    "returning",
    "select",
    "set",
    "similar",
    "some",
    "then",
    "to",
    "using",
    "values",
    "when",
    "where",
];

/// Where the word that ends `t` starts (`t.len()` when it ends with no word). Counted in ASCII bytes, so the
/// word starts on a character boundary whatever comes before it.
fn last_word_start(t: &str) -> usize {
    t.len() - t.bytes().rev().take_while(|b| b.is_ascii_alphanumeric() || *b == b'_').count()
}

/// Whether the shape so far ends with a word that makes the next string a typed literal.
fn typed_literal_before(out: &str) -> bool {
    let t = out.trim_ascii_end();
    let word_start = last_word_start(t);
    let word = &t[word_start..];
    if word.is_empty() || word.starts_with(|c: char| c.is_ascii_digit()) || t[..word_start].ends_with('"') {
        return false;
    }
    !VALUE_KEYWORDS.iter().any(|k| word.eq_ignore_ascii_case(k))
}

/// Whether the shape so far ends with `ANY(`, `ALL(` or `SOME(`: a literal there is not what a placeholder
/// would be (`ANY(21)` is a scalar where `ANY($1)` takes an array).
fn array_operand_before(out: &str) -> bool {
    // (ASCII whitespace: what PostgreSQL's lexer skips; and cheaper than a trim of any Unicode space, on
    // every literal.)
    let Some(t) = out.trim_ascii_end().strip_suffix('(') else { return false };
    let t = t.trim_ascii_end();
    let word = &t[last_word_start(t)..];
    ["any", "all", "some"].iter().any(|k| word.eq_ignore_ascii_case(k))
}

/// The shape of a DML statement and its literals, or `None` when the text is not normalized.
pub fn normalize(sql: &str) -> Option<(String, Vec<Literal<'_>>)> {
    let (mut out, mut lits) = (String::new(), Vec::new());
    normalize_into(sql, &mut out, &mut lits).then_some((out, lits))
}

/// An emptied list of literals that borrows nothing any more, in the same allocation: a caller keeps it for
/// its next statement's literals instead of allocating a list for each. (An in-place `collect` of an empty
/// list: nothing is mapped, the buffer is reused, and only the lifetime changes.) A list grown past 64
/// literals is not kept.
pub fn spare(mut lits: Vec<Literal<'_>>) -> Vec<Literal<'static>> {
    if lits.capacity() > 64 {
        return Vec::new();
    }
    lits.clear();
    lits.into_iter().map(|_| unreachable!("the list was emptied")).collect()
}

/// [`normalize`] into buffers the caller keeps (`out` is cleared first, `lits` appended to): `false` when
/// the text is not normalized. The router's hot path keeps one shape buffer per thread, so that a statement
/// whose shape is cached allocates nothing for it.
pub fn normalize_into<'a>(sql: &'a str, out: &mut String, lits: &mut Vec<Literal<'a>>) -> bool {
    out.clear();
    let start = lits.len();
    let done = shape_into(sql, out, lits).is_some();
    if !done {
        lits.truncate(start);
    }
    done
}

fn shape_into<'a>(sql: &'a str, out: &mut String, lits: &mut Vec<Literal<'a>>) -> Option<()> {
    let word = crate::sql::first_word(sql);
    let dml = ["select", "insert", "update", "delete", "with"].iter().any(|w| word.eq_ignore_ascii_case(w));
    if !dml {
        return None;
    }
    let b = sql.as_bytes();
    // Room for placeholders longer than their literals (`$100001` for `5`): no growth for a few of them.
    out.reserve(sql.len() + 32);
    let first = lits.len();
    let mut i = 0;
    // The last byte written that is not whitespace: decides whether '-' starts a negative literal.
    let mut last = b'(';
    let push_lit = |out: &mut String, lits: &mut Vec<Literal<'a>>, number: bool, text: std::borrow::Cow<'a, str>| {
        lits.push(Literal { number, text });
        push_placeholder(out, lits.len() - first);
    };
    while i < b.len() {
        let c = b[i];
        match c {
            b'-' if b.get(i + 1) == Some(&b'-') => {
                let end = sql[i..].find('\n').map_or(b.len(), |e| i + e);
                out.push_str(&sql[i..end]);
                i = end;
                continue;
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                let end = i + 2 + sql[i + 2..].find("*/")? + 2;
                if sql[i + 2..end - 2].contains("/*") {
                    return None; // nested comments
                }
                out.push_str(&sql[i..end]);
                i = end;
                continue;
            }
            b'"' => {
                let j = closing_quote(b, i)?;
                out.push_str(&sql[i..=j]);
                last = b'"';
                i = j + 1;
                continue;
            }
            b'\'' => {
                if i > 0 && is_ident(b[i - 1]) {
                    return None; // E'..', B'..', X'..', U&'..', N'..'
                }
                if array_operand_before(out) {
                    // ANY('{1,2}'): the statement's own text takes no keys from an array literal; a shape
                    // (ANY($1), an array parameter) would, and the two protocols would route it differently.
                    return None;
                }
                if typed_literal_before(out) {
                    // `uuid '..'`, `DATE '..'`, `INTERVAL '..'`: the string is part of a typed literal, which
                    // only a literal can follow; keep it in the shape.
                    let j = closing_quote(b, i)?;
                    out.push_str(&sql[i..=j]);
                    last = b'\'';
                    i = j + 1;
                    continue;
                }
                let j = closing_quote(b, i)?;
                if b.get(j + 1).is_some_and(|x| is_ident(*x) || *x == b'$') {
                    return None; // 'a'b: the placeholder would run into the word after it ($100001b)
                }
                let raw = &sql[i + 1..j];
                let text = if raw.contains('\'') { raw.replace("''", "'").into() } else { raw.into() };
                push_lit(out, lits, false, text);
                last = b'\'';
                i = j + 1;
                continue;
            }
            b'$' => {
                if b.get(i + 1).is_some_and(u8::is_ascii_digit) {
                    // A real parameter: $n.
                    let mut j = i + 1;
                    while b.get(j).is_some_and(u8::is_ascii_digit) {
                        j += 1;
                    }
                    out.push_str(&sql[i..j]);
                    last = b'0';
                    i = j;
                    continue;
                }
                if i == 0 || !is_ident(b[i - 1]) {
                    return None; // dollar quoting
                }
            }
            b'0'..=b'9' | b'.' | b'-' if i == 0 || !is_ident(b[i - 1]) => {
                let negative = c == b'-';
                let digits_at = if negative { i + 1 } else { i };
                let starts_number = b.get(digits_at).is_some_and(u8::is_ascii_digit)
                    || (b.get(digits_at) == Some(&b'.') && b.get(digits_at + 1).is_some_and(u8::is_ascii_digit));
                let sign_ok = !negative || matches!(last, b'=' | b'(' | b',' | b'<' | b'>');
                if starts_number && i > 0 && b[i - 1] == b'.' {
                    return None; // a.5: not a number the way PostgreSQL reads it either
                }
                if starts_number && sign_ok {
                    if array_operand_before(out) {
                        return None; // ANY(21): a scalar, where ANY($1) would take an array
                    }
                    let mut j = digits_at;
                    let mut dot = false;
                    while let Some(&x) = b.get(j) {
                        match x {
                            b'0'..=b'9' => {}
                            b'.' if !dot => dot = true,
                            b'.' => return None, // 1.2.3, 0..e3: not one number
                            _ => break,
                        }
                        j += 1;
                    }
                    if matches!(b.get(j), Some(b'e' | b'E')) {
                        let mut k = j + 1;
                        if matches!(b.get(k), Some(b'+' | b'-')) {
                            k += 1;
                        }
                        if b.get(k).is_some_and(u8::is_ascii_digit) {
                            j = k;
                            while b.get(j).is_some_and(u8::is_ascii_digit) {
                                j += 1;
                            }
                        }
                    }
                    if b.get(j).is_some_and(|x| is_ident(*x)) {
                        return None; // 1abc: not a plain number
                    }
                    push_lit(out, lits, true, sql[i..j].into());
                    last = b'0';
                    i = j;
                    continue;
                }
            }
            _ => {}
        }
        // A run of bytes that start nothing special is copied at once. It ends on an ASCII byte, so never
        // inside a UTF-8 sequence. Eight bytes are passed at once when none of them may start something;
        // otherwise the next eight are looked at one by one.
        let mut j = i + 1;
        'run: loop {
            while let Some(w) = b.get(j..j + 8) {
                if may_start_something(u64::from_le_bytes(w.try_into().expect("eight bytes"))) {
                    break;
                }
                j += 8;
            }
            let stop = (j + 8).min(b.len());
            if j == stop {
                break;
            }
            while j < stop {
                let class = CLASS[b[j] as usize];
                if class & (SPECIAL | DIGIT) != 0 && (class & SPECIAL != 0 || CLASS[b[j - 1] as usize] & IDENT == 0) {
                    break 'run;
                }
                j += 1;
            }
        }
        let run = sql.get(i..j)?;
        out.push_str(run);
        if let Some(&x) = run.as_bytes().iter().rev().find(|x| !x.is_ascii_whitespace()) {
            last = x;
        }
        i = j;
    }
    Some(())
}

/// A text with literal placeholders written back as the literals (for messages).
pub fn render(text: &str, lits: &[Literal]) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let digits: String = rest[at + 1..].chars().take_while(char::is_ascii_digit).collect();
        match digits.parse::<usize>().ok().filter(|n| *n > LITERAL_BASE).and_then(|n| lits.get(n - LITERAL_BASE - 1)) {
            Some(l) if l.number => out.push_str(&l.text),
            Some(l) => {
                out.push('\'');
                out.push_str(&l.text);
                out.push('\'');
            }
            None => {
                out.push('$');
                out.push_str(&digits);
            }
        }
        rest = &rest[at + 1 + digits.len()..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lit(number: bool, text: &str) -> Literal<'_> {
        Literal { number, text: text.into() }
    }

    #[test]
    fn a_spare_list_keeps_its_buffer() {
        let sql = String::from("SELECT 1 FROM t WHERE a = 2 AND b = 'x'");
        let mut lits = Vec::new();
        let mut shape = String::new();
        assert!(normalize_into(&sql, &mut shape, &mut lits));
        assert_eq!(lits.len(), 3);
        let (at, cap) = (lits.as_ptr() as usize, lits.capacity());
        let kept: Vec<Literal<'static>> = spare(lits);
        drop(sql);
        assert!(kept.is_empty());
        assert_eq!((kept.as_ptr() as usize, kept.capacity()), (at, cap));
    }

    #[test]
    fn literals_become_placeholders() {
        let (shape, lits) = normalize("SELECT abalance FROM pgbench_accounts WHERE aid = 4242;").unwrap();
        assert_eq!(shape, "SELECT abalance FROM pgbench_accounts WHERE aid = $100001;");
        assert_eq!(lits, vec![lit(true, "4242")]);
        let (shape, lits) =
            normalize("select * from t where a = 'it''s' and b in (1, -2, 3.5e2) and c = $1 and \"x'y\" = -4").unwrap();
        assert_eq!(
            shape,
            "select * from t where a = $100001 and b in ($100002, $100003, $100004) and c = $1 and \"x'y\" = $100005"
        );
        assert_eq!(
            lits,
            vec![lit(false, "it's"), lit(true, "1"), lit(true, "-2"), lit(true, "3.5e2"), lit(true, "-4")]
        );
        assert_eq!(render("user_id = $100002 or x = $100001", &lits), "user_id = 1 or x = 'it's'");
        // Placeholders past the ninth, and words glued to digits (t1, x2y) that are not literals.
        let sql =
            format!("INSERT INTO t1 (x2y) VALUES {}", (1..=12).map(|i| format!("({i})")).collect::<Vec<_>>().join(","));
        let (shape, lits) = normalize(&sql).unwrap();
        assert!(shape.starts_with("INSERT INTO t1 (x2y) VALUES ($100001),($100002),"), "{shape}");
        assert!(shape.ends_with(",($100010),($100011),($100012)"), "{shape}");
        assert_eq!(lits.len(), 12);
        // ANY( with spaces around the parenthesis still keeps its literal (an array operand).
        assert_eq!(normalize("SELECT 1 FROM t WHERE a = ANY ( '{1,2}' )"), None);
        assert_eq!(normalize("SELECT 1 FROM t WHERE a = any\t(\n21)"), None);
    }

    #[test]
    fn placeholders_from_the_table_and_past_it() {
        for k in 1..=40 {
            let mut out = String::new();
            push_placeholder(&mut out, k);
            assert_eq!(out, format!("${}", LITERAL_BASE + k));
        }
    }

    #[test]
    fn eight_bytes_at_once_miss_no_byte_that_may_start_something() {
        let starts = |v: u8| (0x22..=0x39).contains(&v);
        for at in 0..8 {
            for v in 0..=255u8 {
                for w in [b'a', b' ', 0x21, 0x3a, 0x80, 0xff, 0x00] {
                    let mut bytes = [w; 8];
                    bytes[at] = v;
                    let want = starts(v) || starts(w);
                    assert_eq!(super::may_start_something(u64::from_le_bytes(bytes)), want, "{bytes:?}");
                }
            }
        }
        for a in 0..=255u8 {
            for c in 0..=255u8 {
                let bytes = [b'x', a, c, b'y', a, b'z', c, b'_'];
                assert_eq!(super::may_start_something(u64::from_le_bytes(bytes)), starts(a) || starts(c), "{bytes:?}");
            }
        }
        // A statement whose literals come after long runs is shaped as before.
        let sql = "SELECT abalance, name_with_a_long_identifier FROM pgbench_accounts WHERE aid = 12345 AND t2.x = 'é'";
        let (shape, lits) = super::normalize(sql).expect("normalized");
        assert_eq!(
            shape,
            "SELECT abalance, name_with_a_long_identifier FROM pgbench_accounts WHERE aid = $100001 AND t2.x = $100002"
        );
        assert_eq!(lits, vec![lit(true, "12345"), lit(false, "é")]);
    }

    #[test]
    fn leaves_alone_what_it_cannot_shape() {
        assert_eq!(normalize("SET x = 1"), None);
        assert_eq!(normalize("SELECT $$x$$"), None);
        assert_eq!(normalize("SELECT E'a\\nb'"), None);
        assert_eq!(normalize("SELECT 1abc"), None);
        // Comments (and the hints in them) and identifiers with digits stay as they are.
        let (shape, lits) = normalize("/* shard_key: 42 */ SELECT t1.c2 - 3 FROM t1 -- 7\nWHERE x = 5").unwrap();
        assert_eq!(shape, "/* shard_key: 42 */ SELECT t1.c2 - $100001 FROM t1 -- 7\nWHERE x = $100002");
        assert_eq!(lits, vec![lit(true, "3"), lit(true, "5")]);
        let (shape, _) = normalize("SELECT 'é', 'x' FROM ü").unwrap();
        assert_eq!(shape, "SELECT $100001, $100002 FROM ü");
        // Typed literals keep their string; ordinary values after keywords do not.
        let (shape, _) =
            normalize("SELECT * FROM t WHERE d > DATE '2026-01-01' AND u = uuid 'x' AND n LIKE 'a%'").unwrap();
        assert_eq!(shape, "SELECT * FROM t WHERE d > DATE '2026-01-01' AND u = uuid 'x' AND n LIKE $100001");
    }
}
