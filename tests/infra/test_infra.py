"""infra/ checked offline: the Kubernetes manifests and the work pool's Job against the Kubernetes JSON schemas
(kubernetes-validate), the compose file against the Compose Specification schema (check-jsonschema's vendored
copy), and all of them and the Dockerfiles against what the code really has: ports, routes, commands, pools,
settings and paths."""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import json
import posixpath
import re
import tomllib
from functools import cache
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.blocked_imports import run_without_training_stack
from tests.infra.infra_files import (INFRA, K8S_PREFECT_FILE, PREFECT_REQUIRED_MANIFEST, REPO, command_words,
                                     compose, compose_environment, contains, copy_sources, dockerignored, env,
                                     find, healthcheck_command, instructions, interpolate, last, manifests,
                                     pod_specs, prefect_yaml, render_job, secret_keys_documented, volume_mounts,
                                     work_pool_template)

# The oldest Kubernetes the manifests promise to work on, and the newest schema kubernetes-validate ships
# (an API removed upstream would fail there).
K8S_VERSIONS = ("1.30", kubernetes_validate.latest_version())
TRAIN, SERVE = INFRA / "Dockerfile", INFRA / "serving.Dockerfile"
NAMESPACE = "tuneline"


@cache
def params():
    from tuneline.core.config.params import load_params

    return load_params(REPO / "params.yaml")


@cache
def server_app():
    """The real app, built as `tuneline serve` builds it, with a token (probes must not need it)."""
    from tuneline.serving.app import create_app
    from tuneline.serving.settings import build_settings

    settings = build_settings(params(), REPO, {"TUNELINE_SERVE_TOKEN": "secret"}, registry=REPO / "no-registry")
    return create_app(settings, ["CPUExecutionProvider"])


def assert_probe(path: str, live: bool) -> None:
    """`path` is the server's liveness (200 from the start) or readiness (503 until the champion is loaded
    and warm) probe, and answers without the bearer token."""
    from fastapi.testclient import TestClient

    app = server_app()
    assert path in {route.path for route in app.routes}, f"{path}: no such route in tuneline.serving.app"
    status = TestClient(app).get(path).status_code  # not entered: no lifespan, so no champion is loading
    assert status == (200 if live else 503), f"{path}: {status}"


def serve_overrides(environ: dict[str, str]) -> dict:
    """TUNELINE_SERVE_* variables as the server reads them; unknown names and bad values raise ConfigError."""
    from tuneline.serving.settings import env_overrides
    from tuneline.core.config.params import load_params

    overrides = env_overrides(environ)
    load_params(REPO / "params.yaml", overrides)  # validates the values too
    return overrides


def prefect_pools(path: Path) -> set[str]:
    return {d["work_pool"]["name"] for d in prefect_yaml(path)["deployments"]}


def user_uid(dockerfile: Path) -> int:
    user = last(dockerfile, "USER").split(":")[0]
    assert user.isdigit(), f"{dockerfile.name}: USER {user}: numeric, so Kubernetes can verify runAsNonRoot"
    return int(user)


# ----- images --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dockerfile", [TRAIN, SERVE], ids=lambda p: p.name)
def test_image_runs_as_non_root_with_a_healthcheck(dockerfile: Path):
    uid = user_uid(dockerfile)
    assert uid != 0
    created = [args for key, args in instructions(dockerfile) if key == "RUN" and f"useradd --uid {uid}" in args]
    assert created, f"{dockerfile.name}: USER {uid} is not created by a useradd in the image"
    assert healthcheck_command(dockerfile)[:2] == ["python", "-c"]


@pytest.mark.parametrize("dockerfile", [TRAIN, SERVE], ids=lambda p: p.name)
def test_image_copies_files_that_reach_the_build_context(dockerfile: Path):
    sources = copy_sources(dockerfile)
    assert sources
    for source in sources:
        assert (REPO / source).exists(), f"{dockerfile.name}: COPY {source}: not in the repository"
        if source != ".":
            assert not dockerignored(dockerfile, source), f"{dockerfile.name}: COPY {source}: dockerignored"
    # The venv (gigabytes) and local state must stay out of the build context.
    assert all(dockerignored(dockerfile, p) for p in (".venv/bin/python", "models/model.onnx", "registry/x"))


