"""Dist-checkpoint resharding: a training checkpoint (model + Adam moments, DMS adapter included) saved at
tp=2 x pp=2 loads at tp=pp=1 and one saved at tp=pp=1 loads at tp=2 x pp=2; each rank's loaded shards, merged by hand
(tensor-parallel shards concatenated along their partition dim, SwiGLU halves re-paired, pipeline layers renumbered),
equal what the other layout loads. Loading is strict. The distributed optimizer's checkpoint (dp 2) resumes bit for
bit and loads at other layouts."""

import glob
import json
import shutil

import pytest
import torch

from parallel_harness import local_shards
from spawn_util import torchrun_harness
from test_parallel_refit import _cfg_dict, _run_one_rank

pytestmark = pytest.mark.parallel


def _merge(dumps: list) -> dict:
    """Full tensors {name: {"w", "exp_avg", "exp_avg_sq"}} from the ranks' local shards (first data-parallel copy)."""
    by_name = {}
    for d in dumps:
        if d["dp_rank"] != 0:
            continue
        for name, e in d["tensors"].items():
            by_name.setdefault(name, {})[d["tp_rank"]] = e
    out = {}
    for name, shards in by_name.items():
        ranks = [shards[r] for r in sorted(shards)]
        dim = ranks[0]["tp_dim"]
        merged = {}
        for key in ("w", "exp_avg", "exp_avg_sq"):
            parts = [e[key] for e in ranks]
            if dim is None:  # replicated over tp: every rank holds the same tensor
                for p in parts[1:]:
                    assert torch.equal(p, parts[0]), (name, key)
                merged[key] = parts[0]
            elif name.endswith("mlp.linear_fc1.weight"):  # [gate_r; up_r] per rank -> [gate; up]
                halves = [p.chunk(2, dim=dim) for p in parts]
                merged[key] = torch.cat([torch.cat([h[0] for h in halves], dim), torch.cat([h[1] for h in halves], dim)],
                                        dim)
            else:
                merged[key] = torch.cat(parts, dim=dim)
        out[name] = merged
    return out


def _dumps(prefix) -> list:
    """The ranks' dumps of a harness run (``--dump`` / ``--load``), in rank order."""
    return [torch.load(f, weights_only=False) for f in sorted(glob.glob(f"{prefix}.rank*"))]


def _load_one_rank(d, ckpt):
    from dms_megatron.megatron.model import build_gpt_model
    from dms_megatron.checkpoint import load_checkpoint
    from dms_megatron.config import RefitConfig
    from dms_megatron.training.optim import build_optimizer, build_scheduler, wrap_ddp

    cfg = RefitConfig.from_dict(d)
    ddp = wrap_ddp(build_gpt_model(cfg.model, cfg.dms, seq_length=cfg.train.seq_length),
                   cfg.train.distributed_optimizer)
    opt = build_optimizer(ddp, cfg.train)
    load_checkpoint(ckpt, ddp, opt, build_scheduler(opt, cfg.train))
    return _merge([local_shards(ddp.module, opt, cfg.model.num_layers)])


def _same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        for key in ("w", "exp_avg", "exp_avg_sq"):
            assert a[name][key] is not None and torch.equal(a[name][key], b[name][key]), (name, key)


