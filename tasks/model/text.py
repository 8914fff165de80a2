"""Built-in text networks: token ids in (from the data's tokenizer, core/text.py), logits out.

text_cnn is Kim's (2014) sentence CNN trained from scratch: an embedding, convolutions of widths 3, 4 and 5 over
the sequence, max over time, dropout, linear (model.kwargs.members K > 1: the mean of K of them, each trained on its own loss). text_bow is a fastText-style bag of words: the mean of the tokens'
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


class TextCNNEnsemble(nn.Module):
    """`members` TextCNNs, each initialised on its own and trained on its own loss; it answers with the mean of
    their logits.

    One Kim CNN trained from scratch on SST-2 lands anywhere in about two points of dev accuracy depending on
    its seed (docs/benchmarks.md, Text); the mean of three is both higher and steadier, at three times the
    compute, and still one ONNX graph of plain operators. In training mode forward returns every member's logits,
    [members, B, classes], and the train loop averages the members' cross-entropies: trained on the loss of
    their mean instead, the members co-adapt into one wide network and lose what averaging independent errors
    gains (SST-2 seed 2: 0.8028 against 0.8245, docs/benchmarks.md).
    """

    def __init__(self, n_classes: int, dropout: float, input_shape: tuple[int, ...], members: int, **kwargs):
        super().__init__()
        self.members = nn.ModuleList(TextCNN(n_classes, dropout, input_shape, **kwargs) for _ in range(members))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        logits = torch.stack([member(tokens) for member in self.members])  # [members, B, classes]
        return logits if self.training else logits.mean(dim=0)


def text_cnn(n_classes: int, dropout: float, input_shape: tuple[int, ...], members: int = 1, **kwargs) -> nn.Module:
    """model.arch text_cnn: one Kim CNN, or with model.kwargs.members K > 1 the mean of K (TextCNNEnsemble)."""
    if members < 1:
        raise TypeError(f"members must be at least 1, got {members}")
    if members == 1:  # the plain network: its state dict stays what checkpoints of one CNN hold
        return TextCNN(n_classes, dropout, input_shape, **kwargs)
    return TextCNNEnsemble(n_classes, dropout, input_shape, members, **kwargs)


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


TEXT_ARCHITECTURES = {"text_cnn": text_cnn, "text_bow": TextBoW}
