//! JSON Web Token authentication for WebSocket upgrades: HS256, RS256 and ES256 tokens from
//! the `Authorization` header, a query parameter, a cookie or the `Sec-WebSocket-Protocol`
//! offer; `exp`, `nbf`, `iss`, `aud` and required claims checked; chosen claims passed to
//! the upstream as headers and to later plugins as connection metadata; optionally, a live
//! connection closed with 4001 once its token expires. See README.md for the config.

mod cache;
mod keys;

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::{Map, Value};
use wasmgate_sdk::{
    Accept, Action, CloseFrame, Conn, Hooks, Message, Plugin, Reject, Request, Verdict,
};

use cache::{Claims, VerifiedTokens, NO_EXP_KEEP_SECS};
use keys::{b64url, Alg, Key};

/// Metadata key holding the token's `exp` (seconds since the epoch) when
/// `close_on_expiry` is on.
pub const EXP_META: &str = "jwt-exp";
/// The close code for a connection whose token expired (4000-4999: for applications).
pub const EXPIRED_CLOSE_CODE: u16 = 4001;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// An HS256 secret (UTF-8 text, at least 32 bytes).
    secret: Option<String>,
    /// An RS256 or ES256 public key, PEM.
    public_key: Option<String>,
    /// More keys, each with an optional `kid`.
    #[serde(default)]
    keys: Vec<KeyConfig>,
    /// A JWKS document: the object itself, or its JSON text (what `${file:...}` gives).
    jwks: Option<Value>,
    /// Accepted algorithms; default: every algorithm of the configured keys.
    algorithms: Option<Vec<String>>,
    issuer: Option<OneOrMany>,
    audience: Option<OneOrMany>,
    #[serde(default)]
    required_claims: RequiredClaims,
    #[serde(default = "defaults::leeway_secs")]
    leeway_secs: u64,
    #[serde(default = "defaults::yes")]
    require_exp: bool,
    #[serde(default = "defaults::token_header")]
    token_header: String,
    token_query: Option<String>,
    token_cookie: Option<String>,
    token_subprotocol: Option<String>,
    #[serde(default)]
    strip_token: bool,
    #[serde(default)]
    claims_to_headers: BTreeMap<String, String>,
    #[serde(default)]
    claims_to_meta: ClaimsToMeta,
    #[serde(default)]
    close_on_expiry: bool,
    #[serde(default = "defaults::realm")]
    realm: String,
    /// Tokens whose signature verified, kept per instance so a reconnect skips the check;
    /// above 0 the gateway also keeps this plugin's accepts (`verdicts`), so a reconnect
    /// with the same token does not call the plugin at all.
    #[serde(default = "defaults::verified_cache_size")]
    verified_cache_size: usize,
}

