"""`vtprune calibrate budget` on (image, question) pairs: the fit follows the task's questions."""
import json
import statistics

import pytest
import torch

import vtprune
from vtprune.occamtoken.budget import FIXED_PROMPT, Pair, calibrate_pairs, format_table, read_pairs
from vtprune.occamtoken.cli import parse_targets
from vtprune.cli import main
from vtprune.demo import MODEL_DIR, load_demo_model
from vtprune.demo.scenes import make_split
from vtprune.errors import ArgumentError, InputError

SAMPLES = 4
TARGET = 64.0
#: the OccamToken settings shipped with the demo model, which the CLI fits λ2 with
SETTINGS = {k: v for k, v in json.loads((MODEL_DIR / "vtprune_occamtoken.json").read_text()).items()
            if k in ("lambda1", "layer")}


@pytest.fixture(scope="module")
def demo():
    return load_demo_model()


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    """A JSONL of validation scenes, each with its own question, images as PNG in a sub-folder."""
    folder = tmp_path_factory.mktemp("pairs")
    (folder / "images").mkdir()
    lines = []
    for i, item in enumerate(make_split("val", SAMPLES)):
        item.image().save(folder / "images" / f"scene{i}.png")
        lines.append(json.dumps({"image": f"images/scene{i}.png", "question": item.question}))
    path = folder / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def fits(demo, pairs_file):
    """λ2 for TARGET fitted on the pairs' own questions and on the same images with the fixed prompt."""
    model, processor = demo
    pairs = read_pairs(pairs_file)
    fixed = [Pair(p.image, FIXED_PROMPT) for p in pairs]
    real = calibrate_pairs(model, processor, pairs, [TARGET], **SETTINGS)[0]
    prompt = calibrate_pairs(model, processor, fixed, [TARGET], **SETTINGS)[0]
    return real, prompt


def kept_counts(model, processor, pairs, lambda2):
    """Visual tokens per pair after stage II (register included), measured by running the pruned model."""
    from vtprune.occamtoken.budget import _processed, load_image

    counts = []
    with vtprune.pruned(model, "occamtoken", lambda2=lambda2, **SETTINGS) as handle, torch.no_grad():
        for pair in pairs:
            model(**_processed(processor, load_image(pair.image), pair.question))
            stages, image = handle.last.llm_stages[0], handle.last.images[0]
            counts.append(max(stages.items())[1] + image.registers)
    return counts


def test_read_pairs_resolves_images_against_the_file(pairs_file):
    pairs = read_pairs(pairs_file)
    assert [p.question for p in pairs] == [item.question for item in make_split("val", SAMPLES)]
    assert all(p.image == pairs_file.parent / "images" / f"scene{i}.png" for i, p in enumerate(pairs))


def test_lambda2_from_pairs_follows_their_questions(demo, pairs_file, fits):
    """The λ2 fitted on the task's questions differs from the fixed prompt's, and only it keeps the target
    on those questions when the pruned model runs (its min/max/std are those of the measured counts)."""
    model, processor = demo
    real, prompt = fits
    assert real.samples == prompt.samples == SAMPLES
    assert abs(real.lam - prompt.lam) > 0.2 * prompt.lam

    pairs = read_pairs(pairs_file)
    measured = kept_counts(model, processor, pairs, real.lam)
    assert sum(measured) / SAMPLES == pytest.approx(real.mean_kept)
    assert abs(real.mean_kept - TARGET) <= 1.0
    assert (real.min_kept, real.max_kept) == (min(measured), max(measured))
    assert real.std_kept == pytest.approx(statistics.pstdev(measured))

    with_prompt_lambda = kept_counts(model, processor, pairs, prompt.lam)
    assert abs(sum(with_prompt_lambda) / SAMPLES - TARGET) > 8.0


