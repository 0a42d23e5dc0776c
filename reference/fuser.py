"""Convolutional Fuser (paper §3.3, spec §2.5): V2T Extractor -> T2V Encoder -> Transformer Encoder 1
-> Convolutional Blocks -> Transformer Encoder 2, producing the multimodal memory R.

Shapes: V', T' (B, L, d) / (B, N, d), masks (B, L) / (B, N) bool (True = valid), pos_vid (B, L, d),
pos_txt (B, N, d) or None -> R (L, B, d) (sequence-first, like the official code).
"""

from __future__ import annotations

from torch import Tensor, nn

from .conv_blocks import ConvolutionalBlocks
from .transformer import T2VEncoderLayer, TransformerEncoder, TransformerEncoderLayer, xavier_init
from .v2t_extractor import V2TExtractor


class ConvolutionalFuser(nn.Module):
    def __init__(self, hidden_dim: int = 256, nheads: int = 8, dim_feedforward: int = 1024, dropout: float = 0.1,
                 v2t_dropout: float = 0.1, num_t2v_layers: int = 2, num_encoder1_layers: int = 2,
                 num_convolutional_blocks: int = 5, num_encoder2_layers: int = 2, bn_stats: str = "all"):
        super().__init__()
        args = (hidden_dim, nheads, dim_feedforward, dropout)
        self.v2t_extractor = V2TExtractor(hidden_dim, v2t_dropout)
        xavier_init(self.v2t_extractor)
        self.t2v_encoder = TransformerEncoder(T2VEncoderLayer, num_t2v_layers, *args)
        self.transformer_encoder1 = TransformerEncoder(TransformerEncoderLayer, num_encoder1_layers, *args)
        self.convolutional_block = ConvolutionalBlocks(hidden_dim, num_convolutional_blocks, bn_stats)
        self.transformer_encoder2 = TransformerEncoder(TransformerEncoderLayer, num_encoder2_layers, *args)

    def forward(self, vid: Tensor, txt: Tensor, vid_mask: Tensor, txt_mask: Tensor, pos_vid: Tensor,
                pos_txt: Tensor | None = None) -> Tensor:
        x = self.v2t_extractor(vid, txt, vid_mask, txt_mask)  # V'v (B, L, d)
        x = x.transpose(0, 1)  # (L, B, d)
        pos = pos_vid.transpose(0, 1)  # (L, B, d)
        txt_s = txt.transpose(0, 1)  # (N, B, d)
        pos_txt_s = None if pos_txt is None else pos_txt.transpose(0, 1)
        vid_pad, txt_pad = ~vid_mask, ~txt_mask
        x = self.t2v_encoder(x, txt_s, pos, txt_pad, pos_txt_s)
        x = self.transformer_encoder1(x, pos, vid_pad)
        x = self.convolutional_block(x, vid_mask)
        return self.transformer_encoder2(x, pos, vid_pad)  # R (L, B, d)
