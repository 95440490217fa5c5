//! vLLM's stop strings over an output's text as it is detokenized, one token's text at a time.
//!
//! As vLLM's detokenizer does: each token's text is searched for a stop string ending in it, the
//! text is cut before the match (after it with `include_stop_str_in_output`), and no search is made
//! while `min_tokens` are not out. Where several stop strings end in one token's text, the one that
//! ends first wins, as if the text came a character at a time (vLLM takes the first of its list
//! found there, which can leave another stop string in the output).
//! Streamed text is never text that a later token could turn into the start of a stop string:
//! [`StopStrings::ready`] holds back the longest suffix that is a prefix of a stop string (vLLM
//! holds back a fixed `longest stop - 1` characters; the shorter hold-back is as safe and lets more
//! text out sooner).

use crate::chat_template::partial_match_len;

/// One output's text and its stop strings.
#[derive(Debug, Clone, Default)]
pub struct StopStrings {
    stops: Vec<String>,
    include: bool,
    text: String,
    /// Bytes of `text` handed out by [`StopStrings::ready`].
    emitted: usize,
    matched: Option<usize>,
}

impl StopStrings {
    /// `stops` must not contain an empty string (the server refuses one, as vLLM does).
    pub fn new(stops: Vec<String>, include_stop_str_in_output: bool) -> Self {
        debug_assert!(stops.iter().all(|s| !s.is_empty()));
        Self { stops, include: include_stop_str_in_output, ..Self::default() }
    }

    pub fn has_stops(&self) -> bool {
        !self.stops.is_empty()
    }

    /// Appends one token's text; searches it for a stop string when `check` (the output has more
    /// than `min_tokens` tokens). Returns whether a stop string matched (now or before: nothing is
    /// appended after a match).
    pub fn push(&mut self, piece: &str, check: bool) -> bool {
        if self.matched.is_some() {
            return true;
        }
        let before = self.text.len();
        self.text.push_str(piece);
        if !check || piece.is_empty() {
            return false;
        }
        let mut first: Option<(usize, usize, usize)> = None;
        for (i, stop) in self.stops.iter().enumerate() {
            // A match that ends in the new text starts at most `stop.len() - 1` bytes before it.
            let from = ceil_char_boundary(&self.text, before.saturating_sub(stop.len() - 1));
            if let Some(at) = self.text[from..].find(stop.as_str()).map(|k| from + k) {
                let end = at + stop.len();
                if first.is_none_or(|(e, a, _)| (end, at) < (e, a)) {
                    first = Some((end, at, i));
                }
            }
        }
        let Some((end, at, i)) = first else { return false };
        self.text.truncate(if self.include { end } else { at });
        self.matched = Some(i);
        true
    }

    /// The stop string that matched, if one did.
    pub fn matched(&self) -> Option<&str> {
        self.matched.and_then(|i| self.stops.get(i)).map(String::as_str)
    }

    /// The whole text so far (cut at the stop string once one matched).
    pub fn text(&self) -> &str {
        &self.text
    }

    pub fn into_text(self) -> String {
        self.text
    }

    /// The text not handed out before that can be sent now: all of it once the output is
    /// `finished` or a stop string matched, otherwise all but the longest suffix that is a proper
    /// prefix of a stop string (with `include_stop_str_in_output` nothing sent can be cut, so
    /// nothing is held back).
    pub fn ready(&mut self, finished: bool) -> &str {
        let start = self.emitted;
        let end = if finished || self.matched.is_some() || self.include { self.text.len() } else { self.safe_end() };
        let end = end.max(start);
        self.emitted = end;
        &self.text[start..end]
    }

    /// Where the longest suffix of the text not yet handed out that could still grow into a stop
    /// string starts.
    fn safe_end(&self) -> usize {
        self.text.len() - partial_match_len(&self.text[self.emitted..], &self.stops)
    }
}

