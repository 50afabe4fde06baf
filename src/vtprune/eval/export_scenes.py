"""Write the shipped scenes benchmark as a local lmms-eval task folder.

``python -m vtprune.eval.export_scenes --out DIR [--n 500] [--split test] [--start 0]`` writes

* ``DIR/test.parquet`` -- one row per question: ``id``, ``seed``, ``qtype``, ``question``,
  ``answer`` and the rendered ``image`` (PNG bytes, a Hugging Face ``Image`` feature);
* ``DIR/vtprune_scenes.yaml`` -- the task definition (a copy of ``vtprune/eval/lmms_tasks``'s);
* ``DIR/manifest.json`` -- what was exported (split, range, count, per-type counts, vtprune version).

Then ``python -m lmms_eval --model vtprune ... --tasks vtprune_scenes --include_path DIR``. The
questions are ``vtprune.demo.scenes.make_split(split, n, start)``: deterministic, so an export
and vtprune's own evaluation of the same range ask the same questions about the same pictures.
Needs the ``datasets`` package (part of the ``lmms`` extra).
"""
from __future__ import annotations

import argparse
import io
import json
import shutil
from collections import Counter
from pathlib import Path

from . import SCENES_TASK, TASKS_DIR

DATA_FILE = "test.parquet"


def _image_of(example):
    image = example.image
    return image() if callable(image) else image


def _copy_task_yaml(out: Path) -> None:
    source, target = TASKS_DIR / f"{SCENES_TASK}.yaml", out / f"{SCENES_TASK}.yaml"
    if not target.is_file() or target.read_bytes() != source.read_bytes():
        shutil.copyfile(source, target)


def export_scenes(out_dir, n: int = 500, split: str = "test", start: int = 0, overwrite: bool = False) -> Path:
    """Export questions ``start .. start+n-1`` of ``split`` to ``out_dir``; returns the folder.

    Reuses an existing export of exactly the same questions unless ``overwrite``."""
    import datasets

    from ..demo.scenes import make_split

    out = Path(out_dir)
    manifest_path = out / "manifest.json"
    wanted = {"task": SCENES_TASK, "split": split, "start": int(start), "n": int(n)}
    if not overwrite and manifest_path.is_file() and (out / DATA_FILE).is_file():
        old = json.loads(manifest_path.read_text())
        if all(old.get(k) == v for k, v in wanted.items()):
            _copy_task_yaml(out)
            return out
    out.mkdir(parents=True, exist_ok=True)
    rows = {"id": [], "seed": [], "qtype": [], "question": [], "answer": [], "image": []}
    for k, example in enumerate(make_split(split, n, start)):
        buf = io.BytesIO()
        _image_of(example).convert("RGB").save(buf, format="PNG")
        rows["id"].append(start + k)
        rows["seed"].append(int(example.seed))
        rows["qtype"].append(example.qtype)
        rows["question"].append(example.question)
        rows["answer"].append(example.answer)
        rows["image"].append({"bytes": buf.getvalue(), "path": None})
    features = datasets.Features({"id": datasets.Value("int64"), "seed": datasets.Value("int64"),
                                  "qtype": datasets.Value("string"), "question": datasets.Value("string"),
                                  "answer": datasets.Value("string"), "image": datasets.Image()})
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(out / DATA_FILE))
    _copy_task_yaml(out)
    from .. import __version__

    manifest = {**wanted, "rows": len(rows["id"]), "qtypes": dict(Counter(rows["qtype"])),
                "vtprune_version": __version__, "data": DATA_FILE}
    manifest_path.write_text(json.dumps(manifest, indent=2))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vtprune.eval.export_scenes",
                                     description="Write the scenes benchmark as a local lmms-eval task folder.")
    parser.add_argument("--out", required=True, help="folder to write (then: --include_path FOLDER)")
    parser.add_argument("--n", type=int, default=500, help="number of questions (default 500)")
    parser.add_argument("--split", default="test", choices=("train", "val", "test"))
    parser.add_argument("--start", type=int, default=0, help="first question index of the split")
    parser.add_argument("--overwrite", action="store_true", help="rewrite even an identical export")
    args = parser.parse_args(argv)
    out = export_scenes(args.out, args.n, args.split, args.start, args.overwrite)
    print(f"wrote {args.n} {args.split} questions to {out}; run lmms-eval with "
          f"--tasks {SCENES_TASK} --include_path {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
