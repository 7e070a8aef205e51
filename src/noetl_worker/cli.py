"""``noetl-worker`` / ``python -m noetl_worker``: run (default), demo, config, tool run, watch,
--version."""

from __future__ import annotations

import argparse
import json
import os
import sys

from . import __version__
from .errors import ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="noetl-worker",
        description="NoETL worker on Trio: NATS JetStream intake, HTTP claim, tool execution, events.",
        epilog="Configuration comes from environment variables; see docs/configuration.md.",
    )
    parser.add_argument("--version", action="version", version=f"noetl-worker {__version__}")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("run", help="run the worker (the default)")
    sub.add_parser("config", help="print the effective configuration (secrets masked) and exit")
    demo = sub.add_parser("demo", help="run a self-contained demo (embedded nats-server and stub server)")
    demo.add_argument("--commands", type=int, default=0, help="extra noop commands to run (default 0)")
    demo.add_argument(
        "--postgres-dsn",
        metavar="DSN",
        help="also run a postgres command against this database, e.g. postgresql://postgres@127.0.0.1/test",
    )
    from . import tool_run

    tool_run.add_parser(sub)
    watch = sub.add_parser("watch", help="follow a worker's GET /events stream (WORKER_EVENTS_STREAM=true)")
    watch.add_argument("url", nargs="?", help="the stream, default ws://127.0.0.1:9090/events")
    args = parser.parse_args(argv)
    if args.command == "watch":
        from .watch import main as watch_main

        return watch_main(args.url)

    from .config import Settings

    environ = dict(os.environ)
    if args.command == "demo":
        # The demo brings its own NATS and server; the rest of the environment still applies.
        for name in ("NATS_URL", "NOETL_SERVER_URL", "NATS_USER", "NATS_PASSWORD", "NATS_FILTER_SUBJECT"):
            environ.pop(name, None)
        environ.setdefault("WORKER_METRICS_BIND", "127.0.0.1:0")
        environ.setdefault("WORKER_MAX_CONCURRENT", "4")
        environ.setdefault("NOETL_LOG_LEVEL", "warning")
        environ.setdefault("NOETL_LOG_FORMAT", "text")
    try:
        settings = Settings.from_env(environ)
    except ConfigError as exc:
        print(f"noetl-worker: configuration error: {exc}", file=sys.stderr)
        return 2

    if args.command == "config":
        print(json.dumps(settings.masked(), indent=2, default=str))
        return 0

    from . import logs

    logs.configure(settings.log_level, settings.log_format, settings.worker_id)
    if args.command == "tool":
        return tool_run.main(args, settings)
    if args.command == "demo":
        from .demo import run_demo

        return run_demo(settings, extra_noops=args.commands, postgres_dsn=args.postgres_dsn)

    from .procs import become_subreaper
    from .service import run

    become_subreaper()  # escaped tool processes come back to us, not to init
    return run(settings)
