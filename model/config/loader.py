"""Strict conversion of nested dicts (YAML files, presets, ``--set`` items) into frozen dataclasses.

The loader knows nothing about the concrete schema: it walks ``dataclasses.fields`` and the
resolved type hints of whatever dataclass it is given. Every user mistake is collected (not just
the first) and reported as one :class:`ConfigError` whose lines name the file that set the key,
the full dotted key and what was expected. Layers are merged with :func:`merge_layers`, which
records the origin of every leaf so that errors point at the override that caused them.

YAML is read with a ``SafeLoader`` subclass that (a) reads ``1e-3`` as a float (PyYAML 1.1 rules
need a dot and a signed exponent), (b) keeps ``2024-01-01`` a string and (c) rejects duplicate
keys, which PyYAML would otherwise resolve silently by keeping the last one.
"""

from __future__ import annotations

import collections.abc
import copy
import dataclasses
import difflib
import functools
import hashlib
import json
import os
import re
import types
import typing
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from pathlib import PurePath
from typing import Any, Literal, TypeVar, Union

import yaml

from model.atomic import write_text_atomic

__all__ = [
    "ConfigError", "FieldError", "config_hash", "dump_yaml", "from_dict", "known_keys",
    "load_yaml_file", "merge_layers", "parse_dotlist", "replace_path", "to_dict", "unflatten",
]

_FLOAT_TAG = "tag:yaml.org,2002:float"
_TIMESTAMP_TAG = "tag:yaml.org,2002:timestamp"
# Scientific notation without a dot or without an exponent sign ("1e-3", "5e4", "1.0e3").
_SCI_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")
_SCI_FIRST = list("-+0123456789.")
_LEADING_KEY = re.compile(r"[A-Za-z_][\w.]*")
_T = TypeVar("_T")


class ConfigError(ValueError):
    """One or more user errors in a configuration; ``str()`` lists them one per line."""

    def __init__(self, errors: Iterable[str] | str) -> None:
        items = [errors] if isinstance(errors, str) else list(errors)
        self.errors: list[str] = sorted(dict.fromkeys(items))
        super().__init__(self.errors)  # args stay picklable (cls(*args) rebuilds the error)

    def __str__(self) -> str:
        return "\n".join(self.errors)


