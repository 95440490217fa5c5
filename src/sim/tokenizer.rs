//! The simulator's tokenizer: deterministic, allocation-free to count, and close to what a BPE
//! tokenizer gives (about 4 characters per token on English prose, 3.5 on Markdown, 3 on code),
//! so prompt sizes, prefix-cache blocks and step times come out in the range of a real engine's.
//!
//! How text becomes tokens:
//! 1. The text is cut into *words*, as BPE pre-tokenizers do:
//!    - a maximal run of word bytes (ASCII letters, digits, `_`, and every non-ASCII character), with
//!      one leading space attached when a space precedes it (`" hello"`);
//!    - a maximal run of other ASCII bytes that are not whitespace (punctuation, symbols, control
//!      characters), also taking one leading space (`" ("`);
//!    - a newline (`\n`), alone;
//!    - a run of other whitespace (spaces, tabs, `\r`) that is not the space taken by the next word.
//! 2. Each word is cut into chunks from its start, of 6 bytes for letter-and-digit words and 4 bytes
//!    for the others: BPE vocabularies hold most common English words (with their space) whole,
//!    and fewer symbol merges; a chunk that would end inside a multi-byte UTF-8 character is extended
//!    to the end of that character, so no character is split (CJK text gives a token per 2
//!    characters). Each chunk is one token.
//! 3. A token's id is the 64-bit FNV-1a hash of its bytes folded to 32 bits, so the same text always gives the same ids
//!    and equal chunks share an id, as equal BPE pieces do.
//!
//! Consequence worth knowing: the tokens of a prefix of a text that ends at a token boundary of the
//! text are a prefix of the text's tokens, as with a real tokenizer on word boundaries; this is what
//! makes a repeated conversation prefix hit the prefix cache.

/// Bytes per token inside a letter-and-digit word.
const WORD_CHUNK: usize = 6;
/// Bytes per token inside a run of whitespace or symbols.
const OTHER_CHUNK: usize = 4;

/// Token ids of `text`.
pub fn tokenize(text: &str) -> Vec<u32> {
    let bytes = text.as_bytes();
    let mut ids = Vec::with_capacity(text.len() / OTHER_CHUNK + 1);
    ids.extend(Spans::new(bytes).map(|(start, end)| fnv1a(&bytes[start..end])));
    ids
}

/// Number of tokens of `text`, equal to `tokenize(text).len()`, without building the ids.
pub fn count(text: &str) -> usize {
    Spans::new(text.as_bytes()).count()
}

/// The text of each token of `text`, in order; they concatenate back to `text` exactly.
pub fn pieces(text: &str) -> Vec<&str> {
    let mut out = Vec::with_capacity(text.len() / OTHER_CHUNK + 1);
    // Every span boundary is a char boundary (see `Spans::chunk_end`), so slicing cannot fail.
    out.extend(Spans::new(text.as_bytes()).map(|(start, end)| &text[start..end]));
    out
}

fn fnv1a(bytes: &[u8]) -> u32 {
    let h = crate::sim::draw::hash_bytes(bytes);
    (h ^ (h >> 32)) as u32
}

/// Word bytes: a non-ASCII byte is always part of a multi-byte character, and every byte of such a
/// character is >= 0x80, so treating them all alike keeps characters whole.
#[inline]
fn is_word(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b >= 0x80
}

#[inline]
fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | 0x0b | 0x0c)
}

/// Byte ranges of the tokens of a text.
struct Spans<'a> {
    bytes: &'a [u8],
    pos: usize,
    /// End of the current word; chunks are cut from `pos` up to it.
    word_end: usize,
    /// Chunk size inside the current word.
    chunk: usize,
}

