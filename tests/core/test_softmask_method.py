"""SoftMask++'s three switches against their definitions (docs/METHOD.md §1-3, docs/ALBEF.md §7).

What is proved here:

* every switch off (default config, explicit identity values, inert knobs changed) gives
  bit-identical losses and gradients: the baseline is ALBEF's objective;
* a patch mask of ones is the identity on image tokens and on the fusion output;
* the training Grad-CAM equals an independent per-sample computation of the same definition,
  writes no ``.grad``, leaves no hook or attribute on any module, and yields a detached mask in
  [0, 1] whose minimum sits on the chosen word's most attended patch;
* the chosen word is a real word (never special, never an MLM-corrupted position under MMDA),
  uniform over the candidates, with a [CLS] fallback;
* RandMask's ratio, [CLS] token and reproducibility;
* focal ITC: gamma = 0 is ALBEF's ITC bit for bit, gamma > 0 down-weights easy pairs;
* the number of fusion / text-encoder forwards per step for each switch combination;
* MMDA's inputs (strong view + masked text for the student, clean text + standard view for the
  teacher's ITC);
* ``softmask.apply_to = itm_mlm``: MLM also on the soft-masked pairs, and only with MMDA.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import model.objective as objective_module
from model.build import build_objective
from model.config.experiment import load_experiment
from model.config.loader import ConfigError
from model.config.schema import ExperimentConfig
from model.losses import itc_loss, soft_cross_entropy
from model.method.gradcam import gradcam_maps, minmax_normalise
from model.method.softmask import (
    apply_patch_mask,
    choose_words,
    random_patch_mask,
    real_word_mask,
    soft_mask_from_maps,
)
from model.objective import Objective
from model.text_masking import IGNORE, SpecialIds

VOCAB = 60
SPECIAL = SpecialIds(pad=0, cls=2, mask=4, vocab_size=VOCAB)
FIRST_WORD_ID = 5  # ids 0..4 are [PAD] [UNK] [CLS] [SEP] [MASK]
B, L = 8, 12


# --------------------------------------------------------------------------------- factories
def make_cfg(*sets: str) -> ExperimentConfig:
    return load_experiment(preset="tiny", sets=[f"model.text.vocab_size={VOCAB}", *sets])


def make_objective(cfg: ExperimentConfig, seed: int = 0, init_seed: int = 1234) -> Objective:
    """Weights and queues come from the global RNG: seed it so two builds are identical."""
    torch.manual_seed(init_seed)
    return build_objective(cfg, SPECIAL, seed=seed)


def make_batch(batch: int = B, length: int = L, seed: int = 7) -> dict[str, Tensor]:
    """Random captions ([CLS] first, ragged padding, no special id inside) and two views."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(FIRST_WORD_ID, VOCAB, (batch, length), generator=g)
    ids[:, 0] = SPECIAL.cls
    lengths = torch.randint(length // 2, length + 1, (batch,), generator=g)
    lengths[0] = length  # at least one unpadded row
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    ids = torch.where(mask.bool(), ids, torch.full_like(ids, SPECIAL.pad))
    return {
        "image": torch.randn(batch, 3, 32, 32, generator=g),
        "image_strong": torch.randn(batch, 3, 32, 32, generator=g),
        "input_ids": ids,
        "attention_mask": mask,
    }


def run_step(obj: Objective, batch: dict[str, Tensor], alpha: float = 0.4, rng_seed: int = 99):
    """Forward + backward with a fixed global RNG (dropout); returns (losses, grads)."""
    torch.manual_seed(rng_seed)
    obj.zero_grad(set_to_none=True)
    out = obj(batch, alpha)
    out.loss.backward()
    grads = {n: (p.grad.clone() if p.grad is not None else None)
             for n, p in obj.student.named_parameters()}
    return out, grads


@contextmanager
def count_calls(modules: dict[str, nn.Module], pre: bool = False) -> Iterator[dict[str, list]]:
    """Record every forward call (its positional inputs) of the named modules; hooks removed
    on exit, whatever happens."""
    calls: dict[str, list] = {name: [] for name in modules}
    handles = []
    for name, module in modules.items():
        def hook(_m, args, *_rest, _name=name):
            calls[_name].append(tuple(a.detach().clone() if torch.is_tensor(a) else a
                                      for a in args))
        handles.append(module.register_forward_pre_hook(hook) if pre
                       else module.register_forward_hook(hook))
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


def assert_no_hooks(root: nn.Module) -> None:
    for name, m in root.named_modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                     "_backward_pre_hooks", "_state_dict_hooks", "_load_state_dict_pre_hooks"):
            assert not getattr(m, attr, {}), f"{name or 'root'} keeps {attr}"
    for name, p in root.named_parameters():
        assert not getattr(p, "_backward_hooks", None), f"parameter {name} keeps a tensor hook"
    from torch.nn.modules import module as module_mod
    for attr in ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks"):
        assert not getattr(module_mod, attr, {}), f"global {attr} left behind"


def module_attrs(root: nn.Module) -> dict[str, set[str]]:
    return {name: set(vars(m)) for name, m in root.named_modules()}


