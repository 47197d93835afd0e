//! A progress line on stderr for passes over the deltas stream (`tessel replay`, `tessel model
//! branch`, `tessel model merge`): messages and rows read, the share of the pass's stream
//! sequences done, the row rate and an ETA. On a terminal one line is redrawn in place; to a
//! file or pipe a line is printed every few seconds.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use crate::deltas::ScanProgress;

/// How often a terminal line is redrawn.
pub const REDRAW_MS: u64 = 100;
/// How often a line is printed when stderr is not a terminal.
pub const PLAIN_EVERY_MS: u64 = 2_000;

/// The progress line of one pass.
pub fn line(p: &ScanProgress, elapsed: Duration) -> String {
    let span = p.end.saturating_sub(p.start).max(1);
    let done = p.seq.saturating_sub(p.start).min(span);
    let fraction = done as f64 / span as f64;
    let secs = elapsed.as_secs_f64();
    let rate = if secs > 0.0 {
        p.rows as f64 / secs
    } else {
        0.0
    };
    let eta = if fraction > 0.0 && fraction < 1.0 {
        format!("ETA {:.0}s", secs * (1.0 - fraction) / fraction)
    } else if fraction >= 1.0 {
        "done".to_string()
    } else {
        "ETA ?".to_string()
    };
    let width = 20usize;
    let filled = ((fraction * width as f64).round() as usize).min(width);
    let messages = if p.to_end {
        format!("{}/{} msgs", p.messages, p.messages + p.pending)
    } else {
        format!("{} msgs", p.messages)
    };
    format!(
        "{} [{}{}] {:>3.0}% seq {}/{} {} {} rows {:.0} rows/s {}",
        p.model,
        "#".repeat(filled),
        ".".repeat(width - filled),
        fraction * 100.0,
        p.seq,
        p.end,
        messages,
        p.rows,
        rate,
        eta
    )
}

/// Draws [`line`]s on stderr.
pub struct Bar {
    quiet: bool,
    tty: bool,
    pass: Option<(String, u64)>,
    started: Instant,
    last_draw: Option<Instant>,
    pending_line: Option<String>,
}

impl Bar {
    /// A bar; `quiet` draws nothing.
    pub fn new(quiet: bool) -> Bar {
        Bar {
            quiet,
            tty: std::io::stderr().is_terminal(),
            pass: None,
            started: Instant::now(),
            last_draw: None,
            pending_line: None,
        }
    }

    /// Reports where a pass is.
    pub fn update(&mut self, p: &ScanProgress) {
        if self.quiet {
            return;
        }
        let pass = (p.model.to_string(), p.start);
        if self.pass.as_ref() != Some(&pass) {
            self.finish();
            self.pass = Some(pass);
            self.started = Instant::now();
            self.last_draw = None;
        }
        let text = line(p, self.started.elapsed());
        let every = Duration::from_millis(if self.tty { REDRAW_MS } else { PLAIN_EVERY_MS });
        if self.last_draw.is_some_and(|t| t.elapsed() < every) {
            self.pending_line = Some(text);
            return;
        }
        self.draw(&text);
        self.pending_line = None;
    }

    fn draw(&mut self, text: &str) {
        let mut err = std::io::stderr().lock();
        if self.tty {
            let _ = write!(err, "\r\x1b[K{text}");
        } else {
            let _ = writeln!(err, "{text}");
        }
        let _ = err.flush();
        self.last_draw = Some(Instant::now());
    }

    /// Ends the current pass's line (its last state drawn).
    pub fn finish(&mut self) {
        if self.quiet || self.pass.is_none() {
            return;
        }
        if let Some(text) = self.pending_line.take() {
            self.draw(&text);
        }
        if self.tty && self.last_draw.is_some() {
            let _ = writeln!(std::io::stderr());
        }
        self.pass = None;
    }
}

/// Parses a point in time for `--to-time`: RFC 3339 (`2026-11-26T09:00:00Z`,
/// `2026-11-26T10:00:00.250+01:00`) or unix milliseconds. Returns unix nanoseconds.
pub fn parse_time_ns(s: &str) -> Result<i128, String> {
    let s = s.trim();
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        let ms: i128 = s
            .parse()
            .map_err(|_| format!("{s:?}: unix milliseconds out of range"))?;
        return Ok(ms * 1_000_000);
    }
    async_nats::datetime::parse_rfc3339(s)
        .map(|t| t.unix_timestamp_nanos())
        .map_err(|e| format!("{s:?} is neither RFC 3339 nor unix milliseconds: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_parse_as_rfc3339_or_unix_ms() {
        assert_eq!(
            parse_time_ns("1764147600000").unwrap(),
            1_764_147_600_000_000_000
        );
        assert_eq!(
            parse_time_ns("2025-11-26T09:00:00Z").unwrap(),
            1_764_147_600_000_000_000
        );
        assert_eq!(
            parse_time_ns("2025-11-26T10:00:00.5+01:00").unwrap(),
            1_764_147_600_500_000_000
        );
        for bad in ["", "yesterday", "2025-11-26", "-5", "12:00"] {
            assert!(parse_time_ns(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_line_shows_share_rate_and_eta() {
        let p = ScanProgress {
            model: "m",
            seq: 150,
            start: 100,
            end: 200,
            messages: 40,
            rows: 1_000,
            pending: 60,
            to_end: true,
            waited: Duration::ZERO,
        };
        let l = line(&p, Duration::from_secs(2));
        assert!(l.contains(" 50%"), "{l}");
        assert!(l.contains("seq 150/200"), "{l}");
        assert!(l.contains("40/100 msgs"), "{l}");
        assert!(l.contains("500 rows/s"), "{l}");
        assert!(l.contains("ETA 2s"), "{l}");
        assert!(l.contains("[##########..........]"), "{l}");
        let done = line(
            &ScanProgress {
                seq: 200,
                to_end: false,
                ..p
            },
            Duration::from_secs(4),
        );
        assert!(done.contains("100%") && done.contains("done") && done.contains("40 msgs"));
    }
}
