//! Connection strings without their passwords, for messages.
//!
//! A PostgreSQL connection string comes in two forms, and both can carry a password:
//!
//! * URL: `postgres://user:password@host/db`, or `?password=...` among its parameters;
//! * key/value: `host=db user=app password=secret`, a value possibly single-quoted
//!   (`password='two words'`, with `\'` and `\\` escapes).
//!
//! [`redact`] replaces each password with [`MARK`]; [`scrub`] removes any password of a
//! connection string from another text (an error message a library built from it).

/// What a password is replaced with.
pub const MARK: &str = "***";

/// `conn` with every password replaced by [`MARK`]; everything else is kept as it is, so
/// the host, port, user and database stay readable.
pub fn redact(conn: &str) -> String {
    match url_rest(conn) {
        Some(start) => redact_url(conn, start),
        None => redact_key_values(conn),
    }
}

/// `text` with every password of `conn` (as written, and percent-decoded for a URL)
/// replaced by [`MARK`].
pub fn scrub(text: &str, conn: &str) -> String {
    let mut out = text.to_string();
    let mut secrets = passwords(conn);
    // Longest first, so that a password containing another is replaced whole.
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    for secret in secrets.iter().filter(|s| !s.is_empty()) {
        out = out.replace(secret.as_str(), MARK);
    }
    out
}

/// The byte offset just past `scheme://` when `conn` is a URL.
fn url_rest(conn: &str) -> Option<usize> {
    ["postgresql://", "postgres://"].iter().find_map(|scheme| {
        conn.get(..scheme.len())
            .filter(|head| head.eq_ignore_ascii_case(scheme))
            .map(|_| scheme.len())
    })
}

/// Where the user info of a URL ends (the `@`), if it has one. A password should have its
/// `@`, `/` and `?` percent-encoded, but people paste them raw, so the user info is taken
/// to end at the last `@`. The `postgres` client ends it at the first `@`, so whatever it
/// reads as a password is inside; the price is that an `@` in a query parameter (`?user=a@b`)
/// hides the host and path too.
fn userinfo_end(rest: &str) -> Option<usize> {
    rest.rfind('@')
}

fn redact_url(conn: &str, start: usize) -> String {
    let rest = &conn[start..];
    let mut out = conn[..start].to_string();
    let after_userinfo = match userinfo_end(rest) {
        Some(at) => {
            let userinfo = &rest[..at];
            match userinfo.find(':') {
                Some(colon) => {
                    out.push_str(&userinfo[..=colon]);
                    out.push_str(MARK);
                }
                None => out.push_str(userinfo),
            }
            out.push('@');
            at + 1
        }
        None => 0,
    };
    let rest = &rest[after_userinfo..];
    match rest.find('?') {
        None => out.push_str(rest),
        Some(q) => {
            out.push_str(&rest[..=q]);
            let params: Vec<String> = rest[q + 1..]
                .split('&')
                .map(|param| match param.split_once('=') {
                    Some((key, _)) if is_password_key(key) => format!("{key}={MARK}"),
                    _ => param.to_string(),
                })
                .collect();
            out.push_str(&params.join("&"));
        }
    }
    out
}

fn is_password_key(key: &str) -> bool {
    key.trim().eq_ignore_ascii_case("password")
}

/// One `key = value` pair of a key/value string, as byte ranges into it.
struct Pair {
    key: std::ops::Range<usize>,
    /// The value as written, quotes included.
    value: std::ops::Range<usize>,
}

/// The pairs of a key/value string. It is parsed the way libpq does (whitespace between
/// pairs and around `=`, single-quoted values with backslash escapes), but leniently: a
/// word without `=` is skipped, and an unclosed quote runs to the end.
fn pairs(conn: &str) -> Vec<Pair> {
    let b = conn.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    let skip_ws = |mut i: usize| {
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        i
    };
    loop {
        i = skip_ws(i);
        if i >= b.len() {
            return out;
        }
        let key_start = i;
        while i < b.len() && b[i] != b'=' && !b[i].is_ascii_whitespace() {
            i += 1;
        }
        let key = key_start..i;
        i = skip_ws(i);
        if i >= b.len() || b[i] != b'=' {
            // A word that is not a pair; the next one starts here.
            continue;
        }
        i = skip_ws(i + 1);
        let value_start = i;
        if i < b.len() && b[i] == b'\'' {
            i += 1;
            while i < b.len() && b[i] != b'\'' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i = (i + 1).min(b.len());
        } else {
            while i < b.len() && !b[i].is_ascii_whitespace() {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i = i.min(b.len());
        }
        out.push(Pair {
            key,
            value: value_start..i,
        });
    }
}

fn redact_key_values(conn: &str) -> String {
    let mut out = String::with_capacity(conn.len());
    let mut copied = 0;
    for p in pairs(conn) {
        if is_password_key(&conn[p.key.clone()]) {
            out.push_str(&conn[copied..p.value.start]);
            out.push_str(MARK);
            copied = p.value.end;
        }
    }
    out.push_str(&conn[copied..]);
    out
}

/// Every password `conn` carries: as written, unquoted and unescaped, and percent-decoded.
fn passwords(conn: &str) -> Vec<String> {
    let mut raw = Vec::new();
    match url_rest(conn) {
        Some(start) => {
            let rest = &conn[start..];
            let mut query_from = 0;
            if let Some(at) = userinfo_end(rest) {
                if let Some(colon) = rest[..at].find(':') {
                    raw.push(rest[colon + 1..at].to_string());
                    // The client's reading: up to the first `@`.
                    if let Some(first) = rest[colon..at].find('@') {
                        raw.push(rest[colon + 1..colon + first].to_string());
                    }
                }
                query_from = at + 1;
            }
            if let Some(q) = rest[query_from..].find('?') {
                for param in rest[query_from + q + 1..].split('&') {
                    if let Some((key, value)) = param.split_once('=') {
                        if is_password_key(key) {
                            raw.push(value.to_string());
                        }
                    }
                }
            }
            let decoded: Vec<String> = raw.iter().map(|s| percent_decode(s)).collect();
            raw.extend(decoded);
        }
        None => {
            for p in pairs(conn) {
                if is_password_key(&conn[p.key.clone()]) {
                    let value = &conn[p.value.clone()];
                    raw.push(value.to_string());
                    raw.push(unquote(value));
                }
            }
        }
    }
    raw
}

/// A key/value string's value without its quotes and backslash escapes.
fn unquote(value: &str) -> String {
    let inner = value
        .strip_prefix('\'')
        .map(|v| v.strip_suffix('\'').unwrap_or(v))
        .unwrap_or(value);
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.extend(chars.next()),
            c => out.push(c),
        }
    }
    out
}

