"""What a new user pastes and runs: the Claude Desktop example and the console script."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_claude_desktop_example_runs_the_installed_command() -> None:
    config = json.loads((ROOT / "claude_desktop_config.example.json").read_text(encoding="utf-8"))
    server = config["mcpServers"]["token-vault"]
    assert server["command"] == "token-vault-mcp"
    assert server["args"] == ["serve"]
    assert shutil.which("token-vault-mcp") is not None, "the console script is not installed"


def test_readme_gives_the_two_quickstart_commands_ci_runs() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "pip install -e '.[test]'" in readme and "token-vault-mcp serve" in readme
    assert "python -m pytest -q" in readme
    assert "pip install --quiet -e '.[test]'" in ci and "python -m pytest -q" in ci
