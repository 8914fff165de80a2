"""The OpenAPI schema says what the server accepts: every request the schema calls valid is accepted.

schemathesis generates only schema-valid requests (positive mode) for every operation in /openapi.json and
sends them over real HTTP to a real server with the real exported MNIST model; the positive-data-acceptance
check fails any that the server answers 400 (or any other status that means "your request is malformed").
A constraint the server enforces but the schema does not state (top_k ≥ 1, exactly one input) shows up here.
Seeded and bounded: a fixed number of examples per operation, so every operation gets its share.
"""

from __future__ import annotations

import pytest

from tests.serving.conftest import run_server
from tests.serving.registry_helper import make_registry

SEED = 21
EXAMPLES = 30  # per operation and path variant; ~10 s for the whole schema on 2 cores
# The model's real name and version in the path reach the body parsers; generated ones test unknown names.
REAL_PATH = {"name": "mnist", "version": "v0002"}


@pytest.fixture(scope="module")
def contract_server(tmp_path_factory, onnx_model):
    registry = make_registry(tmp_path_factory.mktemp("contract"), onnx_model, versions=2)
    with run_server(registry, access_log=False) as running:
        yield running


def test_every_schema_valid_request_is_accepted(contract_server):
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, seed, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    url = contract_server.url
    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    failures: list[str] = []
    operations = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1
        real = {k: v for k, v in REAL_PATH.items() if "{" + k + "}" in operation.path}
        for path_parameters in ([real, None] if real else [None]):
            strategy = operation.as_strategy(schemathesis.GenerationMode.POSITIVE, path_parameters=path_parameters)

            @seed(SEED)
            @settings(max_examples=EXAMPLES, deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
                      suppress_health_check=list(HealthCheck))
            @given(case=strategy)
            def accepted(case):
                response = case.call(base_url=url, timeout=10)
                case.validate_response(response, checks=[not_a_server_error, positive_data_acceptance])

            try:
                accepted()
            except Exception as exc:  # noqa: BLE001 - collect every operation's failure, then report them all
                where = "real path" if path_parameters else "generated path"
                failures.append(f"{operation.method.upper()} {operation.path} ({where}): {str(exc).strip()[:1500]}")
    assert operations >= 14
    assert not failures, f"{len(failures)} schema-valid request(s) rejected:\n\n" + "\n\n".join(failures)
