"""Pre-training over webdataset tar shards (img2dataset's layout), split by rank and loader
worker, resumable at the exact sample.

Layout. A shard is a tar file of samples ``<key>.jpg|jpeg|png|webp`` with ``<key>.txt`` and/or
``<key>.json`` (``{"caption": str | [str, ...]}``), as img2dataset writes them or as
``python -m model.cli.prepare shards`` converts an ALBEF caption file. An index lists the
shards and their sample counts, ``{"shardlist": [{"url": "00000.tar", "nsamples": 10000}, ...]}``
(the shard list of webdataset's ``wids`` index format); relative URLs are resolved against the
index's folder, and anything webdataset's ``gopen`` opens may be listed (a path, http(s), or,
only with ``data.shards.allow_pipe: true``, a ``pipe:`` shell command such as
``pipe:aws s3 cp s3://bucket/00000.tar -``: an index received with a dataset must not run
programs on every node unless its user says so).

Streams. Every rank reads ``P = data.shards.streams_per_rank`` independent streams; its k-th
batch of an epoch is the next batch of stream ``k mod P``. A DataLoader hands out an iterable
dataset's batches round-robin over its workers, so worker w of W (W divides P) serves the batches
k = w, w + W, ... and owns the streams p = w (mod W). The batch sequence of a rank therefore
depends on (seed, epoch, rank, world size, P), never on the number of workers.

Epoch mode: each epoch permutes the shard order (seed + epoch) and cuts the concatenated samples
into R·P segments of q·B samples, q = floor(N / (R·P·B)), one per stream: every sample is read at
most once per epoch and fewer than R·P·B are left out (the tail of a different permutation every
epoch). Resample mode (as open_clip's ``--dataset-resampled``): each stream draws shards with
replacement from its own generator (seed, epoch, stream) and the epoch is
``samples_per_epoch`` samples long.

Shuffling: a stream is read in consecutive blocks of ``shuffle_block`` samples, each permuted by
a generator seeded from (seed, epoch, stream, block). Resuming at batch b reopens every stream at
its current block (reading, not decoding, the samples before it) and skips inside the block, so
a resumed run sees exactly the samples, in exactly the order and with exactly the augmentations,
of an uninterrupted one; the cost is reading at most one block and one shard prefix per stream.

Augmentation: every sample's random draws are seeded from (seed, epoch, stream position), as on
the JSON path (model/data/sampling.py).

Faults: a corrupt sample (undecodable image, no caption) is logged once, counted in ``skipped``
and replaced by the next good sample of its block, so every stream keeps its batch count (DDP
ranks must agree on it). A shard that cannot be opened or read, or that holds fewer samples than
the index says, stops the run with its URL.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import random
import tarfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.shardlists import expand_urls
from webdataset.tariterators import tarfile_samples

from model.data.captions import pre_caption
from model.data.datasets import IMAGE_ERRORS, Transform
from model.data.sampling import sample_seed, seeded_draws

logger = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
INDEX_FILE = "shards.json"
Sampling = Literal["epoch", "resample"]


class ShardError(RuntimeError):
    """A shard or a shard index cannot be used; the message names the file or URL."""


class CorruptSample(ValueError):
    """One sample of a shard cannot be decoded (the stream replaces it)."""


@dataclass(frozen=True)
class ShardIndex:
    """The shards of a dataset, their sample counts, and the index file they came from."""

    urls: tuple[str, ...]  # as opened (relative URLs resolved against the index's folder)
    counts: tuple[int, ...]
    source: str
    listed: tuple[str, ...] = ()  # as written in the index


    @property
    def total(self) -> int:
        return sum(self.counts)

    def fingerprint(self) -> list[list[Any]]:
        """What a resumed stream must find unchanged (URLs and counts, in order)."""
        return [[u, n] for u, n in zip(self.listed or self.urls, self.counts)]


def is_local(url: str) -> bool:
    """A shard URL that names a file (not ``scheme://...`` nor a ``pipe:`` command)."""
    return "://" not in url and not url.startswith("pipe:")


def _resolve_url(url: str, base: Path) -> str:
    if not is_local(url) or Path(url).is_absolute():
        return url
    return str(base / url)


PIPE = "pipe:"


def read_shard_index(path: str | Path, allow_pipe: bool = False) -> ShardIndex:
    """Read and validate a shard index; errors name the file and the entry.

    ``allow_pipe``: ``pipe:`` URLs run a shell command (webdataset's gopen) and are refused
    unless allowed (``data.shards.allow_pipe``).

    Raises:
        ShardError: missing file, malformed JSON, an entry without a URL or a positive count,
            or a ``pipe:`` URL that is not allowed.
    """
    path = Path(path)
    if not path.is_file():
        raise ShardError(f"shard index {path} does not exist (data.shards.index)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ShardError(f"shard index {path}: not valid JSON ({err})") from err
    entries = data.get("shardlist") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ShardError(f"shard index {path}: expected an object with a non-empty 'shardlist' "
                         f"list of {{'url': ..., 'nsamples': ...}}")
    urls, counts, listed = [], [], []
    for i, entry in enumerate(entries):
        url = entry.get("url") if isinstance(entry, dict) else None
        n = entry.get("nsamples") if isinstance(entry, dict) else None
        if not isinstance(url, str) or not url:
            raise ShardError(f"shard index {path}: shardlist[{i}] has no 'url' string: {entry!r}")
        if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
            raise ShardError(f"shard index {path}: shardlist[{i}] ({url}): 'nsamples' must be a "
                             f"positive integer, got {n!r}")
        if url.startswith(PIPE) and not allow_pipe:
            raise ShardError(f"shard index {path}: shardlist[{i}] is a shell command "
                             f"({url!r}), which every node would run; set "
                             f"data.shards.allow_pipe=true only for an index you trust")
        urls.append(_resolve_url(url, path.parent))
        listed.append(url)
        counts.append(n)
    return ShardIndex(tuple(urls), tuple(counts), str(path), tuple(listed))


def write_shard_index(path: str | Path, urls: Sequence[str], counts: Sequence[int]) -> Path:
    """Write an index (URLs as given: relative ones are read relative to the index's folder)."""
    path = Path(path)
    shardlist = [{"url": u, "nsamples": int(n)} for u, n in zip(urls, counts)]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"shardlist": shardlist}, indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def iter_shard(url: str) -> Iterator[dict[str, Any]]:
    """The samples of one shard (webdataset's tar reader, grouped by key), undecoded.

    Raises:
        ShardError: the shard cannot be opened or is not a readable tar file (names the URL).
    """
    try:
        yield from tarfile_samples([{"url": url}])
    except Exception as err:  # gopen / tarfile raise many types; all mean "this shard is bad"
        # webdataset appends the stream and URL to the exception's args; keep the reason only.
        reason = err.strerror if isinstance(err, OSError) and err.strerror else (
            err.args[0] if err.args else "")
        raise ShardError(f"shard {url} cannot be read: {type(err).__name__}: {reason}") from err


def tar_sample_count(path: str | Path) -> int:
    """Samples in a local tar shard from its member headers alone (nothing is decoded): the
    distinct keys, i.e. member names up to their first dot, as webdataset groups them.

    Raises:
        ShardError: the file is not a readable tar archive (names the file).
    """
    def key(name: str) -> str:
        folder, _, base = name.rpartition("/")
        return f"{folder}/{base.split('.', 1)[0]}" if folder else base.split(".", 1)[0]

    try:
        with tarfile.open(path, "r:*") as tar:
            keys = {key(m.name) for m in tar.getmembers() if m.isfile()}
    except (tarfile.TarError, OSError, EOFError) as err:
        raise ShardError(f"shard {path} is not a readable tar archive: {err}") from err
    return len(keys)


def count_samples(url: str) -> int:
    """Samples in a shard, by reading it (the index builder's fallback)."""
    return sum(1 for _ in iter_shard(url))


def expand_shard_urls(pattern: str) -> list[str]:
    """``{00000..00099}.tar`` brace patterns, as webdataset expands them."""
    return list(expand_urls(pattern))


def decode_sample(sample: Mapping[str, Any]) -> tuple[Image.Image, str | list[str]]:
    """A raw sample's RGB image and its caption field (a string or a list, as ALBEF's JSON).

    The JSON ``caption`` wins over ``.txt`` (img2dataset writes both; our converter keeps a
    caption list there). Raises :class:`CorruptSample` with the reason.
    """
    image_key = next((k for k in IMAGE_KEYS if k in sample), None)
    if image_key is None:
        raise CorruptSample(f"no image file (one of {', '.join(IMAGE_KEYS)})")
    caption: Any = None
    try:
        if "json" in sample:
            meta = json.loads(sample["json"])
            caption = meta.get("caption") if isinstance(meta, dict) else None
        if caption is None and "txt" in sample:
            caption = sample["txt"].decode("utf-8")
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptSample(f"caption unreadable: {err}") from err
    texts = [caption] if isinstance(caption, str) else caption
    if not isinstance(texts, list) or not texts or not all(
            isinstance(t, str) and t.strip() for t in texts):
        raise CorruptSample(f"no caption text (.json 'caption' or .txt), got {caption!r}")
    try:
        with Image.open(io.BytesIO(sample[image_key])) as raw:
            return raw.convert("RGB"), caption
    except IMAGE_ERRORS as err:
        raise CorruptSample(f"image unreadable: {type(err).__name__}: {err}") from err


@dataclass(frozen=True)
class Piece:
    """``n`` consecutive samples of shard ``url`` starting at sample ``offset``."""

    url: str
    offset: int
    n: int


def _cut(urls: Sequence[str], counts: Sequence[int], start: int, length: int) -> list[Piece]:
    """The pieces covering samples [start, start + length) of the shards concatenated."""
    pieces, position = [], 0
    for url, n in zip(urls, counts):
        lo, hi = max(start, position), min(start + length, position + n)
        if lo < hi:
            pieces.append(Piece(url, lo - position, hi - lo))
        position += n
        if position >= start + length:
            break
    return pieces


def read_pieces(pieces: Sequence[Piece], skip: int = 0) -> Iterator[dict[str, Any]]:
    """Raw samples of ``pieces`` in order, after the first ``skip`` (read, not decoded)."""
    for piece in pieces:
        if skip >= piece.n:
            skip -= piece.n
            continue
        got, shard = 0, iter_shard(piece.url)
        try:
            for sample in itertools.islice(shard, piece.offset + skip, piece.offset + piece.n):
                got += 1
                yield sample
        finally:
            shard.close()  # closes the tar stream now, not when collected
        if got < piece.n - skip:
            raise ShardError(f"shard {piece.url} holds fewer samples than its index says: "
                             f"needed samples up to {piece.offset + piece.n}, found "
                             f"{piece.offset + skip + got} (rebuild the index)")
        skip = 0


def _generator(*parts: int) -> torch.Generator:
    """A generator seeded from a tuple of integers (stable across processes and platforms)."""
    seed = 0
    for part in parts:
        seed = (seed * 1_000_003 + part) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)


