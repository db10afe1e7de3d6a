//! RS256 (RSASSA-PKCS1-v1_5 with SHA-256) verification for public exponent 65537, tuned for wasm.
//!
//! The general-purpose `rsa` crate spends ~650 µs per 2048-bit verification in V8. Here the key is
//! prepared once (32-bit limbs, so every limb product is a native 64-bit multiply in wasm, the
//! Montgomery constant and R² mod n), and a verification is 16 Montgomery squarings and two
//! multiplications. The result is compared with the expected PKCS#1 v1.5 block built byte for
//! byte, so no ASN.1 is parsed from attacker input. Everything here handles public data only
//! (key, signature, digest), so it need not be constant-time.
//!
//! Proven against the `rsa` crate by differential tests (random keys of several sizes, random
//! and edge-value signatures), natively and as wasm.

/// DER of DigestInfo for SHA-256, which precedes the digest in the PKCS#1 v1.5 block.
const SHA256_DIGEST_INFO: [u8; 19] =
    [0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05, 0x00, 0x04, 0x20];

/// A public key with e = 65537, ready for verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rs256Key {
    /// The modulus, little-endian 32-bit limbs.
    n: Vec<u32>,
    /// -n⁻¹ mod 2³².
    n0_inv: u32,
    /// R² mod n, R = 2^(32·limbs).
    rr: Vec<u32>,
    /// The modulus length in bytes (the signature length).
    k: usize,
}

impl Rs256Key {
    /// Prepares a key from its big-endian modulus; `None` unless e = 65537 and n is odd and at
    /// least 512 bits (the caller enforces its own minimum).
    pub fn new(n_be: &[u8], e: u64) -> Option<Rs256Key> {
        if e != 65537 {
            return None;
        }
        let n_be = strip_zeros(n_be);
        let k = n_be.len();
        if k < 64 || n_be.last().is_none_or(|b| b & 1 == 0) {
            return None;
        }
        let n = to_limbs(n_be, k.div_ceil(4));
        let n0 = *n.first()?;
        // Newton's iteration doubles the correct low bits each step: 1 -> 32 in five.
        let mut inv: u32 = 1;
        for _ in 0..5 {
            inv = inv.wrapping_mul(2u32.wrapping_sub(n0.wrapping_mul(inv)));
        }
        // R² mod n by doubling 1 modulo n, 2·32·limbs times (once per key).
        let mut rr = vec![0u32; n.len()];
        if let Some(first) = rr.first_mut() {
            *first = 1;
        }
        for _ in 0..2 * 32 * n.len() {
            let carry = shl1(&mut rr);
            if carry || !less_than(&rr, &n) {
                sub_in_place(&mut rr, &n);
            }
        }
        Some(Rs256Key { n, n0_inv: inv.wrapping_neg(), rr, k })
    }

    /// Modulus length in bits.
    pub fn bits(&self) -> usize {
        let top = self.n.iter().rposition(|&l| l != 0).unwrap_or(0);
        top * 32 + (32 - self.n.get(top).map_or(32, |l| l.leading_zeros() as usize))
    }

    /// Checks a PKCS#1 v1.5 SHA-256 signature over a message with this digest.
    pub fn verify(&self, digest: &[u8; 32], signature: &[u8]) -> bool {
        let Some(m) = self.public_op(signature) else {
            return false;
        };
        // 0x00 0x01 FF..FF 0x00 DigestInfo digest, exactly k bytes.
        let ps_len = match self.k.checked_sub(3 + SHA256_DIGEST_INFO.len() + 32) {
            Some(l) if l >= 8 => l,
            _ => return false,
        };
        let mut expected = Vec::with_capacity(self.k);
        expected.extend_from_slice(&[0x00, 0x01]);
        expected.resize(2 + ps_len, 0xff);
        expected.push(0x00);
        expected.extend_from_slice(&SHA256_DIGEST_INFO);
        expected.extend_from_slice(digest);
        m == expected
    }

