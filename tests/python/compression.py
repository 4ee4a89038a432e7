"""permessage-deflate through wasmgate, judged by the Python `websockets` library.

  compression.py client URL EXPECT   -- connect with compression on; EXPECT is "deflate" or
                                        "none" for what the 101 must say; exchange messages
  compression.py server PORT         -- an echo server with compression on (prints "ready"),
                                        that answers "extensions?" with what it negotiated
"""
import asyncio
import json
import sys

import websockets
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory


async def client(url: str, expect: str) -> None:
    factory = ClientPerMessageDeflateFactory(client_max_window_bits=True)
    async with websockets.connect(url, extensions=[factory], max_size=None) as ws:
        names = [e.name for e in ws.protocol.extensions]
        want = ["permessage-deflate"] if expect == "deflate" else []
        assert names == want, f"negotiated {names}, expected {want}"
        print(f"client negotiated {names}")
        messages = [
            json.dumps({"symbol": "ABC", "bid": 101.25 + i, "ask": 101.5 + i, "seq": i}) for i in range(200)
        ] + ["x" * 100_000, "héllo wörld"]
        for m in messages:
            await ws.send(m)
            got = await ws.recv()
            assert got == m, f"echo differs: {got[:60]!r} vs {m[:60]!r}"
        await ws.send(bytes(range(256)) * 300)
        assert await ws.recv() == bytes(range(256)) * 300
        print(f"{len(messages) + 1} messages echoed")
        await ws.send("extensions?")
        print("server side:", await ws.recv())


async def server(port: int) -> None:
    async def echo(ws):
        async for message in ws:
            if message == "extensions?":
                await ws.send(json.dumps([e.name for e in ws.protocol.extensions]))
            else:
                await ws.send(message)

    async with websockets.serve(echo, "127.0.0.1", port, max_size=None):
        print("ready", flush=True)
        await asyncio.Future()


if __name__ == "__main__":
    if sys.argv[1] == "client":
        asyncio.run(client(sys.argv[2], sys.argv[3]))
    else:
        asyncio.run(server(int(sys.argv[2])))
