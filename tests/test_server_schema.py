"""Schemathesis against the served OpenAPI schema: generated requests, valid and invalid, never get a 5xx,
and every response is one the schema documents (status, content type, body; each streamed event)."""

from __future__ import annotations

import base64

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import content_type_conformance, response_schema_conformance, status_code_conformance
from server_helpers import png

pytest_plugins = ["server_fixtures"]

POSITIVE, NEGATIVE = GenerationMode.POSITIVE, GenerationMode.NEGATIVE
POSTS = ("/v1/caption", "/v1/localize", "/v1/regions", "/v1/dense")
# (method, path, generation mode, swap in a real image so that the other fields reach the model)
CASES = [
    *[
        ("POST", path, mode, real)
        for path in POSTS
        for mode, real in ((POSITIVE, True), (POSITIVE, False), (NEGATIVE, False))
    ],
    *[("GET", path, POSITIVE, False) for path in ("/healthz", "/readyz", "/metrics")],
]
IMAGE = png(64, 48, seed=77)
CONFORMANCE = [status_code_conformance, content_type_conformance, response_schema_conformance]


def with_real_image(case) -> None:
    if isinstance(case.body, dict) and "image" in case.body:
        json_body = case.media_type == "application/json"
        case.body["image"] = base64.b64encode(IMAGE).decode() if json_body else IMAGE


@pytest.fixture(scope="module")
def api_schema(service):
    return schemathesis.openapi.from_url(f"{service.url}/openapi.json")


def test_every_operation_is_covered(api_schema) -> None:
    operations = {(r.ok().method.upper(), r.ok().path) for r in api_schema.get_all_operations()}
    assert operations == {(method, path) for method, path, _, _ in CASES}


@pytest.mark.parametrize(
    "method, path, mode, real_image", CASES, ids=[f"{m} {p} {g.value}{' image' * r}" for m, p, g, r in CASES]
)
def test_no_server_errors(api_schema, service, method: str, path: str, mode: GenerationMode, real_image: bool) -> None:
    @given(case=api_schema[path][method].as_strategy(generation_mode=mode))
    @settings(max_examples=30, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
    def check(case) -> None:
        if real_image:
            with_real_image(case)
        response = case.call(base_url=service.url, timeout=60)
        assert response.status_code < 500, f"{case.method} {case.path}: {response.status_code} {response.text[:300]}"
        if response.status_code >= 400:
            assert set(response.json()["error"]) == {"code", "message"}
        case.validate_response(response, checks=CONFORMANCE)

    check()
