"""The floor: a bare `MCPServer` whose tools have the product's names and schemas and answer at once.

Each tool returns an answer captured from the real product (a JSON file), so the SDK moves
the very same bytes; nothing runs behind it. Two ways to build the tools:

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
from pathlib import Path
from typing import Any

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
                fn=_answering(answer),
                name=spec.name,
                title=spec.title,
                description=spec.description,
                parameters=spec.input_model.model_json_schema(),
                fn_metadata=FuncMetadata(arg_model=args, output_model=spec.output_model),
                is_async=True,
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
                annotations=ToolAnnotations.model_validate(item["annotations"]) if item.get("annotations") else None,
            )
        )
    return built


def _answering(answer: BaseModel | CallToolResult) -> Any:
    async def answer_it(**_: Any) -> Any:
        return answer

    return answer_it


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
