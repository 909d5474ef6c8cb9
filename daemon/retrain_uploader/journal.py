"""The systemd journal's native protocol: one datagram per record, with fields the journal can filter on.

When the service's stderr is the journal (``$JOURNAL_STREAM`` names stderr's device and inode, as systemd sets it
for ``StandardError=journal``), each log line is sent as a record whose ``MESSAGE`` is the very JSON line that would
have gone to stderr (``journalctl -o cat | jq`` keeps working), with ``PRIORITY`` from its level and the fields
``EVENT``, ``MODEL``, ``JOB_ID`` and ``RETRAIN_JOB_ID`` where the line has them — so ``journalctl -p err`` and
``journalctl JOB_ID=7`` need no jq.

Written here rather than taken from a library: the protocol is a documented datagram format of a few lines
(systemd's "Native Journal Protocol"), and we need exact control of MESSAGE and of the fallback to stderr. A record
too large for one datagram goes through a sealed memfd, as the protocol prescribes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import struct
from collections.abc import Mapping
from typing import Any, TextIO

__all__ = ["DEFAULT_SOCKET", "IDENTIFIER", "JournalSender", "journal_fields", "stderr_is_journal"]

DEFAULT_SOCKET = "/run/systemd/journal/socket"
IDENTIFIER = "retrain-uploader"
# The socket can be named for tests and for unusual set-ups; systemd's own is the default.
SOCKET_ENV = "RETRAIN_UPLOADER_JOURNAL_SOCKET"
_PRIORITIES = {"critical": 2, "error": 3, "exception": 3, "warning": 4, "warn": 4, "info": 6, "debug": 7}
_FIELDS = (("event", "EVENT"), ("model", "MODEL"), ("job_id", "JOB_ID"), ("retrain_job_id", "RETRAIN_JOB_ID"))


def stderr_is_journal(stream: TextIO, environ: Mapping[str, str] = os.environ) -> bool:
    """True when ``stream`` is the journal's stream socket that systemd connected (``$JOURNAL_STREAM=dev:ino``)."""
    spec = environ.get("JOURNAL_STREAM", "")
    dev, _, ino = spec.partition(":")
    if not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return st.st_dev == int(dev) and st.st_ino == int(ino)


def journal_fields(line: str) -> dict[str, str]:
    """The journal record of one rendered JSON log line."""
    fields = {"MESSAGE": line, "PRIORITY": "6", "SYSLOG_IDENTIFIER": IDENTIFIER}
    try:
        record: Any = json.loads(line)
    except ValueError:
        return fields
    if not isinstance(record, dict):
        return fields
    level = str(record.get("level") or record.get("log_level") or "info").lower()
    fields["PRIORITY"] = str(_PRIORITIES.get(level, 6))
    for key, name in _FIELDS:
        value = record.get(key)
        if value is not None and value != "":
            fields[name] = str(value)
    return fields


def _encode(fields: Mapping[str, str]) -> bytes:
    out = bytearray()
    for name, value in fields.items():
        data = value.encode("utf-8", "backslashreplace")
        if b"\n" in data:  # the binary form: name, newline, 64-bit little-endian length, the bytes, newline
            out += name.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += name.encode() + b"=" + data + b"\n"
    return bytes(out)


class JournalSender:
    """Sends records to the journal's datagram socket. ``send`` returns False when the journal cannot be reached, so
    the caller can write the line to stderr instead (nothing is lost)."""

    def __init__(self, path: str | None = None) -> None:
        self.path = path or os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    def close(self) -> None:
        self._sock.close()

    def send(self, fields: Mapping[str, str]) -> bool:
        payload = _encode(fields)
        try:
            self._sock.sendto(payload, self.path)
        except OSError as e:
            if e.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                return False
            return self._send_large(payload)
        return True

    def _send_large(self, payload: bytes) -> bool:
        try:
            fd = os.memfd_create("retrain-uploader-journal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        except (OSError, AttributeError):
            return False
        try:
            os.write(fd, payload)
            with contextlib.suppress(OSError):
                seals = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
                fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
            self._sock.sendmsg([], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))], 0, self.path)
        except OSError:
            return False
        finally:
            os.close(fd)
        return True
