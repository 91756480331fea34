"""Compression methods behind one interface (glrs.methods.base.Method).

`get_method(name)` returns an object with `.name` and
`.compress(model, calib_ids, density, params, seed, device) -> MethodOutput`.
Modules are imported on first use, so importing glrs.methods is cheap and a
broken optional method does not break the others.

Registry: method name -> (module, attribute). Each module exposes its method
objects as module-level attributes.
"""
from __future__ import annotations

import importlib
from collections.abc import Mapping

from ..errors import GlrsError
from .base import Method, MethodOutput

_REGISTRY: dict[str, tuple[str, str]] = {
    "magnitude": ("magnitude", "MAGNITUDE"),
    "wanda": ("wanda", "WANDA"),
    "sparsegpt": ("sparsegpt", "SPARSEGPT"),
    "svd": ("svd", "SVD"),
    "asvd": ("svd", "ASVD"),
    "svdllm": ("svd", "SVDLLM"),
    "oats": ("oats", "OATS"),
    "bolaco": ("bolaco", "BOLACO"),
    "sslc": ("sslc", "SSLC"),
}


class _LazyMethods(Mapping):
    """name -> Method, importing each method's module when it is first looked up."""

    def __init__(self, registry: dict[str, tuple[str, str]]):
        self._registry = registry
        self._loaded: dict[str, Method] = {}

    def __getitem__(self, name: str) -> Method:
        if name not in self._registry:
            raise KeyError(name)
        if name not in self._loaded:
            module_name, attr = self._registry[name]
            module = importlib.import_module(f"{__name__}.{module_name}")
            self._loaded[name] = getattr(module, attr)
        return self._loaded[name]

    def __iter__(self):
        return iter(self._registry)

    def __len__(self) -> int:
        return len(self._registry)


METHODS: Mapping[str, Method] = _LazyMethods(_REGISTRY)


def method_defaults(name: str) -> dict:
    """The method's parameters and their defaults (its `defaults` attribute, else its module's DEFAULTS)."""
    impl = get_method(name)
    found = getattr(impl, "defaults", None)
    if found is None:
        found = getattr(importlib.import_module(type(impl).__module__), "DEFAULTS", {})
    return dict(found)


def effective_params(name: str, params: dict | None) -> dict:
    """Defaults updated with `params`, unknown names rejected: hash this, so a changed default is a new key."""
    from .base import resolve_params

    optional = method_optional(name)
    p = resolve_params(name, params, method_defaults(name) | optional)
    return {k: v for k, v in p.items() if not (k in optional and v == optional[k])}


def method_optional(name: str) -> dict:
    """Settings added to a method after its keys existed (its `optional` attribute): accepted, but left out of
    the effective parameters while at their default, so that the keys of runs that do not set them stay."""
    return dict(getattr(get_method(name), "optional", {}))


def density_infeasible(name: str, params: dict, density: float) -> str:
    """Why the method cannot run at this density with these (effective) parameters, or "" when it can:
    under N:M sparsity (`nm`) the pruning methods keep exactly N/M, OATS at least N/M (its sparse part)."""
    from ..masks import parse_nm

    nm = parse_nm(params.get("nm"))
    if nm is None:
        return ""
    frac = nm[0] / nm[1]
    if name == "oats":
        return "" if density >= frac - 1e-12 else f"nm {params['nm']} needs density >= {frac:g}"
    return "" if abs(density - frac) <= 1e-9 else f"nm {params['nm']} keeps exactly density {frac:g}"


def method_version(name: str) -> int:
    """The method's algorithm version (its `version` attribute, else its module's VERSION, else 1)."""
    impl = get_method(name)
    return int(getattr(impl, "version", getattr(importlib.import_module(type(impl).__module__), "VERSION", 1)))


def get_method(name: str) -> Method:
    if name not in _REGISTRY:
        raise GlrsError(f"unknown compression method {name!r}; known methods: {', '.join(sorted(_REGISTRY))}")
    try:
        return METHODS[name]
    except (ImportError, AttributeError) as e:
        raise GlrsError(f"compression method {name!r} is registered but cannot be loaded: {e}") from e


__all__ = ["METHODS", "get_method", "method_defaults", "method_optional", "effective_params", "density_infeasible", "method_version", "Method", "MethodOutput"]
