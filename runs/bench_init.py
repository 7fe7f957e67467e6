"""Multi-query associative recall (MQAR) with a sequence core: does its initialisation let it learn at small width?

    python -m wam.runs.bench_init [--steps 1500] [--inits scaled gpt2 torch] [--pairs 4 --length 32 --keys 16]

A sequence of T tokens (32) holds P key-value pairs (4; keys 1..K, values K+1..2K, K = 16) followed by
queries (a key seen before, then its value) up to T; the loss and the accuracy are on the values after
the queries.
Model: token embedding + learned positions + core (`positions="none"`, like the world-action model) +
LayerNorm + linear head; AdamW lr 3e-3, batch 64, one CPU thread. Prints the recall accuracy of each
initialisation on fresh sequences after training: the transformer core with `init="scaled"` (embeddings and
head N(0, 1/sqrt(d))) or `init="gpt2"` (N(0, 0.02)), and `torch` (PyTorch's pre-norm TransformerEncoder,
its default initialisation) as a reference.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from wam.worldmodel.cores.base import build_core

PAIRS, T, N_KEYS = 4, 32, 16
VOCAB = 1 + 2 * N_KEYS


def configure(pairs: int, length: int, keys: int) -> None:
    global PAIRS, T, N_KEYS, VOCAB
    PAIRS, T, N_KEYS, VOCAB = pairs, length, keys, 1 + 2 * keys


def batch(b: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens [b, T], targets [b, T] (-100 except at the value after each query)."""
    keys = torch.stack([torch.randperm(N_KEYS, generator=g)[:PAIRS] for _ in range(b)]) + 1  # [b, P]
    vals = torch.randint(0, N_KEYS, (b, PAIRS), generator=g) + 1 + N_KEYS
    ctx = torch.stack([keys, vals], -1).flatten(1)  # [b, 2P]
    n_q = (T - 2 * PAIRS) // 2
    qi = torch.randint(0, PAIRS, (b, n_q), generator=g)
    q = torch.stack([keys.gather(1, qi), vals.gather(1, qi)], -1).flatten(1)  # [b, 2 n_q]
    tokens = torch.cat([ctx, q], 1)
    targets = torch.full_like(tokens, -100)
    targets[:, 2 * PAIRS::2] = tokens[:, 2 * PAIRS + 1::2]  # the query key predicts its value
    return tokens, targets


class TorchCore(nn.Module):
    """Reference: PyTorch's pre-norm TransformerEncoder with a causal mask (its default initialisation)."""

    def __init__(self, d: int, layers: int) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.0, batch_first=True, norm_first=True,
                                           activation="gelu")
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1])
        return self.enc(x, mask=mask, is_causal=True), None


class Recall(nn.Module):
    def __init__(self, d: int, layers: int, init: str) -> None:
        super().__init__()
        self.emb, self.pos = nn.Embedding(VOCAB, d), nn.Embedding(T, d)
        if init == "torch":
            self.core = TorchCore(d, layers)
        else:
            self.core = build_core("transformer", d_model=d, n_layers=layers, n_heads=4, positions="none", init=init)
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, VOCAB)
        std = 0.02 if init == "gpt2" else d ** -0.5
        for m in (self.emb, self.pos):
            nn.init.normal_(m.weight, std=std)
        nn.init.normal_(self.head.weight, std=std)
        nn.init.zeros_(self.head.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.emb(tokens) + self.pos.weight[: tokens.shape[1]]
        y, _ = self.core(x)
        return self.head(self.ln(y))


def run(init: str, steps: int, d: int = 64, layers: int = 2, lr: float = 3e-3, seed: int = 0) -> tuple[float, float]:
    """(recall accuracy on 1,024 fresh sequences, seconds)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = Recall(d, layers, init)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    t0 = time.perf_counter()
    for _ in range(steps):
        tokens, targets = batch(64, g)
        loss = nn.functional.cross_entropy(model(tokens).flatten(0, 1), targets.flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        tokens, targets = batch(1024, torch.Generator().manual_seed(10_000 + seed))
        pred = model(tokens).argmax(-1)
        ok = targets != -100
        acc = float((pred[ok] == targets[ok]).float().mean())
    return acc, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--inits", nargs="+", default=["scaled", "gpt2", "torch"])
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--length", type=int, default=32)
    ap.add_argument("--keys", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    args = ap.parse_args()
    configure(args.pairs, args.length, args.keys)
    torch.set_num_threads(1)
    for init in args.inits:
        for seed in args.seeds:
            acc, sec = run(init, args.steps, d=args.d_model, seed=seed, lr=args.lr)
            print(f"init={init:7s} d={args.d_model} seed={seed}: recall {acc:.1%} after {args.steps} steps ({sec:.0f} s)",
                  flush=True)


if __name__ == "__main__":
    main()
