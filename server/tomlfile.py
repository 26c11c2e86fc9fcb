"""Reading an operator's TOML file (market, policy): one line saying what is wrong, never a traceback."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any


def read_toml(path: str | Path, kind: str, error: type[Exception]) -> dict[str, Any]:
    """The parsed document of the `kind` file (e.g. "market") at `path`. Raises `error` with one line."""
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise error(f"cannot read {kind} file {path}: {exc.strerror}") from exc
    except UnicodeDecodeError:
        raise error(f"{kind} file {path} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{kind} file {path} is not valid TOML: {exc}") from exc
