"""Distillation toward the planner's corrected Q (`wam pretrain/finetune --q-targets FILE` of `wam plan
correct`): a batch source whose batches carry the planned Q of the steps the file holds."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from wam.datasets.batch import Batch
from wam.datasets.errors import WamError
from wam.worldmodel.losses import QTargetBatch

if TYPE_CHECKING:
    from wam.datasets.sampler import SegmentSampler
    from wam.planning.correct import QTargets

log = logging.getLogger(__name__)


class QTargetSource:
    """A `SegmentSampler` whose batches carry distillation targets: `QTargetBatch`es.

    For every sampled step found in the corrected-Q file (matched by resolved dataset path, episode
    and step), the planned Q of each root candidate becomes the target of that action
    (`q_target` [B, H, 18], `q_target_mask` [B, H, 18]); other steps and actions carry no target.
    Position and resume are the sampler's (the targets are a function of the batch's origins).
    """

    _STEP_BITS, _EPISODE_BITS = 24, 24  # key = (dataset << 48) | (episode << 24) | step

    def __init__(self, sampler: SegmentSampler, targets: QTargets) -> None:
        from wam.datasets.store import TrajectoryStore

        self.sampler, self.targets = sampler, targets
        target_paths = [str(Path(d["path"]).resolve()) for d in targets.datasets]
        # target-file dataset index -> sampler dataset index (-1: not sampled)
        to_sampler = np.full(max(len(target_paths), 1), -1, np.int64)
        matched = []
        for d, path in enumerate(sampler.datasets):
            key = str(Path(path).resolve())
            if key not in target_paths:
                log.info("q-targets: no targets for dataset %s (its steps train without distillation)", path)
                continue
            td = target_paths.index(key)
            with TrajectoryStore.open(path) as store:
                game = store.game
            if targets.datasets[td].get("game", game) != game:
                raise WamError(f"dataset {path} holds game {game} but the --q-targets file planned it as "
                               f"{targets.datasets[td]['game']}; re-run `wam plan correct` on this data")
            to_sampler[td] = d
            matched.append(path)
        if not matched:
            raise WamError(f"the --q-targets file covers none of the training datasets (it holds "
                           f"{target_paths}); write it with `wam plan correct` on the same --data")
        d = to_sampler[targets.dataset.astype(np.int64)] if len(targets) else np.zeros(0, np.int64)
        keep = d >= 0
        episode, step = targets.episode.astype(np.int64)[keep], targets.step.astype(np.int64)[keep]
        if len(step) and (episode.max() >= 1 << self._EPISODE_BITS or step.max() >= 1 << self._STEP_BITS):
            raise WamError(f"q-targets: episode {episode.max()} or step {step.max()} too large to index")
        keys = self._key(d[keep], episode, step)
        order = np.argsort(keys, kind="stable")
        self._keys, self._rows = keys[order], np.flatnonzero(keep)[order]  # sorted keys, their file rows
        log.info("q-targets: %d planned states for %d of %d dataset(s)", len(self._keys), len(matched),
                 len(sampler.datasets))

    @classmethod
    def _key(cls, dataset: np.ndarray, episode: np.ndarray, step: np.ndarray) -> np.ndarray:
        return (dataset << (cls._EPISODE_BITS + cls._STEP_BITS)) | (episode << cls._STEP_BITS) | step

    def targets_for(self, index: int, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """q_target [B, H, 18] float32 and q_target_mask [B, H, 18] bool of batch `index` of the sampler."""
        dataset, episode, start = self.sampler.segment_origins(index)
        b, h = batch.actions.shape
        steps = start[:, None] + np.arange(h)  # [B, H]
        keys = self._key(dataset[:, None], episode[:, None], steps)  # [B, H]
        pos = np.searchsorted(self._keys, keys).clip(max=max(len(self._keys) - 1, 0))
        found = batch.mask.numpy().copy()
        if len(self._keys):
            found &= self._keys[pos] == keys
        else:
            found[:] = False
        rows = self._rows[pos] if len(self._rows) else np.zeros_like(pos)
        cand = self.targets.candidates[rows].astype(np.int64)  # [B, H, K]
        cand_q = self.targets.candidate_q[rows].astype(np.float32)  # [B, H, K]
        ok = found[:, :, None] & (cand >= 0) & np.isfinite(cand_q)  # [B, H, K]
        q = np.zeros((b, h, 18), np.float32)
        mask = np.zeros((b, h, 18), bool)
        bi, ti, ki = np.nonzero(ok)
        q[bi, ti, cand[bi, ti, ki]] = cand_q[bi, ti, ki]
        mask[bi, ti, cand[bi, ti, ki]] = True
        return torch.from_numpy(q), torch.from_numpy(mask)

    def sample(self) -> QTargetBatch:
        index = self.sampler.state_dict()["next_batch"]
        batch = self.sampler.sample()
        q, mask = self.targets_for(index, batch)
        return QTargetBatch(**vars(batch), q_target=q, q_target_mask=mask)

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)

    def close(self) -> None:
        self.sampler.close()


def q_target_source(sampler: SegmentSampler, path: str) -> tuple[QTargetSource, dict[str, Any]]:
    """Wrap the sampler so its batches carry the corrected Q of `path`; the file's identity for the checkpoint."""
    from wam.planning.correct import load_q_targets

    targets = load_q_targets(path)
    source = QTargetSource(sampler, targets)
    return source, {"path": str(Path(path).resolve()), "content_sha256": str(targets.attrs.get("content_sha256", "")),
                    "states": len(targets)}
