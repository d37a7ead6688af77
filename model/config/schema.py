"""Typed, frozen experiment configuration.

Defaults are **ALBEF's** published pre-training settings (ViT-B/16 at 256 px, BERT-base split 6+6,
embed 256, queue 65536, momentum 0.995, alpha 0.4, AdamW 1e-4 / wd 0.02, 30 epochs) with every
SoftMask++ switch at its identity value. The method's components are turned on by override files in
``ablations/overrides/``; so the baseline is the schema itself and cannot drift from it.

Validation in ``__post_init__`` only raises (``FieldError`` names the offending field); it never
mutates. Derived values (global batch, BERT layer index of the Grad-CAM layer) are properties.
Layer indices inside the fusion stack are 0-based: ``softmask.layer = 2`` is the 3rd fusion layer,
i.e. BERT layer ``text.text_layers + 2`` (= 8 in ALBEF, the official Grad-CAM layer).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from model.config.loader import FieldError

# The MMDA strong view's photometric operations, in the order they are applied (after crop and
# flip); model/data/transforms.py builds them.
STRONG_OPS: tuple[str, ...] = ("color_jitter", "randaugment", "blur")


def _check(condition: bool, name: str, message: str) -> None:
    if not condition:
        raise FieldError(name, message)


@dataclass(frozen=True)
class VisionConfig:
    """ViT image encoder (timm). ``init``: local dir/file or hub id of DeiT/ViT weights."""

    image_size: int = 256
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    init: str | None = None

    def __post_init__(self) -> None:
        _check(self.patch_size >= 1, "patch_size", f"must be >= 1, got {self.patch_size}")
        _check(self.heads >= 1, "heads", f"must be >= 1, got {self.heads}")
        _check(self.image_size >= self.patch_size, "image_size",
               f"must be >= patch_size={self.patch_size} (at least one patch), got "
               f"{self.image_size}")
        _check(self.image_size % self.patch_size == 0, "image_size",
               f"must be a multiple of patch_size={self.patch_size}, got {self.image_size}")
        _check(self.width >= self.heads, "width",
               f"must be >= heads={self.heads} (one channel per head at least), got {self.width}")
        _check(self.width % self.heads == 0, "width",
               f"must be divisible by heads={self.heads}, got {self.width}")
        _check(self.mlp_ratio > 0, "mlp_ratio", f"must be > 0, got {self.mlp_ratio}")
        _check(self.depth >= 1, "depth", f"must be >= 1, got {self.depth}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class TextConfig:
    """BERT split into ``text_layers`` unimodal layers and ``fusion_layers`` cross-attention layers.

    ``init``: a local directory or hub name of a BERT checkpoint (``bert-base-uncased``);
    ``None`` = BERT's random init. ``vocab_size = None`` takes the tokenizer's size (synthetic
    data);
    a set value must equal the tokenizer's (checked when the model is built).
    """

    vocab_size: int | None = 30522
    hidden: int = 768
    text_layers: int = 6
    fusion_layers: int = 6
    heads: int = 12
    intermediate: int = 3072
    max_positions: int = 512
    hidden_dropout: float = 0.1
    attn_dropout: float = 0.1
    init: str | None = None
    # BERT's N(0, std) init for layers not loaded from a checkpoint. 0.02 is calibrated for
    # width 768; at width 64 it leaves the [CLS] output ~99.7% input-independent (a collapsed
    # text feature that ITM then keeps collapsed), so the tiny preset scales it up.
    init_std: float = 0.02

    def __post_init__(self) -> None:
        _check(self.init_std > 0, "init_std", f"must be > 0, got {self.init_std}")
        _check(self.heads >= 1, "heads", f"must be >= 1, got {self.heads}")
        _check(self.hidden >= self.heads, "hidden",
               f"must be >= heads={self.heads} (one channel per head at least), got "
               f"{self.hidden}")
        _check(self.hidden % self.heads == 0, "hidden",
               f"must be divisible by heads={self.heads}, got {self.hidden}")
        _check(self.intermediate >= 1, "intermediate", f"must be >= 1, got {self.intermediate}")
        # [CLS], one word, [SEP]: the shortest caption a tokenizer produces.
        _check(self.max_positions >= 3, "max_positions",
               f"must be >= 3, got {self.max_positions}")
        if self.vocab_size is not None:
            # [PAD], [UNK], [CLS], [SEP], [MASK] and at least one word.
            _check(self.vocab_size >= 6, "vocab_size",
                   f"must be >= 6 (five special tokens and a word) or null (the tokenizer's), "
                   f"got {self.vocab_size}")
        _check(self.text_layers >= 1, "text_layers", f"must be >= 1, got {self.text_layers}")
        _check(self.fusion_layers >= 1, "fusion_layers", f"must be >= 1, got {self.fusion_layers}")
        for name in ("hidden_dropout", "attn_dropout"):
            value = getattr(self, name)
            _check(0.0 <= value < 1.0, name, f"must be in [0, 1), got {value}")


@dataclass(frozen=True)
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    embed_dim: int = 256
    temp: float = 0.07
    queue_size: int = 65536
    momentum: float = 0.995
    # Steps before momentum features start entering the queues (ALBEF: 0). Only for training
    # from random init (the tiny preset): enqueuing the near-identical features of an untrained
    # encoder fills the queue with copies of the positives' direction and stalls learning.
    queue_warmup_steps: int = 0
    # Hub names in vision.init / text.init / data.tokenizer may be downloaded only when this is
    # true (default: only local files and the local hub cache are read, and the dry run says
    # which name would need the network). Where weights come from is not what a run computes,
    # so it is not part of the run's identity.
    allow_download: bool = False

    def __post_init__(self) -> None:
        _check(self.embed_dim >= 1, "embed_dim", f"must be >= 1, got {self.embed_dim}")
        _check(self.queue_warmup_steps >= 0, "queue_warmup_steps",
               f"must be >= 0, got {self.queue_warmup_steps}")
        _check(self.temp > 0, "temp", f"must be > 0, got {self.temp}")
        _check(0.0 < self.momentum < 1.0, "momentum", f"must be in (0, 1), got {self.momentum}")
        _check(self.queue_size >= 1, "queue_size", f"must be >= 1, got {self.queue_size}")


@dataclass(frozen=True)
class LossConfig:
    """Loss weights and the distillation / focal knobs (ALBEF eq. for ITC, SoftMask++ focal ITC).

    ``focal_gamma = 0`` is ALBEF's ITC exactly; ``alpha`` is ALBEF's distillation weight, ramped
    linearly over the first epoch when ``alpha_warmup``.
    """

    # The loss terms: each name is a weight here, a loss/<name> curve and an entry of the step's
    # losses (model/objective.py). A new term: its weight field, its name in TERMS, one line in
    # Objective.forward (docs/ARCHITECTURE.md "Adding a loss term").
    TERMS: ClassVar[tuple[str, ...]] = ("itc", "itm", "mlm")
    itc: float = 1.0
    itm: float = 1.0
    mlm: float = 1.0
    # Label smoothing of the ITM cross-entropy (0 = ALBEF): the worked example of adding a loss
    # option (docs/ARCHITECTURE.md).
    itm_label_smoothing: float = 0.0
    alpha: float = 0.4
    alpha_warmup: bool = True
    mlm_prob: float = 0.15
    focal_gamma: float = 0.0
    focal_detach: bool = False
    # Curriculum of ITM negatives, (start, end) in global steps: uniformly random in-batch
    # negatives before ``start``, ALBEF's similarity-weighted hard negatives from ``end`` on,
    # a linear blend of the sampling logits in between. (0, 0) = ALBEF: hard from step 1. From
    # random init, hard negatives arrive before the fusion layers can tell even a random
    # caption from the true one, and ITM stays at its class prior (see the tiny preset).
    itm_neg_ramp: tuple[int, int] = (0, 0)
    # Sharpness the curriculum ends at: negatives are drawn with weights softmax(h * sim),
    # h = 1 is ALBEF's hard-negative sampling, h = 0 uniformly random negatives.
    itm_neg_hardness: float = 1.0

    def __post_init__(self) -> None:
        _check(0.0 <= self.itm_neg_hardness <= 1.0, "itm_neg_hardness",
               f"must be in [0, 1], got {self.itm_neg_hardness}")
        start, end = self.itm_neg_ramp
        _check(0 <= start <= end, "itm_neg_ramp",
               f"must be (start, end) with 0 <= start <= end, got {self.itm_neg_ramp}")
        for name, weight in self.weights().items():
            _check(weight >= 0, name, f"weight must be >= 0, got {weight}")
        _check(sum(self.weights().values()) > 0, self.TERMS[0],
               f"at least one loss weight ({', '.join(self.TERMS)}) must be > 0")
        _check(0.0 <= self.itm_label_smoothing < 1.0, "itm_label_smoothing",
               f"must be in [0, 1), got {self.itm_label_smoothing}")
        _check(0.0 <= self.alpha <= 1.0, "alpha", f"must be in [0, 1], got {self.alpha}")
        _check(0.0 < self.mlm_prob < 1.0, "mlm_prob", f"must be in (0, 1), got {self.mlm_prob}")
        _check(self.focal_gamma >= 0, "focal_gamma", f"must be >= 0, got {self.focal_gamma}")

    def weights(self) -> dict[str, float]:
        """Each loss term's weight, by name (TERMS order)."""
        return {name: float(getattr(self, name)) for name in self.TERMS}


