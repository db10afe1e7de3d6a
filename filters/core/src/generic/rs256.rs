//! RS256 (RSASSA-PKCS1-v1_5 with SHA-256) verification for public exponent 65537, tuned for wasm.
//!
//! The general-purpose `rsa` crate is several times slower in V8 (docs/design.md). Here the key is
//! prepared once (27-bit limbs, see `BITS`; the Montgomery constant and R² mod n), and a
//! verification is 16 Montgomery squarings and two multiplications. The result is compared
//! with the expected PKCS#1 v1.5 block built byte for byte, so no ASN.1 is parsed from attacker
//! input. Everything here handles public data only (key, signature, digest), so it need not be
//! constant-time.
//!
//! Proven against the `rsa` crate by differential tests (random keys of several sizes, random
//! and edge-value signatures), natively and as wasm.

/// DER of DigestInfo for SHA-256, which precedes the digest in the PKCS#1 v1.5 block.
const SHA256_DIGEST_INFO: [u8; 19] =
    [0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05, 0x00, 0x04, 0x20];

/// Bits per limb. Limbs live in u64s and a product of two has 54 bits, so a column's products
/// (the square's, doubled, and the reduction's: fewer than 2·limbs + 2 = 610 < 2¹⁰ for an
/// 8192-bit key, the largest accepted) add up without overflow: no carry moves inside the inner
/// loops, each step is multiplies and adds (i64.mul, i64.add in wasm), where 32-bit limbs need a
/// carry chain on every step.
const BITS: u32 = 27;
const MASK: u64 = (1 << BITS) - 1;

/// A public key with e = 65537, ready for verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rs256Key {
    /// The modulus, little-endian limbs of `BITS` bits (the top one non-zero).
    n: Vec<u64>,
    /// -n⁻¹ mod 2^BITS.
    n0_inv: u64,
    /// R² mod n, R = 2^(BITS·limbs).
    rr: Vec<u64>,
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
        let bits = k * 8 - n_be.first()?.leading_zeros() as usize;
        let n = to_limbs(n_be, bits.div_ceil(BITS as usize))?;
        let n0 = *n.first()?;
        // Newton's iteration doubles the correct low bits each step: 1 -> 32 (≥ BITS) in five.
        let mut inv: u64 = 1;
        for _ in 0..5 {
            inv = inv.wrapping_mul(2u64.wrapping_sub(n0.wrapping_mul(inv))) & MASK;
        }
        // R² mod n by doubling 1 modulo n, 2·BITS·limbs times (once per key).
        let mut rr = vec![0u64; n.len()];
        *rr.first_mut()? = 1;
        for _ in 0..2 * BITS as usize * n.len() {
            let carry = shl1(&mut rr);
            if carry || !less_than(&rr, &n) {
                sub_in_place(&mut rr, &n);
            }
        }
        Some(Rs256Key { n, n0_inv: inv.wrapping_neg() & MASK, rr, k })
    }

    /// Modulus length in bits.
    pub fn bits(&self) -> usize {
        let top = self.n.len().saturating_sub(1);
        top * BITS as usize + (64 - self.n.last().map_or(64, |l| l.leading_zeros() as usize))
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
    // Kept out of its callers (see `crate::generic::json`); one call per verification.
    #[inline(never)]
    fn public_op(&self, signature: &[u8]) -> Option<Vec<u8>> {
        if signature.len() != self.k {
            return None;
        }
        let s = to_limbs(signature, self.n.len())?;
        if !less_than(&s, &self.n) {
            return None;
        }
        // s·R, squared 16 times: s^(2^16)·R; times the plain s, R⁻¹ leaves s^65537 itself.
        let mut x = self.mont_mul(&s, &self.rr);
        for _ in 0..16 {
            x = self.mont_sqr(&x);
        }
        Some(to_bytes(&self.mont_mul(&x, &s), self.k))
    }

    /// a·b·R⁻¹ mod n, fully reduced: row i adds a[i]·b and m·n in one pass (Montgomery
    /// multiplication, coarsely integrated operand scanning), where m clears the low bits of
    /// column i, final once a[i]·b[0] is in; carries stay in the columns (see `BITS`) but for
    /// column i's, moved up as the row ends. The inner loop zips slices: no bounds checks.
    // Indexing: t has 2s + 1 limbs and a, b, n have s (s ≥ 19), and every caller passes s-limb
    // operands built here from length-checked input, so no index can be out of bounds.
    #[allow(clippy::indexing_slicing)]
    fn mont_mul(&self, a: &[u64], b: &[u64]) -> Vec<u64> {
        let s = self.n.len();
        let mut t = vec![0u64; 2 * s + 1];
        for (i, &ai) in a.iter().enumerate() {
            let m = (((t[i] + ai * b[0]) & MASK) * self.n0_inv) & MASK;
            add_products(&mut t[i..i + s], ai, b, m, &self.n);
            t[i + 1] += t[i] >> BITS;
        }
        self.finish(t)
    }

    /// a·a·R⁻¹ mod n: as `mont_mul`, but each cross product a[i]·a[j] is computed once, by 2·a[i]
    /// (16 of the 19 multiplications of a verification are squarings). Column i's square terms
    /// come from rows up to i/2, so it is final when row i starts (a[0]² aside, added first).
    #[allow(clippy::indexing_slicing)] // as in `mont_mul`
    fn mont_sqr(&self, a: &[u64]) -> Vec<u64> {
        let s = self.n.len();
        let mut t = vec![0u64; 2 * s + 1];
        for (i, &ai) in a.iter().enumerate() {
            t[2 * i] += ai * ai;
            let m = ((t[i] & MASK) * self.n0_inv) & MASK;
            // Columns i..=2i get m·n[j] only; columns 2i+1.. also 2·a[i]·a[j], j > i.
            let (low, high) = t[i..i + s].split_at_mut(i + 1);
            add_product(low, m, &self.n[..low.len()]);
            let twice = ai << 1;
            add_products(high, twice, &a[i + 1..], m, &self.n[i + 1..]);
            t[i + 1] += t[i] >> BITS;
        }
        self.finish(t)
    }

    /// The columns s..=2s of a Montgomery product (< 2n), normalized and reduced below n.
    #[allow(clippy::indexing_slicing)] // as in `mont_mul`
    fn finish(&self, mut t: Vec<u64>) -> Vec<u64> {
        let s = self.n.len();
        let mut r = t.split_off(s);
        let mut carry = 0;
        for limb in &mut r {
            let v = *limb + carry;
            *limb = v & MASK;
            carry = v >> BITS;
        }
        // (a·b + m·n) / R < 2n: at most one subtraction (its borrow cancels the top limb).
        let over = r[s] != 0 || carry != 0;
        r.truncate(s);
        if over || !less_than(&r, &self.n) {
            sub_in_place(&mut r, &self.n);
        }
        r
    }
}

