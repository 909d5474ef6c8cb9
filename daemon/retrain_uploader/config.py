"""Settings: one frozen tree built from a TOML file by :meth:`Settings.from_toml`.

pydantic does the validation so that every error names the key it is about; :class:`ConfigError` adds the file.
"""

from __future__ import annotations

import os
import ssl
import stat
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Self
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from .bandwidth import CLOSED, Timetable, parse_rate, parse_rule

__all__ = ["DEFAULT_CONFIG_PATH", "ConfigError", "ModelSettings", "Settings", "UploadSettings", "default_config_path"]

DEFAULT_CONFIG_PATH = Path("/etc/retrain-uploader/config.toml")
_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"

PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]


class ConfigError(ValueError):
    """The configuration (or a key source it names) is unusable; the message names the file and the key."""


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ApiSettings(_Section):
    base_url: str = "https://developer-api.predictionone.sony.biz"
    connect_timeout_s: PositiveFloat = 10.0
    request_timeout_s: PositiveFloat = 60.0
    # A PUT of several GB on a slow uplink takes long: this bounds silence on the socket, not the whole upload.
    upload_read_timeout_s: PositiveFloat = 300.0
    # "http://[user:password@]host:port": every request goes through it (CONNECT for https). Unset: HTTPS_PROXY,
    # HTTP_PROXY and NO_PROXY from the environment, as curl reads them.
    proxy: str | None = None
    proxy_password_file: Path | None = None  # the proxy user's password, kept outside the config
    ca_file: Path | None = None  # PEM bundle added to the system's CAs (a TLS-inspecting proxy's CA)

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            msg = "must start with http:// or https://"
            raise ValueError(msg)
        return value.rstrip("/")

    @field_validator("proxy")
    @classmethod
    def _proxy_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        from yarl import URL

        url = URL(value)
        # The message never repeats the value: it may hold a password.
        if url.scheme != "http" or not url.host or url.explicit_port is None or url.path not in ("", "/") or url.query:
            msg = "must look like http://[user:password@]host:port (the proxy's own scheme is http, also for https)"
            raise ValueError(msg)
        return value

    @field_validator("ca_file")
    @classmethod
    def _pem_bundle(cls, value: Path | None) -> Path | None:
        if value is not None:
            context = ssl.create_default_context()
            try:
                context.load_verify_locations(cafile=str(value))
            except (ssl.SSLError, ValueError):  # before OSError: SSLError is one
                msg = f"{value} holds no PEM certificate that can be parsed"
                raise ValueError(msg) from None
            except OSError as e:
                msg = f"cannot read {value}: {e.strerror}"
                raise ValueError(msg) from None
        return value

    @model_validator(mode="after")
    def _password_has_user(self) -> Self:
        if self.proxy_password_file is not None:
            from yarl import URL

            url = URL(self.proxy) if self.proxy is not None else None
            if url is None or not url.user or url.password is not None:
                msg = "proxy_password_file needs proxy = \"http://USER@host:port\" (a user, and no password in it)"
                raise ValueError(msg)
            _read_password(self.proxy_password_file)  # checked at start; read again on every reload
        return self

    def read_proxy_password(self) -> str | None:
        """The proxy password from ``proxy_password_file``, read now (an edited file is seen on reload)."""
        if self.proxy_password_file is None:
            return None
        try:
            return _read_password(self.proxy_password_file)
        except ValueError as e:
            raise ConfigError(f"api.{e}") from None


SECRET_FILE_MAX_BYTES = 4096  # an API key or a password is a line; more is the wrong file


class _NotASecret(ValueError):
    """A secret's file that is not a small regular file: refused before a byte of it is read."""


