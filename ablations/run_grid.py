"""Run the paper's ablation grid and regenerate results/.

With no arguments this is the embedded default: the ``tiny`` preset on the generated synthetic
set, run locally (2 jobs at a time through submitit's local executor), then the tables and plots
in results/ are regenerated. On a cluster::

    python ablations/run_grid.py --cluster slurm --preset base --seeds 3

submits one SLURM job array per resource tier (slurm/resources.yaml) and returns; run the same
command with ``--collect-only`` (or add ``--wait``) to gather results. Every cell's config and
data paths are validated before anything is submitted (``--dry-run`` stops there).
``--preflight-dist`` first checks the distributed layout with a short job on the grid's tier(s);
``--status`` shows where every planned run stands (finished, running, failed with its log...).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from ablations.grid import MATRIX_FILE, expand, grid_plan, launch_table, plan_table, show_configs
from model.config.loader import ConfigError
from model.engine.run_io import FAILED, read_run
from slurm.spec import RunSpec

log = logging.getLogger("run_grid")
REPO = Path(__file__).resolve().parents[1]


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a count of seeds or jobs)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python ablations/run_grid.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--matrix", type=Path, default=MATRIX_FILE, help="the ablation matrix YAML")
    p.add_argument("--cluster", choices=("local", "debug", "slurm"), default="local",
                   help="where jobs run; never auto-detected (default: local)")
    p.add_argument("--preset", choices=("tiny", "base"), default="tiny")
    p.add_argument("--only", nargs="+", default=[], metavar="CELL", help="run only these cells")
    p.add_argument("--seeds", type=_positive_int, default=None,
                   help="number of seeds (0..N-1); default: 1 for tiny (the 20-minute budget), "
                   "the matrix's for base")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="config override applied to every cell (repeatable)")
    p.add_argument("--max-parallel", type=_positive_int, default=None,
                   help="jobs running at once (local default 2; SLURM array parallelism)")
    p.add_argument("--tier", default=None, help="resource tier for every cell (default: the "
                   "matrix's; 'cpu' for the tiny preset)")
    p.add_argument("--runs-root", type=Path, default=Path("runs"), help="run directories root")
    p.add_argument("--results-out", type=Path, default=REPO / "results",
                   help="where tables and plots are regenerated")
    p.add_argument("--dry-run", action="store_true",
                   help="validate every cell and data path, print the plan, run nothing")
    p.add_argument("--wait", action="store_true", help="SLURM: wait for the jobs to finish")
    p.add_argument("--collect-only", action="store_true",
                   help="submit nothing; regenerate results/ from the run directories")
    p.add_argument("--no-preflight", action="store_true",
                   help="skip opening every image file (annotation files are still checked)")
    p.add_argument("--status", action="store_true",
                   help="print the state of every planned run (run directories, submitit "
                   "logs, sacct) and exit")
    p.add_argument("--force", action="store_true",
                   help="submit runs even when a job for them still looks alive (queued or "
                   "running) - a run directory still never gets two trainers at once")
    p.add_argument("--replace", action="store_true",
                   help="merge the results into the grid's raw summary even when its rows "
                   "were trained under another grid recipe (default: a recipe of its own "
                   "goes to results/raw/<grid>--<what differs>.jsonl and its own tables)")
    p.add_argument("--show-config", metavar="CELL",
                   help="print CELL's resolved config (with --set applied) and exit")
    p.add_argument("--diff-config", nargs=2, metavar=("CELL_A", "CELL_B"),
                   help="print the keys whose values differ between two cells and exit")
    p.add_argument("--preflight-dist", action="store_true",
                   help="run a short job per resource tier that checks the distributed layout "
                   "(ranks, devices, rendezvous, collectives); exit 1 if any check fails")
    return p.parse_args(argv)


def check_data(specs: Sequence[RunSpec], decode_sample: int | None) -> list[str]:
    """Data paths of every distinct data config (synthetic data is generated, so skipped)."""
    from model.data.preflight import preflight
    from model.pretrained import unavailable_sources

    errors, seen = [], set()
    for s in specs:
        d, m = s.config.data, s.config.model
        sources = unavailable_sources(m.text.init, m.vision.init,
                                      None if d.kind == "synthetic" else d.tokenizer,
                                      m.allow_download)
        errors += [f"cell '{s.cell}': {p}" for p in sources
                   if f"cell '{s.cell}': {p}" not in errors]
        errors += [f"cell '{s.cell}': {p}" for p in check_vocab(s.config)
                   if f"cell '{s.cell}': {p}" not in errors]
        key = (d.kind, d.train_files, d.image_root, d.eval_file, d.format, d.shards.index)
        if d.kind == "synthetic" or key in seen:
            continue
        seen.add(key)
        if d.format == "shards":
            errors += [f"cell '{s.cell}': {e}" for e in
                       check_shards(d.shards.index, d.shards.allow_pipe, decode_sample != 0)]
        files = [Path(f) for f in d.train_files] + ([Path(d.eval_file)] if d.eval_file else [])
        missing = [f for f in files if not f.is_file()]
        errors += [f"cell '{s.cell}': data file not found: {f} (data.train_files / "
                   f"data.eval_file)" for f in missing]
        if not Path(d.image_root).is_dir():
            errors.append(f"cell '{s.cell}': data.image_root is not a directory: {d.image_root}")
        if not missing and Path(d.image_root).is_dir():
            report = preflight(files, Path(d.image_root), sample=decode_sample,
                               decode=decode_sample != 0)
            if not report.ok:
                errors.append(f"cell '{s.cell}': data preflight failed:\n{report.to_markdown()}")
    return errors


def check_vocab(cfg) -> list[str]:
    """A set model.text.vocab_size must equal the tokenizer's (MLM draws token ids from it)."""
    from model.engine.data import tokenizer_vocab_size

    wanted = cfg.model.text.vocab_size
    if wanted is None:
        return []
    have = tokenizer_vocab_size(cfg)
    if have is None and cfg.data.kind == "synthetic":
        return [f"model.text.vocab_size={wanted}: data.kind=synthetic builds its vocabulary "
                f"when the data is generated, so the size cannot be checked yet; set "
                f"model.text.vocab_size=null to follow the tokenizer (the tiny preset does)"]
    if have is not None and have != wanted:
        return [f"model.text.vocab_size={wanted} but the tokenizer ({cfg.data.tokenizer}) has "
                f"{have} tokens; set it to {have} or null (follow the tokenizer)"]
    return []


