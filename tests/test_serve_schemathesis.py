"""schemathesis against the service's own OpenAPI schema: generated requests for every operation
(valid and invalid query parameters, random multipart bodies), sent in process through ASGI (no socket,
so nothing beyond this process is reachable), a bounded number of examples each. Every answer must be
documented: no 500, each status, content type, header and body conforms to /openapi.json, and requests
that break the schema are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import positive_data_acceptance

from visionpoc.serving.app import create_app
from visionpoc.serving.predict import Predictor


@pytest.fixture(scope="module")
def api(run_dir: Path, predictor: Predictor) -> schemathesis.BaseSchema:
    app = create_app(run_dir, max_upload_bytes=40_000, max_pixels=1000 * 1000, predictor=predictor)
    return schemathesis.openapi.from_asgi("/openapi.json", app)


OPERATIONS = [("/predict", "POST"), ("/health", "GET")]  # every operation in the schema (checked below)


@pytest.mark.slow
def test_every_operation_is_exercised(api: schemathesis.BaseSchema) -> None:
    found = {(r.ok().path, r.ok().method.upper()) for r in api.get_all_operations()}
    assert found == set(OPERATIONS)


# Not `positive_data_acceptance`: the schema can say "a binary file", not "an image", so random bytes
# that fit the schema are rightly refused with a documented 400.
# schemathesis's own pytest loader (`schemathesis.pytest.from_fixture`) sets a private pytest attribute
# that pytest 9 no longer has, so the cases come from the operation's Hypothesis strategy instead.
@pytest.mark.slow
@pytest.mark.parametrize(("path", "method"), OPERATIONS)
def test_the_service_answers_as_its_schema_says(api: schemathesis.BaseSchema, path: str, method: str) -> None:
    @given(case=api[path][method].as_strategy())
    @settings(max_examples=40, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
    def answers_conform(case: schemathesis.Case) -> None:
        case.call_and_validate(excluded_checks=[positive_data_acceptance])

    answers_conform()
