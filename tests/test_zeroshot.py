"""Zero-shot accuracy through lm-eval: local-file tasks on tiny models, an exact-accuracy check with a model
that always picks the first choice, the shipped offline cloze tasks, and hub tasks without network."""

from __future__ import annotations

import json
import os
import random

import pytest
import torch

pytest.importorskip("lm_eval")

from conftest import tiny_model  # noqa: E402
from lm_eval.api.model import LM  # noqa: E402

from svdkit.evaluation import zeroshot  # noqa: E402
from svdkit.evaluation.zeroshot import ZeroShotError, hub_offline, zero_shot  # noqa: E402
from svdkit.modules import LowRankLinear  # noqa: E402
from svdkit.tasks import SHIPPED_TASKS, TASKS_DIR  # noqa: E402
from svdkit.tasks.build import build_ptb_cloze, to_jsonl  # noqa: E402

TASK = "svdkit_test_mc"
WORDS = "market price stock bank trade share money growth rate bond fund index".split()


class FirstChoiceLM(LM):
    """An lm-eval model whose log-likelihood ranks the choices in order, so it always answers choice 0."""

    def loglikelihood(self, requests):
        return [(-float(req.idx), False) for req in requests]

    def loglikelihood_rolling(self, requests):
        raise NotImplementedError

    def generate_until(self, requests):
        raise NotImplementedError


def write_task(folder, items: list[dict], name: str = TASK):
    """A user-style local task: a YAML with `dataset_path: json` pointing at a JSONL next to it."""
    data = folder / f"{name}.jsonl"
    data.write_text(to_jsonl(items), encoding="utf-8")
    yaml = folder / f"{name}.yaml"
    yaml.write_text(
        f"task: {name}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: context\n"
        "doc_to_choice: choices\n"
        "doc_to_target: label\n"
        "metric_list:\n"
        "  - metric: acc\n"
        "  - metric: acc_norm\n",
        encoding="utf-8",
    )
    return yaml


@pytest.fixture
def mc_task(tmp_path):
    """40 four-way items with seeded random answer positions; returns (task folder, items)."""
    rng = random.Random(1)
    items = []
    for _ in range(40):
        context = "the " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 9)))
        choices = rng.sample(WORDS, 4)
        items.append({"context": context, "choices": choices, "label": rng.randrange(4)})
    write_task(tmp_path, items)
    return tmp_path, items


def fraction_first(items: list[dict]) -> float:
    return sum(item["label"] == 0 for item in items) / len(items)


def low_rank_copy(model):
    """The model with every decoder-block linear replaced by an exact full-rank `LowRankLinear` (U S, V^T)."""
    import copy

    model = copy.deepcopy(model)
    for block in model.model.layers:
        for name, lin in list(block.named_modules()):
            if isinstance(lin, torch.nn.Linear):
                u, s, vh = torch.linalg.svd(lin.weight.detach().double(), full_matrices=False)
                new = LowRankLinear.from_factors((u * s).float(), vh.float(), lin.bias)
                parent = block.get_submodule(name.rpartition(".")[0]) if "." in name else block
                setattr(parent, name.rpartition(".")[2], new)
    return model


# --------------------------------------------------------------------------------------------- exact accuracy
def test_first_choice_model_scores_fraction_of_first_answers(mc_task):
    folder, items = mc_task
    assert 0 < fraction_first(items) < 1  # the answer position varies
    out = zero_shot(FirstChoiceLM(), None, [TASK], include_path=str(folder))
    res = out["tasks"][TASK]
    assert res["acc"] == fraction_first(items)
    assert res["acc_norm"] == fraction_first(items)
    assert res["samples"] == res["samples_total"] == len(items)
    assert out["average_acc"] == res["acc"] and out["num_fewshot"] == 0
    limited = zero_shot(FirstChoiceLM(), None, TASK, limit=10, include_path=folder)["tasks"][TASK]
    assert limited["acc"] == fraction_first(items[:10]) and limited["samples"] == 10


def test_task_yaml_path_and_average_over_tasks(tmp_path):
    a = write_task(tmp_path, [{"context": "x", "choices": ["a", "b"], "label": 0}] * 3, name="task_a")
    b = write_task(tmp_path, [{"context": "x", "choices": ["a", "b"], "label": 1}] * 3, name="task_b")
    out = zero_shot(FirstChoiceLM(), None, [str(a), str(b)])
    assert out["tasks"]["task_a"]["acc"] == 1.0 and out["tasks"]["task_b"]["acc"] == 0.0
    assert out["average_acc"] == 0.5


