use base64::Engine;
use hmac::{Hmac, Mac};
use p256::pkcs8::DecodePrivateKey;
use rsa::pkcs1::DecodeRsaPrivateKey;
use rsa::signature::{SignatureEncoding, Signer};
use rsa::traits::PublicKeyParts;
use serde_json::json;
use sha2::Sha256;
use wasmgate_sdk::{Direction, Header, Opcode, Verdict};

use super::*;

// Test-only keys, generated with openssl for these tests.
const RSA_PRIVATE: &str = include_str!("../testdata/rsa_private.pem");
const RSA_PUBLIC: &str = include_str!("../testdata/rsa_public.pem");
const RSA_OTHER_PUBLIC: &str = include_str!("../testdata/rsa_other_public.pem");
const EC_PRIVATE: &str = include_str!("../testdata/ec_private.pem");
const EC_PUBLIC: &str = include_str!("../testdata/ec_public.pem");
const SECRET: &str = "an-hs256-secret-of-at-least-32-bytes!";

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn now() -> i64 {
    (wasmgate_sdk::now_ms() / 1000) as i64
}

/// A signed token: `alg` picks the test key (HS256: SECRET, RS256: RSA_PRIVATE, ES256:
/// EC_PRIVATE); `header` fields are added to the JOSE header.
fn token(alg: &str, header: Value, claims: Value) -> String {
    let mut head = json!({"alg": alg, "typ": "JWT"});
    head.as_object_mut()
        .unwrap()
        .extend(header.as_object().unwrap().clone());
    let input = format!(
        "{}.{}",
        b64(head.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let sig = match alg {
        "HS256" => {
            let mut mac = <Hmac<Sha256>>::new_from_slice(SECRET.as_bytes()).unwrap();
            mac.update(input.as_bytes());
            mac.finalize().into_bytes().to_vec()
        }
        "RS256" => {
            let key = rsa::RsaPrivateKey::from_pkcs1_pem(RSA_PRIVATE).unwrap();
            let signer = rsa::pkcs1v15::SigningKey::<Sha256>::new(key);
            signer.sign(input.as_bytes()).to_vec()
        }
        "ES256" => {
            let key = p256::ecdsa::SigningKey::from_pkcs8_pem(EC_PRIVATE).unwrap();
            let sig: p256::ecdsa::Signature = key.sign(input.as_bytes());
            sig.to_bytes().to_vec()
        }
        _ => Vec::new(),
    };
    format!("{input}.{}", b64(&sig))
}

/// Claims valid for an hour.
fn claims() -> Value {
    json!({"sub": "alice", "role": "admin", "exp": now() + 3600, "iss": "https://issuer", "aud": "chat"})
}

fn plugin(config: Value) -> JwtAuth {
    JwtAuth::from_json(&config.to_string()).unwrap()
}

fn bearer(token: &str) -> Request {
    Request::new("/").with_header("authorization", &format!("Bearer {token}"))
}

fn handshake(p: &mut JwtAuth, req: &Request) -> Verdict {
    p.on_handshake(&Conn::new(1), req)
}

fn accepted(v: &Verdict) -> &Accept {
    match v {
        Verdict::Accept(a) => a,
        Verdict::Reject(r) => panic!("rejected: {} {}", r.status, r.reason),
    }
}

/// Status, body and WWW-Authenticate of a refusal.
fn refused(v: &Verdict) -> (u16, &str, &str) {
    match v {
        Verdict::Reject(r) => {
            let challenge = r
                .headers
                .iter()
                .find(|h| h.name == "www-authenticate")
                .map_or("", |h| h.value.as_str());
            (r.status, r.reason.as_str(), challenge)
        }
        Verdict::Accept(_) => panic!("accepted"),
    }
}

fn header<'a>(a: &'a Accept, name: &str) -> Option<&'a str> {
    a.add_headers
        .iter()
        .find(|h| h.name == name)
        .map(|h| h.value.as_str())
}

#[test]
fn every_algorithm_verifies() {
    let mut p = plugin(json!({
        "keys": [{"secret": SECRET}, {"public_key": RSA_PUBLIC}, {"public_key": EC_PUBLIC}],
    }));
    for alg in ["HS256", "RS256", "ES256"] {
        let v = handshake(&mut p, &bearer(&token(alg, json!({}), claims())));
        accepted(&v);
    }
}

