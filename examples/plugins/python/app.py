"""An allowlist auth plugin for wasmgate, in Python (componentize-py, world handshake-plugin).

A client is let in only if its request carries a header (default `x-team`) whose value is
in the configured list; others get 403. The team goes into the connection's metadata so
later plugins (and, with header-stamp's copy_meta, the upstream) can see it.

Config (the plugin's `config` table, handed to `init` as JSON):
    header   = "x-team"           # which request header to check
    allow    = ["red", "blue"]    # accepted values (exact, case-sensitive); required
    meta_key = "team"             # metadata key that gets the value
"""

import json

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports import host
from wit_world.imports.types import Accept, Hooks, Reject, Verdict_Accept, Verdict_Reject

# One plugin value per instance, set by init; instances are shared by connections, so
# nothing here is per connection.
CONFIG = {}


def parse_config(text: str) -> dict:
    """The checked config, or a ValueError saying what is wrong."""
    raw = json.loads(text) if text.strip() not in ("", "null") else {}
    if not isinstance(raw, dict):
        raise ValueError("config must be a table")
    unknown = set(raw) - {"header", "allow", "meta_key"}
    if unknown:
        raise ValueError(f"unknown key {sorted(unknown)[0]!r}")
    header = raw.get("header", "x-team")
    allow = raw.get("allow")
    meta_key = raw.get("meta_key", "team")
    if not isinstance(header, str) or not header or " " in header:
        raise ValueError("header must be a header name")
    if not isinstance(allow, list) or not all(isinstance(v, str) for v in allow):
        raise ValueError("allow must be a list of strings")
    if not isinstance(meta_key, str) or not meta_key:
        raise ValueError("meta_key must be a non-empty string")
    return {"header": header.lower(), "allow": frozenset(allow), "meta_key": meta_key}


def header_lines(headers: str):
    """(name, value) for each line "name: value" of the request's `headers` text."""
    for line in headers.splitlines():
        name, _, value = line.partition(":")
        yield name, value.strip()


def decide(config: dict, headers: str) -> tuple:
    """(True, value) to let the client in, or (False, reason)."""
    value = next((v for n, v in header_lines(headers) if n == config["header"]), None)
    if value is None:
        return False, f"missing {config['header']} header"
    if value not in config["allow"]:
        return False, f"{config['header']} {value!r} is not allowed"
    return True, value


class Lifecycle(exports.Lifecycle):
    def init(self, config: str) -> Hooks:
        global CONFIG
        try:
            CONFIG = parse_config(config)
        except ValueError as e:  # json.JSONDecodeError is a ValueError too
            raise Err(f"bad config: {e}")
        return Hooks.HANDSHAKE

    def on_close(self, conn, code, stats) -> None:
        pass


class Handshake(exports.Handshake):
    def on_handshake(self, conn, req):
        ok, detail = decide(CONFIG, req.headers)
        if not ok:
            host.log(host.Level.DEBUG, f"refused {req.client_addr}: {detail}")
            return Verdict_Reject(Reject(status=403, reason=detail, headers=[]))
        conn.set_meta(CONFIG["meta_key"], detail)
        return Verdict_Accept(
            Accept(
                upstream=None,
                add_headers=[],
                remove_headers=[],
                rewrite_path=None,
                subprotocol=None,
                compression=None,
            )
        )