# --------------------------------------------------------------------------------------------- real models
def test_local_task_end_to_end_on_tiny_llama_dense_and_low_rank(mc_task, tokenizer):
    folder, _ = mc_task
    model = tiny_model("llama")
    pad_before = tokenizer.pad_token
    dense = zero_shot(model, tokenizer, [TASK], limit=8, batch_size=4, include_path=folder)
    json.dumps(dense, allow_nan=False)  # JSON-ready: no NaN, no tensors
    res = dense["tasks"][TASK]
    assert res["samples"] == 8 and res["samples_total"] == 40
    assert 0.0 <= res["acc"] <= 1.0 and 0.0 <= res["acc_norm"] <= 1.0
    assert res["acc_stderr"] is not None and res["acc_stderr"] > 0
    assert tokenizer.pad_token == pad_before  # lm-eval's pad token went to a copy

    low_rank = low_rank_copy(model)
    assert any(isinstance(m, LowRankLinear) for m in low_rank.modules())
    factored = zero_shot(low_rank, tokenizer, [TASK], limit=8, batch_size=4, include_path=folder)
    assert factored["tasks"][TASK]["acc"] == res["acc"]  # exact factorization: same choices


# --------------------------------------------------------------------------------------------- shipped tasks
@pytest.mark.parametrize("task", SHIPPED_TASKS)
def test_shipped_task_loads_offline_and_scores_exactly(task):
    rows = [json.loads(line) for line in (TASKS_DIR / f"{task.removeprefix('svdkit_')}.jsonl").open()]
    assert len(rows) == 500
    assert all(len(set(r["choices"])) == 4 and 0 <= r["label"] < 4 for r in rows)
    assert 0.15 < fraction_first(rows) < 0.35  # answer positions are spread
    out = zero_shot(FirstChoiceLM(), None, [task], limit=60, offline=True)
    assert out["tasks"][task]["acc"] == fraction_first(rows[:60])


def test_ptb_cloze_data_is_rebuilt_byte_identically():
    shipped = (TASKS_DIR / "ptb_cloze.jsonl").read_text(encoding="utf-8")
    assert to_jsonl(build_ptb_cloze()) == shipped


# --------------------------------------------------------------------------------------------- errors
def test_hub_task_offline_raises_naming_it():
    with pytest.raises(ZeroShotError, match="arc_easy.*network access"):
        zero_shot(FirstChoiceLM(), None, ["arc_easy"], offline=True)


def test_hub_task_with_unreachable_hub_fails_fast_and_restores_env(monkeypatch):
    import datasets.config
    from huggingface_hub import constants

    monkeypatch.setattr(zeroshot, "hub_reachable", lambda timeout=3.0: False)
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(key, raising=False)
    flags = (constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE)
    with pytest.raises(ZeroShotError, match="'piqa'.*unreachable"):
        zero_shot(FirstChoiceLM(), None, ["piqa"])
    assert "HF_HUB_OFFLINE" not in os.environ and "HF_DATASETS_OFFLINE" not in os.environ
    assert (constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE) == flags


def test_hub_offline_restores_previous_values(monkeypatch):
    import datasets.config

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    before = datasets.config.HF_HUB_OFFLINE
    with hub_offline():
        assert os.environ["HF_HUB_OFFLINE"] == "1" and datasets.config.HF_HUB_OFFLINE is True
    assert os.environ["HF_HUB_OFFLINE"] == "0" and datasets.config.HF_HUB_OFFLINE == before


def test_unknown_task_and_bad_arguments(tmp_path):
    with pytest.raises(ZeroShotError, match="no_such_task"):
        zero_shot(FirstChoiceLM(), None, ["no_such_task"])
    with pytest.raises(ZeroShotError, match="include_path"):
        zero_shot(FirstChoiceLM(), None, [TASK], include_path=tmp_path / "missing")
    with pytest.raises(ZeroShotError, match="no tasks"):
        zero_shot(FirstChoiceLM(), None, " , ")
    with pytest.raises(ZeroShotError, match="tokenizer"):
        zero_shot(tiny_model("llama"), None, ["svdkit_ptb_cloze"], limit=1)


def test_local_task_with_missing_data_file_is_not_blamed_on_network(tmp_path):
    yaml = write_task(tmp_path, [{"context": "x", "choices": ["a", "b"], "label": 0}])
    (tmp_path / f"{TASK}.jsonl").unlink()
    with pytest.raises(ZeroShotError, match=f"could not load task '.*{TASK}.yaml'.*FileNotFoundError") as info:
        zero_shot(FirstChoiceLM(), None, [str(yaml)], offline=False)
    assert "network" not in str(info.value)


# --------------------------------------------------------------------------------------------- SmolLM2
@pytest.mark.slow
def test_smollm2_ptb_cloze_well_above_chance():
    import svdkit

    model, tok = svdkit.load_model("smollm2-135m")
    out = zero_shot(model, tok, ["svdkit_ptb_cloze"], limit=100, batch_size=8)
    res = out["tasks"]["svdkit_ptb_cloze"]
    assert res["samples"] == 100
    assert res["acc"] > 0.5, res  # chance is 0.25
