"""Quest (query-aware page selection): the full cache is kept; each decode query reads only the ``budget // page``
pages with the largest upper bound sum_d max(q_d * min_d, q_d * max_d) over the page's keys (maximum over the query
heads of the KV group), plus the page holding the newest token. Prefill attention is exact.

Pages are ``page`` consecutive slots; without drops slots fill in position order, so a page is a run of positions.
Page minima/maxima are recomputed per step here (a production kernel keeps them per page)."""

from __future__ import annotations

import torch

from dms_megatron.inference.press.base import Press, check_budget


class QuestPress(Press):
    name = "quest"
    required = ("budget",)

    def __init__(self, budget, page: int) -> None:
        self.budget = check_budget(self.name, budget)
        if page < 1 or page > self.budget:
            raise ValueError(f"press quest: page={page} must lie in [1, budget={self.budget}]")
        self.page = page

    def read_mask(self, cache, rows, q, visible):
        n, np_, s, hn = q.shape
        if s != 1:
            return visible  # prefill: exact
        ng, cap = cache.k.shape[1], cache.capacity
        pages = -(-cap // self.page)
        pad = pages * self.page - cap
        live = visible[:, :, 0]  # [n, ng, cap]
        k = cache.k[rows]  # [n, ng, cap, hn]
        big = torch.finfo(k.dtype).max
        kmax = k.masked_fill(~live[..., None], -big)
        kmin = k.masked_fill(~live[..., None], big)
        kmax = torch.nn.functional.pad(kmax, (0, 0, 0, pad), value=-big).view(n, ng, pages, self.page, hn).amax(3)
        kmin = torch.nn.functional.pad(kmin, (0, 0, 0, pad), value=big).view(n, ng, pages, self.page, hn).amin(3)
        qg = q.view(n, ng, np_ // ng, 1, hn)  # [n, ng, g, 1, hn]
        ub = torch.maximum(qg * kmin[:, :, None], qg * kmax[:, :, None]).sum(-1).amax(2)  # [n, ng, pages]
        page_live = torch.nn.functional.pad(live, (0, pad)).view(n, ng, pages, self.page).any(-1)
        ub = ub.masked_fill(~page_live, float("-inf"))
        newest_slot = (cache.pos[rows] == cache.pos[rows].amax(-1, keepdim=True)).float().argmax(-1)  # [n, ng]
        ub.scatter_(-1, (newest_slot // self.page)[..., None], float("inf"))
        top = ub.topk(min(self.budget // self.page, pages), dim=-1).indices
        chosen = torch.zeros(n, ng, pages, dtype=torch.bool, device=q.device).scatter_(-1, top, True) & page_live
        slot_chosen = chosen[..., None].expand(n, ng, pages, self.page).reshape(n, ng, -1)[..., :cap]
        return visible & slot_chosen[:, :, None]


__all__ = ["QuestPress"]
