"""`-S section.key=value` overrides and validation against a params schema, without importing the schema.

Stage code that derives new params from old ones (a tuning trial's, the best trial's) passes `type(params)`
as the schema: it never imports the root `Params`, which would make every section (the server's too) part of
that stage's code deps.
"""

from __future__ import annotations

import json
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from tuneline.core.config.base import ConfigError

KWARGS_PREFIX = "model.kwargs."  # model.kwargs.KEY sets one key of the free-form model.kwargs (tunable in tune.space)


def valid_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted key a params file or an override may set, e.g. ['data.mirror', …, 'train.lr']."""
    keys: list[str] = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys.extend(valid_keys(annotation, f"{prefix}{name}."))
        else:
            keys.append(f"{prefix}{name}")
    return keys



def parse_override(text: str) -> tuple[str, Any]:
    """`train.lr=0.01` -> ('train.lr', 0.01); the value is read as YAML, as DVC's `-S` does."""
    key, sep, raw_value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r}: expected section.key=value, e.g. train.lr=0.01")
    try:
        value = yaml.safe_load(raw_value) if raw_value.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc.problem})") from None
    return key.strip(), value


def parse_overrides(texts: list[str]) -> dict[str, Any]:
    """Every `-S key=value` of a command line, in order (a later one wins), as {key: value}."""
    return dict(parse_override(text) for text in texts)


def add_override_option(parser, example: str = "train.lr=0.01") -> None:
    """The `-S/--set KEY=VALUE` option, the same on every command (tuneline run/stage/tune/models/serve)."""
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override a params.yaml key, e.g. -S {example} (repeatable; the value is YAML)")



def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any], schema: type[BaseModel]) -> dict[str, Any]:
    """Return a copy of `raw` with each dotted key set; an unknown key is a ConfigError naming the valid ones."""
    merged = json.loads(json.dumps(raw))  # deep copy of plain YAML data
    known = valid_keys(schema)
    for key, value in overrides.items():
        if key.startswith(KWARGS_PREFIX) and len(key) > len(KWARGS_PREFIX):  # model.kwargs.width: one builder kwarg
            node = merged.setdefault("model", {})
            kwargs = node.get("kwargs") if isinstance(node, dict) else None
            if not isinstance(node, dict) or not isinstance(kwargs, (dict, type(None))):
                raise ConfigError(f"params: model.kwargs must be a mapping to set {key!r}")
            node["kwargs"] = {**(kwargs or {}), key[len(KWARGS_PREFIX):]: value}
            continue
        if key not in known:
            section = key.split(".")[0]
            same_section = [k for k in known if k.startswith(section + ".")]
            choices = same_section or sorted({k.split(".")[0] for k in known})
            raise ConfigError(f"unknown key {key!r}: valid keys are {', '.join(choices)}")
        section, name = key.split(".", 1)
        node = merged.setdefault(section, {})
        if not isinstance(node, dict):
            raise ConfigError(f"params: section {section!r} must be a mapping, got {type(node).__name__}")
        node[name] = value
    return merged



def _first_error(exc: ValidationError, source: str, schema: type[BaseModel]) -> ConfigError:
    err = exc.errors()[0]
    key = ".".join(str(part) for part in err["loc"])
    if err["type"] == "extra_forbidden":
        section = ".".join(str(part) for part in err["loc"][:-1])
        choices = [k for k in valid_keys(schema) if k.startswith(section + ".")] if section else valid_keys(schema)
        return ConfigError(f"{source}: unknown key {key!r}: valid keys are {', '.join(choices)}")
    return ConfigError(f"{source}: {key}: {err['msg']} (got {err.get('input')!r})")



def validate_params(schema: type[BaseModel], raw: dict[str, Any] | None, overrides: dict[str, Any] | None = None,
                    source: str = "params") -> Any:
    """Validate plain params data plus overrides into a frozen instance of `schema`."""
    merged = apply_overrides(raw or {}, overrides or {}, schema)
    try:
        return schema.model_validate(merged)
    except ValidationError as exc:
        key = ".".join(str(part) for part in exc.errors()[0]["loc"])
        raise _first_error(exc, "override" if key in (overrides or {}) else source, schema) from None


def with_overrides(params: Any, overrides: dict[str, Any], source: str = "override") -> Any:
    """`params` with dotted overrides applied, validated by its own class (no import of the root schema)."""
    return validate_params(type(params), params.model_dump(mode="json"), overrides, source=source)
