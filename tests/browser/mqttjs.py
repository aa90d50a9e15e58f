"""The pinned mqtt.js browser bundle for the browser tests.

A copy is vendored in tests/browser/vendor/mqtt-<VERSION>/ (MIT, LICENSE.md
beside it), so the suite needs no network. `fetch` re-creates it from the npm
registry, verified against the registry's integrity for the tarball, for a
version bump:

    python tests/browser/mqttjs.py --refresh   # download into the vendor dir
    python tests/browser/mqttjs.py             # prints the path of mqtt.min.js
"""

from __future__ import annotations

import base64
import hashlib
import io
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


# sha256 of the vendored dist/mqtt.min.js, as unpacked from the verified tarball.
MIN_JS_SHA256 = "f3cbeae580d3010048938ee370f2db0c15d16e6f7fc147cb32ae5510e571b387"


def vendor_dir() -> Path:
    return Path(__file__).resolve().parent / "vendor" / f"mqtt-{VERSION}"


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
    """Path of the vendored mqtt.min.js, after checking it is the pinned file."""
    js = vendor_dir() / "mqtt.min.js"
    actual = hashlib.sha256(js.read_bytes()).hexdigest()
    if actual != MIN_JS_SHA256:
        raise RuntimeError(f"{js} is not mqtt.js {VERSION} (sha256 {actual})")
    return js


if __name__ == "__main__":
    if "--refresh" in sys.argv[1:]:
        fetch(vendor_dir())
    sys.stdout.write(f"{mqttjs_path()}\n")