def read_secret_file(path: Path) -> str:
    """The text of a small regular file (a key, a password), read without ever blocking on it.

    A FIFO or a device would block the reader (the event loop, at a reload) forever and a huge file would be read
    whole: both are refused (``_NotASecret``); a file that cannot be opened raises ``OSError``.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # O_NONBLOCK: opening a FIFO does not wait
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            msg = f"{path} is not a regular file"
            raise _NotASecret(msg)
        if info.st_size > SECRET_FILE_MAX_BYTES:
            msg = f"{path} is larger than {SECRET_FILE_MAX_BYTES} bytes ({info.st_size}): not a key or password file"
            raise _NotASecret(msg)
        data = os.read(fd, SECRET_FILE_MAX_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > SECRET_FILE_MAX_BYTES:  # grew after the check
        msg = f"{path} is larger than {SECRET_FILE_MAX_BYTES} bytes: not a key or password file"
        raise _NotASecret(msg)
    return data.decode("utf-8")


def _read_password(path: Path) -> str:
    try:
        password = read_secret_file(path).strip()
    except _NotASecret as e:
        msg = f"proxy_password_file: {e}"
        raise ValueError(msg) from None
    except OSError as e:
        msg = f"proxy_password_file: cannot read {path}: {e.strerror}"
        raise ValueError(msg) from None
    if not password or any(c in password for c in "\r\n"):
        msg = f"proxy_password_file: {path} must hold one line, the password"
        raise ValueError(msg)
    return password


class LedgerSettings(_Section):
    path: Path = Path("/var/lib/retrain-uploader/ledger.sqlite3")
    # Pair zips are built here; it must be on a disk with room for the largest pair. Default: beside the ledger.
    staging_dir: Path | None = None
    # Jobs with nothing left to do (failed, duplicate, finished and downloaded, switched, retrain_failed or _timeout)
    # whose last change is older than this are deleted with their events; None keeps every job. Duplicate detection
    # then reaches back this far only. Each model's reference header (its newest finished job) is always kept.
    keep_days: PositiveFloat | None = None


class RetentionSettings(_Section):
    """Opt-in clean-up: nothing is deleted unless asked."""

    # Files in each inbox's done/ older than this (the later of their mtime and ctime: the move into done/ counts)
    # are deleted; None keeps them all. Never outside done/, never below it, never a symlink, never a file of a job
    # still under way.
    done_days: PositiveFloat | None = None
    interval_s: PositiveFloat = 3600.0  # how often keep_days and done_days are applied (also at start and reload)


class WatchSettings(_Section):
    settle_s: NonNegativeFloat = 5.0
    force_polling: bool = False
    rescan_s: PositiveFloat = 60.0
    poll_delay_ms: Annotated[int, Field(ge=50)] = 300


class RetrySettings(_Section):
    base_delay_s: PositiveFloat = 1.0
    max_delay_s: PositiveFloat = 300.0
    max_attempts: Annotated[int, Field(ge=1)] = 12
    paused_retry_s: PositiveFloat = 300.0
    # After a PUT whose answer was lost, an unchanged remote status is read as "not arrived" (and the file sent
    # again) only once this long has passed: the status may change some time after the upload lands.
    unknown_outcome_wait_s: NonNegativeFloat = 300.0

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if self.max_delay_s < self.base_delay_s:
            msg = "max_delay_s must be >= base_delay_s"
            raise ValueError(msg)
        return self


class PoolSettings(_Section):
    workers: Annotated[int, Field(ge=1, le=64)] = 4
    queue_size: Annotated[int, Field(ge=1)] = 1000
    shutdown_grace_s: NonNegativeFloat = 30.0


class PackagingSettings(_Section):
    zip_level: Annotated[int, Field(ge=0, le=9)] = 1
    max_zip_ratio: PositiveFloat = 200.0
    max_uncompressed_bytes: Annotated[int, Field(gt=0)] = 64 << 30
    # A CSV at least this big is hashed first and checked while it is sent (one pass); a smaller one is checked
    # before any API call (milliseconds), so a bad small file never creates a remote job.
    stream_check_min_bytes: Annotated[int, Field(ge=0)] = 8 << 20


class StatusSettings(_Section):
    """Following each upload to its end with the Retrain Status Check API."""

    poll_s: PositiveFloat = 60.0  # the first interval between checks of a job; spread evenly, never in one burst
    # The interval grows with the job's age (a tenth of it) up to this ceiling: a retraining that has run for hours
    # needs no check every minute. Below poll_s, poll_s is the ceiling.
    max_poll_s: PositiveFloat = 600.0
    # Status checks in flight at once, apart from the upload workers: polls never take an upload's place.
    max_concurrent_polls: Annotated[int, Field(ge=1)] = 8
    max_poll_delay_s: PositiveFloat = 3600.0  # backoff ceiling while status checks fail
    # A retraining still "in progress" after being watched this long (status answers received; time the daemon was
    # down or the model paused does not count) ends as retrain_timeout.
    give_up_after_h: PositiveFloat = 48.0
    download_result: bool = True
    # A result larger than this is not downloaded (result_path ""); downloads run beside the polls, two at a time.
    max_result_bytes: Annotated[int, Field(gt=0)] = 1 << 30
    # `status --check` warns when a file has waited in an inbox longer than this.
    alert_waiting_s: PositiveFloat = 3600.0


class MetricsSettings(_Section):
    enabled: bool = False
    host: str = "127.0.0.1"  # loopback: put a reverse proxy in front to expose it
    port: Annotated[int, Field(ge=0, le=65535)] = 9464


def _rule(text: str) -> str:
    parse_rule(text)  # raises a ValueError that quotes the part at fault
    return text


def _byte_rate(value: object) -> object:
    if isinstance(value, str):  # "2MB/s" reads better than 2000000
        rate = parse_rate(value)
        if rate == CLOSED:
            msg = "closed is a schedule rule's rate, not a cap"
            raise ValueError(msg)
        return rate
    return value


class UploadSettings(_Section):
    """Sharing the line: a cap on PUT bodies (all workers together) and a weekly timetable. API calls are free."""

    max_bytes_per_s: Annotated[int | None, BeforeValidator(_byte_rate), Field(ge=1)] = None
    # "[DAYS] [HH:MM-HH:MM] RATE", the first match wins; none matching: max_bytes_per_s.
    schedule: tuple[Annotated[str, AfterValidator(_rule)], ...] = ()
    timezone: str | None = None  # IANA name; None: the host's
    on_close: Literal["finish", "abort"] = "finish"

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                ZoneInfo(value)
            except (ZoneInfoNotFoundError, ValueError):
                msg = f'"{value}" is not an IANA time zone (e.g. "Asia/Tokyo", "Europe/Paris", "UTC")'
                raise ValueError(msg) from None
        return value

    def timetable(self) -> Timetable:
        zone = ZoneInfo(self.timezone) if self.timezone is not None else None
        return Timetable(tuple(parse_rule(rule) for rule in self.schedule), self.max_bytes_per_s, zone)


class LoggingSettings(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    # Also write JSON lines to this file (reopened when logrotate moves it away). stderr always gets them.
    file: Path | None = None
    # During a PUT, `upload.progress` (and STATUS=, and the ledger's bytes_sent) this often.
    progress_s: PositiveFloat = 30.0


class ModelSettings(_Section):
    name: Annotated[str, Field(pattern=_NAME_PATTERN)]
    inbox: Path
    # The manual expects a person to review the retraining result before the published model is replaced.
    auto_switch: bool = False
    api_key_file: Path | None = None
    api_key_env: str | None = None
    api_key_credential: str | None = None
    # The model's own rules for its data (all optional; see README "Model rules").
    target: str | None = None
    task: Literal["binary", "multiclass", "regression"] | None = None
    columns: Literal["no_missing", "same", "any"] = "no_missing"
    header_file: Path | None = None
    max_empty_target_ratio: Annotated[float, Field(ge=0, le=1)] = 0.5

    @model_validator(mode="after")
    def _task_needs_target(self) -> Self:
        if self.task is not None and self.target is None:
            msg = "task needs target (the column to predict)"
            raise ValueError(msg)
        return self

    @model_validator(mode="after")
    def _one_key_source(self) -> Self:
        sources = [s for s in (self.api_key_file, self.api_key_env, self.api_key_credential) if s is not None]
        if len(sources) != 1:
            msg = "set exactly one of api_key_file, api_key_env, api_key_credential"
            raise ValueError(msg)
        return self

    def read_api_key(self) -> str:
        """Read this model's key from its source now (so an edited key file is seen on reload)."""
        where: str
        if self.api_key_env is not None:
            where = f"environment variable {self.api_key_env}"
            if self.api_key_env not in os.environ:
                msg = f"models.{self.name}.api_key_env: {where} is not set"
                raise ConfigError(msg)
            key = os.environ[self.api_key_env]
        else:
            if self.api_key_file is not None:
                path = self.api_key_file
            else:
                cred_dir = os.environ.get("CREDENTIALS_DIRECTORY")
                if not cred_dir:
                    msg = f"models.{self.name}.api_key_credential: $CREDENTIALS_DIRECTORY is not set"
                    raise ConfigError(msg)
                path = Path(cred_dir) / str(self.api_key_credential)
            where = f"key file {path}"
            source = "api_key_file" if self.api_key_file else "api_key_credential"
            try:
                key = read_secret_file(path)
            except _NotASecret as e:
                msg = f"models.{self.name}.{source}: key file {e}"
                raise ConfigError(msg) from None
            except (OSError, UnicodeDecodeError) as e:
                reason = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
                msg = f"models.{self.name}.{source}: cannot read {where}: {reason}"
                raise ConfigError(msg) from e
        key = key.strip()
        if not key:
            msg = f"models.{self.name}: {where} is empty"
            raise ConfigError(msg)
        if any(c.isspace() for c in key) or not key.isprintable():
            msg = f"models.{self.name}: {where} holds more than one token (whitespace inside the key)"
            raise ConfigError(msg)
        return key


