"""Behind a corporate proxy: a real CONNECT proxy with Basic auth, the emulator over https with a test CA, and host
names only the proxy resolves, so a finished upload proves every request (API, presigned PUT, result) went through it.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography import x509

from retrain_uploader.admin import check_keys_online, collect, render
from retrain_uploader.config import ConfigError, Settings
from retrain_uploader.emulator import Emulator
from retrain_uploader.ledger import Ledger, State
from retrain_uploader.network import PROXY_AUTH_FAILED
from retrain_uploader.redact import REDACTED, scrub

from ._proxy import ForwardProxy
from .conftest import KEYS, Daemon, drop, wait_for

API_HOST = "api.example.test"
STORAGE_HOST = "storage.example.test"
PASSWORD = "pr0xy-s3cret-pw"  # noqa: S105 -- a test proxy's password, checked never to leak
CSV = "a,b,target\n1,2,yes\n3,4,no\n"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA(organization_name="Example Corp Inspection")


@pytest.fixture
def ca_file(tmp_path: Path, ca: trustme.CA) -> Path:
    path = tmp_path / "corp-ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture
async def make_emulator(tmp_path: Path, ca: trustme.CA) -> AsyncIterator[Callable[..., Awaitable[Emulator]]]:
    started: list[Emulator] = []

    async def make(public_host: str = API_HOST) -> Emulator:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert(API_HOST, STORAGE_HOST, "127.0.0.1").configure_cert(context)
        store = tmp_path / "tls-emulator-store"
        store.mkdir(exist_ok=True)
        emu = Emulator(
            keys=KEYS, store_dir=store, ssl_context=context, public_host=public_host, storage_host=STORAGE_HOST
        )
        await emu.start()
        started.append(emu)
        return emu

    yield make
    for emu in started:
        await emu.stop()


@pytest.fixture
async def tls_emulator(make_emulator: Callable[..., Awaitable[Emulator]]) -> Emulator:
    return await make_emulator()


@pytest.fixture
async def proxy() -> AsyncIterator[ForwardProxy]:
    async with ForwardProxy({API_HOST: "127.0.0.1", STORAGE_HOST: "127.0.0.1"}) as p:
        yield p


@pytest.fixture(autouse=True)
def _no_env_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


def write_config(tmp_path: Path, base_url: str, **api: Any) -> Settings:
    """A real config file (so reload works), fast delays, two models."""
    keys = tmp_path / "keys"
    keys.mkdir(exist_ok=True)
    (tmp_path / "inbox").mkdir(exist_ok=True)
    (keys / "alpha").write_text("key-alpha-0001\n")
    (keys / "beta").write_text("key-beta-0002\n")
    api_lines = [f"base_url = {json.dumps(base_url)}", "request_timeout_s = 5", "upload_read_timeout_s = 5"]
    api_lines += [f"{k} = {json.dumps(str(v))}" for k, v in api.items()]
    text = "\n".join(
        [
            "[api]",
            *api_lines,
            "[ledger]",
            f"path = {json.dumps(str(tmp_path / 'state' / 'ledger.sqlite3'))}",
            "[watch]\nsettle_s = 0.05\nrescan_s = 0.5",
            "[retry]\nbase_delay_s = 0.01\nmax_delay_s = 0.05\nmax_attempts = 1000\npaused_retry_s = 30",
            "[pool]\nworkers = 2\nshutdown_grace_s = 5",
            "[status]\npoll_s = 0.1\nmax_poll_delay_s = 0.5",
            "[[models]]",
            f'name = "alpha"\ninbox = {json.dumps(str(tmp_path / "inbox" / "alpha"))}',
            f"api_key_file = {json.dumps(str(keys / 'alpha'))}",
            "[[models]]",
            f'name = "beta"\ninbox = {json.dumps(str(tmp_path / "inbox" / "beta"))}',
            f"api_key_file = {json.dumps(str(keys / 'beta'))}",
        ]
    )
    path = tmp_path / "config.toml"
    path.write_text(text + "\n")
    return Settings.from_toml(path)


async def upload_one(start_daemon: Callable[..., Awaitable[Daemon]], settings: Settings) -> Daemon:
    """Drop one file; wait until its retraining finished and its result was downloaded."""
    daemon = await start_daemon(settings)
    drop(daemon.inbox("alpha"), "sales.csv", CSV)

    def finished() -> bool:
        jobs = daemon.jobs()
        return len(jobs) == 1 and jobs[0].state is State.FINISHED and bool(jobs[0].result_path)

    await wait_for(finished, 15, "the job finished with its result downloaded")
    return daemon


def tunnels_to(proxy: ForwardProxy, status: int = 200) -> set[str]:
    return {t.host for t in proxy.tunnels if t.status == status}


async def test_config_proxy_carries_every_request(
    tmp_path: Path, tls_emulator: Emulator, proxy: ForwardProxy, ca_file: Path, start_daemon: Any
) -> None:
    settings = write_config(tmp_path, tls_emulator.base_url, proxy=proxy.url, ca_file=ca_file)
    await upload_one(start_daemon, settings)
    # Neither name resolves here: only the proxy knows them. The API, the PUT and the result download all went there.
    assert tunnels_to(proxy) == {API_HOST, STORAGE_HOST}
    endpoints = {r.endpoint for r in tls_emulator.requests}
    assert {"upload_url", "put", "status", "result"} <= endpoints
    assert len(tls_emulator.uploads) == 1


@pytest.mark.parametrize("variable", ["HTTPS_PROXY", "https_proxy"])
async def test_environment_proxy_is_honoured(
    tmp_path: Path,
    tls_emulator: Emulator,
    proxy: ForwardProxy,
    ca_file: Path,
    start_daemon: Any,
    monkeypatch: pytest.MonkeyPatch,
    variable: str,
) -> None:
    monkeypatch.setenv(variable, proxy.url)
    settings = write_config(tmp_path, tls_emulator.base_url, ca_file=ca_file)
    await upload_one(start_daemon, settings)
    assert tunnels_to(proxy) == {API_HOST, STORAGE_HOST}


async def test_no_proxy_goes_direct_for_the_hosts_it_names(
    tmp_path: Path,
    make_emulator: Callable[..., Awaitable[Emulator]],
    proxy: ForwardProxy,
    ca_file: Path,
    start_daemon: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    emulator = await make_emulator(public_host="127.0.0.1")  # the API answers on an address this host reaches
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1")
    settings = write_config(tmp_path, emulator.base_url, ca_file=ca_file)
    await upload_one(start_daemon, settings)
    # The API went direct (NO_PROXY); the storage host, which only the proxy resolves, through the proxy.
    assert tunnels_to(proxy) == {STORAGE_HOST}
    assert {"upload_url", "status"} <= {r.endpoint for r in emulator.requests}


async def test_proxy_password_file_authenticates_and_stays_secret(
    tmp_path: Path, tls_emulator: Emulator, ca_file: Path, start_daemon: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    password_file = tmp_path / "proxy-password"
    password_file.write_text(PASSWORD + "\n")
    hosts = {API_HOST: "127.0.0.1", STORAGE_HOST: "127.0.0.1"}
    async with ForwardProxy(hosts, credentials=("bob", PASSWORD)) as proxy:
        settings = write_config(
            tmp_path,
            tls_emulator.base_url,
            proxy=proxy.url_with("bob"),
            proxy_password_file=password_file,
            ca_file=ca_file,
        )
        daemon = await upload_one(start_daemon, settings)
        await daemon.stop()
    assert {(t.host, t.user) for t in proxy.tunnels if t.status == 200} == {(API_HOST, "bob"), (STORAGE_HOST, "bob")}
    with Ledger(settings.ledger.path) as ledger:
        report = collect(settings, ledger)
    shown = render(report) + json.dumps(report) + capsys.readouterr().err
    stored = b"".join(p.read_bytes() for p in settings.ledger.path.parent.iterdir() if p.is_file())
    assert PASSWORD not in shown
    assert PASSWORD.encode() not in stored


async def test_proxy_407_pauses_every_model_until_the_password_is_fixed_and_reloaded(
    tmp_path: Path, tls_emulator: Emulator, ca_file: Path, start_daemon: Any
) -> None:
    password_file = tmp_path / "proxy-password"
    password_file.write_text("wrong-password\n")
    hosts = {API_HOST: "127.0.0.1", STORAGE_HOST: "127.0.0.1"}
    async with ForwardProxy(hosts, credentials=("bob", PASSWORD)) as proxy:
        settings = write_config(
            tmp_path,
            tls_emulator.base_url,
            proxy=proxy.url_with("bob"),
            proxy_password_file=password_file,
            ca_file=ca_file,
        )
        daemon = await start_daemon(settings)
        dropped = drop(daemon.inbox("alpha"), "sales.csv", CSV)

        def paused() -> dict[str, Any] | None:
            with Ledger(settings.ledger.path) as ledger:
                models = ledger.models()
            reasons = {name: models.get(name, {}).get("paused_reason") for name in ("alpha", "beta")}
            return reasons if all(reasons.values()) else None

        reasons = await wait_for(paused, 10, "both models paused")
        assert reasons == {"alpha": PROXY_AUTH_FAILED, "beta": PROXY_AUTH_FAILED}
        assert tls_emulator.requests == []  # nothing got past the proxy
        assert dropped.exists()  # nothing lost: the file waits in its inbox
        assert {t.status for t in proxy.tunnels} == {407}

        password_file.write_text(PASSWORD + "\n")
        assert daemon.service.reload()

        def finished() -> bool:
            jobs = daemon.jobs()
            return len(jobs) == 1 and jobs[0].state in (State.FINISHED, State.UPLOADED, State.RETRAINING)

        await wait_for(finished, 10, "the upload after the reload")
        with Ledger(settings.ledger.path) as ledger:
            assert all(not m.get("paused_reason") for m in ledger.models().values())
        assert len(tls_emulator.uploads) == 1


async def test_proxy_down_then_up_loses_nothing(
    tmp_path: Path, tls_emulator: Emulator, ca_file: Path, start_daemon: Any
) -> None:
    proxy = ForwardProxy({API_HOST: "127.0.0.1", STORAGE_HOST: "127.0.0.1"})
    await proxy.start()
    await proxy.stop()  # its port is known, nobody listens there
    settings = write_config(tmp_path, tls_emulator.base_url, proxy=proxy.url, ca_file=ca_file)
    daemon = await start_daemon(settings)
    dropped = drop(daemon.inbox("alpha"), "sales.csv", CSV)

    def proxy_error() -> str | None:
        with Ledger(settings.ledger.path) as ledger:
            error = ledger.models().get("alpha", {}).get("last_error")
        return error if error and "cannot connect to the proxy" in error else None

    error = await wait_for(proxy_error, 10, "an error naming the proxy")
    assert f"cannot connect to the proxy {proxy.url}" in error
    assert dropped.exists() or daemon.jobs()  # still held: in the inbox or as an open job
    assert all(not j.closed for j in daemon.jobs())
    await proxy.start()
    try:

        def finished() -> bool:
            jobs = daemon.jobs()
            return len(jobs) == 1 and jobs[0].state is State.FINISHED and bool(jobs[0].result_path)

        await wait_for(finished, 15, "the upload once the proxy is back")
        assert len(tls_emulator.uploads) == 1
    finally:
        await daemon.stop()
        await proxy.stop()


async def test_untrusted_certificate_is_named_with_its_issuer_and_ca_file(
    tmp_path: Path, tls_emulator: Emulator, proxy: ForwardProxy, ca: trustme.CA
) -> None:
    settings = write_config(tmp_path, tls_emulator.base_url, proxy=proxy.url)  # no ca_file: the test CA is unknown
    problems = await check_keys_online(settings)
    issuer = x509.load_pem_x509_certificate(ca.cert_pem.bytes()).subject.rfc4514_string()
    assert len(problems) == 2  # one per model
    for problem in problems:
        assert f"TLS verification of {API_HOST}:{tls_emulator.port}" in problem
        assert f"issuer {issuer!r}" in problem
        assert "set [api] ca_file" in problem
    assert tls_emulator.requests == []  # no request (and no key) went to a host we could not verify


async def test_check_config_online_prints_the_diagnosis_and_fails(
    tmp_path: Path, tls_emulator: Emulator, ca_file: Path
) -> None:
    hosts = {API_HOST: "127.0.0.1", STORAGE_HOST: "127.0.0.1"}
    async with ForwardProxy(hosts, credentials=("bob", PASSWORD)) as proxy:
        wrong = proxy.url_with("bob", "wrong-pw")
        settings = write_config(tmp_path, tls_emulator.base_url, proxy=wrong, ca_file=ca_file)
        assert settings.source is not None
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "retrain_uploader.cli", "check-config", "--config", str(settings.source), "--online",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
        )
        out, err = await asyncio.wait_for(process.communicate(), 20)
    text = (out + err).decode()
    assert process.returncode != 0
    assert PROXY_AUTH_FAILED in text
    assert f"the proxy {proxy.url}" in text
    assert "wrong-pw" not in text


async def test_check_config_online_passes_through_the_proxy(
    tmp_path: Path, tls_emulator: Emulator, proxy: ForwardProxy, ca_file: Path
) -> None:
    settings = write_config(tmp_path, tls_emulator.base_url, proxy=proxy.url, ca_file=ca_file)
    assert await check_keys_online(settings) == []
    assert tunnels_to(proxy) == {API_HOST}


async def test_dns_failure_at_the_proxy_names_the_proxy_hop(
    tmp_path: Path, tls_emulator: Emulator, proxy: ForwardProxy, ca_file: Path
) -> None:
    base_url = f"https://nowhere.example.test:{tls_emulator.port}"
    settings = write_config(tmp_path, base_url, proxy=proxy.url, ca_file=ca_file)
    problems = await check_keys_online(settings)
    assert problems and all(
        f"the proxy {proxy.url} refused to connect to nowhere.example.test:{tls_emulator.port}: HTTP 502" in p
        for p in problems
    )


async def test_direct_dns_failure_is_named(tmp_path: Path, ca_file: Path) -> None:
    settings = write_config(tmp_path, "https://nowhere.example.test:9", ca_file=ca_file)
    problems = await check_keys_online(settings)
    assert problems and all("DNS lookup of nowhere.example.test failed (directly)" in p for p in problems)


@pytest.mark.parametrize(
    ("api", "message"),
    [
        ({"proxy": "socks5://127.0.0.1:1080"}, "api.proxy: must look like http://"),
        ({"proxy": "http://127.0.0.1"}, "api.proxy: must look like http://"),
        ({"ca_file": "missing.pem"}, "api.ca_file: cannot read"),
        ({"ca_file": "not-pem.pem"}, "holds no PEM certificate"),
        ({"proxy": "http://127.0.0.1:3128", "proxy_password_file": "pw"}, "proxy_password_file needs proxy"),
        ({"proxy": "http://bob@127.0.0.1:3128", "proxy_password_file": "missing-pw"}, "cannot read"),
    ],
)
def test_bad_proxy_settings_are_refused_naming_the_key(tmp_path: Path, api: dict[str, str], message: str) -> None:
    (tmp_path / "not-pem.pem").write_text("hello\n")
    (tmp_path / "pw").write_text(PASSWORD)
    with pytest.raises(ConfigError) as info:
        write_config(tmp_path, "https://api.example.test", **api)
    assert message in str(info.value)
    assert PASSWORD not in str(info.value)


def test_a_password_in_the_proxy_url_is_never_shown(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        write_config(tmp_path, "https://api.example.test", proxy=f"https://bob:{PASSWORD}@proxy.corp")
    assert PASSWORD not in str(info.value)
    # Any line that quotes a proxy URL (an aiohttp message, a setting echoed back) loses the password, keeps the user.
    line = f"cannot connect to http://bob:{PASSWORD}@proxy.corp:3128"
    assert scrub(line) == f"cannot connect to http://bob:{REDACTED}@proxy.corp:3128"