impl<'a> Spans<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, pos: 0, word_end: 0, chunk: OTHER_CHUNK }
    }

    /// End of the word starting at `start` (`start < len`), and its chunk size.
    fn word_from(&self, start: usize) -> (usize, usize) {
        let end = self.word_end_from(start);
        let last = self.bytes[end - 1];
        (end, if is_word(last) { WORD_CHUNK } else { OTHER_CHUNK })
    }

    fn word_end_from(&self, start: usize) -> usize {
        let b = self.bytes;
        let len = b.len();
        let first = b[start];
        if first == b'\n' {
            return start + 1;
        }
        if is_space(first) {
            let mut end = start;
            while end < len && is_space(b[end]) {
                end += 1;
            }
            // The last space of a run goes to the word or punctuation after it, as in GPT-2's
            // pre-tokenizer; a run of one space is then nothing on its own.
            if end < len && b[end - 1] == b' ' && b[end] != b'\n' && !is_space(b[end]) {
                if end - 1 > start {
                    return end - 1;
                }
                return Self::after_space(b, end);
            }
            return end;
        }
        if is_word(first) {
            return Self::word_run(b, start);
        }
        Self::symbol_run(b, start)
    }

    /// The word that starts with a space at `at - 1`, whose first non-space byte is at `at`.
    fn after_space(b: &[u8], at: usize) -> usize {
        if is_word(b[at]) {
            Self::word_run(b, at)
        } else {
            Self::symbol_run(b, at)
        }
    }

    fn symbol_run(b: &[u8], mut end: usize) -> usize {
        while end < b.len() && !is_word(b[end]) && !is_space(b[end]) && b[end] != b'\n' {
            end += 1;
        }
        end
    }

    fn word_run(b: &[u8], mut end: usize) -> usize {
        while end < b.len() && is_word(b[end]) {
            end += 1;
        }
        end
    }

    /// End of the chunk that starts at `start` inside a word ending at `word_end`.
    fn chunk_end(&self, start: usize) -> usize {
        let mut end = (start + self.chunk).min(self.word_end);
        // A UTF-8 continuation byte (0b10xx_xxxx) never starts a character.
        while end < self.word_end && (self.bytes[end] & 0xc0) == 0x80 {
            end += 1;
        }
        end
    }
}

impl Iterator for Spans<'_> {
    type Item = (usize, usize);

    #[inline]
    fn next(&mut self) -> Option<(usize, usize)> {
        if self.pos >= self.bytes.len() {
            return None;
        }
        if self.pos >= self.word_end {
            (self.word_end, self.chunk) = self.word_from(self.pos);
        }
        let start = self.pos;
        let end = self.chunk_end(start);
        self.pos = end;
        Some((start, end))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use proptest::prelude::*;

    #[test]
    fn english_is_about_four_chars_per_token() {
        let text = "The quick brown fox jumps over the lazy dog, and then it runs back home again.\n\
                    Continuous batching schedules one decode token per running sequence per step.";
        let n = count(text);
        let ratio = text.len() as f64 / n as f64;
        assert!((3.5..=5.0).contains(&ratio), "{ratio} chars/token over {n} tokens");
    }

    #[test]
    fn pieces_follow_words_and_spaces() {
        assert_eq!(pieces("Hello, world!\n"), vec!["Hello", ",", " world", "!", "\n"]);
        assert_eq!(pieces("a   b (c) x.y();"), vec!["a", "  ", " b", " (", "c", ")", " x", ".", "y", "();"]);
        assert_eq!(pieces("Tokenization"), vec!["Tokeni", "zation"]);
        assert_eq!(pieces("  \n"), vec!["  ", "\n"]);
        assert_eq!(pieces(""), Vec::<&str>::new());
    }

    #[test]
    fn multibyte_characters_stay_whole() {
        let text = "日本語のテキスト é";
        let p = pieces(text);
        assert_eq!(p.concat(), text);
        assert_eq!(p[0], "日本");
    }

    #[test]
    fn equal_chunks_share_an_id() {
        let ids = tokenize("abcdef abcdef");
        assert_eq!(ids.len(), 3);
        assert_eq!(tokenize("abcdef")[0], ids[0]);
        assert_ne!(ids[0], ids[1]);
    }

    proptest! {
        #[test]
        fn pieces_concatenate_to_the_input(text in any::<String>()) {
            prop_assert_eq!(pieces(&text).concat(), text);
        }

        #[test]
        fn the_three_counts_agree(text in any::<String>()) {
            let n = count(&text);
            prop_assert_eq!(tokenize(&text).len(), n);
            prop_assert_eq!(pieces(&text).len(), n);
            prop_assert!(text.is_empty() || n >= 1);
        }

        #[test]
        fn tokenizing_is_deterministic(text in any::<String>()) {
            prop_assert_eq!(tokenize(&text), tokenize(&text.clone()));
        }

        #[test]
        fn a_prefix_at_a_token_boundary_keeps_its_tokens(
            text in "([a-zA-Z0-9 \t\n,.(){}\"':;é日本_-]{0,12}){0,12}",
            cut in any::<prop::sample::Index>(),
        ) {
            let p = pieces(&text);
            let k = cut.index(p.len() + 1);
            let prefix: String = p[..k].concat();
            let whole = tokenize(&text);
            let head = tokenize(&prefix);
            prop_assert_eq!(head.as_slice(), &whole[..k]);
        }

        #[test]
        fn a_prefix_at_a_token_boundary_keeps_its_tokens_any_text(
            text in any::<String>(),
            cut in any::<prop::sample::Index>(),
        ) {
            let p = pieces(&text);
            let k = cut.index(p.len() + 1);
            let prefix: String = p[..k].concat();
            let whole = tokenize(&text);
            let head = tokenize(&prefix);
            prop_assert_eq!(head.as_slice(), &whole[..k]);
        }
    }
}