    /// s^65537 mod n as k big-endian bytes; `None` if the signature is not k bytes or not < n.
    // Kept out of its callers (see `config::from_json`); one call per verification.
    #[inline(never)]
    fn public_op(&self, signature: &[u8]) -> Option<Vec<u8>> {
        if signature.len() != self.k {
            return None;
        }
        let s = to_limbs(signature, self.n.len());
        if !less_than(&s, &self.n) {
            return None;
        }
        let s_mont = self.mont_mul(&s, &self.rr);
        let mut x = s_mont.clone();
        for _ in 0..16 {
            x = self.mont_sqr(&x);
        }
        x = self.mont_mul(&x, &s_mont);
        let mut one = vec![0u32; self.n.len()];
        *one.first_mut()? = 1;
        let m = self.mont_mul(&x, &one);
        Some(to_bytes(&m, self.k))
    }

    /// a·b·R⁻¹ mod n, fully reduced: the product, then the Montgomery reduction (separated
    /// operand scanning). Each inner loop zips two slices, so no limb access is bounds-checked:
    /// with `mont_sqr` for the squarings, a 2048-bit verification takes 1.20 M instructions
    /// (callgrind) where the interleaved (CIOS) form took 1.65 M.
    // Indexing: t has 2s + 1 limbs and a, b, n have s (s ≥ 16), and every caller passes s-limb
    // operands built here from length-checked input, so no index can be out of bounds.
    #[allow(clippy::indexing_slicing)]
    fn mont_mul(&self, a: &[u32], b: &[u32]) -> Vec<u32> {
        let s = self.n.len();
        let mut t = vec![0u32; 2 * s + 1];
        for (i, &bi) in b.iter().enumerate() {
            let mut c = 0u64;
            for (tj, &aj) in t[i..i + s].iter_mut().zip(a) {
                let uv = *tj as u64 + aj as u64 * bi as u64 + c;
                *tj = uv as u32;
                c = uv >> 32;
            }
            t[i + s] = c as u32;
        }
        self.reduce(t)
    }

    /// a·a·R⁻¹ mod n: as `mont_mul`, but each cross product a[i]·a[j] is computed once and
    /// doubled (16 of the 19 multiplications of a verification are squarings).
    #[allow(clippy::indexing_slicing)] // as in `mont_mul`
    fn mont_sqr(&self, a: &[u32]) -> Vec<u32> {
        let s = self.n.len();
        let mut t = vec![0u32; 2 * s + 1];
        // Row i adds a[i]·a[j] for j > i at t[i + j]; its carry lands in t[i + s], still 0.
        for (i, &ai) in a.iter().enumerate() {
            let mut c = 0u64;
            for (tj, &aj) in t[2 * i + 1..i + s].iter_mut().zip(&a[i + 1..]) {
                let uv = *tj as u64 + ai as u64 * aj as u64 + c;
                *tj = uv as u32;
                c = uv >> 32;
            }
            t[i + s] = c as u32;
        }
        let mut top = 0u32;
        for ti in &mut t[..2 * s] {
            let v = *ti;
            *ti = (v << 1) | top;
            top = v >> 31;
        }
        let mut c = 0u64;
        for (pair, &ai) in t[..2 * s].chunks_exact_mut(2).zip(a) {
            let sq = ai as u64 * ai as u64;
            let lo = pair[0] as u64 + (sq & 0xffff_ffff) + c;
            pair[0] = lo as u32;
            let hi = pair[1] as u64 + (sq >> 32) + (lo >> 32);
            pair[1] = hi as u32;
            c = hi >> 32;
        }
        // a < n < R, so a² < R²: the doubling's top bit and the last carry are always 0.
        self.reduce(t)
    }

    /// t·R⁻¹ mod n for a 2s + 1-limb t < n·R, fully reduced (Montgomery reduction).
    #[allow(clippy::indexing_slicing)] // as in `mont_mul`
    fn reduce(&self, mut t: Vec<u32>) -> Vec<u32> {
        let s = self.n.len();
        for i in 0..s {
            let m = t[i].wrapping_mul(self.n0_inv);
            let mut c = 0u64;
            for (tj, &nj) in t[i..i + s].iter_mut().zip(&self.n) {
                let uv = *tj as u64 + m as u64 * nj as u64 + c;
                *tj = uv as u32;
                c = uv >> 32;
            }
            for tj in &mut t[i + s..] {
                if c == 0 {
                    break;
                }
                let uv = *tj as u64 + c;
                *tj = uv as u32;
                c = uv >> 32;
            }
        }
        // (a·b + m·n) / R < 2n: at most one subtraction (its borrow cancels the top limb).
        let mut r = t.split_off(s);
        let carry = r[s] != 0;
        r.truncate(s);
        if carry || !less_than(&r, &self.n) {
            sub_in_place(&mut r, &self.n);
        }
        r
    }
}

