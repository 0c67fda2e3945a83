//! A guest's stdout and stderr: lines go to the host's log, never to the host's own
//! stdio, and each call may write only so much.
//!
//! A guest that prints without end must not fill the log or the host's memory: past
//! [`BUDGET_PER_CALL`] bytes or [`LINES_PER_CALL`] lines in one call, output is counted
//! and dropped, and one line says how much was dropped. Lines are counted apart from
//! bytes, since each costs the log a record of its own however short it is: an empty
//! `log` call, or a newline, would otherwise be free. The last lines of stderr are kept
//! so that a trap (a Rust panic prints its message to stderr before aborting) can say
//! why it happened.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

/// Bytes a guest may write to one stream during one call before the rest is dropped.
pub const BUDGET_PER_CALL: usize = 64 * 1024;
/// Lines (and `log` calls) a guest may write to one stream during one call.
pub const LINES_PER_CALL: usize = 1024;
/// Longest line logged; longer lines are cut.
const MAX_LINE: usize = 4096;
/// Lines of stderr kept for the error message of a trap.
const KEPT_LINES: usize = 6;

#[derive(Debug)]
struct Sink {
    plugin: Arc<str>,
    stream: &'static str,
    partial: Vec<u8>,
    budget: usize,
    /// Lines still allowed in this call.
    lines: usize,
    dropped: u64,
    recent: VecDeque<String>,
}

impl Sink {
    fn write(&mut self, bytes: &[u8]) {
        let take = bytes.len().min(self.budget);
        self.budget -= take;
        self.dropped += (bytes.len() - take) as u64;
        for (i, &b) in bytes[..take].iter().enumerate() {
            if b == b'\n' {
                if self.lines == 0 {
                    // Out of lines: this line and the rest of the call's output go.
                    self.dropped += (self.partial.len() + take - i) as u64;
                    self.partial.clear();
                    self.budget = 0;
                    return;
                }
                self.emit();
            } else if self.partial.len() < MAX_LINE {
                self.partial.push(b);
            }
        }
    }

    /// Logs the partial line, counting it against the call's lines (the caller checks
    /// that one is left).
    fn emit(&mut self) {
        self.lines = self.lines.saturating_sub(1);
        let line = escape(&String::from_utf8_lossy(&self.partial));
        self.partial.clear();
        tracing::info!(plugin = &*self.plugin, stream = self.stream, "{line}");
        if self.recent.len() == KEPT_LINES {
            self.recent.pop_front();
        }
        self.recent.push_back(line);
    }

    /// Ends a call: flushes a partial line, reports what was dropped, refills the budget.
    fn end_call(&mut self) {
        if !self.partial.is_empty() {
            if self.lines > 0 {
                self.emit();
            } else {
                self.dropped += self.partial.len() as u64;
                self.partial.clear();
            }
        }
        if self.dropped > 0 {
            tracing::warn!(
                plugin = &*self.plugin,
                stream = self.stream,
                "dropped {} bytes of output past the budget of one call ({BUDGET_PER_CALL} bytes, {LINES_PER_CALL} lines)",
                self.dropped
            );
            self.dropped = 0;
        }
        self.budget = BUDGET_PER_CALL;
        self.lines = LINES_PER_CALL;
    }
}

