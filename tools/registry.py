"""How a tool meets MCP: principal, scope check, pydantic validation and `[code] message` errors.

Every tool goes through `ToolSpec.call`, so no tool can skip authentication, the scope
check, validation or its audit event, and every failure is answered the same way.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from mcp.server.mcpserver import Context
from mcp.server.mcpserver.tools import Tool
from mcp.server.mcpserver.utilities.func_metadata import ArgModelBase, FuncMetadata
from mcp.types import CallToolResult, InputRequiredResult, TextContent, ToolAnnotations
from pydantic import BaseModel, ConfigDict, ValidationError

from server.approval import Progress
from server.broker import Broker, Call
from server.connect import ConnectRequired
from server.errors import BrokerError, InternalError, InvalidArgument, Unauthenticated, describe_failure
from server.principal import Principal, require_scope
from tools import connect_answer

log = logging.getLogger(__name__)

In = TypeVar("In", bound=BaseModel)
Out = TypeVar("Out", bound=BaseModel)
# Resolves the caller from the HTTP request's ASGI scope (remote), or from nothing (stdio: one user).
PrincipalSource = Callable[[Mapping[str, Any] | None], Awaitable[Principal]]
# What a client hears when the account must be connected first (bound to its request: tools.connect_answer).
ConnectAnswer = Callable[[ConnectRequired], Awaitable[CallToolResult | InputRequiredResult]]


class StrictInput(BaseModel):
    """Base of every tool's input: unknown fields are refused, not ignored."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)


@dataclass(frozen=True)
class Invocation:
    broker: Broker
    principal: Principal
    call: Call


@dataclass(frozen=True)
class ToolSpec(Generic[In, Out]):
    name: str
    title: str
    description: str
    scope: str
    annotations: ToolAnnotations
    input_model: type[In]
    output_model: type[Out]
    run: Callable[[Invocation, In], Awaitable[Out]]

    async def call(
        self,
        broker: Broker,
        principals: PrincipalSource,
        transport: str,
        arguments: dict[str, Any],
        http_scope: Mapping[str, Any] | None = None,
        progress: Progress | None = None,
        connect: ConnectAnswer | None = None,
    ) -> Out | CallToolResult | InputRequiredResult:
        """Authenticate, check scope, validate, run; any refusal becomes an `isError` result, and a missing
        connected account the answer `connect` gives for this client (tools.connect_answer; default: text)."""
        started = time.perf_counter()
        answer = await self._answer(broker, principals, transport, arguments, http_scope, progress)
        error = answer if isinstance(answer, BrokerError) else None
        if broker.metrics is not None:  # every tool call ends here, whatever its transport
            broker.metrics.call_done(self.name, error, time.perf_counter() - started)
        if isinstance(answer, ConnectRequired) and connect is not None:
            return await connect(answer)
        return error_result(answer) if isinstance(answer, BrokerError) else answer

    async def _answer(
        self,
        broker: Broker,
        principals: PrincipalSource,
        transport: str,
        arguments: dict[str, Any],
        http_scope: Mapping[str, Any] | None,
        progress: Progress | None,
    ) -> Out | BrokerError:
        call = Call(tool=self.name, scope=self.scope, transport=transport, args=arguments, progress=progress)
        principal: Principal | None = None
        try:
            principal = _plain_names(await principals(http_scope))
            require_scope(principal, self.scope, self.name)
            if _has_nul(arguments):
                raise InvalidArgument("invalid arguments: text may not contain NUL characters")
            try:
                params = self.input_model.model_validate(arguments)
            except ValidationError as exc:
                raise InvalidArgument(describe_validation(exc)) from None
            call.args = params.model_dump(exclude_none=True)
        except BrokerError as error:
            return await broker.record(call, principal, error)
        try:
            return await self.run(Invocation(broker, principal, call), params)
        except BrokerError as error:
            return error
        except Exception as exc:
            log.error("tool %s failed unexpectedly: %s", self.name, describe_failure(exc))
            return InternalError()

    def to_mcp(self, broker: Broker, principals: PrincipalSource, transport: str) -> Tool:
        """The SDK's Tool, with our schema and our validation (the SDK passes arguments through)."""

        async def handler(arguments: dict[str, Any], ctx: Context[Any, Any]) -> Out | connect_answer.Answer:
            async def progress(done: float, total: float | None, message: str) -> None:
                await ctx.report_progress(done, total, message)  # sent only when the request asked for it

            flows = broker.connects
            if flows is None:
                return await self.call(broker, principals, transport, arguments, _http_scope(ctx), progress)
            if ctx.request_state is not None:  # a 2026-07-28 retry after a connect request (or a forged one)
                pending = await connect_answer.resume(ctx, flows)
                if pending is not None:
                    return pending

            async def connect(needed: ConnectRequired) -> CallToolResult | InputRequiredResult:
                return await connect_answer.answer(ctx, flows, needed)

            return await self.call(broker, principals, transport, arguments, _http_scope(ctx), progress, connect)

        return Tool(
            fn=handler,
            name=self.name,
            title=self.title,
            description=self.description,
            parameters=self.input_model.model_json_schema(),
            fn_metadata=FuncMetadata(arg_model=_PassThrough, output_model=self.output_model),
            is_async=True,
            context_kwarg="ctx",
            annotations=self.annotations,
        )


# Bodies go to the provider as given (call_api); every other text may end up stored, where NUL has no place
# (PostgreSQL's text cannot hold it, and a name or key with it is a mistake or an attack).
_OPAQUE = frozenset({"json", "body"})


def _has_nul(arguments: Mapping[str, Any]) -> bool:
    def nul(value: Any) -> bool:
        if isinstance(value, str):
            return "\x00" in value
        if isinstance(value, list | tuple):
            return any(nul(v) for v in value)
        if isinstance(value, Mapping):
            return any(nul(k) or nul(v) for k, v in value.items())
        return False

    return any(nul(k) or (k not in _OPAQUE and nul(v)) for k, v in arguments.items())


def _plain_names(principal: Principal) -> Principal:
    """The caller's account and agent names, refused when they carry NUL (the issuer signed a mistake)."""
    if not principal.plain_names:
        raise Unauthenticated("the access token's sub or azp holds a NUL character; it cannot be used here")
    return principal


def _http_scope(ctx: Context[Any, Any]) -> Mapping[str, Any] | None:
    """The ASGI scope of the HTTP request that carried this call (None over stdio)."""
    try:
        request = ctx.request_context.request
    except (ValueError, AttributeError):
        return None
    scope = getattr(request, "scope", None)
    return scope if isinstance(scope, Mapping) else None


class _PassThrough(ArgModelBase):
    """Hands the raw arguments to `ToolSpec.call`, which validates them itself."""

    model_config = ConfigDict(extra="allow")

    def model_dump_one_level(self) -> dict[str, Any]:
        return {"arguments": dict(self.__pydantic_extra__ or {})}


def error_result(error: BrokerError) -> CallToolResult:
    return CallToolResult(content=[TextContent(type="text", text=error.render())], is_error=True)


def describe_validation(exc: ValidationError) -> str:
    """Field names and what was wrong; never the rejected values (they are the caller's data)."""
    problems = []
    for err in exc.errors()[:10]:
        where = ".".join(str(p) for p in err["loc"]) or "arguments"
        message = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
        problems.append(f"{where}: {message}")
    return "invalid arguments: " + "; ".join(problems)
