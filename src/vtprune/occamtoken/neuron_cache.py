"""Register neurons stored per tower under ``~/.cache/vtprune/registers/``
(``$VTPRUNE_CACHE/registers/`` when the environment variable ``VTPRUNE_CACHE`` is set), one file per
tower and calibration settings. :func:`latest_calibration` is the newest of a tower's, whatever its
settings (what OccamToken uses when given no neurons); :func:`load_or_calibrate` calibrates when
nothing is stored.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable

from torch import nn

from ..errors import InputError
from .neuron_search import calibrate_register_neurons
from .neurons import RegisterNeurons, as_neurons
from .towers import tower_identity

__all__ = ["default_cache_dir", "cache_path", "cached_calibrations", "latest_calibration", "load_or_calibrate"]


def default_cache_dir() -> Path:
    """``$VTPRUNE_CACHE/registers`` if ``VTPRUNE_CACHE`` is set, else ``~/.cache/vtprune/registers``."""
    root = os.environ.get("VTPRUNE_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "vtprune") / "registers"


_CALIB_DEFAULTS = dict(top_k=10, highest_layer=None, outlier_threshold=None, detection_layer=-1, sparsity=0.5)


def cache_path(tower_or_identity: nn.Module | str, cache_dir: str | os.PathLike | None = None,
               **calibrate_kwargs: Any) -> Path:
    """Where :func:`load_or_calibrate` keeps the neurons of this tower and these calibration settings:
    ``<cache_dir>/<identity>-<8-hex hash of the settings>.json``. [decision] the default
    ``highest_layer`` is hashed as its rule's name, so files from before that rule (which searched
    every block) are not taken for today's default by :func:`load_or_calibrate`."""
    ident = tower_or_identity if isinstance(tower_or_identity, str) else tower_identity(tower_or_identity)
    settings = {**_CALIB_DEFAULTS, **{k: v for k, v in calibrate_kwargs.items() if k in _CALIB_DEFAULTS}}
    if settings["highest_layer"] is None:  # the default rule; files from before it searched every block
        settings["highest_layer"] = "first_outlier_block"
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    return _cache_dir(cache_dir) / f"{_slug(ident)}-{key}.json"


def _cache_dir(cache_dir: str | os.PathLike | None) -> Path:
    return Path(cache_dir) if cache_dir is not None else default_cache_dir()


def _slug(ident: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", ident)


def cached_calibrations(tower_or_identity: nn.Module | str,
                        cache_dir: str | os.PathLike | None = None) -> list[tuple[Path, RegisterNeurons]]:
    """Every calibration of this tower in the cache, whatever its settings, newest first.

    Only files named ``<identity>-<settings hash>.json`` (:func:`cache_path`) whose content names the
    same tower are listed: a file of another tower (other weights, or renamed) is never returned;
    unreadable files are skipped. [decision] newest = latest file modification time (ties: file
    name): calibrating again is how a user says which neurons they want, and the JSON has no clock.
    """
    ident = tower_or_identity if isinstance(tower_or_identity, str) else tower_identity(tower_or_identity)
    name = re.compile(re.escape(_slug(ident)) + r"-[0-9a-f]{8}\.json")
    found = []
    for path in _cache_dir(cache_dir).glob("*.json"):
        if not name.fullmatch(path.name):
            continue
        try:
            rn = RegisterNeurons.from_json(path)
        except InputError:
            continue
        if rn.tower == ident:
            found.append((path.stat().st_mtime_ns, path.name, path, rn))
    found.sort(key=lambda x: (x[0], x[1]), reverse=True)
    return [(path, rn) for _, _, path, rn in found]


def latest_calibration(tower_or_identity: nn.Module | str,
                       cache_dir: str | os.PathLike | None = None) -> RegisterNeurons | None:
    """The newest cached calibration of this tower (any settings; see :func:`cached_calibrations`), or
    None. This is what OccamToken uses when no neurons are given: ``vtprune calibrate registers`` with
    any options, then ``vtprune.apply(model, "occamtoken")``, runs with exactly those neurons."""
    found = cached_calibrations(tower_or_identity, cache_dir)
    return found[0][1] if found else None


def load_or_calibrate(tower: nn.Module, images_fn: Callable[[], Iterable[Any]] | Iterable[Any] | None = None,
                      cache_dir: str | os.PathLike | None = None, *, neurons: Any = None, refresh: bool = False,
                      progress: bool = True, **calibrate_kwargs: Any) -> RegisterNeurons:
    """The register neurons of ``tower``: the user's own, else the cached ones, else calibrated now.

    neurons: the user's override (a :class:`RegisterNeurons`, a JSON path, (layer, neuron) pairs, or a
        ``{layer: [neurons]}`` dict) — returned as is (a warning if it names another tower).
    images_fn: a callable returning the calibration images (called only when calibration is needed),
        or the iterable itself. See :func:`calibrate_register_neurons` for the batch format.
    cache_dir: a directory (default :func:`default_cache_dir`); the file name is keyed by
        :func:`tower_identity` and the calibration settings, so changed weights or settings never pick
        up a stale result. ``refresh=True`` recalibrates and overwrites.
    """
    if neurons is not None:
        rn = as_neurons(neurons)
        if rn.tower:
            ident = tower_identity(tower)
            if rn.tower != ident:
                warnings.warn(f"The register neurons given were calibrated on {rn.tower!r}, this tower is "
                              f"{ident!r}; using them anyway.", stacklevel=2)
        return rn
    ident = tower_identity(tower)
    path = cache_path(ident, cache_dir, **calibrate_kwargs)
    if path.is_file() and not refresh:
        rn = RegisterNeurons.from_json(path)
        if rn.tower == ident:
            return rn
    if images_fn is None:
        raise InputError(
            f"No register neurons cached for this tower ({ident}) at {path}. Calibrate them with the "
            "register calibration of the vtprune CLI (--model PATH --images DIR), pass images_fn=..., or "
            "pass your own neurons=...")
    images = images_fn() if callable(images_fn) else images_fn
    rn = calibrate_register_neurons(tower, images, progress=progress, **calibrate_kwargs)
    rn.to_json(path)
    return rn