# ============================================================================ 1. identity
INERT_WHEN_OFF = (
    "softmask.mode='off'",
    "softmask.random_p=0.3",
    "softmask.word=mean",
    "softmask.layer=0",
    "softmask.apply_to=itm_mlm",
    "loss.focal_detach=true",
    "mmda.strong_image=false",
)


def test_every_switch_off_is_bit_identical_to_albef() -> None:
    configs = {
        "default": make_cfg(),
        "explicit_identity": make_cfg("softmask.mode='off'", "loss.focal_gamma=0",
                                      "mmda.enabled=false"),
        "inert_knobs": make_cfg(*INERT_WHEN_OFF),
    }
    objectives = {k: make_objective(c) for k, c in configs.items()}
    # the image_strong view is in the batch: with MMDA off it must not be used
    batches = [make_batch(seed=1), make_batch(seed=2)]
    ref_name = "default"
    results = {k: [] for k in objectives}
    for name, obj in objectives.items():
        for step, batch in enumerate(batches):  # two steps: EMA and queue state carry over
            results[name].append(run_step(obj, batch, rng_seed=100 + step))
    for name in objectives:
        for step in range(len(batches)):
            out, grads = results[name][step]
            ref_out, ref_grads = results[ref_name][step]
            assert set(out.losses) == {"itc", "itm", "mlm"}
            method_stats = {k for k in out.stats if k != "temp" and not k.startswith("itm/")}
            assert not method_stats, "no method statistic when every switch is off"
            for key in ref_out.losses:
                assert torch.equal(out.losses[key], ref_out.losses[key]), (name, step, key)
            assert torch.equal(out.loss, ref_out.loss)
            for pname, g in ref_grads.items():
                assert g is not None, pname
                assert torch.equal(grads[pname], g), (name, step, pname)
        # state after the steps (EMA teacher, queues) is identical too
        ref_state = objectives[ref_name].state_dict()
        for key, value in objectives[name].state_dict().items():
            assert torch.equal(value, ref_state[key]), (name, key)


def test_off_ignores_image_strong() -> None:
    """With MMDA off, the strong view never reaches the model: changing it changes nothing."""
    obj_a, obj_b = make_objective(make_cfg()), make_objective(make_cfg())
    batch = make_batch()
    other = dict(batch, image_strong=torch.zeros_like(batch["image_strong"]))
    out_a, _ = run_step(obj_a, batch)
    out_b, _ = run_step(obj_b, other)
    assert torch.equal(out_a.loss, out_b.loss)


# ============================================================================ 2. mask of ones
def test_patch_mask_of_ones_is_identity() -> None:
    obj = make_objective(make_cfg())
    obj.eval()
    batch = make_batch()
    with torch.no_grad():
        img = obj.student.encode_image(batch["image"])
        txt = obj.student.encode_text(batch["input_ids"], batch["attention_mask"])
        ones = torch.ones(img.tokens.shape[0], img.tokens.shape[1] - 1)
        masked = apply_patch_mask(img.tokens, ones)
        assert torch.equal(masked, img.tokens)
        plain = obj.student.fuse(txt.states, batch["attention_mask"], img.tokens).hidden
        through = obj.student.fuse(txt.states, batch["attention_mask"], masked).hidden
    assert torch.equal(plain, through)


def test_apply_patch_mask_keeps_cls_and_scales_patches() -> None:
    tokens = torch.randn(4, 1 + 9, 6)
    mask = torch.rand(4, 9)
    out = apply_patch_mask(tokens, mask)
    assert torch.equal(out[:, 0], tokens[:, 0])
    torch.testing.assert_close(out[:, 1:], tokens[:, 1:] * mask[..., None], rtol=0, atol=0)


# ============================================================================ 3. Grad-CAM
def _positive_pass(obj: Objective, batch: dict[str, Tensor], layer: int):
    img = obj.student.encode_image(batch["image"])
    txt = obj.student.encode_text(batch["input_ids"], batch["attention_mask"])
    pos = obj.student.fuse(txt.states, batch["attention_mask"], img.tokens, attn_layer=layer)
    return pos, obj.student.itm_logits(pos.hidden)


def _independent_gradcam(obj: Objective, image: Tensor, ids: Tensor, layer: int) -> Tensor:
    """One unpadded sample, own code path: d(s)/dA with autograd.grad, A * relu(dA), mean heads.

    Returns (L_real, N).
    """
    student = obj.student
    tokens = student.visual_encoder.forward_features(image[None])
    states = student.text_encoder(ids[None], torch.ones_like(ids)[None])
    out = student.fusion_encoder(states, torch.ones_like(ids)[None], tokens, attn_layer=layer)
    attn = out.cross_attn  # (1, H, L, 1+N)
    score = student.itm_head(out.hidden[:, 0])[0, 1]
    (d_attn,) = torch.autograd.grad(score, attn)
    patches = attn[0, :, :, 1:] * torch.relu(d_attn[0, :, :, 1:])
    return patches.mean(dim=0).detach()


