"""Helper process for the spool SIGKILL test: heavy puts and some acks until killed.

Usage: spool_child.py DB DURABILITY MAX_MESSAGES

Prints `ready` after opening, then `p SEQ` right after each put returns and
`a SEQ` right after each ack returns, flushing every line, so whatever the
parent reads was committed before it was printed.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Literal


def payload_for(seq: int) -> bytes:
    """A ~400-byte payload that only `seq` can produce."""
    digest = hashlib.sha256(str(seq).encode()).hexdigest()
    return f'{{"seq":{seq},"pad":"{digest * 6}"}}'.encode()


def main() -> None:
    from edgeagent.telemetry.spool import Spool

    db, max_messages = Path(sys.argv[1]), int(sys.argv[3])
    durability: Literal["normal", "full"] = "full" if sys.argv[2] == "full" else "normal"
    spool = Spool(db, durability=durability, max_messages=max_messages, min_free_mb=0.0)
    out = sys.stdout
    out.write("ready\n")
    out.flush()
    while True:
        seq = spool.put("edge/v1/dev/events", payload_for)
        out.write(f"p {seq}\n")
        out.flush()
        for batch in acks_after(seq):
            spool.ack_many(batch)
            out.write("".join(f"a {s}\n" for s in batch))
            out.flush()


def acks_after(seq: int) -> list[list[int]]:
    """The ack batches the child makes right after reporting the put of `seq`."""
    batches: list[list[int]] = []
    if seq % 4 == 0 and seq > 7:
        batches.append([seq - 7])
    if seq % 50 == 0 and seq > 30:
        batches.append([seq - 30, seq - 29, seq - 28])
    return batches


if __name__ == "__main__":
    main()
