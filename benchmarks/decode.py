"""Decode-step latency and KV reads at a long context: vanilla cache vs DMS physical eviction.

A random adapter-DMS model whose decisions are scripted through the weights: embedding dimension 0 is +1 for
tokens with id % KEEP_EVERY != 0 and -1 otherwise, every layer's adapter reads that dimension, so tokens are
evicted (delayed by the window) except one in KEEP_EVERY: an achieved compression near KEEP_EVERY at long context.
The same weights run once with the vanilla press (nothing evicted) and once with the DMS press.

  python benchmarks/decode.py                       # 4K context, batch 4
  python benchmarks/decode.py --context 512 --steps 8 --json out.json

Goal (issue): DMS reads <= 1/7 of vanilla's KV tokens per decode step at CR 8, and a lower step latency.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from dms_megatron.config import DMSConfig, ModelConfig
from dms_megatron.inference import DecoderModel, Engine, make_press
from dms_megatron.convert.mapping import hf_tensor_shapes
from dms_megatron.eval.harness import pooled_cr

KEEP_EVERY = 9       # one token in 9 survives eviction -> CR ~ 8 at 4K with window 16
WINDOW = 16
VOCAB = 512


def scripted_model(layers: int, hidden: int, heads: int, kv_heads: int, ffn: int, max_len: int) -> DecoderModel:
    mc = ModelConfig(num_layers=layers, hidden_size=hidden, ffn_hidden_size=ffn, num_attention_heads=heads,
                     num_query_groups=kv_heads, vocab_size=VOCAB, max_position_embeddings=max_len, family="llama",
                     kv_channels=None, tie_embeddings=False)
    dms = DMSConfig(window=WINDOW, alpha_source="adapter")
    g = torch.Generator().manual_seed(0)
    sd = {}
    for name, shape in hf_tensor_shapes(mc, dms).items():
        sd[name] = torch.ones(shape) if name.endswith("norm.weight") else 0.02 * torch.randn(shape, generator=g)
    emb = sd["model.embed_tokens.weight"]
    emb[:, 0] = torch.where(torch.arange(VOCAB) % KEEP_EVERY == 0, -1.0, 1.0)
    for i in range(layers):
        proj = torch.zeros(kv_heads, hidden)
        proj[:, 0] = 1.0
        sd[f"model.layers.{i}.self_attn.dms_proj_alpha.weight"] = proj
    return DecoderModel(mc, sd, dms)


def run(model: DecoderModel, press_name: str, context: int, batch: int, steps: int, chunk: int) -> dict:
    press = make_press(press_name, window=WINDOW)
    engine = Engine(model, press, chunk_size=chunk, max_length=context + steps + 1)
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, VOCAB, (batch, context), generator=g)
    s = engine.new_session(batch)
    t0 = time.perf_counter()
    for r in range(batch):
        engine.prefill(s, r, prompts[r])
    prefill_s = time.perf_counter() - t0
    rows = list(range(batch))
    toks = torch.randint(0, VOCAB, (steps, batch), generator=g)
    lat = []
    for t in range(steps):
        t1 = time.perf_counter()
        engine.decode(s, rows, toks[t].tolist())
        lat.append(time.perf_counter() - t1)
    m = engine.summary(s)
    reads = sum(x["kv_reads"] for x in m) / (steps * batch)
    return {"press": press_name, "prefill_s": prefill_s, "step_ms_median": 1e3 * statistics.median(lat),
            "kv_reads_per_step_per_seq": reads, "peak_resident_per_seq": max(x["peak_resident"] for x in m),
            "achieved_cr": pooled_cr(m), "cr_final": statistics.mean(x["cr_final"] for x in m),
            "cr_reads": statistics.mean(x["cr_reads"] for x in m)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=1024)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: stable timings on a shared CPU)")
    p.add_argument("--json", default=None, help="also write the results to this file")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    model = scripted_model(a.layers, a.hidden, a.heads, a.kv_heads, a.ffn, a.context + a.steps + 1)
    res = {"context": a.context, "batch": a.batch, "steps": a.steps, "window": WINDOW,
           "threads": torch.get_num_threads()}
    for name in ("vanilla", "dms"):
        res[name] = run(model, name, a.context, a.batch, a.steps, a.chunk)
        print(json.dumps(res[name]), flush=True)
    res["reads_ratio"] = res["dms"]["kv_reads_per_step_per_seq"] / res["vanilla"]["kv_reads_per_step_per_seq"]
    res["latency_ratio"] = res["dms"]["step_ms_median"] / res["vanilla"]["step_ms_median"]
    print(f"DMS / vanilla at {a.context} context: KV reads {res['reads_ratio']:.3f} (goal <= {1 / 7:.3f}), "
          f"step latency {res['latency_ratio']:.3f} (goal < 1); achieved CR {res['dms']['achieved_cr']:.2f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    return res


if __name__ == "__main__":
    main()