/// `%XX` sequences decoded (as UTF-8, lossily); anything else kept.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = || std::str::from_utf8(b.get(i + 1..i + 3)?).ok();
        match (b[i], hex().and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_passwords_are_replaced() {
        for (conn, expected) in [
            (
                "postgres://app:s3cret@db.example:5432/app",
                "postgres://app:***@db.example:5432/app",
            ),
            (
                "postgresql://app:s3cret@db/app?sslmode=disable",
                "postgresql://app:***@db/app?sslmode=disable",
            ),
            ("POSTGRES://app:s3cret@db/app", "POSTGRES://app:***@db/app"),
            // Raw '@', '/', '?' and ':' in the password.
            (
                "postgres://app:p@ss/w?rd:x@db:5432/app",
                "postgres://app:***@db:5432/app",
            ),
            (
                "postgres://app:p%40ss@db1:5432,db2:5433/app",
                "postgres://app:***@db1:5432,db2:5433/app",
            ),
            (
                "postgres://db/app?user=app&password=s3cret&connect_timeout=2",
                "postgres://db/app?user=app&password=***&connect_timeout=2",
            ),
            (
                "postgres://app:one@db/app?password=two",
                "postgres://app:***@db/app?password=***",
            ),
            // A user name with an '@' in it.
            (
                "postgres://app@server:s3cret@db/app",
                "postgres://app@server:***@db/app",
            ),
            // An '@' in a parameter: more is hidden than needed, nothing leaks.
            (
                "postgres://db:5432/app?user=a@b.example",
                "postgres://db:***@b.example",
            ),
            // Nothing to hide.
            ("postgres://app@db/app", "postgres://app@db/app"),
            ("postgres://db:5432/app", "postgres://db:5432/app"),
            ("postgres://", "postgres://"),
        ] {
            assert_eq!(redact(conn), expected, "{conn}");
        }
    }

    #[test]
    fn key_value_passwords_are_replaced() {
        for (conn, expected) in [
            (
                "host=db user=app password=s3cret dbname=app",
                "host=db user=app password=*** dbname=app",
            ),
            ("password=s3cret", "password=***"),
            (
                "host=db password = 's3 cret' port=5432",
                "host=db password = *** port=5432",
            ),
            (
                "host=db password='it\\'s secret' user=app",
                "host=db password=*** user=app",
            ),
            (
                "host=db  PASSWORD=x\tuser=app",
                "host=db  PASSWORD=***\tuser=app",
            ),
            ("host=db password='unclosed secret", "host=db password=***"),
            ("host=db password=", "host=db password=***"),
            (
                "host=db password=a password=b",
                "host=db password=*** password=***",
            ),
            // Nothing to hide, and words that are not pairs are kept.
            ("host=db user=app", "host=db user=app"),
            ("host=db stray word", "host=db stray word"),
            ("", ""),
        ] {
            assert_eq!(redact(conn), expected, "{conn}");
        }
    }

    #[test]
    fn scrub_removes_passwords_from_other_text() {
        let conn = "postgres://app:p%40ss%2Fword@db/app?password=other";
        let text = "failed for p%40ss%2Fword, p@ss/word and other";
        assert_eq!(scrub(text, conn), "failed for ***, *** and ***");

        // The client reads the password up to the first '@', a person up to the last.
        let conn = "postgres://app:first@second@db/app";
        assert_eq!(scrub("bad first, first@second", conn), "bad ***, ***");

        let conn = "host=db password='it\\'s secret'";
        assert_eq!(scrub("saw it's secret here", conn), "saw *** here");
        assert_eq!(scrub("no password here", "host=db"), "no password here");
    }

    #[test]
    fn percent_decoding_keeps_malformed_escapes() {
        assert_eq!(percent_decode("a%41%2f%zz%4"), "aA/%zz%4");
    }
}
