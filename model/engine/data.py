"""From a config to tokenizer, datasets and loaders (the engine's only data entry point)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from model.config.schema import ExperimentConfig
from model.data.collate import PretrainCollate
from model.data.datasets import PretrainDataset, RetrievalEvalDataset, RetrievalTrainDataset
from model.data.sampling import ResumableSampler, SeededDataset
from model.data.shards import INDEX_FILE, ShardStream, read_shard_index, write_shards
from model.data.synthetic import SyntheticSpec, generate
from model.data.tokenizer import TextTokenizer
from model.data.transforms import build_multiview, build_transform
from model.engine.distributed import DistInfo, barrier
from model.text_masking import SpecialIds


@dataclass
class DataSources:
    """Resolved file locations: annotation files, image root, evaluation files, tokenizer."""

    train_files: tuple[Path, ...]
    image_root: Path
    eval_file: Path | None
    eval_format: str
    negatives_file: Path | None
    tokenizer: str | Path
    synthetic: bool
    # Object boxes of the evaluation images (synthetic data only): Grad-CAM localisation.
    boxes_file: Path | None = None
    allow_download: bool = False  # model.allow_download: a hub tokenizer may be fetched
    shard_index: Path | None = None  # data.format = shards: the shard list to stream from


def synthetic_spec(cfg: ExperimentConfig) -> SyntheticSpec:
    s = cfg.data.synthetic
    return SyntheticSpec(seed=s.seed, n_train_images=s.n_train_images,
                         n_test_images=s.n_test_images, image_size=s.image_size,
                         caption_style=s.caption_style, size_fractions=s.size_fractions,
                         single_object_fraction=s.single_object_fraction)


def tokenizer_vocab_size(cfg: ExperimentConfig) -> int | None:
    """The vocabulary size the run's tokenizer will have, without writing anything: the
    generated vocabulary of synthetic data when its cache exists, a local BERT tokenizer's;
    None when it cannot be known before the job runs."""
    d = cfg.data
    if d.kind == "synthetic":
        vocab = Path(d.cache_dir) / f"synthetic_{synthetic_spec(cfg).hash()}" / "vocab.txt"
        return len(vocab.read_text(encoding="utf-8").splitlines()) if vocab.is_file() else None
    try:
        return TextTokenizer.from_pretrained(d.tokenizer, local_files_only=True).vocab_size
    except (OSError, ValueError):
        return None


def resolve_sources(cfg: ExperimentConfig, dist_info: DistInfo | None = None) -> DataSources:
    """Generate (rank 0 first, cached on disk) or locate the data named by the config."""
    d = cfg.data
    if d.kind == "synthetic":
        spec = synthetic_spec(cfg)
        root = Path(d.cache_dir) / f"synthetic_{spec.hash()}"
        shard_dir = root / f"shards_{d.shards.synthetic_maxcount}"
        if dist_info is None or dist_info.is_main:
            paths = generate(root, spec)
            if d.format == "shards" and not (shard_dir / INDEX_FILE).is_file():
                write_shards([paths.train_file], paths.root, shard_dir,
                             d.shards.synthetic_maxcount)
        barrier()
        paths = generate(root, spec)  # cached: returns immediately once written
        return DataSources((paths.train_file,), paths.root, paths.test_file, "albef",
                           paths.negatives_file, paths.vocab_file, True, paths.boxes_file,
                           shard_index=shard_dir / INDEX_FILE if d.format == "shards" else None)
    return DataSources(
        tuple(Path(f) for f in d.train_files), Path(d.image_root),
        Path(d.eval_file) if d.eval_file else None, d.eval_format,
        Path(d.negatives_file) if d.negatives_file else None, d.tokenizer, False,
        allow_download=cfg.model.allow_download,
        shard_index=Path(d.shards.index) if d.format == "shards" else None,
    )


def build_tokenizer(sources: DataSources) -> TextTokenizer:
    """Locally built WordPiece vocab for synthetic data; a BERT tokenizer otherwise."""
    if sources.synthetic:
        return TextTokenizer.from_vocab_file(sources.tokenizer)
    return TextTokenizer.from_pretrained(str(sources.tokenizer),
                                         local_files_only=not sources.allow_download)


def special_ids(tokenizer: TextTokenizer) -> SpecialIds:
    return SpecialIds(pad=tokenizer.pad_id, cls=tokenizer.cls_id, mask=tokenizer.mask_id,
                      vocab_size=tokenizer.vocab_size)


def crop_scale(cfg: ExperimentConfig) -> tuple[float, float] | None:
    """The RandomResizedCrop area range ``data.crop_min_scale`` asks for (None: ALBEF's)."""
    return (cfg.data.crop_min_scale, 1.0) if cfg.data.crop_min_scale is not None else None


def train_transform(cfg: ExperimentConfig):
    """ALBEF's pre-training (or fine-tuning) view; with MMDA also the strong student view."""
    size, hflip = cfg.model.vision.image_size, cfg.data.hflip
    crop = crop_scale(cfg)
    ra = cfg.data.randaugment
    if cfg.mmda.enabled and cfg.mmda.strong_image:
        return build_multiview(size, hflip=hflip, crop_scale=crop, randaugment=ra,
                               strong_ops=cfg.mmda.strong_ops)
    kind = "finetune" if cfg.train.mode == "retrieval" else "pretrain"
    return build_transform(kind, size, hflip=hflip, crop_scale=crop, randaugment=ra)


@dataclass
class TrainData:
    """The training loader and where it stands: ``batches_per_epoch`` batches per rank per
    epoch, ``set_epoch(epoch, start_batch)`` before each epoch's iterator (exact resume)."""

    dataset: SeededDataset | ShardStream
    loader: DataLoader
    sampler: ResumableSampler | None = None  # the JSON path's index sampler

    @property
    def batches_per_epoch(self) -> int:
        # Not `sampler or dataset`: a sampler resumed at its epoch's end has length 0 (falsy).
        source = self.sampler if self.sampler is not None else self.dataset
        return source.batches_per_epoch  # type: ignore[union-attr]

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        if self.sampler is not None:
            self.sampler.set_epoch(epoch, start_batch=start_batch)
            self.dataset.set_epoch(epoch)
        else:
            self.dataset.set_epoch(epoch, start_batch)  # type: ignore[call-arg]

    def shard_list(self) -> list[list[Any]] | None:
        """The streamed shards and their counts (None on the JSON path)."""
        if isinstance(self.dataset, ShardStream):
            return self.dataset.index.fingerprint()
        return None

    def position(self, epoch: int, start_batch: int) -> dict[str, Any] | None:
        """Where the shard streams continue, for the checkpoint (the shard list, and shard +
        offset per stream); None on the JSON path, whose position is the state's epoch and
        batch alone."""
        if isinstance(self.dataset, ShardStream):
            return {"format": "shards", "shards": self.shard_list(),
                    "streams": self.dataset.position(epoch, start_batch)}
        return None


def _loader(cfg: ExperimentConfig, dataset: Any, tokenizer: TextTokenizer, dist_info: DistInfo,
            sampler: ResumableSampler | None) -> DataLoader:
    # ALBEF truncates pre-training captions to 25 tokens; retrieval training does not truncate.
    max_len = cfg.data.max_tokens if cfg.train.mode == "pretrain" else None
    return DataLoader(
        dataset, batch_size=cfg.train.batch_size, sampler=sampler, drop_last=True,
        num_workers=cfg.data.num_workers, pin_memory=dist_info.device.type == "cuda",
        collate_fn=PretrainCollate(tokenizer, max_len, truncation=max_len is not None),
        persistent_workers=False,
        # A private generator for the loader's base seed: drawing it from the global RNG would
        # shift dropout's stream by one draw whenever an iterator is created (breaks resume).
        generator=torch.Generator().manual_seed(cfg.train.seed),
    )


def build_train_data(cfg: ExperimentConfig, sources: DataSources, tokenizer: TextTokenizer,
                     dist_info: DistInfo) -> TrainData:
    """Seeded dataset + resumable sampler + loader (pinned memory on CUDA, drop_last), or the
    shard stream (``data.format = shards``), which splits and resumes itself."""
    if sources.shard_index is not None:
        sh = cfg.data.shards
        stream = ShardStream(read_shard_index(sources.shard_index, sh.allow_pipe),
                             train_transform(cfg),
                             batch_size=cfg.train.batch_size, seed=cfg.train.seed,
                             rank=dist_info.rank, world_size=dist_info.world_size,
                             streams_per_rank=sh.streams_per_rank, sampling=sh.sampling,
                             shuffle_block=sh.shuffle_block,
                             samples_per_epoch=sh.samples_per_epoch,
                             max_words=cfg.data.max_words)
        return TrainData(stream, _loader(cfg, stream, tokenizer, dist_info, None))
    cls = RetrievalTrainDataset if cfg.train.mode == "retrieval" else PretrainDataset
    base = cls(sources.train_files, sources.image_root, train_transform(cfg), cfg.data.max_words)
    dataset = SeededDataset(base, cfg.train.seed)
    sampler = ResumableSampler(len(dataset), cfg.train.batch_size, cfg.train.seed,
                               dist_info.rank, dist_info.world_size)
    return TrainData(dataset, _loader(cfg, dataset, tokenizer, dist_info, sampler), sampler)


def build_eval_dataset(cfg: ExperimentConfig, sources: DataSources) -> RetrievalEvalDataset:
    """The retrieval evaluation split with ALBEF's test transform (exact resize, no crop)."""
    if sources.eval_file is None:
        raise ValueError("data.eval_file is empty: no retrieval evaluation split configured")
    size = cfg.eval.image_size or cfg.model.vision.image_size
    transform = build_transform("test", size)
    if sources.eval_format == "coco":
        return RetrievalEvalDataset.from_coco(sources.eval_file, sources.image_root, transform,
                                              cfg.data.max_words)
    return RetrievalEvalDataset(sources.eval_file, sources.image_root, transform,
                                cfg.data.max_words)
