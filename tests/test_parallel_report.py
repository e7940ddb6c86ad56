"""The report stage at the training layout: report.json of the same job at tp1 and tp2 x pp2 (default run), and at
tp8 x pp2 on 16 gloo ranks (marker ``scale``), agree; a finished run reports again at another layout.

Tolerance: held-out KL to rel. 1e-4 (tensor-parallel log-softmax sums and row-parallel all-reduces change the float
summation order: noise near 1e-6 rel., plus the trained weights' own fp32 noise after two Adam steps at lr 1e-4, see
test_parallel_refit.py). Achieved CR, kept fraction and recall are counts of hard decisions and argmaxes: equal
unless a decision logit or a top-2 logit gap lies within float noise of 0, so one key slot / one answer of slack.
"""

import json
from pathlib import Path

import pytest

from refit_fixtures import refit_dict, run_refit, shared_assets
from spawn_util import torchrun_harness

pytestmark = pytest.mark.parallel

STEPS, LR = 2, 1e-4


def greedy_items(assets, path: Path, n: int = 5, prompt: int = 8, length: int = 40) -> str:
    """Recall items the one-rank teacher answers right by construction: after a prompt of held-out tokens, each next
    token is the teacher's full-vocabulary argmax, and every generated position is an answer (a random teacher
    recalls nothing on the real items, which would make recall agree trivially)."""
    import torch

    from dms_megatron.checkpoint import load_model_weights
    from dms_megatron.config import ModelConfig
    from dms_megatron.data.recall import read_items, write_items
    from dms_megatron.megatron.model import build_gpt_model

    mc = ModelConfig(**assets["model"])
    teacher = build_gpt_model(mc, None, seq_length=length)
    load_model_weights(assets["teacher"], teacher)
    items = []
    with torch.no_grad():
        for it in read_items(assets["recall"], n):
            ids = list(it["ids"][:prompt])
            while len(ids) < length:
                logits = teacher(torch.tensor([ids]), torch.arange(len(ids))[None], None)
                ids.append(int(logits[0, -1, :mc.vocab_size].argmax()))
            items.append({"ids": ids, "answers": list(range(prompt, length))})
    write_items(path, items)
    return str(path)


def _cfg_dict(assets, tp=1, pp=1, **train):
    d = refit_dict(assets, steps=STEPS, save_interval=100, warmup_steps=0, lr=LR, min_lr=LR / 10, eval_interval=0,
                   eval_batches=2, recall_eval_limit=5, **train)  # 5 items: the last micro batch is half empty
    d["dms"].update(initial_cr=2.0, final_cr=4.0, final_step=STEPS)  # q-neuron: a random teacher evicts some keys
    d["parallel"] = dict(tp=tp, pp=pp)
    d["data"]["recall_eval"] = assets["greedy_recall"]
    return d


def _torchrun(nproc, d, tmp, run_dir, timeout=900):
    torchrun_harness(nproc, d, tmp, "--run-dir", run_dir, "--report", "--no-grads", timeout=timeout)
    return json.loads((run_dir / "report.json").read_text())


def _one_rank(d, run_dir):
    from dms_megatron.config import RefitConfig

    run_refit(RefitConfig.from_dict(d), run_dir)
    return json.loads((run_dir / "report.json").read_text())


def _slots(d) -> int:
    """Key slots of the held-out evaluation: micro batches x samples x positions x layers x KV heads."""
    t, m = d["train"], d["model"]
    return t["eval_batches"] * t["micro_batch_size"] * t["seq_length"] * m["num_layers"] * m["num_query_groups"]


def assert_reports_agree(ref: dict, got: dict, slots: int) -> None:
    for k in ("target_cr", "steps", "recall_answers", "window", "alpha_source", "train_mode"):
        assert got[k] == ref[k], k
    assert got["kl_to_teacher"] == pytest.approx(ref["kl_to_teacher"], rel=1e-4)
    assert abs(got["kept_fraction"] - ref["kept_fraction"]) <= 1.0 / slots + 1e-12
    assert got["achieved_cr"] == pytest.approx(ref["achieved_cr"], rel=2.0 / (slots * ref["kept_fraction"]))
    for k in ("teacher_recall_acc", "student_recall_acc"):
        assert abs(got[k] - ref[k]) <= 1.0 / ref["recall_answers"] + 1e-12, k
    assert 1 < ref["achieved_cr"] and 0 < ref["kl_to_teacher"] and ref["recall_answers"] > 0
    assert ref["teacher_recall_acc"] >= 0.95 and ref["student_recall_acc"] > 0.5  # not a comparison of zeros


def test_report_tp2pp2_matches_one_rank_and_a_finished_run_reports_at_another_layout(megatron_single,
                                                                                      tmp_path_factory, tmp_path):
    assets = dict(shared_assets(tmp_path_factory))
    assets["greedy_recall"] = greedy_items(assets, tmp_path / "greedy.jsonl")
    d1 = _cfg_dict(assets)
    ref = _one_rank(d1, tmp_path / "tp1")
    got = _torchrun(4, _cfg_dict(assets, tp=2, pp=2), tmp_path, tmp_path / "tp2pp2")
    assert_reports_agree(ref, got, _slots(d1))
    # the finished tp2 x pp2 run, run again at one rank: no training, its report from the final checkpoint
    (tmp_path / "tp2pp2" / "report.json").unlink()
    again = _one_rank(d1, tmp_path / "tp2pp2")
    assert_reports_agree(got, again, _slots(d1))
    assert len((tmp_path / "tp2pp2" / "metrics.jsonl").read_text().splitlines()) == STEPS


SCALE_MODEL = dict(num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=8, num_query_groups=8)


@pytest.mark.scale
def test_report_tp8pp2_on_16_ranks_matches_one_rank(megatron_single, tmp_path_factory, tmp_path):
    assets = dict(shared_assets(tmp_path_factory, **SCALE_MODEL))
    assets["greedy_recall"] = greedy_items(assets, tmp_path / "greedy.jsonl")
    d1 = _cfg_dict(assets)
    ref = _one_rank(d1, tmp_path / "tp1")
    got = _torchrun(16, _cfg_dict(assets, tp=8, pp=2), tmp_path, tmp_path / "tp8pp2", timeout=1500)
    assert_reports_agree(ref, got, _slots(d1))
