"""Fused Loop Decoder (replaces ``reference.decoder.LoopDecoder`` at inference; paper eqs. 29-31).

The reference runs ``loops`` passes of a DAB-DETR decoder with shared weights; each pass re-reads the same
memory R and restarts from the same learned anchors. Computed once per forward here instead of once per
loop and layer:

* the memory side of every layer's cross-attention: K_content and V of all layers from ONE GEMM on R (the
  saliency head's ``R . u`` column rides along), K_pos of all layers from one GEMM on the sine positions;
  per layer the keys are laid out per head as ``[k_content | k_pos]`` (the reference's ``cat``);

and once per model, at build time (the anchors are reset every loop, so layer 0's query path never depends
on the input):

* layer 0: ``sigmoid(anchors)``, their sine embedding, ``ref_point_head``, the positional parts of its
  self-attention q/k and of its cross-attention q, and ``inverse_sigmoid(ref)`` of its box update;
* loop 0 starts from tgt = 0, so layer 0 of loop 0 up to its cross-attention query is a constant:
  the self-attention, norm1, the width-modulated sine query and the cross-attention query.

Per layer the input ``out`` feeds one GEMM with the first layers of bbox_embed (of the previous layer),
query_scale and ref_anchor_head and the self-attention's content q/k/v; the second layers of bbox_embed and
query_scale are one batched GEMM (two d x d blocks, no block-diagonal zeros), ref_anchor_head's one-wide one
a small linear; ``ref_point_head``'s second layer is folded into the positional q/k projections (two
linears with nothing between them); the cross-attention query ``[q_content | q_sine]`` is one batched GEMM
over ``[tgt, sine]`` (layer 0: one GEMM whose per-query bias holds the constant positional query), laid
out per head as the reference's ``cat``. Dead work is gone: the last layer's bbox_embed (never read), the norm of every layer
but the last (only the last layer feeds the outputs at inference: aux heads are dropped) and, in loops
before the last, everything the next loop does not read.

forward(memory (B, L, d), pos (B, L, d), vkeep (B, L) bool) -> (hs (B, Q, d) = norm(last layer) + ``input_shift``
(the bias shift, see below), inv (B, Q, 2) or (Q, 2) = inverse_sigmoid of the last layer's input reference, fp32; mem_extra
(B, L, e) the extra memory columns).

Bias shift: every LayerNorm output carries (in its beta) the bias of the linear whose residual it feeds, so
``x + (W a + b)`` is one ``addmm(x', a, W^T)``; every other reader of x' subtracts ``W b`` from its own bias
(exact algebra, done at build time).
"""

from __future__ import annotations

import math

import copy

import torch
from torch import Tensor, nn

from reference.decoder import LoopDecoder
from reference.position_encoding import anchor_sine_embed
from reference.span_utils import inverse_sigmoid

from kernels.onednn import linear
from .common import (FusedModule, Mask, attention, attention_mask, chain, f64, heads, layer_norm,
                     merge_heads, residual, rows, wb, use_bmm_attention)
from .packing import Packing, to_padded
from .positions import anchor_sine, anchor_sine_constants


INV_EPS = 1e-3  # reference.span_utils.inverse_sigmoid's eps
INV_LIMIT = math.log((1 - INV_EPS) / INV_EPS)  # |inverse_sigmoid(x)| where its clamps start to act


def _inverse_of_sigmoid(pre: Tensor) -> Tensor:
    """``inverse_sigmoid(sigmoid(pre))`` as the reference computes it (eps 1e-3), from the pre-activation: ``pre``
    itself (exact up to the rounding the round trip adds) clamped to +-log((1 - eps) / eps); past the clamps
    the reference's value differs from the bound by < 1.1e-3 (x < 1e-3: log(eps / (1 - x)))."""
    return pre.clamp(-INV_LIMIT, INV_LIMIT)


def _interleave(content: Tensor, sine: Tensor, h: int) -> Tensor:
    """(.., d) content and (.., d) sine rows -> (.., 2d) laid out per head as [content_h | sine_h]."""
    c = content.reshape(*content.shape[:-1], h, -1)
    s = sine.reshape(*sine.shape[:-1], h, -1)
    return torch.cat([c, s], -1).reshape(*content.shape[:-1], -1)