fn strip_zeros(be: &[u8]) -> &[u8] {
    let first = be.iter().position(|&b| b != 0).unwrap_or(be.len());
    be.get(first..).unwrap_or_default()
}

/// Big-endian bytes -> `limbs` little-endian u32 limbs (the value must fit).
fn to_limbs(be: &[u8], limbs: usize) -> Vec<u32> {
    let mut out = vec![0u32; limbs];
    for (i, &byte) in be.iter().rev().enumerate() {
        if let Some(l) = out.get_mut(i / 4) {
            *l |= (byte as u32) << (8 * (i % 4));
        }
    }
    out
}

/// Little-endian limbs -> `k` big-endian bytes.
fn to_bytes(limbs: &[u32], k: usize) -> Vec<u8> {
    let mut out = vec![0u8; k];
    for (i, b) in out.iter_mut().rev().enumerate() {
        *b = limbs.get(i / 4).map_or(0, |l| (l >> (8 * (i % 4))) as u8);
    }
    out
}

fn less_than(a: &[u32], b: &[u32]) -> bool {
    for (x, y) in a.iter().rev().zip(b.iter().rev()) {
        if x != y {
            return x < y;
        }
    }
    false
}

/// a -= b (mod 2^(32·len)).
fn sub_in_place(a: &mut [u32], b: &[u32]) {
    let mut borrow = 0u64;
    for (x, &y) in a.iter_mut().zip(b) {
        let d = (*x as u64).wrapping_sub(y as u64).wrapping_sub(borrow);
        *x = d as u32;
        borrow = (d >> 63) & 1;
    }
}

