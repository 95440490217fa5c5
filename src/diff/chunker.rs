//! Content-defined chunking with a gear hash (`FastCDC`, Xia et al., USENIX ATC 2016): a cut falls
//! after a byte where the rolling hash of the last 64 bytes has its top bits clear, so where blocks
//! end depends on the bytes around the cut only, never on where the string started.

/// No cut before this many bytes (the gear hash looks back 64 bytes; shorter blocks would cost
/// more in hashes than they save).
pub const CHUNK_MIN: usize = 32;
/// The average block size aimed at: 16 tokens of English or JSON at about four bytes a token.
pub const CHUNK_TARGET: usize = 64;
/// A block is cut here when no content-defined cut came first (long runs of one byte).
pub const CHUNK_MAX: usize = 256;

/// Cuts after `CHUNK_MIN` bytes where the hash's top 5 bits are clear: 32 + 32 on average.
const MASK: u64 = 0xf800_0000_0000_0000;

/// One pseudo-random word per byte value (splitmix64 of the byte), fixed forever: changing it
/// would move every cut and so break the sharing with blocks already stored.
const GEAR: [u64; 256] = gear_table();

const fn gear_table() -> [u64; 256] {
    let mut table = [0u64; 256];
    let mut i = 0;
    while i < 256 {
        let mut z = (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        table[i] = z ^ (z >> 31);
        i += 1;
    }
    table
}

/// The blocks of `data`, in order; they concatenate to `data`. Empty input has no block.
pub fn chunks(data: &[u8]) -> Chunks<'_> {
    Chunks { rest: data }
}

/// Iterator returned by [`chunks`].
pub struct Chunks<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for Chunks<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        if self.rest.is_empty() {
            return None;
        }
        let cut = cut_point(self.rest);
        let (block, rest) = self.rest.split_at(cut);
        self.rest = rest;
        Some(block)
    }
}

fn cut_point(data: &[u8]) -> usize {
    if data.len() <= CHUNK_MIN {
        return data.len();
    }
    let end = data.len().min(CHUNK_MAX);
    let mut hash = 0u64;
    // The hash is rolled over the minimum too, so a cut right after it depends on real content.
    for (i, &byte) in data[..end].iter().enumerate() {
        hash = (hash << 1).wrapping_add(GEAR[usize::from(byte)]);
        if i + 1 >= CHUNK_MIN && hash & MASK == 0 {
            return i + 1;
        }
    }
    end
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_cover_the_input_within_bounds() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        let blocks: Vec<&[u8]> = chunks(&data).collect();
        assert_eq!(blocks.concat(), data);
        assert!(blocks[..blocks.len() - 1].iter().all(|b| (CHUNK_MIN..=CHUNK_MAX).contains(&b.len())));
        let mean = data.len() / blocks.len();
        assert!((48..=96).contains(&mean), "mean block {mean} bytes");
    }

    #[test]
    fn a_prefix_change_leaves_later_cuts_in_place() {
        let text: String = (0..400).map(|i| format!("word{} ", i * 7919 % 1000)).collect::<Vec<_>>().concat();
        let edited = format!("an inserted sentence. {text}");
        let a: Vec<&[u8]> = chunks(text.as_bytes()).collect();
        let b: Vec<&[u8]> = chunks(edited.as_bytes()).collect();
        let shared = a.iter().filter(|block| b.contains(block)).count();
        assert!(shared * 10 >= a.len() * 9, "{shared} of {} blocks shared", a.len());
    }
}
