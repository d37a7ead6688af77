"""Initial weights for pre-training: BERT-base for the text/fusion encoder and the MLM head,
DeiT-B/16 (or any timm ViT) for the image encoder (docs/ALBEF.md §1.1, §1.2).

Both loaders are loud (``model.checkpoints.LoadReport``): a key that the model expects and the
checkpoint lacks is an error, except the few listed below with their reason. Keys in the reports
are relative to the student (``text_encoder.layer.0...``, ``visual_encoder.blocks.0...``). After
loading, the momentum twin is made equal to the student, as ALBEF's ``copy_params`` does.
"""

from __future__ import annotations

import logging
import math
import pickle
import re
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from transformers import BertForMaskedLM

from model.checkpoints import (
    REASON_NO_MLM_HEAD,
    AllowRule,
    CheckpointReadError,
    LoadReport,
    apply_state,
    classify_keys,
    copy_student_to_teacher,
    map_albef_state,
    ours_key_to_albef,
    split_target,
)
from model.objective import Objective
from model.vit import build_vit

log = logging.getLogger(__name__)

BERT_SCOPE = ("text_encoder.", "fusion_encoder.", "mlm_head.")
VIT_SCOPE = ("visual_encoder.",)
VIT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")

REASON_CROSSATTN = (
    "cross-attention does not exist in BERT; it keeps BERT's init N(0, 0.02), as in ALBEF "
    "(docs/ALBEF.md §1.2)"
)
REASON_POOLER = "BERT pooler: ALBEF builds its BERT without a pooling layer (docs/ALBEF.md §1.2)"
REASON_NSP = "BERT next-sentence-prediction head: not part of ALBEF"
REASON_VIT_HEAD = "ImageNet classifier head: ALBEF's ViT has no head (docs/ALBEF.md §1.1)"
REASON_DIST_TOKEN = (
    "DeiT distillation token: ALBEF's ViT has only the class token; the token and its "
    "position-embedding entry are dropped"
)


# ------------------------------------------------------------------ BERT
def _read_bert(name_or_path: str | Path, local_files_only: bool
               ) -> tuple[dict[str, Tensor], list[str]]:
    """(loaded BertForMaskedLM state, checkpoint keys transformers did not use).

    Keys transformers reports as missing were randomly initialised by it, not loaded: they are
    removed here so our comparison reports them as missing.
    """
    try:
        hf, info = BertForMaskedLM.from_pretrained(
            str(name_or_path), local_files_only=local_files_only, output_loading_info=True)
    except OSError as exc:
        hint = (" (or a hub name already in the local cache; pass local_files_only=False to "
                "download)") if local_files_only else ""
        raise FileNotFoundError(
            f"{name_or_path}: cannot load a BERT checkpoint: expected a directory with "
            f"config.json and model.safetensors or pytorch_model.bin{hint}. ({exc})") from exc
    if info.get("error_msgs"):
        raise CheckpointReadError(f"{name_or_path}: transformers failed to load BERT weights: "
                                  f"{info['error_msgs']}")
    not_loaded = set(info.get("missing_keys", ()))
    state = {k: v for k, v in hf.state_dict().items() if k not in not_loaded}
    return state, sorted(info.get("unexpected_keys", ()))


def load_bert_weights(
    student_or_objective: nn.Module,
    name_or_path: str | Path,
    local_files_only: bool = True,
    *,
    strict: bool = True,
) -> LoadReport:
    """Initialise the text encoder, fusion encoder and MLM head from a BERT checkpoint.

    ``bert.encoder.layer.i`` goes to text layer i (i < text_layers) or fusion layer
    i - text_layers. Allowed: cross-attention (absent from BERT), pooler and NSP head, and the
    MLM head when the model has none. Anything else raises ``CheckpointMismatchError``.
    """
    student, _ = split_target(student_or_objective)
    hf_state, hf_unused = _read_bert(name_or_path, local_files_only)
    text_layers = len(student.text_encoder.layer)
    # BertForMaskedLM keys are ALBEF's pre-training keys without the 'text_encoder.' root.
    mapped = map_albef_state({f"text_encoder.{k}": v for k, v in hf_state.items()},
                             text_layers, "pretrain", on_problem="record")
    report = LoadReport(
        source=str(name_or_path), fmt="BERT (transformers BertForMaskedLM)",
        ignored={k.removeprefix("text_encoder."): r for k, r in mapped.ignored.items()},
        problems=mapped.problems,
        names={k.removeprefix("student."): v.removeprefix("text_encoder.")
               for k, v in mapped.names.items()})
    rules = [AllowRule("missing", "fusion_encoder.layer.*.crossattention.*", REASON_CROSSATTN),
             AllowRule("unexpected", "bert.pooler.*", REASON_POOLER),
             AllowRule("unexpected", "cls.seq_relationship.*", REASON_NSP)]
    if student.mlm_head is None:
        rules.append(AllowRule("unexpected", "mlm_head.*", REASON_NO_MLM_HEAD))
    classify_keys(hf_unused, "unexpected", rules, report)
    state = {k.removeprefix("student."): v for k, v in mapped.state.items()}

    def bert_name(key: str) -> str | None:
        try:
            return ours_key_to_albef(f"student.{key}", text_layers, "pretrain").removeprefix(
                "text_encoder.")
        except ValueError:
            return None

    apply_state(student, state, report, rules=rules, scope=BERT_SCOPE, strict=strict,
                source_name=bert_name)
    if isinstance(student_or_objective, Objective):
        copy_student_to_teacher(student_or_objective, ("text_encoder", "fusion_encoder",
                                                       "mlm_head"))
        report.notes.append("momentum twin's text/fusion encoder and MLM head set equal to the "
                            "student")
    return report


