//! Verification keys: HMAC secrets, RSA and P-256 public keys, from PEM, inline config or a
//! JWKS document, and the signature checks of HS256, RS256 and ES256.
//!
//! Each key is bound to the one algorithm its type allows (a secret to HS256, an RSA key to
//! RS256, a P-256 key to ES256), so a token cannot pick how its signature is checked
//! (no `alg: none`, no RS256 key used as an HMAC secret).

use base64::Engine;
use hmac::{Hmac, Mac};
use p256::ecdsa::signature::Verifier;
use p256::pkcs8::DecodePublicKey as _;
use rsa::pkcs1::DecodeRsaPublicKey;
use rsa::traits::PublicKeyParts;
use rsa::{BigUint, Pkcs1v15Sign, RsaPublicKey};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// RSA keys shorter than this are refused (NIST SP 800-131A).
pub const MIN_RSA_BITS: usize = 2048;

/// The signature algorithms this plugin verifies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Alg {
    Hs256,
    Rs256,
    Es256,
}

impl Alg {
    pub fn parse(name: &str) -> Option<Alg> {
        match name {
            "HS256" => Some(Alg::Hs256),
            "RS256" => Some(Alg::Rs256),
            "ES256" => Some(Alg::Es256),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Alg::Hs256 => "HS256",
            Alg::Rs256 => "RS256",
            Alg::Es256 => "ES256",
        }
    }
}

enum Material {
    /// Keyed once: the inner and outer pads are hashed when the key loads, so a check
    /// clones the state instead of hashing two blocks of key again (RFC 2104).
    Hmac(Hmac<Sha256>),
    Rsa(RsaPublicKey),
    Ec(p256::ecdsa::VerifyingKey),
}

/// One verification key, optionally named by a key id.
pub struct Key {
    pub kid: Option<String>,
    material: Material,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Key({:?}, {})", self.kid, self.alg().name())
    }
}

impl Key {
    /// An HS256 key; the secret is used as its UTF-8 bytes.
    pub fn secret(kid: Option<String>, secret: &str) -> Result<Key, String> {
        Key::secret_bytes(kid, secret.as_bytes().to_vec())
    }

    fn secret_bytes(kid: Option<String>, secret: Vec<u8>) -> Result<Key, String> {
        // RFC 7518 §3.2: a key at least as long as the hash output.
        if secret.len() < 32 {
            return Err(format!(
                "an HS256 secret needs at least 32 bytes, this one has {}",
                secret.len()
            ));
        }
        let mac = <Hmac<Sha256>>::new_from_slice(&secret).expect("HMAC takes any key length");
        Ok(Key {
            kid,
            material: Material::Hmac(mac),
        })
    }

    /// An RS256 or ES256 key from a PEM public key: `BEGIN PUBLIC KEY` (SPKI, RSA or P-256)
    /// or `BEGIN RSA PUBLIC KEY` (PKCS#1).
    pub fn public_pem(kid: Option<String>, pem: &str) -> Result<Key, String> {
        let pem = pem.trim();
        let material = if pem.starts_with("-----BEGIN RSA PUBLIC KEY-----") {
            let key = RsaPublicKey::from_pkcs1_pem(pem)
                .map_err(|e| format!("bad RSA public key: {e}"))?;
            Material::Rsa(key)
        } else if pem.starts_with("-----BEGIN PUBLIC KEY-----") {
            if let Ok(key) = RsaPublicKey::from_public_key_pem(pem) {
                Material::Rsa(key)
            } else {
                let key = p256::ecdsa::VerifyingKey::from_public_key_pem(pem)
                    .map_err(|_| "neither an RSA nor a P-256 public key".to_string())?;
                Material::Ec(key)
            }
        } else {
            return Err("expected a PEM public key (-----BEGIN PUBLIC KEY----- or -----BEGIN RSA PUBLIC KEY-----)".into());
        };
        Key::checked(kid, material)
    }

    /// A key from one JWK (RFC 7517). `Ok(None)` for a key this plugin does not use: one
    /// for encryption, or of an algorithm other than HS256, RS256 and ES256.
    pub fn from_jwk(jwk: &Map<String, Value>) -> Result<Option<Key>, String> {
        let text = |name: &str| jwk.get(name).and_then(Value::as_str);
        let kid = text("kid").map(str::to_string);
        if text("use").is_some_and(|u| u != "sig") {
            return Ok(None);
        }
        let field = |name: &str| -> Result<Vec<u8>, String> {
            let value = text(name).ok_or_else(|| format!("`{name}` is missing"))?;
            b64url(value).ok_or_else(|| format!("`{name}` is not base64url"))
        };
        let alg = match (text("kty"), text("crv")) {
            (Some("oct"), _) => Alg::Hs256,
            (Some("RSA"), _) => Alg::Rs256,
            (Some("EC"), Some("P-256")) => Alg::Es256,
            _ => return Ok(None),
        };
        if text("alg").is_some_and(|a| a != alg.name()) {
            return Ok(None);
        }
        let material = match text("kty") {
            Some("oct") => return Key::secret_bytes(kid, field("k")?).map(Some),
            Some("RSA") => {
                let n = BigUint::from_bytes_be(&field("n")?);
                let e = BigUint::from_bytes_be(&field("e")?);
                let key = RsaPublicKey::new(n, e).map_err(|e| format!("bad RSA key: {e}"))?;
                Material::Rsa(key)
            }
            _ => {
                let (x, y) = (field("x")?, field("y")?);
                if x.len() != 32 || y.len() != 32 {
                    return Err("P-256 coordinates must be 32 bytes".into());
                }
                let point = p256::EncodedPoint::from_affine_coordinates(
                    x.as_slice().into(),
                    y.as_slice().into(),
                    false,
                );
                let key = p256::ecdsa::VerifyingKey::from_encoded_point(&point)
                    .map_err(|_| "the point is not on P-256".to_string())?;
                Material::Ec(key)
            }
        };
        Key::checked(kid, material).map(Some)
    }

