"""Unit tests of app.py's logic on plain CPython, against the generated bindings (their
types are plain dataclasses; host functions are not called here).

    componentize-py -d ../../../sdk/wit -w handshake-plugin bindings build/bindings
    python3 test_app.py
(build.sh generates build/bindings.) Prints "N passed, 0 failed"; exits non-zero on a failure.
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "build", "bindings"))
sys.path.insert(0, HERE)

from componentize_py_types import Err  # noqa: E402
from wit_world.imports.types import Hooks, Request, Verdict_Accept, Verdict_Reject  # noqa: E402

import app  # noqa: E402

# Host functions exist only inside the gateway.
app.host.log = lambda level, message: None


class FakeConn:
    def __init__(self):
        self.meta = {}

    def set_meta(self, key, value):
        self.meta[key] = value


def request(*headers):
    # As the gateway hands them over: one text, a line "name: value" each.
    lines = "".join(f"{n}: {v}\n" for n, v in headers)
    return Request("GET", "/", "", "localhost", lines, "127.0.0.1:1", [], "ws", None)


def test_allowed_team_is_let_in_and_recorded():
    assert app.Lifecycle().init('{"allow": ["red", "blue"]}') == Hooks.HANDSHAKE
    conn = FakeConn()
    verdict = app.Handshake().on_handshake(conn, request(("x-team", "blue")))
    assert isinstance(verdict, Verdict_Accept), verdict
    assert conn.meta == {"team": "blue"}


def test_others_get_403():
    app.Lifecycle().init('{"allow": ["red"], "header": "X-Group"}')
    for headers, reason in [
        ((), "missing x-group header"),
        ((("x-group", "green"),), "x-group 'green' is not allowed"),
        ((("x-team", "red"),), "missing x-group header"),
    ]:
        verdict = app.Handshake().on_handshake(FakeConn(), request(*headers))
        assert isinstance(verdict, Verdict_Reject), verdict
        assert (verdict.value.status, verdict.value.reason) == (403, reason), verdict


def test_bad_config_is_an_error():
    for bad in ['{"allow": "red"}', "{}", '{"allow": [], "typo": 1}', "not json", "[1]"]:
        try:
            app.Lifecycle().init(bad)
        except Err as e:
            assert str(e.value).startswith("bad config: "), e.value
        else:
            raise AssertionError(f"accepted {bad}")


if __name__ == "__main__":
    tests = [f for name, f in sorted(globals().items()) if name.startswith("test_")]
    failed = 0
    for test in tests:
        try:
            test()
        except Exception as e:  # report every failure, then exit non-zero
            failed += 1
            print(f"FAILED {test.__name__}: {e!r}")
    print(f"{len(tests) - failed} passed, {failed} failed")
    sys.exit(1 if failed else 0)
