"""Field types shared by the tools' input models."""

from __future__ import annotations

import json
from typing import Annotated, Any

from pydantic import BeforeValidator, Field, StringConstraints

ConnectionName = Annotated[
    str, StringConstraints(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
]
ListingId = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[a-z0-9-]+$")]
ProviderScope = Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=r"^[\x21-\x7e]+$")]


def _json_list(value: Any) -> Any:
    # Some clients send a list argument as a JSON string ("[\"a\"]"); accept that form too.
    if isinstance(value, str) and value.startswith("["):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


ScopeList = Annotated[list[ProviderScope], BeforeValidator(_json_list), Field(min_length=1, max_length=20)]