@dataclass(frozen=True)
class SoftMaskConfig:
    """Text-driven soft feature masking (docs/METHOD.md §1) and its RandMask baseline.

    mode: ``off`` (ALBEF), ``gradcam`` (SoftMask: word-conditional Grad-CAM -> 1 - minmax map) or
    ``random`` (RandMask: patch tokens zeroed with probability ``random_p``).
    layer: 0-based fusion layer whose cross-attention is explained (2 = BERT layer 8 in ALBEF).
    apply_to: which losses see the masked image features: ``itm`` (paper default) or ``itm_mlm``.
    """

    mode: Literal["off", "gradcam", "random"] = "off"
    layer: int = 2
    word: Literal["random", "mean"] = "random"
    random_p: float = 0.5
    apply_to: Literal["itm", "itm_mlm"] = "itm"

    def __post_init__(self) -> None:
        _check(self.layer >= 0, "layer", f"must be >= 0, got {self.layer}")
        _check(0.0 < self.random_p < 1.0, "random_p", f"must be in (0, 1), got {self.random_p}")

    @property
    def enabled(self) -> bool:
        return self.mode != "off"


@dataclass(frozen=True)
class MMDAConfig:
    """Multi-modal data augmentation (docs/METHOD.md §3).

    enabled: the student sees a strong image view and masked text in the unimodal text encoder;
    ITM and MLM then share one fusion forward over (masked text, image). The strong view is
    ALBEF's crop (and flip) followed by ``strong_ops`` in model/data/transforms.py's order;
    the default is all of them (ColorJitter, RandAugment, Gaussian blur).
    """

    enabled: bool = False
    strong_image: bool = True
    masked_text: bool = True
    strong_ops: tuple[str, ...] = STRONG_OPS

    def __post_init__(self) -> None:
        unknown = [op for op in self.strong_ops if op not in STRONG_OPS]
        _check(not unknown, "strong_ops", f"unknown operation(s) {unknown}; expected a subset "
               f"of {list(STRONG_OPS)}")
        _check(len(set(self.strong_ops)) == len(self.strong_ops), "strong_ops",
               f"lists an operation twice: {list(self.strong_ops)}")


