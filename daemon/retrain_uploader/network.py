"""The way out: which proxy a request goes through, which CAs are trusted, and which hop failed when it fails.

``[api] proxy`` routes every request (CONNECT for https); without it ``HTTPS_PROXY``/``HTTP_PROXY``/``NO_PROXY`` (and
their lower-case forms) are honoured as curl does. ``[api] ca_file`` is added to the system's trusted CAs.
"""

from __future__ import annotations

import asyncio
import ssl
import urllib.request
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp
from yarl import URL

from .config import ConfigError
from .redact import register_secret, scrub

if TYPE_CHECKING:
    from .config import ApiSettings

__all__ = ["PROXY_AUTH_FAILED", "Credentials", "Network", "Route", "describe_failure", "parse_proxy"]

# The pause reason of every model when the proxy refuses our credentials (a configuration problem, not a blip).
PROXY_AUTH_FAILED = "proxy authentication failed"


@dataclass(frozen=True, slots=True)
class Credentials:
    login: str
    password: str = field(repr=False)

    def header(self) -> str:
        return aiohttp.encode_basic_auth(self.login, self.password)


@dataclass(frozen=True, slots=True)
class Route:
    """How one request leaves: straight out, or through ``proxy`` (shown without its credentials)."""

    proxy: URL | None = None
    auth: Credentials | None = field(default=None, repr=False)
    source: str = "direct"  # "[api] proxy", "environment (HTTPS_PROXY)", "direct", "direct (NO_PROXY)"

    def describe(self) -> str:
        return "directly" if self.proxy is None else f"through the proxy {self.proxy} from {self.source}"


def parse_proxy(text: str) -> tuple[URL, Credentials | None]:
    """``http://[user:password@]host:port`` (a bare ``host:port`` means http) -> the URL without credentials, auth."""
    url = URL(text if "://" in text else f"http://{text}")
    if url.scheme not in ("http", "https") or not url.host:
        msg = "must look like http://[user:password@]host:port"
        raise ValueError(msg)
    auth = None
    if url.user is not None:
        auth = Credentials(url.user, url.password or "")
    return url.with_user(None).with_password(None).with_path("").with_query(None).with_fragment(None), auth


@dataclass(frozen=True, slots=True)
class Network:
    """The proxy and the trusted CAs every request of a :class:`~retrain_uploader.client.Client` uses."""

    proxy: URL | None = None
    auth: Credentials | None = field(default=None, repr=False)
    ssl_context: ssl.SSLContext | None = field(default=None, repr=False, compare=False)
    ca_file: str | None = None
    use_environment: bool = True
    # Each destination's route, found once: reading the environment's proxies walks all of os.environ, and every
    # request asks (a new Network, as a reload makes, starts empty).
    _routes: dict[tuple[str, str | None, int | None], Route] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    @classmethod
    def from_settings(cls, api: ApiSettings) -> Network:
        """Read the proxy password file and the CA bundle now; raises ConfigError naming the key."""
        proxy: URL | None = None
        auth: Credentials | None = None
        if api.proxy is not None:
            proxy, auth = parse_proxy(api.proxy)
            password = api.read_proxy_password()
            if password is not None and auth is not None:
                auth = Credentials(auth.login, password)
            if auth is not None and auth.password:
                register_secret(auth.password)
        context = ssl.create_default_context()  # the system's CAs, and the bundle added to them, not instead
        if api.ca_file is not None:
            try:
                context.load_verify_locations(cafile=str(api.ca_file))
            except (OSError, ssl.SSLError, ValueError) as e:
                msg = f"api.ca_file: cannot load {api.ca_file}: {e}"
                raise ConfigError(msg) from e
        ca_file = str(api.ca_file) if api.ca_file is not None else None
        return cls(proxy, auth, context, ca_file, use_environment=api.proxy is None)

    def route(self, url: URL) -> Route:
        key = (url.scheme, url.host, url.port)
        route = self._routes.get(key)
        if route is None:
            if len(self._routes) >= 64:  # a few hosts in practice (the API, the storage): bounded all the same
                self._routes.clear()
            route = self._routes[key] = self._find_route(url)
        return route

    def _find_route(self, url: URL) -> Route:
        if self.proxy is not None:
            return Route(self.proxy, self.auth, "[api] proxy")
        if not self.use_environment or not url.host:
            return Route()
        proxies = urllib.request.getproxies_environment()  # lower-case names win, as in curl
        if _no_proxy(url.host, url.port, proxies.get("no", "")):
            return Route(source="direct (NO_PROXY)")
        value = proxies.get(url.scheme)
        if not value:
            return Route()
        try:
            proxy, auth = parse_proxy(value)
        except ValueError:
            return Route()
        if auth is not None and auth.password:
            register_secret(auth.password)
        return Route(proxy, auth, f"the environment ({url.scheme.upper()}_PROXY)")

    def request_options(self, url: URL) -> dict[str, Any]:
        """aiohttp keyword arguments for a request to ``url``: proxy, its credentials, TLS context."""
        route = self.route(url)
        options: dict[str, Any] = {"proxy": route.proxy}
        if route.proxy is not None and route.auth is not None:
            options["proxy_headers"] = {"Proxy-Authorization": route.auth.header()}
        if self.ssl_context is not None and url.scheme == "https":
            options["ssl"] = self.ssl_context
        return options


