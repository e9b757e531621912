"""A small causal transformer language model with seeded random weights, for tests
and benchmarks of generated-token attribution (no download)."""

import torch
from torch import nn


class TinyCausalLM(nn.Module):
    """Token and position embeddings, a causal transformer encoder, a vocabulary head."""

    def __init__(self, vocabulary: int = 64, width: int = 64, layers: int = 2, heads: int = 4,
                 max_length: int = 128, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.tokens = nn.Embedding(vocabulary, width)
        self.positions = nn.Embedding(max_length, width)
        block = nn.TransformerEncoderLayer(width, heads, dim_feedforward=2 * width, dropout=0.0,
                                           batch_first=True)
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, vocabulary)
        self.eval()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        length = ids.shape[1]
        positions = torch.arange(length, device=ids.device)
        hidden = self.tokens(ids) + self.positions(positions)
        causal = nn.Transformer.generate_square_subsequent_mask(length, device=ids.device)
        return self.head(self.blocks(hidden, mask=causal, is_causal=True))

    @torch.no_grad()
    def generate(self, prompt_ids: torch.Tensor, steps: int) -> torch.Tensor:
        """Greedy continuation: (B, steps) token ids."""
        ids = prompt_ids
        for _ in range(steps):
            ids = torch.cat([ids, self(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
        return ids[:, prompt_ids.shape[1]:]
