"""Topic names of protocol sections 1-4, in one place."""

from __future__ import annotations

from dataclasses import dataclass


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
