"""Fused unimodal encoders and Convolutional Fuser (replace ``reference.unimodal_encoder``,
``reference.v2t_extractor``, ``reference.transformer`` and ``reference.conv_blocks`` at inference).

Everything is batch-first, (B, L, d) / (B, N, d); masks are bool, True = valid. What changes against the
reference, all derived from its weights at build time:

* the text encoder's last linear also emits, in the same GEMM, every linear map of the text the fuser needs:
  ``txt * w4mlu``, the V2T score terms ``txt . w4Q`` and ``txt . weight`` (attention pooling), and the keys and
  values of every T2V layer (``chain``: W_k (W_2 x + b_2) + b_k as one affine map; text is N <= 32 rows, so the
  wider GEMM is cheap). The video encoder's last linear likewise emits ``vid . w4C`` and a column of ones, so
  the V2T score ``A = V'wC + (T'wQ)^T + (V' * wM) T'^T`` is ONE batched matmul;
* V2T: ``(A_r A_c^T) V'`` is evaluated as ``A_r (A_c^T V')`` (one matmul for T_v and V_t), the 1x1 convolution
  ``cqa_linear`` is folded into the first half of ``conv1d`` (two linears with nothing between them) and the
  pooled text vector enters the same GEMM;
* attention projections packed (q and k of the self-attention in one GEMM, k and v of the T2V layers in the
  text GEMM); attention is one SDPA kernel on CUDA and baddbmm/softmax/bmm off it
  (:func:`engine.fused.common.attention`), the mask bias built once per forward;
* Convolutional Blocks: BatchNorm folded once into buffers (``kernels.conv_block.fold_conv_bn``); on the CPU
  each k=3 conv is one oneDNN convolution on a prepacked kernel with ReLU (and the second one's residual
  add) in its epilogue (:func:`kernels.onednn.conv3`), else one GEMM over the three shifted inputs
  ``[x_{t-1} | x_t | x_{t+1}]`` (one strided copy of the padded input, see :class:`FusedConvBlocks`), the
  second with the residual and bias accumulated in the same GEMM; on CUDA the fused Triton block kernel; on packed
  clips (:mod:`.packing`) one GEMM over rows gathered from each clip's neighbours. Padded clips are zero
  between blocks (the reference zeroes them before each conv), so only valid clips of the result are defined,
  as in the reference.
* padding removed (off CUDA, :mod:`.packing`): with ``packing`` the per-clip tensors are the packed clips
  (1, R, w); each layer's row-wise work runs on them, its attention on the padded layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from reference.conv_blocks import ConvolutionalBlocks
from reference.fuser import ConvolutionalFuser
from reference.transformer import T2VEncoderLayer, TransformerEncoderLayer
from reference.unimodal_encoder import UnimodalEncoder
from reference.v2t_extractor import V2TExtractor

from kernels.onednn import addmm_t, conv3, is_tracing as _is_tracing, linear, linear_add
from .common import (FusedModule, Mask, attention, attention_mask, chain, f64, heads, layer_norm, masked, mha_wb,
                     residual, rows, wb)
from .packing import Packing, to_padded, to_rows


def _ln(module) -> tuple[Tensor, Tensor]:
    return f64(module.weight), f64(module.bias)


class FusedUnimodalEncoder(FusedModule):
    """LN -> Linear -> ReLU -> LN -> Linear, the last linear extended by ``extra`` affine maps of its output.

    forward(x (B, T, D_in)) -> (B, T, d + extra_dim): [encoder output | extra(encoder output)]."""

    replaces = "reference.unimodal_encoder.UnimodalEncoder"

    def __init__(self, enc: UnimodalEncoder, extra: tuple[Tensor, Tensor] | None = None):
        super().__init__()
        self.eps1, self.eps2 = enc.norm1.eps, enc.norm2.eps
        for name, t in zip(("n1w", "n1b"), _ln(enc.norm1)):
            self.put(name, t)
        for name, t in zip(("n2w", "n2b"), _ln(enc.norm2)):
            self.put(name, t)
        w1, b1 = wb(enc.linear1)
        w2, b2 = wb(enc.linear2)
        if extra is not None:
            w2, b2 = rows((w2, b2), chain(extra, (w2, b2)))
        self.put("w1", w1), self.put("b1", b1), self.put("w2", w2), self.put("b2", b2)

    def forward(self, x: Tensor) -> Tensor:
        x = linear(layer_norm(x, (self.n1w, self.n1b), self.eps1), self.w1, self.b1, relu=True)
        return linear(layer_norm(x, (self.n2w, self.n2b), self.eps2), self.w2, self.b2)


def video_extra(v2t: V2TExtractor) -> tuple[Tensor, Tensor]:
    """Rows appended to the video encoder's output: [vid . w4C | 1] (the V2T score's video-side columns)."""
    d = v2t.w4C.shape[0]
    w = torch.cat([f64(v2t.w4C).T, torch.zeros(1, d, dtype=torch.float64)], 0)  # (2, d)
    return w, torch.tensor([0.0, 1.0], dtype=torch.float64)


def text_extra(v2t: V2TExtractor, t2v_layers, use_txt_pos: bool) -> tuple[Tensor, Tensor]:
    """Rows appended to the text encoder's output: [txt * w4mlu | 1 | txt . w4Q | txt . weight | k_0 | v_0 | ...].

    With ``use_txt_pos`` the T2V keys also read the positional term, added by the fuser (k rows stay here)."""
    d = v2t.w4C.shape[0]
    z = torch.zeros
    parts = [(torch.diag(f64(v2t.w4mlu).reshape(d)), z(d, dtype=torch.float64)),
             (z(1, d, dtype=torch.float64), torch.ones(1, dtype=torch.float64)),
             (f64(v2t.w4Q).T, z(1, dtype=torch.float64)),
             (f64(v2t.weight).T, z(1, dtype=torch.float64))]
    for layer in t2v_layers:
        _, wk, wv, _, bk, bv = mha_wb(layer.self_attn)
        parts += [(wk, bk), (wv, bv)]
    return rows(*parts)


class FusedV2T(FusedModule):
    """V2T Extractor. forward(vid_ext (Bv, L, d + 2) = [V' | V'wC | 1], txt (B, N, d), txt_score (B, N, d + 2) =
    [T' * wM | 1 | T'wQ], pool_logit (B, N), vkeep (B, L), tkeep (B, N)) -> V'v (B, L, d)."""

    replaces = "reference.v2t_extractor.V2TExtractor"

    def __init__(self, v2t: V2TExtractor):
        super().__init__()
        d = v2t.w4C.shape[0]
        wc, bc = f64(v2t.cqa_linear.weight)[:, :, 0], f64(v2t.cqa_linear.bias)  # (d, 4d)
        wo, bo = f64(v2t.conv1d.weight)[:, :, 0], f64(v2t.conv1d.bias)  # (d, 2d)
        w, b = chain((wo[:, :d], bo), (wc, bc))  # conv1d's fused-half o cqa_linear: (d, 4d)
        self.put("w", torch.cat([w, wo[:, d:]], 1))  # input [V' | T_v | V'*T_v | V'*V_t | pooled]: (d, 5d)
        self.put("b", b)

    def forward(self, vid_ext: Tensor, txt: Tensor, txt_score: Tensor, pool_logit: Tensor, vkeep: Tensor,
                tkeep: Tensor, packing: Packing | None = None, vid_packed: Tensor | None = None) -> Tensor:
        """``packing`` (:mod:`.packing`): the row-wise tail runs on the packed clips, ``vid_packed`` (1, R, d) the packed
        V' (the scores and V_t read the padded ``vid_ext``); returns (1, R, d) then."""
        b, n, d = txt.shape
        vid = vid_ext[..., :d]
        score = torch.matmul(vid_ext, txt_score.transpose(1, 2))  # (B, L, N)
        a_r = torch.softmax(masked(score, tkeep[:, None, :]), dim=2)  # over tokens
        a_c = torch.softmax(masked(score, vkeep[:, :, None]), dim=1)  # over clips
        tv = torch.matmul(a_r, torch.cat([txt, torch.matmul(a_c.transpose(1, 2), vid)], 2))  # [T_v | V_t] (B, L, 2d)
        beta = torch.softmax(masked(pool_logit, tkeep), dim=1)  # (B, N)
        pooled = torch.matmul(beta[:, None, :], txt)  # (B, 1, d)
        if packing is not None:  # the clips computed: (1, R, .)
            vid, tv, pooled = vid_packed, packing.pack(tv), packing.per_row(pooled[:, 0])
        bb, l = tv.shape[:2]
        prod = (vid[:, :, None, :] * tv.view(bb, l, 2, d)).view(bb, l, 2 * d)  # [V'*T_v | V'*V_t]
        x = torch.cat([vid.expand(bb, l, d), tv[..., :d], prod, pooled.expand(bb, l, d)], 2)  # (B, L, 5d)
        return linear(x, self.w, self.b, relu=True)


