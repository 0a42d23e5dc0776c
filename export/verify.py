"""``--verify``: an exported artifact against the PyTorch model on fresh random inputs at three video lengths
(one never seen at export) and two batch sizes; max abs / rel error per output."""

from __future__ import annotations

import numpy as np
import torch

from .model import OUTPUT_NAMES, Prepared, example_inputs


def verify(prepared: Prepared, runner, *, dynamic: bool, batch: int, max_video_len: int, text_len: int = 32,
           tol: float = 1e-4, seed: int = 1, static_video: bool = False, half: bool = False) -> dict:
    """Compare ``runner(*inputs)`` with the PyTorch module at three video lengths (one unseen at export) and
    two batch sizes. A static graph (or ``static_video``: a fixed video length) keeps its shapes and gets the
    shorter videos padded, their lengths carried by the masks. Returns {"ok", "rows"}; ok = every rel. error
    <= tol and every output finite. ``half``: a fp16 artifact; a sample whose top-1 moment differs from
    PyTorch's is left out of the saliency comparison and counted in ``top1_flips`` (its other outputs are
    still compared) when the flip is a near tie — PyTorch's own foreground probabilities of the two moments
    within ``tol`` — and fails the check when it is decisive."""
    t = max_video_len
    lengths = ((t, text_len), (max(2, 2 * t // 3), 11), (37 if t > 37 else t - 1, 7))
    if not dynamic:
        lengths = tuple((length, text_len) for length, _ in lengths)
    cases = [(b, length, n) for b in ((1, 3) if dynamic else (batch,)) for length, n in lengths]
    rows, ok = [], True
    for i, (b, length, n) in enumerate(cases):
        x = example_inputs(prepared.cfg, b, length, n, seed=seed + i)
        if static_video or not dynamic:  # pad to the exported length; the masks carry the real lengths
            pad = t - length
            x = (torch.nn.functional.pad(x[0], (0, 0, 0, pad)), torch.nn.functional.pad(x[1], (0, pad)), x[2], x[3])
        with torch.no_grad():
            ref = [r.cpu().numpy() for r in prepared.module(*(v.to(prepared.device) for v in x))]
        got = [np.asarray(g, dtype=np.float32) for g in runner(*x)]
        valid = x[1].numpy().copy()  # saliency entries past a sample's length are not meaningful
        flips, decisive = 0, False
        if half:  # samples whose top-1 moment differs feed another slice to the GRU: compare their saliency
            # only when the two top-1 choices agree (with random weights the top two scores can be 1e-4 apart)
            top_r, top_g = _top1(ref[0]), _top1(got[0])
            same = top_r == top_g
            p = _foreground(ref[0])  # (B, Q)
            rows_b = np.arange(len(top_r))
            decisive = bool((~same & (np.abs(p[rows_b, top_r] - p[rows_b, top_g]) > tol)).any())
            flips = int((~same).sum())
            valid &= same[:, None]
        for name, r, g in zip(OUTPUT_NAMES, ref, got):
            finite = bool(np.isfinite(g).all())  # every entry, the left-out samples included
            if name == "saliency_scores":
                finite &= not decisive  # a flip beyond a near tie is a wrong answer
                r, g = r[valid], g[valid]
            abs_err = float(np.abs(g - r).max()) if r.size else 0.0
            rel_err = float(np.linalg.norm(g - r) / max(np.linalg.norm(r), 1e-12))
            good = finite and rel_err <= tol
            ok &= good
            rows.append(dict(batch=b, video_len=length, text_len=n, output=name, max_abs=abs_err, rel=rel_err,
                             ok=good, top1_flips=flips if name == "saliency_scores" else 0))
    return {"ok": ok, "rows": rows, "tol": tol}


def _foreground(logits: np.ndarray) -> np.ndarray:
    """(B, Q) foreground probabilities (softmax over the 2 classes, class 0)."""
    z = logits.astype(np.float64)
    return np.exp(z[..., 0] - np.logaddexp(z[..., 0], z[..., 1]))


def _top1(logits: np.ndarray) -> np.ndarray:
    """Index of each sample's highest foreground probability."""
    return _foreground(logits).argmax(-1)


def format_rows(result: dict) -> str:
    lines = [f"{'B':>3} {'T':>4} {'N':>4}  {'output':<16} {'max abs':>10} {'rel':>10}  ok"]
    for r in result["rows"]:
        lines.append(f"{r['batch']:>3} {r['video_len']:>4} {r['text_len']:>4}  {r['output']:<16} "
                     f"{r['max_abs']:>10.2e} {r['rel']:>10.2e}  {'yes' if r['ok'] else 'NO'}"
                     + (f"  ({r['top1_flips']} top-1 flip(s) left out)" if r.get("top1_flips") else ""))
    return "\n".join(lines)
