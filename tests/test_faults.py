"""Faults a careless or hostile user causes: every corruption of a saved folder is one `LoadError` line, a killed
save leaves nothing that outlives the next save, saved folders get the umask's permissions, and every bad
command line is one error line, exit status 2 and nothing new on disk."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from safetensors.torch import load_file, save_file

import svdkit
from svdkit._fs import atomic_dir
from svdkit.cli import main
from svdkit.errors import OutputError
from svdkit.io import LoadError

FORMATS = ("svdkit", "transformers")
PROGRESS = re.compile(r"\d+%\||it/s\]|block/s\]|Loading weights")


def error_lines(err: str) -> list[str]:
    """The lines of stderr that are not progress bars (tqdm redraws with carriage returns)."""
    return [line for line in re.split(r"[\r\n]", err) if line.strip() and not PROGRESS.search(line)]


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """A tiny compressed LLaMA with its tokenizer, saved once in each format."""
    root = tmp_path_factory.mktemp("saved")
    out = {}
    for fmt in FORMATS:
        model = tiny_model("llama")
        svdkit.compress(model, svdkit.SVD(ratio=0.4), None, progress=False)
        out[fmt] = svdkit.save(model, root / fmt, tokenizer=tokenizer, format=fmt)
    return out


# --------------------------------------------------------------------------------------------- damage
def _weights(p: Path) -> Path:
    return p / ("svdkit.safetensors" if (p / "svdkit.safetensors").exists() else "model.safetensors")


def _edit_tensors(p: Path, edit) -> None:
    tensors = load_file(_weights(p))
    edit(tensors)
    save_file(tensors, _weights(p), metadata={"format": "pt"})


def _edit_config(p: Path, edit) -> None:
    cfg = json.loads((p / "config.json").read_text())
    edit(cfg)
    (p / "config.json").write_text(json.dumps(cfg))


def _first_rank(cfg: dict) -> str:
    return sorted(cfg["svdkit"]["ranks"])[0]


def truncated(p):
    data = _weights(p).read_bytes()
    _weights(p).write_bytes(data[: len(data) // 2])


def truncated_in_header(p):
    _weights(p).write_bytes(_weights(p).read_bytes()[:20])


def flipped_header_byte(p):
    data = bytearray(_weights(p).read_bytes())
    data[8 + 10] ^= 0xFF  # inside the JSON header: no longer UTF-8
    _weights(p).write_bytes(bytes(data))


def flipped_shape_digit(p):
    data = bytearray(_weights(p).read_bytes())
    at = data.index(b'"shape":[') + len(b'"shape":[')
    data[at] = ord("9") if data[at] != ord("9") else ord("8")  # still valid JSON, inconsistent with the offsets
    _weights(p).write_bytes(bytes(data))


def flipped_length_byte(p):
    data = bytearray(_weights(p).read_bytes())
    data[1] ^= 0x01  # the header length
    _weights(p).write_bytes(bytes(data))


def missing_block_tensor(p):
    _edit_tensors(p, lambda t: t.pop("model.layers.1.input_layernorm.weight"))


def missing_factor(p):
    _edit_tensors(p, lambda t: t.pop("model.layers.0.self_attn.q_proj.u.weight"))


def missing_other_tensor(p):
    _edit_tensors(p, lambda t: t.pop("model.norm.weight"))


def extra_tensor(p):
    _edit_tensors(p, lambda t: t.__setitem__("model.layers.0.extra.weight", torch.zeros(2)))


def wrong_shape_in_block(p):
    key = "model.layers.1.self_attn.q_proj.u.weight"
    _edit_tensors(p, lambda t: t.__setitem__(key, t[key][:, :-1].contiguous()))


def wrong_shape_outside_blocks(p):
    _edit_tensors(p, lambda t: t.__setitem__("model.norm.weight", t["model.norm.weight"][:-1].contiguous()))


def rank_one_too_high(p):
    def edit(cfg):
        cfg["svdkit"]["ranks"][_first_rank(cfg)] += 1

    _edit_config(p, edit)


def rank_beyond_the_matrix(p):
    def edit(cfg):
        cfg["svdkit"]["ranks"][_first_rank(cfg)] = 10**6

    _edit_config(p, edit)


def rank_not_a_number(p):
    def edit(cfg):
        cfg["svdkit"]["ranks"][_first_rank(cfg)] = "abc"

    _edit_config(p, edit)


def rank_of_an_unknown_layer(p):
    _edit_config(p, lambda cfg: cfg["svdkit"]["ranks"].__setitem__("model.layers.7.mlp.up_proj", 4))


def rank_entry_missing(p):
    _edit_config(p, lambda cfg: cfg["svdkit"]["ranks"].pop(_first_rank(cfg)))


def rank_map_missing(p):
    _edit_config(p, lambda cfg: cfg["svdkit"].pop("ranks"))


def svdkit_entry_missing(p):
    _edit_config(p, lambda cfg: cfg.pop("svdkit"))


def config_not_json(p):
    (p / "config.json").write_text('{"model_type": "llama", ')


def config_empty_object(p):
    (p / "config.json").write_text("{}")


def config_missing(p):
    (p / "config.json").unlink()


def weights_missing(p):
    _weights(p).unlink()


def tokenizer_lost(p):
    for f in p.glob("tokenizer*"):
        f.unlink()


def tokenizer_json_lost(p):
    (p / "tokenizer.json").unlink()


def tokenizer_corrupt(p):
    (p / "tokenizer.json").write_text("{")


DAMAGE = [truncated, truncated_in_header, flipped_header_byte, flipped_shape_digit, flipped_length_byte,
          missing_block_tensor, missing_factor, missing_other_tensor, extra_tensor, wrong_shape_in_block,
          wrong_shape_outside_blocks, rank_one_too_high, rank_beyond_the_matrix, rank_not_a_number,
          rank_of_an_unknown_layer, rank_entry_missing, rank_map_missing, svdkit_entry_missing, config_not_json,
          config_empty_object, config_missing, weights_missing, tokenizer_lost, tokenizer_json_lost, tokenizer_corrupt]


@pytest.mark.parametrize("damage", DAMAGE, ids=[d.__name__ for d in DAMAGE])
@pytest.mark.parametrize("fmt", FORMATS)
def test_every_corruption_of_a_saved_folder_is_one_load_error_line(saved, tmp_path, capsys, fmt, damage):
    folder = tmp_path / "damaged"
    shutil.copytree(saved[fmt], folder)
    damage(folder)
    with pytest.raises(LoadError) as info:
        svdkit.load(folder)
    message = str(info.value)
    assert "\n" not in message and str(folder) in message
    capsys.readouterr()
    assert main(["eval", "--model", str(folder), "--data", "ptb", "--seqlen", "16", "--max-windows", "1"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = error_lines(err)
    assert len(lines) == 1 and lines[0].startswith("svdkit: error: ") and str(folder) in lines[0], lines


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_lost_tokenizer_still_loads_the_weights_without_it(saved, tmp_path, fmt):
    folder = tmp_path / "no-tokenizer"
    shutil.copytree(saved[fmt], folder)
    tokenizer_lost(folder)
    reference, _ = svdkit.load(saved[fmt])
    model, tok = svdkit.load(folder, with_tokenizer=False)
    ids = torch.arange(12)[None]
    assert tok is None and torch.equal(model(ids).logits, reference(ids).logits)


def test_a_folder_saved_without_a_tokenizer_loads_without_one(tmp_path):
    model = tiny_model("llama")
    svdkit.compress(model, svdkit.SVD(ratio=0.4), None, progress=False)
    svdkit.save(model, tmp_path / "bare")
    _, tok = svdkit.load(tmp_path / "bare")
    assert tok is None


# --------------------------------------------------------------------------------------------- writing
KILLED_SAVE = """
import os, signal, sys
from svdkit._fs import atomic_dir
cm = atomic_dir(sys.argv[1])
tmp = cm.__enter__()
(tmp / "weights.bin").write_bytes(b"0" * 4096)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_killed_save_is_cleaned_up_by_the_next_save_with_one_notice(tmp_path, caplog):
    target = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(svdkit.__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(target)], env=env, capture_output=True)
    assert run.returncode == -9
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".out.partial-") and not target.exists()
    legacy = tmp_path / ".out.partial-x1y2z3ab"  # what a killed run of an earlier version left
    legacy.mkdir()
    live = tmp_path / f".out.partial-{os.getpid()}-{left[0].split('-')[2]}-live"  # a save still running
    live.mkdir()
    other = tmp_path / ".out.partial-1-another.machine-abc"  # a save on another machine sharing the folder
    other.mkdir()
    with caplog.at_level("INFO", logger="svdkit"), atomic_dir(target) as tmp:
        (tmp / "weights.bin").write_bytes(b"1")
    assert (target / "weights.bin").read_bytes() == b"1"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", live.name, other.name])
    notices = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(notices) == 1 and "\n" not in notices[0].getMessage()
    assert left[0] in notices[0].getMessage() and legacy.name in notices[0].getMessage()


