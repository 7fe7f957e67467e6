"""TensorBoard event files beside metrics.jsonl (issue 17 §3)."""

from __future__ import annotations

import pickle
import struct

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from wam.worldmodel.checkpoint import TENSORBOARD_DIR, RunDir, read_tensorboard_scalars  # noqa: E402


def test_metrics_reach_tensorboard_and_read_back(tmp_path):
    run = RunDir(tmp_path / "run")
    run.log_metrics(10, {"loss": 2.5, "q_mc_gap/Pong": -0.25})
    run.log_metrics(20, {"loss": 1.5})
    run.close()  # events are written by the writer's thread within 10 s, and all of them at close
    scalars = read_tensorboard_scalars(tmp_path / "run" / TENSORBOARD_DIR)
    assert scalars == {"loss": [(10, 2.5), (20, 1.5)], "q_mc_gap/Pong": [(10, -0.25)]}
    assert [r["loss"] for r in run.read_metrics()] == [2.5, 1.5], "metrics.jsonl stays the source of truth"
    clone = pickle.loads(pickle.dumps(run))  # a run directory with an open writer still travels to workers
    clone.log_metrics(30, {"loss": 0.5})
    clone.close()
    assert read_tensorboard_scalars(tmp_path / "run")["loss"][-1] == (30, 0.5)


def test_images_are_logged(tmp_path):
    run = RunDir(tmp_path / "run")
    fig = plt.figure(figsize=(2, 1))
    fig.savefig(tmp_path / "grid.png")
    plt.close(fig)
    run.log_image(5, "reconstructions", tmp_path / "grid.png")
    run.close()
    from tensorboardX.proto import event_pb2

    found = []
    for path in (tmp_path / "run" / TENSORBOARD_DIR).glob("events.out.tfevents.*"):
        data, pos = path.read_bytes(), 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 16 + length
            found += [(v.tag, event.step, v.image.width, v.image.height) for v in event.summary.value
                      if v.HasField("image")]
    assert found == [("reconstructions", 5, 200, 100)]


def test_switched_off_by_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("WAM_TENSORBOARD", "0")
    run = RunDir(tmp_path / "run")
    run.log_metrics(1, {"loss": np.float32(1.0)})
    assert run.tensorboard() is None and not (tmp_path / "run" / TENSORBOARD_DIR).exists()
    assert run.read_metrics()[0]["loss"] == 1.0