# ------------------------------------------------------------------ ViT
def _npz_depth(shapes: dict[str, tuple[int, ...]], path: Path) -> int:
    """Number of transformer blocks in a Google/big_vision ViT ``.npz``."""
    indices = {int(m[1]) for k in shapes if (m := re.search(r"encoderblock_(\d+)/", k))}
    if indices:
        return max(indices) + 1
    stacked = [s for k, s in shapes.items() if k.endswith("encoderblock/LayerNorm_0/scale")]
    if stacked:  # big_vision stacks the blocks along a leading axis
        return stacked[0][0]
    raise CheckpointReadError(f"{path}: no 'encoderblock' entries; not a ViT .npz checkpoint")


def _read_npz(path: Path, vit: nn.Module) -> dict[str, Tensor]:
    """Read a JAX ViT ``.npz`` with timm's converter into a ViT of the checkpoint's own grid
    (so that the position grid is resized by ALBEF's bicubic rule here, not by timm's)."""
    with np.load(path) as npz:
        shapes = {k: tuple(npz[k].shape) for k in npz.files}
    pos = [s for k, s in shapes.items() if k.endswith("pos_embedding")]
    if not pos:
        raise CheckpointReadError(f"{path}: no '*pos_embedding' entry; not a ViT .npz checkpoint")
    n_tokens = pos[0][-2] - (1 if any(k.endswith("cls") for k in shapes) else 0)
    side, depth = math.isqrt(n_tokens), _npz_depth(shapes, path)
    if depth != len(vit.blocks):  # timm's converter would silently skip extra blocks
        raise CheckpointReadError(f"{path}: has {depth} transformer blocks, the model has "
                                  f"{len(vit.blocks)}")
    patch = vit.patch_embed.patch_size[0]
    width = vit.embed_dim
    mlp_ratio = vit.blocks[0].mlp.fc1.out_features / width
    temp = build_vit(side * patch, patch, width, depth, vit.blocks[0].attn.num_heads, mlp_ratio)
    try:
        temp.load_pretrained(str(path))
    except (KeyError, RuntimeError, ValueError) as exc:
        raise CheckpointReadError(f"{path}: does not fit a ViT of width {width}, depth {depth}, "
                                  f"patch {patch}: {exc!r}") from exc
    return temp.state_dict()


def _read_vit_file(path: Path, vit: nn.Module) -> dict[str, Tensor]:
    """A ViT state dict from .pth/.pt/.bin/.ckpt/.safetensors (timm's reader) or .npz."""
    from timm.models import load_state_dict as timm_load_state_dict

    suffix = path.suffix.lower()
    if suffix == ".npz":
        return _read_npz(path, vit)
    if suffix not in VIT_SUFFIXES:
        raise CheckpointReadError(f"{path}: unsupported ViT checkpoint extension {suffix!r}; "
                                  f"expected one of {', '.join(VIT_SUFFIXES)} or .npz")
    try:  # timm unwraps {'model': ...} / {'state_dict': ...} and a 'module.' prefix
        return dict(timm_load_state_dict(str(path), use_ema=False, weights_only=True))
    except pickle.UnpicklingError as exc:
        raise CheckpointReadError(
            f"{path}: holds Python objects beyond tensors, refused by safe loading; re-save "
            "only the state dict (torch.save(ckpt['model'], ...)) in a trusted environment"
        ) from exc


def _read_vit(name_or_path: str | Path, vit: nn.Module, local_files_only: bool
              ) -> tuple[dict[str, Tensor], str]:
    path = Path(name_or_path)
    if path.is_file():
        return _read_vit_file(path, vit), str(path)
    if local_files_only or path.exists():
        raise FileNotFoundError(
            f"{name_or_path}: not a ViT checkpoint file (expected {', '.join(VIT_SUFFIXES)} or "
            ".npz); to let timm download a hub model by name pass local_files_only=False")
    import timm

    log.info("creating timm model %r with pretrained=True (may download)", str(name_or_path))
    model = timm.create_model(str(name_or_path), pretrained=True)
    return model.state_dict(), f"timm:{name_or_path}"