def _no_proxy(host: str, port: int | None, no_proxy: str) -> bool:
    """curl's NO_PROXY: ``*``, or comma-separated names matching the host or a domain above it (``.corp``), with an
    optional ``:port``."""
    host = host.lower().rstrip(".")
    for entry in (e.strip().lower() for e in no_proxy.split(",")):
        if entry == "*":
            return True
        name, _, entry_port = entry.rpartition(":") if entry.count(":") == 1 else (entry, "", "")
        if entry_port and entry_port != str(port):
            continue
        name = name.strip("[]").lstrip(".").rstrip(".")
        if name and (host == name or host.endswith("." + name)):
            return True
    return False


async def describe_failure(error: aiohttp.ClientError, url: URL, network: Network, timeout_s: float) -> str:
    """One sentence naming the hop that failed (the proxy, DNS, TLS or the server) and what to do about it."""
    route = network.route(url)
    target = f"{url.host}:{url.port}"
    if isinstance(error, aiohttp.ClientProxyConnectionError):
        return f"cannot connect to the proxy {route.proxy} (from {route.source}): {_os_reason(error)}"
    if isinstance(error, aiohttp.ClientHttpProxyError):
        return f"the proxy {route.proxy} refused to connect to {target}: HTTP {error.status} {scrub(error.message)}"
    if isinstance(error, aiohttp.ClientConnectorCertificateError):
        reason = getattr(error.certificate_error, "verify_message", None) or str(error.certificate_error)
        presented = await _presented_certificate(url, route, timeout_s)
        text = f"TLS verification of {target} ({route.describe()}) failed: {reason}"
        if presented is not None:
            subject, issuer = presented
            text += f"; the certificate presented has subject {subject!r} and issuer {issuer!r}"
        where = f"it is not in [api] ca_file ({network.ca_file})" if network.ca_file else "set [api] ca_file"
        return (
            f"{text}. If that issuer is your company's TLS-inspecting proxy, {where}: a PEM bundle with its CA"
            " certificate (added to the system's CAs)"
        )
    if isinstance(error, aiohttp.ClientConnectorDNSError):
        return f"DNS lookup of {url.host} failed ({route.describe()}): {_os_reason(error)}"
    if isinstance(error, aiohttp.ClientConnectorError):
        return f"cannot connect to {target} ({route.describe()}): {_os_reason(error)}"
    detail = scrub(str(error))
    name = type(error).__name__
    return f"{name}: {detail}" if detail else name


def _os_reason(error: aiohttp.ClientConnectorError) -> str:
    return scrub(error.os_error.strerror or str(error.os_error))


async def _presented_certificate(url: URL, route: Route, timeout_s: float) -> tuple[str, str] | None:
    """Subject and issuer of the certificate ``url``'s host presents (through the same proxy), without trusting it.

    Nothing but a handshake and a CONNECT goes out: no path, no query, no key (the URL may be a credential).
    """
    host, port = url.host or "", url.port or 443
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # only to read what is presented: nothing is sent over this connection
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout_s):
            if route.proxy is None:
                _, writer = await asyncio.open_connection(host, port, ssl=context, server_hostname=host)
            else:
                reader, writer = await asyncio.open_connection(route.proxy.host, route.proxy.port)
                request = f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                if route.auth is not None:
                    request += f"Proxy-Authorization: {route.auth.header()}\r\n"
                writer.write(f"{request}\r\n".encode())
                head = await reader.readuntil(b"\r\n\r\n")
                if head.split(b" ", 2)[1:2] != [b"200"]:
                    return None
                await writer.start_tls(context, server_hostname=host)
            ssl_object = writer.get_extra_info("ssl_object")
            der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, IndexError):
        return None
    finally:
        if writer is not None:
            writer.close()
    if not der:
        return None
    from cryptography import x509

    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError:
        return None
    return cert.subject.rfc4514_string(), cert.issuer.rfc4514_string()
