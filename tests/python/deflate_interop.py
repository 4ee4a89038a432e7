"""permessage-deflate interop helper for the gateway's unit tests (gateway/src/compression).

Decodes payloads the gateway's Deflater produced with Python websockets' own
PerMessageDeflate extension, and encodes messages with it for the gateway's Inflater.

It also runs a strict check: C zlib's raw inflater at the agreed window, one output byte at
a time, so that every match is copied from zlib's window and a distance beyond the agreed
window fails ("invalid distance too far back"). This is how the gateway shows that its
window-8 output (compressed with 9, as zlib requires) fits a 256-byte window.

stdin: {"cases": [{"gateway_window": 8..15, "gateway_nct": bool,
                   "python_window": 9..15, "python_nct": bool,
                   "from_gateway": [hex payload, ...], "to_gateway": [hex message, ...]}]}
stdout: {"cases": [{"decoded": [hex message, ...] | error, "strict": [hex message, ...] | error,
                    "encoded": [hex payload, ...]}]}
"""

import json
import sys
import zlib

from websockets.extensions.permessage_deflate import PerMessageDeflate
from websockets.frames import Frame, Opcode

TRAILER = b"\x00\x00\xff\xff"


def strict_inflate(window, no_context_takeover, payloads):
    out = []
    d = None
    for payload in payloads:
        if d is None or no_context_takeover:
            d = zlib.decompressobj(wbits=-window)
        data = payload + TRAILER
        message = bytearray()
        while data:
            message += d.decompress(data, 1)
            data = d.unconsumed_tail
        # Flush whatever zlib still holds, one byte at a time as well.
        while True:
            chunk = d.decompress(b"", 1)
            if not chunk:
                break
            message += chunk
        out.append(bytes(message).hex())
    return out


def run(case):
    ours = PerMessageDeflate(
        remote_no_context_takeover=case["gateway_nct"],
        local_no_context_takeover=case["python_nct"],
        remote_max_window_bits=case["gateway_window"],
        local_max_window_bits=case["python_window"],
    )
    payloads = [bytes.fromhex(p) for p in case["from_gateway"]]
    try:
        decoded = [
            ours.decode(Frame(Opcode.BINARY, p, fin=True, rsv1=True)).data.hex()
            for p in payloads
        ]
    except Exception as e:  # reported to the test, which decides
        decoded = f"{e!r} (cause: {e.__cause__!r})"
    try:
        strict = strict_inflate(case["gateway_window"], case["gateway_nct"], payloads)
    except zlib.error as e:
        strict = str(e)
    encoded = []
    for message in case["to_gateway"]:
        frame = ours.encode(Frame(Opcode.BINARY, bytes.fromhex(message), fin=True))
        assert frame.rsv1
        encoded.append(bytes(frame.data).hex())
    return {"decoded": decoded, "strict": strict, "encoded": encoded}


def main():
    request = json.load(sys.stdin)
    json.dump({"cases": [run(case) for case in request["cases"]]}, sys.stdout)


if __name__ == "__main__":
    main()
