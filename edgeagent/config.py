"""Typed, frozen configuration from one TOML file, with environment overrides.

Every key has its default here and nowhere else. A bad file is reported whole:
each error with the file and its dotted key, unknown keys with a did-you-mean.
Any key can be overridden as ``EDGEAGENT__SECTION__KEY=value`` (the value is read
as a TOML value when it parses as one, else as a string), for systemd drop-ins
and benches.
"""

from __future__ import annotations

import difflib
import os
import reprlib
import stat
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from edgeagent.control.keys import load_keys_file, load_signing_key

ENV_PREFIX = "EDGEAGENT__"
EXIT_CONFIG = 78  # EX_CONFIG from sysexits.h; the unit's RestartPreventExitStatus
MAX_CONFIG_BYTES = 1 << 20  # a real config is a few KiB; past this it is not one
GPIO_MAX = 53  # BCM GPIO numbers 0-53 (compute modules bring out more than the header's 0-27)

DEVICE_ID_PATTERN = r"^[a-z0-9][a-z0-9-]{0,62}$"
DeviceId = Annotated[str, Field(pattern=DEVICE_ID_PATTERN)]


class _Section(BaseModel):
    # Strict: `port = true` or `mock = 1` is a mistake, not 1 and True. No nan or inf:
    # an infinite rate or timeout means nothing here (and nan compares false everywhere).
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


def _no_nul(v: Path) -> Path:
    # Every later use (mkdir, open, stat) would raise ValueError at start instead.
    if "\x00" in str(v):
        raise ValueError("contains a NUL character")
    return v


# TOML gives paths as strings, which strict mode alone would refuse.
FsPath = Annotated[Path, Field(strict=False), AfterValidator(_no_nul)]
GpioPin = Annotated[int, Field(ge=0, le=GPIO_MAX)]


class DeviceConfig(_Section):
    id: DeviceId
    """This device's id; also the MQTT client id and the topic root's last part."""
    model: str | None = None
    """Board model override; by default read from the device tree."""


class TlsConfig(_Section):
    enabled: bool = False
    ca_file: FsPath | None = None
    cert_file: FsPath | None = None
    """Client certificate for mutual TLS (with key_file)."""
    key_file: FsPath | None = None
    insecure_skip_verify: bool = False

    @model_validator(mode="after")
    def _key_needs_cert(self) -> TlsConfig:
        # The files themselves are read at each connection attempt (a missing one is
        # retried, and check-config reports it); a key alone is a mistake in the config.
        if self.key_file is not None and self.cert_file is None:
            raise ValueError("key_file is set without cert_file")
        return self


class MqttConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(1883, ge=1, le=65535)
    prefix: str = "edge/v1"
    protocol: Literal["5", "3.1.1"] = "5"
    username: str | None = None
    password: SecretStr | None = None
    keepalive_s: int = Field(30, ge=5, le=3600)
    connect_timeout_s: float = Field(10.0, gt=0)
    reconnect_min_s: float = Field(0.5, gt=0)
    reconnect_max_s: float = Field(60.0, gt=0)
    max_inflight: int = Field(32, ge=1, le=1000)
    """QoS 1 messages in flight at once while draining the spool."""
    tls: TlsConfig = TlsConfig()

    @field_validator("prefix")
    @classmethod
    def _prefix_shape(cls, v: str) -> str:
        if not v or v.startswith("/") or v.endswith("/") or any(c in v for c in "+#"):
            raise ValueError("must be non-empty, without leading/trailing '/' or wildcards")
        return v


class StorageConfig(_Section):
    state_dir: FsPath = Path("/var/lib/edgeagent")
    spool_max_messages: int = Field(100_000, ge=10)
    spool_max_mib: float = Field(64.0, gt=0)
    spool_max_age_h: float = Field(168.0, gt=0)
    spool_min_free_mb: float = Field(64.0, ge=0)
    durability: Literal["normal", "full"] = "normal"
    """normal survives a process kill; full also survives power loss (fsync per message)."""

    @field_validator("state_dir")
    @classmethod
    def _state_dir_usable(cls, v: Path) -> Path:
        # Otherwise the agent's mkdir fails at start, with a traceback and a restart loop.
        for at in (v, *v.parents):
            if at.exists():
                if not at.is_dir():
                    raise ValueError(f"{at} exists and is not a directory")
                break
        return v


