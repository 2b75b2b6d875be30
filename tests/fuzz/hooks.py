"""Schemathesis hooks for tests/test_fuzz.py (loaded through SCHEMATHESIS_HOOKS=tests.fuzz.hooks).

Every check runs in full and every failure counts, except a schema-valid request refused for a rule the
OpenAPI document cannot state, and only when the request really breaks that rule and the answer names it
exactly (a server that said so for any other reason would still fail the run):
- an object document without one of its rank fields (`rank_fields`, default `text`): a 400 naming the
  first such document and field (docs/api.md, "Strict input");
- with truncation off, a text too long for the model: how many tokens a text has is the tokenizer's
  business, not the schema's. A 4xx that says so, for a request that turned truncation off;
- a request whose documents split into more chunks than server.max_chunks_per_request (also a matter of
  tokens), for a request that asked for chunks;
- an integer written with a fraction (`"top_n": 5.0`): JSON Schema's `integer` is any number whose
  fraction is zero, while the gateway decodes strictly, as Cohere's and TEI's own servers do, and refuses a
  float where an integer goes (docs/api.md, "Strict input"). A 400 naming a field the request sent as a float.
"""

from __future__ import annotations

import json
import re
from typing import Any

import schemathesis


def _message(content: bytes) -> str:
    try:
        body = json.loads(content)
    except ValueError:
        return ""
    if not isinstance(body, dict):
        return ""
    # Cohere's {id, message}, Voyage's {detail}, TEI's {error, error_type}.
    return str(body.get("message") or body.get("detail") or body.get("error") or "")


def _missing_rank_field(body: dict[str, Any]) -> str | None:
    """The 400 the gateway answers for the first object document lacking a rank field, or None."""
    documents = body.get("documents")
    if not isinstance(documents, list):
        return None
    fields = body.get("rank_fields") or ["text"]
    for i, doc in enumerate(documents):
        if isinstance(doc, dict):
            missing = [f for f in fields if f not in doc]
            if missing:
                return f"invalid request: documents[{i}] has no field {missing[0]!r} to rank on"
    return None


def _unstatable(body: Any, status: int, message: str) -> bool:
    if not isinstance(body, dict):
        return False
    if status == 400 and message == _missing_rank_field(body):
        return True
    truncation_off = body.get("truncate") is False or body.get("truncation") is False or str(body.get("truncation_direction", "")).lower() == "left"
    if truncation_off and 400 <= status < 500 and re.search(r"does not fit the model's \d+ tokens with the query, and truncation is off", message):
        return True
    if status == 400 and bool(body.get("max_chunks_per_doc")) and "(server.max_chunks_per_request)" in message:
        return True
    integer = re.fullmatch(r"invalid request: (\w+): Expected `int( \| null)?`, got `float`", message)
    return status == 400 and integer is not None and isinstance(body.get(integer.group(1)), float)


@schemathesis.hook
def filter_failure(context, failure, case, response) -> bool:
    """Keep the failure unless it is ST202 (schema-valid request rejected) for one of the rules above."""
    return not (failure.code == "ST202" and _unstatable(case.body, response.status_code, _message(response.content)))
