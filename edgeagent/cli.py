"""Command line: argv -> config -> logging -> asyncio.run(...) -> exit code."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from edgeagent import __version__
from edgeagent.config import EXIT_CONFIG, Config, ConfigError, load_config

logger = logging.getLogger("edgeagent")

EXIT_OK = 0
EXIT_FAILURE = 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgeagent", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the agent in the foreground")
    run.add_argument("--config", "-c", type=Path, required=True)
    run.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    run.add_argument("--dial", metavar="PEER", help="call PEER once the broker is up (bench)")
    check = sub.add_parser("check-config", help="validate a config file; exit 78 if bad")
    check.add_argument("path", type=Path)
    sub.add_parser("version", help="print the version")
    echo = sub.add_parser("echo-peer", help="answer calls and send back what is heard")
    echo.add_argument("--config", "-c", type=Path, required=True)
    return parser


def setup_logging(cfg: Config, override: str | None = None) -> None:
    from edgeagent.hw import systemd

    level = override or cfg.logging.level
    root = logging.getLogger()
    root.setLevel(logging.DEBUG)  # handlers filter; the log ring keeps DEBUG lines
    journal = None
    if cfg.logging.journald != "off":
        forced = {"INVOCATION_ID": "forced"} if cfg.logging.journald == "on" else None
        journal = systemd.journal_handler(environ=forced)
    handler: logging.Handler
    if journal is not None:
        handler = journal
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")
        )
    handler.setLevel(level)
    root.addHandler(handler)
    for noisy in ("aioice", "aiortc", "aiomqtt", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def cmd_check_config(path: Path) -> int:
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        print(f"{path}: {len(exc.errors)} error(s)", file=sys.stderr)
        for line in exc.errors:
            print(f"  {path}: {line}", file=sys.stderr)
        return EXIT_CONFIG
    print(f"{path}: ok (device {cfg.device.id}, broker {cfg.mqtt.host}:{cfg.mqtt.port})")
    return EXIT_OK


def cmd_run(path: Path, log_level: str | None, dial: str | None = None) -> int:
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        for line in exc.errors:
            print(f"{path}: {line}", file=sys.stderr)
        return EXIT_CONFIG
    setup_logging(cfg, log_level)
    from edgeagent.agent import Agent

    try:
        agent = Agent(cfg)
        if dial:
            agent.dial_on_connect(dial)
        return asyncio.run(agent.run())
    except KeyboardInterrupt:
        return EXIT_OK
    except Exception:
        logger.critical("agent: unhandled error, exiting", exc_info=True)
        return EXIT_FAILURE


def cmd_echo_peer(path: Path) -> int:
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        for line in exc.errors:
            print(f"{path}: {line}", file=sys.stderr)
        return EXIT_CONFIG
    setup_logging(cfg)
    from edgeagent.call.echo_peer import EchoPeer

    peer = EchoPeer(cfg)
    logger.info("echo peer %s: answering on %s", cfg.device.id, peer.topics.signal)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(peer.run())
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "version":
        print(__version__)
        return EXIT_OK
    if args.command == "check-config":
        return cmd_check_config(args.path)
    if args.command == "run":
        return cmd_run(args.config, args.log_level, args.dial)
    if args.command == "echo-peer":
        return cmd_echo_peer(args.config)
    return EXIT_FAILURE


def run_main() -> None:
    """Console-script entry point."""
    sys.exit(main())
