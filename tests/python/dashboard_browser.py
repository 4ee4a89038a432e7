"""Drives the dashboard in headless Chromium over the DevTools protocol (no driver needed).

Usage: dashboard_browser.py ADMIN_URL TOKEN SCREENSHOT_DIR EXPECT
EXPECT is JSON: {"live": {"pool/server": n, ...}, "down": "pool/server", "drain": "pool/server"}.

Steps, each answered on stdout for the Rust test that runs it:
1. open the page, enter the token, wait until every server row shows its expected live
   count -> prints "LIVE <json of the rows>" and saves live.png;
2. wait for a line "KILLED" on stdin, then until the `down` server's row says down ->
   prints "DOWN <seconds>" and saves down.png;
3. click the drain button of the `drain` server, wait until its row says draining ->
   prints "DRAINING" and saves draining.png.
"""

import asyncio
import base64
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request

import websockets

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Page:
    def __init__(self, ws):
        self.ws = ws
        self.next_id = 0

    async def call(self, method, **params):
        self.next_id += 1
        await self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(await self.ws.recv())
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    async def eval(self, expression):
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def until(self, expression, timeout, what):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if await self.eval(expression):
                return
            await asyncio.sleep(0.1)
        raise SystemExit(f"timed out waiting for {what}: {expression}")

    async def screenshot(self, path):
        shot = await self.call("Page.captureScreenshot", format="png")
        with open(path, "wb") as f:
            f.write(base64.b64decode(shot["data"]))


ROWS = """Object.fromEntries([...document.querySelectorAll('tr[data-server]')].map(r =>
  [r.dataset.server, {state: r.dataset.state, live: +r.querySelector('.live').textContent}]))"""


async def drive(page, admin, token, shots, expect):
    await page.call("Page.enable")
    await page.call("Runtime.enable")
    await page.call("Page.navigate", url=admin + "/")
    await page.until("!!document.getElementById('login') && !document.getElementById('login').hidden", 10, "the token form")
    await page.eval(f"document.getElementById('token').value = {json.dumps(token)}")
    await page.eval("document.querySelector('#login button').click()")
    checks = " && ".join(
        f"(rows[{json.dumps(k)}] || {{}}).live === {n}" for k, n in expect["live"].items()
    )
    await page.until(f"(() => {{ const rows = {ROWS}; return {checks}; }})()", 15, "the live counts")
    await page.screenshot(os.path.join(shots, "dashboard-live.png"))
    print("LIVE " + json.dumps(await page.eval(ROWS)), flush=True)

    line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    assert line.strip() == "KILLED", line
    killed_at = time.monotonic()
    down = json.dumps(expect["down"])
    await page.until(f"({ROWS})[{down}].state === 'down'", 15, "the server marked down")
    print(f"DOWN {time.monotonic() - killed_at:.2f}", flush=True)
    await page.screenshot(os.path.join(shots, "dashboard-down.png"))

    drain = json.dumps(expect["drain"])
    await page.eval(f"document.querySelector('tr[data-server={drain}] button[data-action=drain]').click()")
    await page.until(f"({ROWS})[{drain}].state === 'draining'", 10, "the server draining")
    await page.screenshot(os.path.join(shots, "dashboard-draining.png"))
    print("DRAINING", flush=True)


@contextlib.asynccontextmanager
async def headless_chromium(window_size, *flags):
    """Chromium with its DevTools port answering, in a profile of its own; yields the port.
    Killed and its profile removed on the way out."""
    port = free_port()
    profile = tempfile.mkdtemp(prefix="wasmgate-chromium-")
    chrome = subprocess.Popen(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", *flags,
         f"--user-data-dir={profile}", f"--window-size={window_size}", f"--remote-debugging-port={port}",
         "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/json/version")
                break
            except OSError:
                await asyncio.sleep(0.1)
        yield port
    finally:
        chrome.kill()
        chrome.wait()
        subprocess.run(["rm", "-rf", profile])


async def main():
    admin, token, shots, expect = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    os.makedirs(shots, exist_ok=True)
    async with headless_chromium("1500,800") as port:
        targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json"))
        page_target = next(t for t in targets if t["type"] == "page")
        async with websockets.connect(page_target["webSocketDebuggerUrl"], max_size=None) as ws:
            await drive(Page(ws), admin, token, shots, expect)


if __name__ == "__main__":
    asyncio.run(main())