class FusedLoopDecoder(FusedModule):
    replaces = "reference.decoder.LoopDecoder"
    keep_fp32 = ("inv0", "freq", "phase", "s0r", "ref0")

    def __init__(self, loop_decoder: LoopDecoder, anchors: Tensor, mem_extra: tuple[Tensor, Tensor] | None = None):
        super().__init__()
        td = loop_decoder.transformer_decoder
        self.loops, self.nl = loop_decoder.loops, len(td.layers)
        d = self.d = td.d_model
        h = self.nhead = td.layers[0].nhead
        self.hd = d // h
        dbl = copy.deepcopy(td).double()  # the reference modules, in float64, for build-time constants
        L = dbl.layers
        with torch.no_grad():
            ref0 = f64(anchors).sigmoid()  # (Q, 2)
            s0 = anchor_sine_embed(ref0, d)  # (Q, d)
            qpos0 = dbl.ref_point_head(s0)
            self.put("ref0", ref0)
            inv0 = inverse_sigmoid(ref0)
            self.put("inv0", inv0)
            freq, phase = anchor_sine_constants(d)
            self.put("freq", freq), self.put("phase", phase)
            self.put("s0r", s0 / ref0[:, 1:2])  # layer 0's sine / width: scaled by sigmoid(ref_anchor_head)

            # ---- per-layer packed weights. Bias shift: each LayerNorm's output carries the bias of the linear
            # whose residual it feeds (its beta + b), so that residual add is one addmm without bias; every other
            # reader of that output subtracts W b from its own bias.
            s_x = [wb(lay.self_attn.out_proj)[1] for lay in L]  # layer i's input carries sa out_proj's bias
            self.input_shift = s_x[0]  # carried by the decoder norm's output (the next loop's / the heads' input)
            bb, qs, rah = dbl.bbox_embed.layers, dbl.query_scale.layers, dbl.ref_anchor_head.layers
            rph1, rph2 = wb(dbl.ref_point_head.layers[0]), wb(dbl.ref_point_head.layers[1])
            self.put("rph1_w", rph1[0]), self.put("rph1_b", rph1[1])
            self.put("bb3_w", wb(bb[2])[0]), self.put("bb3_b", wb(bb[2])[1])
            self.put("bb3_c1", inv0 + wb(bb[2])[1])  # layer 1's box update: + inverse_sigmoid(ref0), constant
            for i, lay in enumerate(L):
                s_t1, s_t2 = wb(lay.cross_attn.out_proj)[1], wb(lay.linear2)[1]
                s_out = s_x[i + 1] if i + 1 < len(L) else torch.zeros_like(s_t1)
                sa = [wb(lay.sa_qcontent_proj), wb(lay.sa_kcontent_proj), wb(lay.sa_v_proj)]
                first = [wb(rah[0])] if i == 0 else [wb(bb[0]), wb(qs[0]), wb(rah[0])]
                second = [wb(rah[1])] if i == 0 else [wb(bb[1]), wb(qs[1]), wb(rah[1])]
                g_w, g_b = rows(*first, *sa)
                g_b = g_b - g_w @ s_x[i]
                if i == 0:  # + the constant positional q/k of layer 0's self-attention, per query
                    cqk = torch.cat([lay.sa_qpos_proj(qpos0), lay.sa_kpos_proj(qpos0)], -1)  # (Q, 2d)
                    zq = torch.zeros(qpos0.shape[0], d, dtype=torch.float64)
                    self.put("g0_c", g_b + torch.cat([zq, cqk, zq], -1))  # (Q, G) per-query bias
                    self.put("g0_w", g_w)
                    self.put("z0_w", second[0][0]), self.put("z0_b", second[0][1])
                else:  # ref_point_head's second layer folded into the positional q/k; its bias rides in g's
                    p_w, p_b = rows(chain(wb(lay.sa_qpos_proj), rph2), chain(wb(lay.sa_kpos_proj), rph2))
                    g_b = g_b + torch.cat([torch.zeros(3 * d, dtype=torch.float64), p_b, torch.zeros(d, dtype=torch.float64)])
                    self.put(f"g{i}_w", g_w), self.put(f"g{i}_b", g_b), self.put(f"p{i}_w", p_w)
                    # bbox_embed / query_scale second layers: one batched GEMM over their two d-wide inputs
                    self.put(f"z{i}_w", torch.stack([second[0][0].T, second[1][0].T]))  # (2, d, d) as W^T
                    self.put(f"z{i}_b", torch.stack([second[0][1], second[1][1]])[:, None])  # (2, 1, d)
                    self.put(f"rah2_{i}_w", second[2][0]), self.put(f"rah2_{i}_b", second[2][1])
                self.put(f"sao{i}_w", wb(lay.self_attn.out_proj)[0])
                qc, qsn = wb(lay.ca_qcontent_proj), wb(lay.ca_qpos_sine_proj)
                zero = torch.zeros(d, d, dtype=torch.float64)
                q_w = _interleave(torch.cat([qc[0], zero], 1).T, torch.cat([zero, qsn[0]], 1).T, h).T  # (2d, 2d)
                q_b = _interleave(qc[1], qsn[1], h) - q_w[:, :d] @ s_t1
                if i == 0:
                    qp = lay.ca_qpos_proj(qpos0)  # (Q, d)
                    self.put("q0_c", q_b + _interleave(qp, torch.zeros_like(qp), h))
                    self.put("q0_w", q_w)
                else:  # [content | sine] query as one batched GEMM over [t1 | mod], interleaved per head after
                    self.put(f"q{i}_w", torch.stack([qc[0].T, qsn[0].T]))  # (2, d, d) as W^T
                    self.put(f"q{i}_b", torch.stack([qc[1] - qc[0] @ s_t1, qsn[1]])[:, None])  # (2, 1, d)
                self.put(f"cao{i}_w", wb(lay.cross_attn.out_proj)[0])
                for n, shift in (("norm1", s_t1), ("norm2", s_t2), ("norm3", s_out)):
                    ln = getattr(lay, n)
                    self.put(f"{n}_{i}_w", f64(ln.weight)), self.put(f"{n}_{i}_b", f64(ln.bias) + shift)
                l1w, l1b = wb(lay.linear1)
                self.put(f"l1_{i}_w", l1w), self.put(f"l1_{i}_b", l1b - l1w @ s_t2)
                self.put(f"l2_{i}_w", wb(lay.linear2)[0])
                self.put(f"prelu_{i}", f64(lay.activation.weight))
            self.eps = [(lay.norm1.eps, lay.norm2.eps, lay.norm3.eps) for lay in L]
            self.put("norm_w", f64(dbl.norm.weight)), self.put("norm_b", f64(dbl.norm.bias) + s_x[0])
            self.norm_eps = dbl.norm.eps

            # ---- loop 0, layer 0: tgt = 0, so everything up to the cross-attention query is constant
            l0 = L[0]
            zeros = torch.zeros_like(qpos0)[:, None]  # (Q, 1, d)
            q = l0.sa_qcontent_proj(zeros) + l0.sa_qpos_proj(qpos0[:, None])
            k = l0.sa_kcontent_proj(zeros) + l0.sa_kpos_proj(qpos0[:, None])
            t1 = l0.norm1(zeros + l0.self_attn(q, k, l0.sa_v_proj(zeros)))  # (Q, 1, d)
            sine = s0[:, None] * (dbl.ref_anchor_head(zeros).sigmoid() / ref0[:, None, 1:2])
            qca = _interleave(l0.ca_qcontent_proj(t1) + l0.ca_qpos_proj(qpos0[:, None]), l0.ca_qpos_sine_proj(sine), h)
            self.put("t1_loop0", t1[:, 0] + wb(l0.cross_attn.out_proj)[1])  # (Q, d), bias-shifted
            self.put("qca_loop0", qca[:, 0].reshape(-1, h, 2 * self.hd).transpose(0, 1))  # (H, Q, 2 hd)

            # ---- memory side, all layers at once
            mem = [w for lay in L for w in (wb(lay.ca_kcontent_proj), wb(lay.ca_v_proj))]
            if mem_extra is not None:
                mem.append(mem_extra)
            self.mem_extra_dim = 0 if mem_extra is None else mem_extra[0].shape[0]
            m_w, m_b = rows(*mem)
            self.put("mem_w", m_w), self.put("mem_b", m_b)
            kp_w, kp_b = rows(*[wb(lay.ca_kpos_proj) for lay in L])
            self.put("kpos_w", kp_w), self.put("kpos_b", kp_b)

    # ------------------------------------------------------------------------------------------------
    def _memory_side(self, memory: Tensor, pos: Tensor, packing: Packing | None = None) -> tuple[list, list, Tensor]:
        """Per layer: keys (B, H, L, 2 hd) ``[k_content | k_pos]`` per head and values (B, H, L, hd), contiguous
        off CUDA (the bmm attention reads them without a copy, once per loop, k^T as a transposed view: its
        baddbmm is as fast or faster than on a (B, H, 2 hd, L)-contiguous k^T, and this cat of two head views is
        5.8x cheaper than building that one, 76 vs 441 us at B=32 bf16; the decoder 0.97-1.0x) or views of the
        GEMM outputs on CUDA (SDPA's layout); the extra memory columns. With ``packing`` memory and pos are the
        packed clips (1, R, d) and the GEMM outputs are unpacked (:mod:`.packing`)."""
        d = memory.shape[-1]
        h, hd = self.nhead, self.hd
        kv = to_padded(linear(memory, self.mem_w, self.mem_b), packing)  # (B, L, 2d * n_layers + extra)
        kp = to_padded(linear(pos, self.kpos_w, self.kpos_b), packing)  # (B, L, d * n_layers)
        b, l = kv.shape[:2]
        bmm = use_bmm_attention(memory)
        keys, values = [], []
        for i in range(self.nl):
            kc, kpi = kv[..., 2 * d * i: 2 * d * i + d], kp[..., d * i: d * (i + 1)]
            if i == 0:  # the first layer's content keys carry the positions too
                kc = kc + kpi
            kc, kpi = kc.reshape(b, l, h, hd), kpi.reshape(b, l, h, hd)
            v = kv[..., 2 * d * i + d: 2 * d * (i + 1)]
            if bmm:  # k (B, H, L, 2 hd) and v (B, H, L, hd) contiguous
                keys.append(torch.cat([kc.transpose(1, 2), kpi.transpose(1, 2)], -1))  # bmm reads k^T as a view
                values.append(heads(v, h).contiguous())
            else:
                keys.append(torch.cat([kc, kpi], -1).transpose(1, 2))  # (B, H, L, 2 hd)
                values.append(heads(v, h))
        return keys, values, kv[..., 2 * d * self.nl:]

    def _cross(self, i: int, t1: Tensor, q: Tensor, key: Tensor, value: Tensor, vmask: Mask) -> Tensor:
        """Cross-attention + norm2 + FFN + norm3 of layer i. t1 (B, Q, d) (or the (Q, d) loop-0 constant),
        q (B, H, Q, 2 hd)."""
        e1, e2, e3 = self.eps[i]
        a = attention(q, key, value, vmask, (2 * self.hd) ** -0.5)  # (B, Q, d)
        t2 = layer_norm(residual(t1, a, getattr(self, f"cao{i}_w")),
                        (getattr(self, f"norm2_{i}_w"), getattr(self, f"norm2_{i}_b")), e2)
        p = linear(t2, getattr(self, f"l1_{i}_w"), getattr(self, f"l1_{i}_b"), prelu=getattr(self, f"prelu_{i}"))
        return layer_norm(residual(t2, p, getattr(self, f"l2_{i}_w")),
                          (getattr(self, f"norm3_{i}_w"), getattr(self, f"norm3_{i}_b")), e3)

    def _self(self, i: int, x: Tensor, g: Tensor, qk: Tensor) -> Tensor:
        """Self-attention + norm1 of layer i: x (B, Q, d) its input, qk (B, Q, 2d), v = g's last d columns."""
        d, h = self.d, self.nhead
        a = attention(heads(qk[..., :d], h), heads(qk[..., d:], h), heads(g[..., -d:], h), None, self.hd ** -0.5)
        return layer_norm(residual(x, a, getattr(self, f"sao{i}_w")),
                          (getattr(self, f"norm1_{i}_w"), getattr(self, f"norm1_{i}_b")), self.eps[i][0])

    def _layer(self, i: int, x: Tensor, pre: Tensor | None, key: Tensor, value: Tensor, vmask: Mask):
        """Layer i > 0 or layer 0 after loop 0. x (B, Q, d) the layer input; pre (B, Q, 2) fp32 the previous
        layer's reference before its sigmoid (None for layer 0). Returns (out, this layer's reference before
        its sigmoid)."""
        b, nq, d = x.shape
        h, half = self.nhead, x.dtype != torch.float32
        if i == 0:
            g = residual(self.g0_c, x, self.g0_w)  # [rah1 | q | k | v]
            rah = linear(g[..., :d].relu(), self.z0_w, self.z0_b)  # (B, Q, 1)
            sine = (rah.float() if half else rah).sigmoid() * self.s0r  # (B, Q, d)
            t1 = self._self(0, x, g, g[..., d:3 * d])
            qin = torch.cat([t1, sine.to(x.dtype) if half else sine], -1)
            q = residual(self.q0_c, qin, self.q0_w)  # (B, Q, 2d)
            return self._cross(0, t1, heads(q, h), key, value, vmask), None
        g = linear(x, getattr(self, f"g{i}_w"), getattr(self, f"g{i}_b"))  # [bb1 | qs1 | rah1 | q | k | v]
        hid = g[..., :3 * d].relu()
        z = torch.baddbmm(getattr(self, f"z{i}_b"), hid[..., :2 * d].reshape(b * nq, 2, d).transpose(0, 1),
                          getattr(self, f"z{i}_w"))  # (2, B Q, d): [bb2, qs2]
        rah = linear(hid[..., 2 * d:], getattr(self, f"rah2_{i}_w"), getattr(self, f"rah2_{i}_b"))  # (B, Q, 1)
        bb = z[0].view(b, nq, d).relu()
        if i == 1 and not half:  # + inverse_sigmoid(ref0) + bias: a constant, inside the GEMM
            new_pre = residual(self.bb3_c1, bb, self.bb3_w)
        else:
            delta = linear(bb, self.bb3_w, self.bb3_b)
            inv = self.inv0 if i == 1 else _inverse_of_sigmoid(pre)
            new_pre = delta + inv  # fp32: a half delta is promoted inside the add (exact, no cast op)
        new_ref = new_pre.sigmoid()  # (B, Q, 2) this layer's reference
        sine = anchor_sine(new_ref, self.freq, self.phase)  # (B, Q, d) fp32
        scale = (rah.float() if half else rah).sigmoid() / new_ref[..., 1:2]
        if half:
            sine, scale = sine.to(x.dtype), scale.to(x.dtype)
        hr = linear(sine, self.rph1_w, self.rph1_b, relu=True)
        qk = residual(g[..., 3 * d:5 * d], hr, getattr(self, f"p{i}_w"))
        t1 = self._self(i, x, g, qk)
        mod = sine * z[1].view(b, nq, d) * scale
        q = torch.baddbmm(getattr(self, f"q{i}_b"), torch.stack([t1, mod]).view(2, b * nq, d), getattr(self, f"q{i}_w"))
        q = q.view(2, b, nq, h, -1).permute(1, 3, 2, 0, 4).reshape(b, h, nq, -1)  # (B, H, Q, 2 hd) [content | sine]
        return self._cross(i, t1, q, key, value, vmask), new_pre

    def forward(self, memory: Tensor, pos: Tensor, vkeep: Tensor, vmask: Mask | None = None,
                packing: Packing | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``vmask``: the video's attention mask if the caller already built it (shared with the fuser);
        ``packing``: memory and pos are the packed clips (1, R, d) (:mod:`.packing`)."""
        b = vkeep.shape[0]
        keys, values, extra = self._memory_side(memory, pos, packing)
        if vmask is None:
            vmask = attention_mask(vkeep, self.nhead, memory.dtype)
        x = None
        pre = None
        for j in range(self.loops):
            for i in range(self.nl):
                if j == 0 and i == 0:  # constant up to the cross-attention query
                    x = self._cross(0, self.t1_loop0, self.qca_loop0.expand(b, -1, -1, -1), keys[0], values[0], vmask)
                else:
                    x, pre = self._layer(i, x, pre, keys[i], values[i], vmask)
            x = layer_norm(x, (self.norm_w, self.norm_b), self.norm_eps)  # next loop's tgt; the last loop's hs
        return x, (self.inv0 if pre is None else _inverse_of_sigmoid(pre)), extra
