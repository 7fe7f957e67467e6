"""Typed batches handed from the data layer to the models."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch


@dataclass
class Batch:
    """A batch of B segments of H consecutive steps.

    Step t of a segment holds the observation o_t, the action a_t taken in it, the reward r_t and the
    termination flag that followed. `next_obs` is o_{t+1} only where it is needed: the last step's
    successor sits at index H of `obs` (obs has H+1 frames) so TD targets can bootstrap from it, and
`next_action` is the action the data took there (in-sample targets bootstrap from Q(o_H, a_H)).
    """

    obs: torch.Tensor  # [B, H+1, 84, 84] uint8 frames, or [B, H+1, 36] int64 tokens
    actions: torch.Tensor  # [B, H] int64, ids in the full 18-action ALE space
    rewards: torch.Tensor  # [B, H] float32, raw (clip/sign at training time)
    terminations: torch.Tensor  # [B, H] bool, episode ended by the game after this step
    truncations: torch.Tensor  # [B, H] bool, episode cut by a cap after this step
    mask: torch.Tensor  # [B, H] bool, True where the step lies inside the episode (False = padding)
    game_ids: torch.Tensor  # [B] int64, index into the sampler's game list
    legal_actions: torch.Tensor  # [B, 18] bool, the game's minimal action set
    next_action: torch.Tensor  # [B] int64, a_H: the data action taken in the last frame o_H; -1 where o_H has none
    mc_return: torch.Tensor | None = field(default=None, kw_only=True)
    """[B, H] float32: each step's Monte-Carlo return G_t to its episode's end (rewards transformed and
    discounted as the sampler was asked, `datasets.returns`); NaN where unknown (a truncated episode's
    tail, padding). None when the sampler was not asked for returns."""

    @property
    def is_tokens(self) -> bool:
        return self.obs.dim() == 3

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return type(self)(**{f.name: _apply(getattr(self, f.name), lambda t: t.to(device, non_blocking=non_blocking))
                            for f in fields(self)})

    def clone(self) -> Batch:
        """A copy whose tensors share no memory with this batch's."""
        return type(self)(**{f.name: _apply(getattr(self, f.name), torch.Tensor.clone) for f in fields(self)})

    def pin_memory(self) -> Batch:
        return type(self)(**{f.name: _apply(getattr(self, f.name), torch.Tensor.pin_memory) for f in fields(self)})


def _apply(value: torch.Tensor | None, fn):
    return None if value is None else fn(value)

