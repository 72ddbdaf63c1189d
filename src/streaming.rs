//! Server-sent events: the commit point of a stream, and its forwarding.
//!
//! Before a stream is committed to the client, upstream bytes are held back
//! and split into SSE events; role-only, empty and comment events do not
//! commit (a host that dies after its preamble can still be replaced
//! invisibly). The first event carrying content, a tool call, a finish reason
//! or `[DONE]` commits; an `error` event before that is an upstream failure.
//! The hold-back is bounded in bytes ([`HOLD_LIMIT`]); time is bounded by the
//! caller's first-byte deadline. After the commit every upstream chunk is
//! written and flushed to the client as it arrives, never re-buffered.

use serde_json::Value;

/// Most bytes held back before a stream commits regardless.
pub const HOLD_LIMIT: usize = 64 * 1024;

/// What the events seen so far mean for the commit point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Only preamble so far: keep holding back.
    Hold,
    /// Real output has arrived: send everything held back and pass the rest through.
    Commit,
    /// The upstream reported an error before any output: fail over.
    Error(String),
}

/// Bytes of a stream not yet committed.
#[derive(Debug, Default)]
pub struct Preamble {
    buf: Vec<u8>,
    /// Bytes of `buf` already split into complete events.
    scanned: usize,
}

impl Preamble {
    /// Add upstream bytes and judge the complete events among them.
    pub fn push(&mut self, data: &[u8]) -> Verdict {
        self.buf.extend_from_slice(data);
        while let Some((end, next)) = event_end(&self.buf[self.scanned..]) {
            let event = &self.buf[self.scanned..self.scanned + end];
            self.scanned += next;
            match judge(event) {
                Verdict::Hold => {}
                other => return other,
            }
        }
        if self.buf.len() > HOLD_LIMIT {
            return Verdict::Commit;
        }
        Verdict::Hold
    }

    /// Everything held back, to be sent at the commit.
    pub fn take(&mut self) -> Vec<u8> {
        self.scanned = 0;
        std::mem::take(&mut self.buf)
    }