class Settings(_Section):
    """The whole configuration. Build it with :meth:`from_toml`."""

    api: ApiSettings = ApiSettings()
    ledger: LedgerSettings = LedgerSettings()
    watch: WatchSettings = WatchSettings()
    retry: RetrySettings = RetrySettings()
    pool: PoolSettings = PoolSettings()
    packaging: PackagingSettings = PackagingSettings()
    status: StatusSettings = StatusSettings()
    metrics: MetricsSettings = MetricsSettings()
    logging: LoggingSettings = LoggingSettings()
    upload: UploadSettings = UploadSettings()
    retention: RetentionSettings = RetentionSettings()
    models: Annotated[tuple[ModelSettings, ...], Field(min_length=1)]
    source: Path | None = None

    @model_validator(mode="after")
    def _distinct_models(self) -> Self:
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            msg = "model names must be unique"
            raise ValueError(msg)
        return self

    @model_validator(mode="after")
    def _folders_apart(self) -> Self:
        # The daemon moves or rejects whatever lies in an inbox, and deletes zips left in staging at start: an inbox
        # sharing ground with another inbox, the ledger, staging or the log file loses files. Staging beside or
        # inside the ledger's folder is fine (its clean-up only touches *.zip and *.part directly in it).
        problems = _overlaps(self)
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @property
    def staging_dir(self) -> Path:
        return self.ledger.staging_dir or self.ledger.path.parent / "staging"

    def model(self, name: str) -> ModelSettings:
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(name)

    @classmethod
    def from_toml(cls, path: Path) -> Settings:
        """Load and validate ``path``; relative paths inside it are taken relative to its folder."""
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as e:
            msg = f"{path}: cannot read the config file: {e.strerror}"
            raise ConfigError(msg) from e
        except tomllib.TOMLDecodeError as e:
            msg = f"{path}: not valid TOML: {e}"
            raise ConfigError(msg) from e
        return cls.from_mapping(raw, source=path)

    @classmethod
    def from_mapping(cls, raw: dict[str, Any], *, source: Path | None = None) -> Settings:
        base = source.parent if source is not None else Path.cwd()
        raw = _absolutize(raw, base)
        try:
            return cls.model_validate({**raw, "source": source})
        except ValidationError as e:
            raise ConfigError(_describe(e, raw, source)) from e


