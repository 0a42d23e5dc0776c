"""LD-DETR training losses: set criterion over matched spans, focal label loss, saliency margin + RAC.

Spec: ``ld-detr-code.md`` §3 (Losses; official ``SetCriterion`` in ``model.py`` lines 198-478), spans as in
§2.7. Structure follows detr's ``SetCriterion``: every term is returned unweighted in one dict, aux terms
carry a ``_{i}`` suffix, and ``"loss"`` is the sum of ``weight_dict[k] * term[k]`` over the keys present in
both.

Terms (B samples, Q queries, L clips):

* ``loss_span``  mean |pred - gt| over all matched pairs of the batch and both (center, width) coordinates.
* ``loss_giou``  mean (1 - gIoU) over all matched pairs, on (start, end).
* ``loss_label`` sigmoid focal loss (alpha 0.25, gamma 2) on a one-hot 2-class target (matched -> class 0,
  everything else -> class 1), averaged over all B*Q*2 entries. ``eos_coef`` is unused, as in the official code.
* ``loss_saliency`` = margin loss (Moment-DETR) + rank-aware contrastive loss (CG-DETR / TR-DETR).
* ``loss_align``, ``loss_sim``: passed through from the model outputs when present (spec §2.3).
* ``loss_span_{i}``, ``loss_giou_{i}``, ``loss_label_{i}``: the same for aux output i (matched separately).

Two equal implementations of the matched terms (within float rounding of the sums' order):

* ``solver="device"`` (default): targets padded to (B, W, 2) with a (B, W) mask (``targets["span_targets"]``,
  ``targets["span_mask"]`` from :func:`engine.data.collate`, or padded here from the list form), all decoder
  layers stacked and matched in one call (:meth:`HungarianMatcher.match_padded`), every term a masked mean:
  no per-sample Python, no index tensor built on the host, no host sync, static shapes.
* ``solver="scipy"``: the official per-sample form (host ``linear_sum_assignment``, index lists).

Departures from the official code:

* When the batch has no matched pair (no targets at all), ``loss_span``/``loss_giou`` are a graph-keeping 0
  instead of the NaN that the mean of an empty tensor gives.
* The RAC loss is vectorised over the ranks r = 1..11 with no data-dependent Python branch (no host sync). The
  official code skips a rank when the whole batch has no positive; such a rank adds exactly 0 here
  (every ``[row has a positive]`` indicator is 0), so the value is identical.
* The RAC "drop mask" (labels > 100) is omitted: it is always false for every dataset.
* ``weight_dict`` has no ``loss_align_0``/``loss_sim_0`` keys (the official ones are never computed).
* ``loss_saliency`` is absent (not 0) when the targets carry no saliency labels.
* Targets may be a list of (n, 2) tensors or the official list of ``{"spans": tensor}`` dicts; shape
  mismatches raise ``ValueError``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .matcher import HungarianMatcher, build_matcher
from .span_utils import generalized_temporal_iou, span_cxw_to_xx


# ---------------------------------------------------------------------------------------------------------
# Loss helpers (pure functions)
# ---------------------------------------------------------------------------------------------------------
def sigmoid_focal_loss(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Element-wise sigmoid focal loss (Lin et al. 2017), no reduction.

    ``p = sigmoid(x)``, ``ce = BCE(x, t)``, ``p_t = p t + (1 - p)(1 - t)``,
    ``loss = alpha_t (1 - p_t)^gamma ce`` with ``alpha_t = alpha t + (1 - alpha)(1 - t)`` (no alpha weighting
    when ``alpha < 0``). ``logits`` and ``targets`` have the same shape; returns that shape.
    """
    if logits.shape != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} must have the same shape")
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss


