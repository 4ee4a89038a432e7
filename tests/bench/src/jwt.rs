//! The JSON Web Token the load generator presents with every handshake, and the secret and
//! audience the jwt-auth plugin checks it with.
//!
//! Every target gets the same `Authorization: Bearer …` header, so the requests are identical
//! across columns: the proxies without jwt-auth pass it on and the echo backends ignore it.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio_tungstenite::tungstenite::http::HeaderValue;

/// HS256 secret shared with the generated wasmgate config (jwt-auth wants 32 bytes or more).
pub const SECRET: &str = "wasmgate-bench-hs256-secret-not-for-production";
/// The audience jwt-auth is configured to accept, so the check runs as in a deployment.
pub const AUDIENCE: &str = "wasmgate-bench";
/// Outlives any run; jwt-auth requires an `exp`.
const VALID_FOR_SECS: u64 = 24 * 3600;

/// `Bearer <HS256 token>` for user `bench`, valid from now for a day.
pub fn bearer() -> HeaderValue {
    bearer_signed_with(SECRET)
}

/// The same token signed with another secret: jwt-auth refuses it (401, bad signature).
pub fn forged_bearer() -> HeaderValue {
    bearer_signed_with("not-the-secret-the-gateway-checks-tokens-with")
}

fn bearer_signed_with(secret: &str) -> HeaderValue {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock after 1970").as_secs();
    let header = URL_SAFE_NO_PAD.encode(r#"{"alg":"HS256","typ":"JWT"}"#);
    let claims = URL_SAFE_NO_PAD
        .encode(format!(r#"{{"sub":"bench","aud":"{AUDIENCE}","iat":{now},"exp":{}}}"#, now + VALID_FOR_SECS));
    let signed = format!("{header}.{claims}");
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes keys of any length");
    mac.update(signed.as_bytes());
    let signature = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    HeaderValue::from_str(&format!("Bearer {signed}.{signature}")).expect("base64url is a valid header value")
}
