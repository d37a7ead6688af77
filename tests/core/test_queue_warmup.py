"""The queue warm-up knob: identity value 0 is ALBEF; during warm-up nothing is enqueued."""

from __future__ import annotations

import torch

from tests.tiny import random_batch, tiny_objective


def test_enqueue_false_leaves_queues_and_pointer_untouched() -> None:
    obj = tiny_objective()
    obj.train()
    before = {k: v.clone() for k, v in obj.queue.state_dict().items()}
    obj(random_batch(), alpha=0.4, enqueue=False)
    after = obj.queue.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    obj(random_batch(), alpha=0.4)  # default: ALBEF enqueues every step
    assert int(obj.queue.queue_ptr) != int(before["queue_ptr"])


def test_schema_default_is_albef() -> None:
    from model.config.schema import ModelConfig

    assert ModelConfig().queue_warmup_steps == 0