def test_training_image_runs_the_worker_and_has_tuneline():
    entrypoint, cmd = command_words(last(TRAIN, "ENTRYPOINT")), command_words(last(TRAIN, "CMD"))
    installed = " ".join(args for key, args in instructions(TRAIN) if key == "RUN")
    assert entrypoint == ["tini", "--"] and "apt-get install" in installed and " tini " in installed
    prefect_scripts = {ep.name for ep in importlib.metadata.distribution("prefect").entry_points
                       if ep.group == "console_scripts"}
    assert cmd[0] in prefect_scripts and cmd[1:3] == ["worker", "start"]
    assert cmd[cmd.index("--pool") + 1] in prefect_pools(REPO / "prefect.yaml")
    assert "--with-healthcheck" in cmd  # what the HEALTHCHECK polls
    assert "/health" in healthcheck_command(TRAIN)[2] and "PREFECT_WORKER_WEBSERVER_PORT" in env(TRAIN)
    # `tuneline` (one-off runs: docker run IMAGE tuneline run) is the project's console script.
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["tuneline"] == "tuneline.flows.cli:main"
    assert "pip install --no-deps -e /app" in installed
    # Flow runs work in the checkout: prefect.yaml's pull step names it through TUNELINE_PROJECT_DIR.
    assert env(TRAIN)["TUNELINE_PROJECT_DIR"] == last(TRAIN, "WORKDIR") == "/app"
    pull = prefect_yaml(REPO / "prefect.yaml")["pull"][0]["prefect.deployments.steps.set_working_directory"]
    assert pull["directory"] == "{{ $TUNELINE_PROJECT_DIR }}"


def test_serving_image_runs_tuneline_serve_on_all_interfaces():
    from tuneline.flows.cli import _parser

    entrypoint, cmd = command_words(last(SERVE, "ENTRYPOINT")), command_words(last(SERVE, "CMD"))
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert entrypoint == ["tuneline"] and "tuneline" in scripts
    assert _parser().parse_args(cmd).command == "serve"
    image_env = env(SERVE)
    overrides = serve_overrides({k: v for k, v in image_env.items() if k.startswith("TUNELINE_SERVE_")})
    assert overrides["serve.host"] == "0.0.0.0"  # serve.host defaults to loopback
    assert "serve.port" not in overrides and last(SERVE, "EXPOSE") == str(params().serve.port)
    # `tuneline serve` reads params.yaml from its working directory.
    assert ["params.yaml", "./"] in [args.split() for key, args in instructions(SERVE) if key == "COPY"]
    check = healthcheck_command(SERVE)[2]
    assert re.search(r"TUNELINE_SERVE_PORT', '(\d+)'", check)[1] == str(params().serve.port)
    assert_probe(urlsplit(re.search(r"'(http://[^']+)'", check)[1]).path, live=False)


def installed_closure(names: set[str]) -> set[str]:
    """`names` and every distribution they require, transitively, as installed here (extras left out)."""
    from packaging.requirements import Requirement

    seen, todo = set(), list(names)
    while todo:
        name = todo.pop().lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = importlib.metadata.distribution(name).requires or []
        except importlib.metadata.PackageNotFoundError:
            continue  # not for this platform (onnxruntime beside onnxruntime-gpu)
        todo += [r.name for r in map(Requirement, requires) if r.marker is None or r.marker.evaluate({"extra": ""})]
    return seen


