"""``noetl-worker tool run``: one tool config through the worker's pipeline, without NATS.

How a playbook author debugs a step::

    noetl-worker tool run --kind python --config step.yaml --input '{"n": 3}'
    noetl-worker tool run --playbook pb.yaml --step load --server http://localhost:8082

The config is a tool block (``{kind, …}``), a step (``{step, tool: {…}}``) or, with
``--playbook``/``--step``, the named step of a playbook's ``workflow`` (its ``workload`` becomes
the template variables). It runs as a claimed command would: credential aliases and
``{{ keychain.… }}`` references resolved (from ``--server``, or a local ``--credentials`` file of
``alias: {type, data}``), templates rendered against ``--input`` and the workload, the tool
under its deadline (its own ``timeout`` or ``NOETL_WORKER_COMMAND_TIMEOUT_SECONDS``), secrets
scrubbed from the result. What is printed is the tool's status, the value the server would store
as the step's result (``value``, as the Python server reads it, or ``--dialect rust``), the error
text it would get, and the captured stdout/stderr (``--json`` for machines). Exit code: 0 when
the tool's status is ``success``, 1 otherwise, 2 for a usage or configuration error.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import unquote

import attrs
import trio

from . import templating, tools
from .config import Settings
from .dialect import dialect_for_command
from .dispatch import Command
from .errors import ControlPlaneError, HTTPStatusError, ToolError
from .metrics import Metrics
from .notification import Notification
from .tools.base import ToolContext, ToolResources, ToolResult


class UsageError(Exception):
    """A bad argument or file: printed on one line, exit code 2."""


def load_document(path: str) -> Any:
    """A YAML (or JSON) file's content."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from exc
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UsageError(f"{path} is not valid YAML: {exc}") from exc


def step_from_playbook(playbook: Any, step: str, path: str) -> tuple[Mapping[str, Any], dict[str, Any]]:
    """``(tool block, workload)`` of a playbook's step."""
    if not isinstance(playbook, Mapping) or not isinstance(playbook.get("workflow"), list):
        raise UsageError(f"{path}: not a playbook (no 'workflow' list)")
    names = []
    for item in playbook["workflow"]:
        if isinstance(item, Mapping):
            names.append(str(item.get("step")))
            if item.get("step") == step:
                workload = playbook.get("workload")
                return item, dict(workload) if isinstance(workload, Mapping) else {}
    raise UsageError(f"{path}: no step {step!r} (steps: {', '.join(names)})")


def tool_block(document: Any, kind: str | None, where: str) -> dict[str, Any]:
    """The tool config of a tool block or a step, with its kind (``--kind`` wins)."""
    if not isinstance(document, Mapping):
        raise UsageError(f"{where}: expected a mapping (a tool block or a step)")
    tool = document.get("tool", document)
    if isinstance(tool, list):
        config: dict[str, Any] = {"kind": "task_sequence", "tasks": tool}
    elif isinstance(tool, Mapping):
        config = dict(tool)
    else:
        raise UsageError(f"{where}: 'tool' must be a mapping or a list of tasks")
    if kind is not None:
        config["kind"] = kind
    if not isinstance(config.get("kind"), str) or not config["kind"]:
        raise UsageError(
            f"{where}: no tool kind: give --kind or a 'kind' field (known: {', '.join(tools.kinds())})"
        )
    return config


@attrs.define(eq=False)
class LocalCredentials:
    """A ServerAPI answering ``GET /api/credentials/<alias>`` from a file; nothing else."""

    credentials: Mapping[str, Any]

    async def get_json(self, path: str, *, params: Mapping[str, Any] | None = None) -> Any:
        prefix = "/api/credentials/"
        if path.startswith(prefix) and not path.endswith("/sealed"):
            alias = unquote(path[len(prefix) :])
            if alias in self.credentials:
                entry = self.credentials[alias]
                return {"name": alias, **entry} if isinstance(entry, Mapping) else entry
            raise HTTPStatusError(
                404, json.dumps({"detail": f"credential {alias!r} not in the credentials file"})
            )
        raise HTTPStatusError(501, json.dumps({"detail": f"tool run without --server cannot GET {path}"}))

    async def post_json(self, path: str, body: Any) -> Any:
        raise HTTPStatusError(501, json.dumps({"detail": f"tool run without --server cannot POST {path}"}))

    async def put_json(self, path: str, body: Any) -> Any:
        raise HTTPStatusError(501, json.dumps({"detail": f"tool run without --server cannot PUT {path}"}))


