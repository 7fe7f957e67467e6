"""The world-action model's configuration (`WorldActionModelConfig`), its presets and layout constants.

`model.py` builds the model from it; commands and checkpoints read it without building one.
"""

from __future__ import annotations

import ast
import dataclasses
from dataclasses import dataclass
from typing import Any

from wam.datasets.config import preset_value
from wam.datasets.errors import WamError

CHECKPOINT_KIND = "world-action-model"
NUM_ACTIONS = 18
TOKENS_PER_OBS = 36
REWARD_CLASSES = 3  # sign of the reward: -1, 0, +1 -> classes 0, 1, 2
INITS = ("scaled", "gpt2")
FREEZABLE_PARTS = ("embeddings", "core", "obs_head", "reward_head", "termination_head", "q_head")


@dataclass
class WorldActionModelConfig:
    """Architecture of the world-action model (JOWA defaults; see REFERENCE.md)."""

    vocab_size: int = 512
    """Observation-token vocabulary: the tokenizer's codebook size (set from the tokenizer by the commands)."""
    tokens_per_obs: int = TOKENS_PER_OBS
    """Tokens per frame (6x6 = 36 for an 84x84 frame)."""
    d_model: int = 64
    """Width of the embeddings, the core and the heads."""
    n_layers: int = 2
    """Core depth."""
    n_heads: int = 4
    """Attention heads (passed to cores that take `n_heads`)."""
    core: str = "transformer"
    """Sequence core: transformer, mamba, mamba2, atlas (any registered core)."""
    core_options: tuple[str, ...] = ()
    """Extra core arguments as KEY=VALUE (Python literals), e.g. `window=74 d_state=16`."""
    horizon: int = 8
    """Context H: timesteps per training segment (the sequence holds H+1 frames and H actions)."""
    n_atoms: int = 51
    """C51 atoms of the distributional Q head."""
    v_min: float = -10.0
    """Lowest atom of the C51 support."""
    v_max: float = 30.0
    """Highest atom of the C51 support."""
    q_ensemble: int = 1
    """Number of Q heads (JOWA-150M uses 3); acting uses the mean of their expected Q."""
    q_hidden_mult: int = 2
    """Hidden width of the Q-head MLP, in multiples of d_model."""
    q_init: float = 0.0
    """Expected Q of every action at initialisation: the Q head's last layer starts with small weights and
    the bias of the maximum-entropy distribution on the support with this mean (not the support's midpoint,
    which a uniform distribution would give: 10 on [-10, 30])."""
    behaviour_prior: float = 0.0
    """tau > 0 adds a behaviour-cloning head (`prior_head`: logits of the data's action at each frame, trained
    beside the Q head) and acts on E[Q](s, a) + tau * log pi_b(a | s) over the legal actions: greedy on Q,
    regularised towards what the data did (KL-regularised policy improvement; docs/training.md). 0: no head,
    greedy on Q (JOWA)."""
    support_threshold: float = 0.3
    """Models with a behaviour prior: acting (and the planner's candidates and continuations) consider only
    the actions the data supports at the frame, pi_b(a | s) >= support_threshold * max_a' pi_b(a' | s) (discrete
    BCQ's filter, Fujimoto et al. 2019, threshold 0.3 there); 0 considers every legal action; no effect without
    a prior. An acting-time setting (checkpoints saved before it existed get this default):
    `wam eval --support-threshold` overrides it without retraining (docs/training.md)."""
    dropout: float = 0.0
    """Dropout on the embeddings and inside cores that take `dropout`."""
    init: str = "scaled"
    """Weight initialisation. `scaled`: embeddings N(0, 1/sqrt(d_model)), hidden linear layers of the heads
    and the transformer core's linear layers Xavier-uniform (the core's residual projections / sqrt(2
    n_layers)), so the scale follows the width; `gpt2`: N(0, 0.02) everywhere (GPT-2/JOWA, sized for
    d ~ 768; at d = 64-128 the transformer barely learns attention). Either way the heads' output layers
    start small (N(0, 0.02); the Q head's see `q_init`), so predictions start near uniform; other cores
    keep their own initialisation."""
    games: tuple[str, ...] = ()
    """Game names, one task-embedding row each (set from the data by the commands)."""

    def __post_init__(self) -> None:
        # checked here, not in the model, so that an acting-time override (`dataclasses.replace`) is checked too
        if not 0.0 <= self.support_threshold <= 1.0:
            raise WamError(f"support_threshold must lie in [0, 1], got {self.support_threshold}")

    @classmethod
    def from_preset(cls, name: str) -> WorldActionModelConfig:
        return dataclasses.replace(preset_value(MODEL_PRESETS, name, "model preset"))

    @property
    def tokens_per_step(self) -> int:
        return self.tokens_per_obs + 1

    @property
    def max_tokens(self) -> int:
        """Length of a full training sequence, H+1 frames and H actions (the position table's size)."""
        return self.tokens_per_step * (self.horizon + 1) - 1

    def parsed_core_options(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for item in self.core_options:
            key, sep, value = item.partition("=")
            if not sep or not key.isidentifier():
                raise WamError(f"core option {item!r} is not KEY=VALUE (e.g. window=74)")
            try:
                out[key] = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                out[key] = value  # a bare word, e.g. positions=none
        return out


MODEL_PRESETS: dict[str, WorldActionModelConfig] = {
    # the CPU presets act with a behaviour prior (tau 0.1; docs/training.md "Behaviour prior for acting")
    "debug": WorldActionModelConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=4, horizon=4, behaviour_prior=0.1),
    # CPU-sized: ~0.4 s per batch of 32 segments on one core, so a recipe trains in tens of minutes.
    "small": WorldActionModelConfig(vocab_size=512, d_model=128, n_layers=3, n_heads=4, horizon=4,
                                    behaviour_prior=0.1),
    # paper sizes keep JOWA's GPT-2 initialisation (sized for their widths)
    "jowa-40m": WorldActionModelConfig(vocab_size=2048, d_model=512, n_layers=4, n_heads=8, horizon=8, dropout=0.1,
                                       init="gpt2"),
    "jowa-70m": WorldActionModelConfig(vocab_size=2048, d_model=768, n_layers=6, n_heads=12, horizon=8, dropout=0.1,
                                       init="gpt2"),
    "jowa-150m": WorldActionModelConfig(vocab_size=2048, d_model=768, n_layers=12, n_heads=12, horizon=8,
                                        dropout=0.1, q_ensemble=3, init="gpt2"),
}
