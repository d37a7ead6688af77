"""Smoke and schema tests of the cost benchmark (benchmarks/bench_step.py, bench_memory.py),
and of its submission path up to the scheduler (the real SLURM run is in
test_cost_benchmark_slurm.py)."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from benchmarks import bench_step
from benchmarks import submit as bench_submit
from benchmarks.bench_job import BenchmarkJob, JobInterrupted, allocation_threads
from benchmarks.bench_memory import measure
from benchmarks.bench_step import run_benchmark
from benchmarks.cases import DEFAULT_CASES, Suite, load_suite, make_batch, select_cases
from benchmarks.measure import paired_ratios
from benchmarks.probes import probe_memory
from benchmarks.report import COST_COLUMNS, rebuild_reports
from slurm.resources import allocated_threads

RAW_COLUMNS = {
    "case": object, "variant": object, "label": object, "preset": object, "batch": "int",
    "precision": object, "device_name": object, "sec_it_median": float, "sec_it_p10": float,
    "sec_it_p90": float, "samples_per_s": float, "ratio_paired_median": float,
    "ratio_of_medians": float, "flops": float, "mfu": float, "forward_s": float,
    "backward_s": float, "optimizer_s": float, "status": object, "torch_version": object,
    "git_sha": object,
}


SMALL_PEAK = {"cpu": {"size": 128, "repeats": 2}}  # the 2048^3 default takes seconds
# What a run with --breakdown writes into --out.
OUTPUT_FILES = ("steps.csv", "iterations.csv", "environment.json", "cost_table.md",
                "cost_table.tex", "cost_table.csv", "planning.md", "planning.csv",
                "breakdown.md", "breakdown.csv")


@pytest.fixture(scope="module")
def small_suite() -> Suite:
    """The real cases.yaml with a small matmul peak."""
    return dataclasses.replace(load_suite(), peak=SMALL_PEAK)


def write_small_cases(path: Path) -> Path:
    """The real cases.yaml with a small matmul peak, as a file (for the CLI and for jobs)."""
    raw = yaml.safe_load(DEFAULT_CASES.read_text(encoding="utf-8"))
    raw["peak"] = {**raw["peak"], **SMALL_PEAK}
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def write_failing_cases(path: Path) -> Path:
    """write_small_cases plus a variant whose momentum queue cannot be allocated: its step
    fails with the allocator's "can't allocate memory" at once (status oom), costing nothing."""
    write_small_cases(path)
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    raw["variants"]["huge_queue"] = {"label": "Huge queue",
                                     "set": ["model.queue_size=4000000000000"]}
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def assert_raw_rows(df: pd.DataFrame, variants: Sequence[str], iters: int) -> None:
    """steps.csv's schema and sanity of a run with FLOPs and --breakdown, all variants ok."""
    assert list(df["variant"]) == list(variants)
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
    assert (df["iters"] == iters).all()
    assert df.loc[df["variant"] == "albef", "ratio_paired_median"].item() == 1.0
    assert (df["flops"] > 0).all()


def assert_output_files(out: Path, methods: Sequence[str], iterations: int) -> None:
    """Every output file present; cost_table.{csv,tex} with the expected columns and rows."""
    for name in OUTPUT_FILES:
        assert (out / name).stat().st_size > 0, name
    table = pd.read_csv(out / "cost_table.csv")
    headers = [header for header, _ in COST_COLUMNS.values()]
    assert list(table.columns) == ["Method", *headers, "case"]
    assert list(table["Method"]) == list(methods)
    tex = (out / "cost_table.tex").read_text(encoding="utf-8")
    assert r"\begin{tabular}" in tex
    assert "^" not in tex and r"\textasciicircum{}" in tex  # caption specials escaped
    assert "| " + methods[-1] + " " in (out / "cost_table.md").read_text(encoding="utf-8")
    assert len(pd.read_csv(out / "iterations.csv")) == iterations