    fn checked(kid: Option<String>, material: Material) -> Result<Key, String> {
        if let Material::Rsa(key) = &material {
            let bits = key.n().bits();
            if bits < MIN_RSA_BITS {
                return Err(format!(
                    "RSA keys need at least {MIN_RSA_BITS} bits, this one has {bits}"
                ));
            }
        }
        Ok(Key { kid, material })
    }

    /// The one algorithm this key verifies.
    pub fn alg(&self) -> Alg {
        match self.material {
            Material::Hmac(_) => Alg::Hs256,
            Material::Rsa(_) => Alg::Rs256,
            Material::Ec(_) => Alg::Es256,
        }
    }

    /// Feeds what identifies a public key (its id, algorithm and numbers) into `hasher`;
    /// secrets feed nothing, so their verdicts are never shared (see `cache`).
    pub fn identify_public(&self, hasher: &mut Sha256) {
        let material: Vec<u8> = match &self.material {
            Material::Hmac(_) => return,
            Material::Rsa(key) => [key.n().to_bytes_be(), key.e().to_bytes_be()].concat(),
            Material::Ec(key) => key.to_encoded_point(false).as_bytes().to_vec(),
        };
        for part in [self.kid.as_deref().unwrap_or("").as_bytes(), self.alg().name().as_bytes(), &material] {
            hasher.update((part.len() as u64).to_le_bytes());
            hasher.update(part);
        }
    }

    /// Whether `signature` signs `input` under this key.
    pub fn verify(&self, input: &[u8], signature: &[u8]) -> bool {
        match &self.material {
            Material::Hmac(keyed) => {
                let mut mac = keyed.clone();
                mac.update(input);
                mac.verify_slice(signature).is_ok()
            }
            Material::Rsa(key) => {
                let digest = Sha256::digest(input);
                key.verify(Pkcs1v15Sign::new::<Sha256>(), &digest, signature)
                    .is_ok()
            }
            Material::Ec(key) => {
                // JWS carries ES256 signatures as r || s, 32 bytes each (RFC 7518 §3.4).
                match p256::ecdsa::Signature::from_slice(signature) {
                    Ok(sig) if signature.len() == 64 => key.verify(input, &sig).is_ok(),
                    _ => false,
                }
            }
        }
    }
}

/// The keys of a JWKS document (`{"keys": [...]}`). Keys of other types or algorithms are
/// skipped; a document with none usable is an error.
pub fn from_jwks(jwks: &Value) -> Result<Vec<Key>, String> {
    let list = jwks
        .get("keys")
        .and_then(Value::as_array)
        .ok_or("a JWKS document is an object with a `keys` array")?;
    let mut keys = Vec::new();
    for (i, jwk) in list.iter().enumerate() {
        let jwk = jwk
            .as_object()
            .ok_or_else(|| format!("keys[{i}] is not an object"))?;
        if let Some(key) = Key::from_jwk(jwk).map_err(|e| format!("keys[{i}]: {e}"))? {
            keys.push(key);
        }
    }
    if keys.is_empty() {
        return Err("no HS256, RS256 or ES256 signing key in the JWKS document".into());
    }
    Ok(keys)
}

/// Decodes base64url, with or without padding.
pub fn b64url(text: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(text.trim_end_matches('='))
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const RSA_PUBLIC: &str = include_str!("../testdata/rsa_public.pem");
    const RSA_PUBLIC_PKCS1: &str = include_str!("../testdata/rsa_public_pkcs1.pem");
    const EC_PUBLIC: &str = include_str!("../testdata/ec_public.pem");

    #[test]
    fn pem_keys_get_their_algorithm() {
        assert_eq!(Key::public_pem(None, RSA_PUBLIC).unwrap().alg(), Alg::Rs256);
        assert_eq!(
            Key::public_pem(None, RSA_PUBLIC_PKCS1).unwrap().alg(),
            Alg::Rs256
        );
        assert_eq!(Key::public_pem(None, EC_PUBLIC).unwrap().alg(), Alg::Es256);
        assert!(Key::public_pem(None, "not a key").is_err());
        assert!(Key::public_pem(
            None,
            "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----"
        )
        .is_err());
    }

    #[test]
    fn short_secrets_are_refused() {
        assert!(Key::secret(None, "short").is_err());
        assert!(Key::secret(None, &"k".repeat(32)).is_ok());
    }

    #[test]
    fn jwks_skips_what_it_cannot_use() {
        let jwks = serde_json::json!({"keys": [
            {"kty": "oct", "kid": "enc", "use": "enc", "k": "AAAA"},
            {"kty": "OKP", "crv": "Ed25519", "x": "AAAA"},
            {"kty": "RSA", "alg": "RS384", "n": "AQAB", "e": "AQAB"},
            {"kty": "oct", "kid": "h", "k": b64(&[7u8; 32])},
        ]});
        let keys = from_jwks(&jwks).unwrap();
        assert_eq!(keys.len(), 1);
        assert_eq!(
            (keys[0].kid.as_deref(), keys[0].alg()),
            (Some("h"), Alg::Hs256)
        );
        assert!(from_jwks(&serde_json::json!({"keys": []})).is_err());
        assert!(from_jwks(&serde_json::json!({"nokeys": 1})).is_err());
        let bad =
            serde_json::json!({"keys": [{"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA"}]});
        assert!(from_jwks(&bad).unwrap_err().starts_with("keys[0]"));
    }

    fn b64(bytes: &[u8]) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    }
}
