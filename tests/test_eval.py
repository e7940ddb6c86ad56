"""`dms-eval`: streaming harness against full forwards, matched budgets, eval.json layout, bad input."""

import json
import math
import re
from pathlib import Path

import pytest
import torch

from cli_helpers import launch, student_refit_overrides
from refit_fixtures import RECALL_LEN, shared_assets

ROOT = Path(__file__).resolve().parents[1]
KL_LENGTH = 32
# kl_by_position's positions per entry: the test students' window is 4, so DMS evicts nothing in the first bucket
BUCKET = 4
RECALL_LIMIT = 4


@pytest.fixture(scope="module")
def assets(tmp_path_factory, megatron_single):
    return shared_assets(tmp_path_factory)


def test_budget_for_rounds_up_per_layer_and_head():
    from dms_megatron.eval.harness import budget_for

    assert budget_for(4 * 2 * 10, layers=4, kv_heads=2) == 10
    assert budget_for(4 * 2 * 10 + 1, layers=4, kv_heads=2) == 11
    assert budget_for(0.5, layers=4, kv_heads=2) == 1


def test_streaming_equals_one_full_prefill_and_counts_reads(assets):
    """Token-by-token streaming with a full cache gives the logits of one prefill of the whole sequence, and its
    KV reads are the triangular count layers * kv_heads * (2 + 3 + ... + L)."""
    from dms_megatron.eval.harness import stream
    from dms_megatron.inference.engine import Engine
    from dms_megatron.inference.loading import load_megatron

    model = load_megatron(assets["teacher"])
    torch.manual_seed(0)
    seqs = torch.randint(0, 200, (3, 20))
    summ, logits = stream(Engine(model), seqs.tolist(), keep_logits=True)
    for i in range(3):
        eng = Engine(model)
        s = eng.new_session(1)
        ref = eng.prefill(s, 0, seqs[i].tolist())
        torch.testing.assert_close(logits[i], ref.float(), rtol=1e-4, atol=1e-4)
    c = model.cfg
    assert all(r["kv_reads"] == c.num_layers * c.num_query_groups * (sum(range(2, 21))) for r in summ)
    assert all(r["peak_resident"] == c.num_layers * c.num_query_groups * 20 for r in summ)


def test_answer_residency_follows_what_each_press_keeps(assets):
    """Hand-worked: StreamingLLM with 2 sinks and budget 6 holds positions {0, 1} and the 4 most recent ones, so an
    answer stated at position 1 is resident in every layer and head when asked at position 20, one stated at
    position 5 is not; a full cache holds both. The accuracy split by residency covers every answer."""
    from dms_megatron.eval.harness import recall_metrics, stated_position
    from dms_megatron.inference.engine import Engine
    from dms_megatron.inference.loading import load_megatron
    from dms_megatron.inference.press import make_press

    assert stated_position([7, 3, 9, 3, 9], 4) == 2 and stated_position([7, 3, 9], 2) is None
    model = load_megatron(assets["teacher"])
    layers = model.cfg.num_layers
    prompt = list(range(10, 30))  # 20 distinct tokens; the 21st repeats one of them (the "answer")
    items = [{"ids": prompt + [prompt[1]], "answers": [20]}, {"ids": prompt + [prompt[5]], "answers": [20]}]
    sl = recall_metrics(Engine(model, make_press("streamingllm", budget=6, sinks=2)), items[:1])
    assert sl["answer_resident"] == [1.0] * layers
    sl = recall_metrics(Engine(model, make_press("streamingllm", budget=6, sinks=2)), items[1:])
    assert sl["answer_resident"] == [0.0] * layers
    split = sl["recall_acc_by_residency"]
    assert split["any_layer"]["held"] is None and split["any_layer"]["dropped"] is not None
    assert split["layer0"]["held"] is None and len(split) == layers + 1
    full = recall_metrics(Engine(model), items)
    assert full["answer_resident"] == [1.0] * layers and full["recall_acc_by_residency"]["any_layer"]["dropped"] is None
    assert full["answers"] == 2 and full["items"] == 2
    # an answer never stated before: no residency figures (rather than wrong ones)
    assert "answer_resident" not in recall_metrics(Engine(model), [{"ids": prompt + [5], "answers": [20]}])


def _launch(args, env_extra=None, timeout=900):
    return launch("evaluate", args, env_extra, timeout)


def _overrides(assets):
    return student_refit_overrides(assets) + [f"recall_limit={RECALL_LIMIT}", "kl_sequences=2",
                                              f"kl_length={KL_LENGTH}"]


