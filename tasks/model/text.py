"""Built-in text networks: token ids in (from the data's tokenizer, core/text.py), logits out.

text_cnn is Kim's (2014) sentence CNN trained from scratch: an embedding, convolutions of widths 3, 4 and 5 over
the sequence, max over time, dropout, linear. text_bow is a fastText-style bag of words: the mean of the tokens'
embeddings (padding excluded), one hidden layer. Both export to plain ONNX operators (Gather, Conv, ReduceMax).
"""

from __future__ import annotations

import torch
from torch import nn


class TextCNN(nn.Module):
    def __init__(self, n_classes: int, dropout: float, input_shape: tuple[int, ...], vocab_size: int = 30000,
                 pad_id: int = 0, embed_dim: int = 128, filters: int = 100, widths: tuple[int, ...] = (3, 4, 5)):
        super().__init__()
        self.pad_id = pad_id
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_id)
        self.convs = nn.ModuleList(nn.Conv1d(embed_dim, filters, w, padding=w - 1) for w in widths)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(filters * len(widths), n_classes))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens).transpose(1, 2)                                  # [B, embed, length]
        pooled = [torch.relu(conv(x)).amax(dim=2) for conv in self.convs]        # [B, filters] each
        return self.head(torch.cat(pooled, dim=1))


class TextBoW(nn.Module):
    def __init__(self, n_classes: int, dropout: float, input_shape: tuple[int, ...], vocab_size: int = 30000,
                 pad_id: int = 0, embed_dim: int = 64, hidden: int = 64):
        super().__init__()
        self.pad_id = pad_id
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_id)
        self.head = nn.Sequential(nn.Linear(embed_dim, hidden), nn.ReLU(), nn.Dropout(dropout),
                                  nn.Linear(hidden, n_classes))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        present = (tokens != self.pad_id).unsqueeze(-1).to(self.embed.weight.dtype)
        mean = (self.embed(tokens) * present).sum(1) / present.sum(1).clamp(min=1.0)
        return self.head(mean)


TEXT_ARCHITECTURES = {"text_cnn": TextCNN, "text_bow": TextBoW}