def check_shards(index: str, allow_pipe: bool = False, count: bool = True) -> list[str]:
    """The shard index parses (``pipe:`` commands only when allowed, and then listed), every
    local shard it lists exists and, with ``count``, its tar headers hold the number of
    samples the index claims (members counted, nothing decoded; remote shards are opened by
    the job)."""
    from model.data.shards import PIPE, ShardError, is_local, read_shard_index, tar_sample_count

    try:
        shards = read_shard_index(index, allow_pipe)
    except ShardError as err:
        return [str(err)]
    commands = [u for u in shards.urls if u.startswith(PIPE)]
    if commands:
        print(f"shard index {index}: {len(commands)} shell command(s) every node will run "
              f"(data.shards.allow_pipe=true), e.g. {commands[0][len(PIPE):]!r}")
    local = [(u, n) for u, n in zip(shards.urls, shards.counts, strict=True) if is_local(u)]
    missing = [u for u, _ in local if not Path(u).is_file()]
    if missing:
        return [f"shard index {index}: {len(missing)} of {len(shards.urls)} shards not found, "
                f"e.g. {missing[0]}"]
    errors = []
    for url, claimed in local if count else []:
        try:
            held = tar_sample_count(url)
        except ShardError as err:
            errors.append(f"shard index {index}: {err}")
            continue
        if held != claimed:
            errors.append(f"shard index {index}: {url} holds {held} sample(s) but the index "
                          f"says {claimed} (nsamples); rebuild the index with python -m "
                          f"model.cli.prepare shard-index")
    return errors


def check_outputs(args: argparse.Namespace, specs: Sequence[RunSpec]) -> list[str]:
    """Where runs and results go must be writable directories, and no run folder may hold a
    symlink where the harness writes its files (model/safe_paths.py)."""
    from model.engine.run_io import WRITTEN
    from model.safe_paths import output_dir_problem, symlinks_in

    errors = [f"{flag} {path}: {problem}" for flag, path in
              (("--runs-root", args.runs_root), ("--results-out", args.results_out))
              if (problem := output_dir_problem(path)) is not None]
    for s in specs:
        planted = symlinks_in(s.run_dir, WRITTEN) if s.run_dir.is_dir() else []
        if planted:
            errors.append(f"run folder {s.run_dir}: {', '.join(planted)} is a symlink; the "
                          f"harness writes these files itself and never through links: remove "
                          f"them")
    return errors


def check_tiers(specs: Sequence[RunSpec], override: str | None) -> list[str]:
    """Every resource tier the plan uses (and its SOFTMASK_SLURM_* overrides) must load."""
    from slurm.resources import load_tier

    errors = []
    for name in sorted({s.tier for s in specs} | ({override} if override else set())):
        try:
            load_tier(name)
        except ConfigError as exc:
            errors += [str(e) for e in exc.errors]
    return errors


