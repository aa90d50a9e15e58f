"""Topic names of protocol sections 1-4, in one place, and which names can be published to."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

__all__ = ["MAX_TOPIC_BYTES", "Topics", "publish_topic_problem"]

# MQTT topic names are at most 65535 bytes of UTF-8 (MQTT 5.0 section 1.5.4).
MAX_TOPIC_BYTES: Final = 65_535
# Code points mosquitto refuses in a topic (it disconnects the publisher: "malformed packet"):
# controls, and the Unicode noncharacters.
_NONCHARACTERS: Final = "".join(
    chr(plane + low) for plane in range(0, 0x110000, 0x10000) for low in (0xFFFE, 0xFFFF)
)
_BAD_TOPIC_CHAR_RE: Final = re.compile(f"[\x00-\x1f\x7f-\x9f\ufdd0-\ufdef{_NONCHARACTERS}]")


def publish_topic_problem(topic: str) -> str | None:
    """Why the device cannot publish to `topic` (a request's Response Topic), or None."""
    if not topic:
        return "it is empty"
    if "+" in topic or "#" in topic:
        return "it contains a wildcard"
    if topic.startswith("$"):
        return "topics starting with $ belong to the broker"
    if _BAD_TOPIC_CHAR_RE.search(topic):
        return "it contains a control character or a Unicode noncharacter"
    try:
        size = len(topic.encode("utf-8"))
    except UnicodeEncodeError:
        return "it is not valid UTF-8"
    if size > MAX_TOPIC_BYTES:
        return f"it is over MQTT's {MAX_TOPIC_BYTES} bytes"
    return None


@dataclass(frozen=True, slots=True)
class Topics:
    prefix: str
    device_id: str

    @property
    def root(self) -> str:
        return f"{self.prefix}/{self.device_id}"

    @property
    def status(self) -> str:
        return f"{self.root}/status"

    @property
    def info(self) -> str:
        return f"{self.root}/info"

    @property
    def metrics(self) -> str:
        return f"{self.root}/metrics"

    @property
    def health(self) -> str:
        return f"{self.root}/health"

    @property
    def events(self) -> str:
        return f"{self.root}/events"

    @property
    def crash(self) -> str:
        return f"{self.root}/crash"

    @property
    def traces(self) -> str:
        return f"{self.root}/traces"

    @property
    def signal(self) -> str:
        return self.signal_of(self.device_id)

    @property
    def cmd_filter(self) -> str:
        return f"{self.root}/cmd/+"

    def alert(self, name: str) -> str:
        return f"{self.root}/alerts/{name}"

    def quality(self, call_id: str) -> str:
        return f"{self.root}/calls/{call_id}/quality"

    def summary(self, call_id: str) -> str:
        return f"{self.root}/calls/{call_id}/summary"

    def cmd_res(self, request_id: str) -> str:
        return f"{self.root}/cmd-res/{request_id}"

    def signal_of(self, endpoint_id: str) -> str:
        return f"{self.prefix}/{endpoint_id}/signal"
