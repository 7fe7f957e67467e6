"""The training loop: bit-exact resume, save -> load -> same outputs, overfitting a tiny dataset,
Ctrl-C saving, bf16 autocast and the schedule."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from wam.worldmodel.checkpoint import RunDir, load_checkpoint
from wam.worldmodel.losses import LossConfig, WorldActionObjective
from wam.worldmodel.model import CHECKPOINT_KIND, WorldActionModel, WorldActionModelConfig
from wam.worldmodel.synthetic import SyntheticTokenSource
from wam.worldmodel.trainer import Trainer, TrainerConfig, lr_factor


def make_trainer(run: RunDir | None, steps: int = 6, dropout: float = 0.1, seed: int = 0, **trainer_kw) -> Trainer:
    torch.manual_seed(seed)
    cfg = WorldActionModelConfig(vocab_size=16, d_model=32, n_layers=1, n_heads=2, horizon=2, games=("A", "B"),
                                 dropout=dropout)
    model = WorldActionModel(cfg)
    source = SyntheticTokenSource(batch_size=4, horizon=2, vocab_size=16, games=cfg.games, seed=seed, n_legal=6)
    kw = dict(steps=steps, lr=1e-3, warmup_steps=2, log_every=1, checkpoint_every=3, progress=False, grad_accum=2)
    kw.update(trainer_kw)
    objective = WorldActionObjective(model, LossConfig(target_update_every=2))
    return Trainer(objective, source, TrainerConfig(**kw), run,
                   checkpoint_meta={"kind": CHECKPOINT_KIND, "config": {"model": model.config_dict()}})


def test_resume_is_bit_exact(tmp_path):
    straight = make_trainer(RunDir(tmp_path / "a"))
    straight.fit()
    split_run = RunDir(tmp_path / "b")
    first = make_trainer(split_run)
    first.fit(until_step=3)
    assert first.step == 3
    # a fresh process would rebuild everything from another seed: the checkpoint must override it all
    resumed = make_trainer(split_run, seed=123)
    resumed.load_state(load_checkpoint(split_run.path, kind=CHECKPOINT_KIND))
    assert resumed.step == 3
    resumed.fit()
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), "parameters differ after resume"
    trace_a = [r["loss"] for r in RunDir(tmp_path / "a").read_metrics()]
    trace_b = [r["loss"] for r in split_run.read_metrics()]
    assert len(trace_a) == 6 and trace_a == trace_b
    assert trace_a[0] != trace_a[-1]


def test_save_load_gives_identical_outputs(tmp_path):
    trainer = make_trainer(RunDir(tmp_path), steps=3)
    result = trainer.fit()
    assert result.checkpoint is not None and result.checkpoint.name == "step_00000003.pt"
    model, ckpt = WorldActionModel.from_checkpoint(tmp_path)
    assert ckpt["step"] == 3 and ckpt["kind"] == CHECKPOINT_KIND
    batch = SyntheticTokenSource(2, 2, 16, games=("A", "B"), seed=7).sample()
    trainer.model.eval()
    model.eval()
    with torch.no_grad():
        out_a, _ = trainer.model(batch.obs, batch.actions, batch.game_ids, with_target=True)
        out_b, _ = model(batch.obs, batch.actions, batch.game_ids, with_target=True)
    for name in ("obs_logits", "reward_logits", "termination_logits", "q_logits", "target_q_logits"):
        assert torch.equal(getattr(out_a, name), getattr(out_b, name)), name


def test_overfits_a_tiny_dataset():
    torch.manual_seed(0)
    cfg = WorldActionModelConfig(vocab_size=16, d_model=64, n_layers=2, n_heads=4, horizon=2, games=("A", "B"))
    model = WorldActionModel(cfg)
    source = SyntheticTokenSource(batch_size=8, horizon=2, vocab_size=16, games=cfg.games, num_segments=4, n_legal=4)
    objective = WorldActionObjective(model, LossConfig(target_update_every=20))
    trainer = Trainer(objective, source, TrainerConfig(steps=200, lr=3e-3, min_lr=1e-3, warmup_steps=10,
                                                       log_every=50, progress=False))
    logs = trainer.fit().last_logs
    assert logs["obs_acc"] > 0.99, logs
    assert logs["reward_acc"] > 0.99 and logs["termination_ce"] < 0.05, logs
    assert logs["td_kl"] < 0.05, logs  # TD cross-entropy down to the entropy of its (projected) target
    assert logs["wm_loss"] < 0.05, logs


def test_ctrl_c_saves_and_stops(tmp_path):
    run = RunDir(tmp_path)
    before = signal.getsignal(signal.SIGINT)
    trainer = make_trainer(run, steps=10, checkpoint_every=100)
    trainer.on_log = lambda step, logs: os.kill(os.getpid(), signal.SIGINT) if step == 2 else None
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    assert trainer.step == 2
    assert load_checkpoint(tmp_path, kind=CHECKPOINT_KIND)["step"] == 2
    assert signal.getsignal(signal.SIGINT) is before  # the trainer restores the handler it found


def test_bf16_autocast_trains():
    trainer = make_trainer(None, steps=2, precision="bf16", grad_accum=1)
    result = trainer.fit()
    assert result.step == 2 and torch.isfinite(torch.tensor(result.last_logs["loss"]))
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())


def test_schedule_warmup_then_decay_to_min_lr():
    cfg = TrainerConfig(steps=100, lr=1e-3, min_lr=1e-4, warmup_steps=10)
    assert lr_factor(0, cfg) == pytest.approx(0.1) and lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(99, cfg) == pytest.approx(0.1, abs=1e-3)
    lin = TrainerConfig(steps=100, lr=1e-3, min_lr=1e-4, warmup_steps=0, schedule="linear")
    assert lr_factor(50, lin) == pytest.approx(0.55)


def test_evaluate_hook_joins_metrics_rows(tmp_path):
    run = RunDir(tmp_path / "ev")
    trainer = make_trainer(run, steps=7, log_every=2)
    calls = []

    def evaluate(step):
        calls.append(step)
        return {"q_mc_gap": float(step)}

    trainer.evaluate, trainer.eval_every = evaluate, 3
    trainer.fit()
    assert calls == [3, 6, 7]
    rows = run.read_metrics()
    with_eval = {r["step"]: r for r in rows if "q_mc_gap" in r}
    assert sorted(with_eval) == [3, 6, 7] and with_eval[6]["q_mc_gap"] == 6.0
    assert "loss" in with_eval[6] and "loss" not in with_eval[3], "merged into log rows, else a row of its own"


def test_auto_precision_picks_bf16_only_where_the_cpu_has_it(monkeypatch, caplog):
    """auto -> bf16 on a CPU with AVX-512-bf16 or AMX, fp32 on an AVX2-only one; an explicit bf16 there is kept with a
    warning; the paper presets ask for auto, so no default picks bf16 on an AVX2-only CPU."""
    import wam.worldmodel.device as device_mod
    from wam.runs.train_cmds import PretrainConfig

    monkeypatch.setattr(device_mod, "cpu_flags", lambda: {"avx2", "fma"})
    assert not device_mod.bf16_is_fast("cpu")
    assert device_mod.resolve_precision("auto", "cpu") == "fp32"
    with caplog.at_level("WARNING"):
        assert device_mod.resolve_precision("bf16", "cpu") == "bf16"
    assert "100x slower" in caplog.text
    for flag in ("avx512_bf16", "amx_bf16"):
        monkeypatch.setattr(device_mod, "cpu_flags", lambda flag=flag: {"avx2", flag})
        assert device_mod.resolve_precision("auto", "cpu") == "bf16"
    assert device_mod.resolve_precision("fp32", "cpu") == "fp32"
    for name in ("jowa-40m", "jowa-70m", "jowa-150m"):
        assert PretrainConfig.from_preset(name).train.precision == "auto"
    assert "avx2" in device_mod.cpu_flags() or not device_mod.cpu_flags()  # the real reader parses /proc/cpuinfo