#[test]
fn pkcs1_pem_and_jwks_keys_verify() {
    let rsa = rsa::RsaPublicKey::from_pkcs1_pem_public(RSA_PRIVATE);
    let ec = p256::ecdsa::SigningKey::from_pkcs8_pem(EC_PRIVATE).unwrap();
    let point = ec.verifying_key().to_encoded_point(false);
    let jwks = json!({"keys": [
        {"kty": "RSA", "kid": "r1", "use": "sig", "alg": "RS256", "n": b64(&rsa.n().to_bytes_be()), "e": b64(&rsa.e().to_bytes_be())},
        {"kty": "EC", "kid": "e1", "crv": "P-256", "x": b64(point.x().unwrap()), "y": b64(point.y().unwrap())},
        {"kty": "oct", "kid": "h1", "k": b64(SECRET.as_bytes())},
    ]});
    // As an object, and as the JSON text `${file:jwks.json}` expands to.
    for jwks in [jwks.clone(), Value::String(jwks.to_string())] {
        let mut p = plugin(json!({"jwks": jwks}));
        for (alg, kid) in [("RS256", "r1"), ("ES256", "e1"), ("HS256", "h1")] {
            accepted(&handshake(
                &mut p,
                &bearer(&token(alg, json!({"kid": kid}), claims())),
            ));
        }
        let unknown = handshake(
            &mut p,
            &bearer(&token("RS256", json!({"kid": "r2"}), claims())),
        );
        assert_eq!(refused(&unknown).1, "invalid token: unknown key id");
        // The kid picks the key: an RS256 token naming the EC key's kid finds no RS256 key.
        let wrong = handshake(
            &mut p,
            &bearer(&token("RS256", json!({"kid": "e1"}), claims())),
        );
        assert_eq!(refused(&wrong).0, 401);
    }
}

trait FromPrivate {
    fn from_pkcs1_pem_public(pem: &str) -> rsa::RsaPublicKey;
}

impl FromPrivate for rsa::RsaPublicKey {
    fn from_pkcs1_pem_public(pem: &str) -> rsa::RsaPublicKey {
        rsa::RsaPrivateKey::from_pkcs1_pem(pem)
            .unwrap()
            .to_public_key()
    }
}

#[test]
fn claims_reach_headers_and_metadata() {
    let mut p = plugin(json!({
        "secret": SECRET,
        "claims_to_headers": {"sub": "X-User-Id", "role": "x-role", "missing": "x-missing", "groups": "x-groups"},
        "claims_to_meta": ["sub", "role"],
    }));
    let mut c = claims();
    c["groups"] = json!(["a", "b"]);
    let conn = Conn::new(1);
    let req = bearer(&token("HS256", json!({}), c)).with_header("x-missing", "spoofed");
    let v = p.on_handshake(&conn, &req);
    let a = accepted(&v);
    assert_eq!(header(a, "x-user-id"), Some("alice"));
    assert_eq!(header(a, "x-role"), Some("admin"));
    assert_eq!(header(a, "x-groups"), Some("a,b"));
    // A claim the token lacks: the client's own header of that name is removed.
    assert_eq!(header(a, "x-missing"), None);
    assert!(a.remove_headers.contains(&"x-missing".to_string()));
    assert_eq!(conn.get_meta("sub").as_deref(), Some("alice"));
    assert_eq!(conn.get_meta("role").as_deref(), Some("admin"));
    assert_eq!(conn.get_meta(EXP_META), None);

    let mut renamed = plugin(json!({"secret": SECRET, "claims_to_meta": {"sub": "user"}}));
    let conn = Conn::new(2);
    renamed.on_handshake(&conn, &bearer(&token("HS256", json!({}), claims())));
    assert_eq!(conn.get_meta("user").as_deref(), Some("alice"));
}

#[test]
fn missing_token_is_401_without_error_code() {
    let mut p = plugin(json!({"secret": SECRET, "realm": "chat"}));
    let v = handshake(&mut p, &Request::new("/"));
    assert_eq!(
        refused(&v),
        (401, "missing bearer token", "Bearer realm=\"chat\"")
    );
    // Another auth scheme is not a bearer token.
    let basic = Request::new("/").with_header("authorization", "Basic YWxpY2U6cHc=");
    assert_eq!(
        refused(&handshake(&mut p, &basic)).1,
        "missing bearer token"
    );
    assert_eq!(
        wasmgate_sdk::testing::counter("jwt_auth_total", &[("result", "missing")]),
        2
    );
}

