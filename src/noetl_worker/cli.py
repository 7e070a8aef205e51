"""``noetl-worker`` / ``python -m noetl_worker``: run (default), demo, config, tool run, watch,
--version."""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap

from . import __version__
from .errors import ConfigError

SETTINGS_EPILOG = "Every setting is an environment variable: `noetl-worker config --describe` lists them."


def _settings_overview() -> str:
    """The variables by section, for ``run --help`` (the full table is ``config --describe``)."""
    from ._config_table import ROWS

    sections: dict[str, list[str]] = {}
    for section, name, *_ in ROWS:
        sections.setdefault(section, []).append(name)
    lines = ["settings (environment variables):"]
    for section, names in sections.items():
        lines.append(f"  {section}:")
        lines.extend(textwrap.wrap(", ".join(names), 96, initial_indent="    ", subsequent_indent="    "))
    lines.append("")
    lines.append("`noetl-worker config --describe` prints each one's default, accepted values and meaning;")
    lines.append("`noetl-worker config` prints the effective values (secrets masked).")
    return "\n".join(lines)


def describe() -> str:
    """The configuration table (docs/configuration.md, embedded), for ``config --describe``."""
    from ._config_table import ROWS

    out: list[str] = []
    section = None
    for row_section, name, default, accepted, meaning in ROWS:
        if row_section != section:
            section = row_section
            out.append(f"\n== {section}")
        out.append(f"{name}")
        out.append(f"    default:  {default}")
        out.append(f"    accepted: {accepted}")
        out.extend(textwrap.wrap(meaning, 96, initial_indent="    ", subsequent_indent="    "))
    return "\n".join(out).lstrip("\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="noetl-worker",
        description="NoETL worker on Trio: NATS JetStream intake, HTTP claim, tool execution, events.",
        epilog=SETTINGS_EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"noetl-worker {__version__}")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser(
        "run",
        help="run the worker (the default)",
        description="Run the worker until SIGTERM/SIGINT (graceful drain, exit 0); a bad setting exits 2.",
        epilog=_settings_overview(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    config = sub.add_parser(
        "config",
        help="print the effective configuration (secrets masked) and exit",
        description="Print the effective configuration as JSON (secrets masked); exit 2 on a bad setting.",
    )
    config.add_argument(
        "--describe",
        action="store_true",
        help="print every setting's default, accepted values and meaning instead, and exit",
    )
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
    if args.command == "config" and args.describe:
        print(describe())
        return 0

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
