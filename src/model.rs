//! Per-host model renaming without touching the rest of the request body.
//!
//! A host's `models` map lets a backup provider receive its own name for a
//! model, but the body is otherwise forwarded byte for byte: re-serializing it
//! would reorder keys, change number spellings and escapes, and cost a full
//! parse of bodies that can reach 16 MiB of base64 images. So a small
//! validating scanner finds the byte range of the top-level `"model"` string
//! token in one linear pass with no heap allocation, and only that range is
//! replaced. Guarantees: never panics and always terminates on any input; a
//! result is returned only for a well-formed JSON object whose top-level
//! `model` member appears exactly once and is a string; everything outside
//! that token is left exactly as received.
//!
//! Duplicate top-level `model` members yield `None` (no rewrite): parsers
//! disagree on which duplicate wins, so rewriting one could still let the
//! upstream read the other, unmapped name. Leaving such a body alone makes the
//! upstream see exactly what the client sent.

use std::collections::BTreeMap;
use std::ops::Range;

/// The top-level `model` member of a request body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelField {
    /// The decoded model name.
    pub value: String,
    /// Byte range of the whole JSON string token, quotes included.
    pub span: Range<usize>,
}

/// Finds the top-level `"model"` string of a JSON object body; `None` if the
/// body is malformed, not an object, lacks it, repeats it or it is no string.
pub fn find_model(body: &[u8]) -> Option<ModelField> {
    let span = scan(body)?;
    let value = serde_json::from_slice::<String>(body.get(span.clone())?).ok()?;
    Some(ModelField { value, span })
}

/// Returns `body` with its model renamed per `map`, or `None` when nothing
/// is to be renamed (the caller then forwards the original).
pub fn rewrite_model(body: &[u8], map: &BTreeMap<String, String>) -> Option<Vec<u8>> {
    let field = find_model(body)?;
    let mapped = map.get(&field.value)?;
    let token = serde_json::to_string(mapped).ok()?;
    let head = body.get(..field.span.start)?;
    let tail = body.get(field.span.end..)?;
    let mut out = Vec::with_capacity(head.len() + token.len() + tail.len());
    out.extend_from_slice(head);
    out.extend_from_slice(token.as_bytes());
    out.extend_from_slice(tail);
    Some(out)
}

/// Deeper bodies get no rewrite. Far above anything a chat request needs
/// (serde_json itself stops at 128), and it keeps the stack a fixed bitset.
const MAX_DEPTH: usize = 1024;

/// Open containers, one bit each (set: object), so no heap is needed.
struct Stack {
    bits: [u64; MAX_DEPTH / 64],
    len: usize,
}

impl Stack {
    fn push(&mut self, object: bool) -> Option<()> {
        if self.len >= MAX_DEPTH {
            return None;
        }
        let (word, bit) = (self.len / 64, self.len % 64);
        let w = self.bits.get_mut(word)?;
        if object {
            *w |= 1 << bit;
        } else {
            *w &= !(1 << bit);
        }
        self.len += 1;
        Some(())
    }

    fn top_is_object(&self) -> Option<bool> {
        let i = self.len.checked_sub(1)?;
        Some(self.bits.get(i / 64)? >> (i % 64) & 1 == 1)
    }
}

/// What the grammar allows next.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Expect {
    Value,
    /// Right after `[`: a value or `]`.
    ValueOrEnd,
    /// Right after `{`: a key or `}`.
    KeyOrEnd,
    /// After `,` in an object.
    Key,
    Colon,
    /// After a complete value inside a container.
    CommaOrEnd,
}