def _kl_sequences(valid_prefix: str) -> torch.Tensor:
    from dms_megatron.eval.run import heldout_sequences

    return heldout_sequences(valid_prefix, 2, KL_LENGTH)  # eval's 2 KL sequences


def _per_position_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """[B, L, V] x 2 -> [L]: KL(student || teacher) per position, averaged over the sequences, in float64."""
    ps, pt = torch.log_softmax(student_logits.double(), -1), torch.log_softmax(teacher_logits.double(), -1)
    return (ps.exp() * (ps - pt)).sum(-1).mean(0)


def _whole_cache_kl(teacher: str, student: str, valid_prefix: str) -> torch.Tensor:
    """[L]: per-position KL(student || teacher) from one full forward of each model."""
    from dms_megatron.inference.loading import load_model

    ids = _kl_sequences(valid_prefix)
    with torch.no_grad():
        return _per_position_kl(load_model(student, require_dms=True)(ids), load_model(teacher)(ids))


def _student_h2o_kl(teacher: str, student: str, valid_prefix: str, budget: int) -> float:
    """The student streamed with H2O at ``budget`` tokens per head against the teacher's full forward."""
    from dms_megatron.eval.harness import stream
    from dms_megatron.inference.engine import Engine
    from dms_megatron.inference.loading import load_model
    from dms_megatron.inference.press import make_press

    ids = _kl_sequences(valid_prefix)
    _, logits = stream(Engine(load_model(student, require_dms=True), make_press("h2o", budget=budget)),
                       ids.tolist(), keep_logits=True)
    with torch.no_grad():
        return float(_per_position_kl(logits, load_model(teacher)(ids)).mean())


