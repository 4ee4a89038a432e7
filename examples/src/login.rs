//! The demo's login: a WebSocket service that hands out HS256 JSON Web Tokens (RFC 7519)
//! for a name, so a browser page served by the gateway can log in through the same gateway
//! (same origin, no CORS) and then open the chat with the token, which the shipped
//! `jwt-auth` plugin checks for real.
//!
//! The protocol: the client sends `{"name":N}`, the server answers
//! `{"type":"token","name":N,"token":T,"expires":EXP}` (EXP in seconds since the epoch) or
//! `{"type":"error","error":WHY}`. A name is 1 to 24 letters, digits, `-` or `_`.
//!
//! There is no password: this is a demo of the gateway's side of authentication (the token
//! in the `Sec-WebSocket-Protocol` offer, its checks, its claims passed upstream), not an
//! identity provider.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

/// What goes into every token besides the name (`sub`).
#[derive(Clone, Debug)]
pub struct Issuer {
    /// The HS256 secret: jwt-auth's `secret` on the routes that check these tokens.
    pub secret: String,
    pub iss: String,
    pub aud: String,
    pub ttl_secs: u64,
}

impl Issuer {
    /// A signed token for `name`, valid from now for `ttl_secs`.
    pub fn token(&self, name: &str) -> (String, u64) {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
        let exp = now + self.ttl_secs;
        let claims = json!({ "sub": name, "iss": self.iss, "aud": self.aud, "iat": now, "exp": exp });
        (sign_hs256(self.secret.as_bytes(), &claims), exp)
    }
}

/// A compact JWS of `claims` with HS256.
pub fn sign_hs256(secret: &[u8], claims: &Value) -> String {
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let signing_input = format!("{}.{}", b64(br#"{"alg":"HS256","typ":"JWT"}"#), b64(claims.to_string().as_bytes()));
    let mut mac = <Hmac<Sha256>>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(signing_input.as_bytes());
    format!("{signing_input}.{}", b64(&mac.finalize().into_bytes()))
}

fn valid_name(name: &str) -> bool {
    (1..=24).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A running login service.
pub struct LoginServer {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl LoginServer {
    /// Binds `addr` (port 0 for any) and issues tokens until dropped.
    pub async fn start(addr: &str, issuer: Issuer) -> anyhow::Result<LoginServer> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let issuer = Arc::new(issuer);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let issuer = issuer.clone();
                tokio::spawn(async move {
                    let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else { return };
                    while let Some(Ok(Message::Text(text))) = ws.next().await {
                        let request: Value = serde_json::from_str(text.as_str()).unwrap_or(Value::Null);
                        let answer = match request["name"].as_str() {
                            Some(name) if valid_name(name) => {
                                let (token, expires) = issuer.token(name);
                                json!({ "type": "token", "name": name, "token": token, "expires": expires })
                            }
                            _ => json!({ "type": "error", "error": "a name is 1 to 24 letters, digits, - or _" }),
                        };
                        if ws.send(Message::text(answer.to_string())).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Ok(LoginServer { addr, task })
    }
}

impl Drop for LoginServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_carries_the_claims_and_an_hs256_signature_over_them() {
        let issuer = Issuer { secret: "s".repeat(32), iss: "demo".into(), aud: "chat".into(), ttl_secs: 60 };
        let (token, exp) = issuer.token("alice");
        let parts: Vec<&str> = token.split('.').collect();
        let decode = |p: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(p).unwrap();
        let claims: Value = serde_json::from_slice(&decode(parts[1])).unwrap();
        assert_eq!((claims["sub"].as_str(), claims["aud"].as_str(), claims["exp"].as_u64()), (Some("alice"), Some("chat"), Some(exp)));
        let mut mac = <Hmac<Sha256>>::new_from_slice("s".repeat(32).as_bytes()).unwrap();
        mac.update(format!("{}.{}", parts[0], parts[1]).as_bytes());
        mac.verify_slice(&decode(parts[2])).expect("the signature verifies");
    }

    #[test]
    fn names_are_plain() {
        assert!(valid_name("alice") && valid_name("bob_2") && valid_name("a-b"));
        for bad in ["", "a b", "<b>", "é", &"x".repeat(25)] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }
}
