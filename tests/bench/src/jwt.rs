//! The JSON Web Tokens the load generator presents with every handshake, and the keys and
//! audience the jwt-auth plugin checks them with.
//!
//! Every target gets the same kind of `Authorization: Bearer …` header, so the requests are
//! identical across columns: the proxies without jwt-auth pass it on and the echo backends
//! ignore it. The RS256 columns get RS256 tokens signed with jwt-auth's test key (committed
//! under plugins/jwt-auth/testdata for its unit tests; not a key of anything real).

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use rsa::pkcs1::DecodeRsaPrivateKey;
use rsa::signature::{SignatureEncoding, Signer};
use sha2::Sha256;
use tokio_tungstenite::tungstenite::http::HeaderValue;

/// HS256 secret shared with the generated wasmgate config (jwt-auth wants 32 bytes or more).
pub const SECRET: &str = "wasmgate-bench-hs256-secret-not-for-production";
/// The audience jwt-auth is configured to accept, so the check runs as in a deployment.
pub const AUDIENCE: &str = "wasmgate-bench";
/// Outlives any run; jwt-auth requires an `exp`.
const VALID_FOR_SECS: u64 = 24 * 3600;

/// How a token is signed.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Alg {
    Hs256,
    Rs256,
}

/// `Bearer <HS256 token>` for user `bench`, valid from now for a day.
pub fn bearer() -> HeaderValue {
    bearer_for(Alg::Hs256, "bench")
}

/// `Bearer <token>` for user `sub`, signed as `alg` says, valid from now for a day. Clients
/// of the storm scenario each have their own, as real users do.
pub fn bearer_for(alg: Alg, sub: &str) -> HeaderValue {
    let token = match alg {
        Alg::Hs256 => sign_hs256(SECRET, sub),
        Alg::Rs256 => sign_rs256(sub),
    };
    HeaderValue::from_str(&format!("Bearer {token}")).expect("base64url is a valid header value")
}

/// The same token signed with another secret: jwt-auth refuses it (401, bad signature).
pub fn forged_bearer() -> HeaderValue {
    let token = sign_hs256("not-the-secret-the-gateway-checks-tokens-with", "bench");
    HeaderValue::from_str(&format!("Bearer {token}")).expect("base64url is a valid header value")
}

/// The public key RS256 tokens verify with, PEM, for jwt-auth's config.
pub fn rs256_public_key() -> PathBuf {
    testdata("rsa_public.pem")
}

fn testdata(name: &str) -> PathBuf {
    // This crate is tests/bench in the repository.
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).ancestors().nth(2).expect("tests/bench has two parents");
    repo.join("plugins/jwt-auth/testdata").join(name)
}

fn signing_input(alg: &str, sub: &str) -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock after 1970").as_secs();
    let header = URL_SAFE_NO_PAD.encode(format!(r#"{{"alg":"{alg}","typ":"JWT"}}"#));
    let claims = URL_SAFE_NO_PAD
        .encode(format!(r#"{{"sub":"{sub}","aud":"{AUDIENCE}","iat":{now},"exp":{}}}"#, now + VALID_FOR_SECS));
    format!("{header}.{claims}")
}

fn sign_hs256(secret: &str, sub: &str) -> String {
    let input = signing_input("HS256", sub);
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes keys of any length");
    mac.update(input.as_bytes());
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes()))
}

fn sign_rs256(sub: &str) -> String {
    static KEY: std::sync::OnceLock<rsa::pkcs1v15::SigningKey<Sha256>> = std::sync::OnceLock::new();
    let key = KEY.get_or_init(|| {
        let path = testdata("rsa_private.pem");
        let pem = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        let key = rsa::RsaPrivateKey::from_pkcs1_pem(&pem).expect("jwt-auth's test key is PKCS#1 PEM");
        rsa::pkcs1v15::SigningKey::new(key)
    });
    let input = signing_input("RS256", sub);
    let signature = key.sign(input.as_bytes()).to_vec();
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature))
}