/// The span of the single top-level string `model`, validating the whole
/// body as JSON on the way (a malformed body may be read differently
/// upstream, so it gets no rewrite).
fn scan(body: &[u8]) -> Option<Range<usize>> {
    let mut i = skip_ws(body, 0);
    if body.get(i) != Some(&b'{') {
        return None;
    }
    i += 1;
    let mut stack = Stack {
        bits: [0; MAX_DEPTH / 64],
        len: 0,
    };
    stack.push(true)?;
    let mut expect = Expect::KeyOrEnd;
    let mut found: Option<Range<usize>> = None;
    let mut model_value_next = false;

    while stack.len > 0 {
        i = skip_ws(body, i);
        let b = *body.get(i)?;
        match expect {
            Expect::Key | Expect::KeyOrEnd => {
                if b == b'}' && expect == Expect::KeyOrEnd {
                    i = close(&mut stack, i, true)?;
                    expect = Expect::CommaOrEnd;
                    continue;
                }
                if b != b'"' {
                    return None;
                }
                let end = skip_string(body, i)?;
                if stack.len == 1 && key_is_model(body.get(i + 1..end - 1)?) {
                    if found.is_some() {
                        return None;
                    }
                    model_value_next = true;
                }
                i = end;
                expect = Expect::Colon;
            }
            Expect::Colon => {
                if b != b':' {
                    return None;
                }
                i += 1;
                expect = Expect::Value;
            }
            Expect::CommaOrEnd => {
                let object = stack.top_is_object()?;
                match b {
                    b',' => {
                        i += 1;
                        expect = if object { Expect::Key } else { Expect::Value };
                    }
                    b'}' | b']' => {
                        i = close(&mut stack, i, b == b'}')?;
                    }
                    _ => return None,
                }
            }
            Expect::Value | Expect::ValueOrEnd => {
                if b == b']' && expect == Expect::ValueOrEnd {
                    i = close(&mut stack, i, false)?;
                    expect = Expect::CommaOrEnd;
                    continue;
                }
                if model_value_next && b != b'"' {
                    return None;
                }
                match b {
                    b'{' => {
                        stack.push(true)?;
                        i += 1;
                        expect = Expect::KeyOrEnd;
                        continue;
                    }
                    b'[' => {
                        stack.push(false)?;
                        i += 1;
                        expect = Expect::ValueOrEnd;
                        continue;
                    }
                    b'"' => {
                        let end = skip_string(body, i)?;
                        if model_value_next {
                            found = Some(i..end);
                            model_value_next = false;
                        }
                        i = end;
                    }
                    b'-' | b'0'..=b'9' => i = skip_number(body, i)?,
                    b't' => i = skip_literal(body, i, b"true")?,
                    b'f' => i = skip_literal(body, i, b"false")?,
                    b'n' => i = skip_literal(body, i, b"null")?,
                    _ => return None,
                }
                expect = Expect::CommaOrEnd;
            }
        }
    }
    // Anything but whitespace after the root object makes it not JSON.
    if skip_ws(body, i) != body.len() {
        return None;
    }
    found
}

/// Pops the container closed by the bracket at `i` if it matches its opener.
fn close(stack: &mut Stack, i: usize, object: bool) -> Option<usize> {
    if stack.top_is_object()? != object {
        return None;
    }
    stack.len -= 1;
    Some(i + 1)
}

fn skip_ws(body: &[u8], mut i: usize) -> usize {
    while let Some(b' ' | b'\t' | b'\n' | b'\r') = body.get(i) {
        i += 1;
    }
    i
}

/// Index just past the string token opening at `start`, or `None` if it is
/// unterminated or not valid JSON string syntax or UTF-8.
fn skip_string(body: &[u8], start: usize) -> Option<usize> {
    let mut i = start + 1;
    let mut high_bits = 0u64;
    // This loop is the hot path: base64 image data lives in strings, so
    // plain bytes are skipped eight at a time.
    loop {
        while let Some(chunk) = body.get(i..).and_then(|rest| rest.first_chunk::<8>()) {
            let word = u64::from_le_bytes(*chunk);
            if needs_attention(word) {
                break;
            }
            high_bits |= word;
            i += 8;
        }
        match *body.get(i)? {
            b'"' => break,
            b'\\' => {
                i = skip_escape(body, i)?;
                continue;
            }
            0..=0x1f => return None,
            b => high_bits |= u64::from(b),
        }
        i += 1;
    }
    let non_ascii = high_bits & HIGH_BITS != 0;
    // Checking UTF-8 only for strings that need it keeps ASCII bodies at one pass.
    if non_ascii {
        std::str::from_utf8(body.get(start + 1..i)?).ok()?;
    }
    Some(i + 1)
}

