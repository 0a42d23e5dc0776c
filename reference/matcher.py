"""Hungarian matcher between predicted spans and ground-truth spans.

Spec: ``ld-detr-code.md`` §3 ("Hungarian matcher"), official ``matcher.py`` (Moment-DETR / TR-DETR lineage).
For every sample the cost of assigning query q to target t is

    C[q, t] = cost_span * |span_q - span_t|_1  (cxw)
            + cost_giou * (-gIoU(xx(span_q), xx(span_t)))
            + cost_class * (-softmax(logits_q)[0])          # class 0 = foreground

and ``scipy.optimize.linear_sum_assignment`` picks the assignment of least total cost. The class cost uses
the softmax probability although the label loss is sigmoid focal; this inconsistency is inherited from the
official code and kept.

Two solvers give the same assignment (equal total cost; the same pairs wherever the optimum is unique):

* ``match_many`` (``matcher="scipy"``, the official solver): costs on the device, one device-to-host transfer,
  then ``linear_sum_assignment`` per sample on the host.
* ``match_padded`` (``matcher="device"``, the default): targets padded to ``W = max_windows`` (<= 5) with a
  mask, every decoder layer and sample solved at once on the costs' device, static shapes, no host transfer,
  no Python loop over samples. It is exact: the least total cost over all P = Q!/(Q-W)! injective maps of the
  W target slots into the Q queries (30,240 for Q=10, W=5), found as one (N, Q*W) @ (Q*W, P) fp64 product with
  a 0/1 table (every sum of <= 5 fp32 costs is exact in fp64) and an argmin. A padded target slot costs 0 on
  every query, so it never changes which real assignment wins; with Q < W, dummy queries cost more than any
  real assignment could save, so as many targets as possible are matched, like scipy's rectangular solve.

Departures from the official code: targets are a plain list of (n_b, 2) tensors (the criterion unwraps the
official ``[{"spans": ...}]`` form), samples with no targets are handled explicitly, and bad shapes raise
``ValueError``.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from .span_utils import generalized_temporal_iou, paired_generalized_temporal_iou, span_cxw_to_xx


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to targets, per sample (detr ``HungarianMatcher``)."""

    def __init__(self, cost_class: float = 4.0, cost_span: float = 10.0, cost_giou: float = 1.0,
                 num_queries: int | None = None, max_targets: int | None = None):
        super().__init__()
        if cost_class == 0 and cost_span == 0 and cost_giou == 0:
            raise ValueError("all matcher costs are 0; at least one of cost_class/cost_span/cost_giou must be non-zero")
        self.cost_class = cost_class
        self.cost_span = cost_span
        self.cost_giou = cost_giou
        # the 0/1 tables of match_padded for every width W <= max_targets (a batch may be padded to fewer
        # slots than max_windows), built here so that .to(device) moves them once: no copy per step
        self._tables: dict[tuple, tuple[Tensor, Tensor]] = {}
        self._widths = range(1, max_targets + 1) if num_queries is not None and max_targets is not None else ()
        for w in self._widths:
            maps, table = injective_map_table(num_queries, w)
            self.register_buffer(f"maps_{w}", maps, persistent=False)  # (P, W) int64
            self.register_buffer(f"map_table_{w}", table, persistent=False)  # (Q'*W, P) float64

    @torch.no_grad()
    def forward(self, outputs: dict[str, Tensor], span_targets: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
        """Match each sample's queries to its targets.

        Args:
            outputs: dict with
                "pred_logits": (B, Q, 2) class logits, class 0 = foreground;
                "pred_spans":  (B, Q, 2) normalised (center, width).
            span_targets: list of B tensors, each (n_b, 2) normalised (center, width); n_b may be 0.
        Returns:
            list of B tuples ``(pred_idx, tgt_idx)``, both int64 CPU tensors of length min(Q, n_b);
            ``pred_idx`` is sorted ascending (scipy's row order).
        """
        return self.match_many([outputs], span_targets)[0]

    @torch.no_grad()
    def match_many(self, outputs_list: list[dict[str, Tensor]], span_targets: list[Tensor]) -> list[list]:
        """:meth:`forward` for several prediction sets against the same targets (the final decoder layer and
        the aux layers): costs on the device, ONE device-to-host transfer for all of them, then scipy."""
        sizes = [len(t) for t in span_targets]
        costs = [self.cost(o, span_targets) for o in outputs_list]  # each (B, Q, T) on the device
        bs = len(span_targets)
        empty = torch.empty(0, dtype=torch.int64)
        if sum(sizes) == 0:
            return [[(empty, empty) for _ in range(bs)] for _ in outputs_list]
        host = torch.stack(costs).cpu().numpy()  # (n_sets, B, Q, T): the one transfer
        if not np.isfinite(host).all():  # checked on the host copy: no extra sync
            raise FloatingPointError("non-finite matching costs: the model's predictions contain NaN or inf")
        bounds = np.cumsum([0] + sizes)
        result = []
        for cost in host:
            indices = []
            for b in range(bs):
                if sizes[b] == 0:
                    indices.append((empty, empty))
                    continue
                rows, cols = linear_sum_assignment(cost[b, :, bounds[b]:bounds[b + 1]])
                indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
            result.append(indices)
        return result

    @torch.no_grad()
    def match_padded(self, pred_logits: Tensor, pred_spans: Tensor, tgt_spans: Tensor,
                     tgt_mask: Tensor) -> tuple[Tensor, Tensor]:
        """Exact matching of S prediction sets (final + aux layers, stacked) on the device, static shapes.

        Args:
            pred_logits: (S, B, Q, C), class 0 = foreground; pred_spans: (S, B, Q, 2) cxw.
            tgt_spans: (B, W, 2) padded cxw targets; tgt_mask: (B, W) bool, True = a real target.
        Returns:
            ``idx`` (S, B, W) int64: the query matched to target slot w (any valid query where unmatched);
            ``matched`` (S, B, W) bool: slot w is a real target and has a query.
        """
        cost, _, _ = self.pairwise(pred_logits, pred_spans, tgt_spans, tgt_mask)
        return self.assign(cost, tgt_mask)

    def assign(self, cost: Tensor, tgt_mask: Tensor) -> tuple[Tensor, Tensor]:
        """:func:`assign_min_cost` of a (S, B, Q, W) cost with this matcher's table."""
        return assign_min_cost(cost.detach(), tgt_mask, self._table(cost.shape[2], cost.shape[3], cost.device))

    def _table(self, num_queries: int, width: int, device: torch.device) -> tuple[Tensor, Tensor]:
        qq = max(num_queries, width)
        if width in self._widths:
            maps, table = getattr(self, f"maps_{width}"), getattr(self, f"map_table_{width}")
            if table.shape[0] == qq * width and table.device == device:
                return maps, table
        key = (qq, width, str(device))
        if key not in self._tables:  # another shape or device: built once (one host-to-device copy), then cached
            maps, table = injective_map_table(num_queries, width)
            self._tables[key] = maps.to(device), table.to(device)
        return self._tables[key]

    def pairwise(self, pred_logits: Tensor, pred_spans: Tensor, tgt_spans: Tensor,
                 tgt_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Every (query, target slot) pair of S stacked prediction sets against the padded targets.

        Args: pred_logits (S, B, Q, C), pred_spans (S, B, Q, 2) cxw, tgt_spans (B, W, 2) cxw, tgt_mask (B, W).
        Returns ``cost`` (S, B, Q, W), the L1 distance ``l1`` (S, B, Q, W) and ``giou`` (S, B, Q, W); the
        criterion gathers its matched-pair losses from ``l1`` and ``giou``. Padded slots hold a stand-in span
        (0.5, 0.5), so that a zero-length padding span never makes a 0/0 (NaN would poison the matching sum).
        """
        if pred_spans.dim() != 4 or pred_spans.shape[-1] != 2 or pred_logits.shape[:3] != pred_spans.shape[:3]:
            raise ValueError(f"stacked pred_logits must be (S, B, Q, C) and pred_spans (S, B, Q, 2); got "
                             f"{tuple(pred_logits.shape)} and {tuple(pred_spans.shape)}")
        if tgt_spans.dim() != 3 or tgt_spans.shape[0] != pred_spans.shape[1] or tgt_spans.shape[-1] != 2 \
                or tgt_mask.shape != tgt_spans.shape[:2]:
            raise ValueError(f"padded span targets must be (B={pred_spans.shape[1]}, W, 2) with a (B, W) mask, got "
                             f"{tuple(tgt_spans.shape)} and {tuple(tgt_mask.shape)}")
        tgt = torch.where(tgt_mask[..., None], tgt_spans.to(pred_spans.dtype), 0.5)[:, None]  # (B, 1, W, 2)
        pred = pred_spans[..., None, :]  # (S, B, Q, 1, 2)
        abs_diff = (pred - tgt).abs()  # (S, B, Q, W, 2)
        l1 = abs_diff.sum(-1)  # (S, B, Q, W), = cdist p=1
        giou = paired_generalized_temporal_iou(pred, tgt, abs_center_diff=abs_diff[..., 0])  # (S, B, Q, W)
        cost_class = pred_logits.softmax(-1)[..., 0:1] * -self.cost_class  # (S, B, Q, 1)
        cost = (l1 * self.cost_span).sub(giou, alpha=self.cost_giou) + cost_class
        return cost, l1, giou

    def cost(self, outputs: dict[str, Tensor], span_targets: list[Tensor]) -> Tensor:
        """The matching cost (B, Q, T) on the predictions' device, T = sum of n_b (targets concatenated)."""
        logits, spans = outputs["pred_logits"], outputs["pred_spans"]
        if logits.dim() != 3 or spans.dim() != 3 or spans.shape[-1] != 2 or logits.shape[:2] != spans.shape[:2]:
            raise ValueError(f"pred_logits must be (B, Q, C) and pred_spans (B, Q, 2) with the same B, Q; got "
                             f"{tuple(logits.shape)} and {tuple(spans.shape)}")
        bs, num_queries = spans.shape[:2]
        if len(span_targets) != bs:
            raise ValueError(f"got {len(span_targets)} span targets for a batch of {bs} predictions")
        for i, t in enumerate(span_targets):
            if t.dim() != 2 or t.shape[-1] != 2:
                raise ValueError(f"span_targets[{i}] must have shape (n, 2), got {tuple(t.shape)}")
        out_prob = logits.flatten(0, 1).softmax(-1)  # (B*Q, C)
        out_spans = spans.flatten(0, 1)  # (B*Q, 2)
        tgt_spans = torch.cat(list(span_targets)).to(device=spans.device, dtype=spans.dtype)  # (T, 2)
        if tgt_spans.numel() == 0:
            return out_spans.new_zeros(bs, num_queries, 0)
        cost_class = -out_prob[:, 0:1]  # (B*Q, 1), broadcast over targets
        cost_span = torch.cdist(out_spans, tgt_spans, p=1)  # (B*Q, T)
        cost_giou = -generalized_temporal_iou(span_cxw_to_xx(out_spans), span_cxw_to_xx(tgt_spans))  # (B*Q, T)
        cost = self.cost_span * cost_span + self.cost_giou * cost_giou + self.cost_class * cost_class
        return cost.view(bs, num_queries, -1)  # (B, Q, T)


MAX_TABLE_BYTES = 64 * 2**20  # the device matcher's (Q*W, P) fp64 table; Q=10, W=5 needs 12 MB


def injective_map_table(num_queries: int, width: int) -> tuple[Tensor, Tensor]:
    """All injective maps of W target slots into Q' = max(Q, W) queries.

    Returns ``maps`` (P, W) int64 (``maps[p, w]`` = the query of slot w under map p, lexicographic order) and
    ``table`` (Q'*W, P) float64 with ``table[q*W + w, p] = [maps[p, w] == q]``, so that for a cost C (N, Q', W)
    ``C.flatten(1) @ table`` is every map's total cost (N, P).
    """
    qq = max(num_queries, width)
    n_maps = math.perm(qq, width)
    if qq * width * n_maps * 8 > MAX_TABLE_BYTES:
        raise ValueError(f"the device matcher enumerates {n_maps:,} maps for {num_queries} queries and "
                         f"max_windows={width} (limit {MAX_TABLE_BYTES // 2**20} MB of table); use matcher='scipy'")
    maps = torch.tensor(list(itertools.permutations(range(qq), width)), dtype=torch.int64).view(n_maps, width)
    table = torch.zeros(qq * width, n_maps, dtype=torch.float64)
    rows = maps * width + torch.arange(width)  # (P, W): row q*W + w of each (slot, query) pair
    table.scatter_(0, rows.t().contiguous(), 1.0)
    return maps, table


def assign_min_cost(costs: Tensor, tgt_mask: Tensor, tables: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """The exact least-cost assignment of every problem in ``costs`` (..., B, Q, W), masked slots free.

    Args:
        costs: (S, B, Q, W) float; tgt_mask: (B, W) bool; tables: :func:`injective_map_table` for (Q, W).
    Returns:
        ``idx`` (S, B, W) int64 (the query of each slot; of a padded slot, some query, or 0 when Q < W),
        ``matched`` (S, B, W) bool (a real target with a real query).
    """
    maps, table = tables
    s, b, q, w = costs.shape
    c = torch.where(tgt_mask[None, :, None, :], costs, 0.0).to(torch.float64)  # (S, B, Q, W): padded slots free
    if q < w:  # dummy queries: a real target left on one costs more than any real assignment could save
        big = c.abs().amax() * (2 * w) + 1.0  # a 0-dim device tensor: no host read
        dummy = big * tgt_mask.to(torch.float64)[None, :, None, :].expand(s, b, w - q, w)  # (S, B, W-Q, W)
        c = torch.cat([c, dummy], dim=2)  # (S, B, W, W)
    totals = c.flatten(2).view(s * b, -1) @ table  # (S*B, P): every map's total cost, exact in fp64
    best = totals.argmin(dim=1)  # (S*B,) the first least-cost map
    idx = maps.index_select(0, best).view(s, b, w)  # (S, B, W) query per slot
    if q >= w:  # every slot has a real query
        return idx, tgt_mask[None].expand(s, b, w)
    matched = tgt_mask[None] & (idx < q)  # (S, B, W)
    return torch.where(matched, idx, 0), matched


def build_matcher(cfg) -> HungarianMatcher:
    """Build the matcher from an :class:`reference.config.LDDETRConfig` (``set_cost_*`` fields; the device
    solver's table for ``num_queries`` x ``max_windows`` when ``matcher="device"``)."""
    device = getattr(cfg, "matcher", "device") == "device"
    return HungarianMatcher(cost_class=cfg.set_cost_class, cost_span=cfg.set_cost_span, cost_giou=cfg.set_cost_giou,
                            num_queries=cfg.num_queries if device else None,
                            max_targets=cfg.max_windows if device else None)


__all__ = ["HungarianMatcher", "assign_min_cost", "build_matcher", "injective_map_table"]
