//! Wycheproof's RSASSA-PKCS1-v1_5 SHA-256 vectors (2048 to 8192 bits) and ECDSA P-256 SHA-256
//! vectors in JWS form (IEEE P1363, r ‖ s), run against the verifier this build uses: `rs256.rs`
//! and `p256` by default (the .wasm modules), aws-lc with `native-crypto` (libedgewise.so).
//!
//! Each group's key is written as a JWK and loaded by `Jwks::from_json`, so key parsing is
//! tested along with verification, and each case goes through `Jwk::verify`, the check a token's
//! signature gets. A key the filters do not take is not skipped quietly: which ones are left out
//! (loaded as no key) or refused (the document is an error) is decided from Wycheproof's own
//! description of the key and asserted, and every count is asserted per set, so that a set that
//! shrinks or vanishes in a new release of the crate fails here.
//!
//! `acceptable` cases: the only ones in these sets are RSA signatures whose DigestInfo lacks the
//! NULL parameters of the SHA-256 AlgorithmIdentifier (flag `MissingNull`), a legacy encoding
//! some libraries accept for compatibility. Both verifiers refuse them, and that is asserted:
//! RFC 8017 9.2 defines the encoding with NULL, JWS signers (RFC 7518 3.3) produce it,
//! `rs256.rs` compares the whole block with that one byte for byte, parsing no ASN.1 from
//! attacker input, and the two builds must agree on which tokens verify. An acceptable case of
//! any other kind (a new release of the vectors) fails the test until it is decided here.

use ::wycheproof::{ecdsa, rsa_pkcs1_verify as rsa, EllipticCurve, HashFunction, TestResult};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde_json::json;

use crate::generic::jwt::Jwks;

/// What a test set came to.
#[derive(Debug, Default, PartialEq, Eq)]
struct Tally {
    /// Groups whose key loaded and whose cases ran.
    groups: usize,
    /// Cases run, by their expected result.
    valid: usize,
    invalid: usize,
    acceptable: usize,
    /// Groups (and their cases) whose key `Jwks::from_json` leaves out: RSA with e != 65537.
    left_out_groups: usize,
    left_out_cases: usize,
    /// Groups (and their cases) whose key `Jwks::from_json` refuses: RSA below 2048 or above 8192
    /// bits.
    refused_groups: usize,
    refused_cases: usize,
}

/// What the filters do with a key, from Wycheproof's description of it (not from our parser).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyFate {
    Used,
    LeftOut,
    Refused,
}

/// Loads one group's JWK and checks that `Jwks::from_json` does with it what `fate` says.
fn load(jwk: serde_json::Value, fate: KeyFate, what: &str) -> Option<Jwks> {
    let doc = json!({ "keys": [jwk] }).to_string();
    match (Jwks::from_json(doc.as_bytes()), fate) {
        (Ok(jwks), KeyFate::Used) => {
            assert_eq!(jwks.keys().len(), 1, "{what}: the key was not loaded");
            Some(jwks)
        }
        (Ok(jwks), KeyFate::LeftOut) => {
            assert!(jwks.is_empty(), "{what}: the key should have been left out");
            None
        }
        (Err(_), KeyFate::Refused) => None,
        (got, want) => panic!("{what}: expected the key to be {want:?}, got {got:?}"),
    }
}

impl Tally {
    /// Runs the cases of one group (`None`: its key was left out or refused, by `fate`).
    fn group<'a>(
        &mut self,
        failures: &mut Vec<String>,
        what: &str,
        fate: KeyFate,
        jwks: Option<&Jwks>,
        cases: impl ExactSizeIterator<Item = (usize, TestResult, String, &'a [u8], &'a [u8])>,
    ) {
        let Some(jwks) = jwks else {
            let (groups, count) = match fate {
                KeyFate::LeftOut => (&mut self.left_out_groups, &mut self.left_out_cases),
                KeyFate::Refused => (&mut self.refused_groups, &mut self.refused_cases),
                KeyFate::Used => unreachable!("a used key is loaded"),
            };
            *groups += 1;
            *count += cases.len();
            return;
        };
        self.groups += 1;
        let key = &jwks.keys()[0];
        for (id, result, flags, msg, sig) in cases {
            let verified = key.verify(msg, sig);
            let want = match result {
                TestResult::Valid => {
                    self.valid += 1;
                    true
                }
                TestResult::Invalid => {
                    self.invalid += 1;
                    false
                }
                // See the module's documentation.
                TestResult::Acceptable => {
                    self.acceptable += 1;
                    assert_eq!(flags, "[MissingNull]", "{what} #{id}: an acceptable case of a new kind: decide it");
                    false
                }
            };
            if verified != want {
                failures.push(format!("{what} #{id} ({result:?}, {flags}): verified = {verified}"));
            }
        }
    }
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

fn strip_zeros(be: &[u8]) -> &[u8] {
    &be[be.iter().take_while(|b| **b == 0).count()..]
}

