"""DMS inside megatron-core GPT models vs stock megatron and an independent step-by-step reference decoder."""

import pytest
import torch

from conftest import TINY_SEQ, TINY_VOCAB, tiny_model_config
from reference_decoder import ReferenceDecoder

from dms_megatron.config import DMSConfig
from dms_megatron.families import FAMILIES
from dms_megatron.core.losses import compression_loss

BATCH = 2
WINDOW = 3
STEPS_TO_MOVE = 60


def _build(model_cfg, dms_cfg, seed=0):
    """Deterministic whatever ran before: megatron initialises weights from its own model-parallel RNG stream."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from dms_megatron.megatron.model import build_gpt_model

    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    return build_gpt_model(model_cfg, dms_cfg, seq_length=TINY_SEQ)


def _tokens(seed=0, b=BATCH, s=TINY_SEQ):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, TINY_VOCAB, (b, s), generator=g)
    return ids, torch.arange(s)[None].expand(b, -1)


def _forward(model, runtime=None):
    """A stock model takes no runtime; a DMS model runs under one (its only source of mode)."""
    import contextlib

    from dms_megatron.megatron.runtime import dms_forward

    ids, pos = _tokens()
    with dms_forward(model, runtime) if runtime is not None else contextlib.nullcontext():
        return model(ids, pos, None)


def _student_from(stock, model_cfg, dms_cfg):
    student = _build(model_cfg, dms_cfg, seed=1)
    missing, unexpected = student.load_state_dict(stock.state_dict(), strict=False)
    assert not unexpected and all("dms_alpha" in k for k in missing)
    return student


@pytest.mark.parametrize("family", list(FAMILIES))
def test_stock_megatron_matches_reference_decoder(megatron_single, family):
    cfg = tiny_model_config(**FAMILIES[family].config_fields())
    stock = _build(cfg, None)
    if cfg.add_qkv_bias:  # megatron zero-initialises biases: make them matter
        with torch.no_grad():
            for n, p in stock.named_parameters():
                if n.endswith("linear_qkv.bias"):
                    p.normal_(0, 0.5)
    ids, _ = _tokens()
    logits = _forward(stock)[0, :, :TINY_VOCAB].double()
    ref = ReferenceDecoder(stock.state_dict(), cfg).run(ids[0])[:, :TINY_VOCAB]
    assert torch.allclose(logits, ref, atol=1e-4)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("source", ["qneuron", "adapter"])
def test_teacher_runtime_mode_equals_stock_model(megatron_single, family, source):
    cfg = tiny_model_config(**FAMILIES[family].config_fields())
    stock = _build(cfg, None)
    from dms_megatron.megatron.runtime import DMSRuntime

    teacher = _student_from(stock, cfg, DMSConfig(window=WINDOW, alpha_source=source))
    assert torch.allclose(_forward(teacher, DMSRuntime(mode="teacher")), _forward(stock), atol=1e-6, rtol=0)


def test_a_dms_layer_outside_a_dms_forward_refuses_to_guess_its_mode(megatron_single):
    from dms_megatron.megatron.runtime import DMSRuntime, dms_forward

    student = _build(tiny_model_config(), DMSConfig(window=WINDOW))
    ids, pos = _tokens()
    with pytest.raises(RuntimeError, match="ran outside a DMS forward"):
        student(ids, pos, None)
    with dms_forward(student, DMSRuntime(mode="hard")):
        student(ids, pos, None)  # and the runtime is unbound again afterwards:
    with pytest.raises(RuntimeError, match="ran outside a DMS forward"):
        student(ids, pos, None)


def test_the_layer_hand_offs_refuse_miswiring():
    """Decision logits pass self-attention -> core attention once per forward of a layer; the adapter reads the
    layer's input only while the layer holds it; both through the forward's runtime, keyed by layer."""
    from dms_megatron.megatron.runtime import DMSRuntime

    rt = DMSRuntime(mode="hard")
    with pytest.raises(RuntimeError, match="without decision logits"):
        rt.take_decisions(1)
    x = torch.ones(2, 1, 1)
    rt.send_decisions(1, x)
    with pytest.raises(RuntimeError, match="sent twice"):
        rt.send_decisions(1, x)
    rt.send_decisions(2, None)  # another layer's slot is its own
    assert rt.take_decisions(1) is x
    with pytest.raises(RuntimeError, match="without decision logits"):
        rt.take_decisions(1)
    assert rt.take_decisions(2) is None  # teacher mode: no logits, still exactly one hand-off

    with pytest.raises(RuntimeError, match="needs the pre-norm hidden states"):
        rt.layer_input(1)
    with rt.holding_input(1, x):
        assert rt.layer_input(1) is x
        with pytest.raises(RuntimeError, match="held twice"):
            with rt.holding_input(1, x):
                pass
        with pytest.raises(RuntimeError, match="needs the pre-norm hidden states"):
            rt.layer_input(2)
    with pytest.raises(RuntimeError, match="needs the pre-norm hidden states"):
        rt.layer_input(1)


def test_an_adapter_attention_outside_its_dms_layer_refuses_to_run(megatron_single):
    """The adapter's self-attention run without the DMSTransformerLayer that holds its input raises (it never reads
    stale hidden states of an earlier call)."""
    from dms_megatron.megatron.runtime import DMSRuntime, dms_forward

    student = _build(tiny_model_config(), DMSConfig(window=WINDOW, alpha_source="adapter"))
    ids, pos = _tokens()
    with dms_forward(student, DMSRuntime(mode="hard")):
        student(ids, pos, None)
        layer = student.decoder.layers[0]
        h = torch.zeros(TINY_SEQ, BATCH, layer.config.hidden_size)
        with pytest.raises(RuntimeError, match="needs the pre-norm hidden states"):
            layer.self_attention(h, None)


def test_qneuron_student_without_eviction_is_the_model_minus_the_borrowed_neuron(megatron_single):
    """With a window >= sequence length no eviction can happen, so the student differs from the teacher exactly
    by the borrowed neuron (last dim of the first query head of each group), which is zeroed before and after RoPE.
    The reference decoder zeroes it independently; train (soft) and hard modes must both match it."""
    from dms_megatron.megatron.runtime import DMSRuntime

    cfg = tiny_model_config()
    stock = _build(cfg, None)
    student = _student_from(stock, cfg, DMSConfig(window=TINY_SEQ, alpha_source="qneuron"))
    ids, _ = _tokens()
    ref = ReferenceDecoder(stock.state_dict(), cfg, qneuron=True).run(ids[0])[:, :TINY_VOCAB]
    for mode in ("train", "hard"):
        got = _forward(student, DMSRuntime(mode=mode))[0, :, :TINY_VOCAB].double()
        assert torch.allclose(got, ref, atol=1e-4), mode
    teacher_logits = _forward(stock)[0, :, :TINY_VOCAB].double()
    assert not torch.allclose(teacher_logits, ref, atol=1e-4)  # the neuron matters


@pytest.mark.parametrize("source", ["qneuron", "adapter"])
def test_hard_forward_equals_decode_with_physical_eviction(megatron_single, source):
    from dms_megatron.megatron.runtime import DMSRuntime

    cfg = tiny_model_config()
    stock = _build(cfg, None)
    student = _student_from(stock, cfg, DMSConfig(window=WINDOW, alpha_source=source))
    if source == "adapter":  # zero-initialised adapter evicts nothing: give it random weights
        with torch.no_grad():
            for n, p in student.named_parameters():
                if n.endswith("dms_alpha_proj.weight"):
                    p.normal_(0, 0.05)
    rt = DMSRuntime(mode="hard")
    logits = _forward(student, rt)
    ids, _ = _tokens()
    frac = torch.stack([rt.fractions[k] for k in sorted(rt.fractions)]).mean(0)  # [b], recorded by the layers
    for b in range(BATCH):
        ref = ReferenceDecoder(student.state_dict(), cfg, qneuron=source == "qneuron", adapter=source == "adapter",
                               window=WINDOW, evict=True)
        ref_logits = ref.run(ids[b])[:, :TINY_VOCAB]
        assert torch.allclose(logits[b, :, :TINY_VOCAB].double(), ref_logits, atol=1e-4)
        full = cfg.num_layers * cfg.num_query_groups * TINY_SEQ
        assert ref.resident_history[-1] < 0.8 * full, "the test must exercise eviction"
        # the recorded evicted fraction counts the reference decoder's own flags (core.compression's rule): key
        # t is evicted by step t + 1's decision (step 0's concerns no key, the last key is kept), over all keys
        ref_flags = torch.tensor(ref.decision_flags, dtype=torch.float64)  # [layers, steps, ng]
        assert abs(float(frac[b]) - float(ref_flags[:, 1:].sum() / ref_flags.numel())) < 1e-6  # 1 of 96: 0.01


@pytest.mark.parametrize("source", ["qneuron", "adapter"])
def test_gradients_reach_alpha_source(megatron_single, source):
    from dms_megatron.megatron.runtime import DMSRuntime

    cfg = tiny_model_config()
    student = _build(cfg, DMSConfig(window=WINDOW, alpha_source=source))
    rt = DMSRuntime(mode="train")
    _forward(student, rt)
    compression_loss(rt.mean_fraction(), 0.9).backward()
    if source == "adapter":
        grads = [p.grad for n, p in student.named_parameters() if n.endswith("dms_alpha_proj.weight")]
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    else:
        g_, hn = cfg.gqa_factor, cfg.kv_channels
        rows_per_group = (g_ + 2) * hn
        borrowed = [gi * rows_per_group + hn - 1 for gi in range(cfg.num_query_groups)]
        for n, p in student.named_parameters():
            if n.endswith("linear_qkv.weight"):
                assert p.grad[borrowed].abs().sum() > 0
        # in the last layer nothing downstream depends on the queries: only the borrowed rows get gradient
        last = dict(student.named_parameters())[f"decoder.layers.{cfg.num_layers - 1}.self_attention.linear_qkv.weight"]
        others = [r for r in range(last.shape[0]) if r not in borrowed]
        assert last.grad[others].abs().sum() == 0


@pytest.mark.parametrize("source", ["qneuron", "adapter"])
def test_compression_loss_raises_evicted_fraction(megatron_single, source):
    from dms_megatron.megatron.runtime import DMSRuntime

    cfg = tiny_model_config()
    student = _build(cfg, DMSConfig(window=WINDOW, alpha_source=source))
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    fracs = []
    for step in range(STEPS_TO_MOVE):
        rt = DMSRuntime(mode="train", step=step)
        _forward(student, rt)
        frac = rt.mean_fraction()
        fracs.append(frac.mean().item())
        opt.zero_grad()
        compression_loss(frac, 0.75).backward()
        opt.step()
    # starts below the 0.75 target (q-neuron: random-init decisions; adapter: logit -5 -> nothing evicted)
    assert fracs[0] < 0.5 and fracs[-1] > 0.7, fracs


def test_flex_backend_matches_dense_through_the_model(megatron_single):
    from dms_megatron.megatron.runtime import DMSRuntime

    cfg = tiny_model_config()
    stock = _build(cfg, None)
    dense = _student_from(stock, cfg, DMSConfig(window=WINDOW, alpha_source="qneuron", backend="dense"))
    flex = _student_from(stock, cfg, DMSConfig(window=WINDOW, alpha_source="qneuron", backend="flex"))
    for mode in ("train", "hard"):
        with torch.no_grad():  # FlexAttention has no backward on CPU
            a = _forward(dense, DMSRuntime(mode=mode, seed=3, step=5))
            b = _forward(flex, DMSRuntime(mode=mode, seed=3, step=5))
        assert torch.allclose(a, b, atol=1e-5), mode


def test_train_mode_noise_depends_on_step_and_is_reproducible(megatron_single):
    from dms_megatron.megatron.runtime import DMSRuntime

    cfg = tiny_model_config()
    student = _build(cfg, DMSConfig(window=WINDOW, alpha_source="qneuron"))
    a = _forward(student, DMSRuntime(mode="train", step=1))
    b = _forward(student, DMSRuntime(mode="train", step=1))
    c = _forward(student, DMSRuntime(mode="train", step=2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_reinitialising_the_groups_does_not_pile_up_threads(megatron_single):
    """Each megatron set-up creates gloo groups with their own threads (51 at tp = pp = 1); a re-initialisation in
    the same process (the tests' shared process, a loader after a trainer) must free the previous ones."""
    import os

    from dms_megatron.megatron.distributed import init_process_groups

    def threads() -> int:
        return len(os.listdir("/proc/self/task"))

    init_process_groups(1, 1, seed=1234)
    before = threads()
    for _ in range(3):
        init_process_groups(1, 1, seed=1234)
    assert threads() <= before, f"{threads() - before} threads more after 3 re-initialisations"