@dataclass(frozen=True)
class SyntheticDataConfig:
    """The generated compositional shapes set (used when ``data.kind = synthetic``)."""

    seed: int = 0
    n_train_images: int = 4000
    n_test_images: int = 500
    image_size: int = 32
    # "mixed": some captions leave out sizes, the relation or an object, so one caption can be
    # true of several scenes; "full": every caption names the whole scene (model/data/synthetic/).
    caption_style: Literal["mixed", "full", "relational"] = "mixed"
    # Share of training and evaluation scenes with a single object.
    single_object_fraction: float = 0.1
    # Object side as a fraction of the image side, for the sizes "small" and "large".
    size_fractions: tuple[float, float] = (0.4, 0.48)

    def __post_init__(self) -> None:
        for name in ("n_train_images", "n_test_images"):
            _check(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        _check(self.image_size >= 8, "image_size",
               f"must be >= 8 pixels (two objects must be drawable), got {self.image_size}")
        _check(0.0 <= self.single_object_fraction <= 1.0, "single_object_fraction",
               f"must be in [0, 1], got {self.single_object_fraction}")
        _check(all(0.1 <= f <= 0.5 for f in self.size_fractions), "size_fractions",
               f"each must be in [0.1, 0.5] (two objects share the image), got "
               f"{self.size_fractions}")


@dataclass(frozen=True)
class ShardDataConfig:
    """Pre-training from webdataset tar shards (``data.format = shards``; model/data/shards.py).

    ``index``: the shard list (``{"shardlist": [{"url", "nsamples"}]}``, written by
    ``python -m model.cli.prepare shards`` or ``shard-index``); generated for synthetic data.
    ``streams_per_rank``: independent shard streams per rank; ``data.num_workers`` must divide
    it, and the data order depends on it (not on the worker count). ``sampling``: ``epoch``
    (every sample at most once per epoch) or ``resample`` (shards drawn with replacement,
    ``samples_per_epoch`` per epoch; None = the index's total). ``shuffle_block``: samples
    shuffled together (memory per stream, and the most a resume re-reads).
    """

    index: str = ""
    streams_per_rank: int = 8
    sampling: Literal["epoch", "resample"] = "epoch"
    shuffle_block: int = 1000
    samples_per_epoch: int | None = None
    # Synthetic data only: samples per generated shard.
    synthetic_maxcount: int = 500
    # ``pipe:`` URLs in the index run a shell command on every node (webdataset's gopen): refused
    # unless this is true (the dry run lists the commands). Not part of the run's identity.
    allow_pipe: bool = False

    def __post_init__(self) -> None:
        _check(self.streams_per_rank >= 1, "streams_per_rank",
               f"must be >= 1, got {self.streams_per_rank}")
        _check(self.shuffle_block >= 1, "shuffle_block", f"must be >= 1, got {self.shuffle_block}")
        _check(self.synthetic_maxcount >= 1, "synthetic_maxcount",
               f"must be >= 1, got {self.synthetic_maxcount}")
        if self.samples_per_epoch is not None:
            _check(self.samples_per_epoch >= 1, "samples_per_epoch",
                   f"must be >= 1, got {self.samples_per_epoch}")


@dataclass(frozen=True)
class DataConfig:
    """Where the data comes from. Paths are relative to the working directory unless absolute."""

    kind: Literal["synthetic", "albef_json"] = "albef_json"
    train_files: tuple[str, ...] = ()
    image_root: str = ""
    eval_file: str = ""
    eval_format: Literal["albef", "coco"] = "albef"
    negatives_file: str | None = None
    tokenizer: str = "bert-base-uncased"
    max_words: int = 30
    max_tokens: int = 25
    eval_max_tokens: int = 30
    hflip: bool = True
    # RandomResizedCrop's minimum area; None = ALBEF's (0.2 pre-training, 0.5 fine-tuning). Small
    # synthetic scenes need a milder crop, or one of two objects is often cut out of view.
    crop_min_scale: float | None = None
    # ALBEF's RandAugment in the standard (teacher / non-MMDA) view; the MMDA strong view keeps it.
    randaugment: bool = True
    num_workers: int = 4
    cache_dir: str = "data_cache"
    synthetic: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)
    # Pre-training samples from ALBEF caption files + image files ("json") or from tar shards.
    format: Literal["json", "shards"] = "json"
    shards: ShardDataConfig = field(default_factory=ShardDataConfig)

    def __post_init__(self) -> None:
        _check(self.max_tokens >= 2, "max_tokens", f"must be >= 2, got {self.max_tokens}")
        _check(self.eval_max_tokens >= 2, "eval_max_tokens",
               f"must be >= 2, got {self.eval_max_tokens}")
        _check(self.max_words >= 1, "max_words", f"must be >= 1, got {self.max_words}")
        _check(self.num_workers >= 0, "num_workers", f"must be >= 0, got {self.num_workers}")
        if self.crop_min_scale is not None:
            _check(0.0 < self.crop_min_scale <= 1.0, "crop_min_scale",
                   f"must be in (0, 1], got {self.crop_min_scale}")
        if self.kind == "albef_json" and self.format == "json":
            _check(len(self.train_files) > 0, "train_files",
                   "must list at least one annotation file when kind = albef_json")
        if self.format == "shards":
            if self.kind == "albef_json":
                _check(bool(self.shards.index), "shards.index",
                       "must name the shard index (shards.json) when format = shards")
            workers, streams = self.num_workers, self.shards.streams_per_rank
            _check(workers == 0 or streams % workers == 0, "num_workers",
                   f"must divide data.shards.streams_per_rank={streams} when format = shards "
                   f"(got {workers}); each worker owns streams_per_rank / num_workers streams")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation. ``schedule = albef`` reproduces ALBEF's staircase warm-up + per-epoch cosine.

    The warm-up is ``warmup_steps`` plateaus of ``warmup_every`` iterations each (2000 iterations at
    the paper's 20 x 100); ``max_steps`` caps training (tiny runs are budgeted in steps).
    ``mode = retrieval`` is ALBEF's retrieval fine-tuning (ITC with image-id targets + ITM, no MLM,
    no temperature clamp). ``init_from``: a checkpoint to start from (ours, full or slim, or an
    official ALBEF file; position embeddings are interpolated to the image size).
    """

    batch_size: int = 64
    epochs: int = 30
    max_steps: int | None = None
    lr: float = 1e-4
    min_lr: float = 1e-5
    warmup_lr: float = 1e-5
    warmup_steps: int = 20
    warmup_every: int = 100
    weight_decay: float = 0.02
    schedule: Literal["albef", "albef_finetune", "constant"] = "albef"
    precision: Literal["fp32", "bf16"] = "fp32"
    seed: int = 42
    log_every: int = 50
    checkpoint_every: int = 1000
    mode: Literal["pretrain", "retrieval"] = "pretrain"
    init_from: str | None = None
    # Process-group timeout (minutes) for the rendezvous and every collective; None = torch's
    # default (10 min NCCL, 30 min gloo). It also bounds the distributed evaluation's
    # collectives, so keep it above the slowest rank's evaluation share.
    dist_timeout_min: float | None = None
    # A finite blow-up: the run is marked ``diverged`` (result.json, status view, tables) when a
    # logged total loss exceeds this multiple of its early value (the smallest of the first
    # three logged losses); None turns the check off. It only judges the run, so it is not part of
    # the run's identity (model/config/experiment.py HASH_EXCLUDE).
    blowup_factor: float | None = 10.0
    # Clip the global gradient norm to this value before each optimizer step; None = ALBEF (no
    # clipping). The pre-clip norm is logged either way (grad_norm).
    grad_clip: float | None = None
    # Experiment tracking (model/engine/tracking.py): TensorBoard event files in <run>/tb by
    # default; "wandb" is opt-in. Not part of the run's identity.
    log_to: tuple[Literal["tensorboard", "wandb"], ...] = ("tensorboard",)
    # The number of ranks the recipe was written for: the global batch is batch_size x this
    # (ALBEF: 8 GPUs x 64 = 512). A launch with another world size is refused unless
    # lr_scaling states the rule: "none" (same learning rates) or "linear" (every learning
    # rate times global / recipe global batch; model/config/recipe.py).
    recipe_world_size: int = 8
    lr_scaling: Literal["refuse", "none", "linear"] = "refuse"
    # Memory and speed levers, all off by default (= ALBEF; docs/QUICKSTART.md "Memory
    # levers"): recompute each ViT block's and BERT layer's activations in the backward pass
    # and shard the AdamW state across DDP ranks (PyTorch's ZeroRedundancyOptimizer) - both
    # exact, not part of the run's identity; AdamW's foreach or fused kernels and torch.compile
    # of the ViT blocks and BERT layers (not of the whole step: SoftMask takes a gradient inside
    # the forward) - not bit-exact (fused kernels round differently, inductor draws its own
    # dropout masks), so part of the identity when on.
    activation_checkpointing: bool = False
    zero: bool = False
    optimizer_impl: Literal["default", "foreach", "fused"] = "default"
    compile: bool = False

    def __post_init__(self) -> None:
        _check(self.recipe_world_size >= 1, "recipe_world_size",
               f"must be >= 1, got {self.recipe_world_size}")
        if self.grad_clip is not None:
            _check(0 < self.grad_clip < float("inf"), "grad_clip",
                   f"must be a finite norm > 0 or null (off), got {self.grad_clip}")
        if self.blowup_factor is not None:
            _check(self.blowup_factor > 1.0, "blowup_factor",
                   f"must be > 1 (a multiple of the early loss) or null, got {self.blowup_factor}")
        if self.dist_timeout_min is not None:
            _check(self.dist_timeout_min > 0, "dist_timeout_min",
                   f"must be > 0 minutes, got {self.dist_timeout_min}")
        _check(self.batch_size >= 2, "batch_size", f"must be >= 2, got {self.batch_size}")
        _check(self.epochs >= 1, "epochs", f"must be >= 1, got {self.epochs}")
        # Step counts that divide (a zero would fail mid-run with ZeroDivisionError).
        for name in ("log_every", "checkpoint_every", "warmup_every"):
            value = getattr(self, name)
            _check(value >= 1, name, f"must be >= 1 step, got {value}")
        _check(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        _check(self.lr < float("inf") and self.min_lr >= 0 and self.warmup_lr >= 0, "lr",
               f"lr must be finite and min_lr / warmup_lr >= 0, got lr={self.lr}, "
               f"min_lr={self.min_lr}, warmup_lr={self.warmup_lr}")
        _check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        _check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        if self.max_steps is not None:
            _check(self.max_steps >= 1, "max_steps", f"must be >= 1, got {self.max_steps}")


@dataclass(frozen=True)
class EvalConfig:
    """Retrieval evaluation (ALBEF protocol: ITC top-k_test, then ITM re-rank)."""

    k_test: int = 256
    batch_size: int = 64
    image_size: int | None = None
    # Keep the split's features next to the checkpoint so re-ranking variants reuse them
    # (~9 GB for COCO 5K at 384 px, hence off by default).
    cache_features: bool = False
    # ITM re-ranking schedule (model/evaluation/rerank.py): "dedupe" scores each (image,
    # caption) pair once, in length-sorted batches; "batched" scores each direction's top-k
    # separately, as ALBEF does. Same scores up to float summation order.
    rerank: Literal["batched", "dedupe"] = "dedupe"

    def __post_init__(self) -> None:
        _check(self.k_test >= 1, "k_test", f"must be >= 1, got {self.k_test}")
        _check(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        if self.image_size is not None:
            _check(self.image_size >= 1, "image_size", f"must be >= 1, got {self.image_size}")


@dataclass(frozen=True)
class ExperimentConfig:
    """The whole experiment. Only ``build_*`` functions and the engine read it."""

    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    softmask: SoftMaskConfig = field(default_factory=SoftMaskConfig)
    mmda: MMDAConfig = field(default_factory=MMDAConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(train_files=("coco.json",)))
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # Downstream protocols run after this config's training, in order (ablations/protocols.yaml),
    # e.g. ("coco_finetune",): the paper's cells are pre-trained, then fine-tuned on COCO.
    downstream: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        fusion = self.model.text.fusion_layers
        # The last fusion layer is excluded: its word rows never reach the [CLS] output that the
        # ITM head reads, so every word's Grad-CAM would be zero (only later layers mix them).
        _check(self.softmask.layer < fusion - 1, "softmask",
               f"softmask.layer must be < model.text.fusion_layers - 1 = {fusion - 1}, "
               f"got {self.softmask.layer}")
        if self.softmask.enabled:
            _check(self.loss.itm > 0, "softmask",
                   "softmask.mode != off needs loss.itm > 0 (masked pairs are ITM positives)")
        if self.softmask.apply_to == "itm_mlm" and self.softmask.enabled:
            # MLM on the masked pairs reuses their fusion pass, which must run on masked text;
            # over clean text the MLM targets would be visible in the input.
            _check(self.loss.mlm > 0 and self.mmda.enabled and self.mmda.masked_text, "softmask",
                   "softmask.apply_to = itm_mlm needs loss.mlm > 0 and mmda.enabled with "
                   "mmda.masked_text (the masked pairs' fusion pass must see masked text)")
        if self.mmda.enabled and self.mmda.masked_text:
            _check(self.loss.mlm > 0, "mmda", "mmda.masked_text needs loss.mlm > 0 (shared pass)")
        _check(self.model.queue_size % self.train.batch_size == 0, "model",
               f"model.queue_size={self.model.queue_size} must be divisible by "
               f"train.batch_size={self.train.batch_size} (ALBEF enqueues whole batches)")
        if self.data.format == "shards":
            _check(self.train.mode == "pretrain", "data",
                   "data.format = shards streams pre-training samples; train.mode = retrieval "
                   "needs the caption files (data.format = json)")
        longest = max(self.data.max_tokens, self.data.eval_max_tokens)
        # Every tokenized caption ([CLS] ... [SEP], cut at data.max_tokens in training and
        # data.eval_max_tokens in evaluation) needs a position embedding.
        _check(self.model.text.max_positions >= longest, "model",
               f"model.text.max_positions={self.model.text.max_positions} must be >= the "
               f"longest tokenized caption, max(data.max_tokens, data.eval_max_tokens) = "
               f"{longest}")

    @property
    def gradcam_bert_layer(self) -> int:
        """The Grad-CAM layer as a BERT layer index (8 for ALBEF-base)."""
        return self.model.text.text_layers + self.softmask.layer


def check_world_size(cfg: ExperimentConfig, world_size: int) -> None:
    """Raise if the global batch does not divide the queue (checked before any job starts)."""
    global_batch = cfg.train.batch_size * world_size
    if cfg.model.queue_size % global_batch != 0:
        raise ValueError(
            f"model.queue_size={cfg.model.queue_size} is not divisible by the global batch "
            f"{global_batch} (train.batch_size={cfg.train.batch_size} x world_size={world_size})"
        )
