//! The hash flagd buckets `fractional` with.

/// murmur3 x86 32-bit, for fractional bucketing.
pub fn murmur3_32(bytes: &[u8], seed: u32) -> u32 {
    let mix = |k: u32| {
        k.wrapping_mul(0xcc9e_2d51)
            .rotate_left(15)
            .wrapping_mul(0x1b87_3593)
    };
    let le = |c: &[u8]| c.iter().rev().fold(0u32, |k, &b| k << 8 | u32::from(b));
    let mut chunks = bytes.chunks_exact(4);
    let mut h = seed;
    for c in &mut chunks {
        h ^= mix(le(c));
        h = h.rotate_left(13).wrapping_mul(5).wrapping_add(0xe654_6b64);
    }
    let tail = chunks.remainder();
    if !tail.is_empty() {
        h ^= mix(le(tail));
    }
    h ^= bytes.len() as u32;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur3_matches_known_answers() {
        let cases: [(&[u8], u32, u32); 11] = [
            (b"", 0, 0),
            (b"", 1, 0x514e_28b7),
            (b"", 0xffff_ffff, 0x81f1_6f39),
            (&[0, 0, 0, 0], 0, 0x2362_f9de),
            (b"aaaa", 0x9747_b28c, 0x5a97_808a),
            (b"abc", 0, 0xb3dd_93fa),
            (b"hello", 0, 0x248b_fa47),
            (b"Hello, world!", 0x9747_b28c, 0x2488_4cba),
            (
                b"The quick brown fox jumps over the lazy dog",
                0,
                0x2e4f_f723,
            ),
            (
                b"The quick brown fox jumps over the lazy dog",
                0x9747_b28c,
                0x2fa8_26cd,
            ),
            (&[0xff], 0, 0xfd6c_f10d),
        ];
        for (bytes, seed, want) in cases {
            assert_eq!(murmur3_32(bytes, seed), want, "{bytes:?} seed {seed:#x}");
        }
    }
}
