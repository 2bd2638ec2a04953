#!/usr/bin/env python3
"""200 concurrent keep-alive scrapers over raw asyncio sockets, for
tests/bench/scrape_figures.sh: 70 on /metrics, 70 on /api/v1/status, 60 on
the status page /, or (with "404") 200 on a path that does not exist, the
control that costs only HTTP itself. Each scrapes back to back (INTERVAL 0)
or once per INTERVAL seconds, starting at a random point of the first one.
Writes latencies and rates as JSON.

usage: scrapers.py PORT SECONDS OUTFILE [INTERVAL [404]]"""
import asyncio, sys, time, json, resource
PORT, DUR, OUT = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
IVL = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0  # per-client interval, 0 = tight loop
PLAN = [("/metrics", 70), ("/api/v1/status", 70), ("/", 60)]
if len(sys.argv) > 5 and sys.argv[5] == "404": PLAN = [("/no-such-path", 200)]
lat = {p: [] for p, _ in PLAN}; err = {p: 0 for p, _ in PLAN}
async def client(path, deadline):
    req = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
    r = w = None
    while time.monotonic() < deadline:
        try:
            if w is None:
                r, w = await asyncio.open_connection("127.0.0.1", PORT)
            t0 = time.monotonic()
            w.write(req)
            head = await r.readuntil(b"\r\n\r\n")
            status = head[9:12]
            cl = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    cl = int(line[15:])
            await r.readexactly(cl)
            dt = time.monotonic() - t0
            if status == b"200" or (status == b"404" and path == "/no-such-path"): lat[path].append(dt)
            else: err[path] += 1
            if IVL: await asyncio.sleep(max(0.0, IVL - dt))
        except Exception:
            err[path] += 1
            if w: w.close()
            r = w = None
            await asyncio.sleep(0.05)
    if w: w.close()
async def main():
    deadline = time.monotonic() + DUR
    t0 = time.monotonic()
    import random
    async def staggered(p):
        if IVL: await asyncio.sleep(random.random() * IVL)
        await client(p, deadline)
    await asyncio.gather(*[staggered(p) for p, n in PLAN for _ in range(n)])
    el = time.monotonic() - t0
    ru = resource.getrusage(resource.RUSAGE_SELF)
    res = {"elapsed": el, "cpu_s": ru.ru_utime + ru.ru_stime}
    for p, _ in PLAN:
        v = sorted(lat[p])
        q = lambda f: round(v[min(len(v)-1, int(f*(len(v)-1)+0.5))]*1000, 2) if v else None
        res[p] = {"rps": round(len(v)/el, 1), "p50_ms": q(0.5), "p99_ms": q(0.99), "max_ms": q(1.0), "errors": err[p]}
    res["total_rps"] = round(sum(len(lat[p]) for p, _ in PLAN)/el, 1)
    json.dump(res, open(OUT, "w")); print(json.dumps(res))
asyncio.run(main())
