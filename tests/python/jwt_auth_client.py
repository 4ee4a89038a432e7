"""JWT authentication through wasmgate's jwt-auth plugin, checked with the `websockets`
client and tokens made by PyJWT.

Usage:
    jwt_auth_client.py keys DIR        make test keys, write DIR/keys.json
    jwt_auth_client.py check URL DIR   run the cases against a gateway at URL (ws://host:port)
                                       configured from DIR/keys.json by tests/e2e/auth.rs

The gateway routes (see tests/e2e/auth.rs): `/` checks HS256, RS256 and ES256 tokens
(audience `chat`, issuer `https://issuer.test`, `sub` required, claims `sub` and `role` to
headers `x-user-id` and `x-role`, tokens also in `?access_token=` and the subprotocol offer
`["bearer", TOKEN]`); `/jwks` takes RS256 and ES256 keys from a JWKS document by `kid`;
`/live` closes a connection with 4001 when its token expires.

Prints one line per check and exits non-zero on the first failure.
"""
import asyncio
import json
import os
import secrets
import sys
import time

import jwt
import websockets
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

ISSUER = "https://issuer.test"


def pem_private(key) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def pem_public(key) -> str:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def make_keys(directory: str) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    other_rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    jwks = {"keys": []}
    for kid, alg, key, algorithm in [("rsa-1", "RS256", rsa_key, RSAAlgorithm), ("ec-1", "ES256", ec_key, ECAlgorithm)]:
        jwk = json.loads(algorithm.to_jwk(key.public_key()))
        jwk.update(kid=kid, alg=alg, use="sig")
        jwks["keys"].append(jwk)
    keys = {
        "secret": secrets.token_urlsafe(48),
        "rsa_private": pem_private(rsa_key),
        "rsa_public": pem_public(rsa_key),
        "other_rsa_private": pem_private(other_rsa),
        "ec_private": pem_private(ec_key),
        "ec_public": pem_public(ec_key),
        "jwks": json.dumps(jwks),
    }
    with open(os.path.join(directory, "keys.json"), "w") as f:
        json.dump(keys, f)


class Tokens:
    def __init__(self, keys: dict):
        self.keys = keys

    def make(self, alg="HS256", key=None, kid=None, **overrides) -> str:
        now = int(time.time())
        claims = {"sub": "alice", "role": "admin", "aud": "chat", "iss": ISSUER, "iat": now, "exp": now + 300}
        claims.update(overrides)
        claims = {k: v for k, v in claims.items() if v is not None}
        if key is None:
            key = {"HS256": self.keys["secret"], "RS256": self.keys["rsa_private"], "ES256": self.keys["ec_private"]}[alg]
        headers = {"kid": kid} if kid else None
        return jwt.encode(claims, key, algorithm=alg, headers=headers)


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


async def backend_headers(ws) -> str:
    """What the echo backend saw in the upgrade request (lower-case `name: value` lines)."""
    await ws.send("headers")
    return (await ws.recv()).lower()


async def accepted(url: str, **kwargs) -> str:
    """Connects, checks the echo, and returns the headers the backend saw."""
    async with websockets.connect(url, **kwargs) as ws:
        await ws.send("ping?")
        assert await ws.recv() == "ping?"
        return await backend_headers(ws)


async def refused(url: str, status: int, body_prefix: str, **kwargs) -> str:
    """Checks the handshake is refused with `status` and a body starting with `body_prefix`;
    returns the WWW-Authenticate header."""
    try:
        async with websockets.connect(url, **kwargs):
            pass
    except websockets.exceptions.InvalidStatus as e:
        got = e.response.status_code
        body = e.response.body.decode(errors="replace")
        assert got == status, f"{url}: status {got}, wanted {status} ({body!r})"
        assert body.startswith(body_prefix), f"{url}: body {body!r}, wanted {body_prefix!r}..."
        return e.response.headers.get("www-authenticate", "")
    raise AssertionError(f"{url}: the handshake succeeded, wanted {status}")