# What the server does at start and per command, run with the training stack unimportable (tests/blocked_imports.py):
# every serving and core module, params.yaml validated (ModelConfig's validator imported torch before issue 21),
# the app built as `tuneline serve` builds it, the CUDA probe, `tuneline models list` and `predict`'s client.
SERVER_PROBE = """
import importlib, os, pkgutil, sys
from pathlib import Path
import tuneline.core, tuneline.serving
for package in (tuneline.core, tuneline.serving):
    for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        importlib.import_module(module.name)
from tuneline.flows.cli import _parser
_parser()
from tuneline.core.config.params import load_params
from tuneline.core.onnx_session import resolve_providers
from tuneline.serving.app import create_app
from tuneline.serving.settings import build_settings, env_overrides
repo = Path(sys.argv[1])
params = load_params(repo / "params.yaml", env_overrides(os.environ))
create_app(build_settings(params, repo, os.environ, registry=repo / "no-registry"), resolve_providers("auto"))
import tuneline.flows.models_cli, tuneline.serving.client, uvicorn, httpx
print(" ".join(sorted({m.split(".")[0] for m in sys.modules})))
"""


def test_serving_image_leaves_out_only_what_the_server_never_imports(tmp_path):
    """infra/requirements.py --serving drops the training stack, and what it keeps requires none of it: the
    server (CLI, params, app, model loading, the CUDA probe, the client) must run without it."""
    spec = importlib.util.spec_from_file_location("infra_requirements", INFRA / "requirements.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    training_only = module.TRAINING_ONLY
    serving = {module.name_of(r) for r in module.requirements(REPO / "pyproject.toml", serving=True)}
    assert {"onnxruntime-gpu", "onnx", "fastapi", "uvicorn"} <= serving and not serving & training_only
    assert not serving & {"torch", "torchvision", "prefect", "dvc", "optuna"}  # the point of a separate image
    pulled_in = installed_closure(serving) & training_only  # optuna-dashboard requires optuna, for one
    assert not pulled_in, f"the serving set requires {sorted(pulled_in)} (transitively): pip would install them"
    run = run_without_training_stack(SERVER_PROBE, cwd=tmp_path, args=[str(REPO)])
    assert run.returncode == 0, f"the server needs the training stack:\n{run.stderr[-3000:]}"
    loaded = set(run.stdout.split())
    assert "onnxruntime" in loaded and "fastapi" in loaded
    assert not loaded & training_only, f"the server imports {loaded & training_only}: not in the serving image"
    # Lazy imports inside functions that the run above did not reach.
    for source in [*(REPO / "serving").rglob("*.py"), *(REPO / "core").rglob("*.py")]:
        imported = re.findall(r"^\s*(?:from|import)\s+([A-Za-z_]\w*)", source.read_text(), re.M)
        assert not set(imported) & training_only, f"{source.name} imports {set(imported) & training_only}"


def test_serving_image_installs_every_folder_the_package_maps():
    """The image installs the package from the folders pyproject.toml's package-dir maps onto `tuneline`;
    a folder left out of its COPY lines (or its .dockerignore) would be missing from the install."""
    mapped = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values())
    copied = {source for source in copy_sources(SERVE) if (REPO / source).is_dir()}
    assert mapped <= copied, f"infra/serving.Dockerfile does not COPY {sorted(mapped - copied)}"
    assert not any(dockerignored(SERVE, folder + "/__init__.py") for folder in mapped)
    installed = " ".join(args for key, args in instructions(SERVE) if key == "RUN")
    assert "pip install --no-deps /tmp/build" in installed  # a regular install, as pyproject maps it


# ----- compose -------------------------------------------------------------------------------------------

def compose_schema_errors(document: dict) -> list[str]:
    import importlib.resources

    schema = json.loads((importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
                         / "compose-spec.json").read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]


def test_compose_file_matches_the_compose_spec():
    assert compose_schema_errors(compose()) == []