class TelemetryConfig(_Section):
    heartbeat_s: float = Field(30.0, ge=1)
    breadcrumbs: int = Field(100, ge=10, le=10_000)
    events_rate_per_s: float = Field(20.0, gt=0)
    """Sustained rate of `events` messages; bursts above it are summarised, not lost silently."""
    events_burst: int = Field(100, ge=1)
    log_lines: int = Field(100, ge=10, le=10_000)
    """Log lines kept in memory for crash reports, snapshots and the logs command."""


class LoggingConfig(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    journald: Literal["auto", "on", "off"] = "auto"


class HealthConfig(_Section):
    sysfs_root: FsPath = Path("/")
    """Root under which /sys and /proc are read (tests point it at a fixture tree)."""
    vcgencmd: str | None = "vcgencmd"
    mmcli: str | None = "mmcli"
    """ModemManager's CLI: a cellular modem's state and signal in metrics ("" to skip)."""
    assume_clock_synced: bool = False
    """Treat the clock as synchronised without NTP evidence (benches and containers only)."""
    watchdog_max_lag_s: float | None = None
    """Skip the watchdog ping when the loop lags more than this (default: the ping interval)."""


class IceConfig(_Section):
    stun_urls: list[str] = []
    turn_urls: list[str] = []
    turn_username: str | None = None
    turn_password: SecretStr | None = None
    relay_only: bool = False
    turn_relay_check: bool = True
    """The TURN probe also sends data through its allocation and back (to its own relayed
    address): alert `turn_relay_failed`. Off for a server that refuses its own relayed
    address as a peer (a denied-peer-ip covering it), where the check cannot pass."""
    host_addresses: list[str] = []
    """Local addresses or interface names ICE may use; empty means every interface."""
    gather_timeout_s: float = Field(0.7, gt=0)
    """How long gathering waits for STUN/TURN. aiortc does not trickle: the offer (or
    answer) waits this long behind a dead server, so it is short; 0.7 s still covers
    one lost STUN request (aioice retransmits after 0.5 s) on a 200 ms RTT link."""

    @field_validator("stun_urls", "turn_urls")
    @classmethod
    def _urls_usable(cls, v: list[str], info: ValidationInfo) -> list[str]:
        # A url aiortc cannot parse fails every call (RTCPeerConnection raises); the
        # probes parse them too. Both parsers must take it.
        if not v:
            return v
        from aiortc.rtcicetransport import parse_stun_turn_uri

        from edgeagent.health.probes import parse_ice_url

        kind = "stun" if info.field_name == "stun_urls" else "turn"
        problems = []
        for i, url in enumerate(v):
            try:
                scheme = parse_ice_url(url).scheme
                parse_stun_turn_uri(url)
            except ValueError as exc:
                problems.append(f"[{i}] {url[:200]!r}: {exc}")
                continue
            if scheme.rstrip("s") != kind:
                problems.append(f"[{i}] {url[:200]!r}: expected a {kind}: or {kind}s: url")
        if problems:
            raise ValueError("; ".join(problems))
        return v

    @model_validator(mode="after")
    def _relay_needs_turn(self) -> IceConfig:
        # ice_configuration raises on this for every call.
        if self.relay_only and not self.turn_urls:
            raise ValueError("relay_only = true needs a TURN server in turn_urls")
        return self


class AecConfig(_Section):
    enabled: bool = True
    stream_delay_ms: int = Field(40, ge=0, le=500)


# An ALSA PCM name (e.g. "plughw:CARD=Device,DEV=0"): printable, no control characters.
PcmName = Annotated[str, Field(min_length=1, max_length=256, pattern=r"^[^\x00-\x1f\x7f]+$")]


class AudioConfig(_Section):
    capture_device: PcmName = "default"
    playback_device: PcmName = "default"
    paced: bool = False
    """Pace unclocked PCMs (ALSA file devices on the bench) to real time."""
    playout_target_ms: int = Field(60, ge=20, le=120)
    playout_max_ms: int = Field(200, ge=60, le=1000)
    """At least two 20 ms frames above the target (the playout buffer's own rule)."""
    reopen_min_s: float = Field(1.0, gt=0)
    reopen_max_s: float = Field(30.0, gt=0)
    aec: AecConfig = AecConfig()

    @model_validator(mode="after")
    def _bounds_in_order(self) -> AudioConfig:
        # Checked here, not when a call builds its playout buffer (every call would fail).
        if self.playout_max_ms < self.playout_target_ms + 40:
            raise ValueError(
                f"playout_max_ms ({self.playout_max_ms}) must be at least playout_target_ms"
                f" + 40 ({self.playout_target_ms + 40}): two frames of headroom"
            )
        if self.reopen_min_s > self.reopen_max_s:
            raise ValueError(
                f"reopen_min_s ({self.reopen_min_s}) is above reopen_max_s ({self.reopen_max_s})"
            )
        return self


class CallConfig(_Section):
    answer: Literal["auto", "ring", "reject"] = "ring"
    ring_timeout_s: float = Field(30.0, gt=0)
    allow: list[str] = ["*"]
    """Endpoint ids allowed to call this device; "*" allows any."""
    default_peer: str | None = None
    connect_timeout_s: float = Field(15.0, gt=0)
    answer_timeout_s: float = Field(30.0, gt=0)
    """How long an outgoing offer waits for an answer."""
    stats_interval_s: float = Field(5.0, ge=0.5)
    media_stall_warn_s: float = Field(3.0, gt=0)
    media_stall_hangup_s: float = Field(10.0, gt=0)
    opus_bitrate_kbps: int = Field(32, ge=6, le=510)
    opus_complexity: int = Field(10, ge=0, le=10)
    """libopus complexity; 10 costs ~1.3x the CPU of 5 and scores ~0.3 MOS higher."""
    opus_fec: bool = True
    """Offer in-band FEC, and send it to a far end that asked for it and can decode it."""
    opus_loss_hint_percent: Annotated[int, Field(ge=0, le=100)] | Literal["auto"] = "auto"
    """libopus packet-loss hint: "auto" follows the loss the far end reports; a number fixes it."""
    max_duration_s: float = Field(3600.0, gt=0)


class LedsConfig(_Section):
    enabled: bool = True
    layout: Literal["three", "rgb"] = "three"
    pins: list[GpioPin] = Field([17, 27, 22], min_length=3, max_length=3)
    """BCM pins: green, amber, red (three) or red, green, blue (rgb)."""
    active_high: bool = True
    mock: bool = False
    """Drive gpiozero's MockFactory instead of real pins (bench)."""

    @field_validator("pins")
    @classmethod
    def _pins_distinct(cls, v: list[int]) -> list[int]:
        # gpiozero refuses a pin twice (GPIOPinInUse), so every LED would be off.
        if len(set(v)) != len(v):
            raise ValueError(f"each LED needs its own pin (got {v})")
        return v


class ButtonConfig(_Section):
    enabled: bool = False
    pin: GpioPin = 23
    long_press_s: float = Field(2.0, gt=0)
    press_action: Literal["dial_or_hangup", "dial", "none"] = "dial_or_hangup"


class SecurityConfig(_Section):
    commands: Literal["signed", "open"] = "signed"
    signaling: Literal["open", "signed"] = "open"
    """"signed": incoming offers must carry a call token from a key in keys_file."""
    keys_file: FsPath | None = None
    """Trusted keys (JSON) for commands and signed offers; read at check-config."""
    max_token_lifetime_s: int = Field(300, ge=10, le=86_400)
    armed: list[str] = []
    """Dangerous commands allowed on this device (memory, profile, crash, restart)."""
    local_socket: FsPath | None = None
    call_key_id: Annotated[str, Field(pattern=r"^[A-Za-z0-9._:-]{1,64}$")] | None = None
    """The kid this device's offer tokens name (default: the kid in call_key_file)."""
    call_key_file: FsPath | None = Field(None, validate_default=True)
    """This device's Ed25519 private JWK: it signs a token into each offer it sends, for
    peers that take signed offers only."""

    @field_validator("local_socket")
    @classmethod
    def _socket_path_usable(cls, v: Path | None) -> Path | None:
        # What the agent would otherwise find at start: something else at the path.
        if v is not None and (v.exists() or v.is_symlink()) and not v.is_socket():
            raise ValueError(f"{v} exists and is not a socket")
        if v is not None and v.parent.exists() and not v.parent.is_dir():
            raise ValueError(f"{v.parent} is not a directory")
        return v

    @field_validator("keys_file")
    @classmethod
    def _keys_usable(cls, v: Path | None) -> Path | None:
        # A bad file is a config error (exit 78), not a crash at start and a restart loop.
        if v is not None:
            load_keys_file(v)
        return v

    @field_validator("call_key_file")
    @classmethod
    def _call_key_usable(cls, v: Path | None, info: ValidationInfo) -> Path | None:
        # Read here so check-config reports a missing or bad key, not the first call.
        if v is not None:
            load_signing_key(v, info.data.get("call_key_id"))
        elif info.data.get("call_key_id") is not None:
            raise ValueError("required when call_key_id is set")
        return v


class TracingConfig(_Section):
    enabled: bool = True
    """Record call spans (docs/tracing.md)."""
    mqtt_export: bool = True
    """Spool finished spans as OTLP/JSON on `traces` (lossless while offline)."""
    otlp_endpoint: str = ""
    """OTLP/HTTP collector URL (a base URL gets /v1/traces); empty: no OTLP/HTTP export."""
    otlp_headers: dict[str, SecretStr] = {}
    """Headers for the OTLP/HTTP exporter (auth tokens); never logged."""
    otlp_timeout_s: float = Field(5.0, gt=0)
    sample_ratio: float = Field(1.0, ge=0, le=1)
    """Share of good calls kept; failed and poor calls are always kept whole."""
    keep_below_mos: float = Field(3.5, ge=1, le=5)
    """A call whose average MOS is below this is poor: always kept."""
    max_spans_per_message: int = Field(100, ge=1, le=10_000)


from edgeagent.health.alerts import AlertsConfig  # noqa: E402 - after the shared section types


class Config(_Section):
    device: DeviceConfig
    mqtt: MqttConfig = MqttConfig()
    storage: StorageConfig = StorageConfig()
    telemetry: TelemetryConfig = TelemetryConfig()
    logging: LoggingConfig = LoggingConfig()
    health: HealthConfig = HealthConfig()
    ice: IceConfig = IceConfig()
    audio: AudioConfig = AudioConfig()
    call: CallConfig = CallConfig()
    leds: LedsConfig = LedsConfig()
    button: ButtonConfig = ButtonConfig()
    security: SecurityConfig = SecurityConfig()
    alerts: AlertsConfig = AlertsConfig()
    tracing: TracingConfig = TracingConfig()

    @model_validator(mode="after")
    def _button_pin_free(self) -> Config:
        if self.button.enabled and self.leds.enabled and self.button.pin in self.leds.pins:
            raise ValueError(f"button.pin: {self.button.pin} is also an LED pin (leds.pins)")
        return self

    @property
    def topic_root(self) -> str:
        return f"{self.mqtt.prefix}/{self.device.id}"


class ConfigError(Exception):
    """A config file that cannot be used; `errors` lists every problem found."""

    def __init__(self, source: str, errors: list[str]) -> None:
        self.source = source
        self.errors = errors
        super().__init__("\n".join(f"{source}: {e}" for e in errors))


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """Nested dict from EDGEAGENT__SECTION__KEY variables (keys lower-cased)."""
    tree: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        path = [p.lower() for p in name[len(ENV_PREFIX) :].split("__") if p]
        if not path:
            continue
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                break
        else:
            node[path[-1]] = raw if _takes_text(path) else _parse_env_value(raw)
    return tree


def _parse_env_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _takes_text(path: list[str]) -> bool:
    """Whether the key at `path` holds text (a string, secret or path): its variable is
    taken as written, so `EDGEAGENT__MQTT__PASSWORD=12345` stays the string "12345"."""
    current: Any = Config
    for part in path:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return False
        field = current.model_fields.get(part)
        if field is None:
            return False
        current = field.annotation
    union = typing.get_origin(current) in (typing.Union, types.UnionType)
    args = [a for a in typing.get_args(current) if a is not type(None)] if union else [current]
    return all(a in (str, SecretStr, Path) for a in args)


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _known_keys(model: type[BaseModel], loc: tuple[str | int, ...]) -> list[str]:
    """The field names valid at `loc`'s parent, for did-you-mean."""
    current: Any = model
    for part in loc[:-1]:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return []
        field = current.model_fields.get(str(part))
        if field is None:
            return []
        current = field.annotation
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


# The offending value, quoted short: a 50 MB string or a 900-deep list stays one line.
_short = reprlib.Repr()
_short.maxlevel, _short.maxstring, _short.maxother, _short.maxlong = 3, 80, 80, 40
_short.maxlist = _short.maxdict = _short.maxtuple = 6


def _is_secret(loc: tuple[str | int, ...]) -> bool:
    """Whether `loc` is at or inside a SecretStr field (its value is never echoed)."""
    current: Any = Config
    for part in loc:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            break
        field = current.model_fields.get(str(part))
        if field is None:
            break
        if "SecretStr" in repr(field.annotation):
            return True
        current = field.annotation
    return False


def format_errors(exc: ValidationError) -> list[str]:
    """One line per problem: dotted key, message, and a did-you-mean for typos."""
    lines = []
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        key = ".".join(str(p) for p in loc) or "(root)"
        shown = "a secret, not shown" if _is_secret(loc) else _short.repr(err.get("input"))
        if err["type"] == "extra_forbidden":
            guess = difflib.get_close_matches(str(loc[-1]), _known_keys(Config, loc), n=1)
            hint = f"; did you mean '{guess[0]}'?" if guess else ""
            lines.append(f"{key}: unknown key{hint}")
        elif err["type"] == "missing":
            lines.append(f"{key}: required key is missing")
        elif err["type"] == "value_error" and isinstance(err.get("input"), dict):
            # A check across a section's keys: the message names them and their values.
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(msg if not loc else f"{key}: {msg}")  # a root check names its keys
        else:
            lines.append(f"{key}: {err['msg']} (got {shown})")
    return lines


def parse_config(
    data: Mapping[str, Any], *, source: str = "<config>", environ: Mapping[str, str] | None = None
) -> Config:
    """Validate a decoded TOML document (plus environment overrides) into a Config."""
    merged = _merge(dict(data), env_overrides(os.environ if environ is None else environ))
    try:
        return Config.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(source, format_errors(exc)) from None


def load_config(path: Path, *, environ: Mapping[str, str] | None = None) -> Config:
    """Read, parse and validate the TOML file at `path`."""
    try:
        # Not open() first: a FIFO would block it, /dev/zero never ends.
        mode = path.stat().st_mode
        if not stat.S_ISREG(mode):
            why = "Is a directory" if stat.S_ISDIR(mode) else "not a regular file"
            raise ConfigError(str(path), [f"cannot read: {why}"])
        with path.open("rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(str(path), [f"cannot read: {exc.strerror or exc}"]) from None
    except ValueError as exc:  # a NUL in the path
        raise ConfigError(str(path), [f"cannot read: {exc}"]) from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(str(path), [f"larger than {MAX_CONFIG_BYTES >> 20} MiB: not a config"])
    try:
        text = raw.decode("utf-8-sig")  # a BOM (Windows editors add one) is skipped
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        byte = raw[exc.start : exc.start + 1].hex()
        raise ConfigError(str(path), [f"not UTF-8: byte 0x{byte} on line {line}"]) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), [f"not valid TOML: {exc}"]) from None
    except RecursionError:  # tomllib recurses per nested array or inline table
        raise ConfigError(
            str(path), ["not valid TOML: arrays or tables nested too deeply"]
        ) from None
    return parse_config(data, source=str(path), environ=environ)


def config_hash(cfg: Config) -> str:
    """A short stable hash of the effective config; secrets are masked, never hashed in."""
    import hashlib

    blob = cfg.model_dump_json(exclude_none=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