def test_checkpoint_reshards_between_tp2pp2_and_one_rank(assets, tmp_path):
    from dms_megatron.checkpoint import CheckpointError

    adapter = dict(alpha_source="adapter")
    d1, d4 = _cfg_dict(assets, steps=2, **adapter), _cfg_dict(assets, tp=2, pp=2, steps=2, **adapter)
    one = _run_one_rank(d1, tmp_path / "one")
    torchrun_harness(4, d4, tmp_path, "--run-dir", tmp_path / "four")
    torchrun_harness(4, d4, tmp_path, "--load", tmp_path / "four" / "checkpoints", tmp_path / "four.pt",
              "--load", one / "checkpoints", tmp_path / "one.pt")

    # tp2 x pp2 -> one rank: what one rank loads equals the 4 ranks' own shards of the same checkpoint
    four_native = _merge(_dumps(tmp_path / "four.pt"))
    four_on_one = _load_one_rank(d1, tmp_path / "four" / "checkpoints")
    _same(four_native, four_on_one)
    # one rank -> tp2 x pp2
    _same(_load_one_rank(d1, one / "checkpoints"), _merge(_dumps(tmp_path / "one.pt")))
    # the DMS adapter is trained (non-zero after Adam steps) and sharded by KV head over tp
    alpha = four_native["decoder.layers.1.self_attention.dms_alpha_proj.weight"]["w"]
    assert alpha.shape[0] == d1["model"]["num_query_groups"] and float(alpha.abs().min()) > 0
    per_rank = [d["tensors"]["decoder.layers.1.self_attention.dms_alpha_proj.weight"]
                for d in _dumps(tmp_path / "four.pt") if d["pp_rank"] == 1]
    assert {e["tp_dim"] for e in per_rank} == {0} and all(e["w"].shape[0] == 1 for e in per_rank)
    # strict: a q-neuron student cannot silently load into an adapter student (its adapter tensors are missing)
    with pytest.raises(CheckpointError):
        _load_one_rank(_cfg_dict(assets, steps=2, alpha_source="adapter"),
                       _run_one_rank(_cfg_dict(assets, steps=1), tmp_path / "qneuron") / "checkpoints")


@pytest.fixture(scope="module")
def assets(tmp_path_factory, megatron_single):
    from refit_fixtures import shared_assets

    return shared_assets(tmp_path_factory)


def test_dp2_fully_parallel_async_checkpoint_loads_exactly_at_one_rank_and_at_dp2(assets, tmp_path):
    """At dp=2 the replicas split the save (megatron's fully parallel save strategy), here with the
    trainer's background saves (train.async_save=true): what two ranks load equals what one rank loads, and the
    final checkpoint is ``latest``."""
    from dms_megatron.checkpoint import latest_iteration

    d2 = _cfg_dict(assets, steps=2)
    d2["train"].update(async_save=True, save_interval=1, global_batch_size=4, micro_batch_size=2)
    d2["parallel"]["nproc_per_node"] = 2
    torchrun_harness(2, d2, tmp_path, "--run-dir", tmp_path / "dp2")
    ckpt = tmp_path / "dp2" / "checkpoints"
    assert latest_iteration(ckpt) == 2 and not list(ckpt.glob(".tmp*"))
    torchrun_harness(2, d2, tmp_path, "--load", ckpt, tmp_path / "dp2.pt")
    d1 = _cfg_dict(assets, steps=2)
    d1["train"].update(global_batch_size=4, micro_batch_size=2)
    on_one = _load_one_rank(d1, ckpt)
    for f in sorted(glob.glob(f"{tmp_path / 'dp2.pt'}.rank*")):  # each replica holds the whole model (tp=pp=1)
        dump = torch.load(f, weights_only=False)
        _same(on_one, _merge([dict(dump, dp_rank=0)]))


def _over_dp(dumps: list) -> list:
    """One dump per (tp, pp) rank, as dp rank 0, from the data-parallel replicas' dumps of a run: the weights are equal
    on every replica; the distributed optimizer's moments are put together from each replica's range (NaN outside
    it), which must hold every element exactly once."""
    groups: dict = {}
    for d in dumps:
        groups.setdefault((d["tp_rank"], d["pp_rank"]), []).append(d)
    out = []
    for reps in groups.values():
        merged = {}
        for name, first in reps[0]["tensors"].items():
            parts = [r["tensors"][name] for r in reps]
            assert all(torch.equal(e["w"], first["w"]) for e in parts), name
            merged[name] = dict(first)
            for key in ("exp_avg", "exp_avg_sq"):
                held = [~torch.isnan(e[key]) for e in parts]
                assert bool((sum(h.int() for h in held) == 1).all()), (name, key, "not on exactly one dp rank")
                value = torch.zeros_like(first[key])
                for e, h in zip(parts, held):
                    value[h] = e[key][h]
                merged[name][key] = value
        out.append(dict(reps[0], dp_rank=0, tensors=merged))
    return out