/// t[j] += m·n[j] (slices of one length), four limbs a step: LLVM does not unroll at opt-level
/// "s", and in V8 the loop's own instructions cost about as much as the multiply-adds.
#[inline(always)]
fn add_product(t: &mut [u64], m: u64, n: &[u64]) {
    let (mut t4, mut n4) = (t.chunks_exact_mut(4), n.chunks_exact(4));
    for (t, n) in (&mut t4).zip(&mut n4) {
        if let ([t0, t1, t2, t3], [n0, n1, n2, n3]) = (t, n) {
            *t0 += m * n0;
            *t1 += m * n1;
            *t2 += m * n2;
            *t3 += m * n3;
        }
    }
    for (t, &n) in t4.into_remainder().iter_mut().zip(n4.remainder()) {
        *t += m * n;
    }
}

/// t[j] += x·a[j] + y·b[j] (slices of one length), as `add_product`.
#[inline(always)]
fn add_products(t: &mut [u64], x: u64, a: &[u64], y: u64, b: &[u64]) {
    let (mut t4, mut a4, mut b4) = (t.chunks_exact_mut(4), a.chunks_exact(4), b.chunks_exact(4));
    for ((t, a), b) in (&mut t4).zip(&mut a4).zip(&mut b4) {
        if let ([t0, t1, t2, t3], [a0, a1, a2, a3], [b0, b1, b2, b3]) = (t, a, b) {
            *t0 += x * a0 + y * b0;
            *t1 += x * a1 + y * b1;
            *t2 += x * a2 + y * b2;
            *t3 += x * a3 + y * b3;
        }
    }
    for ((t, &a), &b) in t4.into_remainder().iter_mut().zip(a4.remainder()).zip(b4.remainder()) {
        *t += x * a + y * b;
    }
}

