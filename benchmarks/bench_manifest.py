"""Memory of a pre-training manifest: ALBEF's list of dicts vs the packed table, per process
and in a forked DataLoader-style worker that reads every entry once.

    python -m benchmarks.bench_manifest --entries 1000000

Builds an ALBEF-shaped caption file in a temporary directory (image path + a list of 1-5
captions of 8-16 words per entry), then, each in a fresh process: the resident-memory growth
of holding it (``json.load`` as ALBEF's dataset does vs ``PretrainDataset``'s streamed
``CaptionTable``), its peak
while loading, and the private memory a forked child dirties by reading every caption (what
each DataLoader worker costs). Memory is counted from the process's size after its imports.
Linux only (reads /proc).
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing as mp
import random
import tempfile
from pathlib import Path

WORDS = ("a man woman dog cat red blue green small large sitting standing on in of with "
         "the near street table field water grass white black two three people").split()


def write_manifest(path: Path, entries: int, seed: int = 0) -> None:
    """An ALBEF-shaped caption file with ``entries`` entries."""
    rng = random.Random(seed)
    rows = [{"image": f"cc3m/{i // 10000:04d}/{i:09d}.jpg",
             "caption": [" ".join(rng.choices(WORDS, k=rng.randint(8, 16)))
                         for _ in range(rng.randint(1, 5))]} for i in range(entries)]
    path.write_text(json.dumps(rows), encoding="utf-8")


def _status_kib(field: str, pid: str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _private_dirty_kib() -> int:
    text = Path("/proc/self/smaps_rollup").read_text()
    return sum(int(line.split()[1]) for line in text.splitlines()
               if line.startswith("Private_Dirty:"))


def _load(kind: str, path: Path):  # noqa: ANN202 - either holder
    if kind == "albef":  # ALBEF's pre-training dataset: the whole file's list of dicts
        with path.open(encoding="utf-8") as f:
            return json.load(f)
    from model.data.datasets import iter_caption_file
    from model.data.packed import CaptionTable

    return CaptionTable((e.image, e.caption) for e in iter_caption_file(path))


def _read_all(holder, kind: str) -> int:  # noqa: ANN001
    """Touch every entry as a worker's __getitem__ would; returns characters read."""
    if kind == "albef":
        return sum(len(a["image"]) + len(random.choice(a["caption"])) for a in holder)
    return sum(len(holder.images[i]) + len(holder.sample_caption(i)) for i in range(len(holder)))


def _child(holder, kind: str, queue) -> None:  # noqa: ANN001
    before = _private_dirty_kib()
    _read_all(holder, kind)
    queue.put(_private_dirty_kib() - before)


def measure(kind: str, path: Path, queue) -> None:  # noqa: ANN001
    """In a fresh process: RSS growth of holding the manifest, then a forked reader's cost."""
    import model.data.datasets  # noqa: F401 - import cost is not the manifest's

    gc.collect()
    base = _status_kib("VmRSS")
    holder = _load(kind, path)
    gc.collect()
    held = _status_kib("VmRSS") - base
    inner = mp.get_context("fork").Queue()
    worker = mp.get_context("fork").Process(target=_child, args=(holder, kind, inner))
    worker.start()
    dirtied = inner.get()
    worker.join()
    queue.put({"kind": kind, "held_mib": held / 1024, "worker_dirty_mib": dirtied / 1024,
               "peak_mib": (_status_kib("VmHWM") - base) / 1024})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_manifest",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=1_000_000)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "manifest.json"
        write_manifest(path, args.entries)
        print(f"{args.entries:,} entries, file {path.stat().st_size / 2**20:.0f} MiB")
        print("| holder | held (MiB) | dirtied per forked reader (MiB) "
              "| peak while loading (MiB) |")
        print("|:--|--:|--:|--:|")
        for kind in ("albef", "packed"):
            queue = mp.get_context("spawn").Queue()
            proc = mp.get_context("spawn").Process(target=measure, args=(kind, path, queue))
            proc.start()
            row = queue.get()
            proc.join()
            print(f"| {row['kind']} | {row['held_mib']:.0f} | {row['worker_dirty_mib']:.0f} "
                  f"| {row['peak_mib']:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
