"""Readers for the files in infra/: Dockerfile instructions, .dockerignore matching, compose interpolation,
Kubernetes manifests and the Prefect work pool template rendered the way the worker renders it."""

from __future__ import annotations

import copy
import fnmatch
import json
import re
import shlex
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
K8S = INFRA / "k8s"
WORK_POOL_TEMPLATE = INFRA / "prefect" / "work-pool-template.json"
K8S_PREFECT_FILE = INFRA / "prefect" / "prefect-k8s.yaml"


# ----- Dockerfiles ---------------------------------------------------------------------------------------

def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; comments dropped, backslash-continued lines joined."""
    result, pending = [], ""
    for line in dockerfile.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):  # Docker allows comments inside continuations too
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, rest = (pending + stripped).partition(" ")
        result.append((keyword.upper(), rest.strip()))
        pending = ""
    return result


def command_words(arguments: str) -> list[str]:
    """CMD/ENTRYPOINT/HEALTHCHECK CMD arguments: exec form (JSON) or shell form."""
    return json.loads(arguments) if arguments.startswith("[") else shlex.split(arguments)


def last(dockerfile: Path, keyword: str) -> str:
    found = [args for key, args in instructions(dockerfile) if key == keyword]
    assert found, f"{dockerfile.name}: no {keyword}"
    return found[-1]


def env(dockerfile: Path) -> dict[str, str]:
    """The image's ENV (KEY=VALUE form; `$PATH`-style references left as written)."""
    values: dict[str, str] = {}
    for key, args in instructions(dockerfile):
        if key == "ENV":
            values.update(word.split("=", 1) for word in shlex.split(args))
    return values


def healthcheck_command(dockerfile: Path) -> list[str]:
    options, separator, command = last(dockerfile, "HEALTHCHECK").partition("CMD ")
    assert separator, f"{dockerfile.name}: HEALTHCHECK without CMD ({options.strip()})"
    return command_words(command.strip())


def copy_sources(dockerfile: Path) -> list[str]:
    """Build-context paths that COPY instructions read (not those copied from other stages)."""
    sources = []
    for key, args in instructions(dockerfile):
        if key == "COPY" and "--from=" not in args:
            words = command_words(args) if args.startswith("[") else [w for w in shlex.split(args)
                                                                        if not w.startswith("--")]
            sources.extend(words[:-1])
    return sources


def dockerignored(dockerfile: Path, path: str) -> bool:
    """Whether BuildKit leaves `path` out of the build context, per `<Dockerfile>.dockerignore`.

    Last matching pattern wins, `!` re-includes, and a pattern that matches a folder covers what is in it.
    """
    ignore_file = dockerfile.with_name(dockerfile.name + ".dockerignore")
    patterns = [line.strip() for line in ignore_file.read_text().splitlines()
                if line.strip() and not line.strip().startswith("#")]
    parts = Path(path).parts
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    ignored = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        glob = pattern.lstrip("!").strip("/")
        globs = [glob, glob.removeprefix("**/")] if glob.startswith("**/") else [glob]
        if any(fnmatch.fnmatchcase(prefix, g) for prefix in prefixes for g in globs):
            ignored = not negated
    return ignored


# ----- compose -------------------------------------------------------------------------------------------

INTERPOLATION = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


def interpolate(text: str, environ: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error} (the forms infra/compose.yaml uses)."""
    def substitute(match: re.Match) -> str:
        name, op, arg = match["name"], match["op"] or "", match["arg"] or ""
        value = environ.get(name)
        if op.endswith("?") and not value:
            raise KeyError(f"{name}: {arg}")
        return value if value else (arg if op.endswith("-") else "")
    return INTERPOLATION.sub(substitute, text)


def compose() -> dict[str, Any]:
    return yaml.safe_load((INFRA / "compose.yaml").read_text())


def compose_environment(service: dict) -> dict[str, str]:
    environment = service.get("environment") or {}
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    return {key: str(value) for key, value in environment.items()}


def volume_mounts(service: dict) -> list[tuple[str, str, bool]]:
    """(source, target, read_only) for each short-syntax volume of a compose service."""
    mounts = []
    for spec in service.get("volumes", []):
        source, target, *mode = spec.split(":")
        mounts.append((source, target, "ro" in (mode[0].split(",") if mode else [])))
    return mounts


# ----- Kubernetes ----------------------------------------------------------------------------------------

def manifests() -> list[dict]:
    """Every object in infra/k8s/, in the order `kubectl apply -f infra/k8s/` applies them."""
    return [doc for path in sorted(K8S.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc]


def find(objects: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def pod_specs(objects: list[dict]) -> list[dict]:
    return [o["spec"]["template"]["spec"] for o in objects if o["kind"] in ("Deployment", "Job")]


def secret_keys_documented() -> tuple[str, set[str]]:
    """The Secret name and keys of the `kubectl create secret generic` command documented in the manifests."""
    text = "\n".join(path.read_text() for path in sorted(K8S.glob("*.yaml")))
    (name,) = re.findall(r"kubectl -n \S+ create secret generic (\S+)", text)
    return name, set(re.findall(r"--from-literal=([a-z0-9-]+)=", text))


# ----- Prefect work pool ---------------------------------------------------------------------------------

# prefect-kubernetes refuses a job manifest that lacks any of these paths/values (its _get_base_job_manifest
# check in prefect_kubernetes/worker.py); the pod-level parallelism/completions are its quirk, which the
# API server drops (and strict schema validation rejects).
PREFECT_REQUIRED_MANIFEST = {
    "apiVersion": "batch/v1", "kind": "Job", "metadata": {},
    "spec": {"template": {"spec": {"parallelism": 1, "completions": 1, "restartPolicy": "Never",
                                   "containers": [{"name": "prefect-job"}]}}},
}


def work_pool_template() -> dict:
    return json.loads(WORK_POOL_TEMPLATE.read_text())


def render_job(template: dict, job_variables: dict | None = None) -> dict:
    """The Job manifest a worker builds: variable defaults (those not None, as BaseJobConfiguration does)
    overlaid with the deployment's job variables, applied with Prefect's own templating."""
    from prefect.utilities.templating import apply_values

    properties = template["variables"]["properties"]
    values = {name: spec["default"] for name, spec in properties.items() if spec.get("default") is not None}
    values.update(job_variables or {})
    return apply_values(copy.deepcopy(template["job_configuration"]), values)["job_manifest"]


def contains(actual: Any, required: Any) -> bool:
    """Whether `actual` holds every key (recursively) and value of `required`; lists element-wise."""
    if isinstance(required, dict):
        return isinstance(actual, dict) and all(k in actual and contains(actual[k], v) for k, v in required.items())
    if isinstance(required, list):
        return isinstance(actual, list) and len(actual) >= len(required) and all(
            contains(a, r) for a, r in zip(actual, required))
    return actual == required


def prefect_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())
