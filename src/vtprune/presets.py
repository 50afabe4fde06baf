"""Shipped model configs (no weights) for the models the papers report on.

Each ``presets/<name>.json`` holds the model's full Hugging Face ``config.json`` (``model_type``
included), written from the public config of the checkpoint named in its ``_source`` key. Keys that
start with ``_`` (``_source``, ``_note``) are documentation and are dropped before the config is built.

These configs are enough for shape arithmetic (FLOPs, KV cache) and for random-weight timing models;
accuracy needs the real checkpoint.
"""
from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

from .errors import VTPruneError

PRESET_DIR = Path(__file__).resolve().parent / "presets"


class UnknownPresetError(VTPruneError, KeyError):
    """No preset under that name and no local config at that path."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0]) if self.args else ""


def list_presets() -> list[str]:
    """Names of the shipped presets, sorted (e.g. ``"llava-1.5-7b"``)."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def _sources() -> dict[str, str]:
    """Map Hub repo id (lower-case) -> preset name, so ``llava-hf/llava-1.5-7b-hf`` works too."""
    out = {}
    for name in list_presets():
        src = preset_dict(name).get("_source")
        if src:
            out[src.lower()] = name
    return out


def preset_dict(name: str) -> dict[str, Any]:
    """The raw JSON dict of a preset (``_``-prefixed documentation keys included)."""
    path = PRESET_DIR / f"{name}.json"
    if not path.is_file():
        raise _unknown(name)
    return json.loads(path.read_text())


def _unknown(name: str) -> UnknownPresetError:
    names = list_presets()
    close = difflib.get_close_matches(name.lower(), names, n=3, cutoff=0.4)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return UnknownPresetError(
        f"unknown preset {name!r}.{hint} Available presets: {', '.join(names)}. "
        "You can also pass a local directory holding config.json, or a config .json file."
    )


def config_from_dict(d: dict[str, Any]):
    """Build the right ``PretrainedConfig`` subclass from a config dict (``model_type`` required)."""
    from transformers import AutoConfig

    clean = {k: v for k, v in d.items() if not k.startswith("_")}
    model_type = clean.pop("model_type", None)
    if model_type is None:
        raise ValueError("config dict has no 'model_type'; cannot tell which config class to build")
    return AutoConfig.for_model(model_type, **clean)


def _resolve_name(name: str) -> str:
    key = name.strip()
    if key in list_presets():
        return key
    by_source = _sources()
    if key.lower() in by_source:
        return by_source[key.lower()]
    lowered = key.lower()
    if lowered in list_presets():
        return lowered
    raise _unknown(key)


def load_preset_config(name: str):
    """The ``PretrainedConfig`` of a shipped preset, by preset name or by its Hub repo id.

    Raises :class:`UnknownPresetError` listing the available names (closest first) on a typo.
    """
    return config_from_dict(preset_dict(_resolve_name(name)))


def load_config(name_or_path: str | Path):
    """A config from a preset name, a Hub repo id of a preset, a local directory with ``config.json``,
    or a local ``.json`` file. Never touches the network.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        cfg = path / "config.json"
        if not cfg.is_file():
            raise UnknownPresetError(f"directory {str(path)!r} has no config.json")
        return config_from_dict(json.loads(cfg.read_text()))
    if path.is_file() and path.suffix == ".json":
        return config_from_dict(json.loads(path.read_text()))
    return load_preset_config(str(name_or_path))


__all__ = [
    "PRESET_DIR",
    "UnknownPresetError",
    "config_from_dict",
    "list_presets",
    "load_config",
    "load_preset_config",
    "preset_dict",
]
