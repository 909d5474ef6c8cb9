"""The "reference flow" of the API manual's Python example, run in its own process:

    requests.get(upload_url endpoint) -> open(file).read() -> requests.put(upload_url, data=bytes)

Usage: python bench/_reference.py BASE_URL API_KEY FILE. Prints one JSON line: phase times and this
process's peak RSS (VmHWM from /proc/self/status). Needs ``requests`` (a bench-only tool, not a dependency).
"""

from __future__ import annotations

import json
import sys
import time
import urllib.parse
from pathlib import Path

import requests


def vm_hwm_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return -1


def main() -> None:
    base_url, api_key, file = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    t0 = time.perf_counter()
    resp = requests.get(
        f"{base_url}/v1/external/retrain_jobs/upload_url",
        params={"filename": file.name},
        headers={"x-api-key": api_key},
        timeout=60,
    )
    resp.raise_for_status()
    upload_url = resp.json()["upload_url"]
    t1 = time.perf_counter()
    with open(file, "rb") as f:
        data = f.read()
    t2 = time.perf_counter()
    put = requests.put(upload_url, data=data, timeout=600)
    t3 = time.perf_counter()
    print(json.dumps({
        "status": put.status_code,
        "get_s": t1 - t0,
        "read_s": t2 - t1,
        "put_s": t3 - t2,
        "total_s": t3 - t0,
        "bytes": len(data),
        "vm_hwm_kib": vm_hwm_kib(),
        "url_path": urllib.parse.urlsplit(upload_url).path,
    }))


if __name__ == "__main__":
    main()