def test_cli_calibrates_on_a_jsonl(pairs_file, fits, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # image paths resolve against the JSONL's folder, not the working one
    out = tmp_path / "fit.json"
    rc = main(["calibrate", "budget", "--model", str(MODEL_DIR), "--pairs", str(pairs_file),
               "--target", f"{TARGET:g},16", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "target" in printed and "λ2" in printed and "note:" not in printed
    record = json.loads(out.read_text())
    assert record["stage"] == 2 and record["settings"] == SETTINGS
    first, second = record["fits"]
    assert [first["target"], second["target"]] == [TARGET, 16.0]
    assert first["lam"] == pytest.approx(fits[0].lam)  # the questions reached the model
    assert abs(first["lam"] - fits[1].lam) > 0.2 * fits[1].lam
    for fit in (first, second):
        assert fit["samples"] == SAMPLES and fit["parameter"] == "lambda2" and fit["reached"]
        assert abs(fit["mean_kept"] - fit["target"]) <= 1.0
        assert fit["min_kept"] <= fit["mean_kept"] <= fit["max_kept"]
    assert second["lam"] > first["lam"]


def test_cli_images_folder_notes_the_fixed_prompt(pairs_file, capsys):
    rc = main(["calibrate", "budget", "--model", str(MODEL_DIR), "--images", str(pairs_file.parent / "images"),
               "--num", "2", "--target", "64"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "note: stage II depends on the question" in printed and "--pairs" in printed
    assert "2 samples" in printed


BAD_PAIRS = {
    "not json": ('{"image": "a.png", "question": "q"}\n{"image": oops}\n', "line 2 is not valid JSON"),
    "no question": ('{"image": "a.png"}\n', "line 1 lacks 'question'"),
    "no image": ('\n{"question": "what colour?"}\n', "line 2 lacks 'image'"),
    "not an object": ('["a.png", "q"]\n', "line 1 is not a JSON object"),
    "missing image": ('{"image": "missing.png", "question": "q"}\n', "line 1: the image"),
    "empty": ("", "holds no calibration pairs"),
    "blank lines only": ("\n  \n", "holds no calibration pairs"),
}


@pytest.mark.parametrize("case", BAD_PAIRS)
def test_cli_rejects_a_bad_pairs_file_before_loading_the_model(case, tmp_path, monkeypatch, capsys):
    from transformers import AutoModelForImageTextToText

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the pairs were checked")

    monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained", no_loading)
    text, message = BAD_PAIRS[case]
    make_split("val", 1)[0].image().save(tmp_path / "a.png")
    path = tmp_path / "pairs.jsonl"
    path.write_text(text)
    with pytest.raises(InputError, match=message):
        read_pairs(path)
    assert main(["calibrate", "budget", "--model", str(MODEL_DIR), "--pairs", str(path), "--target", "64"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vtprune: error:") and message in err[0]


@pytest.mark.parametrize("argv, message", [
    (["--pairs", "nowhere.jsonl", "--target", "64"], "is not a file"),
    (["--pairs", "nowhere.jsonl", "--target", "64,x"], "--target '64,x'"),
    (["--images", "no-such-folder", "--target", "64"], "is not a folder"),
])
def test_cli_rejects_bad_arguments_in_one_line(argv, message, capsys):
    assert main(["calibrate", "budget", "--model", str(MODEL_DIR), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_an_unreadable_image_is_an_input_error(demo, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    (tmp_path / "pairs.jsonl").write_text('{"image": "broken.png", "question": "what colour?"}\n')
    with pytest.raises(InputError, match="cannot read the image"):
        calibrate_pairs(*demo, read_pairs(tmp_path / "pairs.jsonl"), [64], **SETTINGS)


def test_targets_and_table():
    assert parse_targets("192, 128,64") == [192.0, 128.0, 64.0]
    for bad in ("", "abc", "64,-1", "0"):
        with pytest.raises(ArgumentError):
            parse_targets(bad)
    from vtprune.occamtoken.budget import fit_lambda

    ratios = [([0.5, 1.0, 2.0, 3.0], 1), ([0.5, 4.0], 1)]
    fits = [fit_lambda(ratios, t) for t in (4, 2)]
    lines = format_table(fits).splitlines()
    assert lines[0].split()[:2] == ["target", "λ2"] and len(lines) == 3
    assert [f.mean_kept for f in fits] == [4.0, 2.0]
    assert (fits[0].min_kept, fits[0].max_kept) == (3, 5)
    assert all(f.reached for f in fits)
    too_many = fit_lambda(ratios, 10)
    assert not too_many.reached and (too_many.lam, too_many.mean_kept) == (0.0, 4.0)