def _logged(run_dir, keys=("step", "loss", "kd_loss", "compression_loss", "evicted_fraction", "lr", "grad_norm")):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [[json.loads(ln)[k] for k in keys] for ln in lines if ln.strip()]


def _dist_opt_dict(assets, tp=1, nproc=2, sharding="fully_reshardable"):
    d = _cfg_dict(assets, tp=tp, steps=4)
    d["train"].update(distributed_optimizer=True, dist_optim_sharding=sharding, save_interval=2, eval_interval=0,
                      global_batch_size=4, micro_batch_size=2)
    d["parallel"]["nproc_per_node"] = nproc
    return d


def test_distributed_optimizer_checkpoint_resumes_bit_identically_and_loads_at_other_layouts(assets, tmp_path):
    """train.distributed_optimizer at dp 2 (each replica holds half of the Adam state): the step-2 checkpoint of an
    uninterrupted 4-step run, resumed in a new run dir, continues it bit for bit (logged numbers, weights and Adam
    moments after step 4), and its step-4 checkpoint loads at tp 2 x dp 1 and at one rank into the same weights and
    moments as the run held when it saved (its replicas' state, put together by hand). Both of megatron's formats:
    'fully_reshardable' (the default) and 'dp_reshardable' (the resumed run's saves; it loads at another dp only)."""
    from megatron.core import dist_checkpointing

    from dms_megatron.checkpoint import TRACKER, CheckpointError, iter_dir
    from dms_megatron.checkpoint.optim_state import load_metadata

    full, resumed = tmp_path / "full", tmp_path / "resumed"
    torchrun_harness(2, _dist_opt_dict(assets), tmp_path, "--run-dir", full, "--no-grads",
                     "--dump", tmp_path / "full.pt")
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(iter_dir(full / "checkpoints", 2), iter_dir(resumed / "checkpoints", 2))
    (resumed / "checkpoints" / TRACKER).write_text("2")
    torchrun_harness(2, _dist_opt_dict(assets, sharding="dp_reshardable"), tmp_path, "--run-dir", resumed,
                     "--no-grads", "--dump", tmp_path / "resumed.pt")
    assert _logged(resumed) == _logged(full)[2:] and len(_logged(full)) == 4
    saved = _merge(_over_dp(_dumps(tmp_path / "full.pt")))
    _same(saved, _merge(_over_dp(_dumps(tmp_path / "resumed.pt"))))
    for run, sharding, prefix, suffix in ((full, "fully_reshardable", "optimizer.state.exp_avg.", ""),
                                          (resumed, "dp_reshardable", "optimizer.distributed.", ".exp_avg")):
        d = iter_dir(run / "checkpoints", 4)
        assert dist_checkpointing.load_content_metadata(str(d))["distrib_optim_sharding_type"] == sharding
        keys = dist_checkpointing.load_tensors_metadata(str(d))
        assert any(k.startswith(prefix) and k.endswith(suffix) for k in keys), (sharding, sorted(keys)[:8])

    torchrun_harness(2, _dist_opt_dict(assets, tp=2), tmp_path, "--load", full / "checkpoints", tmp_path / "tp2.pt")
    _same(saved, _merge(_dumps(tmp_path / "tp2.pt")))
    one = _dist_opt_dict(assets, nproc=1)
    _same(saved, _load_one_rank(one, full / "checkpoints"))
    _same(saved, _load_one_rank(one, resumed / "checkpoints"))  # dp_reshardable: dp 2 -> dp 1
    # refused in one line: dp_reshardable at another tp x pp; a distributed optimizer's state into a plain optimizer
    with pytest.raises(CheckpointError, match="loads only at the tp x pp it was saved at"):
        load_metadata(resumed, {"distrib_optim_sharding_type": "dp_reshardable"}, [2, 1], distributed=True)
    plain = _dist_opt_dict(assets, nproc=1)
    plain["train"]["distributed_optimizer"] = False
    with pytest.raises(CheckpointError, match="train.distributed_optimizer=true"):
        _load_one_rank(plain, full / "checkpoints")