fn strip_zeros(be: &[u8]) -> &[u8] {
    let first = be.iter().position(|&b| b != 0).unwrap_or(be.len());
    be.get(first..).unwrap_or_default()
}

/// Big-endian bytes -> `limbs` little-endian limbs of `BITS` bits; `None` if the value does
/// not fit.
fn to_limbs(be: &[u8], limbs: usize) -> Option<Vec<u64>> {
    let mut out = Vec::with_capacity(limbs);
    let (mut acc, mut acc_bits) = (0u64, 0);
    for &byte in be.iter().rev() {
        acc |= (byte as u64) << acc_bits;
        acc_bits += 8;
        if acc_bits >= BITS {
            out.push(acc & MASK);
            acc >>= BITS;
            acc_bits -= BITS;
        }
    }
    out.push(acc);
    while out.len() > limbs {
        if out.pop() != Some(0) {
            return None;
        }
    }
    out.resize(limbs, 0);
    Some(out)
}

/// Little-endian limbs -> `k` big-endian bytes.
fn to_bytes(limbs: &[u64], k: usize) -> Vec<u8> {
    let mut out = vec![0u8; k];
    let (mut acc, mut acc_bits) = (0u64, 0);
    let mut limbs = limbs.iter();
    for b in out.iter_mut().rev() {
        if acc_bits < 8 {
            acc |= limbs.next().copied().unwrap_or(0) << acc_bits;
            acc_bits += BITS;
        }
        *b = acc as u8;
        acc >>= 8;
        acc_bits -= 8;
    }
    out
}

fn less_than(a: &[u64], b: &[u64]) -> bool {
    for (x, y) in a.iter().rev().zip(b.iter().rev()) {
        if x != y {
            return x < y;
        }
    }
    false
}

/// a -= b (mod 2^(BITS·len)), both normalized.
fn sub_in_place(a: &mut [u64], b: &[u64]) {
    let mut borrow = 0u64;
    for (x, &y) in a.iter_mut().zip(b) {
        let d = x.wrapping_sub(y).wrapping_sub(borrow);
        *x = d & MASK;
        borrow = d >> 63;
    }
}

/// a <<= 1 (normalized limbs), returning whether a bit was shifted out of the top limb.
fn shl1(a: &mut [u64]) -> bool {
    let mut carry = 0u64;
    for x in a.iter_mut() {
        let v = (*x << 1) | carry;
        *x = v & MASK;
        carry = v >> BITS;
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

    /// The largest keys accepted (8192 bits) have the largest columns: odd moduli of that size
    /// with all limbs set, or random, give modpow's result.
    #[test]
    fn the_largest_moduli_do_not_overflow_the_columns() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(9);
        let mut random = vec![0u8; 1024];
        rng.fill_bytes(&mut random);
        random[0] |= 0x80;
        random[1023] |= 1;
        for n_be in [vec![0xffu8; 1024], random] {
            let ours = Rs256Key::new(&n_be, 65537).unwrap();
            assert_eq!(ours.bits(), 8192);
            let n = BigUint::from_bytes_be(&n_be);
            let mut values = values_below(&n, 1024, &mut rng);
            values.truncate(8);
            values.push(&n - BigUint::from(2u32));
            for v in values {
                let want = v.modpow(&BigUint::from(65537u32), &n).to_bytes_be();
                let got = ours.public_op(&{
                    let b = v.to_bytes_be();
                    let mut p = vec![0u8; 1024 - b.len()];
                    p.extend_from_slice(&b);
                    p
                });
                let got = BigUint::from_bytes_be(&got.unwrap());
                assert_eq!(got, BigUint::from_bytes_be(&want));
            }
        }
    }

    #[test]
    fn squaring_is_multiplying_by_itself() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(8);
        for k in keys() {
            let ours = prepared(k);
            let n = k.n();
            let limbs = ours.n.len();
            let mut values: Vec<Vec<u64>> =
                values_below(n, ours.k, &mut rng).iter().map(|v| to_limbs(&v.to_bytes_be(), limbs).unwrap()).collect();
            // Every limb all ones but the top one, which is n's minus 1: the largest columns.
            let mut carries = vec![MASK; limbs];
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
