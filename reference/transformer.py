"""Transformer encoder stacks of the Convolutional Fuser (paper §3.3 eqs. 20-24, spec §2.5(b), (c), (e)).

All layers are post-norm, 8 heads, FFN width 1024 with a learnable PReLU, dropout 0.1, and work
sequence-first (L, B, d) like the official code. Key padding masks are bool with True = padding.

* :class:`T2VEncoderLayer` — cross-attention from video (queries, + sine pos) to text (keys, + text pos,
  zeros by default; values without pos)::

      a = v + Drop(MHA(v + pos_v, t + pos_t, t));   v = LN2(a + Drop(W2 Drop(PReLU(W1 LN1(a)))))

  Note the FFN residual adds the *un-normalised* ``a`` (LN1 only feeds the FFN). This is what the official
  layer computes (verified against the official oracle outputs); the code spec's shorthand
  ``LN2(LN1(a) + FFN(LN1(a)))`` does not reproduce them.

  The official layer also builds an attn_mask "query-is-pad AND key-is-pad"; it is implied by the text
  key padding mask, so it is not built here.
* :class:`TransformerEncoderLayer` — self-attention over video with pos re-added to q and k in every layer.
* :class:`TransformerEncoder` — a stack of either, no final norm (official name ``layers.{i}``).

Xavier-uniform init of every >1-D parameter, as the official code does after construction.
"""

from __future__ import annotations

from torch import Tensor, nn


class _FFNMixin(nn.Module):
    """The shared post-norm FFN sub-block: x = LN2(x + Drop(W2 Drop(PReLU(W1 x))))."""

    def _init_ffn(self, d_model: int, dim_feedforward: int, dropout: float) -> None:
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.activation = nn.PReLU()
        self.dropout = nn.Dropout(dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def _ffn(self, x: Tensor) -> Tensor:
        x2 = self.linear2(self.dropout(self.activation(self.linear1(x))))
        return self.norm2(x + self.dropout2(x2))


class T2VEncoderLayer(_FFNMixin):
    def __init__(self, d_model: int = 256, nhead: int = 8, dim_feedforward: int = 1024, dropout: float = 0.1):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)  # official name
        self._init_ffn(d_model, dim_feedforward, dropout)

    def forward(self, vid: Tensor, txt: Tensor, pos_vid: Tensor, txt_pad: Tensor,
                pos_txt: Tensor | None = None) -> Tensor:
        """vid (L, B, d), txt (N, B, d), pos_vid (L, B, d), txt_pad (B, N) bool -> (L, B, d)."""
        key = txt if pos_txt is None else txt + pos_txt
        attn = self.self_attn(vid + pos_vid, key, txt, key_padding_mask=txt_pad, need_weights=False)[0]
        vid = vid + self.dropout1(attn)
        # the FFN reads LN1(x) but its residual adds the un-normalised x (the official layer does this)
        ffn = self.linear2(self.dropout(self.activation(self.linear1(self.norm1(vid)))))
        return self.norm2(vid + self.dropout2(ffn))


class TransformerEncoderLayer(_FFNMixin):
    def __init__(self, d_model: int = 256, nhead: int = 8, dim_feedforward: int = 1024, dropout: float = 0.1):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self._init_ffn(d_model, dim_feedforward, dropout)

    def forward(self, x: Tensor, pos: Tensor, pad: Tensor) -> Tensor:
        """x (L, B, d), pos (L, B, d), pad (B, L) bool -> (L, B, d)."""
        qk = x + pos
        attn = self.self_attn(qk, qk, x, key_padding_mask=pad, need_weights=False)[0]
        x = self.norm1(x + self.dropout1(attn))
        return self._ffn(x)


class TransformerEncoder(nn.Module):
    """A stack of ``num_layers`` layers built by ``layer_cls``; forward passes its arguments through."""

    def __init__(self, layer_cls: type, num_layers: int, d_model: int = 256, nhead: int = 8,
                 dim_feedforward: int = 1024, dropout: float = 0.1):
        super().__init__()
        self.layers = nn.ModuleList(layer_cls(d_model, nhead, dim_feedforward, dropout) for _ in range(num_layers))
        xavier_init(self)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        for layer in self.layers:
            x = layer(x, *args, **kwargs)
        return x


def xavier_init(module: nn.Module) -> None:
    """Xavier-uniform on every >1-D parameter (the official post-construction init)."""
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)