class FieldError(ValueError):
    """Raised by a dataclass ``__post_init__`` to blame one field (a name or a relative dotted key).

    ``FieldError("alpha", "must be in [0, 1], got 1.4")`` inside section ``loss`` is reported as
    ``"<file>: loss.alpha must be in [0, 1], got 1.4"``. If ``message`` already starts with the
    field name (``FieldError("softmask", "softmask.layer must be < 6")``) it is not repeated.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(field, message)
        self.field = field
        self.message = message

    def __str__(self) -> str:
        return f"{self.field} {self.message}"


class _Loader(yaml.SafeLoader):
    """Safe loader with scientific-notation floats, string dates and duplicate-key errors."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        """Build a mapping, refusing a key that occurs twice in it."""
        self.flatten_mapping(node)  # resolve "<<" merge keys first, as the base class does
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            if isinstance(key, Hashable):
                seen.add(key)
        return super().construct_mapping(node, deep)


class _Dumper(yaml.SafeDumper):
    """Dumper whose resolvers match ``_Loader``, so strings like ``'1e-3'`` get quoted."""


_BOOL_TAG = "tag:yaml.org,2002:bool"
# YAML 1.2 booleans only: YAML 1.1 also reads on/off/yes/no as booleans, so `mode: off` would
# silently become False instead of the string the schema expects.
_BOOL = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")

for _cls in (_Loader, _Dumper):
    _cls.yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag not in (_TIMESTAMP_TAG, _BOOL_TAG)]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    _cls.add_implicit_resolver(_FLOAT_TAG, _SCI_FLOAT, _SCI_FIRST)
    _cls.add_implicit_resolver(_BOOL_TAG, _BOOL, list("tTfF"))


def load_yaml_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read one YAML config file; an empty file is ``{}``, anything but a mapping is an error."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.load(fh, Loader=_Loader)  # _Loader is a SafeLoader subclass
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc.strerror})") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}:" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}:{where} invalid YAML ({problem})") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of config keys, "
                          f"got {_describe(data)}")
    return data


def parse_dotlist(items: Sequence[str], source: str = "--set") -> dict[str, Any]:
    """Turn ``["a.b=1", "c=[1, 2]"]`` into ``{"a": {"b": 1}, "c": [1, 2]}``; later items win.

    Values are YAML scalars or flow collections (``x=1e-3`` is 0.001, ``x=null`` is None, an
    empty value is None as in a YAML file).
    """
    flat: list[tuple[str, Any]] = []
    errors: list[str] = []
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            errors.append(f"{source}: malformed item {item!r} (expected 'dotted.key=value')")
            continue
        try:
            flat.append((key.strip(), yaml.load(raw, Loader=_Loader)))
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or str(exc)
            errors.append(f"{source}: cannot parse the value of {item!r} as YAML ({problem})")
    try:
        nested = unflatten(flat, source)
    except ConfigError as exc:  # report bad keys together with bad items
        errors.extend(exc.errors)
    if errors:
        raise ConfigError(errors)
    return nested


def unflatten(flat: Mapping[str, Any] | Iterable[tuple[str, Any]], source: str) -> dict[str, Any]:
    """Expand dotted keys (``{"train.epochs": 30}``) into nested dicts; later pairs win."""
    pairs = flat.items() if isinstance(flat, Mapping) else flat
    merged: dict[str, Any] = {}
    origins: dict[str, str] = {}
    errors: list[str] = []
    for key, value in pairs:
        parts = str(key).split(".")
        if not all(part.strip() for part in parts):
            errors.append(f"{source}: malformed key {key!r} (empty part in dotted key)")
            continue
        nested: Any = value
        for part in reversed(parts):
            nested = {part.strip(): nested}
        _merge_into(merged, nested, source, "", origins, errors)
    if errors:
        raise ConfigError(errors)
    return merged


def merge_layers(layers: Sequence[tuple[str, Mapping[str, Any]]]
                 ) -> tuple[dict[str, Any], dict[str, str]]:
    """Deep-merge ``(source, mapping)`` layers in order and record each leaf's source.

    Mappings merge recursively; scalars and lists replace. ``None`` may replace a section and a
    section may replace ``None``; any other section/value clash is an error naming both sources.
    """
    merged: dict[str, Any] = {}
    origins: dict[str, str] = {}
    errors: list[str] = []
    for source, mapping in layers:
        if not isinstance(mapping, Mapping):
            errors.append(f"{source}: top level must be a mapping, got {_describe(mapping)}")
            continue
        _merge_into(merged, mapping, source, "", origins, errors)
    if errors:
        raise ConfigError(errors)
    return merged, origins


def _merge_into(dst: dict[str, Any], src: Mapping[str, Any], source: str, prefix: str,
                origins: dict[str, str], errors: list[str]) -> None:
    """Merge ``src`` into ``dst`` in place (the recursive step of :func:`merge_layers`)."""
    for key, new in src.items():
        path = _join(prefix, str(key))
        old = dst.get(key)
        if isinstance(new, Mapping):
            if old is not None and not isinstance(old, dict):
                errors.append(f"{source}: '{path}' is a section here but a value ({old!r}) "
                              f"in {_lookup_origin(origins, path, '?')}")
                continue
            if old is None:
                _forget(origins, path)
                dst[key] = {}
            _merge_into(dst[key], new, source, path, origins, errors)
        elif isinstance(old, dict) and new is not None:
            errors.append(f"{source}: '{path}' is a value here ({new!r}) but a section "
                          f"in {_lookup_origin(origins, path, '?')}")
        else:
            _forget(origins, path)
            dst[key] = copy.deepcopy(new)  # later layers must not alias the caller's lists
            origins[path] = source  # re-inserted last, so dict order follows the layer order


def _forget(origins: dict[str, str], path: str) -> None:
    """Drop the origin of ``path`` and of everything below it (it is being replaced)."""
    for key in [k for k in origins if k == path or k.startswith(path + ".")]:
        del origins[key]


def _lookup_origin(origins: Mapping[str, str], path: str, default: str) -> str:
    """Source of ``path``: its own entry, an ancestor's, or the sources of the keys below it."""
    key = path.split("[", 1)[0]
    parts = key.split(".") if key else []
    for i in range(len(parts), 0, -1):
        candidate = ".".join(parts[:i])
        if candidate in origins:
            return origins[candidate]
    below = f"{key}." if key else ""
    sources = dict.fromkeys(src for k, src in origins.items() if k.startswith(below))
    return ", ".join(sources) or default


_INVALID: Any = object()  # sentinel: conversion failed and the error was already recorded


