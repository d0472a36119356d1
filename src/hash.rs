//! Stable hashing for on-disk names: the same input gives the same name in every process and
//! on every node sharing a cache directory (unlike std's randomly seeded hasher).

/// FNV-1a over `parts`, with a NUL between parts so that ("ab", "c") and ("a", "bc") differ.
pub fn stable_hash(parts: &[&[u8]]) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    for (i, part) in parts.iter().enumerate() {
        let separator: &[u8] = if i == 0 { &[] } else { &[0] };
        for byte in separator.iter().chain(part.iter()) {
            hash = (hash ^ u64::from(*byte)).wrapping_mul(0x100_0000_01b3);
        }
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::stable_hash;

    #[test]
    fn hashes_are_stable_and_part_boundaries_matter() {
        assert_eq!(stable_hash(&[b"abc"]), 0xe71f_a219_0541_574b);
        assert_ne!(stable_hash(&[b"ab", b"c"]), stable_hash(&[b"a", b"bc"]));
        assert_eq!(stable_hash(&[b"ab", b"c"]), stable_hash(&[b"ab", b"c"]));
    }
}