def check_slurm() -> list[str]:
    """The SLURM client works from here: ``scontrol ping`` reaches a controller (it reads the
    same configuration sbatch would: SLURM_CONF, /etc/slurm, or DNS for configless setups)."""
    import shutil
    import subprocess

    if shutil.which("sbatch") is None or shutil.which("scontrol") is None:
        return ["--cluster slurm: sbatch / scontrol are not on PATH (no SLURM client here)"]
    conf = os.environ.get("SLURM_CONF")
    hint = (f"SLURM_CONF={conf}" if conf else "SLURM_CONF is not set")
    try:
        proc = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return [f"--cluster slurm: `scontrol ping` did not answer within 30 s ({hint})"]
    if proc.returncode == 0 and "UP" in proc.stdout:
        return []
    detail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    return [f"--cluster slurm: no SLURM controller reachable ({hint}; scontrol ping: "
            f"{detail[0]}); export SLURM_CONF=/path/to/slurm.conf or run on a login node"]


def _run_local(todo: list[RunSpec], args: argparse.Namespace, tier_name: str) -> int:
    from slurm.launch import run_local
    from slurm.resources import load_tier
    from slurm.status import failure_tail

    parallel = args.max_parallel or 2
    failures = 0
    bar = tqdm(total=len(todo), desc="grid", unit="run", dynamic_ncols=True)

    def on_done(sub, exc):
        nonlocal failures
        bar.update(1)
        verdict = read_run(sub.spec.run_dir)
        if verdict.status == "diverged":
            # The guard's one line (step, term, lr, checkpoint), not a traceback tail.
            failures += 1
            tqdm.write(f"DIVERGED {sub.spec.run_id}: {verdict.detail}")
        elif exc is not None or verdict.status != "done":
            failures += 1
            run_dir = sub.spec.run_dir
            # The FAILED marker's tail and the job log's: the same view as ``--status``.
            detail = failure_tail(run_dir.parent, run_dir, str(sub.job.job_id))
            if exc is not None and not (run_dir / FAILED).exists():
                detail = f"{type(exc).__name__}: {exc}\n{detail}"
            tqdm.write(f"FAILED {sub.spec.run_id}:\n{detail}")
        else:
            tqdm.write(f"done   {sub.spec.run_id}")

    run_local(todo, args.cluster, parallel, load_tier(tier_name), on_done)
    bar.close()
    return failures


def _submit_slurm(todo: list[RunSpec], args: argparse.Namespace) -> int:
    from slurm.launch import submit_slurm
    from slurm.resources import load_tier

    override = load_tier(args.tier) if args.tier else None
    subs = submit_slurm(todo, args.max_parallel, override)
    for s in subs:
        print(f"submitted {s.spec.run_id} as job {s.job.job_id}")
    if not args.wait:
        print("jobs are queued; run again with --collect-only (or --wait) to gather results")
        return 0
    import submitit

    failures = 0
    for job in tqdm(submitit.helpers.as_completed([s.job for s in subs]), total=len(subs),
                    desc="grid"):
        if job.exception() is not None:
            failures += 1
    return failures


def alive_runs(specs: Sequence[RunSpec]) -> dict[str, str]:
    """Runs that something is working on now: a trainer holding the run's lock, or a queued /
    running job in the grid's submissions that the scheduler (or the local pid) confirms."""
    from model.engine.run_lock import lock_holder
    from slurm.launch import grid_folder
    from slurm.status import grid_status, queued_jobs

    alive = {s.run_id: f"trained by {holder}" for s in specs
             if (holder := lock_holder(s.run_dir)) is not None}
    status = grid_status(grid_folder(specs), specs=specs)
    for row in status.itertuples():
        if row.scheduler and row.state in ("running", "pending", "requeued"):
            alive.setdefault(row.run_id, f"job {row.job_id} is {row.scheduler}")
    # Just-submitted jobs may not be in the accounting yet: the live queue has them.
    # A planned run never submitted has no job id (NaN in the frame, which is truthy).
    unsure = {r.job_id: r.run_id for r in status.itertuples()
              if isinstance(r.job_id, str) and r.job_id and r.run_id not in alive
              and r.state != "finished"}
    for job_id in queued_jobs(list(unsure)):
        alive.setdefault(unsure[job_id], f"job {job_id} is in the SLURM queue")
    return alive


def _print_status(specs: list[RunSpec]) -> int:
    from slurm.launch import grid_folder
    from slurm.status import format_status, grid_status

    print(format_status(grid_status(grid_folder(specs), specs=specs)))
    return 0