@dataclasses.dataclass
class _Context:
    """Error sink of one conversion; knows where every key came from."""

    origins: Mapping[str, str]
    default_origin: str
    errors: list[str] = dataclasses.field(default_factory=list)

    def origin(self, path: str) -> str:
        """Source to blame for ``path``."""
        return _lookup_origin(self.origins, path, self.default_origin)

    def error(self, path: str, message: str, origin: str | None = None) -> Any:
        """Record one error; returns the sentinel so callers can ``return ctx.error(...)``."""
        self.errors.append(f"{origin or self.origin(path)}: {message}")
        return _INVALID


def from_dict(cls: type[_T], data: Mapping[str, Any], origins: Mapping[str, str] | None = None,
              default_origin: str = "<defaults>") -> _T:
    """Build dataclass ``cls`` from ``data`` strictly; all problems raise one ConfigError.

    ``origins`` maps dotted keys to the source that set them (from :func:`merge_layers`); keys
    absent from it are blamed on ``default_origin``.
    """
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"from_dict needs a dataclass type, got {cls!r}")
    ctx = _Context(origins or {}, default_origin)
    obj = _convert(cls, data, "", ctx)
    if ctx.errors:
        raise ConfigError(ctx.errors)
    return obj


def _convert(tp: Any, value: Any, path: str, ctx: _Context) -> Any:
    """Check/convert ``value`` against annotation ``tp``; returns _INVALID after an error."""
    tp = {tuple: tuple[Any, ...], list: list[Any], dict: dict[str, Any]}.get(tp, tp)
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        return _convert_union(tp, value, path, ctx)
    if origin is Literal:
        return _convert_literal(tp, value, path, ctx)
    if dataclasses.is_dataclass(tp):
        return _convert_section(tp, value, path, ctx)
    if origin in (tuple, list, collections.abc.Sequence):
        return _convert_sequence(tp, value, path, ctx)
    if origin in (dict, collections.abc.Mapping):
        return _convert_mapping(tp, value, path, ctx)
    if origin is None and isinstance(tp, type):
        return _convert_scalar(tp, value, path, ctx)
    raise TypeError(f"unsupported annotation {tp!r} for config key '{path}'")


def _convert_scalar(tp: type, value: Any, path: str, ctx: _Context) -> Any:
    """bool is strict (no 0/1, no "false"); int widens to float; bool is never a number."""
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is float and is_number:
        return float(value)
    if tp is int and is_number and isinstance(value, int):
        return value
    if issubclass(tp, PurePath) and isinstance(value, (str, PurePath)):
        return tp(value)
    if tp not in (int, float) and isinstance(value, tp):
        return value
    return ctx.error(path, f"{_label(path)}: expected {_type_name(tp)}, got {_describe(value)}")


def _convert_union(tp: Any, value: Any, path: str, ctx: _Context) -> Any:
    """``X | None`` converts as X unless None; wider unions take the first arm that fits."""
    args = typing.get_args(tp)
    arms = [a for a in args if a is not type(None)]
    if value is None:
        if len(arms) < len(args):
            return None
        return ctx.error(path, f"{_label(path)}: expected {_type_name(tp)}, got None")
    if len(arms) == 1:  # report the inner errors (e.g. of an Optional section) in full
        return _convert(arms[0], value, path, ctx)
    for arm in arms:
        scratch = _Context(ctx.origins, ctx.default_origin)
        result = _convert(arm, value, path, scratch)
        if not scratch.errors:
            return result
    return ctx.error(path, f"{_label(path)}: expected {_type_name(tp)}, got {_describe(value)}")