class ShardStream(IterableDataset):
    """Pre-training samples from tar shards; see the module docstring for the stream layout.

    Items are those of :class:`~model.data.datasets.PretrainDataset`: ``{"image": Tensor,
    ["image_strong": Tensor,] "caption": str, "index": int}`` (``index`` = position in the
    epoch's sample order, for reference only).
    """

    def __init__(self, index: ShardIndex, transform: Transform, *, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1, streams_per_rank: int = 8,
                 sampling: Sampling = "epoch", shuffle_block: int = 1000,
                 samples_per_epoch: int | None = None, max_words: int = 30) -> None:
        self.index, self.transform, self.max_words = index, transform, max_words
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.streams, self.sampling, self.block = streams_per_rank, sampling, shuffle_block
        n = samples_per_epoch if sampling == "resample" and samples_per_epoch else index.total
        self.batches_per_stream = n // (world_size * streams_per_rank * batch_size)
        if self.batches_per_stream == 0:
            raise ShardError(
                f"{index.source}: {n} samples per epoch are fewer than one batch per stream "
                f"({batch_size} x {streams_per_rank} streams x {world_size} ranks); lower "
                f"data.shards.streams_per_rank or train.batch_size")
        self.epoch, self.start_batch = 0, 0
        self.skipped = 0
        self.bad_keys: set[str] = set()

    @property
    def batches_per_epoch(self) -> int:
        """Batches per rank per epoch (the same on every rank)."""
        return self.batches_per_stream * self.streams

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch and skip its first ``start_batch`` batches of this rank."""
        self.epoch, self.start_batch = epoch, start_batch

    def stream_length(self) -> int:
        return self.batches_per_stream * self.batch_size

    def stream_pieces(self, epoch: int, stream: int) -> list[Piece]:
        """The samples stream ``stream`` (of this rank) reads in ``epoch``, as shard pieces."""
        slot = self.rank * self.streams + stream
        length = self.stream_length()
        urls, counts = self.index.urls, self.index.counts
        if self.sampling == "epoch":
            order = torch.randperm(len(urls), generator=_generator(self.seed, epoch)).tolist()
            return _cut([urls[i] for i in order], [counts[i] for i in order],
                        slot * length, length)
        # Trailing tag 1: the draws' generator, apart from the epoch permutation (seed, epoch).
        g = _generator(self.seed, epoch, slot, 1)
        drawn, total = [], 0
        while total < length:
            i = int(torch.randint(len(urls), (1,), generator=g))
            drawn.append(i)
            total += counts[i]
        return _cut([urls[i] for i in drawn], [counts[i] for i in drawn], 0, length)

    def consumed(self, start_batch: int) -> list[int]:
        """Samples each stream has delivered once ``start_batch`` batches of the epoch are done."""
        return [(start_batch - p + self.streams - 1) // self.streams * self.batch_size
                for p in range(self.streams)]

    def position(self, epoch: int, start_batch: int) -> list[dict[str, Any]]:
        """Per stream: the shard and the sample offset where it continues (for the checkpoint
        and the resume log). At an epoch's end every stream reports its end."""
        out = []
        for p, done in enumerate(self.consumed(start_batch)):
            pieces = self.stream_pieces(epoch, p)
            url, offset, left = pieces[-1].url, pieces[-1].offset + pieces[-1].n, done
            for piece in pieces:
                if left < piece.n:
                    url, offset = piece.url, piece.offset + left
                    break
                left -= piece.n
            out.append({"stream": p, "shard": url, "offset": offset, "samples_done": done})
        return out

    def _blocks(self, stream: int, done: int
                ) -> Iterator[tuple[int, Image.Image, str | list[str]]]:
        """(stream position, decoded image, caption field) from position ``done`` on, in
        block-shuffled order; the position is the asked-for sample's (it seeds the draws) even
        when a corrupt sample was replaced."""
        pieces, length = self.stream_pieces(self.epoch, stream), self.stream_length()
        first = done // self.block * self.block
        raw = read_pieces(pieces, skip=first)
        for start in range(first, length, self.block):
            block = list(itertools.islice(raw, min(self.block, length - start)))
            g = _generator(self.seed, self.epoch, self.rank * self.streams + stream, start)
            order = torch.randperm(len(block), generator=g).tolist()
            skip = done - start if start <= done else 0
            for k in range(skip, len(block)):
                yield start + order[k], *self._good(block, order, k)

    def _good(self, block: list[dict[str, Any]], order: list[int], k: int
              ) -> tuple[Image.Image, str | list[str]]:
        """Decoded sample ``order[k]`` of the block, or the next good one (wrapping)."""
        for step in range(len(block)):
            sample = block[order[(k + step) % len(block)]]
            try:
                return decode_sample(sample)
            except CorruptSample as err:
                self._note_bad(sample, err)
        raise ShardError(f"every sample of a block of {len(block)} is corrupt (shard "
                         f"{block[0].get('__url__')}, from key {block[0].get('__key__')})")

    def _note_bad(self, sample: Mapping[str, Any], err: Exception) -> None:
        self.skipped += 1
        key = f"{sample.get('__url__')}:{sample.get('__key__')}"
        if key not in self.bad_keys:
            self.bad_keys.add(key)
            logger.warning("skipping corrupt sample %s: %s", key, err)

    def _item(self, stream: int, position: int, image: Image.Image,
              caption: str | list[str]) -> dict[str, Any]:
        """Views and caption with the per-sample seeded draws of the JSON path."""
        index = (self.rank * self.streams + stream) * self.stream_length() + position
        with seeded_draws(sample_seed(self.seed, self.epoch, index)):
            views = self.transform(image)
            # As ALBEF: a list caption is sampled with one draw of `random`, a string never.
            text = random.choice(caption) if isinstance(caption, list) else caption
        views = dict(views) if isinstance(views, Mapping) else {"image": views}
        return {**views, "caption": pre_caption(text, self.max_words), "index": index}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if self.streams % workers:
            raise ShardError(f"data.num_workers={workers} must divide "
                             f"data.shards.streams_per_rank={self.streams}")
        done = self.consumed(self.start_batch)
        readers: dict[int, Iterator[tuple[int, Image.Image, str | list[str]]]] = {}
        for k in range(self.start_batch + worker, self.batches_per_epoch, workers):
            p = k % self.streams
            if p not in readers:
                readers[p] = self._blocks(p, done[p])
            for _ in range(self.batch_size):
                yield self._item(p, *next(readers[p]))