@attrs.frozen
class Request:
    config: dict[str, Any]
    input: dict[str, Any]
    workload: dict[str, Any]
    server_url: str | None
    credentials: Mapping[str, Any] | None
    step: str = "tool_run"
    dialect: str = "python"


async def run_request(request: Request, settings: Settings) -> dict[str, Any]:
    """The scrubbed outcome of one tool config: status, the value the server stores, error."""
    from contextlib import AsyncExitStack

    import trio_asyncio

    from .bus import install_exception_handler
    from .control_plane import ControlPlane
    from .pipeline import Pipeline

    kind = str(request.config["kind"])
    render_context: dict[str, Any] = {"workload": request.workload, **request.workload}
    if request.input:
        render_context["input"] = request.input
        render_context["args"] = request.input
    body = {
        "execution_id": 0,
        "node_name": request.step,
        "action": kind,
        "context": {"tool_config": request.config, "input": request.input, "render_context": render_context},
        "meta": {"command_id": "tool-run"},
    }
    note = Notification(0, 0, "tool-run", request.step, request.server_url or "")
    metrics = Metrics()
    pipeline = Pipeline.create(settings, metrics)
    resources = ToolResources(metrics=metrics)
    async with AsyncExitStack() as stack:
        # The nats tool (and result_fetch's KV path) need the asyncio bridge, as in the worker.
        loop = await stack.enter_async_context(trio_asyncio.open_loop())
        install_exception_handler(loop)
        server: Any
        server_url = request.server_url or "http://127.0.0.1:0"
        if request.server_url is not None:
            plane = await stack.enter_async_context(ControlPlane.open(settings, metrics))
            server = plane.server_api(request.server_url)
        else:
            server = LocalCredentials(request.credentials or {})
        command = Command.from_claim(note, server_url, body)
        variables = templating.build_variables(
            command.context["render_context"],
            execution_id="0",
            step=request.step,
            command_id="tool-run",
            worker_id=settings.worker_id,
            server_url=server_url,
            tool_kind=kind,
        )
        ctx = ToolContext(
            execution_id=0,
            step=request.step,
            command_id="tool-run",
            worker_id=settings.worker_id,
            server_url=server_url,
            variables=variables,
            render=partial(templating.render, variables=variables),
            secrets={},
            server=server,
            resources=resources,
            settings=settings,
        )
        try:
            result, ctx = await _execute(command, ctx, pipeline, settings)
            out = await _stored(command, ctx, pipeline, result, request.dialect)
        finally:
            with trio.CancelScope(shield=True):
                await resources.aclose()
                await pipeline.aclose()
    return out


async def _stored(
    command: Command, ctx: ToolContext, pipeline: Any, result: ToolResult, dialect_name: str
) -> dict[str, Any]:
    """The tool's outcome as the server would see it, scrubbed: status, the stored value, error."""
    dialect = dialect_for_command("rust" if dialect_name == "rust" else "python", command.meta)
    failed = dialect.tool_failed(result, command.tool_kind)
    value = dialect.reported_value(result, failed)
    body = await pipeline.call_done_result(command, ctx, value, result.status, stage_shared_memory=False)
    out: dict[str, Any] = {"status": result.status, "dialect": dialect.name}
    if "context" in body:
        out["value"] = body["context"]
    if failed:
        out["error"] = pipeline.scrub_text(dialect.error_text(result), ctx)
    for key in ("stdout", "stderr"):
        text = getattr(result, key)
        if text:
            out[key] = pipeline.scrub_text(text, ctx)
    for key in ("exit_code", "duration_ms"):
        if getattr(result, key) is not None:
            out[key] = getattr(result, key)
    return out


async def _execute(
    command: Command, ctx: ToolContext, pipeline: Any, settings: Settings
) -> tuple[ToolResult, ToolContext]:
    """dispatch's tool step: prepare (credentials, references), deadline, failures as results.

    Returns the prepared context too: it holds the secrets the credentials brought, which the
    result must be scrubbed of.
    """
    try:
        function = tools.resolve(command.tool_kind)
        config, ctx = await pipeline.prepare(command, ctx)
        seconds = command.deadline_seconds(config, settings.command_timeout)
        began = trio.current_time()
        with trio.move_on_after(seconds) as scope:
            result: ToolResult = await function(config, ctx)
        if scope.cancelled_caught:
            return ToolResult("timeout", error=f"timed out after {seconds:g}s"), ctx
        if result.duration_ms is None:
            result = attrs.evolve(result, duration_ms=int((trio.current_time() - began) * 1000))
        return result, ctx
    except (ToolError, ControlPlaneError) as exc:
        # What the server would get as call.error + command.failed.
        return ToolResult("error", error=pipeline.scrub_text(str(exc), ctx)), ctx


