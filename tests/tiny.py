"""Tiny factories for unit tests: config, objective and random batches (CPU, milliseconds).

Import from a test file as ``from tests.tiny import tiny_config, tiny_objective, random_batch``
(``tests`` is a package: its modules are imported by their dotted path from the checkout).

Defaults: the ``tiny`` preset with a 60-token vocabulary, queue 64, batch 8, 32 px images;
``SPECIAL`` holds the ids the masking rule needs ([PAD] 0, [CLS] 2, [MASK] 4).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import pytest
import torch
from torch import Tensor

from model.build import build_objective
from model.config.experiment import load_experiment
from model.config.schema import ExperimentConfig
from model.objective import Objective
from model.text_masking import SpecialIds

VOCAB = 60
SPECIAL = SpecialIds(pad=0, cls=2, mask=4, vocab_size=VOCAB)
FIRST_WORD_ID = 5  # ids below this are special tokens in the tiny vocabulary
BATCH = 8
QUEUE = 64
IMAGE = 32

# Both BERT dropouts at 0: forwards become deterministic functions of the weights (the ViT has
# no dropout at all), so features can be recomputed independently and compared.
NO_DROPOUT = ("model.text.hidden_dropout=0.0", "model.text.attn_dropout=0.0")


def tiny_config(*sets: str, batch_size: int = BATCH, queue_size: int = QUEUE
                ) -> ExperimentConfig:
    """The ``tiny`` preset with a fixed vocabulary; ``sets`` are extra ``key=value`` items."""
    base = [f"model.text.vocab_size={VOCAB}", f"model.queue_size={queue_size}",
            f"train.batch_size={batch_size}"]
    return load_experiment(preset="tiny", sets=[*base, *sets])


def tiny_objective(*sets: str, seed: int = 0, init_seed: int | None = 0,
                   batch_size: int = BATCH, queue_size: int = QUEUE) -> Objective:
    """A freshly built tiny objective in train mode.

    ``init_seed`` re-seeds the global RNG before construction (weights and queues are drawn
    from it), so two calls give bit-identical objectives; ``None`` leaves the RNG alone.
    ``seed`` seeds the objective's step generator (negatives, MLM corruption, masks).
    """
    cfg = tiny_config(*sets, batch_size=batch_size, queue_size=queue_size)
    if init_seed is not None:
        torch.manual_seed(init_seed)
    objective = build_objective(cfg, SPECIAL, seed=seed)
    objective.train()
    return objective


def random_batch(
    batch_size: int = BATCH,
    length: int = 10,
    generator: torch.Generator | None = None,
    lengths: Sequence[int] | None = None,
    image_idx: Sequence[int] | None = None,
    strong: bool = False,
    vocab: int = VOCAB,
) -> dict[str, Tensor]:
    """A pre-training batch: image (B,3,32,32), input_ids/attention_mask (B,L).

    Rows are ``[CLS] w1 .. wn [PAD] ..`` with word ids in [FIRST_WORD_ID, vocab) (no [SEP],
    as in ALBEF). ``lengths`` (tokens incl. [CLS]) default to random values in [3, L];
    ``image_idx`` adds the retrieval-mode image ids; ``strong`` adds an ``image_strong`` view.
    """
    g = generator if generator is not None else torch.Generator().manual_seed(1234)
    if lengths is None:
        lengths = torch.randint(3, length + 1, (batch_size,), generator=g).tolist()
        lengths[0] = length  # at least one full row, so the padded width is ``length``
    assert len(lengths) == batch_size and max(lengths) <= length
    ids = torch.randint(FIRST_WORD_ID, vocab, (batch_size, length), generator=g)
    positions = torch.arange(length).expand(batch_size, length)
    mask = (positions < torch.tensor(lengths).view(-1, 1)).long()
    ids = torch.where(mask.bool(), ids, torch.full_like(ids, SPECIAL.pad))
    ids[:, 0] = SPECIAL.cls
    batch = {
        "image": torch.randn(batch_size, 3, IMAGE, IMAGE, generator=g),
        "input_ids": ids,
        "attention_mask": mask,
    }
    if strong:
        batch["image_strong"] = torch.randn(batch_size, 3, IMAGE, IMAGE, generator=g)
    if image_idx is not None:
        batch["image_idx"] = torch.tensor(list(image_idx), dtype=torch.long)
    return batch


def perturb_student(objective: Objective, scale: float = 0.02, seed: int = 7) -> None:
    """Add noise to every student parameter so the momentum twin differs from the student
    (at construction they are equal, which would hide online/momentum mix-ups)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in objective.student.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def synthetic_train_sets(cache_dir: str, *extra: str) -> list[str]:
    """``--set`` items for a small, fast ``train()`` run on the generated synthetic set."""
    return [
        f"data.cache_dir={cache_dir}",
        "data.synthetic.n_train_images=256",
        "data.synthetic.n_test_images=32",
        "train.batch_size=16",
        "model.queue_size=64",
        "data.num_workers=0",
        "train.log_every=1",
        "train.checkpoint_every=1000",
        *extra,
    ]


@contextlib.contextmanager
def stop_training_after(steps: int) -> Iterator[None]:
    """Test hook: ``train`` ends (with its final checkpoint) after ``steps`` global steps, as an
    interrupted run would, without a knob in the product API."""
    from model.engine.train import Trainer

    real = Trainer.total_steps
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Trainer, "total_steps", property(lambda self: min(steps, real.fget(self))))
        yield


def tiny_grid_sets(cache_dir, epochs: int = 2) -> list[str]:
    """``--set`` items that shrink the tiny preset to a seconds-long run (tests only)."""
    return [
        f"data.cache_dir={cache_dir}",
        "data.synthetic.n_train_images=128",
        "data.synthetic.n_test_images=16",
        "data.num_workers=0",
        "train.batch_size=16",
        f"train.epochs={epochs}",
        "train.log_every=1",
        "train.checkpoint_every=2",
        "model.queue_size=64",
        "eval.k_test=8",
        "eval.batch_size=16",
    ]