def _drop_distillation_token(state: dict[str, Tensor], source: str
                             ) -> tuple[dict[str, Tensor], dict[str, str]]:
    """DeiT-distilled checkpoints carry a second prefix token: drop it and its position entry
    (pos_embed = [cls, dist, patches...])."""
    if "dist_token" not in state:
        return state, {}
    state = dict(state)
    del state["dist_token"]
    pos = state.get("pos_embed")
    if pos is None or math.isqrt(pos.shape[1] - 2) ** 2 != pos.shape[1] - 2:
        raise CheckpointReadError(
            f"{source}: has 'dist_token' but 'pos_embed' "
            f"{None if pos is None else tuple(pos.shape)} is not [cls, dist, square grid]")
    state["pos_embed"] = torch.cat([pos[:, :1], pos[:, 2:]], dim=1)
    return state, {"dist_token": REASON_DIST_TOKEN}


def load_vit_weights(
    student_or_objective: nn.Module,
    name_or_path: str | Path,
    *,
    local_files_only: bool = True,
    strict: bool = True,
) -> LoadReport:
    """Initialise the image encoder from DeiT-B/16 or any timm-named ViT checkpoint.

    Local files: .pth/.pt/.bin/.ckpt/.safetensors (timm's reader) or a JAX .npz (timm's
    converter). A non-file name is a timm model name, created with ``pretrained=True`` only when
    ``local_files_only=False``. ``pos_embed`` is resized bicubically to the model's grid
    (14^2 -> 16^2 for 224 -> 256 px). Allowed: the classifier heads and DeiT's distillation token.
    Any missing ViT key raises ``CheckpointMismatchError``.
    """
    student, _ = split_target(student_or_objective)
    raw, source = _read_vit(name_or_path, student.visual_encoder, local_files_only)
    raw, ignored = _drop_distillation_token(raw, source)
    report = LoadReport(source=source, fmt="timm ViT",
                        ignored={f"visual_encoder.{k}": r for k, r in ignored.items()})
    rules = [AllowRule("unexpected", "visual_encoder.head.*", REASON_VIT_HEAD),
             AllowRule("unexpected", "visual_encoder.head_dist.*", REASON_VIT_HEAD)]
    state = {f"visual_encoder.{k}": v for k, v in raw.items()}
    apply_state(student, state, report, rules=rules, scope=VIT_SCOPE, strict=strict,
                source_name=lambda k: k.removeprefix("visual_encoder."))
    if isinstance(student_or_objective, Objective):
        copy_student_to_teacher(student_or_objective, ("visual_encoder",))
        report.notes.append("momentum twin's visual encoder set equal to the student")
    return report


_PATH_PREFIXES = ("/", "./", "../", "~")


def _in_hub_cache(name: str, filename: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(name, filename), str)
    except ValueError:  # not a valid repository id
        return False


def _timm_in_hub_cache(name: str) -> bool:
    """Whether timm's hub repository for model ``name`` is in the local hub cache."""
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(name)
    except (RuntimeError, ValueError):
        return False
    repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    return bool(repo) and any(_in_hub_cache(repo, f) for f in
                              ("model.safetensors", "pytorch_model.bin"))


def unavailable_sources(text_init: str | None, vision_init: str | None, tokenizer: str | None,
                        allow_download: bool) -> list[str]:
    """What the run would fail to read, checked before anything is submitted: each of
    ``model.text.init``, ``model.vision.init`` and ``data.tokenizer`` must be an existing local
    path, or a hub name that is in the local hub cache (BERT / tokenizer) or may be downloaded
    (``model.allow_download``). One message per problem, naming the key."""
    items = [("model.text.init", text_init, "config.json"),
             ("model.vision.init", vision_init, None),
             ("data.tokenizer", tokenizer, "vocab.txt")]
    problems = []
    for key, value, hub_file in items:
        if value is None or Path(value).expanduser().exists():
            continue
        if value.startswith(_PATH_PREFIXES) or Path(value).suffix:
            problems.append(f"{key}: {value} does not exist (expected a local file or "
                            "directory)")
        elif not allow_download and not (
                _in_hub_cache(value, hub_file) if hub_file else _timm_in_hub_cache(value)):
            problems.append(
                f"{key}: {value!r} is a hub name that is not in the local cache and "
                "model.allow_download is false; point it at a local file or directory, or set "
                "model.allow_download=true (needs internet on the machines that train)")
    return problems