/// The first char boundary of `s` at or after byte `i`.
fn ceil_char_boundary(s: &str, mut i: usize) -> usize {
    while i < s.len() && !s.is_char_boundary(i) {
        i += 1;
    }
    i.min(s.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn run(pieces: &[&str], stops: &[&str], include: bool, min_tokens: usize) -> (String, Option<String>, usize) {
        let mut s = StopStrings::new(stops.iter().map(|s| (*s).to_owned()).collect(), include);
        let mut used = 0;
        for (k, piece) in pieces.iter().enumerate() {
            used = k + 1;
            if s.push(piece, used > min_tokens) {
                break;
            }
        }
        (s.text().to_owned(), s.matched().map(str::to_owned), used)
    }

    #[test]
    fn the_text_is_cut_before_the_stop_string_or_after_it_when_included() {
        assert_eq!(run(&["Hel", "lo, wor", "ld"], &["o, w"], false, 0), ("Hell".into(), Some("o, w".into()), 2));
        assert_eq!(run(&["Hel", "lo, wor", "ld"], &["o, w"], true, 0), ("Hello, w".into(), Some("o, w".into()), 2));
        // A stop string across tokens, and none at all.
        assert_eq!(run(&["a", "b", "c", "d"], &["bc"], false, 0), ("a".into(), Some("bc".into()), 3));
        assert_eq!(run(&["a", "b"], &["x"], false, 0), ("ab".into(), None, 2));
    }

    #[test]
    fn the_stop_string_that_ends_first_wins() {
        assert_eq!(run(&["xabc"], &["bc", "ab"], false, 0), ("x".into(), Some("ab".into()), 1));
        assert_eq!(run(&["xabc"], &["abc", "b"], false, 0), ("xa".into(), Some("b".into()), 1));
    }

    #[test]
    fn no_search_under_min_tokens_but_a_match_may_start_there() {
        // "ab" lies in the first two tokens: not searched. "bc" ends in the third: found.
        assert_eq!(run(&["a", "b", "c"], &["ab"], false, 2), ("abc".into(), None, 3));
        assert_eq!(run(&["a", "b", "c"], &["bc"], false, 2), ("a".into(), Some("bc".into()), 3));
    }

    #[test]
    fn streaming_holds_back_what_could_start_a_stop_string() {
        let mut s = StopStrings::new(vec!["</end>".into()], false);
        s.push("text </e", true);
        assert_eq!(s.ready(false), "text ");
        s.push("x", true);
        assert_eq!(s.ready(false), "</ex");
        s.push(" </end> more", true);
        assert_eq!(s.ready(false), " ");
        assert_eq!(s.text(), "text </ex ");
        // Multi-byte text is held back on char boundaries.
        let mut s = StopStrings::new(vec!["éé".into()], false);
        s.push("aé", true);
        assert_eq!(s.ready(false), "a");
        assert_eq!(s.ready(true), "é");
    }

    /// Where `needle` starts in `hay`, overlapping occurrences included.
    fn occurrences(hay: &str, needle: &str) -> Vec<usize> {
        (0..hay.len()).filter(|&i| hay.is_char_boundary(i) && hay[i..].starts_with(needle)).collect()
    }

    fn text_and_stops() -> impl Strategy<Value = (Vec<String>, Vec<String>, bool, usize)> {
        // A small alphabet (with a multi-byte letter) so stop strings occur and overlap often.
        let letters = || prop::sample::select(vec!['a', 'b', 'é']);
        let piece = prop::collection::vec(letters(), 0..4).prop_map(String::from_iter);
        let stop = prop::collection::vec(letters(), 1..4).prop_map(String::from_iter);
        (prop::collection::vec(piece, 0..24), prop::collection::vec(stop, 0..4), any::<bool>(), 0..4usize)
    }

    proptest! {
        /// Streamed pieces add up to the unstreamed text, and no text sent while streaming contains
        /// a stop string (unless the stop strings are to be included) or is later cut.
        #[test]
        fn streamed_text_equals_the_whole_and_never_shows_a_stop_string(
            (pieces, stops, include, min_tokens) in text_and_stops()
        ) {
            let mut whole = StopStrings::new(stops.clone(), include);
            for (k, piece) in pieces.iter().enumerate() {
                if whole.push(piece, k + 1 > min_tokens) {
                    break;
                }
            }
            let mut streamed = StopStrings::new(stops.clone(), include);
            let mut sent = String::new();
            let mut finished = false;
            for (k, piece) in pieces.iter().enumerate() {
                let matched = streamed.push(piece, k + 1 > min_tokens);
                finished = matched || k + 1 == pieces.len();
                sent.push_str(streamed.ready(finished));
                if !include {
                    // Text never searched (under min_tokens) may hold one.
                    let searched_from = pieces[..min_tokens.min(pieces.len())].concat().len();
                    for stop in &stops {
                        for at in occurrences(&sent, stop) {
                            prop_assert!(at + stop.len() <= searched_from, "{sent:?} shows {stop:?}");
                        }
                    }
                }
                prop_assert!(whole.text().starts_with(&sent), "{sent:?} is not a prefix of {:?}", whole.text());
                if matched {
                    break;
                }
            }
            if !finished {
                sent.push_str(streamed.ready(true));
            }
            prop_assert_eq!(&sent, whole.text());
            prop_assert_eq!(streamed.matched(), whole.matched());
            if let (Some(stop), true) = (whole.matched(), include) {
                prop_assert!(whole.text().ends_with(stop));
            }
        }

        /// Without a match, the text is every piece; with one, the whole output up to the match
        /// contains the stop string exactly where the text is cut.
        #[test]
        fn the_cut_is_where_a_stop_string_first_ends(
            (pieces, stops, include, min_tokens) in text_and_stops()
        ) {
            let mut s = StopStrings::new(stops.clone(), include);
            let mut used = 0;
            for (k, piece) in pieces.iter().enumerate() {
                used = k + 1;
                if s.push(piece, used > min_tokens) {
                    break;
                }
            }
            let all: String = pieces[..used].concat();
            match s.matched() {
                None => prop_assert_eq!(s.text(), pieces.concat()),
                Some(stop) => {
                    let at = if include { s.text().len() - stop.len() } else { s.text().len() };
                    prop_assert_eq!(&all[at..at + stop.len()], stop);
                    prop_assert!(all.starts_with(s.text()));
                    // The tokens before the last one held no searched match of any stop string.
                    let before: String = pieces[..used - 1].concat();
                    let searched = pieces[..min_tokens.min(used - 1)].concat().len();
                    for other in &stops {
                        for at in occurrences(&before, other) {
                            prop_assert!(at + other.len() <= searched);
                        }
                    }
                }
            }
        }
    }
}