mod defaults {
    pub fn leeway_secs() -> u64 {
        60
    }
    pub fn yes() -> bool {
        true
    }
    pub fn token_header() -> String {
        "authorization".into()
    }
    pub fn realm() -> String {
        "wasmgate".into()
    }
    pub fn verified_cache_size() -> usize {
        10_000
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyConfig {
    kid: Option<String>,
    /// If given, must be the key's algorithm (HS256 for a secret, RS256 or ES256 for a PEM).
    alg: Option<String>,
    secret: Option<String>,
    public_key: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

/// `["sub", "role"]` (present) or `{ role = "admin", scope = ["a", "b"] }` (present, with
/// one of the given values).
#[derive(Deserialize)]
#[serde(untagged)]
enum RequiredClaims {
    Present(Vec<String>),
    Values(BTreeMap<String, Value>),
}

impl Default for RequiredClaims {
    fn default() -> Self {
        RequiredClaims::Present(Vec::new())
    }
}

/// `["sub", "role"]` (metadata key = claim name) or `{ sub = "user" }` (claim → key).
#[derive(Deserialize)]
#[serde(untagged)]
enum ClaimsToMeta {
    Same(Vec<String>),
    Renamed(BTreeMap<String, String>),
}

impl Default for ClaimsToMeta {
    fn default() -> Self {
        ClaimsToMeta::Same(Vec::new())
    }
}

/// A required claim and the values it may take (any value when empty).
struct Required {
    claim: String,
    one_of: Vec<Value>,
}

pub struct JwtAuth {
    keys: Vec<Key>,
    issuers: Vec<String>,
    audiences: Vec<String>,
    required: Vec<Required>,
    leeway_secs: f64,
    require_exp: bool,
    token_header: String,
    token_query: Option<String>,
    token_cookie: Option<String>,
    token_subprotocol: Option<String>,
    strip_token: bool,
    claims_to_headers: Vec<(String, String)>,
    claims_to_meta: Vec<(String, String)>,
    close_on_expiry: bool,
    realm: String,
    verified: VerifiedTokens,
    /// The gateway keeps our accepts (see `vary_on`).
    keep_verdicts: bool,
    /// The kv key prefix of verdicts shared by all instances, for RS256 and ES256 tokens; it
    /// names the public keys, so a changed key set never meets an old verdict.
    shared_prefix: Option<String>,
}

/// Why a handshake is refused.
#[derive(Debug, PartialEq)]
enum Refusal {
    /// No token anywhere: 401 without an error code (RFC 6750 §3.1).
    Missing,
    /// Malformed, unverifiable, expired or not yet valid: 401 `invalid_token`.
    Invalid(String),
    /// A good token that this route does not accept (issuer, audience, claims): 403.
    Forbidden(String),
}

/// Where the token was found, for what the upstream request must not carry on.
enum Source {
    Header,
    Subprotocol { rest: Vec<String> },
    Other,
}

impl Plugin for JwtAuth {
    type Config = Config;
    /// Every hook the type has; `hooks()` drops `messages` unless `close_on_expiry` is on.
    const HOOKS: Hooks = Hooks::HANDSHAKE.union(Hooks::MESSAGES);

    fn new(config: Config) -> Result<Self, String> {
        let bad = |what: String| format!("bad config: {what}");
        let mut keys = Vec::new();
        if let Some(secret) = &config.secret {
            keys.push(Key::secret(None, secret).map_err(|e| bad(format!("secret: {e}")))?);
        }
        if let Some(pem) = &config.public_key {
            keys.push(Key::public_pem(None, pem).map_err(|e| bad(format!("public_key: {e}")))?);
        }
        for (i, k) in config.keys.into_iter().enumerate() {
            let key = match (&k.secret, &k.public_key) {
                (Some(secret), None) => Key::secret(k.kid.clone(), secret),
                (None, Some(pem)) => Key::public_pem(k.kid.clone(), pem),
                _ => Err("give exactly one of `secret` and `public_key`".into()),
            }
            .map_err(|e| bad(format!("keys[{i}]: {e}")))?;
            if let Some(alg) = &k.alg {
                if Alg::parse(alg) != Some(key.alg()) {
                    return Err(bad(format!(
                        "keys[{i}]: alg {alg:?} does not fit a {} key",
                        key.alg().name()
                    )));
                }
            }
            keys.push(key);
        }
        if let Some(jwks) = config.jwks {
            let jwks = match jwks {
                Value::String(text) => {
                    serde_json::from_str(&text).map_err(|e| bad(format!("jwks: not JSON: {e}")))?
                }
                other => other,
            };
            keys.extend(keys::from_jwks(&jwks).map_err(|e| bad(format!("jwks: {e}")))?);
        }
        if let Some(allowed) = &config.algorithms {
            let allowed: Vec<Alg> = allowed
                .iter()
                .map(|a| {
                    Alg::parse(a).ok_or_else(|| {
                        bad(format!(
                            "algorithms: {a:?} is not one of HS256, RS256, ES256"
                        ))
                    })
                })
                .collect::<Result<_, _>>()?;
            keys.retain(|k| allowed.contains(&k.alg()));
        }
        if keys.is_empty() {
            return Err(bad(
                "no key: give `secret`, `public_key`, `keys` or `jwks` (of an allowed algorithm)"
                    .into(),
            ));
        }

        let required = match config.required_claims {
            RequiredClaims::Present(names) => names
                .into_iter()
                .map(|claim| Required {
                    claim,
                    one_of: Vec::new(),
                })
                .collect(),
            RequiredClaims::Values(map) => map
                .into_iter()
                .map(|(claim, v)| Required {
                    claim,
                    one_of: match v {
                        Value::Array(values) => values,
                        value => vec![value],
                    },
                })
                .collect(),
        };
        let mut claims_to_headers = Vec::new();
        for (claim, header) in config.claims_to_headers {
            if !is_token(&header) {
                return Err(bad(format!(
                    "claims_to_headers: {header:?} is not a header name"
                )));
            }
            claims_to_headers.push((claim, header.to_ascii_lowercase()));
        }
        let claims_to_meta = match config.claims_to_meta {
            ClaimsToMeta::Same(names) => names.into_iter().map(|n| (n.clone(), n)).collect(),
            ClaimsToMeta::Renamed(map) => map.into_iter().collect(),
        };
        if !is_token(&config.token_header) {
            return Err(bad(format!(
                "token_header: {:?} is not a header name",
                config.token_header
            )));
        }
        if let Some(p) = config.token_subprotocol.as_deref().filter(|p| !is_token(p)) {
            return Err(bad(format!(
                "token_subprotocol: {p:?} is not a subprotocol name"
            )));
        }
        if config.close_on_expiry && !config.require_exp {
            return Err(bad("close_on_expiry needs require_exp".into()));
        }
        if config.realm.contains(['"', '\\']) {
            return Err(bad("realm: no quotes or backslashes".into()));
        }
        let shared_prefix = cache::shared_prefix(&keys);
        let keep_verdicts = config.verified_cache_size > 0;
        if keep_verdicts {
            vary_on(&config.token_header, config.token_subprotocol.is_some(), config.token_query.is_some(), config.token_cookie.is_some());
        }
        Ok(JwtAuth {
            keep_verdicts,
            shared_prefix,
            keys,
            issuers: config.issuer.map(OneOrMany::into_vec).unwrap_or_default(),
            audiences: config.audience.map(OneOrMany::into_vec).unwrap_or_default(),
            required,
            leeway_secs: config.leeway_secs as f64,
            require_exp: config.require_exp,
            token_header: config.token_header.to_ascii_lowercase(),
            token_query: config.token_query,
            token_cookie: config.token_cookie,
            token_subprotocol: config.token_subprotocol,
            strip_token: config.strip_token,
            claims_to_headers,
            claims_to_meta,
            close_on_expiry: config.close_on_expiry,
            realm: config.realm,
            verified: VerifiedTokens::new(config.verified_cache_size),
        })
    }

    fn hooks(&self) -> Hooks {
        if self.close_on_expiry {
            Hooks::HANDSHAKE.union(Hooks::MESSAGES)
        } else {
            Hooks::HANDSHAKE
        }
    }

    fn on_handshake(&mut self, conn: &Conn, req: &Request) -> Verdict {
        match self.authenticate(conn, req) {
            Ok(accept) => {
                wasmgate_sdk::metrics::counter_add("jwt_auth_total", &[("result", "accepted")], 1);
                accept.into()
            }
            Err(refusal) => {
                let (result, verdict) = self.refuse(&refusal);
                wasmgate_sdk::metrics::counter_add("jwt_auth_total", &[("result", result)], 1);
                wasmgate_sdk::debug!("refused {}: {:?}", req.client_ip(), refusal);
                verdict
            }
        }
    }

    fn on_message(&mut self, conn: &Conn, _: &Message) -> Action {
        let Some(exp) = conn.get_meta(EXP_META).and_then(|e| e.parse::<f64>().ok()) else {
            return Action::Forward;
        };
        if now_secs() >= exp + self.leeway_secs {
            wasmgate_sdk::metrics::counter_add("jwt_auth_total", &[("result", "expired_live")], 1);
            return Action::Close(CloseFrame {
                code: EXPIRED_CLOSE_CODE,
                reason: "token expired".into(),
            });
        }
        Action::Forward
    }
}

impl JwtAuth {
    fn authenticate(&mut self, conn: &Conn, req: &Request) -> Result<Accept, Refusal> {
        let (token, source) = self.find_token(req)?;
        let claims = self.verify(&token)?;
        self.check_claims(&claims)?;
        if self.keep_verdicts {
            // Good until the token expires, as the check above would find; the gateway
            // gives the same answer to the same token without calling us until then.
            let left = match claims.get("exp").and_then(Value::as_f64) {
                Some(exp) => exp + self.leeway_secs - now_secs(),
                None => NO_EXP_KEEP_SECS,
            };
            if left > 0.0 {
                wasmgate_sdk::verdicts::keep(std::time::Duration::try_from_secs_f64(left).unwrap_or(std::time::Duration::MAX));
            }
        }

        let mut accept = Accept::default();
        for (claim, header) in &self.claims_to_headers {
            // A client must not be able to send its own value for a claim header.
            accept = match claims.get(claim).and_then(header_value) {
                Some(value) => accept.add_header(header, &value),
                None => accept.remove_header(header),
            };
        }
        for (claim, key) in &self.claims_to_meta {
            if let Some(value) = claims.get(claim).and_then(header_value) {
                conn.set_meta(key, &value);
            }
        }
        if self.close_on_expiry {
            if let Some(exp) = claims.get("exp").and_then(Value::as_f64) {
                conn.set_meta(EXP_META, &exp.to_string());
            }
        }
        match source {
            Source::Header if self.strip_token => accept = accept.remove_header(&self.token_header),
            Source::Subprotocol { rest } => {
                // The token is no protocol: the upstream sees only the real offers, and a
                // client that offered none gets the marker back so its handshake succeeds.
                let marker = self.token_subprotocol.as_deref().unwrap_or_default();
                if rest.is_empty() {
                    accept = accept
                        .remove_header("sec-websocket-protocol")
                        .subprotocol(marker);
                } else {
                    accept = accept.add_header("sec-websocket-protocol", &rest.join(", "));
                }
            }
            _ => {}
        }
        Ok(accept)
    }

    /// The token from the first source that has one: the header, the subprotocol offer,
    /// the query parameter, the cookie.
    fn find_token(&self, req: &Request) -> Result<(String, Source), Refusal> {
        if let Some(value) = req.header(&self.token_header) {
            let value = value.trim();
            if self.token_header == "authorization" {
                match value.split_once(' ') {
                    Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => {
                        return Ok((token.trim().to_string(), Source::Header));
                    }
                    // Another scheme (Basic, ...) is not ours; look elsewhere.
                    _ => {}
                }
            } else if !value.is_empty() {
                let token = match value.split_once(' ') {
                    Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => token.trim(),
                    _ => value,
                };
                return Ok((token.to_string(), Source::Header));
            }
        }
        if let Some(marker) = &self.token_subprotocol {
            let offers = &req.subprotocols;
            if let Some(at) = offers.iter().position(|p| p == marker) {
                let token = offers.get(at + 1).ok_or_else(|| {
                    Refusal::Invalid(format!(
                        "subprotocol {marker:?} must be followed by the token"
                    ))
                })?;
                let rest = offers
                    .iter()
                    .enumerate()
                    .filter(|&(i, _)| i != at && i != at + 1)
                    .map(|(_, p)| p.clone())
                    .collect();
                return Ok((token.clone(), Source::Subprotocol { rest }));
            }
        }
        if let Some(token) = self.token_query.as_deref().and_then(|q| req.query_param(q)) {
            if !token.is_empty() {
                return Ok((token, Source::Other));
            }
        }
        if let Some(token) = self.token_cookie.as_deref().and_then(|c| req.cookie(c)) {
            if !token.is_empty() {
                return Ok((token.to_string(), Source::Other));
            }
        }
        Err(Refusal::Missing)
    }

    /// Checks the token's form, signature and validity period; returns its claims. A token
    /// whose signature verified before is taken from the cache; its times are checked anew.
    fn verify(&mut self, token: &str) -> Result<Claims, Refusal> {
        let now = now_secs();
        let claims = match self.verified.get(token, now) {
            Some(claims) => {
                wasmgate_sdk::metrics::counter_add("jwt_auth_verify_total", &[("cache", "hit")], 1);
                claims
            }
            None => {
                // Another instance of this plugin may have verified it (RS256 and ES256 only:
                // an HMAC check costs less than the lookup).
                let shared = self
                    .shared_prefix
                    .as_deref()
                    .filter(|_| self.verified.keeps(token) && is_asymmetric(token))
                    .map(|prefix| cache::shared_key(prefix, token));
                let (claims, payload, outcome) = match shared.as_deref().and_then(wasmgate_sdk::kv::get) {
                    Some(payload) => (parse_payload(&payload)?, payload, "shared"),
                    None => {
                        let (claims, payload) = self.verify_signature(token)?;
                        (claims, payload, "miss")
                    }
                };
                let keep_until = match claims.get("exp") {
                    None => now + NO_EXP_KEEP_SECS,
                    // A malformed `exp` is refused below; keep nothing for it.
                    Some(exp) => exp.as_f64().map_or(now, |exp| exp + self.leeway_secs),
                };
                if let (Some(shared), "miss") = (&shared, outcome) {
                    if keep_until > now {
                        let ttl_ms = ((keep_until - now) * 1000.0) as u64;
                        // A full share only means the next instance verifies it again.
                        let _ = wasmgate_sdk::kv::set(shared, &payload, Some(ttl_ms));
                    }
                }
                let claims = Claims::new(claims);
                self.verified.insert(token, claims.clone(), keep_until, now);
                wasmgate_sdk::metrics::counter_add("jwt_auth_verify_total", &[("cache", outcome)], 1);
                claims
            }
        };
        self.check_times(&claims, now)?;
        Ok(claims)
    }

    /// Checks the token's form and signature; returns its claims and its decoded payload.
    fn verify_signature(&self, token: &str) -> Result<(Map<String, Value>, Vec<u8>), Refusal> {
        let invalid = |why: &str| Refusal::Invalid(why.to_string());
        let mut parts = token.split('.');
        let (Some(head), Some(body), Some(sig), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(invalid(
                "malformed token: expected three dot-separated parts",
            ));
        };
        let decode = |part: &str, what: &str| -> Result<Vec<u8>, Refusal> {
            b64url(part).ok_or_else(|| invalid(&format!("malformed token: {what} is not base64url")))
        };
        let header = json_object(&decode(head, "header")?, "header")?;
        let payload = decode(body, "payload")?;
        let claims = parse_payload(&payload)?;
        let signature =
            b64url(sig).ok_or_else(|| invalid("malformed token: signature is not base64url"))?;

        let alg_name = header.get("alg").and_then(Value::as_str).unwrap_or("");
        let alg = Alg::parse(alg_name)
            .filter(|a| self.keys.iter().any(|k| k.alg() == *a))
            .ok_or_else(|| invalid(&format!("algorithm {alg_name:?} is not accepted")))?;
        let kid = header.get("kid").and_then(Value::as_str);
        let candidates: Vec<&Key> = self
            .keys
            .iter()
            .filter(|k| k.alg() == alg)
            .filter(|k| match (kid, &k.kid) {
                (Some(want), Some(have)) => want == have,
                _ => true,
            })
            .collect();
        if candidates.is_empty() {
            return Err(invalid("unknown key id"));
        }
        let input = &token.as_bytes()[..head.len() + 1 + body.len()];
        if !candidates.iter().any(|k| k.verify(input, &signature)) {
            return Err(invalid("signature does not verify"));
        }
        Ok((claims, payload))
    }

    /// `exp` (required unless `require_exp = false`) and `nbf`, with the leeway.
    fn check_times(&self, claims: &Map<String, Value>, now: f64) -> Result<(), Refusal> {
        let invalid = |why: &str| Refusal::Invalid(why.to_string());
        let time = |name: &str| -> Result<Option<f64>, Refusal> {
            match claims.get(name) {
                None => Ok(None),
                Some(v) => v
                    .as_f64()
                    .map(Some)
                    .ok_or_else(|| invalid(&format!("malformed token: `{name}` is not a number"))),
            }
        };
        match time("exp")? {
            Some(exp) if now >= exp + self.leeway_secs => return Err(invalid("token expired")),
            None if self.require_exp => return Err(invalid("token has no `exp`")),
            _ => {}
        }
        if let Some(nbf) = time("nbf")? {
            if now + self.leeway_secs < nbf {
                return Err(invalid("token not valid yet (`nbf`)"));
            }
        }
        Ok(())
    }

    /// Issuer, audience and required claims: what makes a good token right for this route.
    fn check_claims(&self, claims: &Map<String, Value>) -> Result<(), Refusal> {
        if !self.issuers.is_empty() {
            let iss = claims.get("iss").and_then(Value::as_str);
            if !iss.is_some_and(|iss| self.issuers.iter().any(|i| i == iss)) {
                return Err(Refusal::Forbidden("token issuer is not accepted".into()));
            }
        }
        if !self.audiences.is_empty() {
            let accepted = |a: &Value| {
                a.as_str()
                    .is_some_and(|a| self.audiences.iter().any(|x| x == a))
            };
            let ok = match claims.get("aud") {
                Some(Value::Array(list)) => list.iter().any(accepted),
                Some(aud) => accepted(aud),
                None => false,
            };
            if !ok {
                return Err(Refusal::Forbidden("token audience is not accepted".into()));
            }
        }
        for Required { claim, one_of } in &self.required {
            let Some(value) = claims.get(claim).filter(|v| !v.is_null()) else {
                return Err(Refusal::Forbidden(format!("token lacks claim `{claim}`")));
            };
            let matches = |want: &Value| match value {
                Value::Array(have) => have.contains(want),
                have => have == want,
            };
            if !one_of.is_empty() && !one_of.iter().any(matches) {
                return Err(Refusal::Forbidden(format!(
                    "claim `{claim}` has a value that is not accepted"
                )));
            }
        }
        Ok(())
    }

    /// The verdict for a refusal and its metrics label.
    fn refuse(&self, refusal: &Refusal) -> (&'static str, Verdict) {
        let realm = &self.realm;
        let (label, status, reason, challenge) = match refusal {
            Refusal::Missing => ("missing", 401, "missing bearer token".to_string(), format!("Bearer realm=\"{realm}\"")),
            Refusal::Invalid(why) => (
                "invalid",
                401,
                format!("invalid token: {why}"),
                format!("Bearer realm=\"{realm}\", error=\"invalid_token\", error_description=\"{}\"", quoted(why)),
            ),
            Refusal::Forbidden(why) => (
                "forbidden",
                403,
                format!("forbidden: {why}"),
                format!("Bearer realm=\"{realm}\", error=\"insufficient_scope\", error_description=\"{}\"", quoted(why)),
            ),
        };
        let reject = Reject::new(status, &reason).header("www-authenticate", &challenge);
        (label, reject.into())
    }
}

/// Whether the token's header names RS256 or ES256 (only a hint for where to look: the
/// signature is what decides).
fn is_asymmetric(token: &str) -> bool {
    let header = token.split('.').next().and_then(b64url);
    let alg = header.and_then(|h| json_object(&h, "header").ok()).and_then(|h| {
        h.get("alg").and_then(Value::as_str).and_then(Alg::parse)
    });
    matches!(alg, Some(Alg::Rs256 | Alg::Es256))
}

/// A token's decoded payload as its claims.
fn parse_payload(payload: &[u8]) -> Result<Map<String, Value>, Refusal> {
    json_object(payload, "payload")
}

fn json_object(bytes: &[u8], what: &str) -> Result<Map<String, Value>, Refusal> {
    match serde_json::from_slice(bytes) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err(Refusal::Invalid(format!(
            "malformed token: {what} is not a JSON object"
        ))),
    }
}

/// Seconds since the Unix epoch, from the host's clock.
/// Tells the gateway what an accept depends on: the token's sources. Everything else in
/// the answer (headers from claims, metadata, the subprotocol) follows from the token.
fn vary_on(token_header: &str, subprotocol: bool, query: bool, cookie: bool) {
    let header = token_header.to_ascii_lowercase();
    let mut parts = vec![header.as_str()];
    if subprotocol {
        parts.push("sec-websocket-protocol");
    }
    if query {
        parts.push(":query");
    }
    if cookie {
        parts.push("cookie");
    }
    wasmgate_sdk::verdicts::vary_on(&parts);
}

fn now_secs() -> f64 {
    wasmgate_sdk::now_ms() as f64 / 1000.0
}

/// A claim as header or metadata text: strings as they are, arrays of strings joined with
/// commas, anything else as JSON.
fn header_value(value: &Value) -> Option<String> {
    let text = match value {
        Value::Null => return None,
        Value::String(s) => s.clone(),
        Value::Array(items) if items.iter().all(Value::is_string) => items
            .iter()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
            .join(","),
        other => other.to_string(),
    };
    // Header values cannot carry control characters; such a claim is not passed on.
    (!text.bytes().any(|b| b.is_ascii_control())).then_some(text)
}

/// Text safe inside a quoted-string of an auth-param (RFC 6750 allows no `"` or `\`).
fn quoted(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c == '"' || c == '\\' || c.is_control() {
                '\''
            } else {
                c
            }
        })
        .collect()
}

/// An HTTP token (RFC 9110): what header names and subprotocols are made of.
fn is_token(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

wasmgate_sdk::export_plugin!(JwtAuth);

#[cfg(test)]
mod tests;
