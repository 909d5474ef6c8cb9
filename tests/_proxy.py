"""A small real forward proxy for tests: CONNECT tunnels, optional Basic auth, and its own host table.

It resolves names only from ``hosts`` (``api.example.test`` -> ``127.0.0.1``), names this machine cannot resolve:
a request that reaches the emulator under such a name went through it. Binds 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Tunnel:
    host: str
    port: int
    status: int  # what the proxy answered to the CONNECT
    user: str | None


class ForwardProxy:
    def __init__(self, hosts: dict[str, str], *, credentials: tuple[str, str] | None = None, port: int = 0) -> None:
        self.hosts = hosts
        self.credentials = credentials
        self.port = port
        self.tunnels: list[Tunnel] = []
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url_with(self, user: str, password: str | None = None) -> str:
        secret = f":{password}" if password is not None else ""
        return f"http://{user}{secret}@127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]  # kept: a restart listens on the same port

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await self._server.wait_closed()
        self._server = None

    async def __aenter__(self) -> ForwardProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            request_line, *header_lines = head.split("\r\n")
            method, target, _ = request_line.split(" ", 2)
            headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines if h)}
            if method != "CONNECT":  # our clients only tunnel (every target in these tests is https)
                await self._answer(writer, 501, "Not Implemented")
                return
            host, _, port_text = target.rpartition(":")
            user = self._user(headers.get("proxy-authorization", ""))
            if self.credentials is not None and user is None:
                self.tunnels.append(Tunnel(host, int(port_text), 407, None))
                await self._answer(writer, 407, "Proxy Authentication Required", 'Proxy-Authenticate: Basic realm="t"')
                return
            address = self.hosts.get(host)
            if address is None:
                self.tunnels.append(Tunnel(host, int(port_text), 502, user))
                await self._answer(writer, 502, "Bad Gateway")  # the proxy's own DNS does not know the name
                return
            try:
                up_reader, up_writer = await asyncio.open_connection(address, int(port_text))
            except OSError:
                self.tunnels.append(Tunnel(host, int(port_text), 502, user))
                await self._answer(writer, 502, "Bad Gateway")
                return
            self._writers.add(up_writer)
            self.tunnels.append(Tunnel(host, int(port_text), 200, user))
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await writer.drain()
            try:
                await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
            finally:
                self._writers.discard(up_writer)
                up_writer.close()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    def _user(self, authorization: str) -> str | None:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            user, _, password = base64.b64decode(token).decode().partition(":")
        except ValueError:
            return None
        if self.credentials is not None and (user, password) != self.credentials:
            return None
        return user

    @staticmethod
    async def _answer(writer: asyncio.StreamWriter, status: int, reason: str, extra: str = "") -> None:
        lines = [f"HTTP/1.1 {status} {reason}", "Content-Length: 0", "Connection: close"]
        if extra:
            lines.append(extra)
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        with contextlib.suppress(OSError):
            await writer.drain()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            writer.write_eof()
