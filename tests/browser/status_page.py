#!/usr/bin/python3
"""Headless Chromium test of the status page (make test-browser).

Starts the appliance binary with a temp data dir, registers devices with
`outpost device add`, opens http://127.0.0.1:<port>/ in Chromium driven over
the DevTools protocol, and checks:
  a) the page shows what the /api/v1/status it rendered says (uplink,
     backlog, dead letters, disk, ingest, devices in order, the device
     filter), read in one evaluation with the DOM, with no horizontal scroll
     at 360 px;
  b) an MQTT publish (mosquitto_pub) shows its device and type in the live
     tail within 2 s, without a reload;
  c) screenshots at 360 px and 1280 px wide: target/browser/*.png.
Usage: status_page.py <outpost binary>. Needs chromium, mosquitto_pub and
python3-websockets (Debian packages).
"""
import asyncio
import base64
import decimal
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import websockets

OUT = os.path.join("target", "browser")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what, cond, timeout=20.0, step=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            v = cond()
            if v:
                return v
        except Exception:  # not up yet
            pass
        time.sleep(step)
    raise AssertionError(f"timed out waiting for {what}")


def http_json(url, body=None, token=None):
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode())
    if body is not None:
        req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.loads(r.read())


class Cdp:
    """A minimal DevTools protocol client over one page target."""

    def __init__(self, ws):
        self.ws, self.n = ws, 0

    async def call(self, method, **params):
        self.n += 1
        my = self.n
        await self.ws.send(json.dumps({"id": my, "method": method, "params": params}))
        while True:
            msg = json.loads(await self.ws.recv())
            if msg.get("id") == my:
                if "error" in msg:
                    raise AssertionError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    async def eval(self, expr):
        r = await self.call("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise AssertionError(f"JS error in {expr!r}: {r['exceptionDetails']}")
        return r["result"].get("value")

    async def until(self, what, expr, timeout=10.0):
        deadline, last = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            try:
                v = await self.eval(expr)
            except AssertionError as e:  # e.g. the page is still loading
                v, last = None, e
            if v:
                return v
            await asyncio.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}: {expr} (last error: {last})")

    async def viewport(self, width, height, mobile):
        await self.call("Emulation.setDeviceMetricsOverride", width=width, height=height,
                        deviceScaleFactor=1, mobile=mobile)

    async def screenshot(self, path, width, mobile):
        await self.viewport(width, 800, mobile)
        await asyncio.sleep(0.3)
        h = await self.eval("Math.ceil(document.documentElement.scrollHeight)")
        await self.viewport(width, int(h), mobile)
        await asyncio.sleep(0.3)
        shot = await self.call("Page.captureScreenshot", format="png")
        with open(path, "wb") as f:
            f.write(base64.b64decode(shot["data"]))
        print(f"screenshot {path} ({width}x{h})")


# What the page shows, read from the DOM.
READ_PAGE = """(() => {
  const t = id => document.getElementById(id).textContent;
  return {
    site: t('site'), uplink: t('uplink-state'), reason: t('uplink-reason'), backlog: t('backlog-rows'),
    dead: t('dead'), http: t('rate-http'), ws: t('rate-ws'), mqtt: t('rate-mqtt'),
    diskLog: t('disk-log'), diskFree: t('disk-free'), diskWrite: t('disk-write'), devCount: t('dev-count'),
    diskBudget: t('disk-budget'), diskLife: t('disk-life'),
    devices: [...document.querySelectorAll('#devices tbody tr')].map(r =>
      [r.dataset.device, r.children[1].textContent, r.children[2].textContent]),
    tail: [...document.querySelectorAll('#tail li[data-seq]')].map(l => l.textContent),
    tenants: [...document.querySelectorAll('#tenants tbody tr[data-tenant]')].map(r =>
      [...r.children].map(c => c.textContent)),
    overflow: document.documentElement.scrollWidth - window.innerWidth,
    status: window.outpostStatus,
  };
})()"""


def human(n):
    """The page's byte format (page.js bytes())."""
    units, i = ["B", "KiB", "MiB", "GiB", "TiB"], 0
    while n >= 1024 and i < len(units) - 1:
        n, i = n / 1024, i + 1
    return f"{n:.1f} {units[i]}" if i else f"{n} B"


def js_fixed2(x):
    """JavaScript's x.toFixed(2): the exact binary value, ties away from zero."""
    return str(decimal.Decimal(x).quantize(decimal.Decimal("0.01"), rounding=decimal.ROUND_HALF_UP))