class _FFN(FusedModule):
    """Shared parts of the fused encoder layers. Bias shift (see engine.fused.decoder): ``in_shift`` is the
    bias this layer's input carries (its own attention out_proj bias, when the input comes from the
    previous layer's norm2), ``out_shift`` the one its output must carry (the next layer's)."""

    def _init_ffn(self, layer, out_shift: Tensor | None, shift_ffn: bool) -> None:
        l1w, l1b = f64(layer.linear1.weight), f64(layer.linear1.bias)
        l2b = f64(layer.linear2.bias)
        n1b, n2b = f64(layer.norm1.bias), f64(layer.norm2.bias)
        self.shift_ffn = shift_ffn
        if shift_ffn:  # norm1's output feeds the FFN residual: it carries linear2's bias
            n1b, l1b, l2b = n1b + l2b, l1b - l1w @ l2b, None
        if out_shift is not None:
            n2b = n2b + out_shift
        self.put("l1w", l1w), self.put("l1b", l1b)
        self.put("l2w", f64(layer.linear2.weight))
        if l2b is not None:
            self.put("l2b", l2b)
        self.put("prelu", f64(layer.activation.weight))
        self.put("n1w", f64(layer.norm1.weight)), self.put("n1b", n1b)
        self.put("n2w", f64(layer.norm2.weight)), self.put("n2b", n2b)
        self.eps1, self.eps2 = layer.norm1.eps, layer.norm2.eps
        self.nhead = layer.self_attn.num_heads
        self.put("ow", f64(layer.self_attn.out_proj.weight)), self.put("ob", f64(layer.self_attn.out_proj.bias))

    def _attn_residual(self, x: Tensor, a: Tensor) -> Tensor:
        """x + out_proj(a) for a (B, L, d) merged heads: one addmm when x carries the bias."""
        return residual(x, a, self.ow) if self.in_shifted else x + linear(a, self.ow, self.ob)

    def _hidden(self, x: Tensor) -> Tensor:
        return linear(x, self.l1w, self.l1b, prelu=self.prelu)


