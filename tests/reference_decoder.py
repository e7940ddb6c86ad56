"""An independent, deliberately plain re-implementation of a Llama-style decoder that reads megatron weights.

Used by tests as the reference for (a) the borrowed-neuron student without eviction and (b) step-by-step decoding
with a KV cache from which flagged tokens are physically removed once they leave the window. It shares no code
with the package: its own RMSNorm, RoPE, fused-QKV split, SwiGLU and the eviction bookkeeping as python lists.
"""

from __future__ import annotations

import math

import torch


def rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rope(x, pos, base):
    """x [..., hn] at integer position ``pos``; rotate-half (non-interleaved) RoPE."""
    hn = x.shape[-1]
    inv = 1.0 / (base ** (torch.arange(0, hn, 2, dtype=torch.float64) / hn))
    ang = pos * inv
    cos = torch.cat([ang.cos(), ang.cos()]).to(x.dtype)
    sin = torch.cat([ang.sin(), ang.sin()]).to(x.dtype)
    x1, x2 = x[..., : hn // 2], x[..., hn // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


class ReferenceDecoder:
    """Token-by-token decoder over megatron parameter names (tp=1 state dict)."""

    def __init__(self, sd, cfg, *, qneuron=False, adapter=False, window=None, scale=100.0, offset=5.0,
                 evict=False):
        self.sd = {k: v.detach().double() for k, v in sd.items() if not k.endswith("_extra_state")}
        self.cfg = cfg
        self.qneuron = qneuron
        self.adapter = adapter
        self.evict = evict
        self.window = window
        self.scale, self.offset = scale, offset
        self.np, self.ng, self.hn = cfg.num_attention_heads, cfg.num_query_groups, cfg.kv_channels
        self.g = self.np // self.ng
        L = cfg.num_layers
        # cache[layer][kv_head] = list of dicts {pos, k, v, flagged}
        self.cache = [[[] for _ in range(self.ng)] for _ in range(L)]
        self.pos = 0
        self.resident_history = []
        self.decision_flags = [[] for _ in range(L)]  # per layer, per step: [decision > 0 for each KV head]

    def _p(self, name):
        return self.sd[name]

    def step(self, token: int) -> torch.Tensor:
        """Feed one token; returns the next-token logits [vocab] (double)."""
        cfg, t = self.cfg, self.pos
        h = self._p("embedding.word_embeddings.weight")[token]
        for li in range(cfg.num_layers):
            pre = f"decoder.layers.{li}."
            x = rms(h, self._p(pre + "self_attention.linear_qkv.layer_norm_weight")
                    if pre + "self_attention.linear_qkv.layer_norm_weight" in self.sd
                    else self._p(pre + "input_layernorm.weight"), cfg.norm_epsilon)
            qkv = self._p(pre + "self_attention.linear_qkv.weight") @ x
            if pre + "self_attention.linear_qkv.bias" in self.sd:
                qkv = qkv + self._p(pre + "self_attention.linear_qkv.bias")
            qkv = qkv.view(self.ng, self.g + 2, self.hn)
            q = qkv[:, : self.g].reshape(self.np, self.hn)
            k = qkv[:, self.g]
            v = qkv[:, self.g + 1]
            if cfg.qk_layernorm:
                q = rms(q, self._p(pre + "self_attention.q_layernorm.weight"), cfg.norm_epsilon)
                k = rms(k, self._p(pre + "self_attention.k_layernorm.weight"), cfg.norm_epsilon)
            decisions = None
            if self.adapter:  # Linear(RMSNorm(pre-norm residual stream))
                a = rms(h, self._p(pre + "self_attention.dms_alpha_norm.weight"), cfg.norm_epsilon)
                a = self._p(pre + "self_attention.dms_alpha_proj.weight") @ a
                decisions = [float(a[gi]) * self.scale - self.offset for gi in range(self.ng)]
            if self.qneuron:
                decisions = [float(q[gi * self.g, -1]) * self.scale - self.offset for gi in range(self.ng)]
                q = q.clone()
                for gi in range(self.ng):
                    q[gi * self.g, -1] = 0.0
            q = rope(q, t, cfg.rotary_base)
            k = rope(k, t, cfg.rotary_base)
            if self.qneuron:
                for gi in range(self.ng):
                    q[gi * self.g, -1] = 0.0
            if decisions is not None:
                self.decision_flags[li].append([d > 0 for d in decisions])
            heads = []
            for gi in range(self.ng):
                entries = self.cache[li][gi]
                if self.evict and decisions is not None and entries and decisions[gi] > 0:
                    entries[-1]["flagged"] = True  # the decision made at t is about token t-1
                entries.append({"pos": t, "k": k[gi], "v": v[gi], "flagged": False})
                if self.evict:
                    # physically drop flagged tokens that are now more than `window` positions behind
                    self.cache[li][gi] = entries = [e for e in entries
                                                    if not (e["flagged"] and t - e["pos"] > self.window)]
                ks = torch.stack([e["k"] for e in entries])
                vs = torch.stack([e["v"] for e in entries])
                for j in range(self.g):
                    qh = q[gi * self.g + j]
                    p = torch.softmax(ks @ qh / math.sqrt(self.hn), 0)
                    heads.append(p @ vs)
            attn = torch.cat(heads)
            h = h + self._p(pre + "self_attention.linear_proj.weight") @ attn
            y = rms(h, self._p(pre + "pre_mlp_layernorm.weight")
                    if pre + "pre_mlp_layernorm.weight" in self.sd
                    else self._p(pre + "mlp.linear_fc1.layer_norm_weight"), cfg.norm_epsilon)
            gate_up = self._p(pre + "mlp.linear_fc1.weight") @ y
            gate, up = gate_up.chunk(2)
            h = h + self._p(pre + "mlp.linear_fc2.weight") @ (torch.nn.functional.silu(gate) * up)
        h = rms(h, self._p("decoder.final_layernorm.weight"), cfg.norm_epsilon)
        out_w = self.sd.get("output_layer.weight", self._p("embedding.word_embeddings.weight"))
        self.pos += 1
        self.resident_history.append(sum(len(c) for layer in self.cache for c in layer))
        return out_w @ h

    def run(self, tokens) -> torch.Tensor:
        """Teacher-forced decode of a 1-D token list; returns [T, vocab] logits."""
        return torch.stack([self.step(int(tok)) for tok in tokens])
