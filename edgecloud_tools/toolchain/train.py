"""Supervised training on CPU: AdamW with a one-cycle schedule, flip/rotate augmentation, progress per
epoch. Seeded, so a rebuild trains the same way (multi-threaded CPU kernels still make runs differ
slightly)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class TrainConfig:
    """How long and how hard to train one model."""

    epochs: int = 8
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 1e-4
    seed: int = 0


def _augment(x: Tensor) -> Tensor:
    """A random one of the 8 flips/rotations per batch: every class here is orientation-free."""
    k = int(torch.randint(0, 4, ()))
    x = torch.rot90(x, k, dims=(2, 3))
    return torch.flip(x, dims=(3,)) if bool(torch.randint(0, 2, ())) else x


def predict(model: nn.Module, images: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """Logits [N, K] of ``model`` in eval mode."""
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            out.append(model(torch.from_numpy(images[start:start + batch_size])).numpy())
    return np.concatenate(out)


def train(model: nn.Module, images: np.ndarray, labels: np.ndarray, config: TrainConfig,
          val: tuple[np.ndarray, np.ndarray], name: str,
          log: Callable[[str], None] | None = None) -> float:
    """Train ``model`` in place and return its accuracy on ``val``; one progress line per epoch."""
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    torch.manual_seed(config.seed)
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    steps = -(-len(x) // config.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.lr, epochs=config.epochs,
                                                   steps_per_epoch=steps)
    loss_fn = nn.CrossEntropyLoss()
    val_acc = 0.0
    for epoch in range(1, config.epochs + 1):
        started = time.perf_counter()
        model.train()
        order = torch.randperm(len(x))
        total = 0.0
        for start in range(0, len(x), config.batch_size):
            idx = order[start:start + config.batch_size]
            loss = loss_fn(model(_augment(x[idx])), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(idx)
        val_acc = float(np.mean(predict(model, val[0]).argmax(axis=1) == val[1]))
        log(f"  {name}: epoch {epoch}/{config.epochs}  loss {total / len(x):.4f}  "
            f"val acc {val_acc:.2%}  ({time.perf_counter() - started:.1f} s)")
    model.eval()
    return val_acc