@dataclass(frozen=True, slots=True)
class _Place:
    key: str
    path: Path  # as configured
    real: Path  # symlinks resolved: what is compared
    # "folder": no inbox may be, contain or lie inside it; "ledger": nor its folder; "file": it must not lie in an inbox
    kind: str = "folder"

    def __str__(self) -> str:
        shown = str(self.path) if self.real == self.path else f"{self.path} → {self.real}"
        return f"{self.key} ({shown})"


def _place(key: str, path: Path, kind: str = "folder") -> _Place:
    return _Place(key, path, path.resolve(), kind)


def _overlaps(settings: Settings) -> list[str]:
    """One line per clash of an inbox with another inbox (or its done/ and failed/), the ledger's folder, the staging
    folder, or a file the daemon writes or reads (log, config, key, proxy password, CA bundle, header file)."""
    inboxes = [_place(f"models[{i}] ({m.name}).inbox", m.inbox) for i, m in enumerate(settings.models)]
    ledger = _place("ledger.path", settings.ledger.path, "ledger")
    others = [ledger]
    staging = _place("ledger.staging_dir", settings.staging_dir)
    if settings.ledger.staging_dir is not None or not staging.real.is_relative_to(ledger.real.parent):
        others.append(staging)  # the default lies in the ledger's folder: its clashes are the ledger's, named so
    if settings.logging.file is not None:
        others.append(_place("logging.file", settings.logging.file, "file"))
    if settings.source is not None:
        others.append(_place("the config file", settings.source, "file"))
    # Files the daemon reads: in an inbox it would take them as data (a header CSV uploaded, a key moved to failed/).
    for key in ("proxy_password_file", "ca_file"):
        value = getattr(settings.api, key)
        if value is not None:
            others.append(_place(f"api.{key}", value, "file"))
    for i, m in enumerate(settings.models):
        for key in ("api_key_file", "header_file"):
            value = getattr(m, key)
            if value is not None:
                others.append(_place(f"models[{i}] ({m.name}).{key}", value, "file"))
    problems = []
    for i, inbox in enumerate(inboxes):
        for earlier in inboxes[:i]:
            problems += _clash(earlier, inbox)
        for other in others:
            problems += _clash(other, inbox)
    return problems