def binary_focal_loss(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """:func:`sigmoid_focal_loss` for targets in {0, 1} (one-hot classes), in fewer ops, no reduction.

    With ``z = (1 - 2t) x``: ``ce = softplus(z)`` and ``1 - p_t = sigmoid(z)``, so
    ``loss = alpha_t * sigmoid(z)^gamma * softplus(z)``, ``alpha_t = (1 - alpha) - (1 - 2 alpha) t``; the same
    values (to float rounding, without the ``1 - p_t`` cancellation).
    """
    z = (1 - 2 * targets) * logits
    loss = z.sigmoid() ** gamma * F.softplus(z)
    if alpha >= 0:
        loss = ((1 - alpha) - (1 - 2 * alpha) * targets) * loss
    return loss


def saliency_margin_loss(scores: Tensor, pos_idx: Tensor, neg_idx: Tensor, margin: float = 0.2) -> Tensor:
    """Moment-DETR hinge loss on clip pairs: ``2 * sum_{b,p} max(0, margin + s[b, neg_p] - s[b, pos_p]) / (B*P)``.

    Args:
        scores: (B, L) unmasked saliency scores.
        pos_idx, neg_idx: (B, P) long clip indices.
    """
    pos = scores.gather(1, pos_idx)  # (B, P)
    neg = scores.gather(1, neg_idx)  # (B, P)
    return (margin + neg - pos).clamp(min=0).sum() * (2 / pos_idx.numel())


def rank_contrastive_loss(scores: Tensor, mask: Tensor, labels: Tensor, temperature: float = 0.5,
                          max_rank: int = 11, divisor: float = 12.0) -> Tensor:
    """Rank-aware contrastive loss (CG-DETR / TR-DETR), vectorised over the ranks.

    With ``s~ = mask*s + (1-mask)*(-1000)``, ``z = s~/tau`` and the row-wise
    ``logp = z - max z - log(sum exp(z - max z) + 1e-6)`` (independent of r), for r = 1..max_rank:
    ``pos = labels >= r``, ``m_b = sum_i pos*logp*mask / (sum_i pos + 1e-6)``,
    ``loss_r = mean_b(-m_b * [row b has a positive])``. Returns ``sum_r loss_r / divisor`` (the official 12).
    The indicator is implicit: a row with no positive has ``m_b = 0 / 1e-6 = 0`` exactly.

    Args:
        scores: (B, L) saliency scores.
        mask: (B, L) bool or 0/1, True/1 = valid clip.
        labels: (B, L) graded saliency labels (QVHL 0..12, binary elsewhere).
    """
    mask = mask.to(torch.bool)
    z = torch.where(mask, scores, -1e3) / temperature  # (B, L); = mask*s + (1-mask)*(-1000) exactly
    z = z - z.max(dim=1, keepdim=True).values
    logp = z - torch.log(z.exp().sum(dim=1, keepdim=True) + 1e-6)  # (B, L)
    ranks = torch.arange(1, max_rank + 1, device=scores.device, dtype=labels.dtype)  # (R,)
    pos = (labels[None] >= ranks[:, None, None]).to(scores.dtype)  # (R, B, L)
    n_pos = pos.sum(dim=-1)  # (R, B)
    pos_logp = (pos.transpose(0, 1) @ torch.where(mask, logp, 0.0)[:, :, None])[..., 0].t()  # (R, B) sum_i pos*logp
    mean_logp_pos = pos_logp / (n_pos + 1e-6)  # (R, B)
    return mean_logp_pos.sum() * (-1.0 / (scores.shape[0] * divisor))  # sum_r mean_b(-m_b) / divisor


# ---------------------------------------------------------------------------------------------------------
# Criterion
# ---------------------------------------------------------------------------------------------------------
class SetCriterion(nn.Module):
    """Hungarian-matched span/label losses plus the saliency losses, returned as a dict of named terms."""

    def __init__(self, matcher: HungarianMatcher, weight_dict: dict[str, float], saliency_margin: float = 0.2,
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0, rac_temperature: float = 0.5,
                 aux_loss: bool = True, solver: str = "device"):
        super().__init__()
        if solver not in ("device", "scipy"):
            raise ValueError(f"solver must be 'device' or 'scipy', got {solver!r}")
        self.solver = solver
        self.matcher = matcher
        self.weight_dict = dict(weight_dict)
        self.saliency_margin = saliency_margin
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.rac_temperature = rac_temperature
        self.aux_loss = aux_loss
        self._weights: dict[tuple, Tensor] = {}

    # ---- targets ----------------------------------------------------------------------------------------
    @staticmethod
    def _span_targets(span_labels, bs: int, device: torch.device, dtype: torch.dtype) -> list[Tensor]:
        """Normalise ``span_labels`` (list of (n,2) tensors or of {"spans": (n,2)} dicts) to a list of tensors."""
        if len(span_labels) != bs:
            raise ValueError(f"targets['span_labels'] has {len(span_labels)} entries for a batch of {bs} predictions")
        out = []
        for i, t in enumerate(span_labels):
            t = t["spans"] if isinstance(t, dict) else t
            t = torch.as_tensor(t)
            if t.dim() != 2 or t.shape[-1] != 2:
                raise ValueError(f"span_labels[{i}] must have shape (n, 2) in (center, width), got {tuple(t.shape)}")
            out.append(t.to(device=device, dtype=dtype))
        return out

    @staticmethod
    def _span_list(targets: dict, bs: int) -> list:
        """The list form of the span targets (``span_labels``, or unpadded from ``span_targets``/``span_mask``)."""
        if "span_labels" in targets:
            return targets["span_labels"]
        spans, mask = targets["span_targets"], targets["span_mask"].bool()
        return [spans[b][mask[b]] for b in range(spans.shape[0])]

    # ---- moment-retrieval terms (solver="scipy") --------------------------------------------------------
    @staticmethod
    def _src_permutation_idx(indices: list[tuple[Tensor, Tensor]], device: torch.device) -> tuple[Tensor, Tensor]:
        batch_idx = torch.cat([torch.full_like(src, b) for b, (src, _) in enumerate(indices)]).to(device)
        src_idx = torch.cat([src for src, _ in indices]).to(device)
        return batch_idx, src_idx

    def loss_spans(self, outputs: dict[str, Tensor], span_targets: list[Tensor],
                   indices: list[tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
        """``loss_span`` (L1 on cxw) and ``loss_giou`` (1 - gIoU on xx), averaged over all matched pairs."""
        pred_spans = outputs["pred_spans"]  # (B, Q, 2)
        batch_idx, src_idx = self._src_permutation_idx(indices, pred_spans.device)
        if src_idx.numel() == 0:  # no target in the whole batch: a 0 that keeps the graph (official: NaN)
            zero = pred_spans.sum() * 0
            return {"loss_span": zero, "loss_giou": zero.clone()}
        src = pred_spans[batch_idx, src_idx]  # (N, 2)
        tgt = torch.cat([t[j.to(t.device)] for t, (_, j) in zip(span_targets, indices)])  # (N, 2)
        loss_span = F.l1_loss(src, tgt, reduction="mean")
        giou = torch.diag(generalized_temporal_iou(span_cxw_to_xx(src), span_cxw_to_xx(tgt)))  # (N,)
        return {"loss_span": loss_span, "loss_giou": (1 - giou).mean()}

    def loss_labels(self, outputs: dict[str, Tensor], indices: list[tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
        """``loss_label``: focal loss on one-hot (matched -> class 0 = fg, else class 1 = bg), mean over B*Q*C."""
        logits = outputs["pred_logits"]  # (B, Q, C)
        batch_idx, src_idx = self._src_permutation_idx(indices, logits.device)
        target_classes = torch.ones(logits.shape[:2], dtype=torch.int64, device=logits.device)  # (B, Q) all bg
        target_classes[batch_idx, src_idx] = 0
        # one-hot by scatter: F.one_hot reads the class ids' range back to the host (a sync per call)
        onehot = torch.zeros_like(logits).scatter_(-1, target_classes[..., None], 1.0)  # (B, Q, C)
        loss = sigmoid_focal_loss(logits, onehot, alpha=self.focal_alpha, gamma=self.focal_gamma)
        return {"loss_label": loss.mean()}

    def _mr_losses(self, outputs: dict[str, Tensor], span_targets: list[Tensor], suffix: str,
                   indices: list[tuple[Tensor, Tensor]] | None = None) -> dict[str, Tensor]:
        if indices is None:
            indices = self.matcher(outputs, span_targets)
        losses = {**self.loss_spans(outputs, span_targets, indices), **self.loss_labels(outputs, indices)}
        return {k + suffix: v for k, v in losses.items()}

    # ---- moment-retrieval terms, padded and vectorised (solver="device") ----------------------------------
    def _padded_targets(self, targets: dict, bs: int, device: torch.device,
                        dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """(B, W, 2) cxw targets and their (B, W) bool mask: the collated padded form, or padded from the list."""
        if "span_targets" in targets:
            spans, mask = targets["span_targets"], targets.get("span_mask")
            if mask is None or spans.dim() != 3 or spans.shape[0] != bs or spans.shape[-1] != 2 \
                    or mask.shape != spans.shape[:2]:
                raise ValueError(f"targets['span_targets'] must be (B={bs}, W, 2) with a (B, W) 'span_mask'; got "
                                 f"{tuple(spans.shape)} and {None if mask is None else tuple(mask.shape)}")
            return spans.to(device=device, dtype=dtype), mask.to(device=device, dtype=torch.bool)
        span_list = self._span_targets(targets["span_labels"], bs, device, dtype)
        width = max([1] + [len(t) for t in span_list])
        spans = torch.zeros(bs, width, 2, device=device, dtype=dtype)
        mask = torch.zeros(bs, width, device=device, dtype=torch.bool)
        for b, t in enumerate(span_list):  # the list form only; the loader's batches come padded
            spans[b, :len(t)] = t
            mask[b, :len(t)] = True
        return spans, mask

    def _mr_losses_padded(self, layers: list[dict[str, Tensor]], tgt: Tensor,
                          tgt_mask: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """``loss_span``/``loss_giou``/``loss_label`` of every layer at once: (final terms, aux ``_{i}`` terms).

        The matched pairs' L1 and gIoU are read from the matcher's pairwise grids (the same formulas), so the
        span math runs once for matching and loss."""
        logits = torch.stack([o["pred_logits"] for o in layers])  # (S, B, Q, C)
        spans = torch.stack([o["pred_spans"] for o in layers])  # (S, B, Q, 2)
        cost, l1, giou = self.matcher.pairwise(logits, spans, tgt, tgt_mask)  # (S, B, Q, W) each
        idx, matched = self.matcher.assign(cost, tgt_mask)  # (S, B, W) each
        m = matched.to(spans.dtype)  # (S, B, W)
        n_matched = m.flatten(1).sum(1)  # (S,) matched pairs per layer
        n_pairs = n_matched.clamp(min=1)  # 0 pairs -> every term 0
        pair = torch.stack([l1, giou], dim=-1).gather(2, idx[:, :, None, :, None].expand(-1, -1, -1, -1, 2))
        pair = pair[:, :, 0] * m[..., None]  # (S, B, W, 2): (L1, gIoU) of each matched pair, 0 elsewhere
        sums = pair.flatten(1, 2).sum(1)  # (S, 2)
        loss_span = sums[:, 0] / (2 * n_pairs)  # mean over pairs x (center, width)
        loss_giou = (n_matched - sums[:, 1]) / n_pairs  # mean (1 - gIoU) over pairs
        fg = torch.zeros_like(logits[..., 0]).scatter_add_(2, idx, m)  # (S, B, Q): 1 = matched (foreground)
        onehot = torch.stack([fg, 1 - fg, *[torch.zeros_like(fg)] * (logits.shape[-1] - 2)], dim=-1)  # (S,B,Q,C)
        focal = binary_focal_loss(logits, onehot, alpha=self.focal_alpha, gamma=self.focal_gamma)
        loss_label = focal.flatten(1).mean(1)  # (S,) mean over B*Q*C
        per_layer = [{"loss_span": loss_span[i], "loss_giou": loss_giou[i], "loss_label": loss_label[i]}
                     for i in range(len(layers))]
        aux = {f"{k}_{i}": v for i, terms in enumerate(per_layer[1:]) for k, v in terms.items()}
        return per_layer[0], aux

    def _weighted_total(self, losses: dict[str, Tensor]) -> Tensor:
        """``sum_k weight_dict[k] * losses[k]`` as one stack and one dot (the weights cached on the device)."""
        keys = tuple(k for k in losses if k in self.weight_dict)
        terms = [losses[k] for k in keys]
        if not terms or any(t.dim() for t in terms):
            return sum(self.weight_dict[k] * losses[k] for k in keys)
        stacked = torch.stack(terms)  # (n,)
        cache_key = (keys, stacked.device, stacked.dtype)
        weights = self._weights.get(cache_key)
        if weights is None:  # once per set of terms (one small host-to-device copy), then reused every step
            weights = self._weights[cache_key] = torch.tensor([self.weight_dict[k] for k in keys],
                                                              dtype=stacked.dtype, device=stacked.device)
        return stacked @ weights

    # ---- saliency ---------------------------------------------------------------------------------------
    def loss_saliency(self, outputs: dict[str, Tensor], targets: dict) -> dict[str, Tensor]:
        """``loss_saliency`` = margin loss + rank-aware contrastive loss (final outputs only)."""
        scores = outputs["saliency_scores"]  # (B, L)
        mask = outputs["video_mask"]  # (B, L)
        bs, length = scores.shape
        if mask.shape != scores.shape:
            raise ValueError(f"video_mask {tuple(mask.shape)} must match saliency_scores {tuple(scores.shape)}")
        pos_idx = targets["saliency_pos_labels"].to(scores.device)
        neg_idx = targets["saliency_neg_labels"].to(scores.device)
        labels = targets["saliency_all_labels"].to(device=scores.device, dtype=scores.dtype)
        if pos_idx.dim() != 2 or pos_idx.shape[0] != bs or neg_idx.shape != pos_idx.shape:
            raise ValueError(f"saliency_pos_labels {tuple(pos_idx.shape)} and saliency_neg_labels "
                             f"{tuple(neg_idx.shape)} must both be (B={bs}, P)")
        if labels.shape != (bs, length):
            raise ValueError(f"saliency_all_labels must be (B, L) = {(bs, length)} like saliency_scores, "
                             f"got {tuple(labels.shape)}")
        margin = saliency_margin_loss(scores, pos_idx.long(), neg_idx.long(), self.saliency_margin)
        rac = rank_contrastive_loss(scores, mask, labels, self.rac_temperature)
        return {"loss_saliency": margin + rac}

    # ---- forward ----------------------------------------------------------------------------------------
    def forward(self, outputs: dict, targets: dict) -> dict[str, Tensor]:
        """Compute every loss term.

        Args:
            outputs: dict with
                "pred_logits": (B, Q, 2), class 0 = foreground;
                "pred_spans": (B, Q, 2) normalised (center, width);
                "saliency_scores": (B, L) and "video_mask": (B, L) bool/0-1, True = valid
                    (needed only when the targets carry saliency labels);
                optional "aux_outputs": list of dicts with "pred_logits"/"pred_spans" (used when aux_loss);
                optional scalars "loss_align", "loss_sim" (passed through).
            targets: dict with
                "span_labels": list of B (n_b, 2) cxw tensors, or of {"spans": (n_b, 2)} dicts (n_b may be 0);
                or (preferred, static shapes) "span_targets" (B, W, 2) cxw zero-padded with "span_mask" (B, W)
                bool, True = a real target;
                optional "saliency_pos_labels", "saliency_neg_labels": (B, P) long;
                optional "saliency_all_labels": (B, L) float.
        Returns:
            dict of unweighted terms (``loss_span``, ``loss_giou``, ``loss_label``, [``loss_saliency``],
            [``loss_align``, ``loss_sim``], [``loss_span_{i}``, ``loss_giou_{i}``, ``loss_label_{i}``]) and
            ``"loss"`` = sum of ``weight_dict[k] * term`` over the terms that have a weight.
        """
        pred_spans = outputs["pred_spans"]
        bs = pred_spans.shape[0]
        aux = outputs.get("aux_outputs", []) if self.aux_loss else []
        if self.solver == "device":
            tgt, tgt_mask = self._padded_targets(targets, bs, pred_spans.device, pred_spans.dtype)
            losses, aux_losses = self._mr_losses_padded([outputs, *aux], tgt, tgt_mask)
        else:
            span_targets = self._span_targets(self._span_list(targets, bs), bs, pred_spans.device, pred_spans.dtype)
            # one matching call for the final and the aux layers: one device -> host transfer per step
            all_indices = self.matcher.match_many([outputs, *aux], span_targets)
            losses = self._mr_losses(outputs, span_targets, suffix="", indices=all_indices[0])
            aux_losses = {}
            for i, (aux_out, idx) in enumerate(zip(aux, all_indices[1:])):
                aux_losses.update(self._mr_losses(aux_out, span_targets, suffix=f"_{i}", indices=idx))

        sal_keys = ("saliency_pos_labels", "saliency_neg_labels", "saliency_all_labels")
        present = [k for k in sal_keys if k in targets]
        if present:
            if len(present) != len(sal_keys):
                raise ValueError(f"saliency targets must come together; got {present}, need {list(sal_keys)}")
            if "saliency_scores" not in outputs or "video_mask" not in outputs:
                raise ValueError("targets carry saliency labels but outputs lack 'saliency_scores'/'video_mask'")
            losses.update(self.loss_saliency(outputs, targets))

        for k in ("loss_align", "loss_sim"):
            if k in outputs:
                losses[k] = outputs[k]

        losses.update(aux_losses)
        losses["loss"] = self._weighted_total(losses)
        return losses


# ---------------------------------------------------------------------------------------------------------
# Builders (the only place that reads the config)
# ---------------------------------------------------------------------------------------------------------
def build_weight_dict(cfg) -> dict[str, float]:
    """Loss weights from an :class:`reference.config.LDDETRConfig`, with aux copies for decoder layers 0..n-2."""
    weight_dict = {
        "loss_span": cfg.span_loss_coef,
        "loss_giou": cfg.giou_loss_coef,
        "loss_label": cfg.label_loss_coef,
        "loss_saliency": cfg.lw_saliency,
        "loss_align": cfg.align_loss_coef,
        "loss_sim": cfg.sim_loss_coef,
    }
    if cfg.aux_loss:
        for i in range(cfg.num_decoder_layers - 1):
            weight_dict.update({f"loss_span_{i}": cfg.span_loss_coef, f"loss_giou_{i}": cfg.giou_loss_coef,
                                f"loss_label_{i}": cfg.label_loss_coef})
    return weight_dict


def build_criterion(cfg) -> SetCriterion:
    """Build the :class:`SetCriterion` (matcher + weights + loss hyper-parameters) from the config."""
    return SetCriterion(
        matcher=build_matcher(cfg),
        weight_dict=build_weight_dict(cfg),
        saliency_margin=cfg.saliency_margin,
        focal_alpha=cfg.focal_alpha,
        focal_gamma=cfg.focal_gamma,
        rac_temperature=cfg.rac_temperature,
        aux_loss=cfg.aux_loss,
        solver=cfg.matcher,
    )


__all__ = [
    "SetCriterion",
    "sigmoid_focal_loss",
    "binary_focal_loss",
    "saliency_margin_loss",
    "rank_contrastive_loss",
    "build_weight_dict",
    "build_criterion",
]
