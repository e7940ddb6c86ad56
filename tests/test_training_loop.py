"""The loop's logged numbers against independent re-computation: the step-1 loss (KL by hand + compression term on
the same samples), the evaluate stage's held-out numbers (KL by hand and hard decisions counted from the final
weights), the CR and LR schedules (hand formulas), and gradient accumulation (2 x 2 == 1 x 4)."""

import json
import math

import pytest
import torch

from refit_fixtures import refit_dict, run_refit, shared_assets

STEPS = 4
WARMUP = 1
LR, MIN_LR = 1e-3, 1e-4
INITIAL_CR, FINAL_CR, FINAL_STEP = 2.0, 4.0, 2
COMP_WEIGHT = 3.0


@pytest.fixture(scope="module")
def assets(tmp_path_factory, megatron_single):
    return shared_assets(tmp_path_factory)


def _cfg(assets, **train):
    from dms_megatron.config import RefitConfig

    t = dict(steps=STEPS, warmup_steps=WARMUP, lr=LR, min_lr=MIN_LR, save_interval=100, eval_batches=1,
             recall_eval_limit=1, compression_weight=COMP_WEIGHT)
    t.update(train)
    d = refit_dict(assets, **t)
    d["dms"].update(initial_cr=INITIAL_CR, final_cr=FINAL_CR, final_step=FINAL_STEP)
    return RefitConfig.from_dict(d)


def _metrics(run_dir):
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def _reference(assets, cfg, tmp_path, student_weights):
    """What the checks recompute from: tokenizer, the run's train / valid datasets, the teacher and a student with
    ``student_weights``, built independently of the trainer."""
    from dms_megatron.checkpoint import load_model_weights
    from dms_megatron.config import DataBlend
    from dms_megatron.data.indexed import build_gpt_datasets
    from dms_megatron.data.tokenizer import load_tokenizer
    from dms_megatron.megatron.model import build_gpt_model

    t, mc = cfg.train, cfg.model
    tok = load_tokenizer(assets["tokenizer"])
    train_ds, valid_ds = build_gpt_datasets(DataBlend.per_split(assets["train"], assets["valid"]), t.seq_length, t.seed,
                                            t.steps * t.global_batch_size, t.eval_batches * t.micro_batch_size,
                                            tok.eos_token_id, tok.pad_token_id or 0, mc.vocab_size,
                                            cache_dir=str(tmp_path / "ref-cache"))
    teacher = build_gpt_model(mc, None, seq_length=t.seq_length)
    load_model_weights(assets["teacher"], teacher)
    student = build_gpt_model(mc, cfg.dms, seq_length=t.seq_length)
    load_model_weights(student_weights, student)
    return tok, train_ds, valid_ds, teacher, student


def _hand_kl(student_logits, teacher_logits, mask, direction):
    """sum_v p(v) (log p(v) - log q(v)) per token, p = student for KL(student||teacher); mean over mask==1."""
    ls = student_logits.double().log_softmax(-1)
    lt = teacher_logits.double().log_softmax(-1)
    p, lp, lq = (ls.exp(), ls, lt) if direction == "student_teacher" else (lt.exp(), lt, ls)
    per_tok = (p * (lp - lq)).sum(-1)
    return float((per_tok * mask).sum() / mask.sum())