def test_two_variants_two_iterations(tmp_path: Path, small_suite: Suite) -> None:
    cases = select_cases(small_suite, "cpu", ["tiny"], [4], ["fp32"], ["albef", "ours"])
    df = run_benchmark(cases, "cpu", tmp_path, iters=2, warmup=1, suite=small_suite,
                       breakdown=True, memory=False)
    assert_raw_rows(df, ["albef", "ours"], iters=2)
    assert_output_files(tmp_path, ["ALBEF", "Ours"], iterations=4)
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
    assert row["max_abs_score_diff"] < 1e-4  # batched and deduplicated both equal the loop
    assert math.isfinite(row["speedup"]) and row["speedup"] > 0
    assert 0 <= row["dedupe_share"] < 1 and row["unique_pairs"] <= row["pairs"]
    assert (tmp_path / "retrieval.md").stat().st_size > 0


# --------------------------------------------------------------------------- submission
@pytest.fixture
def no_submission(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to queue a job fails the test: refusals must happen before submission."""

    def refuse(sub: bench_submit.Submission) -> None:
        raise AssertionError(f"submitted although the request is invalid: {sub}")

    monkeypatch.setattr(bench_submit, "submit", refuse)


@pytest.mark.parametrize(("extra", "message"), [
    (["--device", "cuda", "--tier", "cpu"],
     "resource tier 'cpu' has gpus_per_node=0"),
    (["--variants", "albef", "nope"], "unknown variants ['nope']"),
    (["--preset", "huge"], "unknown presets ['huge']"),
    (["--tier", "3gpu"], "unknown resource tier '3gpu'"),
    (["--precision", "bf16"], "bf16 autocast is CUDA-only"),
    (["--report-only"], "--report-only measures nothing"),
    (["--batch", "1"], "case tiny-b1-fp32, variant albef: --set: train.batch_size must be >= 2"),
])
def test_invalid_submission_fails_before_submitting(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], no_submission: None,
        extra: list[str], message: str) -> None:
    out = tmp_path / "bench"
    rc = bench_step.main(["--cluster", "slurm", "--preset", "tiny", "--batch", "4",
                          "--out", str(out), *extra])
    assert rc == 2
    err = capsys.readouterr().err
    assert "error: nothing submitted" in err and message in err, err
    assert not out.exists()  # no submissions.jsonl, no submitit folder


def test_bad_cases_file_fails_before_submitting(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], no_submission: None) -> None:
    rc = bench_step.main(["--cluster", "slurm", "--cases", str(tmp_path / "missing.yaml"),
                          "--out", str(tmp_path / "bench")])
    assert rc == 2
    assert "cannot read the cases file" in capsys.readouterr().err


def test_forwarded_arguments_drop_submission_options(tmp_path: Path) -> None:
    parser = bench_step.build_parser()
    # An abbreviated submission option must not reach the job either.
    args = parser.parse_args(["--clus", "slurm", "--tier=cpu", "--wait", "--preset", "tiny",
                              "--batch", "4", "8", "--no-memory", "--iters", "3",
                              "--out", str(tmp_path / "rel")])
    argv = bench_submit.forwarded_argv(args, parser)
    assert argv == ["--preset", "tiny", "--batch", "4", "8", "--iters", "3", "--no-memory",
                    "--cases", str(DEFAULT_CASES.resolve()), "--out", str(tmp_path / "rel")]
    assert parser.parse_args(argv).cluster is None
    assert bench_submit.default_tier("cuda:1") == "1gpu"
    assert bench_submit.default_tier("cpu") == "cpu"


def test_job_uses_the_allocation_and_is_never_requeued() -> None:
    assert allocation_threads(["--iters", "2"], {"SLURM_CPUS_PER_TASK": "4"}) == [
        "--iters", "2", "--threads", "4"]
    assert allocation_threads(["--threads", "1"], {"SLURM_CPUS_PER_TASK": "4"}) == [
        "--threads", "1"]
    assert allocation_threads(["--iters", "2"], {}) == ["--iters", "2"]
    # One rule for grid cells and benchmark jobs: a local grid's share first, then SLURM's.
    both = {"SOFTMASK_THREADS": "2", "SLURM_CPUS_PER_TASK": "4"}
    assert allocation_threads([], both) == ["--threads", "2"]
    assert allocated_threads(both) == 2 and allocated_threads({"SLURM_CPUS_PER_TASK": "4"}) == 4
    assert allocated_threads({"SOFTMASK_THREADS": "0", "SLURM_CPUS_PER_TASK": "x"}) is None
    # Called by submitit on preemption: it stops the run instead of returning a resubmission.
    with pytest.raises(JobInterrupted, match="not requeued"):
        BenchmarkJob(bench_submit.ENTRY).checkpoint(["--iters", "2"])


def test_job_with_a_failed_variant_fails_and_still_prints_its_table(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Under an executor (here submitit's local one) a failed variant fails the job, so the
    scheduler's record says so too; the waiting caller exits 1 and prints the table, with
    the failed row and its reason."""
    out = tmp_path / "bench"
    rc = bench_step.main(["--cluster", "local", "--wait", "--cases", str(write_failing_cases(
        tmp_path / "cases.yaml")), "--preset", "tiny", "--batch", "4", "--variants", "albef",
        "huge_queue", "--iters", "1", "--warmup", "0", "--no-memory", "--no-flops",
        "--out", str(out)])
    assert rc == 1
    captured = capsys.readouterr()
    assert "had variants fail; see their rows" in captured.err
    assert "| Huge queue" in captured.out and "| oom" in captured.out
    raw = pd.read_csv(out / "steps.csv").set_index("variant")
    assert raw.loc["albef", "status"] == "ok" and raw.loc["huge_queue", "status"] == "oom"
    assert "can't allocate memory" in raw.loc["huge_queue", "detail"]


def test_impossible_config_is_refused_before_anything_is_measured(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench"
    with pytest.raises(SystemExit) as exc:
        bench_step.main(["--preset", "tiny", "--batch", "1", "--variants", "albef",
                         "--no-memory", "--out", str(out)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"{DEFAULT_CASES}: invalid benchmark configs" in err
    assert "case tiny-b1-fp32, variant albef: --set: train.batch_size must be >= 2" in err, err
    assert not out.exists()


def test_debug_cluster_runs_the_cli_path_and_records_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The debug executor runs the job in this process: the whole submission path, no SLURM."""
    out = tmp_path / "bench"
    rc = bench_step.main(["--cluster", "debug", "--cases", str(write_small_cases(
        tmp_path / "cases.yaml")), "--preset", "tiny", "--batch", "2", "--variants", "albef",
        "--iters", "1", "--warmup", "0", "--no-memory", "--no-flops", "--out", str(out)])
    assert rc == 0
    (record,) = [json.loads(line) for line in (out / "submissions.jsonl").read_text().splitlines()]
    assert record["cluster"] == "debug" and record["tier"] == "cpu"
    assert record["cases"] == ["tiny-b2-fp32"] and "--cluster" not in record["argv"]
    printed = capsys.readouterr().out
    assert f"job {record['job_id']}" in printed
    assert printed.count("### tiny-b2-fp32") == 1  # printed by the job only
    assert list(pd.read_csv(out / "steps.csv")["variant"]) == ["albef"]


@pytest.mark.slow
def test_zero_shards_the_adamw_state_across_ranks(tmp_path: Path) -> None:
    """Two gloo ranks: without ZeRO each holds the whole AdamW state, with it the shards add up
    to exactly that state (2 moments per trainable parameter, float32, plus step counters)."""
    from benchmarks.bench_zero import measure as measure_zero

    frame = measure_zero("tiny", 2)
    plain, zero = frame[~frame["zero"]], frame[frame["zero"]]
    params = int(frame["params"].iloc[0])
    full = plain["optimizer_state_mib"].to_numpy() * 2**20
    assert full[0] == full[1] and 8 * params <= full[0] <= 8 * params + 4 * 1024
    shards = zero["optimizer_state_mib"].to_numpy() * 2**20
    assert all(s < full[0] for s in shards)
    assert abs(shards.sum() - full[0]) < 1e-6


def test_fit_table_slope_and_batch_arithmetic() -> None:
    """Activation per sample is the slope of peak memory over the batch (fixed costs cancel);
    a card fits floor((capacity x headroom - fixed - context) / per-sample) samples."""
    from benchmarks.fit_table import activation_per_sample, element_counts, fit_table, fixed_gib

    steps = pd.DataFrame({"variant": ["albef"] * 2 + ["ours"] * 2,
                          "label": ["ALBEF"] * 2 + ["Ours"] * 2, "batch": [2, 4, 2, 4],
                          "peak_mem_mib": [100 + 7 * 2, 100 + 7 * 4, 50 + 2048, 50 + 4096],
                          "sec_it_median": [1.0, 2.0, 1.0, 2.0]})
    acts = activation_per_sample(steps)
    assert acts.set_index("variant")["act_mib_per_sample"].round(6).to_dict() == \
        {"albef": 7.0, "ours": 1024.0}
    table = fit_table(acts, fixed=1.0, fixed_zero8=0.5).set_index("variant")
    assert table.loc["Ours", "24 GB fp32"] == math.floor(24e9 / 2**30 * 0.9 - 1.0 - 1.0)
    assert table.loc["Ours", "24 GB bf16"] == math.floor((24e9 / 2**30 * 0.9 - 2.0) / 0.5)
    # checkpointing against its plain variant: 1 - 4/8 of the activation, time at batch 2
    from benchmarks.fit_table import checkpointing_summary

    ckpt = pd.DataFrame({"variant": ["albef"] * 2 + ["albef_ckpt"] * 2,
                         "label": ["ALBEF"] * 2 + ["ALBEF + ckpt"] * 2, "batch": [2, 4, 2, 4],
                         "peak_mem_mib": [100 + 16, 100 + 32, 100 + 8, 100 + 16],
                         "sec_it_median": [1.0, 2.0, 1.3, 2.9]})
    assert checkpointing_summary(activation_per_sample(ckpt)) == \
        "ALBEF + ckpt: 50% less activation memory per sample, 1.30x the time (batch 2)."
    # the fixed part grows with the model and shrinks with ZeRO
    tiny = load_suite().models["tiny"]
    counts = element_counts(tiny)
    assert fixed_gib(counts, world=8, zero=True) < fixed_gib(counts) < 1.0


def test_paper_cost_reproduces_its_anchor_and_scales_by_flops() -> None:
    """At ALBEF's reported pace the ALBEF cell costs exactly 8 GPUs x 2-3 days; a cell with
    1.1x the FLOPs costs 1.1x; the grid total is the sum over cells times the seeds."""
    from benchmarks.paper_cost import cost_frame

    counts = {"albef": (300e9, 2**31), "softmask": (330e9, 2**31)}
    frame, caption = cost_frame(counts, {"albef": "-", "softmask": "softmask"}, seeds=3,
                                tflops=None)
    rows = frame.set_index("cell")
    assert rows.loc["albef", "GPU-h/run"] == "384-576"  # 8 x 48 h, 8 x 72 h
    assert rows.loc["softmask", "x ALBEF"] == pytest.approx(1.1)
    assert rows.loc["softmask", "GPU-h/run"] == f"{384 * 1.1:,.0f}-{576 * 1.1:,.0f}"
    assert f"{3 * 384 * 2.1:,.0f}-{3 * 576 * 2.1:,.0f} GPU-hours" in caption
    assert "12 GiB" in caption  # 2 cells x 3 seeds x 2 GiB
    # a measured rate replaces the anchor: 300 GFLOP x 153M samples at 100 TFLOP/s
    frame, _ = cost_frame(counts, {"albef": "-", "softmask": "softmask"}, 1, tflops=100.0)
    assert frame.set_index("cell").loc["albef", "GPU-h/run"] == \
        f"{300e9 * 5.1e6 * 30 / 100e12 / 3600:,.0f}"
