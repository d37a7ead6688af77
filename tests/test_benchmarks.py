"""Smoke and schema tests of the cost benchmark (benchmarks/bench_step.py, bench_memory.py)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from benchmarks.bench_memory import measure
from benchmarks.bench_step import (
    COST_COLUMNS,
    Suite,
    load_suite,
    make_batch,
    paired_ratios,
    probe_memory,
    rebuild_reports,
    run_benchmark,
    select_cases,
)

RAW_COLUMNS = {
    "case": object, "variant": object, "label": object, "preset": object, "batch": "int",
    "precision": object, "device_name": object, "sec_it_median": float, "sec_it_p10": float,
    "sec_it_p90": float, "samples_per_s": float, "ratio_paired_median": float,
    "ratio_of_medians": float, "flops": float, "mfu": float, "forward_s": float,
    "backward_s": float, "optimizer_s": float, "status": object, "torch_version": object,
    "git_sha": object,
}


@pytest.fixture(scope="module")
def small_suite() -> Suite:
    """The real cases.yaml with a small matmul peak (the 2048^3 default takes seconds)."""
    return dataclasses.replace(load_suite(), peak={"cpu": {"size": 128, "repeats": 2}})


def test_two_variants_two_iterations(tmp_path: Path, small_suite: Suite) -> None:
    cases = select_cases(small_suite, "cpu", ["tiny"], [4], ["fp32"], ["albef", "ours"])
    df = run_benchmark(cases, "cpu", tmp_path, iters=2, warmup=1, suite=small_suite,
                       breakdown=True, memory=False)
    assert list(df["variant"]) == ["albef", "ours"]
    for column, dtype in RAW_COLUMNS.items():
        assert column in df, column
        if dtype is float:
            assert pd.api.types.is_float_dtype(df[column]), column
        elif dtype == "int":
            assert pd.api.types.is_integer_dtype(df[column]), column
    numeric = ["sec_it_median", "sec_it_p10", "sec_it_p90", "samples_per_s",
               "ratio_paired_median", "ratio_of_medians", "flops", "mfu", "forward_s"]
    assert df[numeric].map(math.isfinite).all().all()
    assert (df["status"] == "ok").all()
    assert (df["iters"] == 2).all()
    assert df.loc[df["variant"] == "albef", "ratio_paired_median"].item() == 1.0
    assert (df["flops"] > 0).all()
    for name in ("steps.csv", "iterations.csv", "environment.json", "cost_table.md",
                 "cost_table.tex", "cost_table.csv", "planning.md", "planning.csv",
                 "breakdown.md", "breakdown.csv"):
        assert (tmp_path / name).stat().st_size > 0, name
    table = pd.read_csv(tmp_path / "cost_table.csv")
    headers = [header for header, _ in COST_COLUMNS.values()]
    assert list(table.columns) == ["Method", *headers, "case"]
    assert list(table["Method"]) == ["ALBEF", "Ours"]
    tex = (tmp_path / "cost_table.tex").read_text(encoding="utf-8")
    assert r"\begin{tabular}" in tex
    assert "^" not in tex and r"\textasciicircum{}" in tex  # caption specials escaped
    assert len(pd.read_csv(tmp_path / "iterations.csv")) == 4
    (tmp_path / "cost_table.md").unlink()
    rebuild_reports(tmp_path, small_suite)  # tables re-render from the raw files alone
    assert "| Ours " in (tmp_path / "cost_table.md").read_text(encoding="utf-8")


def test_memory_measure_in_process(small_suite: Suite) -> None:
    (case,) = select_cases(small_suite, "cpu", ["tiny"], [4], ["fp32"], ["albef"])
    result = measure(case, torch.device("cpu"), steps=1, warmup=0, seed=0)
    assert result["mem_status"] == "ok", result
    assert result["mem_kind"] == "cpu_rss_growth"
    # In a warm (test) process freed heap can be reused, so the growth may be ~0 but not < -1.
    assert math.isfinite(result["peak_mem_mib"]) and result["peak_mem_mib"] > -1.0


@pytest.mark.slow
def test_memory_probe_fresh_process(small_suite: Suite) -> None:
    (case,) = select_cases(small_suite, "cpu", ["tiny"], [4], ["fp32"], ["albef"])
    result = probe_memory(case, case.variants[0], torch.device("cpu"), small_suite.path,
                          steps=1, seed=0, threads=1)
    assert result["mem_status"] == "ok", result
    assert result["peak_mem_mib"] >= 0


def test_batch_is_cls_first_padded_and_shared(small_suite: Suite) -> None:
    (case,) = select_cases(small_suite, "cpu", ["tiny"], [64], ["fp32"], ["albef"])
    a = make_batch(case, torch.device("cpu"), seed=3)
    b = make_batch(case, torch.device("cpu"), seed=3)
    assert all(torch.equal(a[k], b[k]) for k in a)
    special = case.model.special
    assert (a["input_ids"][:, 0] == special.cls).all()
    assert a["input_ids"].shape[1] <= case.text.max_len
    pads = a["attention_mask"] == 0
    assert (a["input_ids"][pads] == special.pad).all()
    assert pads.any()  # realistic padding: not every caption is the longest


def test_case_selection_rules(small_suite: Suite) -> None:
    cases = select_cases(small_suite, "cpu", variants=["ours"])
    assert [c.name for c in cases] == ["tiny-b16-fp32", "tiny-b32-fp32", "tiny-b64-fp32",
                                       "mid-b16-fp32", "mid-b32-fp32"]
    assert [v.name for v in cases[0].variants] == ["albef", "ours"]  # reference added
    with pytest.raises(ValueError, match="CUDA-only"):
        select_cases(small_suite, "cpu", ["tiny"], [16], ["bf16"])
    with pytest.raises(ValueError, match="unknown variants"):
        select_cases(small_suite, "cpu", variants=["nope"])


def test_paired_ratios_use_common_rounds() -> None:
    assert paired_ratios([2.0, 4.0, 6.0], [1.0, 2.0]) == [2.0, 2.0]


def test_retrieval_batched_equals_loop(tmp_path: Path) -> None:
    from benchmarks.bench_retrieval import run_retrieval_benchmark

    df = run_retrieval_benchmark("tiny", n_images=6, k=3, batch_size=16, repeats=1,
                                 device="cpu", out_dir=tmp_path)
    row = df.iloc[0]
    assert (row["images"], row["captions"]) == (6, 30)
    assert row["max_abs_score_diff"] < 1e-4
    assert math.isfinite(row["speedup"]) and row["speedup"] > 0
    assert (tmp_path / "retrieval.md").stat().st_size > 0
