"""Secrets in values that the JSON rendering escapes once more are still scrubbed: each value is scrubbed before
rendering, and the rendered line again (found by an adversarial review when the per-value pass had been dropped;
these failed then). The real logging set-up in a real subprocess writing a real log file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .conftest import KEYS

KEY = next(iter(KEYS))


_LOGGING_SCRIPT = r'''
import json, sys
from pathlib import Path
import structlog
from retrain_uploader.logs import configure
from retrain_uploader.redact import register_secret
configure(level="info", file=Path(sys.argv[1]))
register_secret('pr\\ox"y')  # a proxy password with a backslash and a quote, as network.py registers it
log = structlog.get_logger("retrain_uploader")
# A JSON-escaped body excerpt inside an exception message (a storage node's JSON error quoted by another layer)
log.error("upload.failed", error='body: {\\"X-Amz-Credential\\":\\"AKIAEXAMPLEKEY\\"}')
# The registered password in its repr / JSON spelling (e.g. a repr of the proxy URL in an error)
log.error("proxy.failed", error=json.dumps("http://u:" + 'pr\\ox"y' + "@proxy:3128"))
# A header dump with a tab after the colon
log.error("upload.failed", error="x-amz-security-token:\tFwoGZXIvYXdzTOKEN")
'''


@pytest.mark.parametrize("leak", ["AKIAEXAMPLEKEY", "u:pr", "FwoGZXIvYXdzTOKEN"])
def test_values_a_per_value_scrub_caught_are_scrubbed_in_the_rendered_line(tmp_path: Path, leak: str) -> None:
    # feat/percost dropped redact.structlog_processor (each value scrubbed before rendering) and scrubs only the
    # rendered JSON line. Rendering escapes `"`, `\` and tabs once more, and the patterns and a registered secret's
    # spellings stop matching: these three were scrubbed before and reach the log file (and stderr/journal) now.
    import subprocess
    import sys

    log = tmp_path / "daemon.log"
    subprocess.run([sys.executable, "-c", _LOGGING_SCRIPT, str(log)], check=True, timeout=30, capture_output=True)
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(lines) == 3
    text = log.read_text()
    assert leak not in text, text  # "u:pr": the password right after its user