const LOW_BITS: u64 = 0x0101_0101_0101_0101;
const HIGH_BITS: u64 = LOW_BITS * 0x80;

/// Whether any of the eight bytes in `word` is `"`, `\\` or a control
/// character (the bytes a string scan must stop at). Exact as a yes/no,
/// by the classic "has a zero byte" bit trick.
fn needs_attention(word: u64) -> bool {
    let zero_byte = |x: u64| x.wrapping_sub(LOW_BITS) & !x;
    let quote = zero_byte(word ^ (LOW_BITS * u64::from(b'"')));
    let backslash = zero_byte(word ^ (LOW_BITS * u64::from(b'\\')));
    let control = word.wrapping_sub(LOW_BITS * 0x20) & !word;
    (quote | backslash | control) & HIGH_BITS != 0
}

/// Index just past the escape sequence whose backslash is at `i`.
fn skip_escape(body: &[u8], i: usize) -> Option<usize> {
    match *body.get(i + 1)? {
        b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => Some(i + 2),
        b'u' => {
            hex4(body.get(i + 2..i + 6)?)?;
            Some(i + 6)
        }
        _ => None,
    }
}

fn hex4(digits: &[u8]) -> Option<u32> {
    digits.iter().try_fold(0u32, |acc, &d| {
        let v = char::from(d).to_digit(16)?;
        Some(acc << 4 | v)
    })
}

/// Whether a key's raw contents (already validated, quotes excluded) decode
/// to `model`, compared escape by escape so no string is built.
fn key_is_model(raw: &[u8]) -> bool {
    const WANT: &[u8] = b"model";
    if raw == WANT {
        return true;
    }
    let mut want = WANT.iter();
    let mut i = 0;
    while let Some(&b) = raw.get(i) {
        let (decoded, len) = if b == b'\\' {
            match raw.get(i + 1) {
                Some(b'u') => match raw.get(i + 2..i + 6).and_then(hex4) {
                    // Every byte of `model` is ASCII, so any other code point differs.
                    Some(c) if c < 0x80 => (c as u8, 6),
                    _ => return false,
                },
                Some(&e) => (unescape_short(e), 2),
                None => return false,
            }
        } else {
            (b, 1)
        };
        if want.next() != Some(&decoded) {
            return false;
        }
        i += len;
    }
    want.next().is_none()
}

/// The byte a two-character escape stands for.
fn unescape_short(e: u8) -> u8 {
    match e {
        b'b' => 0x08,
        b'f' => 0x0c,
        b'n' => b'\n',
        b'r' => b'\r',
        b't' => b'\t',
        other => other,
    }
}

/// Index just past the JSON number starting at `i`.
fn skip_number(body: &[u8], mut i: usize) -> Option<usize> {
    let digits = |body: &[u8], mut i: usize| {
        let start = i;
        while body.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        (i > start).then_some(i)
    };
    if body.get(i) == Some(&b'-') {
        i += 1;
    }
    match body.get(i)? {
        b'0' => i += 1,
        b'1'..=b'9' => i = digits(body, i)?,
        _ => return None,
    }
    if body.get(i) == Some(&b'.') {
        i = digits(body, i + 1)?;
    }
    if let Some(b'e' | b'E') = body.get(i) {
        i += 1;
        if let Some(b'+' | b'-') = body.get(i) {
            i += 1;
        }
        i = digits(body, i)?;
    }
    Some(i)
}