/// A guest's text as one log line: control characters (newlines, terminal escapes)
/// are shown escaped, so a guest cannot forge lines or drive the operator's terminal.
pub(crate) fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() && c != '\t' {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// One of a guest's output streams (stdout or stderr), shared by the WASI context and
/// the host code that ends each call.
#[derive(Debug, Clone)]
pub(crate) struct GuestOutput(Arc<Mutex<Sink>>);

impl GuestOutput {
    pub(crate) fn new(plugin: Arc<str>, stream: &'static str) -> Self {
        GuestOutput(Arc::new(Mutex::new(Sink {
            plugin,
            stream,
            partial: Vec::new(),
            budget: BUDGET_PER_CALL,
            lines: LINES_PER_CALL,
            dropped: 0,
            recent: VecDeque::new(),
        })))
    }

    fn sink(&self) -> std::sync::MutexGuard<'_, Sink> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A `log` call's message, charged to this stream's budget for the call (its bytes
    /// and one line), cut to one line's length and escaped; `None` once the budget is
    /// spent.
    pub(crate) fn take_log_line(&self, message: &str) -> Option<String> {
        let mut s = self.sink();
        let len = message.len().min(MAX_LINE);
        if s.budget < len || s.lines == 0 {
            s.dropped += message.len() as u64;
            return None;
        }
        s.budget -= len;
        s.lines -= 1;
        let mut cut = len;
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        Some(escape(&message[..cut]))
    }

    /// Flushes and resets the per-call budget; returns the last lines written.
    pub(crate) fn end_call(&self) -> Vec<String> {
        let mut s = self.sink();
        s.end_call();
        s.recent.drain(..).collect()
    }
}

impl IsTerminal for GuestOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestOutput {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

impl OutputStream for GuestOutput {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.sink().write(&bytes);
        Ok(())
    }
    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }
    fn check_write(&mut self) -> StreamResult<usize> {
        // Always ready: writes past the budget are dropped, not refused, so a guest's
        // `println!` never fails (which would panic it).
        Ok(64 * 1024)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for GuestOutput {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for GuestOutput {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.sink().write(buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_kept_and_output_past_the_budget_is_dropped() {
        let out = GuestOutput::new("p".into(), "stderr");
        out.sink().write(b"one\ntwo\nthr");
        assert_eq!(out.end_call(), ["one", "two", "thr"]);
        let big = vec![b'x'; BUDGET_PER_CALL * 3];
        out.sink().write(&big);
        out.sink().write(b"\nlost\n");
        {
            let s = out.sink();
            assert_eq!(s.budget, 0);
            assert_eq!(s.dropped as usize, BUDGET_PER_CALL * 2 + 6);
            assert!(s.recent.iter().all(|l| l.len() <= MAX_LINE));
        }
        out.end_call();
        assert_eq!(out.sink().budget, BUDGET_PER_CALL, "the next call gets a fresh budget");
    }

    #[test]
    fn empty_lines_and_log_calls_are_counted_too() {
        let out = GuestOutput::new("p".into(), "stdout");
        out.sink().write(&vec![b'\n'; BUDGET_PER_CALL]);
        {
            let s = out.sink();
            assert_eq!(s.lines, 0);
            assert_eq!(s.dropped as usize, BUDGET_PER_CALL - LINES_PER_CALL);
        }
        assert!(out.take_log_line("").is_none(), "no line is left for a log call");
        assert_eq!(out.end_call().len(), KEPT_LINES);
        let mut logged = 0;
        while out.take_log_line("").is_some() {
            logged += 1;
        }
        assert_eq!(logged, LINES_PER_CALL);
        out.sink().write(b"no newline, but no line left either");
        out.end_call();
        let s = out.sink();
        assert_eq!((s.lines, s.budget, s.dropped), (LINES_PER_CALL, BUDGET_PER_CALL, 0));
        assert!(s.partial.is_empty());
    }

    #[test]
    fn log_lines_are_escaped_and_share_the_budget() {
        let out = GuestOutput::new("p".into(), "stderr");
        assert_eq!(out.take_log_line("a\nFAKE line\u{1b}[2J").unwrap(), "a\\nFAKE line\\u{1b}[2J");
        out.sink().write(b"x\n");
        assert_eq!(out.end_call(), ["x"]);
        let long = "é".repeat(MAX_LINE);
        assert!(out.take_log_line(&long).unwrap().len() <= MAX_LINE);
        let mut taken = 0;
        while out.take_log_line(&long).is_some() {
            taken += 1;
        }
        assert!(taken <= BUDGET_PER_CALL / (MAX_LINE - 1), "{taken}");
        out.end_call();
        assert!(out.take_log_line("fresh").is_some());
    }
}
