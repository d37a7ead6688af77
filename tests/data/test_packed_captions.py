"""The packed caption store: exact round trip, ALBEF's caption draws, and its memory cost."""

from __future__ import annotations

import random

import pytest

from model.data.packed import CaptionTable, PackedStrings

STRINGS = ["a photo of a cat", "", "façade — 東京 ✓", "x" * 300, "a photo of a cat"]


def test_packed_strings_round_trip_and_bounds() -> None:
    packed = PackedStrings.pack(STRINGS)
    assert len(packed) == len(STRINGS)
    assert list(packed) == STRINGS and packed[-1] == STRINGS[-1] and packed[-5] == STRINGS[0]
    # Exactly the UTF-8 bytes plus one int64 end offset per string: no per-string objects.
    assert packed.nbytes == sum(len(s.encode("utf-8")) for s in STRINGS) + 8 * len(STRINGS)
    for bad in (5, -6):
        with pytest.raises(IndexError, match="out of range for 5 strings"):
            packed[bad]
    assert list(PackedStrings.pack([])) == []


def test_caption_table_draws_exactly_as_albefs_list_sampling() -> None:
    """ALBEF: ``random.choice(caption)`` for a list field (even of one), the string itself
    otherwise. The table must consume the same random numbers and return the same captions."""
    fields: list[str | list[str]] = ["only one", ["single in a list"], ["a", "b", "c"],
                                     ["d", "e"], "another", [f"c{k}" for k in range(7)]]
    table = CaptionTable((f"img{i}.jpg", f) for i, f in enumerate(fields))
    assert len(table) == len(fields) and list(table.images) == [f"img{i}.jpg"
                                                                for i in range(len(fields))]
    assert [len(table.caption_range(i)) for i in range(len(fields))] == [1, 1, 3, 2, 1, 7]
    order = [i % len(fields) for i in range(600)]
    random.seed(7)
    expected = [f if isinstance(f, str) else random.choice(f) for f in (fields[i] for i in order)]
    after_expected = random.random()
    random.seed(7)
    assert [table.sample_caption(i) for i in order] == expected
    assert random.random() == after_expected  # same number of draws, no more, no fewer
    assert {table.sample_caption(5) for _ in range(200)} == {f"c{k}" for k in range(7)}


def test_manifest_benchmark_measures_the_packed_table_smaller(capsys) -> None:  # noqa: ANN001
    from benchmarks import bench_manifest

    assert bench_manifest.main(["--entries", "100000"]) == 0
    rows = {}
    for line in capsys.readouterr().out.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] in ("albef", "packed"):
            rows[cells[0]] = [float(c) for c in cells[1:]]
    held, dirtied = {k: v[0] for k, v in rows.items()}, {k: v[1] for k, v in rows.items()}
    # Resident sizes at this scale carry allocator noise of a few MiB; the reader's copies do not.
    assert held["packed"] < 0.8 * held["albef"], rows
    assert dirtied["packed"] < 0.2 * dirtied["albef"], rows