def _clash(place: _Place, inbox: _Place) -> list[str]:
    if place.kind != "folder":  # a file: it must not lie in an inbox (nor, for the ledger, its folder hold one)
        folder = place.real.parent
        if folder.is_relative_to(inbox.real):
            return [f"{place} lies inside {inbox}"]
        if place.kind == "ledger" and inbox.real.is_relative_to(folder):
            return [f"{inbox} lies inside the folder of {place}"]
        return []
    if place.real == inbox.real:
        return [f"{inbox} is the same folder as {place}"]
    if place.real.is_relative_to(inbox.real):
        return [f"{place} lies inside {inbox}"]
    if inbox.real.is_relative_to(place.real):
        return [f"{inbox} lies inside {place}"]
    return []


def default_config_path() -> Path:
    env = os.environ.get("RETRAIN_UPLOADER_CONFIG")
    return Path(env) if env else DEFAULT_CONFIG_PATH


def loose_permissions(path: Path) -> bool:
    """True when ``path`` is readable or writable by users other than its owner and group."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return False
    return bool(mode & (stat.S_IROTH | stat.S_IWOTH))


def _absolutize(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    def fix(value: Any) -> Any:
        if isinstance(value, str) and value and not Path(value).is_absolute():
            return str(base / value)
        return value

    out = dict(raw)
    if isinstance(out.get("api"), dict):
        out["api"] = {k: fix(v) if k in ("proxy_password_file", "ca_file") else v for k, v in out["api"].items()}
    if isinstance(out.get("ledger"), dict):
        ledger = dict(out["ledger"])
        for key in ("path", "staging_dir"):
            if key in ledger:
                ledger[key] = fix(ledger[key])
        out["ledger"] = ledger
    if isinstance(out.get("logging"), dict) and "file" in out["logging"]:
        out["logging"] = {**out["logging"], "file": fix(out["logging"]["file"])}
    if isinstance(out.get("models"), list):
        models = []
        for m in out["models"]:
            if isinstance(m, dict):
                m = dict(m)
                for key in ("inbox", "api_key_file", "header_file"):
                    if key in m:
                        m[key] = fix(m[key])
            models.append(m)
        out["models"] = models
    return out


def _describe(error: ValidationError, raw: dict[str, Any], source: Path | None) -> str:
    where = str(source) if source is not None else "<config>"
    lines = []
    items = error.errors()
    if any(len(i["loc"]) > 1 and i["loc"][0] == "models" for i in items):
        # A model that failed validation also leaves the list short: that second error only confuses.
        items = [i for i in items if not (i["loc"] == ("models",) and i["type"] == "too_short")]
    for item in items:
        parts: list[str] = []
        loc = list(item["loc"])
        for i, part in enumerate(loc):
            if part == "models" and i + 1 < len(loc) and isinstance(loc[i + 1], int):
                index = int(loc[i + 1])
                models = raw.get("models") or []
                name = models[index].get("name") if index < len(models) and isinstance(models[index], dict) else None
                parts.append(f"models[{index}]" + (f" ({name})" if name else ""))
            elif isinstance(part, int) and parts and parts[-1].startswith("models["):
                continue
            elif isinstance(part, int) and parts:
                parts[-1] += f"[{part}]"  # upload.schedule[1]
            else:
                parts.append(str(part))
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key (misspelt?)"
        if not parts:  # a check across sections: its message names the keys, one problem a line
            lines += [f"{where}: {line}" for line in message.splitlines()]
            continue
        lines.append(f"{where}: {'.'.join(parts)}: {message}")
    return "\n".join(lines)
