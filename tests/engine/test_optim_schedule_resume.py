"""Engine: optimiser groups, LR schedule, alpha ramp, determinism and exact resume
(docs/ALBEF.md §3).

The schedule is checked against an independent simulation of ALBEF's driver loop around timm's
cosine scheduler; resume is checked by comparing an interrupted run with an uninterrupted one.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from model.checkpoints import read_checkpoint
from model.config.experiment import load_experiment
from model.config.schema import TrainConfig
from model.engine.optim import alpha_at, build_optimizer, lr_at, param_groups
from model.engine.step import train_step
from model.engine.train import train
from tests.tiny import (
    random_batch,
    stop_training_after,
    synthetic_train_sets,
    tiny_config,
    tiny_objective,
)

# ------------------------------------------------------------------------------------ groups


def test_param_groups_follow_albef_rule() -> None:
    cfg = tiny_config()
    obj = tiny_objective()
    groups = param_groups(obj, 0.02)
    assert [g["weight_decay"] for g in groups] == [0.0, 0.02]  # order [no-decay, decay]
    name_of = {id(p): n for n, p in obj.named_parameters()}
    no_decay = {name_of[id(p)] for p in groups[0]["params"]}
    decay = {name_of[id(p)] for p in groups[1]["params"]}
    # every trainable (student) parameter exactly once; momentum parameters excluded
    listed = [id(p) for g in groups for p in g["params"]]
    assert len(listed) == len(set(listed))
    assert set(listed) == {id(p) for p in obj.student.parameters()}
    assert not any(n.startswith("teacher.") for n in no_decay | decay)
    # decayed although not plain weight matrices (docs/ALBEF.md C13)
    for name in ("student.temp", "student.visual_encoder.pos_embed",
                 "student.visual_encoder.cls_token",
                 "student.visual_encoder.patch_embed.proj.weight",
                 "student.text_encoder.embeddings.word_embeddings.weight",
                 "student.text_encoder.embeddings.position_embeddings.weight",
                 "student.text_encoder.embeddings.token_type_embeddings.weight",
                 "student.itm_head.weight", "student.vision_proj.weight"):
        assert name in decay, name
    for name in ("student.mlm_head.bias", "student.visual_encoder.norm.weight",
                 "student.text_encoder.embeddings.LayerNorm.weight",
                 "student.fusion_encoder.layer.0.crossattention.output.LayerNorm.weight",
                 "student.itm_head.bias", "student.visual_encoder.blocks.0.attn.qkv.bias"):
        assert name in no_decay, name
    # tensor counts from the architecture (per ViT block 8 no-decay / 4 decay; per BERT
    # layer 10 / 6, plus 6 / 4 for cross-attention; see docs/ALBEF.md §3 for ALBEF's own count)
    v, t = cfg.model.vision, cfg.model.text
    n_decay = (4 * v.depth + 3) + 3 + 6 * t.text_layers + 10 * t.fusion_layers + 1 + 3 + 1
    n_no_decay = (8 * v.depth + 3) + 2 + 10 * t.text_layers + 16 * t.fusion_layers + 4 + 3
    assert (len(no_decay), len(decay)) == (n_no_decay, n_decay)
    opt = build_optimizer(obj, cfg.train)
    assert opt.defaults["betas"] == (0.9, 0.999) and opt.defaults["eps"] == 1e-8


# ------------------------------------------------------------------------------------ schedule


def _official_lrs(cfg: TrainConfig, iters_epoch0: int) -> tuple[list[float], list[float]]:
    """Simulate Pretrain.py driving timm's CosineLRScheduler (warmup_prefix, one cycle).

    Returns the lr used by every iteration of epoch 0, and the lr of every later epoch.
    """

    def sched(t: float) -> float:
        if t < cfg.warmup_steps:
            return cfg.warmup_lr + t * (cfg.lr - cfg.warmup_lr) / cfg.warmup_steps
        t = t - cfg.warmup_steps
        if t >= cfg.epochs:
            return cfg.min_lr
        return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * t / cfg.epochs))

    lr, used = cfg.warmup_lr, []  # construction sets warmup_lr_init
    for i in range(iters_epoch0):
        used.append(lr)  # optimizer.step() of iteration i
        if i % cfg.warmup_every == 0 and i <= cfg.warmup_steps * cfg.warmup_every:
            lr = sched(i // cfg.warmup_every)
    later = [sched(e + cfg.warmup_steps) for e in range(1, cfg.epochs)]
    return used, later


@pytest.mark.parametrize("sets", [(), ("train.warmup_steps=5", "train.warmup_every=20",
                                       "train.epochs=4", "train.lr=5e-4", "train.min_lr=5e-5",
                                       "train.warmup_lr=5e-5")])
def test_lr_schedule_matches_official_driver(sets: tuple[str, ...]) -> None:
    cfg = load_experiment(sets=list(sets)).train  # schema defaults = ALBEF pre-training
    used, later = _official_lrs(cfg, 2300)
    for i, lr in enumerate(used):
        assert lr_at(cfg, 0, i) == pytest.approx(lr, rel=1e-12, abs=0), i
    for e, lr in enumerate(later, start=1):
        assert lr_at(cfg, e, 0) == pytest.approx(lr, rel=1e-12) == lr_at(cfg, e, 777)


def test_lr_schedule_published_values() -> None:
    cfg = TrainConfig()
    values = [lr_at(cfg, 0, i) for i in (0, 100, 101, 1901, 2001)]
    assert values == pytest.approx([1e-5, 1e-5, 1.45e-5, 9.55e-5, 1e-4], rel=1e-9)
    epochs = [lr_at(cfg, e, 0) for e in (1, 15, 29)]
    assert epochs == pytest.approx([9.975e-5, 5.5e-5, 1.025e-5], rel=5e-4)  # spec rounds


def test_lr_schedule_finetune_and_constant() -> None:
    ft = TrainConfig(schedule="albef_finetune", lr=1e-5, min_lr=1e-6, epochs=10)
    assert lr_at(ft, 0, 0) == pytest.approx(1e-5) == lr_at(ft, 0, 5000)
    for e in range(10):
        ref = 1e-6 + 0.5 * (1e-5 - 1e-6) * (1 + math.cos(math.pi * e / 10))
        assert lr_at(ft, e, 3) == pytest.approx(ref, rel=1e-12)
    assert lr_at(TrainConfig(schedule="constant"), 3, 9) == 1e-4


def test_alpha_ramp() -> None:
    n = 200
    ramp = [alpha_at(0.4, True, 0, i, n) for i in range(n)]
    assert ramp[0] == 0.0 and ramp[100] == pytest.approx(0.2) and ramp[-1] < 0.4
    assert all(b > a for a, b in zip(ramp[:-1], ramp[1:], strict=True))
    assert [alpha_at(0.4, True, e, i, n) for e, i in ((1, 0), (5, 17))] == [0.4, 0.4]
    assert alpha_at(0.4, False, 0, 0, n) == 0.4


# ------------------------------------------------------------------------------------ determinism


def _two_steps() -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    torch.manual_seed(123)  # weights, queues and dropout all come from here
    obj = tiny_objective(init_seed=None)
    opt = build_optimizer(obj, tiny_config().train)
    g = torch.Generator().manual_seed(9)
    losses = []
    for _ in range(2):
        out = train_step(obj, opt, random_batch(generator=g), 0.4)
        losses.append({"total": out.loss, **out.losses})
    return losses, obj.state_dict()


def test_same_config_and_seed_give_identical_losses() -> None:
    a, state_a = _two_steps()
    b, state_b = _two_steps()
    for la, lb in zip(a, b, strict=True):
        assert la.keys() == lb.keys()
        assert all(torch.equal(la[k], lb[k]) for k in la), (la, lb)
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert not torch.equal(a[0]["total"], a[1]["total"])  # the steps did something


# ------------------------------------------------------------------------------------ resume

LOSS_KEYS = ("loss/itc", "loss/itm", "loss/mlm", "loss/total", "lr", "alpha", "temp", "step",
             "epoch")


def _metrics(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: {k: r[k] for k in LOSS_KEYS} for r in rows if r["kind"] == "train"}


def _assert_same_objective(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not different, different


def _check_resume(cache: Path, root: Path, extra_b: tuple[str, ...] = (),
                  common: tuple[str, ...] = ()) -> None:
    """Run A: 6 steps straight. Run B (with ``extra_b``): 3 steps, then a fresh call to 6."""
    cfg_a = load_experiment(preset="tiny", sets=synthetic_train_sets(str(cache), *common))
    cfg = load_experiment(preset="tiny", sets=synthetic_train_sets(str(cache), *common,
                                                                   *extra_b))
    with stop_training_after(6):
        summary_a, tr_a = train(cfg_a, root / "a", progress=False, device="cpu")
    assert summary_a.steps == 6
    with stop_training_after(3):
        first, _ = train(cfg, root / "b", progress=False, device="cpu")
    assert first.steps == 3 and first.resumed_from is None
    with stop_training_after(6):
        summary_b, tr_b = train(cfg, root / "b", progress=False, device="cpu")
    assert summary_b.resumed_from == 3 and summary_b.steps == 6
    metrics_a, metrics_b = _metrics(root / "a"), _metrics(root / "b")
    assert sorted(metrics_a) == sorted(metrics_b) == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):
        assert metrics_a[step] == metrics_b[step], step
    if extra_b:  # different loader settings: the first steps must agree as well
        assert all(metrics_a[step] == metrics_b[step] for step in (1, 2, 3))
    _assert_same_objective(tr_a.objective, tr_b.objective)
    opt_a, opt_b = tr_a.optimizer.state_dict()["state"], tr_b.optimizer.state_dict()["state"]
    assert opt_a.keys() == opt_b.keys()
    assert all(torch.equal(opt_a[k][s], opt_b[k][s]) for k in opt_a for s in opt_a[k])
    assert torch.equal(tr_a.objective.generator.get_state(), tr_b.objective.generator.get_state())


def test_resume_is_exact(synthetic_cache: Path, tmp_path: Path) -> None:
    _check_resume(synthetic_cache, tmp_path)


def test_resume_is_exact_with_a_loader_worker(synthetic_cache: Path, tmp_path: Path) -> None:
    """B runs with one loader worker and is compared with A run in the main process: resume
    is exact with workers, and the data stream does not depend on the number of workers
    (num_workers is outside the config hash, so B may resume under either setting)."""
    _check_resume(synthetic_cache, tmp_path, ("data.num_workers=1",))


SHARD_SETS = ("data.format=shards", "data.shards.streams_per_rank=2",
              "data.shards.shuffle_block=5", "data.shards.synthetic_maxcount=40")


def test_resume_is_exact_on_the_shard_path(synthetic_cache: Path, tmp_path: Path) -> None:
    """Shards of 40 samples, 2 streams, shuffle blocks of 5: step 3 stops one stream after 32
    samples, inside a block and inside its second shard; B resumes with two loader workers."""
    _check_resume(synthetic_cache, tmp_path, ("data.num_workers=2",), common=SHARD_SETS)
    payload = read_checkpoint(tmp_path / "b" / "checkpoint.pt")
    streams = payload["data"]["streams"]
    assert payload["data"]["format"] == "shards" and len(streams) == 2
    assert [s["samples_done"] for s in streams] == [48, 48]  # 6 steps, 16 per batch
    assert all(s["shard"].endswith(".tar") for s in streams)


def test_resume_on_a_changed_shard_list_is_refused(synthetic_cache: Path,
                                                   tmp_path: Path) -> None:
    cfg = load_experiment(preset="tiny", sets=synthetic_train_sets(str(synthetic_cache),
                                                                   *SHARD_SETS))
    with stop_training_after(1):
        _, tr = train(cfg, tmp_path, progress=False, device="cpu")
    index = Path(tr.sources.shard_index)
    saved = index.read_text()
    try:
        data = json.loads(saved)
        data["shardlist"] = data["shardlist"][:-1]
        index.write_text(json.dumps(data))
        with pytest.raises(RuntimeError, match="shard index now lists"):
            with stop_training_after(2):
                train(cfg, tmp_path, progress=False, device="cpu")
    finally:
        index.write_text(saved)


def test_resume_with_another_config_is_refused(synthetic_cache: Path, tmp_path: Path) -> None:
    sets = synthetic_train_sets(str(synthetic_cache))
    cfg = load_experiment(preset="tiny", sets=sets)
    with stop_training_after(1):
        train(cfg, tmp_path, progress=False, device="cpu")
    saved_config = (tmp_path / "config.yaml").read_text()
    other = load_experiment(preset="tiny", sets=[*sets, "train.lr=3e-3"])
    with pytest.raises(RuntimeError, match="config"):
        with stop_training_after(2):
            train(other, tmp_path, progress=False, device="cpu")
    # the refused run must leave the run directory describing the checkpoint's experiment
    assert (tmp_path / "config.yaml").read_text() == saved_config
    assert yaml.safe_load(saved_config)["train"]["lr"] == cfg.train.lr
    # speed/logging knobs are not part of the identity: this resume is accepted
    same = load_experiment(preset="tiny", sets=[*sets, "train.log_every=5"])
    with stop_training_after(2):
        summary, _ = train(same, tmp_path, progress=False, device="cpu")
    assert summary.resumed_from == 1 and summary.steps == 2


def test_a_preemption_signal_during_the_checkpoint_write_waits_for_the_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SLURM's pre-emption warning may arrive while ``torch.save`` runs. submitit's handler
    requeues and calls ``sys.exit``; raised inside the zip writer it turned the requeue into a
    failed job (the writer's cleanup raised its own error). The handler must run after the file
    is complete, and the new checkpoint must be the one in place."""
    import os
    import signal

    from model.engine import resume

    objective = tiny_objective()
    optimizer = build_optimizer(objective, tiny_config().train)
    handled: list[bool] = []

    def requeue_and_exit(_signum: int, _frame: object) -> None:  # what submitit's handler does
        handled.append(checkpoint_exists())
        raise SystemExit(-1)

    def checkpoint_exists() -> bool:
        return (tmp_path / "checkpoint.pt").exists() and not (tmp_path / "checkpoint.tmp").exists()

    real_save = torch.save

    def save_while_signalled(obj: object, fh: object) -> None:
        os.kill(os.getpid(), signal.SIGUSR2)  # its Python handler would run at the next bytecode
        real_save(obj, fh)

    previous = signal.signal(signal.SIGUSR2, requeue_and_exit)
    monkeypatch.setattr(resume.torch, "save", save_while_signalled)
    try:
        with pytest.raises(SystemExit):
            resume.save_checkpoint(tmp_path, objective, optimizer,
                                   resume.TrainState(epoch=0, batch=3, global_step=3), {}, "h")
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert handled == [True]  # ran once, after the rename
    assert signal.getsignal(signal.SIGUSR2) is previous
    assert read_checkpoint(tmp_path / "checkpoint.pt")["state"]["global_step"] == 3


def test_batches_per_epoch_holds_when_resumed_at_an_epoch_end() -> None:
    """A checkpoint written after an epoch's last batch resumes with a sampler of length 0; the
    epoch length must still come from the sampler (a falsy sampler once read as the dataset)."""
    from model.data.sampling import ResumableSampler, SeededDataset
    from model.engine.data import TrainData

    sampler = ResumableSampler(64, 16, seed=0)
    data = TrainData(SeededDataset(list(range(64)), 0), loader=None, sampler=sampler)
    data.set_epoch(0, start_batch=4)
    assert len(sampler) == 0 and data.batches_per_epoch == 4