async def check(url: str, directory: str) -> None:
    with open(os.path.join(directory, "keys.json")) as f:
        keys = json.load(f)
    t = Tokens(keys)
    root, jwks, live = f"{url}/", f"{url}/jwks", f"{url}/live"

    for alg in ["HS256", "RS256", "ES256"]:
        seen = await accepted(root, additional_headers=bearer(t.make(alg)))
        assert "x-user-id: alice" in seen and "x-role: admin" in seen, seen
    print("HS256, RS256 and ES256 tokens pass; the backend sees x-user-id and x-role")

    seen = await accepted(f"{root}?access_token={t.make('ES256')}")
    assert "x-user-id: alice" in seen, seen
    print("token in the access_token query parameter")

    token = t.make("RS256")
    async with websockets.connect(root, subprotocols=["bearer", token]) as ws:
        assert ws.subprotocol == "bearer", ws.subprotocol
        seen = await backend_headers(ws)
        assert "x-user-id: alice" in seen and token.lower() not in seen, seen
    async with websockets.connect(root, subprotocols=["chat.v1", "bearer", token]) as ws:
        assert ws.subprotocol == "chat.v1", ws.subprotocol
        seen = await backend_headers(ws)
        assert "sec-websocket-protocol: chat.v1\n" in seen and token.lower() not in seen, seen
    print("token in the subprotocol offer: the client gets a protocol it offered, the backend no token")

    seen = await accepted(root, additional_headers={**bearer(t.make(role=None)), "X-Role": "root"})
    assert "x-role" not in seen and "x-user-id: alice" in seen, seen
    print("a client cannot supply a claim header the token lacks")

    challenge = await refused(root, 401, "missing bearer token")
    assert challenge == 'Bearer realm="wasmgate"', challenge
    now = int(time.time())
    cases = [
        ("expired", bearer(t.make(exp=now - 60)), 401, "invalid token: token expired"),
        ("not yet valid", bearer(t.make(nbf=now + 600)), 401, "invalid token: token not valid yet"),
        ("wrong key", bearer(t.make("RS256", key=keys["other_rsa_private"])), 401, "invalid token: signature does not verify"),
        ("wrong secret", bearer(t.make(key="another-secret-of-at-least-32-bytes!!")), 401, "invalid token: signature does not verify"),
        ("malformed", bearer("not.a-token"), 401, "invalid token: malformed token"),
        ("garbage", bearer("garbage"), 401, "invalid token: malformed token"),
    ]
    for name, headers, status, body in cases:
        challenge = await refused(root, status, body, additional_headers=headers)
        assert 'error="invalid_token"' in challenge and "error_description=" in challenge, (name, challenge)
    forbidden = [
        ("wrong audience", t.make(aud="billing"), "forbidden: token audience is not accepted"),
        ("wrong issuer", t.make(iss="https://evil.test"), "forbidden: token issuer is not accepted"),
        ("missing sub", t.make(sub=None), "forbidden: token lacks claim `sub`"),
    ]
    for name, token, body in forbidden:
        challenge = await refused(root, 403, body, additional_headers=bearer(token))
        assert 'error="insufficient_scope"' in challenge, (name, challenge)
    print("missing, expired, not-yet-valid, wrong-key and malformed tokens get 401; wrong audience, issuer and claims 403")

    await accepted(jwks, additional_headers=bearer(t.make("RS256", kid="rsa-1")))
    await accepted(jwks, additional_headers=bearer(t.make("ES256", kid="ec-1")))
    await refused(jwks, 401, "invalid token: unknown key id", additional_headers=bearer(t.make("RS256", kid="rsa-9")))
    await refused(jwks, 401, "invalid token: algorithm", additional_headers=bearer(t.make("HS256")))
    print("JWKS keys chosen by kid")

    exp = int(time.time()) + 2
    async with websockets.connect(live, additional_headers=bearer(t.make(exp=exp))) as ws:
        await ws.send("still valid")
        assert await ws.recv() == "still valid"
        await asyncio.sleep(max(0.0, exp - time.time()) + 1.2)
        await ws.send("too late")
        try:
            reply = await asyncio.wait_for(ws.recv(), 10)
            raise AssertionError(f"expected a close, got {reply!r}")
        except websockets.ConnectionClosed as closed:
            assert closed.rcvd is not None and closed.rcvd.code == 4001, closed
            assert closed.rcvd.reason == "token expired", closed
    print("a live connection is closed with 4001 when its token expires")


if __name__ == "__main__":
    if sys.argv[1:2] == ["keys"]:
        make_keys(sys.argv[2])
    elif sys.argv[1:2] == ["check"]:
        asyncio.run(check(sys.argv[2].rstrip("/"), sys.argv[3]))
    else:
        sys.exit(__doc__)