def test_compose_references_resolve():
    spec = compose()
    services, volumes = spec["services"], set(spec["volumes"])
    for name, service in services.items():
        for target in service.get("depends_on", {}):
            assert target in services, f"{name}: depends_on {target}: no such service"
        for source, target, _ in volume_mounts(service):
            if source.startswith("."):  # a bind mount, relative to the compose file
                assert (INFRA / source).is_file(), f"{name}: {source}: missing"
            else:
                assert source in volumes, f"{name}: volume {source} is not declared"
        if "build" in service:
            context = (INFRA / service["build"]["context"]).resolve()
            assert context == REPO and (context / service["build"]["dockerfile"]).is_file()
    images = {s["build"]["dockerfile"]: s["image"] for s in services.values() if "build" in s}
    assert images == {"infra/Dockerfile": "tuneline-train:latest", "infra/serving.Dockerfile": "tuneline-serve:latest"}


def test_compose_serve_matches_the_server():
    serve = compose()["services"]["serve"]
    (published,) = serve["ports"]
    assert published.rsplit(":", 1)[1] == str(params().serve.port)
    assert not {k: v for k, v in compose_environment(serve).items() if k == "TUNELINE_SERVE_PORT"}
    url = urlsplit(re.search(r"'(http://[^']+)'", serve["healthcheck"]["test"][-1])[1])
    assert url.port == params().serve.port
    assert_probe(url.path, live=False)
    # The image's registry folder, mounted read-only from the volume the worker writes at paths.registry.
    (registry_mount,) = volume_mounts(serve)
    assert registry_mount == ("registry", env(SERVE)["TUNELINE_SERVE_REGISTRY"], True)
    assert any(p["driver"] == "nvidia" and "gpu" in p["capabilities"]
               for p in serve["deploy"]["resources"]["reservations"]["devices"])


