"""Fetch the pinned mqtt.js browser bundle into a cache dir, verified against its npm integrity.

`scripts/setup` runs this (it has the network; the test suite may run in a
namespace with only loopback). Tests call `mqttjs_path()`, which uses the cache
and downloads only when it is empty. Standard library only.

    python tests/browser/mqttjs.py     # prints the path of mqtt.min.js
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import sys
import tarfile
import urllib.request
from pathlib import Path

VERSION = "5.16.0"
URL = f"https://registry.npmjs.org/mqtt/-/mqtt-{VERSION}.tgz"
# `npm pack mqtt@5.16.0 --json` -> integrity (the registry's dist.integrity).
INTEGRITY = (
    "sha512-G0VsEtuJz5sJUgZJaaADMVfW7SIFPzkIuHR+d6rk+tBeSwdCf"
    "d9BaIRycRfd2AbyFDEmLlFM+SDQeti/+IbOnw=="
)
MEMBERS = {"package/dist/mqtt.min.js": "mqtt.min.js", "package/LICENSE.md": "LICENSE.md"}


def cache_dir() -> Path:
    base = os.environ.get("EDGEAGENT_WEB_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "edgeagent-web"
    )
    return Path(base) / f"mqtt-{VERSION}"


def verify(tarball: bytes) -> None:
    algo, _, expected = INTEGRITY.partition("-")
    actual = base64.b64encode(hashlib.new(algo, tarball).digest()).decode()
    if actual != expected:
        raise RuntimeError(f"mqtt-{VERSION}.tgz integrity mismatch: {algo}-{actual}")


def fetch(dest: Path, timeout_s: float = 60.0) -> None:
    """Download, verify and unpack mqtt.min.js and its licence into `dest`."""
    with urllib.request.urlopen(URL, timeout=timeout_s) as resp:
        tarball = resp.read()
    verify(tarball)
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(tarball), mode="r:gz") as tar:
        for member, name in MEMBERS.items():
            f = tar.extractfile(member)
            if f is None:
                raise RuntimeError(f"{member} missing from mqtt-{VERSION}.tgz")
            tmp = dest / f".{name}.part"
            tmp.write_bytes(f.read())
            tmp.replace(dest / name)
    (dest / "VERSION").write_text(f"mqtt {VERSION} from {URL}\n{INTEGRITY}\n")


def mqttjs_path() -> Path:
    """Path of the cached mqtt.min.js, fetching it first if the cache is empty."""
    dest = cache_dir()
    js = dest / "mqtt.min.js"
    if not js.exists():
        fetch(dest)
    return js


if __name__ == "__main__":
    sys.stdout.write(f"{mqttjs_path()}\n")
