//! `crate::rs256` against the `rsa` crate's RSASSA-PKCS1-v1_5 SHA-256 verification.

use std::sync::OnceLock;

use rand_chacha::ChaCha20Rng;
use rsa::traits::PublicKeyParts;
use rsa::{BigUint, Pkcs1v15Sign, RsaPrivateKey, RsaPublicKey};
use sha2::Sha256;

use crate::rs256::Rs256Key;

/// RSA keys with e = 65537, by their primes (hex): 1024 bits, 1025 (the modulus's top byte is 1,
/// its length not a multiple of the limb size) and 2048.
const PRIMES: [(&str, &str); 3] = [
    // 1024 bits
    (
        concat!(
            "ff2426205209bedc104bb5249eb0ee55328683eb7fb487914c71e874fa999bbad9fa30ce7df70978f8d5b3ed37d83dd7",
            "6d392c54b921d77b18b468fd29469133",
        ),
        concat!(
            "e8bdf348c7dfb78d064cf218199110ad8926fd34def56f7004577694d1f94940bea041545ab932823e89fbb7f36e8c44",
            "264c0af3922a56264fcb829e6eab3f25",
        ),
    ),
    // 1025 bits
    (
        concat!(
            "1dfa47d744b1612337eab8a4ffe482a08c4724c9aa196d4a5cad33948cd1b293e91005e4432bd6d9016259b184d1cb9c",
            "260459c7087355c1aaeb3cf49994f753b",
        ),
        concat!(
            "e034d09275fbe772b603f31d19cc3f58f8168c900be0622aed3ed803ab46ca1fa536830f36c2a632957f5dd7dedf0f94",
            "b7d3d99137446272537135db197bb331",
        ),
    ),
    // 2048 bits
    (
        concat!(
            "e898d3779d9d30a6d9daab2381910e9f04ddfe06d4d8e90684bd4386e1ecd98c187c9e711c762ce7417b6a888facfa41",
            "5bdcaf69cbead3c63b88cd83152fd43a440d23420798ae2bd1884fe79e7fd7e2d3013343f5b393733286559db143746e",
            "b5553e9e185627d736e83973844327b62e5a07683a0b6f3db70532ea904022b1",
        ),
        concat!(
            "bc437874c923d8ffbd68ed60b3c765630d4c07d90436501e6fb952020a3ce712e92e58bcd53c7836619af6f141fce6dc",
            "2a0ea4c4cf8c6dde8f4accccb300897c1f2d83162a05072342c5623a780bf2437bb07806afad71e35e162ebbe0d995fc",
            "adf7ae82bbc7183022c58d7505d2363facc296d206614bef591f3c75fd2bf4ab",
        ),
    ),
];

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
    static KEYS: OnceLock<Vec<Key>> = OnceLock::new();
    KEYS.get_or_init(|| {
        let hex = |h: &str| BigUint::parse_bytes(h.as_bytes(), 16).expect("hex");
        PRIMES
            .iter()
            .map(|(p, q)| {
                let private = RsaPrivateKey::from_p_q(hex(p), hex(q), BigUint::from(65537u32)).expect("an RSA key");
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