def test_dms_eval_writes_matched_budget_results_and_reuses_students(assets, tmp_path):
    cache = tmp_path / "cache"
    run = tmp_path / "run"
    # q-neuron students evict from their first step (a zero-initialised adapter would not within 3 steps)
    r = _launch(_overrides(assets) + ["crs=[2,4]", "refit.dms.alpha_source=qneuron", f"kl_bucket={BUCKET}",
                                      f"hydra.run.dir={run}"], {"DMS_CACHE_DIR": str(cache)})
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((run / "eval.json").read_text())
    assert set(res) == {"vanilla", "dms", "tova", "h2o", "streamingllm", "quest"}
    assert set(res["vanilla"]) == {"1"}
    mc = assets["model"]
    heads = mc["num_layers"] * mc["num_query_groups"]
    van = res["vanilla"]["1"]
    assert van["kl"] == pytest.approx(0.0, abs=1e-5)
    assert van["kl_kv_reads"] == heads * sum(range(2, KL_LENGTH + 1))
    assert van["kl_peak_tokens"] == heads * KL_LENGTH
    assert len(van["kl_by_position"]) == KL_LENGTH // BUCKET and max(van["kl_by_position"]) < 1e-5
    for cr in ("2", "4"):
        d = res["dms"][cr]
        assert set(d) >= {"recall_acc", "kl", "peak_tokens", "kv_reads"}
        assert 0.0 <= d["recall_acc"] <= 1.0 and d["kl"] >= 0.0
        assert len(d["answer_resident"]) == mc["num_layers"] and all(0 <= x <= 1 for x in d["answer_resident"])
        assert d["peak_tokens"] <= van["peak_tokens"] and d["kv_reads"] <= van["kv_reads"]
        for m in ("tova", "h2o", "streamingllm"):
            b = res[m][cr]
            # the budget of an eviction method is DMS's peak per (layer, KV head), rounded up
            assert b["budget"] == max(1, math.ceil(d["peak_tokens"] / heads))
            assert b["kl_budget"] == max(1, math.ceil(d["kl_peak_tokens"] / heads))
            assert b["kl_peak_tokens"] <= heads * b["kl_budget"] and b["peak_tokens"] <= heads * b["budget"]
        # Quest keeps the whole cache and reads at most its budget per head and step; the budget is the smallest
        # whose reads over the streamed sequence reach what DMS read
        q = res["quest"][cr]
        assert q["kl_peak_tokens"] == van["kl_peak_tokens"]
        assert q["kl_kv_reads"] <= heads * q["kl_budget"] * (KL_LENGTH - 1)
        for budget, reads, length in ((q["budget"], d["kv_reads"], RECALL_LEN), (q["kl_budget"], d["kl_kv_reads"],
                                                                                   KL_LENGTH)):
            def total(b, n=length):
                return heads * sum(min(b, t) for t in range(2, n + 1))
            assert total(budget) >= reads - 1e-6 and (budget == 1 or total(budget - 1) < reads)
        # the weight change alone: the student's full causal forward (no eviction) against the teacher's, by hand
        whole = _whole_cache_kl(assets["teacher"], d["student"], assets["valid"])  # [L]
        assert d["kl_whole_cache"] == pytest.approx(float(whole.mean()), rel=1e-4, abs=1e-7) and d["kl_whole_cache"] > 0
        assert d["kl_peak_tokens"] < van["kl_peak_tokens"] and d["kl"] > d["kl_whole_cache"] * (1 + 1e-3)
        # per position: within its window DMS has evicted nothing yet, so its first bucket is the whole-cache KL;
        # the buckets average to the row's KL
        by_pos = d["kl_by_position"]
        assert len(by_pos) == KL_LENGTH // BUCKET and by_pos[0] > 0
        assert by_pos[0] == pytest.approx(float(whole[:BUCKET].mean()), rel=1e-2)  # fp32 streaming of a small KL
        assert sum(by_pos) / len(by_pos) == pytest.approx(d["kl"], rel=1e-5)
        # a budget method on the teacher loses nothing before its budget fills (the budget is at least the window)
        h = res["h2o"][cr]
        assert h["kl_budget"] >= BUCKET
        assert all(abs(x) < 1e-5 for x in h["kl_by_position"][:h["kl_budget"] // BUCKET])
        # the student's weights with H2O's decisions at DMS's peak: the student streamed under H2O, by hand
        ref = _student_h2o_kl(assets["teacher"], d["student"], assets["valid"], h["kl_budget"])
        assert d["kl_student_h2o"] == pytest.approx(ref, rel=1e-4, abs=1e-7) and d["kl_student_h2o"] != h["kl"]
    assert (run / "pareto_kv_reads.png").stat().st_size > 0 and (run / "pareto_peak_tokens.png").stat().st_size > 0
    students = sorted(p.name for p in (cache / "students").iterdir())
    assert len(students) == 2 and all(not n.endswith(".partial") for n in students), students
    # a progress line per finished method x CR, counting up to the total, with the time left
    steps = [ln for ln in r.stdout.splitlines() if re.search(r"\[\d+/11\] ", ln)]
    assert [re.search(r"\[(\d+)/11\]", ln).group(1) for ln in steps] == [str(i) for i in range(1, 12)], r.stdout
    assert all("elapsed" in ln and "left)" in ln for ln in steps)
    # a second evaluation reuses the cached students (no re-fit) and reproduces the numbers
    run2 = tmp_path / "run2"
    r2 = _launch(_overrides(assets) + ["crs=[2,4]", "refit.dms.alpha_source=qneuron", "methods=[vanilla,dms]",
                                       f"hydra.run.dir={run2}"],
                 {"DMS_CACHE_DIR": str(cache)})
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert r2.stdout.count("reusing") == 2
    res2 = json.loads((run2 / "eval.json").read_text())
    assert res2["dms"]["4"]["recall_acc"] == res["dms"]["4"]["recall_acc"]
    assert res2["dms"]["4"]["kl"] == pytest.approx(res["dms"]["4"]["kl"], rel=1e-6)


@pytest.mark.parametrize("override,needle", [
    ("crs=[1]", "eval.crs"),
    ("methods=[vanilla,snapkv]", "eval.methods"),
    ("+students.3=/nowhere", "not in eval.crs"),
    ("kl_length=1000", "eval.kl_length"),
])
def test_bad_eval_config_fails_in_one_line(assets, tmp_path, override, needle):
    r = _launch(_overrides(assets) + [override, f"hydra.run.dir={tmp_path / 'run'}"])
    assert r.returncode == 2, r.stderr[-2000:]
    err = [line for line in r.stderr.splitlines() if "error" in line]
    assert err and needle in err[-1], r.stderr[-2000:]
    assert not (tmp_path / "run" / "eval.json").exists()


def test_student_that_is_not_a_run_dir_is_refused(assets, tmp_path):
    r = _launch(_overrides(assets) + ["crs=[4]", f"+students.4={tmp_path}", f"hydra.run.dir={tmp_path / 'run'}"])
    assert r.returncode == 2
    assert "holds no checkpoint" in r.stderr
