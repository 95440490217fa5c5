//! Deterministic pseudo-random draws: FNV-1a (the `fnv` crate) and `SplitMix64` rather than `std`'s
//! hasher, whose output may change between Rust releases: a seed must replay the same run on any
//! toolchain.

use std::hash::Hasher;

/// 64-bit FNV-1a of `bytes`.
pub fn hash_bytes(bytes: &[u8]) -> u64 {
    let mut h = fnv::FnvHasher::default();
    h.write(bytes);
    h.finish()
}

/// Combine two hashes (`SplitMix64` finaliser over their sum), order-sensitive.
pub fn mix(a: u64, b: u64) -> u64 {
    let mut z = a.rotate_left(23) ^ b.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A `SplitMix64` stream.
#[derive(Debug, Clone)]
pub struct Draw(u64);

impl Draw {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in 0..n (0 when n is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }

    /// True with probability `rate`.
    pub fn chance(&mut self, rate: f64) -> bool {
        rate > 0.0 && self.unit() < rate
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_draws_cover_the_interval_evenly() {
        let mut d = Draw::new(42);
        let mut buckets = [0u32; 10];
        for _ in 0..10_000 {
            let u = d.unit();
            assert!((0.0..1.0).contains(&u));
            buckets[(u * 10.0) as usize] += 1;
        }
        assert!(buckets.iter().all(|&b| (800..1200).contains(&b)), "{buckets:?}");
    }

    #[test]
    fn same_seed_same_stream() {
        let a: Vec<u64> = (0..5).scan(Draw::new(7), |d, _| Some(d.next_u64())).collect();
        let b: Vec<u64> = (0..5).scan(Draw::new(7), |d, _| Some(d.next_u64())).collect();
        assert_eq!(a, b);
        assert_ne!(mix(1, 2), mix(2, 1));
        assert_ne!(hash_bytes(b"a"), hash_bytes(b"b"));
    }
}
