"""Drives the demo's chat page in headless Chromium over the DevTools protocol: two tabs.

Usage: chat_browser.py CHAT_URL SCREENSHOT_DIR ROOM

Each tab opens the page (served by the gateway), logs in (the page gets a JWT from the
demo's login, through the gateway) and joins ROOM; tab "alice" then says something, tab
"bob" answers, and each must show the other's message. Saves chat-alice.png and chat-bob.png
and prints one line, "TABS <json>": per tab its served-by backend, the WebSocket's
subprotocol and the messages it shows ({from, text, via}). Exits non-zero (with the reason
on stderr) when a tab does not get there in time.
"""

import asyncio
import json
import os
import sys
import urllib.request

import websockets

from dashboard_browser import Page, headless_chromium

STATE = """(() => ({
  served_by: document.getElementById('served-by').dataset.server,
  protocol: chat.protocol,
  status: document.getElementById('status').textContent,
  messages: [...document.querySelectorAll('#messages li')].map(li =>
    ({from: li.dataset.from, text: li.dataset.text, via: li.querySelector('.via').textContent})),
}))()"""


def has_message(sender, text):
    return (f"[...document.querySelectorAll('#messages li')].some(li => "
            f"li.dataset.from === {json.dumps(sender)} && li.dataset.text === {json.dumps(text)})")


async def open_tab(page, url, name, room):
    await page.call("Page.enable")
    await page.call("Runtime.enable")
    await page.call("Page.navigate", url=url)
    await page.until("!!document.getElementById('login-form')", 10, f"{name}: the page")
    await page.eval(f"document.getElementById('name').value = {json.dumps(name)}")
    await page.eval("document.querySelector('#login-form button').click()")
    await page.until("document.getElementById('served-by').dataset.server !== ''", 10, f"{name}: a backend serving the tab")
    await page.eval(f"document.getElementById('room').value = {json.dumps(room)}")
    await page.eval("document.querySelector('#room-form button').click()")
    await page.until(f"document.querySelector('#rooms button.current').dataset.room === {json.dumps(room)}", 5,
                     f"{name}: joined {room}")


async def say(page, text):
    await page.eval(f"document.getElementById('text').value = {json.dumps(text)}")
    await page.eval("document.querySelector('#send-form button').click()")


async def main():
    url, shots, room = sys.argv[1], sys.argv[2], sys.argv[3]
    os.makedirs(shots, exist_ok=True)
    async with headless_chromium("1000,720", "--disable-background-timer-throttling",
                                 "--disable-renderer-backgrounding") as port:
        # Two tabs: the first page Chromium opened, and a new one.
        first = next(t for t in json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json")) if t["type"] == "page")
        new = urllib.request.Request(f"http://127.0.0.1:{port}/json/new?about:blank", method="PUT")
        second = json.load(urllib.request.urlopen(new))
        async with websockets.connect(first["webSocketDebuggerUrl"], max_size=None) as a_ws, \
                websockets.connect(second["webSocketDebuggerUrl"], max_size=None) as b_ws:
            alice, bob = Page(a_ws), Page(b_ws)
            await open_tab(alice, url, "alice", room)
            await open_tab(bob, url, "bob", room)
            hello, answer = f"hello from alice in {room}", "hi alice, bob here"
            await say(alice, hello)
            await bob.until(has_message("alice", hello), 10, "bob to see alice's message")
            await say(bob, answer)
            await alice.until(has_message("bob", answer), 10, "alice to see bob's answer")
            await alice.until(has_message("alice", hello), 5, "alice to see her own message")
            # Headless Chromium draws only the tab in front: a screenshot of another waits.
            for page, name in [(alice, "alice"), (bob, "bob")]:
                await page.call("Page.bringToFront")
                await page.screenshot(os.path.join(shots, f"chat-{name}.png"))
            tabs = {"alice": await alice.eval(STATE), "bob": await bob.eval(STATE)}
            print("TABS " + json.dumps(tabs), flush=True)


asyncio.run(main())