    /// Bytes held back.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// True when nothing is held back.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}

/// A committed stream, passed on in whole events.
///
/// Why: an upstream that dies in the middle of an event would otherwise leave
/// half an event on the client's line, and the final error event would run
/// into it (neither would parse). A client's SSE parser cannot use half an
/// event anyway, so holding back the incomplete end of a chunk until its
/// blank line arrives delays nothing it could read; on a cut that half is
/// dropped, as the SSE rules drop an event a closed connection left
/// unfinished. An event longer than [`HOLD_LIMIT`] is passed on regardless.
#[derive(Debug, Default)]
pub struct Events {
    /// The incomplete last event, held back.
    tail: Vec<u8>,
    /// What was passed on ends in the middle of an (over-long) event.
    open: bool,
}

impl Events {
    /// Pass `data` on through `send`, up to the end of its last complete event.
    pub fn pass<E>(
        &mut self,
        data: &[u8],
        mut send: impl FnMut(&[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        if self.tail.is_empty() {
            let whole = complete_len(data);
            if whole > 0 {
                self.open = false;
                send(&data[..whole])?;
            }
            self.tail.extend_from_slice(&data[whole..]);
        } else {
            self.tail.extend_from_slice(data);
            let whole = complete_len(&self.tail);
            if whole > 0 {
                self.open = false;
                send(&self.tail[..whole])?;
                self.tail.drain(..whole);
            }
        }
        if self.tail.len() > HOLD_LIMIT {
            self.open = true;
            send(&self.tail)?;
            self.tail.clear();
        }
        Ok(())
    }

    /// The stream ended cleanly: whatever is held back, to be sent as is.
    pub fn finish(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.tail)
    }

    /// The stream was cut: drop what is held back, and return what must
    /// precede a final event (a blank line after an event sent unfinished).
    pub fn cut(&mut self) -> &'static [u8] {
        self.tail.clear();
        if self.open {
            b"\n\n"
        } else {
            b""
        }
    }
}

/// Length of the prefix of `buf` made of complete events.
fn complete_len(buf: &[u8]) -> usize {
    let mut pos = 0;
    while let Some((_, next)) = event_end(&buf[pos..]) {
        pos += next;
    }
    pos
}

/// Find the end of the first complete event: (event length, length including
/// the blank line that ends it). Lines end in CRLF, LF or CR.
fn event_end(buf: &[u8]) -> Option<(usize, usize)> {
    let mut i = 0;
    let mut line_start = 0;
    while i < buf.len() {
        let eol = match buf[i] {
            b'\n' => 1,
            b'\r' if buf.get(i + 1) == Some(&b'\n') => 2,
            // A blank line ends the event whether or not an LF follows its CR.
            b'\r' if i == line_start && i + 1 == buf.len() => return Some((line_start, i + 1)),
            // A CR at the very end of a line may be the first half of a CRLF: wait.
            b'\r' if i + 1 == buf.len() => return None,
            b'\r' => 1,
            _ => {
                i += 1;
                continue;
            }
        };
        if i == line_start {
            return Some((line_start, i + eol));
        }
        i += eol;
        line_start = i;
    }
    None
}

/// Judge one complete event.
fn judge(event: &[u8]) -> Verdict {
    let mut data: Vec<u8> = Vec::new();
    let mut has_data = false;
    for line in event.split(|&b| b == b'\n' || b == b'\r') {
        if let Some(rest) = line.strip_prefix(b"data:") {
            let rest = rest.strip_prefix(b" ").unwrap_or(rest);
            if has_data {
                data.push(b'\n');
            }
            data.extend_from_slice(rest);
            has_data = true;
        }
    }
    if !has_data {
        return Verdict::Hold; // comment, `event:` or `id:` only
    }
    let trimmed = data.trim_ascii();
    if trimmed.is_empty() {
        return Verdict::Hold;
    }
    if trimmed == b"[DONE]" {
        return Verdict::Commit;
    }
    let Ok(value) = serde_json::from_slice::<Value>(trimmed) else {
        // Not JSON we understand: it is output, not preamble.
        return Verdict::Commit;
    };
    if let Some(err) = value.get("error") {
        let message = err
            .get("message")
            .and_then(Value::as_str)
            .map_or_else(|| err.to_string(), str::to_string);
        return Verdict::Error(message);
    }
    let Some(choices) = value.get("choices").and_then(Value::as_array) else {
        return Verdict::Hold; // e.g. a usage-only or metadata event
    };
    if choices.iter().any(carries_output) {
        Verdict::Commit
    } else {
        Verdict::Hold
    }
}

/// A choice carries output when it has text, a tool call or a finish reason.
fn carries_output(choice: &Value) -> bool {
    let non_empty = |v: Option<&Value>| match v {
        Some(Value::String(s)) => !s.is_empty(),
        Some(Value::Null) | None => false,
        Some(Value::Array(a)) => !a.is_empty(),
        Some(_) => true,
    };
    if non_empty(choice.get("finish_reason")) || non_empty(choice.get("text")) {
        return true;
    }
    let Some(delta) = choice.get("delta").or_else(|| choice.get("message")) else {
        return false;
    };
    // Reasoning is output too, under each provider's name for it:
    // `reasoning_content` (DeepSeek, vLLM, llama.cpp), `reasoning` and
    // `reasoning_details` (OpenRouter), `reasoning` (Ollama).
    [
        "content",
        "tool_calls",
        "function_call",
        "reasoning_content",
        "reasoning",
        "reasoning_details",
        "refusal",
    ]
    .iter()
    .any(|k| non_empty(delta.get(*k)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROLE: &str = "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\"},\"finish_reason\":null}]}\n\n";
    const EMPTY: &str = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"\"},\"finish_reason\":null}]}\n\n";
    const HELLO: &str = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hel\"},\"finish_reason\":null}]}\n\n";

    #[test]
    fn preamble_is_held_and_content_commits() {
        let mut p = Preamble::default();
        assert_eq!(p.push(ROLE.as_bytes()), Verdict::Hold);
        assert_eq!(p.push(b": keep-alive\n\n"), Verdict::Hold);
        assert_eq!(p.push(EMPTY.as_bytes()), Verdict::Hold);
        assert_eq!(p.push(HELLO.as_bytes()), Verdict::Commit);
        let held = p.take();
        assert_eq!(
            held,
            [ROLE, ": keep-alive\n\n", EMPTY, HELLO].concat().as_bytes()
        );
    }

    #[test]
    fn events_split_across_chunks_and_crlf() {
        let mut p = Preamble::default();
        let crlf = HELLO.replace('\n', "\r\n");
        let (a, b) = crlf.as_bytes().split_at(crlf.len() - 3);
        assert_eq!(p.push(a), Verdict::Hold);
        assert_eq!(p.push(b), Verdict::Commit);
    }

    #[test]
    fn tool_calls_finish_reason_and_done_commit() {
        for ev in [
            "data: {\"choices\":[{\"delta\":{\"tool_calls\":[{\"index\":0}]}}]}\n\n",
            "data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
            "data: [DONE]\n\n",
            "data: {\"choices\":[{\"text\":\"hi\"}]}\n\n",
            "data: {\"choices\":[{\"delta\":{\"content\":\"\",\"reasoning_content\":\"Let\"}}]}\n\n",
            "data: {\"choices\":[{\"delta\":{\"content\":\"\",\"reasoning\":\"Let me\"}}]}\n\n",
            "data: {\"choices\":[{\"delta\":{\"reasoning_details\":[{\"type\":\"reasoning.text\",\"text\":\"Let\"}]}}]}\n\n",
            "data: not json\n\n",
        ] {
            assert_eq!(
                Preamble::default().push(ev.as_bytes()),
                Verdict::Commit,
                "{ev}"
            );
        }
    }

    #[test]
    fn empty_reasoning_is_preamble() {
        for ev in [
            "data: {\"choices\":[{\"delta\":{\"reasoning\":\"\",\"reasoning_details\":[]}}]}\n\n",
            "data: {\"choices\":[{\"delta\":{\"reasoning\":null}}]}\n\n",
        ] {
            assert_eq!(
                Preamble::default().push(ev.as_bytes()),
                Verdict::Hold,
                "{ev}"
            );
        }
    }

    #[test]
    fn error_event_before_content_is_a_failure() {
        let v = Preamble::default().push(b"data: {\"error\":{\"message\":\"overloaded\"}}\n\n");
        assert_eq!(v, Verdict::Error("overloaded".into()));
    }

    fn passed(events: &mut Events, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        events
            .pass(data, |d| {
                out.extend_from_slice(d);
                Ok::<(), ()>(())
            })
            .unwrap();
        out
    }

    #[test]
    fn committed_streams_pass_on_whole_events_at_any_split() {
        for sep in ["\n", "\r\n", "\r"] {
            let all = [ROLE, HELLO, EMPTY].concat().replace('\n', sep);
            let b = all.as_bytes();
            let first = ROLE.replace('\n', sep).len();
            for i in 0..=b.len() {
                let mut e = Events::default();
                let mut out = passed(&mut e, &b[..i]);
                // Only whole events go out, however the bytes were split.
                // (A CRLF blank line's CR ends the event; its LF may follow.)
                let end = sep.repeat(2);
                let ended = out.ends_with(end.as_bytes()) || out.ends_with(b"\r\n\r");
                assert!(out.is_empty() || ended, "{sep:?} {i}");
                assert!(i < first || out.len() >= first, "{sep:?} {i}");
                out.extend(passed(&mut e, &b[i..]));
                assert_eq!(out, b, "{sep:?} {i}");
                assert!(e.finish().is_empty());
                assert_eq!(e.cut(), b"");
            }
        }
    }

    #[test]
    fn a_cut_drops_the_half_event_and_an_over_long_one_goes_out() {
        let mut e = Events::default();
        let half = &HELLO.as_bytes()[..10];
        assert_eq!(
            passed(&mut e, &[ROLE.as_bytes(), half].concat()),
            ROLE.as_bytes()
        );
        assert_eq!(e.cut(), b"");
        let mut e = Events::default();
        assert_eq!(passed(&mut e, half), b"");
        assert_eq!(e.finish(), half, "a clean end sends what is left as is");
        let mut e = Events::default();
        let long = vec![b'x'; HOLD_LIMIT + 1];
        assert_eq!(passed(&mut e, &long).len(), long.len());
        assert_eq!(e.cut(), b"\n\n", "the final event must not run into it");
    }

    /// Whatever the line endings (LF, CRLF, CR) and however the bytes are
    /// split, an event commits (or fails) as soon as its blank line is in.
    #[test]
    fn the_verdict_comes_with_the_blank_line_at_every_split() {
        let err = "data: {\"error\":{\"message\":\"x\"}}\n\n";
        for sep in ["\n", "\r\n", "\r"] {
            for (tail, want) in [(HELLO, Verdict::Commit), (err, Verdict::Error("x".into()))] {
                let all = [ROLE, ": c\n\n", tail].concat().replace('\n', sep);
                let b = all.as_bytes();
                for i in 0..=b.len() {
                    for j in i..=b.len() {
                        let mut p = Preamble::default();
                        let verdicts = [p.push(&b[..i]), p.push(&b[i..j]), p.push(&b[j..])];
                        let first = verdicts.iter().find(|v| **v != Verdict::Hold);
                        assert_eq!(first, Some(&want), "{sep:?} split at {i} and {j}");
                    }
                }
            }
        }
    }

    #[test]
    fn hold_back_is_bounded() {
        let mut p = Preamble::default();
        let mut v = Verdict::Hold;
        for _ in 0..(HOLD_LIMIT / ROLE.len() + 2) {
            v = p.push(ROLE.as_bytes());
            if v != Verdict::Hold {
                break;
            }
        }
        assert_eq!(v, Verdict::Commit);
        assert!(p.len() <= HOLD_LIMIT + ROLE.len());
    }
}