#[test]
fn invalid_tokens_are_401_invalid_token() {
    let mut p = plugin(json!({"secret": SECRET, "public_key": RSA_PUBLIC}));
    let good = token("HS256", json!({}), claims());
    let (head, rest) = good.split_once('.').unwrap();
    let tampered = format!(
        "{head}.{}.{}",
        b64(json!({"sub": "mallory", "exp": now() + 60})
            .to_string()
            .as_bytes()),
        rest.split_once('.').unwrap().1
    );
    let none = format!(
        "{}.{}.",
        b64(br#"{"alg":"none"}"#),
        b64(claims().to_string().as_bytes())
    );
    let es = token("ES256", json!({}), claims());
    let cases = [
        (
            "not-a-jwt",
            "malformed token: expected three dot-separated parts",
        ),
        (
            "a.b.c.d",
            "malformed token: expected three dot-separated parts",
        ),
        ("!!.e30.AA", "malformed token: header is not base64url"),
        (
            &format!("{}.e30.AA", b64(b"[1]")),
            "malformed token: header is not a JSON object",
        ),
        (&tampered, "signature does not verify"),
        (&none, "algorithm \"none\" is not accepted"),
        (&es, "algorithm \"ES256\" is not accepted"),
    ];
    for (token, why) in cases {
        let v = handshake(&mut p, &bearer(token));
        let (status, reason, challenge) = refused(&v);
        assert_eq!(
            (status, reason),
            (401, format!("invalid token: {why}").as_str()),
            "{token}"
        );
        assert!(
            challenge.starts_with(
                "Bearer realm=\"wasmgate\", error=\"invalid_token\", error_description=\""
            ),
            "{challenge}"
        );
    }
    // The challenge's description never breaks out of its quotes.
    let v = handshake(&mut p, &bearer(&none));
    assert_eq!(refused(&v).2, "Bearer realm=\"wasmgate\", error=\"invalid_token\", error_description=\"algorithm 'none' is not accepted\"");
}

#[test]
fn wrong_key_is_refused() {
    let mut p = plugin(json!({"public_key": RSA_OTHER_PUBLIC}));
    let v = handshake(&mut p, &bearer(&token("RS256", json!({}), claims())));
    assert_eq!(refused(&v).1, "invalid token: signature does not verify");
    // An HS256 token signed with the RSA public key as its secret gets nowhere.
    let input = format!(
        "{}.{}",
        b64(br#"{"alg":"HS256"}"#),
        b64(claims().to_string().as_bytes())
    );
    let mut mac = <Hmac<Sha256>>::new_from_slice(RSA_OTHER_PUBLIC.as_bytes()).unwrap();
    mac.update(input.as_bytes());
    let forged = format!("{input}.{}", b64(&mac.finalize().into_bytes()));
    assert_eq!(refused(&handshake(&mut p, &bearer(&forged))).0, 401);
}

#[test]
fn expiry_and_not_before_with_leeway() {
    let mut p = plugin(json!({"secret": SECRET, "leeway_secs": 30}));
    let at = |exp: i64, nbf: Option<i64>| {
        let mut c = json!({"sub": "a", "exp": now() + exp});
        if let Some(nbf) = nbf {
            c["nbf"] = json!(now() + nbf);
        }
        bearer(&token("HS256", json!({}), c))
    };
    accepted(&handshake(&mut p, &at(-10, None)));
    assert_eq!(
        refused(&handshake(&mut p, &at(-40, None))).1,
        "invalid token: token expired"
    );
    accepted(&handshake(&mut p, &at(60, Some(20))));
    assert_eq!(
        refused(&handshake(&mut p, &at(600, Some(40)))).1,
        "invalid token: token not valid yet (`nbf`)"
    );
    let no_exp = bearer(&token("HS256", json!({}), json!({"sub": "a"})));
    assert_eq!(
        refused(&handshake(&mut p, &no_exp)).1,
        "invalid token: token has no `exp`"
    );
    let mut lax = plugin(json!({"secret": SECRET, "require_exp": false}));
    accepted(&handshake(&mut lax, &no_exp));
    let text_exp = bearer(&token("HS256", json!({}), json!({"exp": "tomorrow"})));
    assert_eq!(
        refused(&handshake(&mut lax, &text_exp)).1,
        "invalid token: malformed token: `exp` is not a number"
    );
}

#[test]
fn issuer_audience_and_required_claims_are_403() {
    let mut p = plugin(json!({
        "secret": SECRET,
        "issuer": "https://issuer",
        "audience": ["chat", "admin"],
        "required_claims": ["sub"],
    }));
    accepted(&handshake(
        &mut p,
        &bearer(&token("HS256", json!({}), claims())),
    ));
    let with = |key: &str, value: Value| {
        let mut c = claims();
        match value {
            Value::Null => {
                c.as_object_mut().unwrap().remove(key);
            }
            v => c[key] = v,
        }
        bearer(&token("HS256", json!({}), c))
    };
    accepted(&handshake(&mut p, &with("aud", json!(["other", "admin"]))));
    let cases = [
        (
            with("aud", json!("other")),
            "forbidden: token audience is not accepted",
        ),
        (
            with("aud", json!(["x", "y"])),
            "forbidden: token audience is not accepted",
        ),
        (
            with("aud", Value::Null),
            "forbidden: token audience is not accepted",
        ),
        (
            with("iss", json!("https://evil")),
            "forbidden: token issuer is not accepted",
        ),
        (
            with("sub", Value::Null),
            "forbidden: token lacks claim `sub`",
        ),
    ];
    for (req, why) in cases {
        let v = handshake(&mut p, &req);
        let (status, reason, challenge) = refused(&v);
        assert_eq!((status, reason), (403, why));
        assert!(
            challenge.contains("error=\"insufficient_scope\""),
            "{challenge}"
        );
    }

    let mut roles = plugin(
        json!({"secret": SECRET, "required_claims": {"role": ["admin", "ops"], "scope": "chat"}}),
    );
    let mut c = claims();
    c["scope"] = json!(["read", "chat"]);
    accepted(&handshake(
        &mut roles,
        &bearer(&token("HS256", json!({}), c.clone())),
    ));
    c["role"] = json!("guest");
    let v = handshake(&mut roles, &bearer(&token("HS256", json!({}), c)));
    assert_eq!(refused(&v), (403, "forbidden: claim `role` has a value that is not accepted", "Bearer realm=\"wasmgate\", error=\"insufficient_scope\", error_description=\"claim `role` has a value that is not accepted\""));
}

#[test]
fn token_from_query_cookie_and_custom_header() {
    let t = token("ES256", json!({}), claims());
    let mut p = plugin(
        json!({"public_key": EC_PUBLIC, "token_query": "access_token", "token_cookie": "jwt"}),
    );
    accepted(&handshake(
        &mut p,
        &Request::new(&format!("/chat?x=1&access_token={t}")),
    ));
    accepted(&handshake(
        &mut p,
        &Request::new("/").with_header("cookie", &format!("a=b; jwt={t}")),
    ));
    // The header comes first: a bad header token is not rescued by a good query token.
    let both =
        Request::new(&format!("/?access_token={t}")).with_header("authorization", "Bearer x.y.z");
    assert_eq!(refused(&handshake(&mut p, &both)).0, 401);
    // Sources that are not configured are not looked at.
    let mut header_only = plugin(json!({"public_key": EC_PUBLIC}));
    assert_eq!(
        refused(&handshake(
            &mut header_only,
            &Request::new(&format!("/?access_token={t}"))
        ))
        .1,
        "missing bearer token"
    );

    let mut custom =
        plugin(json!({"public_key": EC_PUBLIC, "token_header": "X-Token", "strip_token": true}));
    for value in [t.clone(), format!("Bearer {t}")] {
        let v = handshake(
            &mut custom,
            &Request::new("/").with_header("x-token", &value),
        );
        assert_eq!(accepted(&v).remove_headers, vec!["x-token".to_string()]);
    }
    let mut keep = plugin(json!({"public_key": EC_PUBLIC}));
    assert!(accepted(&handshake(&mut keep, &bearer(&t)))
        .remove_headers
        .is_empty());
}

#[test]
fn token_from_subprotocol_offer() {
    let t = token("HS256", json!({}), claims());
    let mut p = plugin(json!({"secret": SECRET, "token_subprotocol": "bearer"}));
    let offer = |protocols: &[&str]| {
        let mut req = Request::new("/");
        req.subprotocols = protocols.iter().map(|p| p.to_string()).collect();
        req
    };
    // Only the marker and the token: the client gets the marker back, the upstream no offer.
    let v = handshake(&mut p, &offer(&["bearer", &t]));
    let a = accepted(&v);
    assert_eq!(a.subprotocol.as_deref(), Some("bearer"));
    assert_eq!(a.remove_headers, vec!["sec-websocket-protocol".to_string()]);
    // With real protocols: the upstream sees them without the token and chooses.
    let v = handshake(&mut p, &offer(&["chat.v2", "bearer", &t, "chat.v1"]));
    let a = accepted(&v);
    assert_eq!(a.subprotocol, None);
    assert_eq!(
        a.add_headers,
        vec![Header {
            name: "sec-websocket-protocol".into(),
            value: "chat.v2, chat.v1".into()
        }]
    );
    assert_eq!(
        refused(&handshake(&mut p, &offer(&["bearer"]))).1,
        "invalid token: subprotocol \"bearer\" must be followed by the token"
    );
    assert_eq!(
        refused(&handshake(&mut p, &offer(&["bearer", "junk"]))).0,
        401
    );
    assert_eq!(
        refused(&handshake(&mut p, &offer(&["chat.v1"]))).1,
        "missing bearer token"
    );
}

#[test]
fn close_on_expiry_declares_and_runs_the_message_hook() {
    assert_eq!(plugin(json!({"secret": SECRET})).hooks(), Hooks::HANDSHAKE);
    let mut p = plugin(json!({"secret": SECRET, "close_on_expiry": true, "leeway_secs": 0}));
    assert_eq!(p.hooks(), Hooks::HANDSHAKE | Hooks::MESSAGES);
    let conn = Conn::new(7);
    let exp = now() + 5;
    let c = json!({"sub": "a", "exp": exp});
    accepted(&p.on_handshake(&conn, &bearer(&token("HS256", json!({}), c))));
    assert_eq!(conn.get_meta(EXP_META), Some(exp.to_string()));
    let msg = |p: &mut JwtAuth| {
        p.on_message(&conn, &Message::text("hi"))
    };
    assert_eq!(msg(&mut p), Action::Forward);
    wasmgate_sdk::testing::advance_clock(6_000);
    assert_eq!(
        msg(&mut p),
        Action::Close(CloseFrame {
            code: 4001,
            reason: "token expired".into()
        })
    );
    // A connection this plugin did not authenticate has no expiry.
    assert_eq!(
        p.on_message(
            &Conn::new(8),
            &Message::new(Direction::UpstreamToClient, Opcode::Binary, vec![])
        ),
        Action::Forward
    );
}

#[test]
fn bad_config_is_refused() {
    let err = |config: Value| JwtAuth::from_json(&config.to_string()).err().unwrap();
    assert!(err(json!({})).starts_with("bad config: no key"));
    assert!(err(json!({"secret": "short"}))
        .starts_with("bad config: secret: an HS256 secret needs at least 32 bytes"));
    assert!(err(json!({"public_key": "nope"})).starts_with("bad config: public_key:"));
    assert!(
        err(json!({"keys": [{"secret": SECRET, "public_key": EC_PUBLIC}]}))
            .starts_with("bad config: keys[0]:")
    );
    assert!(err(json!({"keys": [{"alg": "RS256", "secret": SECRET}]}))
        .contains("does not fit a HS256 key"));
    assert!(err(json!({"secret": SECRET, "algorithms": ["HS512"]})).contains("not one of"));
    assert!(
        err(json!({"secret": SECRET, "algorithms": ["RS256"]})).starts_with("bad config: no key")
    );
    assert!(
        err(json!({"secret": SECRET, "claims_to_headers": {"sub": "x user"}}))
            .contains("not a header name")
    );
    assert!(
        err(json!({"secret": SECRET, "close_on_expiry": true, "require_exp": false}))
            .contains("needs require_exp")
    );
    assert!(err(json!({"secret": SECRET, "jwks": "{not json"}))
        .starts_with("bad config: jwks: not JSON"));
    assert!(err(json!({"secret": SECRET, "typo": 1})).starts_with("bad config: unknown field"));
    assert!(err(json!({"secret": SECRET, "realm": "a\"b"})).contains("realm"));
}

/// The verified-token cache: a token presented again is not verified again, and what the
/// cache keeps is only the signature's verdict.
mod verified_cache {
    use super::*;
    use wasmgate_sdk::testing::{advance_clock, counter};

    fn verified(cache: &str) -> u64 {
        counter("jwt_auth_verify_total", &[("cache", cache)])
    }

    #[test]
    fn a_token_presented_again_is_a_cache_hit_for_every_algorithm() {
        for alg in ["HS256", "RS256", "ES256"] {
            let mut p = plugin(json!({"secret": SECRET, "public_key": if alg == "ES256" { EC_PUBLIC } else { RSA_PUBLIC }}));
            let before = (verified("hit"), verified("miss"));
            let req = bearer(&token(alg, json!({}), claims()));
            let first = handshake(&mut p, &req);
            let second = handshake(&mut p, &req);
            assert_eq!(accepted(&first), accepted(&second), "{alg}: the same answer from the cache");
            assert_eq!((verified("hit") - before.0, verified("miss") - before.1), (1, 1), "{alg}");
            assert_eq!(p.verified.counts(), (1, 1));
        }
    }

    #[test]
    fn a_cached_token_still_expires_and_is_still_checked_against_the_route() {
        let mut p = plugin(json!({"secret": SECRET, "leeway_secs": 0, "audience": "chat"}));
        let mut c = claims();
        c["exp"] = json!(now() + 5);
        let req = bearer(&token("HS256", json!({}), c));
        accepted(&handshake(&mut p, &req));
        accepted(&handshake(&mut p, &req));
        advance_clock(6_000);
        assert_eq!(refused(&handshake(&mut p, &req)).1, "invalid token: token expired");
        assert_eq!(p.verified.len(), 0, "the expired entry is gone");

        // A good signature for the wrong audience is cached as verified, and refused every time.
        let mut other = claims();
        other["aud"] = json!("billing");
        let req = bearer(&token("HS256", json!({}), other));
        for _ in 0..2 {
            assert_eq!(refused(&handshake(&mut p, &req)).0, 403);
        }
    }

    #[test]
    fn a_copied_signature_on_another_payload_is_verified_in_full_and_refused() {
        let mut p = plugin(json!({"secret": SECRET}));
        let good = token("HS256", json!({}), claims());
        accepted(&handshake(&mut p, &bearer(&good)));
        let mut admin = claims();
        admin["sub"] = json!("mallory");
        let other = token("HS256", json!({}), admin);
        let (head, rest) = other.split_once('.').unwrap();
        let (body, _) = rest.split_once('.').unwrap();
        let sig = good.rsplit('.').next().unwrap();
        let forged = format!("{head}.{body}.{sig}");
        assert_eq!(
            refused(&handshake(&mut p, &bearer(&forged))).1,
            "invalid token: signature does not verify"
        );
    }

    #[test]
    fn bad_tokens_are_not_kept_and_the_cache_can_be_turned_off() {
        let mut p = plugin(json!({"secret": SECRET}));
        let mut bad = token("HS256", json!({}), claims());
        bad.push('A');
        for _ in 0..3 {
            assert_eq!(refused(&handshake(&mut p, &bearer(&bad))).0, 401);
        }
        assert_eq!(p.verified.len(), 0);

        let mut off = plugin(json!({"secret": SECRET, "verified_cache_size": 0}));
        let req = bearer(&token("HS256", json!({}), claims()));
        accepted(&handshake(&mut off, &req));
        accepted(&handshake(&mut off, &req));
        assert_eq!(off.verified.len(), 0);
    }

    #[test]
    fn the_cache_holds_at_most_its_size() {
        let mut p = plugin(json!({"secret": SECRET, "verified_cache_size": 3}));
        for i in 0..10 {
            let mut c = claims();
            c["sub"] = json!(format!("user{i}"));
            accepted(&handshake(&mut p, &bearer(&token("HS256", json!({}), c))));
        }
        assert_eq!(p.verified.len(), 3);
    }
}

/// RS256 and ES256 verdicts are shared between instances through kv; HS256 ones are not, and
/// a changed key set never meets an old verdict.
mod shared_cache {
    use super::*;
    use wasmgate_sdk::testing::counter;

    fn count(cache: &str) -> u64 {
        counter("jwt_auth_verify_total", &[("cache", cache)])
    }

    #[test]
    fn another_instance_takes_an_rs256_verdict_from_kv_but_verifies_hs256_itself() {
        let config = json!({"secret": SECRET, "public_key": RSA_PUBLIC});
        let (mut a, mut b) = (plugin(config.clone()), plugin(config));
        let rs = bearer(&token("RS256", json!({}), claims()));
        accepted(&handshake(&mut a, &rs));
        accepted(&handshake(&mut b, &rs));
        assert_eq!((count("miss"), count("shared")), (1, 1));
        let hs = bearer(&token("HS256", json!({}), claims()));
        accepted(&handshake(&mut a, &hs));
        accepted(&handshake(&mut b, &hs));
        assert_eq!((count("miss"), count("shared")), (3, 1));
    }

    #[test]
    fn a_new_key_set_does_not_see_verdicts_made_under_the_old_one() {
        let rs = bearer(&token("RS256", json!({}), claims()));
        accepted(&handshake(&mut plugin(json!({"public_key": RSA_PUBLIC})), &rs));
        // The key was rotated: the same plugin (same kv namespace) now trusts another key.
        let mut rotated = plugin(json!({"public_key": RSA_OTHER_PUBLIC}));
        assert_eq!(
            refused(&handshake(&mut rotated, &rs)).1,
            "invalid token: signature does not verify"
        );
        assert_eq!(count("shared"), 0);
    }

    #[test]
    fn a_shared_verdict_still_expires_and_is_checked_against_the_route() {
        let mut c = claims();
        c["exp"] = json!(now() + 5);
        let rs = bearer(&token("RS256", json!({}), c));
        let config = json!({"public_key": RSA_PUBLIC, "leeway_secs": 0, "audience": "chat"});
        accepted(&handshake(&mut plugin(config.clone()), &rs));
        wasmgate_sdk::testing::advance_clock(6_000);
        assert_eq!(
            refused(&handshake(&mut plugin(config), &rs)).1,
            "invalid token: token expired"
        );
        let mut strict = plugin(json!({"public_key": RSA_PUBLIC, "audience": "billing"}));
        let fresh = bearer(&token("RS256", json!({}), claims()));
        accepted(&handshake(&mut plugin(json!({"public_key": RSA_PUBLIC})), &fresh));
        assert_eq!(refused(&handshake(&mut strict, &fresh)).0, 403);
        assert_eq!(count("shared"), 1, "the audience check ran on the shared verdict");
    }
}

#[test]
fn accepts_are_kept_by_the_gateway_until_the_token_expires() {
    let mut p = plugin(json!({"secret": SECRET, "leeway_secs": 30, "token_query": "t"}));
    assert_eq!(
        wasmgate_sdk::testing::vary_on(),
        Some(vec!["authorization".to_string(), ":query".to_string()]),
        "the token's sources"
    );
    let exp = now() + 600;
    wasmgate_sdk::testing::kept_for();
    accepted(&handshake(&mut p, &bearer(&token("HS256", json!({}), json!({"sub": "a", "exp": exp})))));
    let kept = wasmgate_sdk::testing::kept_for().expect("an accept is kept");
    // Until exp plus the leeway, give or take the second the test took.
    let want = (exp + 30 - now()) as f64;
    assert!((kept.as_secs_f64() - want).abs() < 2.0, "{kept:?} against {want} s");
    // Refusals are not.
    refused(&handshake(&mut p, &bearer("not.a.token")));
    assert_eq!(wasmgate_sdk::testing::kept_for(), None);
}

#[test]
fn without_its_cache_jwt_auth_asks_the_gateway_to_keep_nothing() {
    let mut p = plugin(json!({"secret": SECRET, "verified_cache_size": 0}));
    assert_eq!(wasmgate_sdk::testing::vary_on(), None);
    accepted(&handshake(&mut p, &bearer(&token("HS256", json!({}), json!({"sub": "a", "exp": now() + 600})))));
    assert_eq!(wasmgate_sdk::testing::kept_for(), None);
}
