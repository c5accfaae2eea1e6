"""Schemathesis against the server's own OpenAPI schema: generated requests, valid and invalid, get
answers that the schema documents (status codes, content types, bodies), and never a 5xx."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance
from test_serve import CPU_MODEL, MODEL, running_server

from bitnet158.serve import create_app

# Generated bodies may ask for up to the whole context; a few tokens show the same behaviour, quicker.
MAX_TOKENS = 3
GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")


@pytest.fixture(scope="module")
def server_url() -> Iterator[str]:
    with running_server(create_app(CPU_MODEL, MODEL, max_batch=4)) as url:
        yield url


def _bound(case) -> None:
    """Cap generated generation requests at a few tokens and, where valid, name the served model.
    Values below the schema's minimum stay as they are: the server must refuse them."""
    if case.path in GENERATION_PATHS and isinstance(case.body, dict):
        max_tokens = case.body.get("max_tokens")
        if max_tokens is None or type(max_tokens) is int and max_tokens > MAX_TOKENS:
            case.body["max_tokens"] = MAX_TOKENS
        if isinstance(case.body.get("model"), str):
            case.body["model"] = MODEL


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_the_server_keeps_to_its_schema(server_url, mode):
    schema = schemathesis.openapi.from_url(f"{server_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {*GENERATION_PATHS, "/v1/models", "/health", "/metrics"}
    for operation in operations:
        if mode == GenerationMode.NEGATIVE and operation.path not in GENERATION_PATHS:
            continue  # nothing to get wrong in a GET without parameters
        examples = 12 if operation.path in GENERATION_PATHS else 3

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
                  suppress_health_check=list(HealthCheck))
        def check(case) -> None:
            _bound(case)
            # A schema-valid request can still be refused: an unknown model (404) or a prompt too long for
            # the context (400) cannot be said in the schema.
            case.call_and_validate(base_url=server_url, excluded_checks=[positive_data_acceptance])

        check()
