"""A stage's view of the config: the keys it declares, and nothing else.

A stage's fingerprint hashes the keys it declares it reads (pipeline/core/registry.py); a key it read
without declaring would change its output without changing its fingerprint, and a rerun would keep a
stale output. So a stage never gets the whole config: `declared_view` turns every other key into an
interpolation whose resolver raises `UndeclaredKey`, naming the stage and the key. Reading one by
attribute, `OmegaConf.select`, `to_container(resolve=True)` or `section()` fails at once, in tests and
in production alike.
"""
from __future__ import annotations

import copy
from dataclasses import is_dataclass
from typing import Any, Iterable

from omegaconf import DictConfig, OmegaConf

from xlp.pipeline.core.errors import PipelineError

RESOLVER = "xlp.undeclared"


class UndeclaredKey(PipelineError):
    """A stage read a config key it does not declare."""


def _undeclared_message(stage: str, key: str) -> str:
    return (f"stage {stage!r} read the config key {key}, which it does not declare: add it to the "
            f"stage's `reads` (hashed into its fingerprint) or, if it changes nothing the stage writes, "
            f"to its `sees` (pipeline/core/registry.py)")


def _raise_undeclared(stage: str, _node_: Any) -> Any:
    raise UndeclaredKey(_undeclared_message(stage, _node_._get_full_key(None)))


OmegaConf.register_resolver(RESOLVER, _raise_undeclared, replace=True, annotation_validation="off")


def _covers(allowed: tuple[str, ...], path: str) -> bool:
    return any(path == key or path.startswith(key + ".") for key in allowed)


def _inside(allowed: tuple[str, ...], path: str) -> bool:
    return any(key.startswith(path + ".") for key in allowed)


def _is_section(node: DictConfig) -> bool:
    kind = OmegaConf.get_type(node)
    return isinstance(kind, type) and is_dataclass(kind) and len(node) > 0


def declared_view(cfg: DictConfig, stage: str, keys: Iterable[str]) -> DictConfig:
    """A read-only copy of `cfg` in which only `keys` (dotted; a key names its whole subtree) can be
    read; every other key raises UndeclaredKey when read."""
    allowed = tuple(keys)
    view = copy.deepcopy(cfg)
    OmegaConf.set_readonly(view, False)
    marker = "${" + RESOLVER + ":" + stage + "}"

    def mask(node: DictConfig, prefix: str) -> None:
        for key in list(node.keys()):
            path = f"{prefix}{key}"
            if _covers(allowed, path):
                continue
            child = node._get_node(key)
            # a section (a dataclass) is masked field by field, so the error names the field read; a
            # free-form mapping (data.mixture) or a list is masked whole, as reading it at all is a read
            if isinstance(child, DictConfig) and (_inside(allowed, path) or _is_section(child)):
                mask(node[key], path + ".")
            else:
                node[key] = marker

    mask(view, "")
    OmegaConf.set_readonly(view, True)
    return view


def _masked_fields(node: DictConfig) -> dict[str, str]:
    """{field: stage} for the fields of `node` that declared_view masked."""
    out = {}
    for key in node.keys():
        child = node._get_node(key)
        if child is not None and child._is_interpolation():
            text = str(child._value())
            if text.startswith("${" + RESOLVER + ":"):
                out[str(key)] = text[len(RESOLVER) + 3:-1]
    return out


_GUARDED: dict[tuple[type, frozenset], type] = {}


def _rebuild(cls: type, state: dict, masked: dict[str, str], prefix: str) -> Any:
    obj = cls.__new__(cls)
    obj.__dict__.update(state)
    return _guard(obj, masked, prefix)


def _guard(obj: Any, masked: dict[str, str], prefix: str) -> Any:
    """`obj` (a dataclass) as an instance of a subclass that raises UndeclaredKey on the masked fields."""
    base = type(obj)
    key = (base, frozenset(masked.items()), prefix)
    cls = _GUARDED.get(key)
    if cls is None:
        def __getattribute__(self, name, _masked=dict(masked), _base=base, _prefix=prefix):
            if name in _masked:
                raise UndeclaredKey(_undeclared_message(_masked[name], _prefix + name))
            return _base.__getattribute__(self, name)

        def __reduce__(self, _masked=dict(masked), _base=base, _prefix=prefix):
            state = {k: v for k, v in object.__getattribute__(self, "__dict__").items()}
            return _rebuild, (_base, state, _masked, _prefix)

        cls = type(base.__name__, (base,), {"__getattribute__": __getattribute__, "__reduce__": __reduce__,
                                            "__module__": base.__module__, "__qualname__": base.__qualname__})
        _GUARDED[key] = cls
    obj.__class__ = cls
    return obj


def section_object(node: DictConfig, prefix: str) -> Any:
    """A config section as its dataclass; in a declared view, the fields the stage does not declare
    raise UndeclaredKey when read (the others are plain values)."""
    masked = _masked_fields(node)
    if not masked:
        return OmegaConf.to_object(node)
    kind = OmegaConf.get_type(node)
    if not (isinstance(kind, type) and is_dataclass(kind)):
        raise UndeclaredKey(_undeclared_message(next(iter(masked.values())), prefix + next(iter(masked))))
    # the declared fields resolved where they are (their interpolations may point anywhere in the
    # config), over the dataclass's defaults for the masked ones, which the guard then hides
    values, sections = {}, {}
    for key in node.keys():
        if key in masked:
            continue
        value = node[key]
        if isinstance(value, DictConfig) and _is_section(value):
            sections[key] = section_object(value, f"{prefix}{key}.")  # guarded in turn
        elif isinstance(value, DictConfig) or OmegaConf.is_list(value):
            values[key] = OmegaConf.to_container(value, resolve=True)
        else:
            values[key] = value
    obj = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(kind), values))
    for key, value in sections.items():
        setattr(obj, key, value)
    return _guard(obj, masked, prefix)