def _convert_literal(tp: Any, value: Any, path: str, ctx: _Context) -> Any:
    """Exact match including type, so ``True`` does not pass for ``Literal[1]``."""
    allowed = typing.get_args(tp)
    if any(value == a and type(value) is type(a) for a in allowed):
        return value
    hint = ""
    if isinstance(value, str):
        close = difflib.get_close_matches(value, [a for a in allowed if isinstance(a, str)], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ctx.error(path, f"{_label(path)}: must be one of {list(allowed)!r}, "
                           f"got {_describe(value)}{hint}")


def _convert_sequence(tp: Any, value: Any, path: str, ctx: _Context) -> Any:
    """YAML lists become tuples (immutable, hashable) or lists as annotated."""
    if not isinstance(value, (list, tuple)):
        return ctx.error(path, f"{_label(path)}: expected a list ({_type_name(tp)}), "
                               f"got {_describe(value)}")
    args = typing.get_args(tp) or (Any, ...)
    fixed = typing.get_origin(tp) is tuple and not (len(args) == 2 and args[1] is Ellipsis)
    if fixed and len(value) != len(args):
        return ctx.error(path, f"{_label(path)}: expected {len(args)} items ({_type_name(tp)}), "
                               f"got {len(value)}")
    item_types = args if fixed else [args[0]] * len(value)
    items = [_convert(t, v, f"{path}[{i}]", ctx)
             for i, (t, v) in enumerate(zip(item_types, value, strict=True))]
    if any(item is _INVALID for item in items):
        return _INVALID
    return items if typing.get_origin(tp) is list else tuple(items)


def _convert_mapping(tp: Any, value: Any, path: str, ctx: _Context) -> Any:
    """``dict[K, V]`` fields: keys and values are both checked."""
    if not isinstance(value, Mapping):
        return ctx.error(path, f"{_label(path)}: expected a mapping ({_type_name(tp)}), "
                               f"got {_describe(value)}")
    key_type, value_type = typing.get_args(tp) or (Any, Any)
    result: dict[Any, Any] = {}
    for key, item in value.items():
        sub = f"{path}.{key}"
        new_key = _convert(key_type, key, sub, ctx)
        new_item = _convert(value_type, item, sub, ctx)
        result[new_key] = new_item
    invalid = any(k is _INVALID or v is _INVALID for k, v in result.items())
    return _INVALID if invalid else result


def _convert_section(cls: type[Any], value: Any, path: str, ctx: _Context) -> Any:
    """A nested dataclass: a mapping of its fields (or an instance, passed through)."""
    if isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        where = f"section '{path}'" if path else "the top level"
        return ctx.error(path, f"{where}: expected a mapping of {cls.__name__} keys, "
                               f"got {_describe(value)}")
    fields = _init_fields(cls)
    hints = _hints(cls)
    for key in value:
        if key not in fields:
            ctx.error(_join(path, str(key)), _unknown_key(path, str(key), fields))
    kwargs: dict[str, Any] = {}
    for name, fld in fields.items():
        sub = _join(path, name)
        if name in value:
            kwargs[name] = _convert(hints[name], value[name], sub, ctx)
        elif _section_type(hints[name]) is not None and not _has_default(fld):
            kwargs[name] = _convert_section(_section_type(hints[name]), {}, sub, ctx)
        elif not _has_default(fld):
            kwargs[name] = ctx.error(sub, f"missing required key '{sub}'")
    if any(v is _INVALID for v in kwargs.values()):
        return _INVALID
    return _construct(lambda: cls(**kwargs), path, ctx)


def _construct(make: Callable[[], Any], path: str, ctx: _Context) -> Any:
    """Run a constructor, turning ``__post_init__`` FieldError/ValueError into config errors."""
    try:
        return make()
    except FieldError as exc:
        field_path = _join(path, exc.field)
        leading = _LEADING_KEY.match(exc.message)
        if leading and (leading.group() + ".").startswith(exc.field + "."):
            # the message names its own key; blame that key's file if it was set explicitly
            key = _join(path, leading.group().rstrip("."))
            origin = ctx.origins.get(key) or ctx.origin(field_path)
            return ctx.error(field_path, _join(path, exc.message), origin)
        return ctx.error(field_path, f"{field_path} {exc.message}")
    except ValueError as exc:
        return ctx.error(path, f"{path}: {exc}" if path else str(exc))


def _unknown_key(prefix: str, key: str, fields: Mapping[str, Any]) -> str:
    """Message for a key that is not a field, with a close match or the list of valid keys."""
    close = difflib.get_close_matches(key, list(fields), n=1)
    if close:
        return (f"unknown key '{_join(prefix, key)}' "
                f"(did you mean '{_join(prefix, close[0])}'?)")
    where = f"under '{prefix}'" if prefix else "at the top level"
    return f"unknown key '{_join(prefix, key)}' (valid keys {where}: {', '.join(fields)})"


@functools.cache
def _hints(cls: type[Any]) -> dict[str, Any]:
    """Resolved annotations (the schema uses ``from __future__ import annotations``)."""
    return typing.get_type_hints(cls)


def _init_fields(cls: type[Any]) -> dict[str, dataclasses.Field[Any]]:
    """Fields settable from config; ``init=False`` fields are derived and never read."""
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def _has_default(fld: dataclasses.Field[Any]) -> bool:
    """Whether the dataclass can fill ``fld`` itself when the config leaves it out."""
    return (fld.default is not dataclasses.MISSING
            or fld.default_factory is not dataclasses.MISSING)


def _section_type(tp: Any) -> type[Any] | None:
    """The dataclass behind ``tp`` (plain or Optional), else None."""
    arms = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (Union, types.UnionType) and len(arms) == 1:
        tp = arms[0]
    return tp if isinstance(tp, type) and dataclasses.is_dataclass(tp) else None


def _join(prefix: str, key: str) -> str:
    """Dotted key of ``key`` inside section ``prefix`` (the root has an empty prefix)."""
    return f"{prefix}.{key}" if prefix else key


def _label(path: str) -> str:
    """Printable name of a key; the root has no dotted name of its own."""
    return path or "<top level>"


def _type_name(tp: Any) -> str:
    """Annotation as a user reads it in the schema: ``float | None``, ``tuple[str, ...]``."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if isinstance(tp, type) and not typing.get_args(tp):
        return "None" if tp is type(None) else tp.__name__
    return str(tp).replace("typing.", "")


def _describe(value: Any) -> str:
    """``"str 'abc'"``; long reprs are cut so one bad list does not flood the report."""
    if value is None:
        return "None"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def to_dict(obj: Any) -> Any:
    """Dataclass tree → plain JSON/YAML-serialisable data (tuples → lists, paths → str)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {name: to_dict(getattr(obj, name)) for name in _init_fields(type(obj))}
    if isinstance(obj, (list, tuple)):
        return [to_dict(item) for item in obj]
    if isinstance(obj, Mapping):
        return {str(key): to_dict(item) for key, item in obj.items()}
    if isinstance(obj, PurePath):
        return str(obj)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot serialise config value of type {type(obj).__name__}: {obj!r}")


def config_hash(obj: Any, exclude: Iterable[str] = (),
                retired: Mapping[str, Any] | None = None) -> str:
    """10 hex chars identifying the semantic content of ``obj`` minus the ``exclude`` keys,
    plus the ``retired`` keys (dotted, section.key) at the value they always had."""
    data = to_dict(obj)
    for dotted, value in (retired or {}).items():
        section, leaf = dotted.split(".")
        data[section][leaf] = value
    for dotted in exclude:
        *parents, leaf = dotted.split(".")
        node = data
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or leaf not in node:
            raise KeyError(f"config_hash: excluded key '{dotted}' is not in the config")
        del node[leaf]
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:10]


