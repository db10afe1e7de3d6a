//! `crate::generic::rs256` against the `rsa` crate's RSASSA-PKCS1-v1_5 SHA-256 verification.

use std::sync::OnceLock;

use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha20Rng;
use rsa::traits::PublicKeyParts;
use rsa::{BigUint, Pkcs1v15Sign, RsaPrivateKey, RsaPublicKey};
use sha2::Sha256;

use crate::generic::rs256::Rs256Key;

/// The RSA keys (e = 65537), made at first use from fixed seeds, so that no private key is in
/// the repository yet every run has the same keys: (seed, bits): 1024, 1025 (the modulus's top
/// byte is 1, its length not a multiple of the limb size) and 2048.
const KEYS: [(u64, usize); 3] = [(1024, 1024), (1025, 1025), (2048, 2048)];

/// DER of SHA-256's DigestInfo (RFC 8017, section 9.2, note 1).
const DIGEST_INFO: [u8; 19] =
    [0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05, 0x00, 0x04, 0x20];

struct Key {
    private: RsaPrivateKey,
    public: RsaPublicKey,
    ours: Rs256Key,
    /// The modulus's length in bytes.
    k: usize,
}

impl Key {
    /// The PKCS#1 v1.5 block a signature of `digest` opens to: 00 01 FF..FF 00 DigestInfo digest.
    fn block(&self, digest: &[u8; 32]) -> Vec<u8> {
        let mut block = vec![0x00, 0x01];
        block.resize(self.k - DIGEST_INFO.len() - digest.len() - 1, 0xff);
        block.push(0x00);
        block.extend_from_slice(&DIGEST_INFO);
        block.extend_from_slice(digest);
        block
    }

    /// The signature that opens to `message` (taken modulo n): message^d mod n, k bytes.
    fn sign(&self, message: &[u8]) -> Vec<u8> {
        let m = BigUint::from_bytes_be(message) % self.public.n();
        let s = rsa::hazmat::rsa_decrypt(None::<&mut ChaCha20Rng>, &self.private, &m).expect("m < n");
        let s = s.to_bytes_be();
        let mut signature = vec![0; self.k.saturating_sub(s.len())];
        signature.extend_from_slice(&s);
        signature
    }
}

fn keys() -> &'static [Key] {
    static MADE: OnceLock<Vec<Key>> = OnceLock::new();
    MADE.get_or_init(|| {
        KEYS.iter()
            .map(|&(seed, bits)| {
                let private = RsaPrivateKey::new(&mut ChaCha20Rng::seed_from_u64(seed), bits).expect("an RSA key");
                let public = private.to_public_key();
                let ours = Rs256Key::new(&public.n().to_bytes_be(), 65537).expect("a key rs256 prepares");
                Key { k: public.size(), private, public, ours }
            })
            .collect()
    })
}

/// The first byte chooses the key (bits 0-1; 3: a modulus from the input) and how the signature
/// is made (bits 2-3); 32 bytes of digest follow, then:
/// - 0: the signature;
/// - 1: a message block, signed with the key's private half (so the fuzzer explores blocks, not
///   signatures);
/// - 2 and 3: pairs (position, xor) applied to the valid block of the digest, signed: the
///   signature verifies exactly when the block is unchanged;
/// - key 3: the modulus's length (2 bytes, big-endian, at most 1024), the modulus, the signature.
///
/// `Rs256Key::verify` says what the `rsa` crate says, and `Rs256Key::new` prepares exactly the odd
/// moduli of 512 bits or more.
pub fn rs256_differential(data: &[u8]) {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let Some((digest, rest)) = rest.split_first_chunk::<32>() else {
        return;
    };
    let Some(key) = keys().get(usize::from(selector & 3)) else {
        return any_modulus(digest, rest);
    };
    let (signature, valid) = match selector >> 2 & 3 {
        0 => (rest.to_vec(), None),
        1 => (key.sign(rest), None),
        _ => {
            let valid = key.block(digest);
            let mut block = valid.clone();
            for pair in rest.chunks_exact(2) {
                if let (Some(&at), Some(&xor)) = (pair.first(), pair.last()) {
                    if let Some(b) = block.get_mut(usize::from(at) % key.k) {
                        *b ^= xor;
                    }
                }
            }
            (key.sign(&block), Some(block == valid))
        }
    };
    let ours = key.ours.verify(digest, &signature);
    let theirs = key.public.verify(Pkcs1v15Sign::new::<Sha256>(), digest, &signature).is_ok();
    assert_eq!(ours, theirs, "{} bits, signature {signature:02x?}", key.public.n().bits());
    if let Some(valid) = valid {
        assert_eq!(ours, valid, "{} bits, signature {signature:02x?}", key.public.n().bits());
    }
}

fn any_modulus(digest: &[u8; 32], rest: &[u8]) {
    let Some((len, rest)) = rest.split_first_chunk::<2>() else {
        return;
    };
    let (n, signature) = rest.split_at(usize::from(u16::from_be_bytes(*len)).min(1024).min(rest.len()));
    let ours = Rs256Key::new(n, 65537);
    let significant = n.iter().skip_while(|&&b| b == 0).count();
    let odd = n.last().is_some_and(|b| b & 1 == 1);
    assert_eq!(ours.is_some(), odd && significant >= 64, "modulus {n:02x?}");
    let Some(ours) = ours else {
        return;
    };
    let n = BigUint::from_bytes_be(n);
    assert_eq!(ours.bits(), n.bits(), "modulus {n:x}");
    let theirs = RsaPublicKey::new_with_max_size(n, BigUint::from(65537u32), 8192).expect("an odd modulus > e");
    let verdict = theirs.verify(Pkcs1v15Sign::new::<Sha256>(), digest, signature).is_ok();
    assert_eq!(ours.verify(digest, signature), verdict, "modulus {:x}, signature {signature:02x?}", theirs.n());
}
