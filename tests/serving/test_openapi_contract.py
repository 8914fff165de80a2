"""The OpenAPI schema says what the server accepts: every request the schema calls valid is accepted.

schemathesis generates only schema-valid requests (positive mode) for every operation in /openapi.json and
sends them over real HTTP to a real server with the real exported MNIST model; the positive-data-acceptance
check fails any that the server answers 400. A constraint the server enforces but the schema does not state
(top_k ≥ 1, exactly one input, an output name, the champion cannot be unloaded) shows up here.

What no JSON Schema can state is left out, by the error's own words: whether bytes are a decodable PNG/JPEG
or a well-formed JSON + binary body, whether an input tensor fits the loaded model (its name, shape,
element count and value range are the model's, served at GET /v2/models/{name}), and which of /classify's media
types the loaded model takes (an image model: images; a speech model: clips; a text model: text; else 415).
Seeded and bounded: a fixed number of examples per operation and path variant, so every operation is tried.
"""

from __future__ import annotations

import re

import pytest

from tests.serving.conftest import run_server
from tests.serving.registry_helper import make_registry

SEED = 21
EXAMPLES = 30  # per operation and path variant: ~5 s for the whole schema on 2 cores
# The model's real name and version in the path reach the body parsers; generated ones try unknown names.
REAL_PATH = {"name": "mnist", "version": "v0002"}
INFER = re.compile(r"^/v2/models/\{name\}(/versions/\{version\})?/infer$")
TENSOR_VS_MODEL = re.compile(r"^(unknown input |input ')")  # protocol.check_input / to_pixels / the tensor parsers
NOT_AN_IMAGE = re.compile(r"^(not a readable PNG or JPEG|image format \w+ is not accepted)")  # images.decode_image
NOT_A_BINARY_BODY = re.compile(r"^(request body is not valid JSON|Inference-Header-Content-Length)")  # binary.py
NOT_THIS_MODELS_MEDIA = re.compile(r"^model '[^']+' classifies ")  # inputs.check_upload_type (415)


def beyond_the_schema(case, response) -> bool:
    """Whether a 400 is about content the schema cannot describe (see the module docstring)."""
    if response.status_code == 415:
        error = response.json().get("error", "")
        return case.operation.path == "/classify" and bool(NOT_THIS_MODELS_MEDIA.match(error))
    if response.status_code != 400:
        return False
    error = response.json().get("error", "")
    if INFER.match(case.operation.path):
        binary_body = case.media_type == "application/octet-stream"
        return bool(TENSOR_VS_MODEL.match(error) or (binary_body and NOT_A_BINARY_BODY.match(error)))
    return case.operation.path == "/classify" and bool(NOT_AN_IMAGE.match(error))


@pytest.fixture(scope="module")
def contract_server(tmp_path_factory, onnx_model):
    registry = make_registry(tmp_path_factory.mktemp("contract"), onnx_model, versions=2)
    with run_server(registry, access_log=False) as running:
        yield running


def test_every_schema_valid_request_is_accepted(contract_server):
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, seed, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.core.failures import FailureGroup
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    def accepted(ctx, response, case):
        if beyond_the_schema(case, response):
            return None
        return positive_data_acceptance(ctx, response, case)

    url = contract_server.url
    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    failures: list[str] = []
    tried: dict[str, int] = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        real = {k: v for k, v in REAL_PATH.items() if "{" + k + "}" in operation.path}
        for path_parameters in ([real, None] if real else [None]):
            strategy = operation.as_strategy(schemathesis.GenerationMode.POSITIVE, path_parameters=path_parameters)

            @seed(SEED)
            @settings(max_examples=EXAMPLES, deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
                      suppress_health_check=list(HealthCheck))
            @given(case=strategy)
            def send(case):
                tried[operation.label] = tried.get(operation.label, 0) + 1
                response = case.call(base_url=url, timeout=10)
                case.validate_response(response, checks=[not_a_server_error, accepted])

            try:
                send()
            # FailureGroup is a BaseExceptionGroup, which `except Exception` lets through
            except (FailureGroup, Exception) as exc:  # noqa: BLE001 - collect every operation's failure, report all
                where = "real path" if path_parameters else "generated path"
                failures.append(f"{operation.label} ({where}): {str(exc).strip()[:1500]}")
    labels = {result.ok().label for result in schema.get_all_operations()}
    assert len(labels) >= 14 and set(tried) == labels, tried  # every operation was tried
    assert not failures, f"{len(failures)} schema-valid request(s) rejected:\n\n" + "\n\n".join(failures)