def print_result(out: Mapping[str, Any], as_json: bool, stream: TextIO) -> None:
    if as_json:
        stream.write(json.dumps(out, indent=2, default=str) + "\n")
        return
    stream.write(f"status: {out.get('status')}\n")
    for key in ("error", "exit_code", "duration_ms"):
        if out.get(key) is not None:
            stream.write(f"{key}: {out[key]}\n")
    if "value" in out:
        stream.write(
            "value (what the server stores):\n" + json.dumps(out["value"], indent=2, default=str) + "\n"
        )
    for key in ("stdout", "stderr"):
        if out.get(key):
            stream.write(f"--- {key} ---\n{str(out[key]).rstrip()}\n")


def main(args: Any, settings: Settings) -> int:
    try:
        request = build_request(args)
    except UsageError as exc:
        print(f"noetl-worker tool run: {exc}", file=sys.stderr)
        return 2
    # Print the whole result, however large: there is no server to store it.
    settings = attrs.evolve(settings, result_inline_max_bytes=1 << 62, ipc_cache_budget_bytes=0)
    out = trio.run(run_request, request, settings)
    print_result(out, args.json, sys.stdout)
    return 0 if out.get("status") == "success" else 1


def build_request(args: Any) -> Request:
    workload: dict[str, Any] = {}
    step = "tool_run"
    if args.playbook is not None:
        if not args.step:
            raise UsageError("--playbook needs --step NAME")
        document, workload = step_from_playbook(load_document(args.playbook), args.step, args.playbook)
        step = args.step
        where = f"{args.playbook} step {args.step}"
    elif args.config is not None:
        document = load_document(args.config)
        where = args.config
        if isinstance(document, Mapping) and isinstance(document.get("step"), str):
            step = document["step"]
    else:
        raise UsageError("give --config FILE, or --playbook FILE --step NAME")
    config = tool_block(document, args.kind, where)
    inputs: dict[str, Any] = {}
    if args.input is not None:
        try:
            parsed = json.loads(args.input)
        except ValueError as exc:
            raise UsageError(f"--input is not JSON: {exc}") from exc
        if not isinstance(parsed, dict):
            raise UsageError("--input must be a JSON object")
        inputs = parsed
    credentials = None
    if args.credentials is not None:
        loaded = load_document(args.credentials)
        if not isinstance(loaded, Mapping):
            raise UsageError(f"{args.credentials}: expected a mapping of alias to {{type, data}}")
        credentials = loaded
    if args.server is not None and not str(args.server).startswith(("http://", "https://")):
        raise UsageError(f"--server {args.server!r}: expected an http(s):// URL")
    return Request(config, inputs, workload, args.server, credentials, step, args.dialect)


def add_parser(sub: Any) -> None:
    tool = sub.add_parser("tool", help="tool utilities: 'tool run' runs one tool config locally")
    tool_sub = tool.add_subparsers(dest="tool_command", required=True)
    run = tool_sub.add_parser(
        "run",
        help="run one tool config through the worker's pipeline, without NATS; prints the result",
        description="Run one tool config (a tool block, a step, or a playbook step) through the"
        " worker's pipeline without NATS: templating, credentials, deadline, scrubbing. Exit 0 when"
        " the tool succeeds, 1 when it does not, 2 for a usage error.",
    )
    run.add_argument(
        "--kind", help=f"tool kind (overrides the file's 'kind'); one of {', '.join(tools.kinds())}"
    )
    run.add_argument("--config", metavar="FILE", help="YAML/JSON file: a tool block or a step")
    run.add_argument("--playbook", metavar="FILE", help="a playbook file; use with --step")
    run.add_argument("--step", metavar="NAME", help="the step of --playbook to run")
    run.add_argument("--input", metavar="JSON", help="the step's input (a JSON object), e.g. '{\"n\": 3}'")
    run.add_argument("--server", metavar="URL", help="NoETL server for credentials, keychain and results")
    run.add_argument("--credentials", metavar="FILE", help="local credentials: YAML/JSON alias: {type, data}")
    run.add_argument(
        "--dialect",
        choices=("python", "rust"),
        default="python",
        help="which server's view of the result to print (default python, the published server)",
    )
    run.add_argument("--json", action="store_true", help="print the result as JSON")
