"""Loading a params file: the layers, the key and type checks, and the way back to dicts.

A params file is resolved in layers, each beating the one before:

1. the defaults of :mod:`dcml.config_schema` (the CPU demo),
2. ``preset: <name>`` — ``dcml/presets/<name>.yaml``, the paper's setup per benchmark,
3. the params file itself (``params.yaml``),
4. its ``overrides:`` section (kept; ``dvc exp run -S ++overrides.train.epochs=50``).

Every key is optional. Unknown keys fail naming the dotted key and the layer, with the
closest valid key ("did you mean"); mistyped values fail naming the dotted key. Files
written by runs and checkpoints are already resolved: :func:`params_from_stored`.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from dcml.config_rules import validate
from dcml.config_schema import ConfigError, Params
from dcml.config_uri import redact_uri

PRESETS_DIR = Path(__file__).parent / "presets"
DEFAULT = "default"
OVERRIDES = "overrides"


def load_params(path: str | Path, *, resolve_preset: bool = True) -> Params:
    """Read a params file into validated :class:`Params`.

    With ``resolve_preset`` (a params file) the layers are applied: defaults < preset <
    the file < its ``overrides``. Without (files written by runs, already resolved) it is
    :func:`params_from_stored`.
    """
    raw = read_yaml(path)
    if resolve_preset:
        return params_from_dict(apply_preset(raw, source=str(path)))
    return params_from_stored(raw)


def load_with_sources(path: str | Path, *, check: bool = True) -> tuple[Params, dict[str, str]]:
    """:func:`load_params` of a params file, and for each dotted key the layer its value
    came from: ``default``, ``preset <name>``, the file's path or ``overrides``. Without
    ``check`` the cross-field rules are left to the caller (:func:`validate`); keys and
    types are always checked."""
    merged, sources = resolve(read_yaml(path), source=str(path))
    params = _build(Params, merged, prefix="")
    if check:
        validate(params)
    return params, sources


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        mark, problem = getattr(error, "problem_mark", None), getattr(error, "problem", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {problem or error}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return raw


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def apply_preset(raw: dict[str, Any], source: str = "params.yaml") -> dict[str, Any]:
    """The complete nested dict of a params file's ``raw`` content: defaults < preset <
    ``raw`` < ``raw['overrides']`` (for :func:`params_from_dict`)."""
    return resolve(raw, source)[0]


def resolve(raw: dict[str, Any], source: str = "params.yaml") -> tuple[dict[str, Any], dict[str, str]]:
    """``(complete nested dict, {dotted key: the layer that set it})`` of a params file's
    content; layers are named ``default``, ``preset <name>``, ``source`` and ``overrides``.

    Keys are checked per layer (an unknown one names its layer); types are checked when
    the result is built (:func:`params_from_dict`).
    """
    raw = dict(raw)
    overrides = raw.pop(OVERRIDES, None) or {}
    if not isinstance(overrides, dict):
        raise ConfigError(f"{OVERRIDES}: expected a mapping of params keys, got {overrides!r}")
    check_keys(raw, source)
    check_keys(overrides, OVERRIDES)
    name = overrides.get("preset", raw.get("preset", Params().preset))
    merged = _plain(Params())
    sources = dict.fromkeys(_leaves(merged), DEFAULT)
    for label, layer in ((f"preset {name}", read_preset(name)), (source, raw), (OVERRIDES, overrides)):
        merged = _deep_merge(merged, layer)
        _mark(layer, Params, "", label, sources)
    return merged, sources


def read_preset(name: Any) -> dict[str, Any]:
    """The keys of ``dcml/presets/<name>.yaml`` (``{}`` for ``none``), checked."""
    if name == Params().preset:
        return {}
    if name not in available_presets():
        raise ConfigError(f"preset: unknown preset {name!r}; available: {available_presets()}")
    path = PRESETS_DIR / f"{name}.yaml"
    preset = yaml.safe_load(path.read_text()) or {}
    if not isinstance(preset, dict) or "preset" in preset or OVERRIDES in preset:
        raise ConfigError(f"{path}: a preset is a mapping of params keys (no preset or overrides)")
    check_keys(preset, f"preset {name}")
    return preset


def check_keys(layer: Any, where: str, cls: type = Params, prefix: str = "") -> None:
    """Fail on the first key of ``layer`` that ``cls`` lacks, naming it, ``where`` it is and
    the closest valid key. Sections may be empty (``None``); values are not checked here."""
    if not isinstance(layer, dict):
        return  # not a mapping where a section belongs: params_from_dict names it
    names = {f.name for f in dataclasses.fields(cls)}
    allowed = names | ({OVERRIDES} if cls is Params and not prefix and where != OVERRIDES else set())
    for name in layer:
        dotted = _join(prefix, str(name))
        if name not in allowed:
            raise ConfigError(f"unknown key: {dotted} in {where}{_suggestion(dotted, str(name), allowed)}")
        sub = _section_type(cls, name) if name in names else None
        if sub is not None:
            check_keys(layer[name], where, sub, dotted)


def _suggestion(dotted: str, name: str, siblings: set[str]) -> str:
    """The "; did you mean <closest>?" hint: the closest sibling key, else the same name (nearly) in
    another section (``train.num_learners`` → ``cluster.num_learners``), else the valid keys."""
    prefix = dotted[: -len(name)]
    close = difflib.get_close_matches(name, sorted(siblings), n=1)
    if close:
        return f"; did you mean {prefix}{close[0]}?"
    depth = dotted.count(".")
    elsewhere = [key for key in all_keys() if key.count(".") == depth and not key.startswith(prefix)]
    close = difflib.get_close_matches(name, [key.rsplit(".", 1)[-1] for key in elsewhere], n=1, cutoff=0.8)
    if close:
        return f"; did you mean {next(key for key in elsewhere if key.rsplit('.', 1)[-1] == close[0])}?"
    return f"; valid keys here: {', '.join(sorted(siblings))}"


def all_keys(cls: type = Params, prefix: str = "") -> list[str]:
    """Every dotted key of the schema: sections and leaves."""
    keys = []
    for f in dataclasses.fields(cls):
        dotted = _join(prefix, f.name)
        keys.append(dotted)
        sub = _section_type(cls, f.name)
        if sub is not None:
            keys += all_keys(sub, dotted)
    return keys


def _section_type(cls: type, name: str) -> type | None:
    hint = typing.get_type_hints(cls)[name]
    return hint if dataclasses.is_dataclass(hint) else None


def _mark(layer: Any, cls: type, prefix: str, label: str, sources: dict[str, str]) -> None:
    if not isinstance(layer, dict):
        return
    names = {f.name for f in dataclasses.fields(cls)}
    for name, value in layer.items():
        if name not in names:
            continue  # overrides (of the params file)
        dotted = _join(prefix, name)
        sub = _section_type(cls, name)
        if sub is None:
            sources[dotted] = label
        else:
            _mark(value, sub, dotted, label, sources)


def _deep_merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """``overlay`` on ``base``; an empty section (``None``) over a mapping changes nothing."""
    merged = dict(base)
    for key, value in overlay.items():
        if isinstance(merged.get(key), dict) and (value is None or isinstance(value, dict)):
            merged[key] = _deep_merge(merged[key], value or {})
        else:
            merged[key] = value
    return merged


def _leaves(tree: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key, value in tree.items():
        dotted = _join(prefix, key)
        out += _leaves(value, dotted) if isinstance(value, dict) else [dotted]
    return out


def params_from_dict(raw: dict[str, Any]) -> Params:
    """Build and validate :class:`Params` from a complete nested dict (every key required:
    it is a resolved config, e.g. from :func:`apply_preset` or :func:`to_dict`)."""
    params = _build(Params, raw, prefix="")
    validate(params)
    return params


# What a stored run that lacks a key ran with: the defaults, except these keys, whose
# defaults were the paper's values until the defaults became the demo's (= params.yaml).
# A stored config lacking one of them reads as it always did.
STORED_FALLBACK: dict[str, Any] = {
    "data.image_size": 224,
    "data.resize_size": 256,
    "data.crop_scale_min": 0.08,
    "model.backbone": "resnet50",
    "model.pretrained": "imagenet",
    "model.embedding_dim": 128,
    "model.freeze_bn": True,
    "train.epochs": 200,
    "train.batch_size": 80,
    "train.lr_backbone": 1e-5,
    "train.lr_embedding": 1e-5,
    "train.lr_masks": 1e-5,
    "cluster.num_learners": 8,
    "cluster.divide_until_epoch": 190,
    "cluster.finetune_from_epoch": 190,
    "eval.every_epochs": 2,
    "eval.batch_size": 128,
}


def params_from_stored(raw: dict[str, Any]) -> Params:
    """Params a run or checkpoint stored (already resolved). Keys added to dcml after they
    were written take their defaults — the behaviour the run had (e.g. ``model.learners:
    slices``; :data:`STORED_FALLBACK`) — so older runs stay readable; unknown keys still fail."""
    defaults = _plain(Params())
    for dotted, value in STORED_FALLBACK.items():
        section, name = dotted.split(".")
        defaults[section][name] = value
    return params_from_dict(_with_defaults(raw, defaults))


def _with_defaults(raw: Any, defaults: dict[str, Any]) -> Any:
    if not isinstance(raw, dict):
        return raw
    out = dict(raw)
    for key, default in defaults.items():
        if key not in out:
            out[key] = default
        elif isinstance(default, dict):
            out[key] = _with_defaults(out[key], default)
    return out


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'params'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - fields, key=str)
    if unknown:
        dotted = _join(prefix, str(unknown[0]))
        raise ConfigError(f"unknown key: {dotted}{_suggestion(dotted, str(unknown[0]), fields)}")
    missing = sorted(fields - set(raw))
    if missing:
        raise ConfigError(f"missing key: {_join(prefix, missing[0])}")
    values = {name: _coerce(hints[name], raw[name], _join(prefix, name)) for name in fields}
    return cls(**values)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key)
    origin = typing.get_origin(hint)
    if origin is Literal:
        if not any(type(value) is type(option) and value == option for option in typing.get_args(hint)):
            raise ConfigError(f"{key}: {value!r} is not one of {list(typing.get_args(hint))}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_type, _) = typing.get_args(hint)
        return tuple(_coerce(item_type, v, f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            try:
                return _coerce(option, value, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} is not {' or '.join(_describe(o) for o in typing.get_args(hint))}")
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if not isinstance(value, hint):
        raise ConfigError(f"{key}: expected {hint.__name__}, got {value!r}")
    return value


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return " or ".join(repr(v) for v in typing.get_args(hint))
    return "an integer" if hint is int else getattr(hint, "__name__", str(hint))


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _plain(obj: Any) -> Any:
    """Dataclasses to nested dicts, tuples to lists (credentials kept)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [_plain(v) for v in obj]
    return obj


def to_dict(params: Params) -> dict[str, Any]:
    """Nested plain dict (tuples as lists), the inverse of :func:`params_from_dict` —
    except that credentials in ``tracking.mlflow_uri`` are redacted (:func:`redact_uri`):
    everything dcml writes or logs goes through here, and none of it may hold a password.
    The connection uses ``params.tracking.mlflow_uri`` itself."""
    out = _plain(params)
    out["tracking"]["mlflow_uri"] = redact_uri(out["tracking"]["mlflow_uri"])
    return out


def flatten(params: Params) -> dict[str, Any]:
    """Dotted keys to values, e.g. ``{"cluster.num_learners": 4, ...}``."""
    tree = to_dict(params)
    out: dict[str, Any] = {}
    for dotted in _leaves(tree):
        node: Any = tree
        for part in dotted.split("."):
            node = node[part]
        out[dotted] = node
    return out