def check_against_status(page, s):
    assert page["site"] == s["site_id"], (page, s["site_id"])
    assert s["uplink"]["state"] == "disabled" and page["uplink"] == "not configured", page
    assert page["backlog"] == "buffering only: no central database set", page
    assert page["dead"] == str(s["log"]["dead_letters"]), page
    assert f' of {human(s["disk"]["log_max_bytes"])} (' in page["diskLog"], (page["diskLog"], s["disk"])
    assert page["diskFree"] != "n/a" and " of " in page["diskFree"], page
    w = s["disk"]["write_bytes_per_day"]
    per_event = s["disk"]["write_bytes_per_event"]
    if w is None:
        assert page["diskWrite"] == "n/a", page
    elif per_event is None:
        assert page["diskWrite"] == f"{js_fixed2(w / 1e9)} GB/day", page
    else:
        want = f"{js_fixed2(w / 1e9)} GB/day, {math.floor(per_event + 0.5):,} B/event"
        assert page["diskWrite"] == want, (page["diskWrite"], want, s["disk"])
    # The write budget (20 GB/day here) beside the rate, and the storage
    # life at that rate (30 TBW here) once there is a rate.
    budget = s["disk"]["write_budget_bytes_per_day"]
    assert budget == 20_000_000_000, s["disk"]
    over = " (over)" if w is not None and w > budget else ""
    assert page["diskBudget"] == f"{js_fixed2(budget / 1e9)} GB/day{over}", (page["diskBudget"], s["disk"])
    days = s["disk"]["endurance_days"]
    if w is None or w == 0:
        assert days is None and page["diskLife"] == "n/a", (page["diskLife"], s["disk"])
    else:
        assert abs(days - 30e12 / w) <= 1e-6 * days, s["disk"]
        want = f"{days / 365:.1f} years at this rate" if days >= 730 else f"{math.floor(days + 0.5)} days at this rate"
        assert page["diskLife"] == want, (page["diskLife"], want, s["disk"])
    assert page["http"] != "—" and float(page["http"]) >= 0.0, page
    want = [d["device_id"] for d in s["devices"]]
    assert [d[0] for d in page["devices"]] == want, (page["devices"], want)
    for shown, d in zip(page["devices"], s["devices"]):
        assert shown[1] == ("online" if d["online"] else "offline"), (shown, d)
    want_tenants = [[t["tenant"], str(t["mqtt_connections"]), str(t["stream_subscribers"])] for t in s["tenants"]]
    assert page["tenants"] == want_tenants, (page["tenants"], want_tenants)
    online = sum(d["online"] for d in s["devices"])
    assert page["devCount"] == f"{online} online · {len(want) - online} offline", page