@pytest.mark.parametrize("umask, dirs, files", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_saved_folders_get_the_permissions_of_the_umask(tmp_path, tokenizer, umask, dirs, files):
    model = tiny_model("llama")
    svdkit.compress(model, svdkit.SVD(ratio=0.4), None, progress=False)
    previous = os.umask(umask)
    try:
        out = svdkit.save(model, tmp_path / "out", tokenizer=tokenizer, format="svdkit")
    finally:
        os.umask(previous)
    assert out.stat().st_mode & 0o777 == dirs
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert "svdkit.safetensors" in modes and set(modes.values()) == {files}, modes


def test_an_existing_file_or_an_unwritable_place_is_refused_before_anything_is_written(tmp_path):
    model = tiny_model("llama")
    (tmp_path / "afile").write_text("keep")
    with pytest.raises(OutputError, match="afile is an existing file"):
        svdkit.save(model, tmp_path / "afile", overwrite=True)
    assert (tmp_path / "afile").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]
    with pytest.raises(OutputError, match="cannot create a folder in /proc"):
        svdkit.save(model, "/proc/svdkit-test")


# --------------------------------------------------------------------------------------------- command line
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
BAD_INVOCATIONS = [
    (["eval", "--model", "no-such-model"], "cannot load model 'no-such-model'"),
    (["eval", "--model", "./no-such-folder"], "no-such-folder: no such folder"),
    (["eval", "--model", "EMPTY"], "is not a model folder"),
    (["eval", "--model", "NOTOK", "--data", "ptb"], "has no tokenizer"),
    (["compress", "--model", "TINY", "--ratio", "0"], "--ratio 0 removes nothing"),
    (["compress", "--model", "TINY", "--ratio", "1.5"], "ratio must be in [0, 1)"),
    (["compress", "--model", "TINY", "--ratio", "abc"], "expected a number, got 'abc'"),
    (["compress", "--model", "TINY", "--method", "svd", "--calib", "none", "--ratio", "0.999"], "leaves rank 0"),
    (["compress", "--model", "TINY", "--out", "FILE"], "is an existing file, not a folder"),
    (["compress", "--model", "TINY", "--out", "TINY"], "already exists and is not empty"),
    (["compress", "--model", "TINY", "--out", "/proc/svdkit-out"], "cannot create folders in /proc"),
    pytest.param(["compress", "--model", "TINY", "--device", "cuda"], "no CUDA GPU", marks=NO_GPU),
    pytest.param(["eval", "--model", "TINY", "--device", "cuda:1"], "'cuda:1' was requested", marks=NO_GPU),
    (["eval", "--model", "TINY", "--device", "cuda:99"], "device 'cuda:99' was requested but"),
    (["eval", "--model", "TINY", "--device", "gpu"], "unknown device 'gpu'"),
    (["eval", "--model", "TINY", "--max-windows", "-1"], "must be >= 0, got -1"),
    (["eval", "--model", "TINY", "--data", ""], "--data is empty"),
    (["eval", "--model", "TINY", "--data", ",,"], "--data is empty"),
    (["eval", "--model", "TINY", "--batch-size", "0"], "must be >= 1, got 0"),
    (["eval", "--model", "TINY", "--data", "nope"], "unknown data set 'nope'"),
    (["eval", "--model", "TINY", "--json", "/no-such-folder/x.json"], "does not exist"),
    (["eval", "--model", "TINY", "--json", "TINY"], "is a folder, not a file"),
    (["compress", "--model", "TINY", "--calib-batch-size", "0"], "must be >= 1, got 0"),
    (["compress", "--model", "TINY", "--nsamples", "0"], "must be >= 1, got 0"),
    (["compress", "--model", "TINY", "--method", "nope"], "unknown method 'nope'"),
    (["compress", "--model", "TINY", "--method", "svdllm:whitening=qr"], "whitening must be one of"),
    (["compress", "--model", "TINY", "--calib", "nope"], "unknown data set 'nope'"),
    (["compress", "--model", "TINY", "--quantize", "awq"], "awq"),
    (["sweep", "--model", "TINY", "--ratios", ""], "--ratios is empty"),
    (["sweep", "--model", "TINY", "--zeroshot", "svdkit_ptb_cloze,no_such_task"], "unknown task(s) 'no_such_task'"),
    (["sweep", "--model", "TINY", "--zeroshot-limit", "-1"], "must be >= 0, got -1"),
    (["generate", "--model", "TINY", "--prompt", "x", "--max-new-tokens", "0"], "must be >= 1, got 0"),
]


def _tree(root: Path) -> set[str]:
    return {os.path.relpath(os.path.join(d, n), root) for d, dirs, files in os.walk(root) for n in dirs + files}


@pytest.mark.parametrize("argv, message", BAD_INVOCATIONS)
def test_bad_invocations_exit_2_with_one_line_and_write_nothing(tmp_path, tokenizer, monkeypatch, capsys, argv,
                                                                 message):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # an unknown name never goes online
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where compress without --out would build its folder
    monkeypatch.chdir(tmp_path)
    tiny_model("llama").save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    tiny_model("llama").save_pretrained(tmp_path / "no-tokenizer")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    (tmp_path / "afile").write_text("keep")
    places = {"TINY": "tiny", "NOTOK": "no-tokenizer", "EMPTY": "empty", "FILE": "afile"}
    before = _tree(tmp_path)
    code = main([places.get(a, a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    lines = error_lines(err)
    assert len(lines) == 1 and lines[0].startswith("svdkit") and "error: " in lines[0], lines
    assert message in lines[0]
    assert _tree(tmp_path) == before and (tmp_path / "afile").read_text() == "keep"
