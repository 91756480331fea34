"""Configuration checking against config/schema.yaml, with messages a user can act on."""
from __future__ import annotations

from pathlib import Path

import jsonschema
import yaml

from .errors import GlrsError

REPO_ROOT = Path(__file__).resolve().parent.parent
SCHEMA = REPO_ROOT / "config" / "schema.yaml"
DEFAULT_CONFIG = REPO_ROOT / "config" / "config.yaml"


def _allowed(schema: dict) -> str:
    if "enum" in schema:
        return "one of " + ", ".join(map(str, schema["enum"]))
    if "const" in schema:
        return repr(schema["const"])
    if "oneOf" in schema:
        return " or ".join(_allowed(s) for s in schema["oneOf"])
    bits = [str(schema.get("type", "value"))]
    if "exclusiveMinimum" in schema:
        bits.append(f"> {schema['exclusiveMinimum']}")
    if "minimum" in schema:
        bits.append(f">= {schema['minimum']}")
    if "maximum" in schema:
        bits.append(f"<= {schema['maximum']}")
    if "pattern" in schema:
        bits.append(f"matching {schema['pattern']}")
    if "items" in schema:
        bits.append("of " + _allowed(schema["items"]))
    return " ".join(bits)


LIST_KEYS = ("methods", "allocators", "target_density")


def _typed_strings(value):
    """Strings inside nested --config values typed as YAML would type them: Snakemake hands
    `--config 'rpca={lambda_scale: 2, max_iter: 300}'` over as {'lambda_scale': '2', 'max_iter': '300'}."""
    if isinstance(value, dict):
        return {k: _typed_strings(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_typed_strings(v) for v in value]
    if isinstance(value, str):
        try:
            typed = yaml.safe_load(value)
        except yaml.YAMLError:
            return value
        return typed if isinstance(typed, (bool, int, float)) or typed is None else value
    return value


def validate(config: dict, schema_path: Path = SCHEMA) -> dict:
    """Raise GlrsError naming the offending key and the allowed values.

    A single value for a list key (`--config target_density=0.5`) means a list of one."""
    for key in LIST_KEYS:
        if key in config and not isinstance(config[key], list):
            config[key] = [config[key]]
    for key, value in config.items():  # top-level strings stay as given (model: a path may look like a number)
        if isinstance(value, (dict, list)):
            config[key] = _typed_strings(value)
    if isinstance(config.get("rpca"), dict) and "method" in config["rpca"]:
        raise GlrsError("config key rpca.method is now the top-level key stage1: write `stage1: weights` for "
                        "rpca.method none, `stage1: rpca` for ialm (the rpca section keeps RPCA's solver settings)")
    schema = yaml.safe_load(schema_path.read_text())
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(config), key=lambda e: list(e.absolute_path))
    if not errors:
        return config
    lines = []
    for e in errors:
        key = ".".join(map(str, e.absolute_path)) or "(top level)"
        if e.validator == "additionalProperties":
            allowed = ", ".join(sorted(e.schema.get("properties", {})))
            lines.append(f"config key {key}: {e.message}; allowed keys: {allowed}")
        elif e.validator == "required":
            lines.append(f"config key {key}: {e.message}")
        else:
            lines.append(f"config key {key}: value {e.instance!r} is not allowed; allowed: {_allowed(e.schema)}")
    raise GlrsError("invalid configuration:\n  " + "\n  ".join(lines))


def load(path: Path = DEFAULT_CONFIG) -> dict:
    return validate(yaml.safe_load(Path(path).read_text()))
