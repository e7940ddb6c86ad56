"""Inference engine: chunked prefill and batched decode over a per-(sequence, KV head) cache managed by a press.

One step feeds S new tokens to each of n sequences (prefill: one sequence, S = chunk; decode: n sequences, S = 1).
Per layer: the model gives q, k, v and DMS decisions; the press turns decisions into eviction flags (the first new
token's decision flags the cached previous token); the new tokens are inserted; each query reads the live slots
visible under the delayed-eviction rule (and the press's read selection); then the press drops entries (DMS: flagged
tokens more than ``window`` behind the newest; budget methods: down to the budget). Sequences keep their own
lengths, so batches mix lengths and a sequence can be extended later (multi-turn: prefill -> decode -> prefill).

Metrics per sequence (``SequenceMetrics``): peak tokens resident (max after any step of the tokens held, summed over
layers and KV heads), cumulative KV tokens read during decode (summed over steps, layers, heads), the same two for a
vanilla cache, the achieved CR of ``core.compression`` (key slots / kept key slots: a token is evicted once flagged
or dropped, the newest token's decision is not made yet, so it counts as kept), the memory ratio at the end
(``cr_final``: vanilla / resident, flagged tokens still inside the window counted as held), the read ratio over
decode (``cr_reads``) and wall times.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch

import dms_megatron.inference.cache as kv
from dms_megatron.core.compression import achieved_cr
from dms_megatron.inference.model import DecoderModel
from dms_megatron.inference.press import Press
from dms_megatron.inference.press.vanilla import VanillaPress

NO_WINDOW = 1 << 62  # visibility window when no token is ever flagged


@dataclass
class SequenceMetrics:
    prompt_tokens: int = 0
    decoded_tokens: int = 0        # tokens fed through decode (the last sampled token is not fed)
    resident: int = 0              # tokens held now (layers x KV heads)
    peak_resident: int = 0
    kv_reads: int = 0              # decode only
    vanilla_reads: int = 0         # what a full cache would read over the same decode steps
    prefill_s: float = 0.0
    decode_s: float = 0.0

    def vanilla_resident(self, layers: int, kv_heads: int) -> int:
        return layers * kv_heads * (self.prompt_tokens + self.decoded_tokens)

    @property
    def cr_reads(self) -> float:
        """Achieved compression over decode: vanilla KV reads / actual KV reads."""
        return self.vanilla_reads / self.kv_reads if self.kv_reads else float("nan")


@dataclass
class Session:
    """The caches and per-sequence state of a batch. lengths [B]: tokens seen per sequence."""

    caches: List[kv.LayerCache]
    lengths: torch.Tensor
    metrics: List[SequenceMetrics] = field(default_factory=list)

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]


class Engine:
    """Runs a ``DecoderModel`` with a press. chunk_size: prefill tokens per forward; max_length: longest context
    (default the model's max_position_embeddings)."""

    def __init__(self, model: DecoderModel, press: Optional[Press] = None, *, chunk_size: int = 256,
                 max_length: Optional[int] = None) -> None:
        self.model = model
        self.press = press or VanillaPress()
        if self.press.needs_decisions and not model.decides:
            raise ValueError(f"press {self.press.name} needs a DMS model (decision logits); this model has none: load "
                             f"a DMS checkpoint (config.json with dms_* keys) or use press vanilla")
        if chunk_size < 1:
            raise ValueError(f"chunk_size={chunk_size} must be >= 1")
        self.chunk_size = chunk_size
        self.max_length = max_length or model.cfg.max_position_embeddings
        self.window = self.press.window if self.press.window is not None else NO_WINDOW

    # ------------------------------------------------------------------------------------------------------------
    def new_session(self, batch: int) -> Session:
        cfg = self.model.cfg
        caches = [kv.new_layer_cache(batch, cfg.num_query_groups, cfg.kv_channels, dtype=self.model.dtype)
                  for _ in range(cfg.num_layers)]
        return Session(caches, torch.zeros(batch, dtype=torch.long), [SequenceMetrics() for _ in range(batch)])

    def fork(self, session: Session, copies: int) -> Session:
        """A new session of B x ``copies`` sequences: row i of ``session`` becomes rows i * copies ..
        (i + 1) * copies - 1, each with a copy of its cache and metrics (e.g. W sampled chains continuing one shared
        prefill); ``session`` is left as it was."""
        if copies < 1:
            raise ValueError(f"fork: copies={copies} must be >= 1")
        caches = [kv.LayerCache(*(t.repeat_interleave(copies, dim=0) for t in (c.k, c.v, c.pos, c.flag, c.score)))
                  for c in session.caches]
        metrics = [dataclasses.replace(m) for m in session.metrics for _ in range(copies)]
        return Session(caches, session.lengths.repeat_interleave(copies), metrics)

    def _check_room(self, session: Session, row: int, extra: int, what: str) -> None:
        n = int(session.lengths[row])
        if n + extra > self.max_length:
            raise ValueError(f"{what}: sequence {row} would reach {n + extra} tokens ({n} in context + {extra} new), "
                             f"more than the maximum length {self.max_length}; shorten the input or raise "
                             f"max_length (the model supports {self.model.cfg.max_position_embeddings})")

    @torch.inference_mode()
    def _step(self, session: Session, rows: torch.Tensor, ids: torch.Tensor, decode: bool) -> torch.Tensor:
        """Feed ids [n, S] to sequences rows [n]; returns logits [n, S, vocab]."""
        model, press = self.model, self.press
        n, s = ids.shape
        positions = session.lengths[rows][:, None] + torch.arange(s)  # [n, S]
        newest = positions[:, -1]
        reads = torch.zeros(n, dtype=torch.long)
        all_rows = n == session.batch and bool((rows == torch.arange(n)).all())
        x = model.embed(ids).to(model.dtype)
        for i, cache in enumerate(session.caches):
            q, k, v, dec = model.attention_inputs(i, x, positions)
            flags = press.new_flags(cache, rows, positions, dec)
            kv.insert(cache, rows, k, v, positions, flags)
            vis = kv.visible(cache, rows, positions, self.window)  # [n, ng, S, cap]
            read = press.read_mask(cache, rows, q, vis)
            ks, vs = (cache.k, cache.v) if all_rows else (cache.k[rows], cache.v[rows])  # no copy for the full batch
            out, probs = _attend(q, ks, vs, read, model.softmax_scale)
            if decode:
                reads += read.sum(dim=(1, 2, 3))
            press.after_attention(cache, rows, probs, newest)
            x = model.layer_output(i, x, out)
        session.lengths[rows] += s
        held = sum(kv.resident(c)[rows] for c in session.caches)
        cfg = model.cfg
        for j, r in enumerate(rows.tolist()):
            m = session.metrics[r]
            m.resident = int(held[j])
            m.peak_resident = max(m.peak_resident, m.resident)
            if decode:
                m.kv_reads += int(reads[j])
                m.vanilla_reads += cfg.num_layers * cfg.num_query_groups * int(positions[j, -1] + 1)
        return model.head(x)

    # ------------------------------------------------------------------------------------------------------------
    def prefill(self, session: Session, row: int, ids: Sequence[int]) -> torch.Tensor:
        """Append ``ids`` to sequence ``row`` (a prompt or a later turn), in chunks; returns logits [S, vocab]."""
        ids = torch.as_tensor(list(ids) if not torch.is_tensor(ids) else ids, dtype=torch.long).reshape(-1)
        if ids.numel() == 0:
            raise ValueError(f"prefill: the prompt of sequence {row} is empty; give at least one token")
        self._check_room(session, row, ids.numel(), "prefill")
        t0 = time.perf_counter()
        rows = torch.tensor([row])
        outs = [self._step(session, rows, ids[None, a:a + self.chunk_size], decode=False)[0]
                for a in range(0, ids.numel(), self.chunk_size)]
        m = session.metrics[row]
        m.prompt_tokens += ids.numel()
        m.prefill_s += time.perf_counter() - t0
        return torch.cat(outs)

    def decode(self, session: Session, rows: Sequence[int], tokens: Sequence[int]) -> torch.Tensor:
        """One token for each sequence in ``rows`` (batched); returns logits [n, vocab]."""
        rows_t = torch.as_tensor(list(rows), dtype=torch.long)
        tok = torch.as_tensor(list(tokens), dtype=torch.long)
        if rows_t.numel() == 0 or rows_t.shape != tok.shape:
            raise ValueError(f"decode: rows ({rows_t.numel()}) and tokens ({tok.numel()}) must be non-empty and "
                             f"of equal length")
        for r in rows_t.tolist():
            if int(session.lengths[r]) == 0:
                raise ValueError(f"decode: sequence {r} has no context; prefill a prompt first")
            self._check_room(session, r, 1, "decode")
        t0 = time.perf_counter()
        logits = self._step(session, rows_t, tok[:, None], decode=True)[:, 0]
        dt = time.perf_counter() - t0
        for r in rows_t.tolist():
            session.metrics[r].decoded_tokens += 1
            session.metrics[r].decode_s += dt
        return logits

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, eos: Optional[int] = None,
                 temperature: float = 0.0, seed: int = 0, session: Optional[Session] = None):
        """Greedy (temperature 0) or sampled continuation of each prompt, decoded as one batch.

        Returns (new tokens per sequence, session). Pass ``session`` to continue a conversation (multi-turn): the
        prompts are appended to the existing sequences.
        """
        if not prompts:
            raise ValueError("generate: no prompts given")
        session = session or self.new_session(len(prompts))
        if session.batch != len(prompts):
            raise ValueError(f"generate: {len(prompts)} prompts for a session of {session.batch} sequences")
        gen = torch.Generator().manual_seed(seed)

        def pick(logits: torch.Tensor) -> List[int]:
            if temperature <= 0:
                return logits.argmax(-1).tolist()
            return torch.multinomial(torch.softmax(logits.float() / temperature, -1), 1, generator=gen)[:, 0].tolist()

        last = torch.stack([self.prefill(session, r, p)[-1] for r, p in enumerate(prompts)])
        out: List[List[int]] = [[] for _ in prompts]
        active = list(range(len(prompts)))
        nxt = pick(last)
        for _ in range(max_new_tokens):
            for r, t in zip(active, nxt):
                out[r].append(t)
            active_next = [(r, t) for r, t in zip(active, nxt)
                           if t != eos and len(out[r]) < max_new_tokens
                           and int(session.lengths[r]) < self.max_length]
            if not active_next:
                break
            active = [r for r, _ in active_next]
            nxt = pick(self.decode(session, active, [t for _, t in active_next]))
        return out, session

    def summary(self, session: Session) -> List[dict]:
        """Per-sequence metrics as plain dicts: ``achieved_cr`` (core.compression: every token written is a key slot,
        evicted when dropped or flagged), ``cr_final`` (vanilla resident / resident at the end), ``cr_reads``."""
        cfg = self.model.cfg
        flagged = sum((c.flag & c.live).sum(dim=(1, 2)) for c in session.caches).tolist()  # [B] held, flagged
        rows = []
        for m, f in zip(session.metrics, flagged):
            van = m.vanilla_resident(cfg.num_layers, cfg.num_query_groups)
            rows.append({"press": self.press.name, "prompt_tokens": m.prompt_tokens,
                         "decoded_tokens": m.decoded_tokens, "resident": m.resident,
                         "vanilla_resident": van, "peak_resident": m.peak_resident,
                         "kept_slots": m.resident - f, "achieved_cr": achieved_cr(m.resident - f, van),
                         "cr_final": van / m.resident if m.resident else float("nan"),
                         "kv_reads": m.kv_reads, "vanilla_reads": m.vanilla_reads, "cr_reads": m.cr_reads,
                         "prefill_s": m.prefill_s, "decode_s": m.decode_s})
        return rows


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, read: torch.Tensor, scale: float):
    """q [n, np, S, hn], k/v [n, ng, cap, hn], read bool [n, ng, S, cap] ->
    (out [n, np, S, hn], probs [n, ng, g, S, cap] fp32)."""
    n, np_, s, hn = q.shape
    ng = k.shape[1]
    qg = q.reshape(n, ng, np_ // ng, s, hn)
    scores = torch.einsum("nhgsd,nhcd->nhgsc", qg.float(), k.float()) * scale
    scores = scores.masked_fill(~read[:, :, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("nhgsc,nhcd->nhgsd", probs, v.float()).to(q.dtype)
    return out.reshape(n, np_, s, hn), probs


__all__ = ["Engine", "Session", "SequenceMetrics"]
