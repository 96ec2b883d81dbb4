//! Generated text as it streams: token bytes joined into whole UTF-8 characters (a character
//! may span tokens), and stop strings cut out, holding back any tail that could still grow
//! into one so that no part of a stop string ever reaches the client.

/// Joins token bytes into text, keeping an incomplete character until its last byte comes.
#[derive(Default, Debug)]
pub struct Utf8Stream {
    pending: Vec<u8>,
}

impl Utf8Stream {
    /// The complete characters `bytes` finish; invalid bytes become U+FFFD.
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        let mut rest: &[u8] = &self.pending;
        loop {
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    out.push_str(s);
                    rest = &[];
                    break;
                }
                Err(e) => {
                    let (ok, tail) = rest.split_at(e.valid_up_to());
                    // from_utf8 vouched for `ok`.
                    out.push_str(&String::from_utf8_lossy(ok));
                    match e.error_len() {
                        Some(n) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            rest = &tail[n..];
                        }
                        // An incomplete character at the end: wait for more bytes.
                        None => {
                            rest = tail;
                            break;
                        }
                    }
                }
            }
        }
        self.pending = rest.to_vec();
        out
    }

    /// What is left at the end of generation (an unfinished character as U+FFFD).
    pub fn flush(&mut self) -> String {
        let s = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        s
    }
}

/// Finds stop strings in generated text.
#[derive(Debug)]
pub struct StopMatcher {
    stops: Vec<String>,
    text: String,
    /// Bytes of `text` already handed out.
    sent: usize,
}

impl StopMatcher {
    /// Empty stop strings are ignored (they would match before any text).
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            text: String::new(),
            sent: 0,
        }
    }

    /// Adds text; returns what may be shown now and the stop string it hit, if any (the
    /// text then ends before it and nothing more may be pushed).
    pub fn push(&mut self, s: &str) -> (String, Option<String>) {
        self.text.push_str(s);
        // A match cannot start before `sent`: the held-back tail covers every partial one.
        let hit = self
            .stops
            .iter()
            .filter_map(|stop| {
                self.text[self.sent..]
                    .find(stop.as_str())
                    .map(|p| (p, stop))
            })
            .min_by_key(|(p, _)| *p);
        if let Some((p, stop)) = hit {
            let stop = stop.clone();
            self.text.truncate(self.sent + p);
            return (self.take(self.text.len()), Some(stop));
        }
        let hold = self.partial_tail();
        (self.take(self.text.len() - hold), None)
    }

    /// The rest, at the end of generation.
    pub fn finish(&mut self) -> String {
        self.take(self.text.len())
    }

    /// Everything generated, stop string excluded.
    pub fn text(&self) -> &str {
        &self.text
    }

    fn take(&mut self, end: usize) -> String {
        let s = self.text[self.sent..end].to_owned();
        self.sent = end;
        s
    }

    /// Bytes at the end of the unsent text that begin some stop string.
    fn partial_tail(&self) -> usize {
        if self.stops.is_empty() {
            return 0;
        }
        let unsent = &self.text[self.sent..];
        let longest = self.stops.iter().map(|s| s.len()).max().unwrap_or(0);
        let mut best = 0;
        for (start, _) in unsent.char_indices() {
            let tail = &unsent[start..];
            if tail.len() < longest && self.stops.iter().any(|s| s.starts_with(tail)) {
                best = tail.len();
                break;
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_across_tokens() {
        let mut u = Utf8Stream::default();
        // "é" = C3 A9, "€" = E2 82 AC, split over pushes.
        assert_eq!(u.push(b"a\xC3"), "a");
        assert_eq!(u.push(b"\xA9\xE2\x82"), "é");
        assert_eq!(u.push(b"\xAC!"), "€!");
        // An invalid byte is replaced, the rest kept.
        assert_eq!(u.push(b"\xFFb"), "\u{FFFD}b");
        assert_eq!(u.push(b"\xE2\x82"), "");
        assert_eq!(u.flush(), "\u{FFFD}");
    }

    #[test]
    fn stop_strings_are_cut_and_held_back() {
        let mut m = StopMatcher::new(vec!["END".into(), "".into()]);
        assert_eq!(m.push("hello E"), ("hello ".into(), None));
        assert_eq!(m.push("N"), ("".into(), None));
        // Not a stop after all: the held text comes out.
        assert_eq!(m.push("x"), ("ENx".into(), None));
        assert_eq!(m.push(" and EN"), (" and ".into(), None));
        assert_eq!(m.push("D more"), ("".into(), Some("END".into())));
        assert_eq!(m.text(), "hello ENx and ");
    }

    #[test]
    fn earliest_stop_wins_and_finish_flushes() {
        let mut m = StopMatcher::new(vec!["bb".into(), "a".into()]);
        assert_eq!(m.push("xxbba"), ("xx".into(), Some("bb".into())));
        let mut m = StopMatcher::new(vec!["\n\n".into()]);
        assert_eq!(m.push("line\n"), ("line".into(), None));
        assert_eq!(m.finish(), "\n");
        assert_eq!(m.text(), "line\n");
        // Multi-byte text around a partial stop keeps char boundaries.
        let mut m = StopMatcher::new(vec!["é!".into()]);
        assert_eq!(m.push("ééé"), ("éé".into(), None));
        assert_eq!(m.push("!"), ("".into(), Some("é!".into())));
        assert_eq!(m.text(), "éé");
    }
}
