"""A TCP proxy that delays every client-to-server chunk: network latency in front of a local server.

    python -m bench.latency_proxy LISTEN_PORT TARGET_PORT DELAY_MS

The lake benchmark puts it in front of Azurite, whose loopback requests take no network time,
while every request to a real storage account does. Each request (one chunk from the client)
waits ``DELAY_MS`` before it is forwarded; responses stream back undelayed.
"""

from __future__ import annotations

import asyncio
import sys

LOOPBACK = "127.0.0.1"


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    try:
        while data := await reader.read(1 << 16):
            if delay:
                await asyncio.sleep(delay)
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def serve(listen_port: int, target_port: int, delay: float) -> None:
    async def handle(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        server_reader, server_writer = await asyncio.open_connection(LOOPBACK, target_port)
        await asyncio.gather(
            _pipe(client_reader, server_writer, delay), _pipe(server_reader, client_writer, 0.0)
        )

    server = await asyncio.start_server(handle, LOOPBACK, listen_port)
    print("listening", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    listen, target, delay_ms = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    asyncio.run(serve(listen, target, delay_ms / 1000))
