"""Dist-checkpoint resharding: a training checkpoint (model + Adam moments, DMS adapter included) saved at
tp=2 x pp=2 loads at tp=pp=1 and one saved at tp=pp=1 loads at tp=2 x pp=2; each rank's loaded shards, merged by hand
(tensor-parallel shards concatenated along their partition dim, SwiGLU halves re-paired, pipeline layers renumbered),
equal what the other layout loads. Loading is strict."""

import glob

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


def _load_one_rank(d, ckpt):
    from dms_megatron.megatron.model import build_gpt_model
    from dms_megatron.checkpoint import load_checkpoint
    from dms_megatron.config import RefitConfig
    from dms_megatron.training.optim import build_optimizer, build_scheduler, wrap_ddp

    cfg = RefitConfig.from_dict(d)
    ddp = wrap_ddp(build_gpt_model(cfg.model, cfg.dms, seq_length=cfg.train.seq_length))
    opt = build_optimizer(ddp, cfg.train)
    load_checkpoint(ckpt, ddp, opt, build_scheduler(opt, cfg.train))
    return _merge([local_shards(ddp, opt, cfg.model.num_layers)])


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

    def dumps(prefix):
        return [torch.load(f, weights_only=False) for f in sorted(glob.glob(f"{prefix}.rank*"))]

    # tp2 x pp2 -> one rank: what one rank loads equals the 4 ranks' own shards of the same checkpoint
    four_native, four_on_one = _merge(dumps(tmp_path / "four.pt")), _load_one_rank(d1, tmp_path / "four" / "checkpoints")
    _same(four_native, four_on_one)
    # one rank -> tp2 x pp2
    _same(_load_one_rank(d1, one / "checkpoints"), _merge(dumps(tmp_path / "one.pt")))
    # the DMS adapter is trained (non-zero after Adam steps) and sharded by KV head over tp
    alpha = four_native["decoder.layers.1.self_attention.dms_alpha_proj.weight"]["w"]
    assert alpha.shape[0] == d1["model"]["num_query_groups"] and float(alpha.abs().min()) > 0
    per_rank = [d["tensors"]["decoder.layers.1.self_attention.dms_alpha_proj.weight"]
                for d in dumps(tmp_path / "four.pt") if d["pp_rank"] == 1]
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
