"""Episode videos: the 84x84 frames upscaled beside a bar chart of the Q-values, written as MP4 (or GIF)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

def _video_frames(frames: np.ndarray, actions: np.ndarray, q_values: np.ndarray | None, game: str,
                  scale: int = 4) -> list[np.ndarray]:
    """BGR uint8 frames: the 84x84 observation upscaled, and a bar chart of the Q-values when given."""
    import cv2

    from wam.datasets.atari import ACTION_NAMES, legal_action_mask

    legal = np.flatnonzero(legal_action_mask(game))
    side = 84 * scale
    panel_w = 300 if q_values is not None else 0
    out = []
    for t, frame in enumerate(frames):
        img = np.zeros((side, side + panel_w, 3), dtype=np.uint8)
        img[:, :side] = cv2.resize(frame, (side, side), interpolation=cv2.INTER_NEAREST)[..., None]
        a = int(actions[t]) if t < len(actions) else -1
        label = f"{game} t={t}" + (f" a={ACTION_NAMES[a]}" if a >= 0 else "")
        cv2.putText(img, label, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 255, 255), 1, cv2.LINE_AA)
        if q_values is not None and t < len(q_values):
            q = q_values[t][legal]
            lo, hi = float(np.min(q)), float(np.max(q))
            span = max(hi - lo, 1e-6)
            row_h = min(24, max(8, (side - 20) // max(len(legal), 1)))
            for k, act in enumerate(legal):
                y = 20 + k * row_h
                w = int(10 + 120 * (float(q[k]) - lo) / span)
                colour = (0, 200, 0) if act == a else (180, 180, 180)
                cv2.rectangle(img, (side + 100, y), (side + 100 + w, y + row_h - 2), colour, -1)
                cv2.putText(img, f"{ACTION_NAMES[act][:12]}", (side + 4, y + row_h - 3), cv2.FONT_HERSHEY_SIMPLEX,
                            0.3, (255, 255, 255), 1, cv2.LINE_AA)
                cv2.putText(img, f"{float(q[k]):.2f}", (side + 100 + w + 4, y + row_h - 3), cv2.FONT_HERSHEY_SIMPLEX,
                            0.3, (255, 255, 255), 1, cv2.LINE_AA)
        out.append(img)
    return out


def write_video(stem: Path, frames: np.ndarray, actions: np.ndarray, q_values: np.ndarray | None, game: str,
                fps: int = 15) -> Path:
    """Write an MP4 (OpenCV, mp4v) of an episode, or a GIF (Pillow) where OpenCV cannot encode MP4; returns the path."""
    import cv2

    stem.parent.mkdir(parents=True, exist_ok=True)
    images = _video_frames(frames, actions, q_values, game)
    h, w = images[0].shape[:2]
    path = stem.with_suffix(".mp4")
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    if writer.isOpened():
        for img in images:
            writer.write(img)
        writer.release()
        log.info("wrote %s (%d frames, mp4v)", path, len(images))
        return path
    from PIL import Image

    path = stem.with_suffix(".gif")
    log.warning("OpenCV cannot write MP4 here; writing %s with Pillow instead", path)
    pil = [Image.fromarray(img[..., ::-1]) for img in images]
    pil[0].save(path, save_all=True, append_images=pil[1:], duration=int(1000 / fps), loop=0)
    return path