fn rsa_set(name: rsa::TestName) -> Tally {
    let set = rsa::TestSet::load(name).unwrap();
    let (mut tally, mut failures) = (Tally::default(), Vec::new());
    for (i, group) in set.test_groups.iter().enumerate() {
        let what = format!("{name:?} group {i}");
        // The set's name says SHA-256; JWS's RS256 is nothing else.
        assert_eq!(group.hash, HashFunction::Sha2_256, "{what}");
        let n = strip_zeros(&group.key.n);
        let bits = n.len() * 8 - n[0].leading_zeros() as usize;
        let fate = if strip_zeros(&group.key.e) != [1, 0, 1] {
            KeyFate::LeftOut
        } else if !(2048..=8192).contains(&bits) {
            KeyFate::Refused
        } else {
            KeyFate::Used
        };
        let jwk = json!({"kty": "RSA", "kid": what, "use": "sig", "alg": "RS256", "n": b64(n), "e": b64(&group.key.e)});
        let jwks = load(jwk, fate, &what);
        let cases = group.tests.iter().map(|t| (t.tc_id, t.result, format!("{:?}", t.flags), &t.msg[..], &t.sig[..]));
        tally.group(&mut failures, &what, fate, jwks.as_ref(), cases);
    }
    check_totals(&format!("{name:?}"), &tally, set.number_of_tests, &failures);
    tally
}

fn ecdsa_set(name: ecdsa::TestName) -> Tally {
    let set = ecdsa::TestSet::load(name).unwrap();
    let (mut tally, mut failures) = (Tally::default(), Vec::new());
    for (i, group) in set.test_groups.iter().enumerate() {
        let what = format!("{name:?} group {i}");
        // JWS form (r ‖ s), P-256, SHA-256: ES256 and nothing else, as the set's name says.
        assert_eq!(group.test_type, ecdsa::TestGroupTypeId::EcdsaP1363, "{what}");
        assert_eq!((group.key.curve, group.hash), (EllipticCurve::Secp256r1, HashFunction::Sha2_256), "{what}");
        // The uncompressed point: 0x04 ‖ x ‖ y.
        let point = &group.key.key[..];
        assert_eq!((point.len(), point[0]), (65, 4), "{what}");
        let jwk = json!({"kty": "EC", "crv": "P-256", "kid": what, "use": "sig", "alg": "ES256",
            "x": b64(&point[1..33]), "y": b64(&point[33..])});
        let jwks = load(jwk, KeyFate::Used, &what);
        let cases = group.tests.iter().map(|t| (t.tc_id, t.result, format!("{:?}", t.flags), &t.msg[..], &t.sig[..]));
        tally.group(&mut failures, &what, KeyFate::Used, jwks.as_ref(), cases);
    }
    check_totals(&format!("{name:?}"), &tally, set.number_of_tests, &failures);
    tally
}

/// Every case of the set is accounted for, and none went the wrong way.
fn check_totals(name: &str, t: &Tally, number_of_tests: usize, failures: &[String]) {
    println!("{name}: {t:?}");
    let accounted = t.valid + t.invalid + t.acceptable + t.left_out_cases + t.refused_cases;
    assert_eq!(accounted, number_of_tests, "{name}: cases accounted for");
    assert!(failures.is_empty(), "{name}: {} cases went the wrong way:\n{}", failures.len(), failures.join("\n"));
}

/// The counts of the RSA sets: one e = 65537 key with 258 or so cases (7 valid, 1 acceptable);
/// e = 3 keys (Wycheproof's `SmallPublicKey`, one valid case each) are left out, as every key
/// with e != 65537 is (see `KeyMaterial::Rsa65537`).
fn rsa_tally(invalid: usize, left_out: usize) -> Tally {
    Tally {
        groups: 1,
        valid: 7,
        invalid,
        acceptable: 1,
        left_out_groups: left_out,
        left_out_cases: left_out,
        ..Tally::default()
    }
}

#[test]
fn rsa_2048_sha256() {
    assert_eq!(rsa_set(rsa::TestName::Rsa2048Sha256), rsa_tally(249, 2));
}

#[test]
fn rsa_3072_sha256() {
    assert_eq!(rsa_set(rsa::TestName::Rsa3072Sha256), rsa_tally(250, 1));
}

#[test]
fn rsa_4096_sha256() {
    assert_eq!(rsa_set(rsa::TestName::Rsa4096Sha256), rsa_tally(250, 0));
}

#[test]
fn rsa_8192_sha256() {
    assert_eq!(rsa_set(rsa::TestName::Rsa8192Sha256), rsa_tally(250, 0));
}

#[test]
fn ecdsa_p256_sha256_p1363() {
    let want = Tally { groups: 112, valid: 173, invalid: 89, ..Tally::default() };
    assert_eq!(ecdsa_set(ecdsa::TestName::EcdsaSecp256r1Sha256P1363), want);
}
