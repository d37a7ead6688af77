"""Tar-shard pre-training data: conversion, index, rank/worker split, exact resume, faults."""

from __future__ import annotations

import json
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms

from model.data.shards import (
    ShardError,
    ShardStream,
    decode_sample,
    index_shards,
    read_shard_index,
    write_shard_index,
    write_shards,
)

N_SAMPLES = 96


def _caption_file(root: Path, n: int = N_SAMPLES, bad: set[int] = frozenset()) -> Path:
    """n tiny images whose colour and caption both encode the sample number."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    entries = []
    for i in range(n):
        path = root / "img" / f"{i:04d}.png"
        if i in bad:
            path.write_bytes(b"not an image")
        else:
            Image.new("RGB", (8, 8), (i % 256, (7 * i) % 256, 3)).save(path)
        caption: str | list[str] = f"sample {i}" if i % 2 else [f"sample {i}", f"sample {i}"]
        entries.append({"image": f"img/{i:04d}.png", "caption": caption})
    ann = root / "train.json"
    ann.write_text(json.dumps(entries))
    return ann


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    return write_shards([_caption_file(root)], root, root / "out", maxcount=10)


def _stream(index: Path, rank: int = 0, world: int = 1, **kw) -> ShardStream:
    args = dict(batch_size=4, seed=3, streams_per_rank=2, shuffle_block=5)
    args.update(kw)
    return ShardStream(read_shard_index(index), transforms.ToTensor(), rank=rank,
                       world_size=world, **args)


def _captions(stream: ShardStream, epoch: int = 0, start: int = 0, workers: int = 0
              ) -> list[str]:
    stream.set_epoch(epoch, start)
    loader = DataLoader(stream, batch_size=stream.batch_size, num_workers=workers,
                        collate_fn=lambda items: items)
    return [item["caption"] for batch in loader for item in batch]


def test_conversion_keeps_bytes_captions_and_counts(shards: Path) -> None:
    index = read_shard_index(shards)
    assert index.counts == (10,) * 9 + (6,) and index.total == N_SAMPLES
    assert [Path(u).name for u in index.urls] == [f"{i:05d}.tar" for i in range(10)]
    with tarfile.open(index.urls[0]) as tar:
        names = sorted(tar.getnames())
        assert names[:3] == ["000000000.json", "000000000.png", "000000000.txt"]
        png = tar.extractfile("000000000.png").read()
        meta = json.loads(tar.extractfile("000000000.json").read())
    assert png == (shards.parent.parent / "img" / "0000.png").read_bytes()  # not re-encoded
    assert meta["caption"] == ["sample 0", "sample 0"]  # a list stays a list
    image, caption = decode_sample({"png": png, "json": json.dumps(meta).encode()})
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (0, 0, 3)


def test_every_sample_once_per_epoch_across_ranks_and_workers(shards: Path) -> None:
    """2 ranks x 2 streams x batch 4: 96 samples = 6 batches per stream, none left out."""
    for epoch in (0, 1):
        seen = _captions(_stream(shards, 0, 2), epoch) + _captions(_stream(shards, 1, 2), epoch)
        assert Counter(seen) == Counter(f"sample {i}" for i in range(N_SAMPLES)), epoch
    assert _captions(_stream(shards, 0, 2), 0) != _captions(_stream(shards, 0, 2), 1)


def test_the_tail_left_out_is_less_than_one_global_batch(shards: Path) -> None:
    stream = _stream(shards, streams_per_rank=4, batch_size=7)  # 96 // 28 = 3 per stream
    seen = _captions(stream)
    assert len(seen) == len(set(seen)) == 84 == stream.batches_per_epoch * 7


def test_worker_count_does_not_change_the_stream(shards: Path) -> None:
    reference = _captions(_stream(shards))
    assert _captions(_stream(shards), workers=2) == reference
    assert _captions(_stream(shards, streams_per_rank=4), workers=2) == \
        _captions(_stream(shards, streams_per_rank=4))


@pytest.mark.parametrize("start", [1, 3, 5, 11])
def test_resume_continues_at_the_exact_sample(shards: Path, start: int) -> None:
    """Images too: the augmentation is seeded per sample, so a resumed stream gives the same
    tensors as the uninterrupted one (start 3 and 5 fall inside shuffle blocks)."""
    flip = transforms.Compose([transforms.RandomResizedCrop(6), transforms.ToTensor()])

    def items(first: int, workers: int) -> list[dict]:
        stream = ShardStream(read_shard_index(shards), flip, batch_size=4, seed=3,
                             streams_per_rank=2, shuffle_block=5)
        stream.set_epoch(1, first)
        loader = DataLoader(stream, batch_size=4, num_workers=workers,
                            collate_fn=lambda b: b)
        return [item for batch in loader for item in batch]

    whole, resumed = items(0, 0), items(start, 2)
    tail = whole[start * 4:]
    assert [i["caption"] for i in resumed] == [i["caption"] for i in tail]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(resumed, tail))
    assert not all(torch.equal(a["image"], b["image"]) for a, b in zip(whole, whole[1:]))


def test_position_names_the_shard_and_offset(shards: Path) -> None:
    stream = _stream(shards)
    done = stream.position(0, 3)  # streams 0, 1 have delivered 2 and 1 batches
    assert [d["samples_done"] for d in done] == [8, 4]
    for d in done:  # the stream's segment, walked sample by sample, reaches the same place
        walk = [(piece.url, piece.offset + k) for piece in stream.stream_pieces(0, d["stream"])
                for k in range(piece.n)]
        assert walk[d["samples_done"]] == (d["shard"], d["offset"])


def test_resample_mode_is_seeded_and_sized_by_samples_per_epoch(shards: Path) -> None:
    a = _captions(_stream(shards, sampling="resample", samples_per_epoch=40))
    assert len(a) == 40 == len(_captions(_stream(shards, sampling="resample",
                                                 samples_per_epoch=40)))
    assert a == _captions(_stream(shards, sampling="resample", samples_per_epoch=40))
    assert a != _captions(_stream(shards, sampling="resample", samples_per_epoch=40), epoch=1)


def test_a_corrupt_sample_is_skipped_and_counted(tmp_path: Path) -> None:
    index = write_shards([_caption_file(tmp_path, n=32, bad={5})], tmp_path, tmp_path / "out",
                         maxcount=8)
    stream = _stream(index, streams_per_rank=1, batch_size=8, shuffle_block=8)
    seen = _captions(stream)
    assert len(seen) == 32 and "sample 5" not in seen  # the batch count is kept
    assert stream.skipped == 1 and len(stream.bad_keys) == 1
    (substitute,) = [c for c, k in Counter(seen).items() if k == 2]
    assert 0 <= int(substitute.split()[1]) < 8  # the next good sample of the same block


def test_unreadable_and_short_shards_are_named(tmp_path: Path, shards: Path) -> None:
    missing = write_shard_index(tmp_path / "a.json", ["nowhere/00000.tar"], [8])
    with pytest.raises(ShardError, match="nowhere/00000.tar"):
        _captions(_stream(missing, streams_per_rank=1))
    (tmp_path / "junk.tar").write_bytes(b"\x00garbage" * 100)
    junk = write_shard_index(tmp_path / "b.json", ["junk.tar"], [8])
    with pytest.raises(ShardError, match="junk.tar"):
        _captions(_stream(junk, streams_per_rank=1))
    first = read_shard_index(shards).urls[0]
    short = write_shard_index(tmp_path / "c.json", [first], [16])  # holds 10
    with pytest.raises(ShardError, match="fewer samples than its index says"):
        _captions(_stream(short, streams_per_rank=1))


@pytest.mark.parametrize("text, match", [
    ("{", "not valid JSON"),
    ('{"shardlist": []}', "non-empty 'shardlist'"),
    ('{"shardlist": [{"nsamples": 3}]}', r"shardlist\[0\] has no 'url'"),
    ('{"shardlist": [{"url": "a.tar", "nsamples": 0}]}', r"shardlist\[0\] \(a.tar\)"),
])
def test_a_malformed_index_names_file_and_entry(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "shards.json"
    path.write_text(text)
    with pytest.raises(ShardError, match=match) as err:
        read_shard_index(path)
    assert str(path) in str(err.value)


def test_index_of_img2dataset_output(tmp_path: Path, shards: Path) -> None:
    """Counts from img2dataset's NNNNN_stats.json when present, else read from the shard."""
    index = read_shard_index(shards)
    for i, url in enumerate(index.urls[:2]):
        (tmp_path / f"{i:05d}.tar").write_bytes(Path(url).read_bytes())
    (tmp_path / "00000_stats.json").write_text(json.dumps({"count": 12, "successes": 10}))
    out = index_shards([str(tmp_path / "00000.tar"), str(tmp_path / "00001.tar")],
                       tmp_path / "shards.json")
    again = read_shard_index(out)
    assert again.listed == ("00000.tar", "00001.tar") and again.counts == (10, 10)


def test_caption_sampling_matches_the_json_path(shards: Path) -> None:
    """A list caption costs one draw of `random` per load, as PretrainDataset's does."""
    stream = _stream(shards)
    image = Image.new("RGB", (4, 4))
    a = stream._item(0, 0, image, ["x a", "x b", "x c"])["caption"]
    b = stream._item(0, 0, image, ["x a", "x b", "x c"])["caption"]
    assert a == b  # seeded per sample
    picks = {stream._item(0, p, image, ["x a", "x b", "x c"])["caption"] for p in range(30)}
    assert picks == {"x a", "x b", "x c"}
