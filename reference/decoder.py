"""Loop Decoder (paper §3.4 eqs. 29-31, spec §2.6): a Conditional/DAB-DETR 1-D decoder run N times.

One pass of :class:`TransformerDecoder` (2 layers, learned (center, width) anchors, iterative refinement)::

    ref = sigmoid(anchors);  refs = [ref]
    for layer l:
        se    = SineEmbed(ref)                                   # (Q, B, 256)
        qpos  = ref_point_head(se)                               # MLP 256 -> 256 -> 256
        se    = se * (1 if l == 0 else query_scale(out))         # cond_elewise
        se    = se * sigmoid(ref_anchor_head(out)) / ref_width   # modulated width attention
        out   = layer(out, memory, qpos, se, is_first=(l == 0))
        new   = sigmoid(bbox_embed(out) + inverse_sigmoid(ref))
        if l is not last: refs.append(new)                       # not detached in the list
        ref   = new.detach();  hs.append(norm(out))
    -> hs (n_layers, B, Q, d), references (n_layers, B, Q, 2)

:class:`LoopDecoder` runs that pass ``loops`` times with the same weights (paper eq. 29-31): Q_0 = 0,
Q_i = TD(Q_{i-1}, R), feeding the LN-normalised last-layer output back as ``tgt`` and re-using the
learned anchors each loop; only the last pass is returned. ``loops=1`` is exactly the released code,
whose ``return`` sits inside the loop (spec §7.1.1).

Parameter names are the official ones (``sa_qcontent_proj``, ``ca_qpos_sine_proj``, ...), so official
checkpoints load without renaming.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .position_encoding import anchor_sine_embed
from .span_utils import inverse_sigmoid
from .transformer import xavier_init


class MLP(nn.Module):
    """Linear layers with ReLU between them (DETR's MLP; official name ``layers.{i}``)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, dims[1:] + [output_dim]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class ConditionalAttention(nn.Module):
    """Multi-head attention with no input projection (Conditional-DETR): the layer projects q/k/v itself.

    q (Q, B, E), k (L, B, E), v (L, B, Dv), key_pad (B, L) bool True = padding -> (Q, B, Dv).
    Head dim E/H for the scores (scale (E/H)^-0.5), Dv/H for the values; out_proj is Dv -> Dv.
    """

    def __init__(self, embed_dim: int, num_heads: int, vdim: int, dropout: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.scaling = float(embed_dim // num_heads) ** -0.5
        self.out_proj = nn.Linear(vdim, vdim)
        nn.init.zeros_(self.out_proj.bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, key_pad: Tensor | None = None) -> Tensor:
        nq, b, e = q.shape
        nk, dv, h = k.shape[0], v.shape[-1], self.num_heads
        # contiguous heads: inductor's SDPA pattern rewrite (_sfdp_replacement_29, torch 2.11-2.13) matches the
        # permuted views of the CPU math path and mis-broadcasts the mask ([L, H] against [Q, H])
        q = q.reshape(nq, b, h, e // h).permute(1, 2, 0, 3).contiguous()  # (B, H, Q, E/H)
        k = k.reshape(nk, b, h, e // h).permute(1, 2, 0, 3).contiguous()  # (B, H, L, E/H)
        v = v.reshape(nk, b, h, dv // h).permute(1, 2, 0, 3).contiguous()  # (B, H, L, Dv/H)
        keep = None if key_pad is None else ~key_pad[:, None, None, :]  # (B, 1, 1, L), True = attend
        # softmax(q k^T * scaling, masked) @ v in one fused op (flash / memory-efficient kernels on GPU)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=self.scaling,
                                             dropout_p=self.dropout.p if self.training else 0.0)
        out = out.permute(2, 0, 1, 3).reshape(nq, b, dv)  # (Q, B, Dv)
        return self.out_proj(out)


class TransformerDecoderLayer(nn.Module):
    """Conditional-DETR decoder layer: self-attn, cross-attn with per-head [content | sine-pos] q/k, FFN."""

    def __init__(self, d_model: int = 256, nhead: int = 8, dim_feedforward: int = 1024, dropout: float = 0.1,
                 is_first: bool = False):
        super().__init__()
        d = d_model
        self.nhead = nhead
        # self-attention
        self.sa_qcontent_proj = nn.Linear(d, d)
        self.sa_qpos_proj = nn.Linear(d, d)
        self.sa_kcontent_proj = nn.Linear(d, d)
        self.sa_kpos_proj = nn.Linear(d, d)
        self.sa_v_proj = nn.Linear(d, d)
        self.self_attn = ConditionalAttention(d, nhead, vdim=d, dropout=dropout)
        self.norm1 = nn.LayerNorm(d)
        # cross-attention (the query positional projection exists in the first layer only)
        self.ca_qcontent_proj = nn.Linear(d, d)
        self.ca_qpos_proj = nn.Linear(d, d) if is_first else None
        self.ca_kcontent_proj = nn.Linear(d, d)
        self.ca_kpos_proj = nn.Linear(d, d)
        self.ca_v_proj = nn.Linear(d, d)
        self.ca_qpos_sine_proj = nn.Linear(d, d)
        self.cross_attn = ConditionalAttention(2 * d, nhead, vdim=d, dropout=dropout)
        # FFN
        self.linear1 = nn.Linear(d, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d)
        self.norm2 = nn.LayerNorm(d)
        self.norm3 = nn.LayerNorm(d)
        self.activation = nn.PReLU()
        self.dropout = nn.Dropout(dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def forward(self, tgt: Tensor, memory: Tensor, pos: Tensor, query_pos: Tensor, query_sine_embed: Tensor,
                memory_pad: Tensor) -> Tensor:
        """tgt (Q, B, d), memory/pos (L, B, d), query_pos/query_sine_embed (Q, B, d), memory_pad (B, L)."""
        # ---- self-attention
        q = self.sa_qcontent_proj(tgt) + self.sa_qpos_proj(query_pos)
        k = self.sa_kcontent_proj(tgt) + self.sa_kpos_proj(query_pos)
        tgt = self.norm1(tgt + self.dropout1(self.self_attn(q, k, self.sa_v_proj(tgt))))
        # ---- cross-attention
        nq, b, d = tgt.shape
        nk, h = memory.shape[0], self.nhead
        q = self.ca_qcontent_proj(tgt)
        k = self.ca_kcontent_proj(memory)
        k_pos = self.ca_kpos_proj(pos)
        if self.ca_qpos_proj is not None:
            q = q + self.ca_qpos_proj(query_pos)
            k = k + k_pos
        q_sine = self.ca_qpos_sine_proj(query_sine_embed)
        q = torch.cat([q.view(nq, b, h, d // h), q_sine.view(nq, b, h, d // h)], dim=3).view(nq, b, 2 * d)
        k = torch.cat([k.view(nk, b, h, d // h), k_pos.view(nk, b, h, d // h)], dim=3).view(nk, b, 2 * d)
        attn = self.cross_attn(q, k, self.ca_v_proj(memory), key_pad=memory_pad)
        tgt = self.norm2(tgt + self.dropout2(attn))
        # ---- FFN
        tgt2 = self.linear2(self.dropout(self.activation(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout3(tgt2))


class TransformerDecoder(nn.Module):
    """One decoder pass (see the module docstring)."""

    def __init__(self, num_layers: int = 2, d_model: int = 256, nhead: int = 8, dim_feedforward: int = 1024,
                 dropout: float = 0.1):
        super().__init__()
        self.d_model = d_model
        self.layers = nn.ModuleList(
            TransformerDecoderLayer(d_model, nhead, dim_feedforward, dropout, is_first=(i == 0))
            for i in range(num_layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.query_scale = MLP(d_model, d_model, d_model, 2)
        self.ref_point_head = MLP(d_model, d_model, d_model, 2)
        self.bbox_embed = MLP(d_model, d_model, 2, 3)
        self.ref_anchor_head = MLP(d_model, d_model, 1, 2)
        xavier_init(self)  # overwrites bbox_embed's zero-initialised last weight, as the official code does
        nn.init.zeros_(self.bbox_embed.layers[-1].bias)

    def forward(self, tgt: Tensor, memory: Tensor, memory_pad: Tensor, pos: Tensor,
                refpoints_unsigmoid: Tensor) -> tuple[Tensor, Tensor]:
        """tgt (Q, B, d), memory/pos (L, B, d), memory_pad (B, L), refpoints (Q, B, 2) ->
        hs (n_layers, B, Q, d), references (n_layers, B, Q, 2)."""
        out = tgt
        ref = refpoints_unsigmoid.sigmoid()  # (Q, B, 2)
        refs, hs = [ref], []
        for i, layer in enumerate(self.layers):
            sine = anchor_sine_embed(ref, self.d_model).to(ref.dtype)  # (Q, B, d); fp32 unless .half()
            query_pos = self.ref_point_head(sine)
            if i > 0:
                sine = sine * self.query_scale(out)
            sine = sine * (self.ref_anchor_head(out).sigmoid() / ref[..., 1:2])
            out = layer(out, memory, pos, query_pos, sine, memory_pad)
            new_ref = (self.bbox_embed(out) + inverse_sigmoid(ref)).sigmoid()
            if i != len(self.layers) - 1:
                refs.append(new_ref)
            ref = new_ref.detach()
            hs.append(self.norm(out))
        return torch.stack(hs).transpose(1, 2), torch.stack(refs).transpose(1, 2)


class LoopDecoder(nn.Module):
    """Runs the same :class:`TransformerDecoder` ``loops`` times (official name ``transformer_decoder``)."""

    def __init__(self, num_layers: int = 2, d_model: int = 256, nhead: int = 8, dim_feedforward: int = 1024,
                 dropout: float = 0.1, loops: int = 3):
        super().__init__()
        self.loops = loops
        self.transformer_decoder = TransformerDecoder(num_layers, d_model, nhead, dim_feedforward, dropout)

    def forward(self, memory: Tensor, memory_pad: Tensor, pos: Tensor, anchors: Tensor) -> tuple[Tensor, Tensor]:
        """memory/pos (L, B, d), memory_pad (B, L) bool, anchors (Q, 2) un-sigmoided ->
        hs (n_layers, B, Q, d), references (n_layers, B, Q, 2) of the last loop."""
        b = memory.shape[1]
        refpoints = anchors[:, None, :].repeat(1, b, 1)  # (Q, B, 2), reset every loop
        tgt = memory.new_zeros(anchors.shape[0], b, memory.shape[2])  # Q_0 = 0, (Q, B, d)
        for _ in range(self.loops):
            hs, references = self.transformer_decoder(tgt, memory, memory_pad, pos, refpoints)
            tgt = hs[-1].transpose(0, 1)  # LN-normalised last-layer output, (B, Q, d) -> (Q, B, d)
        return hs, references