def write_shards(ann_files: Sequence[str | Path], image_root: str | Path, out_dir: str | Path,
                 maxcount: int = 10_000) -> Path:
    """Convert ALBEF caption files to shards ``NNNNN.tar`` + ``shards.json`` under ``out_dir``.

    Each entry becomes one sample: the image file's bytes as they are (no re-encoding), its
    caption field in ``.json`` (a list stays a list, sampled per load as on the JSON path) and
    its first caption in ``.txt``. Entries are validated as the JSON datasets validate them;
    an unreadable image file stops the conversion with its path. Returns the index path.
    """
    from webdataset import ShardWriter

    from model.data.datasets import iter_caption_file

    out, root = Path(out_dir), Path(image_root)
    out.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    with ShardWriter(str(out / "%05d.tar"), maxcount=maxcount, verbose=0) as sink:
        key = 0
        for ann in ann_files:
            for entry in iter_caption_file(ann):
                path = root / entry.image
                try:
                    data = path.read_bytes()
                except OSError as err:
                    raise ShardError(f"{ann}: image {path} cannot be read: {err}") from err
                suffix = path.suffix.lower().lstrip(".")
                sink.write({"__key__": f"{key:09d}", suffix if suffix in IMAGE_KEYS else "jpg":
                            data, "txt": entry.captions[0],
                            "json": {"caption": entry.caption, "image": entry.image}})
                name = Path(sink.fname).name
                counts[name] = counts.get(name, 0) + 1
                key += 1
    return write_shard_index(out / INDEX_FILE, list(counts), list(counts.values()))


def index_shards(urls: Sequence[str], out: str | Path) -> Path:
    """Write an index for existing shards (e.g. img2dataset output). A shard's count comes from
    img2dataset's ``NNNNN_stats.json`` (``successes``) beside it when there is one, else from
    reading the shard. URLs inside ``out``'s folder are stored relative to it."""
    out = Path(out)
    stored, counts = [], []
    for url in urls:
        stats = Path(url).with_name(Path(url).stem + "_stats.json")
        n = None
        if is_local(url) and stats.is_file():
            n = json.loads(stats.read_text(encoding="utf-8")).get("successes")
        counts.append(n if isinstance(n, int) and n > 0 else count_samples(url))
        local = Path(url).resolve() if is_local(url) else None
        inside = local is not None and local.is_relative_to(out.parent.resolve())
        stored.append(str(local.relative_to(out.parent.resolve())) if inside else url)
    return write_shard_index(out, stored, counts)