def test_compose_worker_shares_the_registry_and_the_dvc_remote():
    worker = compose()["services"]["worker"]
    mounts = {source: target for source, target, _ in volume_mounts(worker)}
    project = PurePosixPath(last(TRAIN, "WORKDIR"))
    assert mounts["registry"] == str(project / params().paths.registry)
    remote = re.search(r"url\s*=\s*(\S+)", (REPO / ".dvc" / "config").read_text())[1]  # relative to .dvc/
    assert mounts["dvc-remote"] == posixpath.normpath(project / ".dvc" / remote)
    assert worker["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


def test_compose_worker_and_registration_use_prefect_yaml_pool():
    services = compose()["services"]
    worker, register = services["worker"]["command"], services["register"]["command"][-1]
    pool = worker[worker.index("--pool") + 1]
    assert pool in prefect_pools(REPO / "prefect.yaml")
    assert f"prefect work-pool create {pool} --type process" in register and "deploy --all" in register
    assert services["worker"]["depends_on"]["register"]["condition"] == "service_completed_successfully"
    assert compose_environment(services["worker"])["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert "--host 0.0.0.0" in " ".join(services["prefect-server"]["command"])


def test_compose_database_urls_point_at_postgres_with_the_password_from_the_environment():
    from sqlalchemy.engine import make_url

    text = (INFRA / "compose.yaml").read_text()
    # The password only ever comes from the environment, and compose refuses to start without it.
    assert set(re.findall(r"\$\{POSTGRES_PASSWORD[^}]*\}", text)) == {"${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD}"}
    with pytest.raises(KeyError, match="set POSTGRES_PASSWORD"):
        interpolate(text, {})
    spec = yaml.safe_load(interpolate(text, {"POSTGRES_PASSWORD": "pw"}))
    database = compose_environment(spec["services"]["postgres"])
    created = set(re.findall(r"CREATE DATABASE (\w+)", (INFRA / "postgres" / "init-optuna.sql").read_text()))
    prefect = make_url(compose_environment(spec["services"]["prefect-server"])["PREFECT_API_DATABASE_CONNECTION_URL"])
    optuna = make_url(compose_environment(spec["services"]["worker"])["TUNELINE_TUNE_STORAGE"])
    for url, driver, databases in ((prefect, "postgresql+asyncpg", {database["POSTGRES_DB"]}),
                                   (optuna, "postgresql+psycopg", created)):
        assert url.drivername == driver and url.host == "postgres" and url.database in databases
        assert (url.username, url.password) == (database["POSTGRES_USER"], "pw")
    assert "pg_isready" in spec["services"]["postgres"]["healthcheck"]["test"][-1]


def tuneline_variables() -> list[tuple[str, str]]:
    """(name, value) of every TUNELINE_* variable that infra/ sets; secrets and unset defaults read ''."""
    spec = yaml.safe_load(interpolate((INFRA / "compose.yaml").read_text(), {"POSTGRES_PASSWORD": "pw"}))
    found = [item for service in spec["services"].values() for item in compose_environment(service).items()]
    found += [*env(TRAIN).items(), *env(SERVE).items()]
    containers = [c for pod in pod_specs(manifests()) for c in pod["containers"]]
    containers += render_job(work_pool_template())["spec"]["template"]["spec"]["containers"]
    found += [(e["name"], e.get("value", "")) for c in containers for e in c.get("env", [])]
    return [(name, value) for name, value in found if name.startswith("TUNELINE_")]


def test_tuneline_variables_are_ones_the_code_reads():
    from tuneline.serving.settings import ENV_PREFIX

    variables = tuneline_variables()
    assert {"TUNELINE_TUNE_STORAGE", "TUNELINE_SERVE_HOST", "TUNELINE_SERVE_DEVICE"} <= {n for n, _ in variables}
    for name, value in variables:
        if name.startswith(ENV_PREFIX) and value:
            serve_overrides({name: value})  # a name and a value the server accepts
    python = "\n".join(p.read_text() for d in ("core", "flows", "tasks", "serving") for p in (REPO / d).rglob("*.py"))
    read = set(re.findall(r'"(TUNELINE_[A-Z_]+)"', python))
    read |= set(re.findall(r"\{\{ \$(TUNELINE_[A-Z_]+) \}\}", (REPO / "prefect.yaml").read_text()))
    for name, _ in variables:
        assert name.startswith(ENV_PREFIX) or name in read, f"{name}: no code reads it"


# ----- Kubernetes ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_k8s_manifests_validate_against_the_kubernetes_schemas(version: str):
    objects = manifests()
    assert {o["kind"] for o in objects} >= {"Namespace", "PersistentVolumeClaim", "Deployment", "Service",
                                            "HorizontalPodAutoscaler", "ServiceAccount", "Role", "RoleBinding"}
    for obj in objects:
        kubernetes_validate.validate(obj, version, strict=True)


def test_validators_reject_broken_files():
    from prefect.server.schemas.actions import validate_base_job_template

    deployment = copy.deepcopy(find(manifests(), "Deployment", "tuneline-serve")[0])
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinessProbe"]["httpGet"]["paht"] = "/typo"  # unknown field
    with pytest.raises(kubernetes_validate.ValidationError, match="paht"):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[0], strict=True)
    job = render_job(work_pool_template())
    job["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] = [1]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, K8S_VERSIONS[0], strict=True)
    for service, key, value in (("serve", "ports", "8000"), ("worker", "depends_on", {"register": "done"}),
                                ("postgres", "helthcheck", {})):
        broken = compose()
        broken["services"][service][key] = value
        assert any(e.startswith(f"services/{service}") for e in compose_schema_errors(broken)), (service, key)
    template = work_pool_template()
    template["job_configuration"]["job_manifest"]["spec"]["activeDeadlineSeconds"] = "{{ deadline }}"
    with pytest.raises(ValueError, match="deadline"):
        validate_base_job_template(template)


def test_k8s_references_resolve():
    objects = manifests()
    (namespace,) = find(objects, "Namespace")
    assert namespace["metadata"]["name"] == NAMESPACE
    assert all(o["metadata"]["namespace"] == NAMESPACE for o in objects if o["kind"] != "Namespace")
    claims = {o["metadata"]["name"] for o in find(objects, "PersistentVolumeClaim")}
    secret, keys = secret_keys_documented()
    for deployment in find(objects, "Deployment"):
        template = deployment["spec"]["template"]
        assert contains(template["metadata"]["labels"], deployment["spec"]["selector"]["matchLabels"])
        for volume in template["spec"].get("volumes", []):
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims
        for container in template["spec"]["containers"]:
            for ref in (e["valueFrom"]["secretKeyRef"] for e in container.get("env", []) if "valueFrom" in e):
                assert ref["name"] == secret and ref["key"] in keys, f"{ref}: not in the documented Secret"
    (service,) = find(objects, "Service")
    (serving,) = [d for d in find(objects, "Deployment") if contains(d["spec"]["template"]["metadata"]["labels"],
                                                                   service["spec"]["selector"])]
    port_names = {p["name"] for c in serving["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names
    (hpa,) = find(objects, "HorizontalPodAutoscaler")
    target = find(objects, hpa["spec"]["scaleTargetRef"]["kind"], hpa["spec"]["scaleTargetRef"]["name"])
    assert target == [serving]  # and CPU utilisation needs CPU requests on every container
    assert all("cpu" in c["resources"]["requests"] for c in serving["spec"]["template"]["spec"]["containers"])


def test_k8s_serving_matches_the_server_and_the_image():
    (serving,) = find(manifests(), "Deployment", "tuneline-serve")
    spec = serving["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert [p["containerPort"] for p in container["ports"]] == [params().serve.port]
    assert_probe(container["readinessProbe"]["httpGet"]["path"], live=False)
    assert_probe(container["livenessProbe"]["httpGet"]["path"], live=True)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert spec["securityContext"]["runAsNonRoot"] and spec["securityContext"]["runAsUser"] == user_uid(SERVE)
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    mount = {m["name"]: m for m in container["volumeMounts"]}["registry"]
    assert mount["mountPath"] == env(SERVE)["TUNELINE_SERVE_REGISTRY"] and mount["readOnly"]
    assert container["image"] == compose()["services"]["serve"]["image"]
    assert _parser_command(container["args"]) == "serve"


def test_k8s_stop_timing_agrees_with_the_servers_drain():
    """On SIGTERM the server stays up, unready, for serve.drain_delay_s, then drains for up to
    serve.shutdown_timeout_s (serving/drain.py): the kubelet must not SIGKILL before both have run, and the
    readiness probe must notice the 503 before the delay ends (so the listener closes after traffic left)."""
    (serving,) = find(manifests(), "Deployment", "tuneline-serve")
    spec = serving["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    serve = params().serve
    assert spec["terminationGracePeriodSeconds"] > serve.drain_delay_s + serve.shutdown_timeout_s
    probe = container["readinessProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] < serve.drain_delay_s
    assert "preStop" not in container.get("lifecycle", {})  # the server waits itself; a preStop sleep would add to it


def _parser_command(args: list[str]) -> str:
    from tuneline.flows.cli import _parser

    return _parser().parse_args(args).command


def test_k8s_worker_may_create_jobs_in_its_namespace_only():
    objects = manifests()
    (worker,) = find(objects, "Deployment", "prefect-worker")
    spec = worker["spec"]["template"]["spec"]
    (binding,) = find(objects, "RoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": spec["serviceAccountName"],
                                    "namespace": NAMESPACE}]
    assert find(objects, "ServiceAccount", spec["serviceAccountName"]) and not find(objects, "ClusterRole")
    (role,) = find(objects, "Role", binding["roleRef"]["name"])
    allowed = {(group, resource, verb) for rule in role["rules"] for group in rule["apiGroups"]
               for resource in rule["resources"] for verb in rule["verbs"]}
    assert {("batch", "jobs", v) for v in ("create", "get", "watch", "delete")} <= allowed
    assert {("", "pods", "list"), ("", "pods/log", "get")} <= allowed
    (container,) = spec["containers"]
    command = container["command"]
    assert command[command.index("--type") + 1] == "kubernetes"
    assert command[command.index("--pool") + 1] in prefect_pools(K8S_PREFECT_FILE)
    variables = {e["name"]: e.get("value") for e in container["env"]}
    assert variables["PREFECT_INTEGRATIONS_KUBERNETES_OBSERVER_NAMESPACES"] == NAMESPACE
    assert container["livenessProbe"]["httpGet"]["path"] == "/health" and "--with-healthcheck" in command
    assert spec["securityContext"]["runAsNonRoot"]


# ----- Prefect work pool and deployments -----------------------------------------------------------------

@pytest.mark.parametrize("job_variables", [None, "deployment", {"gpu_count": 2}],
                         ids=["defaults", "gpu-cluster", "two-gpus"])
def test_work_pool_job_is_a_valid_gpu_job(job_variables):
    from prefect.server.schemas.actions import validate_base_job_template

    template = work_pool_template()
    validate_base_job_template(template)  # what the server checks at `prefect work-pool create`
    if job_variables == "deployment":
        (deployment,) = prefect_yaml(K8S_PREFECT_FILE)["deployments"]
        job_variables = deployment["work_pool"]["job_variables"]
        jsonschema.validate(job_variables, template["variables"])  # as the server checks at `prefect deploy`
    job = render_job(template, job_variables)
    assert contains(job, PREFECT_REQUIRED_MANIFEST), "prefect-kubernetes would refuse this job manifest"
    assert "{{" not in json.dumps(job)
    pod = job["spec"]["template"]["spec"]
    for field in ("parallelism", "completions"):  # prefect-kubernetes's pod-level quirk, dropped by the API server
        assert pod.pop(field) == job["spec"][field] == 1
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(job, version, strict=True)

    defaults = {k: v.get("default") for k, v in template["variables"]["properties"].items()}
    gpus = (job_variables or {}).get("gpu_count", defaults["gpu_count"])
    (container,) = pod["containers"]
    assert gpus >= 1 and container["resources"]["limits"]["nvidia.com/gpu"] == gpus
    assert container["resources"]["requests"]["nvidia.com/gpu"] == gpus
    assert "args" not in container  # the worker fills in `prefect flow-run execute`; the image's tini runs it
    assert job["metadata"]["namespace"] == NAMESPACE
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == user_uid(TRAIN)
    assert container["image"] == compose()["services"]["worker"]["image"]
    claims = {o["metadata"]["name"] for o in find(manifests(), "PersistentVolumeClaim")}
    assert {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]} == claims
    # The same mounts as the compose worker: the registry and the DVC remote, where the checkout expects them.
    compose_mounts = {target for _, target, _ in volume_mounts(compose()["services"]["worker"])}
    assert {m["mountPath"] for m in container["volumeMounts"]} == compose_mounts


def test_k8s_deployment_is_valid_for_prefect_deploy_and_stays_out_of_deploy_all():
    from prefect.cli.deploy._models import PrefectYamlModel

    k8s = PrefectYamlModel.model_validate(prefect_yaml(K8S_PREFECT_FILE))
    (gpu,) = k8s.deployments
    assert gpu.name == "gpu-cluster" and gpu.work_pool.name == "tuneline-k8s"
    local = prefect_yaml(REPO / "prefect.yaml")
    pipelines = [d for d in local["deployments"] if d["entrypoint"].startswith("flows/pipeline.py")]
    assert {gpu.entrypoint} == {d["entrypoint"] for d in pipelines}  # the live loop's flows stay local
    # The Job's checkout: a fixed path, since `prefect deploy` would bake in the deploying shell's
    # $TUNELINE_PROJECT_DIR if it is set there.
    (step,) = prefect_yaml(K8S_PREFECT_FILE)["pull"]
    assert step["prefect.deployments.steps.set_working_directory"]["directory"] == last(TRAIN, "WORKDIR")
    # `prefect deploy --all` (tests/flows/test_deployment.py creates only this pool) fails on any other pool.
    assert prefect_pools(REPO / "prefect.yaml") == {"tuneline-process"}
    assert {d["name"] for d in pipelines} == {"nightly", "adhoc"}
    assert {d["name"] for d in local["deployments"]} == {"nightly", "adhoc", "drift-watch", "promote-live"}