@pytest.mark.parametrize("layer", [0, 1])
def test_gradcam_matches_independent_per_sample_computation(layer: int) -> None:
    obj = make_objective(make_cfg("softmask.mode=gradcam"))
    obj.eval()  # no dropout: the batched and per-sample passes see the same network
    batch = make_batch()
    pos, logits = _positive_pass(obj, batch, layer)
    maps = gradcam_maps(logits, pos.cross_attn, batch["attention_mask"])
    assert maps.shape == (B, L, pos.cross_attn.shape[-1] - 1)
    assert (maps >= 0).all()
    for b in range(B):
        n = int(batch["attention_mask"][b].sum())
        ref = _independent_gradcam(obj, batch["image"][b], batch["input_ids"][b, :n], layer)
        scale = ref.abs().max()
        assert scale > 0, "a nontrivial map is needed for the comparison to mean anything"
        torch.testing.assert_close(maps[b, :n], ref, rtol=1e-4, atol=1e-5 * float(scale))
        assert (maps[b, n:] == 0).all(), "padded text rows must be zeroed"
    # the word rows (not only [CLS]) carry signal at a layer below the last one
    assert maps[:, 1:].abs().sum() > 0


@pytest.mark.parametrize("layer", [0, 1])
def test_the_objective_takes_gradcam_at_the_configured_fusion_layer(layer: int,
                                                                    monkeypatch) -> None:
    """The cross-attention map the objective hands to Grad-CAM is the one of fusion layer
    ``softmask.layer``, recomputed here from the positive pass's own inputs."""
    obj = make_objective(make_cfg("softmask.mode=gradcam", f"softmask.layer={layer}"))
    obj.eval()  # no dropout: the recomputation sees the same network
    inputs, maps_in = [], []
    handle = obj.student.fusion_encoder.register_forward_pre_hook(
        lambda _m, args: inputs.append(tuple(a.detach().clone() if torch.is_tensor(a) else a
                                             for a in args)))
    real = objective_module.gradcam_maps

    def recording(logits: Tensor, cross_attn: Tensor, mask: Tensor) -> Tensor:
        maps_in.append(cross_attn.detach().clone())
        return real(logits, cross_attn, mask)

    monkeypatch.setattr(objective_module, "gradcam_maps", recording)
    try:
        obj(make_batch(), 0.4)
    finally:
        handle.remove()
    assert len(maps_in) == 1
    states, mask, tokens = inputs[0][:3]  # the positive pass comes first
    with torch.no_grad():
        per_layer = [obj.student.fusion_encoder(states, mask, tokens, i).cross_attn
                     for i in range(len(obj.student.fusion_encoder.layer))]
    torch.testing.assert_close(maps_in[0], per_layer[layer])
    others = [i for i in range(len(per_layer)) if i != layer]
    assert all(not torch.allclose(maps_in[0], per_layer[i]) for i in others)


def test_gradcam_last_layer_words_are_zero_hence_config_check() -> None:
    """The reason for the schema's ``softmask.layer < fusion_layers - 1`` check."""
    cfg = make_cfg()
    last = cfg.model.text.fusion_layers - 1
    obj = make_objective(cfg)
    obj.eval()
    batch = make_batch()
    pos, logits = _positive_pass(obj, batch, last)
    maps = gradcam_maps(logits, pos.cross_attn, batch["attention_mask"])
    assert (maps[:, 1:] == 0).all() and maps[:, 0].abs().sum() > 0
    with pytest.raises(ConfigError, match="softmask.layer"):
        make_cfg(f"softmask.layer={last}")


def test_gradcam_writes_no_grad_and_leaves_no_hooks_or_attributes() -> None:
    obj = make_objective(make_cfg("softmask.mode=gradcam"))
    params = dict(obj.named_parameters())
    preset = {"student.itm_head.weight", "student.temp",
              "student.fusion_encoder.layer.1.crossattention.self.key.weight"}
    for name in preset:
        params[name].grad = torch.full_like(params[name], 0.125)
    before_attrs = module_attrs(obj)
    batch = make_batch()

    # (a) the function itself
    pos, logits = _positive_pass(obj, batch, obj.cfg.softmask.layer)
    gradcam_maps(logits, pos.cross_attn, batch["attention_mask"])
    # (b) the whole training forward (Grad-CAM inside), without the loss backward
    out = obj(batch, 0.4)
    assert "mask_mean" in out.stats

    for name, p in params.items():
        if name in preset:
            assert torch.equal(p.grad, torch.full_like(p, 0.125)), name
        else:
            assert p.grad is None, f"{name} got a .grad from Grad-CAM"
    assert_no_hooks(obj)
    assert module_attrs(obj) == before_attrs, "an attribute was left on a module"


def test_soft_mask_range_minimum_and_detached() -> None:
    obj = make_objective(make_cfg("softmask.mode=gradcam"))
    obj.eval()
    batch = make_batch()
    pos, logits = _positive_pass(obj, batch, obj.cfg.softmask.layer)
    maps = gradcam_maps(logits, pos.cross_attn, batch["attention_mask"], create_graph=True)
    assert not maps.requires_grad, "Grad-CAM maps must be detached"
    real = real_word_mask(batch["input_ids"], batch["attention_mask"], obj.special_ids)
    words = choose_words(real, torch.Generator().manual_seed(0))
    mask = soft_mask_from_maps(maps, words)
    assert not mask.requires_grad
    assert mask.shape == (B, maps.shape[-1])
    assert (mask >= 0).all() and (mask <= 1).all()
    for b in range(B):
        chosen = maps[b, words[b]]
        assert chosen.max() > chosen.min(), "need a non-constant map"
        hottest = int(chosen.argmax())
        assert mask[b, hottest] == 0 and mask[b].min() == 0
        assert int(mask[b].argmin()) == hottest
        assert mask[b].max() == 1
        # the mask is exactly 1 - minmax of the chosen word's map
        torch.testing.assert_close(mask[b], 1 - minmax_normalise(chosen))