fn skip_literal(body: &[u8], i: usize, word: &[u8]) -> Option<usize> {
    body.get(i..)?.starts_with(word).then_some(i + word.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
    use std::fmt;

    fn model(body: &str) -> Option<String> {
        find_model(body.as_bytes()).map(|f| f.value)
    }

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    /// Asserts the rewrite changed only the model token, byte for byte.
    fn assert_only_model_changed(body: &[u8], out: &[u8], new_token: &str) {
        let span = find_model(body).unwrap().span;
        assert_eq!(&out[..span.start], &body[..span.start]);
        let rest = span.start + new_token.len();
        assert_eq!(&out[span.start..rest], new_token.as_bytes());
        assert_eq!(&out[rest..], &body[span.end..]);
    }

    #[test]
    fn model_first_middle_last() {
        assert_eq!(model(r#"{"model":"a","x":1}"#).as_deref(), Some("a"));
        assert_eq!(
            model(r#"{"x":1,"model":"b","y":[2]}"#).as_deref(),
            Some("b")
        );
        assert_eq!(
            model(r#"{"x":{"y":null},"model":"c"}"#).as_deref(),
            Some("c")
        );
        assert_eq!(model(r#"{"model":"only"}"#).as_deref(), Some("only"));
    }

    #[test]
    fn span_covers_the_token_with_quotes() {
        let body = br#"{"stream":true, "model": "m\"x"}"#;
        let f = find_model(body).unwrap();
        assert_eq!(&body[f.span.clone()], br#""m\"x""#);
        assert_eq!(f.value, "m\"x");
    }

    #[test]
    fn nested_model_keys_are_ignored() {
        let body = r#"{"messages":[{"role":"user","model":"inner","content":"hi"}],
            "tools":[{"type":"function","function":{"name":"f","parameters":
            {"type":"object","properties":{"model":{"type":"string"}}}}}],
            "model":"outer"}"#;
        assert_eq!(model(body).as_deref(), Some("outer"));
        let nested_only = r#"{"messages":[{"model":"inner"}],"meta":{"model":"x"}}"#;
        assert_eq!(model(nested_only), None);
    }

    #[test]
    fn model_inside_strings_is_ignored() {
        let body = r#"{"prompt":"{\"model\":\"fake\"}","x":"\"model\":\"y\"","model":"real"}"#;
        assert_eq!(model(body).as_deref(), Some("real"));
        assert_eq!(model(r#"{"prompt":"\"model\": \"fake\""}"#), None);
        // A key that only ends in `model` is another key.
        assert_eq!(model(r#"{"xmodel":"a","models":"b","Model":"c"}"#), None);
    }

    #[test]
    fn escaped_key_matches() {
        assert_eq!(model(r#"{"mod\u0065l":"a"}"#).as_deref(), Some("a"));
        assert_eq!(
            model(r#"{"\u006D\u006f\u0064\u0065\u006c":"b"}"#).as_deref(),
            Some("b")
        );
        assert_eq!(model(r#"{"mod\/el":"c"}"#), None);
        assert_eq!(model(r#"{"mode\u006":"c"}"#), None);
        assert_eq!(model(r#"{"model\u0000":"c"}"#), None);
        // Escaped and plain spellings of the same key are duplicates.
        assert_eq!(model(r#"{"model":"a","mod\u0065l":"b"}"#), None);
    }

    #[test]
    fn escaped_and_unicode_values() {
        assert_eq!(
            model(r#"{"model":"a\"b\\c\/d\n"}"#).as_deref(),
            Some("a\"b\\c/d\n")
        );
        assert_eq!(model(r#"{"model":"caf\u00e9"}"#).as_deref(), Some("café"));
        assert_eq!(model(r#"{"model":"\ud83d\ude00"}"#).as_deref(), Some("😀"));
        assert_eq!(
            model(r#"{"model":"café 😀 模型"}"#).as_deref(),
            Some("café 😀 模型")
        );
        // A lone surrogate is no string serde_json can decode.
        assert_eq!(model(r#"{"model":"\ud83d"}"#), None);
        assert_eq!(model(r#"{"model":""}"#).as_deref(), Some(""));
    }

    #[test]
    fn whitespace_variations() {
        assert_eq!(model(r#"{"model" : "x"}"#).as_deref(), Some("x"));
        assert_eq!(
            model("\r\n\t {\n  \"model\"\n:\n\t\"x\"\r\n}\n\n").as_deref(),
            Some("x")
        );
        assert_eq!(
            model(r#"{ "a" : [ 1 , 2 ] , "model":"x" }"#).as_deref(),
            Some("x")
        );
    }

    #[test]
    fn not_an_object() {
        for body in [
            r#"["model","x"]"#,
            r#""model""#,
            "42",
            "null",
            "",
            "   ",
            r#"[{"model":"x"}]"#,
        ] {
            assert_eq!(model(body), None, "{body}");
        }
    }

    #[test]
    fn non_string_model() {
        for body in [
            r#"{"model":1}"#,
            r#"{"model":null}"#,
            r#"{"model":["x"]}"#,
            r#"{"model":{"name":"x"}}"#,
            r#"{"model":true}"#,
        ] {
            assert_eq!(model(body), None, "{body}");
        }
    }

    #[test]
    fn duplicates_give_none() {
        assert_eq!(model(r#"{"model":"a","model":"b"}"#), None);
        assert_eq!(model(r#"{"model":"a","x":1,"model":"a"}"#), None);
        assert_eq!(model(r#"{"model":1,"model":"b"}"#), None);
    }

    #[test]
    fn malformed_and_truncated() {
        let good = r#"{"model":"m","messages":[{"role":"user","content":"a\"b"}],"n":-1.5e3}"#;
        assert_eq!(model(good).as_deref(), Some("m"));
        for cut in 0..good.len() {
            assert_eq!(model(&good[..cut]), None, "truncated at {cut}");
        }
        for body in [
            r#"{"model":"m",}"#,
            r#"{"model":"m" "x":1}"#,
            r#"{"model" "m"}"#,
            r#"{"model":"m"}}"#,
            r#"{"model":"m"} x"#,
            r#"{"model":"m","a":[1,]}"#,
            r#"{"model":"m","a":[1}"#,
            r#"{"model":"m","a":{"b":1]}"#,
            r#"{"model":"m","a":01}"#,
            r#"{"model":"m","a":1.}"#,
            r#"{"model":"m","a":-}"#,
            r#"{"model":"m","a":1e}"#,
            r#"{"model":"m","a":tru}"#,
            r#"{"model":"m","a":nul}"#,
            r#"{"model":"m","a":"\x"}"#,
            r#"{"model":"m","a":"\u12g4"}"#,
            "{\"model\":\"m\",\"a\":\"tab\there\"}",
            r#"{model:"m"}"#,
            r#"{'model':'m'}"#,
            r#"{"model":"m\"}"#,
        ] {
            assert_eq!(model(body), None, "{body}");
        }
        assert_eq!(find_model(b"{\"model\":\"m\",\"a\":\"\xff\"}"), None);
        assert_eq!(find_model(b"{\"model\":\"\xc3\"}"), None);
        assert_eq!(find_model(b"\xef\xbb\xbf{\"model\":\"m\"}"), None);
    }

    #[test]
    fn depth_limit() {
        let nest = |n: usize| {
            format!(
                "{{\"a\":{}1{},\"model\":\"m\"}}",
                "[".repeat(n),
                "]".repeat(n)
            )
        };
        assert_eq!(model(&nest(MAX_DEPTH - 1)).as_deref(), Some("m"));
        assert_eq!(model(&nest(MAX_DEPTH)), None);
        assert_eq!(model(&"[".repeat(1 << 20)), None);
        assert_eq!(
            model(&format!("{{\"a\":{}", "{\"a\":".repeat(1 << 16))),
            None
        );
    }

    #[test]
    fn rewrite_keeps_every_other_byte() {
        let body = br#"{ "temperature" : 0.70, "model" :"llama" ,"messages":[{"role":"user","content":"caf\u00e9 \"model\":\"llama\""}],"x":1E+2 }"#;
        let m = map(&[("llama", "meta-llama/llama-3.1-8b-instruct")]);
        let out = rewrite_model(body, &m).unwrap();
        assert_only_model_changed(body, &out, r#""meta-llama/llama-3.1-8b-instruct""#);
        assert_eq!(
            model(std::str::from_utf8(&out).unwrap()).as_deref(),
            Some("meta-llama/llama-3.1-8b-instruct")
        );
    }

    #[test]
    fn rewrite_encodes_the_mapped_name() {
        let body = br#"{"model":"mod\u00e9l"}"#;
        let m = map(&[("modél", "we\"ird\\name\n")]);
        let out = rewrite_model(body, &m).unwrap();
        assert_only_model_changed(body, &out, r#""we\"ird\\name\n""#);
        assert_eq!(find_model(&out).unwrap().value, "we\"ird\\name\n");
    }

    #[test]
    fn rewrite_map_miss_gives_none() {
        let m = map(&[("llama", "x")]);
        assert_eq!(rewrite_model(br#"{"model":"mistral"}"#, &m), None);
        assert_eq!(rewrite_model(br#"{"model":"Llama"}"#, &m), None);
        assert_eq!(
            rewrite_model(br#"{"messages":[{"model":"llama"}]}"#, &m),
            None
        );
        assert_eq!(
            rewrite_model(br#"{"model":"llama","model":"llama"}"#, &m),
            None
        );
        assert_eq!(rewrite_model(br#"{"model":"llama""#, &m), None);
        assert_eq!(
            rewrite_model(br#"{"model":"llama"}"#, &BTreeMap::new()),
            None
        );
    }

    #[test]
    fn large_body_is_linear() {
        const SIZE: usize = 16 << 20;
        let mut body = Vec::with_capacity(SIZE + 256);
        body.extend_from_slice(br#"{"messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"data:image/png;base64,"#);
        let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        while body.len() < SIZE {
            body.push(alphabet[body.len() % alphabet.len()]);
        }
        body.extend_from_slice(br#""}}]}],"model":"llama"}"#);
        let start = std::time::Instant::now();
        let found = find_model(&body).unwrap();
        let scanned = start.elapsed();
        let out = rewrite_model(&body, &map(&[("llama", "meta/llama")])).unwrap();
        eprintln!(
            "{} bytes: find_model {scanned:?}, find + rewrite {:?}",
            body.len(),
            start.elapsed() - scanned
        );
        assert_eq!(found.value, "llama");
        assert_only_model_changed(&body, &out, r#""meta/llama""#);
    }

    #[test]
    fn word_scan_flags_exactly_the_stop_bytes() {
        for filler in [b'A', b' ', b'!', b'#', b'[', b']', 0x7f, 0x80, 0xc3, 0xff] {
            for pos in 0..8 {
                for b in 0..=255u8 {
                    let mut word = [filler; 8];
                    word[pos] = b;
                    let stop = |c: u8| c == b'"' || c == b'\\' || c < 0x20;
                    assert_eq!(
                        needs_attention(u64::from_le_bytes(word)),
                        stop(b) || stop(filler),
                        "filler {filler:#x}, byte {b:#x} at {pos}"
                    );
                }
            }
        }
    }

    /// The top-level members in order, duplicates kept, as serde_json reads them.
    struct Entries(Vec<(String, serde_json::Value)>);

    impl<'de> Deserialize<'de> for Entries {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Entries;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str("an object")
                }
                fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Entries, A::Error> {
                    let mut v = Vec::new();
                    while let Some(e) = m.next_entry::<String, serde_json::Value>()? {
                        v.push(e);
                    }
                    Ok(Entries(v))
                }
            }
            d.deserialize_map(V)
        }
    }

    /// What find_model should say, according to serde_json (`None` if it
    /// cannot parse the body at all).
    fn oracle(body: &[u8]) -> Option<Option<String>> {
        let Entries(entries) = serde_json::from_slice(body).ok()?;
        let mut models = entries.into_iter().filter(|(k, _)| k == "model");
        Some(match (models.next(), models.next()) {
            (Some((_, serde_json::Value::String(s))), None) => Some(s),
            _ => None,
        })
    }

    #[test]
    fn fuzz_mutations() {
        let seeds: &[&[u8]] = &[
            br#"{"model":"llama","messages":[{"role":"user","content":"hi"}]}"#,
            br#"{"messages":[{"role":"user","content":"say \"model\": \"x\"","model":"n"}],"model":"caf\u00e9\ud83d\ude00","stream":true}"#,
            br#"{ "mod\u0065l" : "a\\b\"c" , "n" : -0.5e-3 , "t" : [true,false,null,{}], "o" : {"model":{"model":"z"}} }"#,
            "{\"model\":\"模型\",\"tools\":[{\"function\":{\"parameters\":{\"properties\":{\"model\":{\"type\":\"string\"}}}}}]}".as_bytes(),
            br#"{"a":[[[[{"b":"c"}]]]],"model":"m","z":0}"#,
            br#"{"content":"0123456789abcdef\"0123456789abcdef\\0123456789abcdef","model":"a-rather-long-model-name-0123456789"}"#,
        ];
        let pieces: &[&[u8]] = &[
            b"\"",
            b"\\",
            b"{",
            b"}",
            b"[",
            b"]",
            b":",
            b",",
            b" ",
            b"\n",
            b"\\u",
            b"\\u00",
            b"0",
            b"-",
            b"e",
            b".",
            b"\"model\"",
            b"\"model\":\"q\",",
            b"\xff",
            b"\xc3\xa9",
            b"\\ud83d",
            b"null",
            b"\x00",
        ];
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let (mut agreed, mut some) = (0, 0);
        for _ in 0..20_000 {
            let mut body = seeds[next() as usize % seeds.len()].to_vec();
            let mutations = if next() % 2 == 0 { 1 } else { 1 + next() % 4 };
            for _ in 0..mutations {
                let at = next() as usize % (body.len() + 1);
                match next() % 6 {
                    0 if at < body.len() => body[at] ^= 1 << (next() % 8),
                    1 if at < body.len() => {
                        body.remove(at);
                    }
                    2 => body.truncate(at),
                    3 if at < body.len() => {
                        let end = (at + 1 + next() as usize % 16).min(body.len());
                        let dup = body[at..end].to_vec();
                        body.splice(at..at, dup);
                    }
                    _ => {
                        let p = pieces[next() as usize % pieces.len()];
                        body.splice(at..at, p.iter().copied());
                    }
                }
            }
            let found = find_model(&body);
            if let Some(f) = &found {
                some += 1;
                let token: String = serde_json::from_slice(&body[f.span.clone()]).unwrap();
                assert_eq!(token, f.value);
                assert_eq!(body[f.span.start], b'"');
                assert_eq!(body[f.span.end - 1], b'"');
            }
            // Wherever serde_json can read the body, both must agree exactly.
            if let Some(want) = oracle(&body) {
                agreed += 1;
                assert_eq!(
                    found.map(|f| f.value),
                    want,
                    "{}",
                    String::from_utf8_lossy(&body)
                );
            }
        }
        eprintln!("fuzz: {agreed} bodies checked against serde_json, {some} with a model");
        assert!(agreed > 1000 && some > 1000);
    }
}