async def drive(base, ws_url, mqtt_port, token):
    async with websockets.connect(ws_url, max_size=64 << 20) as ws:
        cdp = Cdp(ws)
        await cdp.call("Page.enable")
        await cdp.viewport(1280, 900, False)
        await cdp.call("Page.navigate", url=base + "/")
        await cdp.until("the event feed to open", "document.getElementById('live').textContent === 'live'")
        await cdp.until("the HTTP event in the tail", "document.querySelectorAll('#tail li[data-seq]').length >= 1")

        # a) the page against the /api/v1/status it rendered: the DOM and the
        # status it was drawn from are read in one evaluation, so no poll can
        # land between them. First wait (polls come every 3 s) until the page
        # has rendered a status with every value checked below: the write
        # rate needs half a second of samples, which the status embedded at
        # page load may not have had yet.
        await cdp.until("a rendered status with a disk write rate",
                        "window.outpostStatus && window.outpostStatus.disk.write_bytes_per_day !== null"
                        " && window.outpostStatus.disk.write_bytes_per_event !== null", timeout=15)
        page = await cdp.eval(READ_PAGE)
        rendered = page.pop("status")
        check_against_status(page, rendered)
        # ... and that status is what the API serves (same site, same devices).
        served = http_json(base + "/api/v1/status")
        assert served["site_id"] == rendered["site_id"], (served["site_id"], rendered["site_id"])
        assert [d["device_id"] for d in served["devices"]] == [d["device_id"] for d in rendered["devices"]], served
        print("a) page matches the /api/v1/status it rendered:", json.dumps({k: page[k] for k in ("uplink", "backlog", "dead", "diskLog", "diskWrite", "devCount")}))
        await cdp.eval("(() => { const f = document.getElementById('filter'); f.value = 'PUMP-2'; f.dispatchEvent(new Event('input')); })()")
        rows = await cdp.eval(READ_PAGE)
        assert [d[0] for d in rows["devices"]] == ["pump-2"], rows["devices"]
        await cdp.eval("(() => { const f = document.getElementById('filter'); f.value = ''; f.dispatchEvent(new Event('input')); })()")
        print("a) device filter: 'PUMP-2' leaves only pump-2")

        # b) an MQTT event appears in the tail within 2 s, no reload
        await cdp.eval("window.__marker = 1")
        t0 = time.monotonic()
        subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(mqtt_port), "-i", "pump-1", "-u", "pump-1",
                        "-P", token, "-q", "1", "-t", "acme/devices/pump-1/events/door.opened",
                        "-m", '{"open": true, "secret": "not-on-the-page"}'], check=True, timeout=10)
        await cdp.until("the MQTT event in the tail",
                        "[...document.querySelectorAll('#tail li[data-seq]')].some(l => "
                        "l.textContent.includes('pump-1') && l.textContent.includes('door.opened'))", timeout=2.0)
        took = time.monotonic() - t0
        assert await cdp.eval("window.__marker === 1"), "the page was reloaded"
        body = await cdp.eval("document.body.textContent")
        assert "not-on-the-page" not in body, "a payload reached the page"
        print(f"b) MQTT event pump-1 / door.opened shown after {took:.2f} s (publish included), no reload")

        # c) screenshots; at 360 px nothing scrolls sideways
        os.makedirs(OUT, exist_ok=True)
        await cdp.until("the MQTT rate", "parseFloat(document.getElementById('rate-mqtt').textContent) > 0", timeout=6)
        await cdp.screenshot(os.path.join(OUT, "status-1280.png"), 1280, False)
        await cdp.screenshot(os.path.join(OUT, "status-360.png"), 360, True)
        overflow = await cdp.eval("document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, f"horizontal scroll at 360 px: {overflow} px"
        narrow = await cdp.eval("[...document.querySelectorAll('#tail li .type, #tail li .device, #devices td')]"
                                ".filter(e => e.getBoundingClientRect().width < 40).length")
        assert narrow == 0, f"{narrow} tail/device cells squeezed below 40 px at 360 px"
        print("c) no horizontal scroll at 360 px")


def main():
    binary = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else "target/debug/outpost")
    tmp = tempfile.mkdtemp(prefix="outpost-browser-")
    http_port, mqtt_port, cdp_port = free_port(), free_port(), free_port()
    env = dict(os.environ, OUTPOST_SITE__DATA_DIR=os.path.join(tmp, "data"), OUTPOST_SITE__ID="browser-site",
               OUTPOST_HTTP__LISTEN=f"127.0.0.1:{http_port}", OUTPOST_MQTT__LISTEN=f"127.0.0.1:{mqtt_port}",
               OUTPOST_LOG="warn", OUTPOST_LOG__WRITE_BUDGET="20000000000", OUTPOST_DISK__ENDURANCE_TBW="30")
    env.pop("OUTPOST_CONFIG", None)
    procs = []
    try:
        def outpost(*args):
            return subprocess.run([binary, *args], env=env, check=True, capture_output=True, text=True).stdout.strip()
        token = outpost("device", "add", "--tenant", "acme", "--id", "pump-1", "--name", "Pump 1")
        outpost("device", "add", "--tenant", "acme", "--id", "pump-2")
        app = subprocess.Popen([binary, "run"], env=env, stdout=subprocess.DEVNULL, stderr=open(os.path.join(tmp, "outpost.log"), "w"))
        procs.append(app)
        base = f"http://127.0.0.1:{http_port}"
        wait_for("outpost /healthz", lambda: urllib.request.urlopen(base + "/healthz", timeout=1).status == 200)
        http_json(f"{base}/api/v1/realtime/acme/event",
                  {"device_id": "pump-1", "event_type": "temp.read", "payload": {"celsius": 21.5}}, token)

        chrome = subprocess.Popen(["chromium", *CHROMIUM_FLAGS, f"--remote-debugging-port={cdp_port}",
                                   f"--user-data-dir={os.path.join(tmp, 'chrome')}", "about:blank"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(chrome)
        targets = wait_for("chromium DevTools", lambda: [t for t in json.loads(urllib.request.urlopen(
            f"http://127.0.0.1:{cdp_port}/json/list", timeout=1).read()) if t["type"] == "page"])
        asyncio.run(asyncio.wait_for(drive(base, targets[0]["webSocketDebuggerUrl"], mqtt_port, token), 60))
        print("browser test: ok")
    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