@pytest.mark.parametrize("direction", ["student_teacher", "teacher_student"])
def test_first_step_loss_matches_hand_computation(assets, tmp_path, direction):
    from dms_megatron.data.indexed import collate
    from dms_megatron.megatron.runtime import DMSRuntime, dms_forward

    cfg = _cfg(assets, kd_direction=direction)
    run_refit(cfg, tmp_path)
    logged = _metrics(tmp_path)[0]

    t, mc = cfg.train, cfg.model
    tok, train_ds, _, teacher, student = _reference(assets, cfg, tmp_path, assets["teacher"])
    # step 0 of the schedule, the default band loss by hand: free between the evicted fractions of CR x (1 -/+ band)
    band = cfg.dms.cr_band
    lower, upper = max(0.0, 1 - 1 / (INITIAL_CR * (1 - band))), 1 - 1 / (INITIAL_CR * (1 + band))
    kds, comps = [], []
    with torch.no_grad():
        for first in range(0, t.global_batch_size, t.micro_batch_size):  # the first optimizer step's samples
            ids = list(range(first, first + t.micro_batch_size))
            b = collate([train_ds[i] for i in ids])
            valid = (b["loss_mask"] > 0) | (b["tokens"] == tok.eos_token_id)
            rt = DMSRuntime(mode="train", seed=t.seed, step=0, sample_ids=torch.tensor(ids), valid=valid)
            with dms_forward(student, rt):
                s = student(b["tokens"], b["position_ids"], None)[..., :mc.vocab_size]
            tl = teacher(b["tokens"], b["position_ids"], None)[..., :mc.vocab_size]
            kds.append(_hand_kl(s, tl, b["loss_mask"].double(), direction))
            frac = torch.stack(list(rt.fractions.values())).mean(0)  # [b] mean over layers
            comps.append(float((torch.clamp(lower - frac, min=0) + torch.clamp(frac - upper, min=0)).mean()))
    kd, comp = sum(kds) / len(kds), sum(comps) / len(comps)
    assert logged["kd_loss"] == pytest.approx(kd, rel=1e-4, abs=1e-7)
    assert logged["compression_loss"] == pytest.approx(comp, rel=1e-5, abs=1e-7)
    assert logged["loss"] == pytest.approx(kd + COMP_WEIGHT * comp, rel=1e-4)
    assert comp > 0  # the student starts far below the target eviction rate, so the term is active


def test_logged_schedules_follow_hand_formulas(assets, tmp_path):
    run_refit(_cfg(assets), tmp_path)
    m = _metrics(tmp_path)
    assert [x["step"] for x in m] == list(range(1, STEPS + 1))
    for k, x in enumerate(m):  # k = optimizer steps done before this one
        cr = INITIAL_CR + (FINAL_CR - INITIAL_CR) * min(k / FINAL_STEP, 1.0)
        assert x["target_cr"] == pytest.approx(cr)
        assert x["target_fraction"] == pytest.approx(1 - 1 / cr)
        if k <= WARMUP:
            lr = LR * k / WARMUP
        else:
            ratio = (k - WARMUP) / (STEPS - WARMUP)
            lr = MIN_LR + 0.5 * (math.cos(math.pi * ratio) + 1) * (LR - MIN_LR)
        assert x["lr"] == pytest.approx(lr, rel=1e-6, abs=1e-12), k
        assert x["grad_norm"] > 0 and x["tokens_per_s"] > 0
        layers = [x[f"evicted_fraction/layer{i}"] for i in (1, 2)]
        assert x["evicted_fraction"] == pytest.approx(sum(layers) / 2, rel=1e-5)


def test_gradient_accumulation_equals_one_large_micro_batch(assets, tmp_path):
    run_refit(_cfg(assets, steps=2, micro_batch_size=2, global_batch_size=4), tmp_path / "accum")
    run_refit(_cfg(assets, steps=2, micro_batch_size=4, global_batch_size=4), tmp_path / "single")
    a, b = _metrics(tmp_path / "accum"), _metrics(tmp_path / "single")
    for x, y in zip(a, b):
        for k in ("loss", "kd_loss", "compression_loss", "grad_norm"):
            assert x[k] == pytest.approx(y[k], rel=1e-4), k


def test_evaluate_stage_logs_held_out_kl_and_hard_eviction_of_the_current_weights(assets, tmp_path):
    from dms_megatron.data.indexed import collate
    from dms_megatron.megatron.runtime import DMSRuntime, dms_forward

    cfg = _cfg(assets, eval_interval=2, eval_batches=2)
    run_refit(cfg, tmp_path, report=False)
    m = _metrics(tmp_path)
    assert ["valid/kd_loss" in x for x in m] == [False, True, False, True]  # steps 2 and 4 of 4
    logged = m[-1]
    t, mc = cfg.train, cfg.model
    # the student's weights after step 4, the step evaluated last
    tok, _, valid_ds, teacher, student = _reference(assets, cfg, tmp_path, tmp_path / "checkpoints")
    kls, fracs = [], []
    with torch.no_grad():
        for first in range(0, t.eval_batches * t.micro_batch_size, t.micro_batch_size):
            b = collate([valid_ds[i] for i in range(first, first + t.micro_batch_size)])
            valid = (b["loss_mask"] > 0) | (b["tokens"] == tok.eos_token_id)
            rt = DMSRuntime(mode="hard")
            with dms_forward(student, rt):
                s = student(b["tokens"], b["position_ids"], None)[..., :mc.vocab_size]
            tl = teacher(b["tokens"], b["position_ids"], None)[..., :mc.vocab_size]
            kls.append(_hand_kl(s, tl, b["loss_mask"].double(), "student_teacher"))
            # key slots by hand: key t (a real token) is evicted iff position t + 1 is real and its logit is > 0;
            # pooled over layers, KV heads, keys and micro batches
            for lg in rt.logits.values():  # [b, ng, s]
                both = (valid[:, 1:] & valid[:, :-1])[:, None]
                fracs.append((float(((lg[..., 1:] > 0) & both).sum()), float(valid.sum()) * lg.shape[1]))
    frac = sum(e for e, _ in fracs) / sum(n for _, n in fracs)
    assert 0 < frac < 1  # some keys evicted, some kept: the comparison is not of two zeros
    assert logged["valid/kd_loss"] == pytest.approx(sum(kls) / len(kls), rel=1e-4, abs=1e-7)
    assert logged["valid/evicted_fraction"] == pytest.approx(frac, rel=1e-5)
    assert logged["valid/achieved_cr"] == pytest.approx(1 / (1 - frac), rel=1e-5)