/// a <<= 1, returning the bit shifted out.
fn shl1(a: &mut [u32]) -> bool {
    let mut carry = 0u32;
    for x in a.iter_mut() {
        let next = *x >> 31;
        *x = (*x << 1) | carry;
        carry = next;
    }
    carry == 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_chacha::rand_core::{RngCore, SeedableRng};
    use rsa::traits::PublicKeyParts;
    use rsa::{BigUint, Pkcs1v15Sign, RsaPrivateKey};
    use sha2::{Digest, Sha256};

    fn key(bits: usize, seed: u64) -> RsaPrivateKey {
        RsaPrivateKey::new(&mut rand_chacha::ChaCha20Rng::seed_from_u64(seed), bits).unwrap()
    }

    /// Keys shared by the tests (generating them dominates the run time, above all as wasm):
    /// 1536 bits has a limb count that is not a power of two.
    fn keys() -> &'static [RsaPrivateKey] {
        static KEYS: std::sync::OnceLock<Vec<RsaPrivateKey>> = std::sync::OnceLock::new();
        KEYS.get_or_init(|| vec![key(1024, 11), key(1536, 12), key(2048, 13), key(2048, 14)])
    }

    /// 0, 1, 2, n - 1 and 40 random values below n.
    fn values_below(n: &BigUint, len: usize, rng: &mut rand_chacha::ChaCha20Rng) -> Vec<BigUint> {
        let mut values = vec![BigUint::from(0u32), BigUint::from(1u32), BigUint::from(2u32), n - BigUint::from(1u32)];
        for _ in 0..40 {
            let mut bytes = vec![0u8; len];
            rng.fill_bytes(&mut bytes);
            values.push(BigUint::from_bytes_be(&bytes) % n);
        }
        values
    }

    fn prepared(k: &RsaPrivateKey) -> Rs256Key {
        Rs256Key::new(&k.n().to_bytes_be(), 65537).unwrap()
    }

    #[test]
    fn the_public_operation_matches_modpow() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(7);
        for k in keys() {
            let ours = prepared(k);
            let bits = k.n().bits();
            assert_eq!(ours.bits(), bits);
            let n = k.n().clone();
            let len = ours.k;
            let e = BigUint::from(65537u32);
            for s in values_below(&n, len, &mut rng) {
                let want = s.modpow(&e, &n).to_bytes_be();
                let mut want_padded = vec![0u8; len - want.len()];
                want_padded.extend_from_slice(&want);
                let sig = {
                    let b = s.to_bytes_be();
                    let mut p = vec![0u8; len - b.len()];
                    p.extend_from_slice(&b);
                    p
                };
                assert_eq!(ours.public_op(&sig), Some(want_padded), "{bits} bits, s = {s}");
            }
            // Not < n, or not k bytes: refused.
            assert_eq!(ours.public_op(&n.to_bytes_be()), None);
            assert_eq!(ours.public_op(&vec![0xff; len]), None);
            assert_eq!(ours.public_op(&vec![0x01; len - 1]), None);
        }
    }

    #[test]
    fn squaring_is_multiplying_by_itself() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(8);
        for k in keys() {
            let ours = prepared(k);
            let n = k.n();
            let limbs = ours.n.len();
            let mut values: Vec<Vec<u32>> =
                values_below(n, ours.k, &mut rng).iter().map(|v| to_limbs(&v.to_bytes_be(), limbs)).collect();
            // Every limb 0xffffffff but the top one, which is n's minus 1: the most carries.
            let mut carries = vec![u32::MAX; limbs];
            *carries.last_mut().unwrap() = ours.n.last().unwrap() - 1;
            values.push(carries);
            for x in values {
                assert!(less_than(&x, &ours.n));
                assert_eq!(ours.mont_sqr(&x), ours.mont_mul(&x, &x), "{} bits", n.bits());
            }
        }
    }

    #[test]
    fn signatures_verify_exactly_when_the_rsa_crate_says_so() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(8);
        for k in keys() {
            let bits = k.n().bits();
            let ours = prepared(k);
            let public = k.to_public_key();
            for i in 0..20 {
                let digest: [u8; 32] = Sha256::digest(format!("message {i}")).into();
                let mut sig = k.sign(Pkcs1v15Sign::new::<Sha256>(), &digest).unwrap();
                assert!(ours.verify(&digest, &sig), "{bits} bits, message {i}");
                // Flip one bit of the signature or of the digest.
                let bit = (rng.next_u32() as usize) % (sig.len() * 8);
                sig[bit / 8] ^= 1 << (bit % 8);
                let theirs = public.verify(Pkcs1v15Sign::new::<Sha256>(), &digest, &sig).is_ok();
                assert_eq!(ours.verify(&digest, &sig), theirs);
                assert!(!theirs);
                sig[bit / 8] ^= 1 << (bit % 8);
                let mut other = digest;
                other[i % 32] ^= 0x80;
                assert!(!ours.verify(&other, &sig));
            }
            // A valid signature of the bare digest (no DigestInfo) is not an RS256 signature.
            let digest: [u8; 32] = Sha256::digest(b"x").into();
            let unprefixed = k.sign(Pkcs1v15Sign::new_unprefixed(), &digest).unwrap();
            assert!(!ours.verify(&digest, &unprefixed));
        }
    }

    #[test]
    fn only_e_65537_and_odd_moduli_are_prepared() {
        let n = keys()[2].n().to_bytes_be();
        assert!(Rs256Key::new(&n, 3).is_none());
        assert!(Rs256Key::new(&n, 65537).is_some());
        let mut even = n.clone();
        *even.last_mut().unwrap() &= 0xfe;
        assert!(Rs256Key::new(&even, 65537).is_none());
        assert!(Rs256Key::new(&[0, 0, 1], 65537).is_none());
        // Leading zero bytes in the JWK's n do not change the key.
        let mut padded = vec![0u8; 3];
        padded.extend_from_slice(&n);
        assert_eq!(Rs256Key::new(&padded, 65537), Rs256Key::new(&n, 65537));
    }
}
