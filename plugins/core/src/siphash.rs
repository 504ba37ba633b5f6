//! SipHash-2-4 (Aumasson and Bernstein), written out so a key's hash is a named, fixed
//! algorithm: std's `DefaultHasher` may change between Rust releases, and an etcd record
//! name must be the same in every Envoy of a fleet, whatever compiler built its module.

/// A streaming SipHash-2-4 with a 128-bit key; [`SipHasher24::finish`] equals the one-shot
/// hash of everything written, however it was split.
#[derive(Clone, Debug)]
pub struct SipHasher24 {
    v: [u64; 4],
    tail: u64,
    /// Bytes in `tail` (0..8).
    ntail: u32,
    len: u64,
}

impl SipHasher24 {
    pub fn new(k0: u64, k1: u64) -> SipHasher24 {
        SipHasher24 {
            v: [
                k0 ^ 0x736f_6d65_7073_6575,
                k1 ^ 0x646f_7261_6e64_6f6d,
                k0 ^ 0x6c79_6765_6e65_7261,
                k1 ^ 0x7465_6462_7974_6573,
            ],
            tail: 0,
            ntail: 0,
            len: 0,
        }
    }

    fn round(&mut self) {
        let [mut v0, mut v1, mut v2, mut v3] = self.v;
        v0 = v0.wrapping_add(v1);
        v1 = v1.rotate_left(13) ^ v0;
        v0 = v0.rotate_left(32);
        v2 = v2.wrapping_add(v3);
        v3 = v3.rotate_left(16) ^ v2;
        v0 = v0.wrapping_add(v3);
        v3 = v3.rotate_left(21) ^ v0;
        v2 = v2.wrapping_add(v1);
        v1 = v1.rotate_left(17) ^ v2;
        v2 = v2.rotate_left(32);
        self.v = [v0, v1, v2, v3];
    }

    fn block(&mut self, m: u64) {
        self.v[3] ^= m;
        self.round();
        self.round();
        self.v[0] ^= m;
    }

    /// A word at a time where the input allows: a key's bytes one by one cost about twice
    /// the rounds themselves.
    pub fn write(&mut self, bytes: &[u8]) {
        self.len = self.len.wrapping_add(bytes.len() as u64);
        let mut rest = bytes;
        // First complete a word left partial by the previous write.
        while self.ntail != 0 {
            let Some((&b, more)) = rest.split_first() else {
                return;
            };
            rest = more;
            self.tail |= u64::from(b) << (8 * self.ntail);
            self.ntail += 1;
            if self.ntail == 8 {
                let m = self.tail;
                self.block(m);
                self.tail = 0;
                self.ntail = 0;
            }
        }
        let mut words = rest.chunks_exact(8);
        for word in &mut words {
            // Always eight bytes: `chunks_exact` hands out no other length.
            self.block(<[u8; 8]>::try_from(word).map_or(0, u64::from_le_bytes));
        }
        let tail = words.remainder();
        for (i, &b) in tail.iter().enumerate() {
            self.tail |= u64::from(b) << (8 * i);
        }
        self.ntail = tail.len() as u32;
    }

    pub fn finish(&self) -> u64 {
        let mut s = self.clone();
        let m = s.tail | (s.len << 56);
        s.block(m);
        s.v[2] ^= 0xff;
        for _ in 0..4 {
            s.round();
        }
        s.v[0] ^ s.v[1] ^ s.v[2] ^ s.v[3]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;

    fn reference_key() -> (u64, u64) {
        let k: Vec<u8> = (0u8..16).collect();
        let word = |b: &[u8]| b.iter().rev().fold(0u64, |w, &x| (w << 8) | u64::from(x));
        (word(&k[..8]), word(&k[8..]))
    }

    #[test]
    fn matches_the_papers_test_vectors() {
        // From the SipHash paper's reference vectors: key 00..0f, message 00..(n-1).
        let (k0, k1) = reference_key();
        let expect = [
            (0usize, 0x726f_db47_dd0e_0e31u64),
            (1, 0x74f8_39c5_93dc_67fd),
            (15, 0xa129_ca61_49be_45e5),
        ];
        for (n, want) in expect {
            let msg: Vec<u8> = (0..n as u8).collect();
            let mut h = SipHasher24::new(k0, k1);
            h.write(&msg);
            assert_eq!(h.finish(), want, "message of {n} bytes");
        }
    }

    #[test]
    #[allow(deprecated)]
    fn agrees_with_std_siphash_2_4_and_ignores_how_input_is_split() {
        use std::hash::Hasher;
        let msg: Vec<u8> = (0..200u32).map(|i| (i * 7 + 3) as u8).collect();
        for n in [0, 1, 7, 8, 9, 63, 64, 65, 200] {
            let mut std24 = std::hash::SipHasher::new_with_keys(11, 0xfeed);
            std24.write(&msg[..n]);
            // Pieces of every length from 1 to 17 cross word boundaries every way.
            for piece_len in 1..=17 {
                let mut ours = SipHasher24::new(11, 0xfeed);
                for piece in msg[..n].chunks(piece_len) {
                    ours.write(piece);
                }
                ours.write(&[]);
                assert_eq!(
                    ours.finish(),
                    std24.finish(),
                    "message of {n} bytes in pieces of {piece_len}"
                );
            }
        }
    }
}