def dump_yaml(obj: Any, path: str | os.PathLike[str]) -> None:
    """Write ``to_dict(obj)`` as block YAML; atomic, so readers never see half a file."""
    text = yaml.dump(to_dict(obj), Dumper=_Dumper, sort_keys=False, default_flow_style=False,
                     allow_unicode=True, width=100)
    write_text_atomic(path, text)


def replace_path(obj: _T, dotted: str, value: Any, source: str = "replace_path") -> _T:
    """New tree with one leaf replaced; every section on the path is rebuilt and re-validated.

    A mapping given for a whole section builds it afresh (unset keys take their defaults).
    """
    ctx = _Context({}, source)
    result = _replace_in(obj, dotted.split("."), value, "", ctx)
    if ctx.errors:
        raise ConfigError(ctx.errors)
    return result


def _replace_in(node: Any, parts: list[str], value: Any, prefix: str, ctx: _Context) -> Any:
    """Recursive step of :func:`replace_path`; rebuilds every section on the way back up."""
    name, path = parts[0], _join(prefix, parts[0])
    if not dataclasses.is_dataclass(node) or isinstance(node, type):
        return ctx.error(path, f"'{prefix}' is a value ({_describe(node)}), not a section; "
                               f"cannot set '{_join(prefix, '.'.join(parts))}'")
    fields = _init_fields(type(node))
    if name not in fields:
        return ctx.error(path, _unknown_key(prefix, name, fields))
    if len(parts) == 1:
        new = _convert(_hints(type(node))[name], value, path, ctx)
    else:
        new = _replace_in(getattr(node, name), parts[1:], value, path, ctx)
    if new is _INVALID:
        return _INVALID
    return _construct(lambda: dataclasses.replace(node, **{name: new}), prefix, ctx)


def known_keys(cls: type[Any]) -> list[str]:
    """Every dotted leaf key of dataclass ``cls``, in field order (for help and suggestions)."""
    return _keys_below(cls, "")


def _keys_below(cls: type[Any], prefix: str) -> list[str]:
    """Recursive step of :func:`known_keys`; Optional sections are expanded too."""
    keys: list[str] = []
    hints = _hints(cls)
    for name in _init_fields(cls):
        sub = _section_type(hints[name])
        path = _join(prefix, name)
        keys.extend(_keys_below(sub, path) if sub is not None else [path])
    return keys
