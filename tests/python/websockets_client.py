"""Talks to a wasmgate in front of the example echo backend with the third-party
`websockets` client, checking what our own Rust client might hide.

Usage: websockets_client.py ws://HOST:PORT/
Prints one line per check and exits non-zero on the first failure.
"""
import asyncio
import sys

import websockets


async def main(url: str) -> None:
    async with websockets.connect(url, subprotocols=["v1.chat"], max_size=None) as ws:
        assert ws.subprotocol == "v1.chat", ws.subprotocol
        print("subprotocol negotiated through the gateway")

        await ws.send("héllo wörld")
        assert await ws.recv() == "héllo wörld"
        await ws.send(bytes(range(256)) * 1000)
        assert await ws.recv() == bytes(range(256)) * 1000
        print("text and binary echo")

        # A fragmented message, sent as an async iterator of fragments.
        async def fragments():
            for part in ["one ", "two ", "three"]:
                yield part
        await ws.send(fragments())
        assert await ws.recv() == "one two three"
        print("fragmented message reassembled")

        latency = await ws.ping(b"are you there")
        await asyncio.wait_for(latency, 5)
        print("ping answered")

        many = [f"msg {i}" for i in range(500)]
        for m in many:
            await ws.send(m)
        got = [await ws.recv() for _ in many]
        assert got == many, "order kept"
        print("500 pipelined messages in order")

        await ws.close(code=4321, reason="done here")
        assert ws.close_code == 4321, ws.close_code
        print("close code echoed back through the gateway")

    async with websockets.connect(url) as ws:
        await ws.send("close:4400:server says bye")
        try:
            await ws.recv()
            raise AssertionError("expected the server to close")
        except websockets.ConnectionClosed as closed:
            assert closed.rcvd is not None and closed.rcvd.code == 4400, closed
            assert closed.rcvd.reason == "server says bye", closed
        print("upstream close code reaches the client")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