def test_no_gradient_flows_through_the_mask() -> None:
    tokens = torch.randn(2, 5, 4, requires_grad=True)
    mask = torch.rand(2, 4, requires_grad=True)
    out = apply_patch_mask(tokens, mask)
    g_tokens, g_mask = torch.autograd.grad(out.sum(), [tokens, mask], allow_unused=True)
    assert g_mask is None
    assert torch.equal(g_tokens[:, 1:], mask.detach()[..., None].expand(2, 4, 4))


def test_all_zero_map_gives_mask_of_ones() -> None:
    maps = torch.zeros(3, L, 16)
    mask = soft_mask_from_maps(maps, torch.tensor([0, 3, 5]))
    assert torch.equal(mask, torch.ones(3, 16))
    mean_mask = soft_mask_from_maps(maps, None)
    assert torch.equal(mean_mask, torch.ones(3, 16))


# ============================================================================ 4. word choice
def test_real_word_mask_excludes_specials_padding_and_corrupted() -> None:
    ids = torch.tensor([[2, 9, 4, 11, 12, 0, 0],
                        [2, 0, 0, 0, 0, 0, 0],
                        [2, 13, 14, 15, 16, 17, 18]])
    att = torch.tensor([[1, 1, 1, 1, 1, 0, 0],
                        [1, 0, 0, 0, 0, 0, 0],
                        [1, 1, 1, 1, 1, 1, 1]])
    special = torch.tensor([SPECIAL.pad, SPECIAL.cls, SPECIAL.mask])
    real = real_word_mask(ids, att, special)
    expected = torch.tensor([[0, 1, 0, 1, 1, 0, 0],
                             [0, 0, 0, 0, 0, 0, 0],
                             [0, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(real, expected)
    labels = torch.full_like(ids, IGNORE)
    labels[2, 2] = 14  # corrupted but kept its id (the 10% "unchanged" case)
    labels[2, 5] = 17
    real = real_word_mask(ids, att, special, labels)
    expected[2, 2] = expected[2, 5] = False
    assert torch.equal(real, expected)


def test_choose_words_is_a_real_word_uniformly_and_falls_back_to_cls() -> None:
    g = torch.Generator().manual_seed(0)
    cand = torch.zeros(4, 8, dtype=torch.bool)
    cand[0, [1, 3, 6, 7]] = True
    cand[2, 5] = True
    # rows 1 and 3: no real word -> [CLS]
    for _ in range(20):
        w = choose_words(cand, g)
        assert cand[0, w[0]] and w[1] == 0 and w[2] == 5 and w[3] == 0
    many = cand[:1].expand(40000, 8).contiguous()
    w = choose_words(many, g)
    counts = torch.bincount(w, minlength=8).float()
    assert counts[[0, 2, 4, 5]].sum() == 0
    p, n = 0.25, many.shape[0]
    tol = 5 * math.sqrt(p * (1 - p) / n)
    assert ((counts[[1, 3, 6, 7]] / n - p).abs() < tol).all(), counts


def test_caption_without_real_word_falls_back_to_cls_in_the_objective() -> None:
    obj = make_objective(make_cfg("softmask.mode=gradcam"))
    batch = make_batch()
    batch["input_ids"][1, 1:] = SPECIAL.pad
    batch["attention_mask"][1, 1:] = 0
    batch["input_ids"][3, 1:] = SPECIAL.mask  # attended but special
    chosen = []
    original = objective_module.choose_words

    def spy(candidates, generator):
        w = original(candidates, generator)
        chosen.append(w)
        return w

    objective_module.choose_words = spy
    try:
        out = obj(batch, 0.4)
    finally:
        objective_module.choose_words = original
    assert torch.isfinite(out.loss)
    (w,) = chosen
    assert w[1] == 0 and w[3] == 0
    others = [b for b in range(B) if b not in (1, 3)]
    assert (w[others] > 0).all()


@pytest.mark.parametrize("mmda", [False, True])
def test_objective_chooses_real_uncorrupted_words(mmda: bool, monkeypatch) -> None:
    sets = ["softmask.mode=gradcam", "loss.mlm_prob=0.5"] + (["mmda.enabled=true"] if mmda else [])
    obj = make_objective(make_cfg(*sets))
    record: dict[str, list] = {"mask": [], "words": [], "cand": []}
    real_mask_tokens, real_choose = objective_module.mask_tokens, objective_module.choose_words

    def mask_spy(*a, **k):
        out = real_mask_tokens(*a, **k)
        record["mask"].append(out)
        return out

    def choose_spy(candidates, generator):
        w = real_choose(candidates, generator)
        record["cand"].append(candidates.clone())
        record["words"].append(w)
        return w

    monkeypatch.setattr(objective_module, "mask_tokens", mask_spy)
    monkeypatch.setattr(objective_module, "choose_words", choose_spy)
    special = {SPECIAL.pad, SPECIAL.cls, SPECIAL.mask}
    corrupted_seen = 0
    for step in range(4):
        batch = make_batch(seed=step)
        obj(batch, 0.4)
        (masked, labels), words = record["mask"][step], record["words"][step]
        ids, att = batch["input_ids"], batch["attention_mask"]
        seen_ids = masked if mmda else ids
        for b in range(B):
            p = int(words[b])
            assert p != 0, "every test caption has real words"
            assert att[b, p] == 1 and int(seen_ids[b, p]) not in special
            if mmda:
                assert labels[b, p] == IGNORE, "a position replaced by MLM corruption was chosen"
        corrupted = (labels != IGNORE) & att.bool()
        corrupted_seen += int(corrupted.sum())
        if mmda:
            assert not (record["cand"][step] & corrupted).any()
        else:  # without MMDA the ITM text is clean: corrupted positions stay candidates
            assert (record["cand"][step] & corrupted).any()
    assert corrupted_seen > 0


# ============================================================================ 5. RandMask
@pytest.mark.parametrize("p", [0.3, 0.5])
def test_random_mask_ratio_cls_and_reproducibility(p: float) -> None:
    n_rows, n_patches = 500, 64
    mask = random_patch_mask(n_rows, n_patches, p, torch.Generator().manual_seed(3),
                             torch.device("cpu"))
    assert mask.shape == (n_rows, n_patches)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    n = mask.numel()
    zero_frac = float((mask == 0).float().mean())
    assert abs(zero_frac - p) < 5 * math.sqrt(p * (1 - p) / n), zero_frac
    # per-row ratios scatter around p too (independent patches, not a fixed count per row)
    assert mask.sum(1).std() > 0
    again = random_patch_mask(n_rows, n_patches, p, torch.Generator().manual_seed(3),
                              torch.device("cpu"))
    other = random_patch_mask(n_rows, n_patches, p, torch.Generator().manual_seed(4),
                              torch.device("cpu"))
    assert torch.equal(mask, again) and not torch.equal(mask, other)
    tokens = torch.randn(n_rows, 1 + n_patches, 8)
    out = apply_patch_mask(tokens, mask)
    assert torch.equal(out[:, 0], tokens[:, 0]), "the image [CLS] token must be untouched"
    dropped = mask == 0
    assert (out[:, 1:][dropped] == 0).all()
    assert torch.equal(out[:, 1:][~dropped], tokens[:, 1:][~dropped])


@pytest.mark.parametrize("p", [0.3, 0.5])
def test_objective_randmask_uses_random_p(p: float) -> None:
    obj = make_objective(make_cfg("softmask.mode=random", f"softmask.random_p={p}"))
    means = []
    with torch.no_grad():
        for step in range(6):
            means.append(float(obj(make_batch(seed=step), 0.4).stats["mask_mean"]))
    n = 6 * B * obj.student.visual_encoder.patch_embed.num_patches
    kept = sum(means) / len(means)
    assert abs(kept - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)


def test_objective_randmask_is_reproducible_from_the_seed() -> None:
    cfg = make_cfg("softmask.mode=random", "softmask.random_p=0.3")
    a, b = make_objective(cfg, seed=5), make_objective(cfg, seed=5)
    c = make_objective(cfg, seed=6)
    batch = make_batch()
    outs = []
    for obj in (a, b, c):
        torch.manual_seed(0)
        outs.append(obj(batch, 0.4).loss.detach())
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2])


# ============================================================================ 6. focal ITC
def _albef_itc(sim_i2t, sim_t2i, q_i2t, q_t2i) -> Tensor:
    """ALBEF's model_pretrain.py, verbatim in meaning."""
    loss_i2t = -torch.sum(F.log_softmax(sim_i2t, dim=1) * q_i2t, dim=1).mean()
    loss_t2i = -torch.sum(F.log_softmax(sim_t2i, dim=1) * q_t2i, dim=1).mean()
    return (loss_i2t + loss_t2i) / 2


def test_focal_gamma_zero_is_albef_itc_exactly() -> None:
    g = torch.Generator().manual_seed(0)
    sim_i2t = (torch.randn(8, 8 + 64, generator=g) * 5).requires_grad_()
    sim_t2i = (torch.randn(8, 8 + 64, generator=g) * 5).requires_grad_()
    hard = torch.zeros(8, 72)
    hard[:, :8] = torch.eye(8)
    q_i2t = 0.4 * torch.softmax(torch.randn(8, 72, generator=g), 1) + 0.6 * hard
    q_t2i = 0.4 * torch.softmax(torch.randn(8, 72, generator=g), 1) + 0.6 * hard
    ours = itc_loss(sim_i2t, sim_t2i, q_i2t, q_t2i, gamma=0.0)
    ref = _albef_itc(sim_i2t, sim_t2i, q_i2t, q_t2i)
    assert torch.equal(ours, ref)
    g_ours = torch.autograd.grad(ours, [sim_i2t, sim_t2i])
    g_ref = torch.autograd.grad(ref, [sim_i2t, sim_t2i])
    assert all(torch.equal(a, b) for a, b in zip(g_ours, g_ref, strict=True))
    # and focal_detach is inert at gamma = 0
    assert torch.equal(itc_loss(sim_i2t, sim_t2i, q_i2t, q_t2i, 0.0, True), ref)


def test_focal_on_changes_only_itc_in_the_objective() -> None:
    batch = make_batch()
    outs = {}
    for gamma in (0.0, 2.0):
        obj = make_objective(make_cfg(f"loss.focal_gamma={gamma}"))
        outs[gamma], _ = run_step(obj, batch)
    assert not torch.equal(outs[0.0].losses["itc"], outs[2.0].losses["itc"])
    assert outs[2.0].losses["itc"] < outs[0.0].losses["itc"]
    assert torch.equal(outs[0.0].losses["itm"], outs[2.0].losses["itm"])
    assert torch.equal(outs[0.0].losses["mlm"], outs[2.0].losses["mlm"])


def test_focal_downweights_easy_pairs() -> None:
    # row 0: easy (the positive dominates), row 1: hard (a negative scores higher)
    logits = torch.tensor([[8.0, 0.0, 0.0, 0.0],
                           [0.5, 1.5, 0.0, 0.0]])
    targets = torch.tensor([[1.0, 0.0, 0.0, 0.0],
                            [1.0, 0.0, 0.0, 0.0]])
    ce = [float(soft_cross_entropy(logits[i:i + 1], targets[i:i + 1])) for i in range(2)]
    focal = [float(soft_cross_entropy(logits[i:i + 1], targets[i:i + 1], gamma=2.0))
             for i in range(2)]
    p = torch.softmax(logits, 1)[:, 0]
    for i in range(2):  # the closed form -(1 - p)^2 log p
        assert math.isclose(focal[i], float(-(1 - p[i]) ** 2 * torch.log(p[i])), rel_tol=1e-5)
        assert focal[i] < ce[i]
    ratio_easy, ratio_hard = focal[0] / ce[0], focal[1] / ce[1]
    assert ratio_easy < 1e-3 < 0.3 < ratio_hard
    # larger gamma -> stronger down-weighting of the easy row, relative to the hard one
    f4 = [float(soft_cross_entropy(logits[i:i + 1], targets[i:i + 1], gamma=4.0))
          for i in range(2)]
    assert f4[0] / f4[1] < focal[0] / focal[1]
    # the easy row's share of the batch gradient shrinks under focal weighting
    x = logits.clone().requires_grad_()
    g_ce = torch.autograd.grad(soft_cross_entropy(x, targets), x)[0].norm(dim=1)
    g_fo = torch.autograd.grad(soft_cross_entropy(x, targets, gamma=2.0), x)[0].norm(dim=1)
    assert g_fo[0] / g_fo[1] < g_ce[0] / g_ce[1]


def test_focal_detach_changes_gradient_not_value() -> None:
    x = torch.tensor([[2.0, 0.5, -1.0]], requires_grad=True)
    t = torch.tensor([[0.8, 0.1, 0.1]])
    a = soft_cross_entropy(x, t, gamma=2.0)
    b = soft_cross_entropy(x, t, gamma=2.0, detach_modulation=True)
    assert torch.equal(a, b)
    ga = torch.autograd.grad(a, x)[0]
    gb = torch.autograd.grad(b, x)[0]
    assert not torch.allclose(ga, gb)


# ============================================================================ 7. forward counts
COUNT_CASES = {
    # name: (sets, student fusion, teacher fusion, student text, teacher text)
    "albef": ((), 3, 1, 2, 2),
    "mmda": (("mmda.enabled=true",), 2, 1, 1, 2),
    "softmask": (("softmask.mode=gradcam",), 4, 1, 2, 2),
    "softmask_mmda": (("softmask.mode=gradcam", "mmda.enabled=true"), 3, 1, 1, 2),
    "randmask": (("softmask.mode=random",), 4, 1, 2, 2),
    "randmask_mmda": (("softmask.mode=random", "mmda.enabled=true"), 3, 1, 1, 2),
    "full_mlm": (("softmask.mode=gradcam", "mmda.enabled=true", "softmask.apply_to=itm_mlm",
                  "loss.focal_gamma=2"), 3, 1, 1, 2),
}


@pytest.mark.parametrize("case", sorted(COUNT_CASES))
def test_forward_counts_per_step(case: str) -> None:
    sets, s_fuse, t_fuse, s_text, t_text = COUNT_CASES[case]
    obj = make_objective(make_cfg(*sets))
    modules = {
        "s_fuse": obj.student.fusion_encoder, "t_fuse": obj.teacher.fusion_encoder,
        "s_text": obj.student.text_encoder, "t_text": obj.teacher.text_encoder,
        "s_vit": obj.student.visual_encoder.patch_embed,
        "t_vit": obj.teacher.visual_encoder.patch_embed,
    }
    batch = make_batch()
    with count_calls(modules) as calls:
        out = obj(batch, 0.4)
        out.loss.backward()
    assert_no_hooks(obj)
    got = {k: len(v) for k, v in calls.items()}
    assert got == {"s_fuse": s_fuse, "t_fuse": t_fuse, "s_text": s_text, "t_text": t_text,
                   "s_vit": 1, "t_vit": 1}, got
    rows = [c[0].shape[0] for c in calls["s_fuse"]]
    # positives (B), then the 2B hard negatives, then masked positives / the MLM pass (B each)
    assert rows == [B, 2 * B] + [B] * (s_fuse - 2)


def test_matrix_cells_forward_counts() -> None:
    """The same counts, read off the real matrix cells (cost table: ours w/o SoftMask < ALBEF)."""
    from ablations.grid import expand

    expected = {"albef": 3, "mmda": 2, "focal_mmda": 2, "softmask": 4, "softmask_focal": 4,
                "softmask_mmda": 3, "full": 3, "randmask_p03": 3, "randmask_p05": 3,
                "full_mlm": 3, "focal": 3}
    specs = expand(preset="tiny", seeds=[0], sets=[f"model.text.vocab_size={VOCAB}"])
    assert {s.cell for s in specs} == set(expected)
    batch = make_batch()
    for spec in specs:
        obj = make_objective(spec.config)
        with count_calls({"f": obj.student.fusion_encoder}) as calls:
            obj(batch, 0.4)
        assert len(calls["f"]) == expected[spec.cell], spec.cell


# ============================================================================ 8. MMDA inputs
@pytest.mark.parametrize("mmda", [False, True])
def test_mmda_inputs_student_and_teacher(mmda: bool, monkeypatch) -> None:
    obj = make_objective(make_cfg(*(["mmda.enabled=true"] if mmda else [])))
    masks = []
    original = objective_module.mask_tokens

    def mask_spy(*a, **k):
        out = original(*a, **k)
        masks.append(out)
        return out

    monkeypatch.setattr(objective_module, "mask_tokens", mask_spy)
    modules = {"s_text": obj.student.text_encoder, "t_text": obj.teacher.text_encoder,
               "s_vit": obj.student.visual_encoder.patch_embed,
               "t_vit": obj.teacher.visual_encoder.patch_embed}
    batch = make_batch()
    with count_calls(modules, pre=True) as calls:
        obj(batch, 0.4)
    (masked_ids, labels), = masks
    clean = batch["input_ids"]
    assert not torch.equal(masked_ids, clean)
    (s_img,), (t_img,) = [c[0] for c in calls["s_vit"]], [c[0] for c in calls["t_vit"]]
    assert torch.equal(t_img, batch["image"]), "the teacher sees ALBEF's standard view"
    if mmda:
        assert torch.equal(s_img, batch["image_strong"]), "the student sees the strong view"
        (s_ids,) = [c[0] for c in calls["s_text"]]
        assert torch.equal(s_ids, masked_ids), "unimodal text encoder gets masked text"
    else:
        assert torch.equal(s_img, batch["image"])
        s_ids = [c[0] for c in calls["s_text"]]
        assert torch.equal(s_ids[0], clean) and torch.equal(s_ids[1], masked_ids)
    t_ids = [c[0] for c in calls["t_text"]]
    assert torch.equal(t_ids[0], clean), "the teacher's ITC features come from clean text"
    assert torch.equal(t_ids[1], masked_ids), "the teacher's MLM pass runs on the masked text"


def test_mmda_without_strong_view_is_an_error() -> None:
    obj = make_objective(make_cfg("mmda.enabled=true"))
    batch = make_batch()
    del batch["image_strong"]
    with pytest.raises(ValueError, match="image_strong"):
        obj(batch, 0.4)


def test_mmda_strong_ops_are_validated_and_reach_the_strong_view() -> None:
    from torchvision.transforms import v2

    from model.engine.data import train_transform

    cfg = load_experiment(preset="tiny", sets=["mmda.enabled=true",
                                                "mmda.strong_ops=[color_jitter, blur]"])
    strong = train_transform(cfg).views["image_strong"]
    assert {type(op) for op in strong.transforms} >= {v2.ColorJitter, v2.GaussianBlur}
    assert not any(isinstance(op, v2.RandAugment) for op in strong.transforms)
    for bad, why in (("[colour_jitter]", "unknown operation"), ("[blur, blur]", "twice")):
        with pytest.raises(ConfigError, match=f"mmda.strong_ops.*{why}"):
            load_experiment(preset="tiny", sets=[f"mmda.strong_ops={bad}"])


def test_mmda_shares_the_positive_pass_for_itm_and_mlm(monkeypatch) -> None:
    """The MLM student logits are computed from the positive ITM pass's hidden states."""
    obj = make_objective(make_cfg("mmda.enabled=true"))
    obj.eval()
    fused, mlm_inputs = [], []
    handle = obj.student.fusion_encoder.register_forward_hook(
        lambda _m, _a, out: fused.append(out.hidden.detach().clone()))
    handle2 = obj.student.mlm_head.register_forward_pre_hook(
        lambda _m, args: mlm_inputs.append(args[0].detach().clone()))
    try:
        obj(make_batch(), 0.4)
    finally:
        handle.remove()
        handle2.remove()
    assert len(fused) == 2 and len(mlm_inputs) == 1
    positives = fused[0]
    (rows,) = mlm_inputs
    # the rows fed to the MLM head are a subset of the positive pass's states
    flat = positives.reshape(-1, positives.shape[-1])
    for r in rows:
        assert (flat == r).all(dim=1).any()


# ============================================================================ 9. apply_to
def test_apply_to_itm_mlm_adds_mlm_on_masked_pairs() -> None:
    specs = {}
    base = ("softmask.mode=gradcam", "mmda.enabled=true")
    batch = make_batch()
    for apply_to in ("itm", "itm_mlm"):
        obj = make_objective(make_cfg(*base, f"softmask.apply_to={apply_to}"))
        mlm_calls = []
        h = obj.student.mlm_head.register_forward_pre_hook(
            lambda _m, args, _c=mlm_calls: _c.append(args[0].shape))
        try:
            specs[apply_to], _ = run_step(obj, batch)
        finally:
            h.remove()
        assert len(mlm_calls) == (2 if apply_to == "itm_mlm" else 1)
    a, b = specs["itm"], specs["itm_mlm"]
    assert torch.equal(a.losses["itc"], b.losses["itc"])
    assert torch.equal(a.losses["itm"], b.losses["itm"])
    assert not torch.equal(a.losses["mlm"], b.losses["mlm"])
    assert torch.isfinite(b.losses["mlm"])


@pytest.mark.parametrize("sets", [
    ("softmask.mode=gradcam", "softmask.apply_to=itm_mlm"),
    ("softmask.mode=random", "softmask.apply_to=itm_mlm"),
    ("softmask.mode=gradcam", "softmask.apply_to=itm_mlm", "mmda.enabled=true",
     "mmda.masked_text=false"),
])
def test_apply_to_itm_mlm_requires_mmda(sets: Sequence[str]) -> None:
    with pytest.raises(ConfigError, match="itm_mlm"):
        make_cfg(*sets)
    make_cfg(*sets, "mmda.enabled=true", "mmda.masked_text=true")  # valid with MMDA on


# ============================================================================ 10. word = mean
def _mean_over_real(maps: Tensor, real: Tensor) -> Tensor:
    w = real.float()
    w[:, 0] = torch.where(w.sum(1) == 0, torch.ones_like(w[:, 0]), w[:, 0])
    return (maps * w[..., None]).sum(1) / w.sum(1, keepdim=True)


def test_mean_word_mode_averages_the_real_words_only() -> None:
    """``softmask.word = mean``: the map averaged over the caption's real words (not [CLS],
    not special or MLM-corrupted tokens), as soft_mask_from_maps documents."""
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(3, 6, 9, generator=g) * 0.1
    maps[:, 0, 4] = 5.0  # a [CLS] row that would dominate the mean
    real = torch.tensor([[0, 1, 1, 0, 1, 0], [0, 0, 0, 0, 0, 0], [0, 1, 1, 1, 1, 1]]).bool()
    got = soft_mask_from_maps(maps, None, real)
    expected = 1 - minmax_normalise(_mean_over_real(maps, real))
    torch.testing.assert_close(got, expected)
    assert got[1, 4] == 0, "a caption without real words falls back to the [CLS] map"
    assert got[0, 4] != 0 and got[2, 4] != 0


@pytest.mark.parametrize("mmda", [False, True])
def test_objective_mean_word_mode_uses_real_words(mmda: bool, monkeypatch) -> None:
    sets = ["softmask.mode=gradcam", "softmask.word=mean"] + (["mmda.enabled=true"] if mmda
                                                               else [])
    obj = make_objective(make_cfg(*sets))
    seen: dict[str, list] = {"maps": [], "mask": [], "tok": []}
    real_gradcam, real_soft = objective_module.gradcam_maps, objective_module.soft_mask_from_maps
    real_mask_tokens = objective_module.mask_tokens

    def gradcam_spy(*a, **k):
        seen["maps"].append(real_gradcam(*a, **k))
        return seen["maps"][-1]

    def soft_spy(*a, **k):
        seen["mask"].append(real_soft(*a, **k))
        return seen["mask"][-1]

    def mask_tokens_spy(*a, **k):
        seen["tok"].append(real_mask_tokens(*a, **k))
        return seen["tok"][-1]

    monkeypatch.setattr(objective_module, "gradcam_maps", gradcam_spy)
    monkeypatch.setattr(objective_module, "soft_mask_from_maps", soft_spy)
    monkeypatch.setattr(objective_module, "mask_tokens", mask_tokens_spy)
    batch = make_batch()
    obj(batch, 0.4)
    (maps,), (mask,), ((masked_ids, labels),) = seen["maps"], seen["mask"], seen["tok"]
    ids = masked_ids if mmda else batch["input_ids"]
    real = real_word_mask(ids, batch["attention_mask"], obj.special_ids,
                          labels if mmda else None)
    expected = 1 - minmax_normalise(_mean_over_real(maps, real))
    torch.testing.assert_close(mask, expected)