def test_a_longer_resumed_run_decays_its_learning_rate_over_the_new_length(assets, tmp_path):
    """resume.allow_changes=[train.steps]: the checkpoint gives the step count, the schedule follows the new
    train.steps (not the checkpointed decay length, which would hold the rate at min_lr)."""
    run_refit(_cfg(assets, save_interval=STEPS), tmp_path)
    longer = STEPS + 3
    d = _cfg(assets, steps=longer, save_interval=STEPS).to_dict()
    d["resume"]["allow_changes"] = ["train.steps"]
    from dms_megatron.config import RefitConfig

    run_refit(RefitConfig.from_dict(d), tmp_path)
    m = _metrics(tmp_path)
    assert [x["step"] for x in m] == list(range(1, longer + 1))
    for k in range(STEPS, longer):
        ratio = (k - WARMUP) / (longer - WARMUP)
        lr = MIN_LR + 0.5 * (math.cos(math.pi * ratio) + 1) * (LR - MIN_LR)
        assert m[k]["lr"] == pytest.approx(lr, rel=1e-6), k
    assert m[STEPS]["lr"] > 1.5 * MIN_LR


def test_report_stage_recall_and_cr_match_an_unpadded_one_rank_forward(assets, tmp_path):
    """The report stage (micro batches padded to train.seq_length, vocabulary-parallel argmax through the schedule)
    against each held-out item run alone, unpadded, with a plain argmax over the real vocabulary."""
    from dms_megatron.data.recall import read_items
    from dms_megatron.megatron.runtime import DMSRuntime, dms_forward

    cfg = _cfg(assets, eval_interval=2, eval_batches=2, recall_eval_limit=5)  # 5 items: one micro batch half empty
    report = run_refit(cfg, tmp_path)
    logged = _metrics(tmp_path)[-1]
    assert (report["kl_to_teacher"], report["achieved_cr"]) == (logged["valid/kd_loss"], logged["valid/achieved_cr"])
    assert report["kept_fraction"] == pytest.approx(1 - logged["valid/evicted_fraction"], rel=1e-12)
    _, _, _, teacher, student = _reference(assets, cfg, tmp_path, tmp_path / "checkpoints")
    items = read_items(assets["recall"], cfg.train.recall_eval_limit)
    hits = {"teacher": 0, "student": 0}
    with torch.no_grad():
        for it in items:
            tokens = torch.tensor([it["ids"]])
            pos = torch.arange(tokens.shape[1])[None]
            with dms_forward(student, DMSRuntime(mode="hard")):
                s = student(tokens, pos, None)[0, :, :cfg.model.vocab_size].argmax(-1)
            t = teacher(tokens, pos, None)[0, :, :cfg.model.vocab_size].argmax(-1)
            for p in it["answers"]:
                hits["student"] += int(s[p - 1]) == it["ids"][p]
                hits["teacher"] += int(t[p - 1]) == it["ids"][p]
    n = sum(len(it["answers"]) for it in items)
    assert report["recall_answers"] == n > 0
    assert report["student_recall_acc"] == pytest.approx(hits["student"] / n, abs=1e-12)
    assert report["teacher_recall_acc"] == pytest.approx(hits["teacher"] / n, abs=1e-12)
