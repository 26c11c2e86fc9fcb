"""The floor: a bare `MCPServer` whose tools have the product's names and schemas and answer at once.

Each tool returns an answer captured from the real product (a JSON file), so the SDK moves
the very same bytes; nothing runs behind it — except `call_api`, whose work is a provider's
answer: the floor's `call_api` sends the same request (method, URL, headers, a bearer token)
with one pooled httpx client to the same loopback provider (bench/provider.py) and returns
what it answered (status, the product's header subset, body) in the product's output model.
Two ways to build the tools:

- models (default): the product's own pydantic input and output models (`tools/*.py`), so the
  SDK validates the arguments and the result exactly as it would for any pydantic tool; plus
  a `noop` tool for scale.
- `--tools FILE`: the product's captured `tools/list` answer, with no import of the product at
  all (the models live in modules that import the broker) — the cold-start floor: the SDK's own
  start with the same four tool definitions.

    python -m bench.floor --answers answers.json [--tools tools.json] [--transport stdio|http|sse --port N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

import httpx
from mcp.server import MCPServer
from mcp.server.mcpserver.tools import Tool
from mcp.server.mcpserver.utilities.func_metadata import ArgModelBase, FuncMetadata
from mcp.types import CallToolResult, TextContent, ToolAnnotations
from pydantic import BaseModel, ConfigDict


async def noop() -> str:
    """Does nothing."""
    return "ok"


def model_tools(answers: dict[str, Any]) -> list[Tool]:
    """The product's tools rebuilt on its own pydantic models, each answering its captured result."""
    from tools import ALL_TOOLS

    built = []
    for spec in ALL_TOOLS:
        answer = spec.output_model.model_validate(answers[spec.name])
        # The input model as the SDK's argument model: the SDK validates arguments with it.
        args = type(spec.input_model.__name__ + "Args", (spec.input_model, ArgModelBase), {"__module__": __name__})
        built.append(
            Tool(
                fn=_calling_provider(answer) if spec.name == "call_api" else _answering(answer),
                name=spec.name,
                title=spec.title,
                description=spec.description,
                parameters=spec.input_model.model_json_schema(),
                fn_metadata=FuncMetadata(arg_model=args, output_model=spec.output_model),
                is_async=True,
                context_kwarg=None,
                annotations=spec.annotations,
            )
        )
    built.append(Tool.from_function(noop, name="noop"))
    return built


class _AnyArgs(ArgModelBase):
    model_config = ConfigDict(extra="allow")

    def model_dump_one_level(self) -> dict[str, Any]:
        return {}


def schema_tools(listed: list[dict[str, Any]], answers: dict[str, Any]) -> list[Tool]:
    """The same tool definitions from a captured `tools/list` answer, without importing the product."""
    built = []
    for item in listed:
        structured = answers.get(item["name"], {})
        result = CallToolResult(
            content=[TextContent(type="text", text=json.dumps(structured, indent=2))], structured_content=structured
        )
        built.append(
            Tool(
                fn=_answering(result),
                name=item["name"],
                title=item.get("title"),
                description=item.get("description", ""),
                parameters=item["inputSchema"],
                fn_metadata=FuncMetadata(arg_model=_AnyArgs, output_schema=item.get("outputSchema")),
                is_async=True,
                context_kwarg=None,
                annotations=ToolAnnotations.model_validate(item["annotations"]) if item.get("annotations") else None,
            )
        )
    return built


def _answering(answer: BaseModel | CallToolResult) -> Any:
    async def answer_it(**_: Any) -> Any:
        return answer

    return answer_it


def _calling_provider(captured: BaseModel) -> Any:
    """The floor's call_api: the agent's request sent as is, answered from the provider's response.

    The grant fields (grant_id, token_id, …) are the captured ones: a floor has no grants to keep.
    """
    from server.provider import PASSED_HEADERS, PASSED_PREFIXES, USER_AGENT
    from tools.call_api import CallApiOutput

    assert isinstance(captured, CallApiOutput)
    pool: list[httpx.AsyncClient] = []  # one client, made in the serving loop at the first call

    async def call_api(*, method: str, url: str, headers: dict[str, str] | None, body: str | None, **rest: Any) -> Any:
        if not pool:
            pool.append(httpx.AsyncClient(
                follow_redirects=False, trust_env=False, timeout=httpx.Timeout(30.0),
                limits=httpx.Limits(max_connections=100, max_keepalive_connections=20, keepalive_expiry=30),
                headers={"User-Agent": USER_AGENT},
            ))
        sent = {**(headers or {}), "authorization": "Bearer floor-token"}
        began = time.perf_counter()
        response = await pool[0].request(method, url, headers=sent, json=rest.get("json"), content=body)
        elapsed = (time.perf_counter() - began) * 1000
        return CallApiOutput(
            status=response.status_code,
            headers={k: v for k, v in response.headers.items() if k in PASSED_HEADERS or k.startswith(PASSED_PREFIXES)},
            body=response.text,
            body_encoding="text",
            truncated=False,
            grant_id=captured.grant_id,
            grant_expires_at=captured.grant_expires_at,
            token_id=captured.token_id,
            units_remaining=captured.units_remaining,
            elapsed_ms=round(elapsed, 3),
        )

    return call_api


def build_floor(answers: dict[str, Any], listed: list[dict[str, Any]] | None = None) -> MCPServer:
    tools = schema_tools(listed, answers) if listed is not None else model_tools(answers)
    return MCPServer(name="floor", tools=tools, log_level="WARNING")


async def serve(mcp: MCPServer, transport: str, port: int) -> None:
    if transport == "stdio":
        await mcp.run_stdio_async()
        return
    import uvicorn

    if transport == "http":
        app = mcp.streamable_http_app(streamable_http_path="/mcp", host="127.0.0.1")
    else:
        app = mcp.sse_app(host="127.0.0.1")
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", server_header=False, proxy_headers=False
    )
    await uvicorn.Server(config).serve()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.floor")
    parser.add_argument("--answers", type=Path, required=True)
    parser.add_argument("--tools", type=Path, help="a captured tools/list answer: build without the product")
    parser.add_argument("--transport", choices=("stdio", "http", "sse"), default="stdio")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    answers = json.loads(args.answers.read_text())
    listed = json.loads(args.tools.read_text()) if args.tools else None
    asyncio.run(serve(build_floor(answers, listed), args.transport, args.port))


if __name__ == "__main__":
    main()
