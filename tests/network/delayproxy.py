#!/usr/bin/python3
"""A TCP proxy that delays every byte by a settable time, keeping order
(the kernel here has no netem). Runs inside the central namespace of
`netfaults.py`: `delayproxy.py LISTEN_HOST:PORT UPSTREAM_HOST:PORT`; each
line on stdin `delay SECONDS` sets the one-way delay for both directions.
"""

import asyncio
import sys
import time

DELAY = [0.0]


async def pump(reader, writer):
    queue = asyncio.Queue()

    async def send():
        while True:
            due, data = await queue.get()
            if data is None:
                break
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()
        writer.close()

    sender = asyncio.create_task(send())
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            await queue.put((time.monotonic() + DELAY[0], data))
    except OSError:
        pass
    await queue.put((time.monotonic() + DELAY[0], None))
    try:
        await sender
    except OSError:
        pass


async def main():
    lhost, lport = sys.argv[1].rsplit(":", 1)
    uhost, uport = sys.argv[2].rsplit(":", 1)

    async def client(reader, writer):
        try:
            ureader, uwriter = await asyncio.open_connection(uhost, int(uport))
        except OSError:
            writer.close()
            return
        await asyncio.gather(pump(reader, uwriter), pump(ureader, writer), return_exceptions=True)

    server = await asyncio.start_server(client, lhost, int(lport))
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    print("ready", flush=True)
    async with server:
        while True:
            line = await stdin.readline()
            if not line:
                return
            words = line.decode().split()
            if len(words) == 2 and words[0] == "delay":
                DELAY[0] = float(words[1])
                print(f"delay {DELAY[0]}", flush=True)


asyncio.run(main())