def _preflight_dist(specs: list[RunSpec], cluster: str) -> int:
    """One preflight job per tier used by the planned runs, through the grid's executor."""
    from slurm.dist_preflight import check_report, submit_preflight
    from slurm.launch import grid_folder
    from slurm.resources import load_tier

    # The debug executor runs one task in-process: the local executor has real processes.
    cluster = "local" if cluster == "debug" else cluster
    passed = True
    for tier_name in sorted({s.tier for s in specs}):
        tier = load_tier(tier_name)
        print(f"\npreflight: tier {tier_name}, {tier.world_size} rank(s), cluster {cluster}")
        results = submit_preflight(cluster, grid_folder(specs) / ".preflight", tier,
                                   f"{specs[0].grid}:preflight:{tier_name}",
                                   on_submit=lambda job: print(f"job {job.job_id}"))
        ok, report = check_report(results, tier.world_size)
        print(report)
        passed = passed and ok
    return 0 if passed else 1


def regenerate_results(args: argparse.Namespace, specs: list[RunSpec]) -> int:
    """Tables of the planned seeds and recipe: runs of other seeds in the same runs root (e.g.
    an earlier ``--seeds 3``) do not leak into a one-seed table, and vice versa; runs of
    another grid recipe are never compared with this one's (results/raw_files.py)."""
    from results.__main__ import parse_args as results_args
    from results.__main__ import run as results_run

    out = args.results_out
    seeds = [str(s) for s in sorted({spec.seed for spec in specs})]
    argv = ["--runs", str(args.runs_root), "--grid", specs[0].grid, "--out",
            str(out / "generated"), "--raw-dir", str(out / "raw"), "--preset", args.preset,
            "--seeds", *seeds] + (["--replace"] if args.replace else [])
    return results_run(results_args(argv), plan=grid_plan(specs))


def plan(args: argparse.Namespace) -> tuple[list[RunSpec], list[str]]:
    """The planned runs with their tier, and every problem found before anything is submitted
    (data, weights, tokenizer, tiers, the SLURM client)."""
    seeds = range(args.seeds) if args.seeds is not None else (range(1) if args.preset == "tiny"
                                                             else None)
    specs = expand(args.matrix, args.preset, seeds, args.only, list(args.sets), args.runs_root,
                   tier=args.tier)
    skip_data = args.collect_only or args.status or args.preflight_dist
    errors = check_outputs(args, specs)
    errors += [] if skip_data else check_data(specs, None if not args.no_preflight else 0)
    # Every tier of the plan must load: its world size is part of the runs' identity.
    errors += check_tiers(specs, args.tier)
    if args.cluster == "slurm" and not (args.collect_only or args.status):
        errors += check_slurm()
    return specs, errors


def _execute(todo: list[RunSpec], specs: list[RunSpec], args: argparse.Namespace
             ) -> int | None:
    """Run (locally) or submit (SLURM) ``todo``; the failure count, None if submitted and not
    waited for."""
    t0 = time.time()
    print(f"\n{len(todo)} runs to do ({len(specs) - len(todo)} already done)")
    if args.cluster == "slurm":
        failures = _submit_slurm(todo, args)
        if not args.wait:
            return None
    else:
        failures = _run_local(todo, args, todo[0].tier)
    print(f"grid finished in {time.time() - t0:.0f} s with {failures} failed run(s)")
    return failures


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        specs, errors = plan(args)
    except ConfigError as exc:
        print(f"error: invalid grid configuration:\n{exc}", file=sys.stderr)
        return 2
    if errors:
        print("error: checks failed, nothing was submitted:\n" + "\n".join(errors),
              file=sys.stderr)
        return 2
    if args.show_config or args.diff_config:
        return show_configs(specs, args.show_config, args.diff_config)
    if args.status:
        return _print_status(specs)
    if args.preflight_dist:
        return _preflight_dist(specs, args.cluster)
    print(plan_table(specs).drop(columns=["run_dir"]).to_markdown(index=False))
    print("\n" + launch_table(specs).to_markdown(index=False))
    if args.dry_run:
        print(f"\ndry run: {len(specs)} runs validated, nothing submitted")
        return 0
    todo = [s for s in specs if not read_run(s.run_dir).finished]
    if todo and not args.collect_only and not args.force:
        alive = alive_runs(todo)
        for run_id, why in alive.items():
            print(f"skipping {run_id}: {why} (--force submits it anyway)")
        todo = [s for s in todo if s.run_id not in alive]
        if alive and not todo and args.cluster == "slurm" and not args.wait:
            print("nothing to submit: the remaining runs are queued or running; run again "
                  "with --collect-only (or --wait) to gather results")
            return 0
    failures = 0
    if todo and not args.collect_only:
        failures = _execute(todo, specs, args)
        if failures is None:
            return 0
    rc = regenerate_results(args, specs)
    return 1 if (failures or rc) else 0

if __name__ == "__main__":
    sys.exit(main())
