"""Command line: argv -> config -> logging -> asyncio.run(...) -> exit code."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import logging
import os
import signal
import sys
import threading
import traceback
from collections.abc import Coroutine, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from edgeagent import __version__
from edgeagent.config import EXIT_CONFIG, Config, ConfigError, load_config

logger = logging.getLogger("edgeagent")

EXIT_OK = 0
EXIT_FAILURE = 1
# After the agent stops, worker threads (asyncio.to_thread) get this long to finish.
WORKER_GRACE_S = 2.0
WORKER_PREFIX = "edgeagent-worker"


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
    stop = sub.add_parser(
        "record-stop",
        help="record why systemd stopped the agent (ExecStopPost=; reads SERVICE_RESULT)",
    )
    stop.add_argument("--state-dir", type=Path, default=Path("/var/lib/edgeagent"))
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
    from edgeagent.mqtt import BrokerUnavailable, tls_context

    try:
        # The agent reads these at each connection attempt and retries while they are
        # unusable; before a deployment that is a device that never reaches its broker.
        tls_context(cfg.mqtt)
    except BrokerUnavailable as exc:
        print(f"{path}: 1 error(s)", file=sys.stderr)
        print(f"  {path}: mqtt.tls: {exc}", file=sys.stderr)
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
        code = run_async(agent.run())
    except KeyboardInterrupt:
        code = EXIT_OK
    except Exception:
        logger.critical("agent: unhandled error, exiting", exc_info=True)
        code = EXIT_FAILURE
    exit_if_workers_stuck(code)
    return code


UVLOOP_ENV = "EDGEAGENT_UVLOOP"


def use_uvloop(environ: Mapping[str, str] = os.environ) -> bool:
    """uvloop unless `EDGEAGENT_UVLOOP` is 0/false/no/off, and only when it is importable."""
    if environ.get(UVLOOP_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    return importlib.util.find_spec("uvloop") is not None


def new_event_loop(environ: Mapping[str, str] = os.environ) -> asyncio.AbstractEventLoop:
    """The daemon's event loop: uvloop's (cheaper wake-ups, sendto, call_soon_threadsafe;
    docs/profile.md) when `use_uvloop`, else asyncio's default."""
    if use_uvloop(environ):
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def run_async(main: Coroutine[Any, Any, int], *, grace_s: float = WORKER_GRACE_S) -> int:
    """`asyncio.run` for the daemon, except that worker threads get `grace_s`, not forever.

    asyncio.run (3.11) waits without limit for the default executor, and interpreter
    exit joins its (non-daemon) threads again, so one blocked `to_thread` call (a
    DNS lookup, a wedged device) would keep a stopped agent alive until systemd's
    SIGKILL. Workers here are named `edgeagent-worker_N`; see `exit_if_workers_stuck`.
    """
    loop = new_event_loop()
    executor = ThreadPoolExecutor(thread_name_prefix=WORKER_PREFIX)
    loop.set_default_executor(executor)
    asyncio.set_event_loop(loop)
    try:
        return loop.run_until_complete(main)
    finally:
        try:
            _cancel_all_tasks(loop)
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            executor.shutdown(wait=False, cancel_futures=True)
            deadline = loop.time() + grace_s
            for thread in busy_workers():
                thread.join(max(0.0, deadline - loop.time()))
            asyncio.set_event_loop(None)
            loop.close()


def _cancel_all_tasks(loop: asyncio.AbstractEventLoop) -> None:
    """What asyncio.run does with tasks left over when `main` returns."""
    tasks = asyncio.all_tasks(loop)
    if not tasks:
        return
    for task in tasks:
        task.cancel()
    loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            loop.call_exception_handler(
                {
                    "message": "unhandled exception during shutdown",
                    "exception": task.exception(),
                    "task": task,
                }
            )


def busy_workers() -> list[threading.Thread]:
    """Worker threads of `run_async` that are still running."""
    return [t for t in threading.enumerate() if t.name.startswith(WORKER_PREFIX) and t.is_alive()]


def describe_threads(threads: list[threading.Thread]) -> str:
    """Each thread's name and current stack, for the log."""
    frames = sys._current_frames()
    parts = []
    for t in threads:
        frame = frames.get(t.ident) if t.ident is not None else None
        stack = "".join(traceback.format_stack(frame)) if frame is not None else "  (no frame)\n"
        parts.append(f"thread {t.name}:\n{stack}")
    return "".join(parts)


def exit_if_workers_stuck(code: int) -> None:
    """Exit now with `code` if worker threads outlived the grace period.

    Interpreter shutdown would join them and hang; the agent has already stopped
    cleanly (offline published, spool closed), so log what is stuck and leave.
    """
    stuck = busy_workers()
    if not stuck:
        return
    logger.error(
        "agent: %d worker thread(s) still busy after the stop; exiting without them:\n%s",
        len(stuck),
        describe_threads(stuck),
    )
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def cmd_echo_peer(path: Path) -> int:
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        for line in exc.errors:
            print(f"{path}: {line}", file=sys.stderr)
        return EXIT_CONFIG
    setup_logging(cfg)
    from edgeagent.call.echo_peer import EchoPeer

    async def serve() -> None:
        peer = EchoPeer(cfg)
        loop = asyncio.get_running_loop()
        for signum, name in ((signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "SIGINT")):
            loop.add_signal_handler(signum, peer.request_stop, name)
        logger.info("echo peer %s: answering on %s", cfg.device.id, peer.topics.signal)
        await peer.run()

    with contextlib.suppress(KeyboardInterrupt), asyncio.Runner(loop_factory=new_event_loop) as r:
        r.run(serve())
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
    if args.command == "record-stop":
        return cmd_record_stop(args.state_dir)
    return EXIT_FAILURE


def cmd_record_stop(state_dir: Path) -> int:
    """systemd's ExecStopPost=: a watchdog kill, an OOM kill or a crash is written where the
    next start's crash guard reads it, so its report says `watchdog` or the systemd result
    instead of a bare signal. Never fails the unit: problems go to stderr (the journal)."""
    from edgeagent.health.crashguard import record_stop_from_env

    try:
        record = record_stop_from_env(state_dir, os.environ)
    except OSError as exc:
        print(f"edgeagent record-stop: cannot write under {state_dir}: {exc}", file=sys.stderr)
        return EXIT_OK
    if record is not None:
        print(f"edgeagent record-stop: {record['reason']} ({record['service_result']})")
    return EXIT_OK


def run_main() -> None:
    """Console-script entry point."""
    sys.exit(main())
