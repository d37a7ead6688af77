"""CUDA checks (``gpu`` marker; skipped where CUDA is absent). Run by ``benchmarks.gpu_check``.

Tolerances: fp32 with TF32 off must match the CPU to float rounding of reordered sums (losses
1e-4 relative, gradients 1e-3 relative in norm); bf16 autocast is compared with the fp32 run on
the same device at 5e-2 relative on the losses (bf16 keeps 8 bits of mantissa).
"""

from __future__ import annotations

import copy

import pytest
import torch

from model.engine.step import autocast_context, move_batch
from model.method.gradcam import gradcam_maps
from tests.tiny import random_batch, tiny_objective

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _forward_backward(obj, batch, precision="fp32"):
    obj.zero_grad(set_to_none=True)
    device = next(obj.parameters()).device
    with autocast_context(device, precision):
        out = obj(move_batch(batch, device), alpha=0.4, hardness=0.0)
    out.loss.backward()
    grads = {n: p.grad.detach().float().cpu() for n, p in obj.named_parameters()
             if p.grad is not None}
    return out, grads


def test_tiny_forward_backward_on_cuda_matches_cpu_in_fp32() -> None:
    # Dropout off, ITM and MLM weighted 0: what is left (ITC with its momentum distillation)
    # draws nothing from the per-device step generator, so both devices compute the same
    # function of the same weights and batch.
    sets = ("model.text.hidden_dropout=0.0", "model.text.attn_dropout=0.0", "loss.itm=0",
            "loss.mlm=0")
    cpu = tiny_objective(*sets)
    gpu = copy.deepcopy(cpu).cuda()
    batch = random_batch()
    out_cpu, g_cpu = _forward_backward(cpu, batch)
    out_gpu, g_gpu = _forward_backward(gpu, batch)
    assert out_gpu.losses["itc"].item() == pytest.approx(out_cpu.losses["itc"].item(), rel=1e-4)
    assert g_cpu.keys() == g_gpu.keys()
    for name in g_cpu:
        diff = torch.linalg.vector_norm(g_gpu[name] - g_cpu[name])
        assert diff <= 1e-3 * torch.linalg.vector_norm(g_cpu[name]) + 1e-7, name


def test_bf16_autocast_keeps_losses_queues_and_gradcam_in_fp32() -> None:
    obj = tiny_objective("softmask.mode=gradcam").cuda()
    batch = random_batch()
    ref, _ = _forward_backward(copy.deepcopy(obj), batch, "fp32")
    out, _ = _forward_backward(obj, batch, "bf16")
    for key, value in out.losses.items():
        assert value.dtype == torch.float32, key
        assert value.item() == pytest.approx(ref.losses[key].item(), rel=5e-2), key
    assert obj.queue.image_queue.dtype == torch.float32
    assert obj.queue.text_queue.dtype == torch.float32
    assert obj.student.temp.dtype == torch.float32
    # Grad-CAM of a bf16 forward: maps in fp32 and finite.
    with autocast_context(torch.device("cuda"), "bf16"):
        b = move_batch(batch, torch.device("cuda"))
        img = obj.student.encode_image(b["image"])
        txt = obj.student.encode_text(b["input_ids"], b["attention_mask"])
        fused = obj.student.fuse(txt.states, b["attention_mask"], img.tokens, attn_layer=1)
        maps = gradcam_maps(obj.student.itm_logits(fused.hidden).float(), fused.cross_attn,
                            b["attention_mask"])
    assert torch.isfinite(maps.float()).all()


def test_cuda_memory_probes_are_sane() -> None:
    torch.cuda.reset_peak_memory_stats()
    obj = tiny_objective().cuda()
    _forward_backward(obj, random_batch())
    allocated = torch.cuda.max_memory_allocated()
    reserved = torch.cuda.max_memory_reserved()
    total = torch.cuda.get_device_properties(0).total_memory
    assert 0 < allocated <= reserved <= total
