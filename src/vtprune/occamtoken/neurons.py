"""The register neurons of a vision tower: the result of a calibration, JSON round-trippable.

A :class:`RegisterNeurons` is keyed to the tower's weights through
:func:`vtprune.occamtoken.towers.tower_identity`; :mod:`.neuron_search` finds them, :mod:`.neuron_cache`
stores them per tower, :mod:`.intervention` uses them.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..errors import InputError

__all__ = ["RegisterNeurons", "as_neurons"]

FORMAT_VERSION = 1


@dataclass
class RegisterNeurons:
    """The register neurons of one vision tower.

    neurons:         (layer, neuron) pairs, best first; layer = block index (0-based), neuron =
                     channel of that block's MLP activation (width = intermediate size).
    threshold:       the output-norm threshold that marked outlier tokens (None: none could be chosen).
    detection_layer: the block (0-based, resolved) whose output norms marked the outliers.
    tower:           :func:`tower_identity` of the tower it was calibrated on ("" = unknown).
    scores:          mean |activation| at outlier positions of each listed neuron, same order.
    message:         why the list is empty, or other notes (empty when all went well).
    settings:        the calibration settings (top_k, highest_layer, sparsity, threshold rule, ...).
    stats:           counts: images seen, images with outliers, outlier tokens per image, ...
    """

    neurons: list[tuple[int, int]] = field(default_factory=list)
    threshold: float | None = None
    detection_layer: int = -1
    tower: str = ""
    scores: list[float] = field(default_factory=list)
    message: str = ""
    settings: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.neurons = [(int(layer), int(n)) for layer, n in self.neurons]
        self.scores = [float(s) for s in self.scores]

    @property
    def found(self) -> bool:
        """True when at least one neuron is listed (an empty list still appends the register)."""
        return bool(self.neurons)

    def by_layer(self) -> dict[int, list[int]]:
        """``{layer: [neurons]}`` in ascending layer order, neurons in listed order, no duplicates."""
        out: dict[int, list[int]] = {}
        for layer, n in self.neurons:
            lst = out.setdefault(layer, [])
            if n not in lst:
                lst.append(n)
        return dict(sorted(out.items()))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["neurons"] = [list(p) for p in self.neurons]
        d["format"] = FORMAT_VERSION
        d["kind"] = "vtprune.register_neurons"
        return d

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        """The JSON text; also written to ``path`` when given (atomically)."""
        text = json.dumps(self.to_dict(), indent=2, sort_keys=False, allow_nan=False)
        if path is not None:
            _atomic_write(Path(path), text)
        return text

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RegisterNeurons":
        fmt = d.get("format", FORMAT_VERSION)
        if fmt > FORMAT_VERSION:
            raise InputError(f"Register-neuron file format {fmt} is newer than this vtprune ({FORMAT_VERSION}); "
                             "upgrade vtprune or recalibrate.")
        if "neurons" not in d:
            raise InputError("Not a register-neuron file: it has no 'neurons' entry.")
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_json(cls, source: str | os.PathLike) -> "RegisterNeurons":
        """From JSON text, or from the path of a JSON file."""
        if isinstance(source, os.PathLike) or (isinstance(source, str) and not source.lstrip().startswith("{")):
            path = Path(source)
            if not path.is_file():
                raise InputError(f"Register-neuron file {str(path)!r} does not exist.")
            source = path.read_text()
        try:
            d = json.loads(source)
        except json.JSONDecodeError as e:
            raise InputError(f"Register-neuron JSON could not be parsed: {e}") from None
        return cls.from_dict(d)


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def as_neurons(neurons: Any) -> RegisterNeurons:
    """RegisterNeurons from a RegisterNeurons, a list of (layer, neuron) pairs, a {layer: [n]} dict,
    a JSON path, or None (= no neurons: the register is appended and nothing is redirected)."""
    if neurons is None:
        return RegisterNeurons([], message="no neurons given")
    if isinstance(neurons, RegisterNeurons):
        return neurons
    if isinstance(neurons, (str, os.PathLike)):
        return RegisterNeurons.from_json(neurons)
    if isinstance(neurons, Mapping):
        return RegisterNeurons([(int(layer), int(n)) for layer, ns in neurons.items() for n in ns])
    return RegisterNeurons([(int(p[0]), int(p[1])) for p in neurons])