def _shift_in(w: Tensor, b: Tensor, shift: Tensor | None) -> Tensor:
    """The bias of a linear reading an input that carries ``shift``."""
    return b if shift is None else b - w @ shift


class FusedT2VLayer(_FFN):
    """forward(vid (B, L, d), pos (B, L, d), kv (B, N, 2d) [k | v] from the text GEMM, tmask (the text's
    :func:`~engine.fused.common.attention_mask`))."""

    replaces = "reference.transformer.T2VEncoderLayer"

    def __init__(self, layer: T2VEncoderLayer, in_shifted: bool = False, out_shift: Tensor | None = None):
        super().__init__()
        self._init_ffn(layer, out_shift, shift_ffn=False)  # its FFN residual adds the un-normalised x
        self.in_shifted = in_shifted
        wq, _, _, bq, _, _ = mha_wb(layer.self_attn)
        self.put("qw", wq), self.put("qb", _shift_in(wq, bq, f64(layer.self_attn.out_proj.bias) if in_shifted else None))

    def forward(self, vid: Tensor, pos: Tensor, kv: Tensor, tmask: Mask, packing: Packing | None = None) -> Tensor:
        d = vid.shape[-1]
        q = to_padded(linear(vid + pos, self.qw, self.qb), packing)
        h = self.nhead
        a = attention(heads(q, h), heads(kv[..., :d], h), heads(kv[..., d:], h), tmask, (d // h) ** -0.5)
        vid = self._attn_residual(vid, to_rows(a, packing))
        # the FFN reads LN1(x) but its residual adds the un-normalised x (as the reference layer)
        f = linear(self._hidden(layer_norm(vid, (self.n1w, self.n1b), self.eps1)), self.l2w, self.l2b)
        return layer_norm(vid + f, (self.n2w, self.n2b), self.eps2)


class FusedEncoderLayer(_FFN):
    """forward(x (B, L, d), pos (B, L, d), vmask (the video's :func:`~engine.fused.common.attention_mask`)) ->
    (B, L, d)."""

    replaces = "reference.transformer.TransformerEncoderLayer"

    def __init__(self, layer: TransformerEncoderLayer, in_shifted: bool = False, out_shift: Tensor | None = None):
        super().__init__()
        self._init_ffn(layer, out_shift, shift_ffn=True)
        self.in_shifted = in_shifted
        s = f64(layer.self_attn.out_proj.bias) if in_shifted else None
        wq, wk, wv, bq, bk, bv = mha_wb(layer.self_attn)
        qkw, qkb = rows((wq, bq), (wk, bk))
        self.put("qkw", qkw), self.put("qkb", _shift_in(qkw, qkb, s))
        self.put("vw", wv), self.put("vb", _shift_in(wv, bv, s))

    def forward(self, x: Tensor, pos: Tensor, vmask: Mask, packing: Packing | None = None) -> Tensor:
        d = x.shape[-1]
        qk = to_padded(linear(x + pos, self.qkw, self.qkb), packing)
        v = to_padded(linear(x, self.vw, self.vb), packing)
        h = self.nhead
        a = attention(heads(qk[..., :d], h), heads(qk[..., d:], h), heads(v, h), vmask, (d // h) ** -0.5)
        x = layer_norm(self._attn_residual(x, to_rows(a, packing)), (self.n1w, self.n1b), self.eps1)
        return layer_norm(residual(x, self._hidden(x), self.l2w), (self.n2w, self.n2b), self.eps2)


class FusedConvBlocks(FusedModule):
    """Convolutional Blocks with BN folded. forward(x (B, L, d) zero at padded clips, m (B, L, 1) float
    valid mask, vkeep (B, L) bool) -> (B, L, d), zero at padded clips.

    On the CPU each k=3 conv is one oneDNN convolution (:func:`kernels.onednn.conv3`: (B, L, d) contiguous is
    the channels-last layout it reads and writes, ReLU and the residual add in its epilogue; one conv alone
    is 1.5x the GEMM path at B=1 and 1.08x at B=32 on 2 threads, while in the whole B=1 forward the two
    paths are level within noise, 60 alternating pairs). Where that does not apply (small
    fp32 weights, tracing, grad, packing off) each conv is one GEMM over ``[x_{t-1} | x_t | x_{t+1}]``
    (B L, 3d): the rows of the zero-padded (B, L + 2, d) input overlap by d, so that matrix is one strided
    copy of it (no concatenation); the second conv's residual add and bias ride in its GEMM. The padded
    clips are zeroed after each conv (the reference zeroes them before each one; a valid clip next to the
    padding reads them) — two in-place multiplies per block (always: skipping them for unpadded batches would
    need a host read of the mask)."""

    replaces = "reference.conv_blocks.ConvolutionalBlocks"
    kernel_backend: str = "auto"
    kernel_precision: str = "auto"

    def __init__(self, blocks: ConvolutionalBlocks):
        super().__init__()
        from kernels.conv_block import fold_conv_bn

        self.n = len(blocks.blocks)
        for i, blk in enumerate(blocks.blocks):
            w1, b1 = fold_conv_bn(blk.conv1, blk.bn1)  # (D_out, D_in, 3), (D_out,) float64
            w2, b2 = fold_conv_bn(blk.conv2, blk.bn2)
            d = w1.shape[0]
            # (3 * D_in, D_out) with row k * D_in + c = W'[:, c, k]: the GEMM over [x_{t-1} | x_t | x_{t+1}]
            self.put(f"w1_{i}", w1.permute(2, 1, 0).reshape(3 * d, d)), self.put(f"b1_{i}", b1)
            self.put(f"w2_{i}", w2.permute(2, 1, 0).reshape(3 * d, d)), self.put(f"b2_{i}", b2)

    def _use_kernel(self, x: Tensor) -> bool:
        from kernels._utils import resolve_backend

        return not _is_tracing() and resolve_backend(self.kernel_backend, x.device) == "triton"

    def forward(self, x: Tensor, m: Tensor, vkeep: Tensor, packing: Packing | None = None) -> Tensor:
        """``packing`` (:mod:`.packing`): x (1, R, d) and m (1, R, 1) are the packed clips (see
        :meth:`_on_rows`)."""
        if packing is not None:
            if not self._use_kernel(x):
                return self._on_rows(x, m, packing)
            m = vkeep[..., None].to(x.dtype)  # the Triton kernel (interpreter) reads the padded layout
            return packing.pack(self.forward(packing.unpack(x) * m, m, vkeep))
        b, l, d = x.shape
        if self._use_kernel(x):
            from kernels.conv_block import FoldedBlock, residual_block_stack

            blocks = [FoldedBlock(getattr(self, f"w1_{i}").view(3, d, d), getattr(self, f"b1_{i}").float(),
                                  getattr(self, f"w2_{i}").view(3, d, d), getattr(self, f"b2_{i}").float())
                      for i in range(self.n)]
            return residual_block_stack(x.contiguous(), vkeep.contiguous(), blocks, seq_first=False,
                                        precision=self.kernel_precision) * m
        for i in range(self.n):
            w1, b1, w2, b2 = (getattr(self, f"{n}_{i}") for n in ("w1", "b1", "w2", "b2"))
            h = conv3(x, w1, b1)  # the CPU: one oneDNN convolution each (None where it does not apply)
            if h is None:
                h = addmm_t(b1, _shifted_rows(x), w1, relu=True).view(b, l, d)
            h = h.mul_(m)
            y = conv3(h, w2, b2, residual=x)
            if y is None:
                y = linear_add(x.reshape(b * l, d), _shifted_rows(h), w2, transposed=True, bias=b2).view(b, l, d).relu_()
            x = y.mul_(m)
        return x

    def _on_rows(self, x: Tensor, m: Tensor, packing: Packing) -> Tensor:
        """The blocks on the packed clips x (1, R, d), m (1, R, 1): each conv one GEMM over the rows
        ``[x_{t-1} | x_t | x_{t+1}]`` (:meth:`Packing.shifted`: a clip that is not valid, or outside the video,
        reads zeros — the reference's zeroing), the second with the residual add and bias in its GEMM; each
        block's output zeroed where not valid (as the padded path), so a residual never carries a value from
        there."""
        _, r, d = x.shape
        x = x.view(r, d)
        m = m.view(r, 1)
        for i in range(self.n):
            w1, b1, w2, b2 = (getattr(self, f"{n}_{i}") for n in ("w1", "b1", "w2", "b2"))
            h = addmm_t(b1, packing.shifted(x), w1, relu=True)
            x = linear_add(x, packing.shifted(h), w2, transposed=True, bias=b2).relu_().mul_(m)
        return x.view(1, r, d)


def _shifted_rows(x: Tensor) -> Tensor:
    """x (B, L, d) -> (B L, 3d) with row (b, t) = [x_{t-1} | x_t | x_{t+1}] (zero outside [0, L)): the rows of the
    zero-padded (B, L + 2, d) tensor read with a stride of d, made contiguous (one copy)."""
    b, l, d = x.shape
    xp = F.pad(x, (0, 0, 1, 1))  # (B, L + 2, d) contiguous
    if _is_tracing():  # exported / compiled graphs: three slices and a concat (ONNX turns as_strided into a Gather)
        return torch.cat([xp[:, :-2], xp[:, 1:-1], xp[:, 2:]], 2).reshape(b * l, 3 * d)
    return xp.as_strided((b, l, 3 * d), ((l + 2) * d, d, 1)).reshape(b * l, 3 * d).contiguous()


class FusedConvolutionalFuser(FusedModule):
    """The Convolutional Fuser after the encoders. forward(vid_ext, txt_ext, pos, pos_txt, vkeep, tkeep) -> R
    (B, L, d) batch-first; ``txt_ext`` is the text encoder's extended output (see :func:`text_extra`)."""

    replaces = "reference.fuser.ConvolutionalFuser"

    def __init__(self, fuser: ConvolutionalFuser, use_txt_pos: bool):
        super().__init__()
        self.v2t = FusedV2T(fuser.v2t_extractor)
        # bias shift across consecutive layers; the conv blocks (and the memory) read unshifted values
        stacks = [[(FusedT2VLayer, l) for l in fuser.t2v_encoder.layers]
                  + [(FusedEncoderLayer, l) for l in fuser.transformer_encoder1.layers],
                  [(FusedEncoderLayer, l) for l in fuser.transformer_encoder2.layers]]
        built = []
        for stack in stacks:
            for k, (cls, layer) in enumerate(stack):
                nxt = f64(stack[k + 1][1].self_attn.out_proj.bias) if k + 1 < len(stack) else None
                built.append(cls(layer, in_shifted=k > 0, out_shift=nxt))
        n_t2v, n_e1 = len(fuser.t2v_encoder.layers), len(fuser.transformer_encoder1.layers)
        self.t2v = torch.nn.ModuleList(built[:n_t2v])
        self.enc1 = torch.nn.ModuleList(built[n_t2v:n_t2v + n_e1])
        self.conv = FusedConvBlocks(fuser.convolutional_block)
        self.enc2 = torch.nn.ModuleList(built[n_t2v + n_e1:])
        self.use_txt_pos = use_txt_pos
        nheads = {m.nhead for m in (*self.t2v, *self.enc1, *self.enc2)}
        if len(nheads) > 1:
            raise ValueError(f"fused fuser: every attention layer must have the same number of heads, got {nheads}")
        self.nhead = nheads.pop() if nheads else 1
        if use_txt_pos:  # the T2V keys read txt + pos_txt: the positional half of every key projection
            wk = [mha_wb(l.self_attn)[1] for l in fuser.t2v_encoder.layers]
            d = fuser.v2t_extractor.w4C.shape[0]
            z = torch.zeros(d, d, dtype=torch.float64)
            self.put("kpos_w", torch.cat([w for k in wk for w in (k, z)], 0) if wk else torch.zeros(0, d))

    def forward(self, vid_ext: Tensor, txt_ext: Tensor, pos: Tensor, pos_txt: Tensor | None, vkeep: Tensor,
                tkeep: Tensor, vmask: Mask | None = None, packing: Packing | None = None,
                vid_packed: Tensor | None = None) -> Tensor:
        """``vmask``: the video's attention mask if the caller already built it (it is shared with the decoder).
        ``packing`` (:mod:`.packing`): the clips are packed — ``pos`` (1, R, d) and ``vid_packed`` (1, R, d + 2) the
        packed positions and video encoder output (``vid_ext`` stays padded), R (1, R, d) returned."""
        d = pos.shape[-1]
        txt = txt_ext[..., :d]
        x = self.v2t(vid_ext, txt, txt_ext[..., d:2 * d + 2], txt_ext[..., 2 * d + 2], vkeep, tkeep,
                     packing, None if vid_packed is None else vid_packed[..., :d])
        kv = txt_ext[..., 2 * d + 3:]  # (B, N, 2d * n_t2v)
        if self.use_txt_pos and len(self.t2v):
            kv = kv + linear(pos_txt, self.kpos_w)
        tmask = attention_mask(tkeep, self.nhead, x.dtype) if len(self.t2v) else None
        if vmask is None and len(self.enc1) + len(self.enc2):
            vmask = attention_mask(vkeep, self.nhead, x.dtype)
        for i, layer in enumerate(self.t2v):
            x = layer(x, pos, kv[..., 2 * d * i: 2 * d * (i + 1)], tmask, packing)
        for layer in self.enc1:
            x = layer(x, pos, vmask, packing)
        m = vkeep[..., None].to(x.dtype)  # (B, L, 1)
        x = self.conv(x * m, m, vkeep) if packing is None else self.conv(x, packing.pack(m), vkeep, packing)
        for layer in self.enc2:
            x = layer(x, pos, vmask, packing)
        return x
