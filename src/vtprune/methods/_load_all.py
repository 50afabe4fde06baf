"""Imports every method module so that each registers itself. Add new method files here."""
import importlib
import pkgutil

from . import __path__ as _path

for _info in pkgutil.iter_modules(_path):
    if not _info.name.startswith("_") and _info.name != "base":
        importlib.import_module(f"{__package__}.{_info.name}")
