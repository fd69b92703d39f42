"""The method registry (timm style): name -> what the method is (metadata) and where its class lives.

Entries are registered explicitly in ``ctcdam/explain/__init__.py``. An entry names its class as
``"module:ClassName"`` and the class is imported on first use, so callers (a CLI building its ``--help``, a
config check) can ask the registry which methods exist and what they need without importing torch.
Registering an entry again with the same class path replaces it (``importlib.reload`` is harmless); another
class under a taken name is an error.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Literal

#: Where a method's map is computed: on the token grid, or in pixels (then summed over each patch).
Space = Literal["token", "pixel"]
#: What ``chunk_elements`` (rows x tokens x width of one pass, the unit of every method) counts the rows of:
#: perturbed last-block inputs (target copies included on the general engine), model inputs backpropagated
#: once per target, or model inputs run forward without gradients; None: the method does not chunk.
ChunkUnit = Literal["last_block_rows", "input_rows", "forward_rows"] | None
#: CDAM variants, baselines, and the control that every metric should beat.
Family = Literal["cdam", "baseline", "control"]


@dataclass(frozen=True)
class MethodInfo:
    """What an explanation method is: how callers choose, chunk and compare it without knowing it by name."""

    name: str
    entry: str  #: "module:ClassName" of its ``Attribution`` subclass, imported on first use
    family: Family
    space: Space
    gradients: bool  #: needs autograd
    concept_targets: bool  #: accepts concept vectors as targets
    target_specific: bool  #: its map depends on the target (attention, rollout and random do not)
    signed: bool  #: positive and negative scores mean evidence and counter-evidence
    chunk_unit: ChunkUnit
    options: tuple[str, ...] = ()  #: keyword options of ``attribute`` (typed there, checked by a test)


_REGISTRY: dict[str, MethodInfo] = {}


def register_method(info: MethodInfo) -> MethodInfo:
    """Add a method to the registry; the same entry again replaces it, another entry under its name raises."""
    known = _REGISTRY.get(info.name)
    if known is not None and known.entry != info.entry:
        raise ValueError(f"explanation method {info.name!r} is already registered for {known.entry}, not {info.entry}")
    _REGISTRY[info.name] = info
    return info


def list_methods(family: Family | None = None) -> list[str]:
    """Names of the registered methods (of one ``family`` if given), sorted."""
    return sorted(name for name, info in _REGISTRY.items() if family in (None, info.family))


def method_infos() -> tuple[MethodInfo, ...]:
    """Every registered method's metadata, in registration order."""
    return tuple(_REGISTRY.values())


def method_info(name: str) -> MethodInfo:
    """The metadata of the method registered under ``name``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown explanation method {name!r}; known: {', '.join(list_methods())}") from None


def get_method(name: str) -> Any:
    """The ``Attribution`` class registered under ``name`` (imported now if it was not yet)."""
    info = method_info(name)
    module, _, attribute = info.entry.partition(":")
    cls = getattr(importlib.import_module(module), attribute)
    if getattr(cls, "name", None) != name:
        raise TypeError(f"{info.entry} is registered as {name!r} but calls itself {getattr(cls, 'name', None)!r}")
    return cls
