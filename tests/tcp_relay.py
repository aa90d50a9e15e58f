"""A TCP relay on 127.0.0.1 that a test can open and close, to cut one client off a broker."""

from __future__ import annotations

import asyncio
import contextlib


class TcpRelay:
    """Forwards connections to 127.0.0.1:`target_port` while open; refuses them while closed."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.open = True
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.open:
            writer.close()
            return
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._conns.update((writer, up_w))

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            w.close()

        await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer))
        self._conns.difference_update((writer, up_w))

    def set_open(self, value: bool) -> None:
        """Closing also drops the connections that are up."""
        self.open = value
        if not value:
            for w in list(self._conns):
                w.close()

    async def stop(self) -> None:
        self.set_open(False)
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
