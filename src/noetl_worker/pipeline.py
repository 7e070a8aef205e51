"""The full per-command pipeline around a tool (the ``dispatch.Hooks`` the worker runs with):

1. reference envelopes in the claim context resolved (the Python server sends any context field
   over 8 KiB as a ``result_ref``), then step references the templates need;
2. credential aliases and ``{{ keychain.… }}`` references resolved, secrets collected;
3. the value the server stores for the step (the dialect decides which) scrubbed and sent
   inline, or stored and sent as a reference;
4. ``context.cases`` evaluated: ``exit`` → ``step.exit``, ``set_var`` → ``POST /api/vars``,
   ``fail`` → ``command.failed``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import attrs
import trio

from . import cases as case_rules
from . import scrub
from .config import Settings
from .credentials import keychain_env_secrets, resolve_credentials, resolve_keychain_refs
from .dispatch import CaseEffect, Command, rebuild_context
from .errors import ControlPlaneError, CredentialError, ToolError
from .events import Event, EventFactory
from .ipc_cache import IpcCache
from .metrics import Metrics
from .results import build_call_done_result, resolve_envelopes, resolve_render_references
from .retry import CREDENTIAL_RETRY
from .scrub import Scrubber
from .tools.base import ToolContext, ToolResult

if TYPE_CHECKING:  # cryptography (~8 MiB resident) is loaded only with sealed credentials on
    from .sealed import SealingKey

log = logging.getLogger(__name__)

CREDENTIAL_RETRIES = CREDENTIAL_RETRY.attempts  # in-process tries for a transient credential failure
SWEEP_INTERVAL = 15.0


def _case_view(result: ToolResult) -> Any:
    """What ``cases`` see as ``result``: the tool's data, plus the Rust worker's ``exit_code``
    (its shell data had it; ours follows noetl's ``returncode``) so its cases keep matching."""
    data = result.data
    if isinstance(data, dict) and result.exit_code is not None and "exit_code" not in data:
        return {**data, "exit_code": result.exit_code}
    return data


def worker_scrubber(settings: Settings, keychain: Mapping[str, str], sealing: SealingKey | None) -> Scrubber:
    """The worker's own secrets (NATS password, API token, sealing key) and the keychain values."""
    own = [settings.nats.password or "", settings.internal_api_token or "", *keychain.values()]
    forms: set[str] = scrub.bytes_forms(sealing.secret_bytes()) if sealing is not None else set()
    return Scrubber.create(own, forms=forms)


@attrs.define(eq=False)
class Pipeline:
    settings: Settings
    metrics: Metrics
    keychain: dict[str, str]
    scrubber: Scrubber
    sealing: SealingKey | None  # only with NOETL_SEALED_CREDENTIALS on
    ipc: IpcCache | None

    @classmethod
    def create(
        cls, settings: Settings, metrics: Metrics, environ: Mapping[str, str] | None = None
    ) -> Pipeline:
        keychain = keychain_env_secrets(
            settings.keychain_env_vars, os.environ if environ is None else environ
        )
        ipc = None
        if settings.ipc_cache_budget_bytes > 0:
            ipc = IpcCache(
                settings.ipc_cache_budget_bytes, node_id=settings.ipc_node_id, producer=settings.hostname
            )
        sealing = None
        if settings.sealed_credentials:
            # The key pair exists only when credentials are delivered sealed: registration then
            # carries its public half. Without it there is no key to leak, and cryptography
            # (~8 MiB resident) is never loaded.
            from .sealed import SealingKey

            sealing = SealingKey.generate()
        scrubber = worker_scrubber(settings, keychain, sealing)
        scrub.set_process_scrubber(scrubber)
        return cls(settings, metrics, keychain, scrubber, sealing, ipc)

    @property
    def public_key_b64(self) -> str | None:
        return self.sealing.public_key_b64() if self.sealing is not None else None

    async def prepare(self, command: Command, ctx: ToolContext) -> tuple[dict[str, Any], ToolContext]:
        context = await resolve_envelopes(command.context, ctx.server)
        if not isinstance(context, dict):
            raise ToolError("the claim's context resolved to something other than a JSON object")
        render_context = context.get("render_context")
        if isinstance(render_context, Mapping):
            context["render_context"] = await resolve_render_references(context, render_context, ctx.server)
        command = attrs.evolve(command, context=context)
        ctx = rebuild_context(command, ctx)
        config = command.tool_config()
        # Secrets go into the command's own map (created by dispatch) as soon as they are known,
        # so every later path — result, error message, log line — is scrubbed of them, even when
        # a later step of the preparation fails.
        secrets = ctx.secrets if isinstance(ctx.secrets, dict) else dict(ctx.secrets)
        secrets.update(self.keychain)
        resolved = await self._credentials(command, ctx, config)
        config = resolved.config
        self._add_secrets(secrets, resolved.secrets)
        catalog_id = command.meta.get("catalog_id") or ctx.variables.get("catalog_id")
        config, used = await resolve_keychain_refs(
            config,
            server=ctx.server,
            catalog_id=None if catalog_id is None else str(catalog_id),
            execution_id=command.execution_id,
            attempts=command.attempts,
        )
        self._add_secrets(secrets, used)

        async def prepare_task(task: Mapping[str, Any]) -> dict[str, Any]:
            # A config a tool builds at run time (task sequence, workbook) gets the same
            # credential and keychain treatment; its secrets join this command's scrub set.
            resolved = await self._credentials(command, ctx, dict(task))
            task_config, found = await resolve_keychain_refs(
                resolved.config,
                server=ctx.server,
                catalog_id=None if catalog_id is None else str(catalog_id),
                execution_id=command.execution_id,
                attempts=command.attempts,
            )
            self._add_secrets(secrets, {**resolved.secrets, **found})
            return dict(task_config)

        return config, attrs.evolve(ctx, secrets=secrets, prepare_task=prepare_task)

    def _add_secrets(self, secrets: dict[str, str], found: Mapping[str, str]) -> None:
        secrets.update(found)
        scrub.set_command_scrubber(self._scrubber_for(secrets))

    async def _credentials(self, command: Command, ctx: ToolContext, config: dict[str, Any]) -> Any:
        for attempt in range(1, CREDENTIAL_RETRIES + 1):
            try:
                return await resolve_credentials(
                    config,
                    server=ctx.server,
                    execution_id=command.execution_id,
                    attempts=command.attempts,
                    sealing=self.sealing,
                    worker_id=self.settings.worker_id,
                )
            except CredentialError as exc:
                # Upstream ends a command silently on a transient credential failure and hopes
                # the server re-issues it; we retry here and fail it visibly if that does not help.
                if not exc.retryable or attempt == CREDENTIAL_RETRIES:
                    raise CredentialError(str(exc), retryable=False) from exc
                log.warning(
                    "credential lookup failed (%s); retry %d of %d", exc, attempt, CREDENTIAL_RETRIES - 1
                )
                await trio.sleep(CREDENTIAL_RETRY.delay(attempt))
        raise AssertionError("unreachable")

    def _scrubber_for(self, secrets: Mapping[str, str]) -> Scrubber:
        extra = [v for k, v in secrets.items() if k not in self.keychain]
        return self.scrubber.with_secrets(extra) if extra else self.scrubber

    def _scrubber(self, ctx: ToolContext) -> Scrubber:
        return self._scrubber_for(ctx.secrets)

    async def call_done_result(
        self, command: Command, ctx: ToolContext, value: Any, status: str, *, stage_shared_memory: bool
    ) -> dict[str, Any]:
        return await build_call_done_result(
            value,
            status=status,
            execution_id=command.execution_id,
            step=command.step,
            server=ctx.server,
            scrubber=self._scrubber(ctx),
            inline_max_bytes=self.settings.result_inline_max_bytes,
            ipc_cache=self.ipc if stage_shared_memory else None,
            cursor=command.cursor,
            metrics=self.metrics,
        )

    async def after_result(
        self, command: Command, ctx: ToolContext, result: ToolResult, events: EventFactory
    ) -> CaseEffect:
        raw = command.context.get("cases")
        if not raw:
            return CaseEffect()
        parsed, errors = case_rules.parse_cases(raw)
        warnings = tuple(f"case ignored: {e}" for e in errors)
        for warning in warnings:
            log.warning(warning)
        try:
            action = case_rules.evaluate(parsed, _case_view(result), ctx.variables, ctx.render)
        except case_rules.CaseError as exc:
            return CaseEffect(warnings=warnings, fail_message=f"case evaluation failed: {exc}")
        extra: list[Event] = []
        if isinstance(action, case_rules.Exit):
            extra.append(events.step_exit(action.status, ctx.render(action.data)))
        elif isinstance(action, case_rules.SetVar):
            try:
                # Variables are stored by the server: scrubbed like a result.
                value = self._scrubber(ctx).scrub({action.name: ctx.render(action.value)})
                await ctx.server.post_json(f"/api/vars/{command.execution_id}", value)
            except ControlPlaneError as exc:
                warnings += (f"set_var {action.name} failed: {exc}",)
                log.warning("case set_var %s failed: %s", action.name, exc)
        elif isinstance(action, case_rules.Fail):
            return CaseEffect(tuple(extra), warnings=warnings, fail_message=str(ctx.render(action.message)))
        return CaseEffect(tuple(extra), warnings=warnings)

    def scrub_text(self, text: str, ctx: ToolContext | None = None) -> str:
        return (self._scrubber(ctx) if ctx is not None else self.scrubber).scrub_text(text)

    def scrub_payload(self, payload: Any, ctx: ToolContext | None = None) -> Any:
        return (self._scrubber(ctx) if ctx is not None else self.scrubber).scrub_payload(payload)

    async def maintain(self) -> None:
        """Unlink shared-memory results whose lease expired (and, once, leftovers of a crash)."""
        if self.ipc is None:
            return
        ipc = self.ipc
        removed = await trio.to_thread.run_sync(ipc.sweep_orphans)
        if removed:
            log.info("removed %d expired shared-memory result(s) left by an earlier process", removed)
        while True:
            await trio.sleep(SWEEP_INTERVAL)
            if not ipc.empty:  # an idle worker starts no thread (unlinking may block: a thread)
                await trio.to_thread.run_sync(ipc.sweep)

    async def aclose(self) -> None:
        if self.ipc is not None:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self.ipc.close)
