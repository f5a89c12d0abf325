"""Before/after speed check of a change to ``lightning_mtl``: the benchmarks' ratios under two code versions.

"Before" is a git revision (``--before``, default ``HEAD``), exported with ``git archive REV | tar -x``
into a temporary directory outside the repository. "After" is the working tree (default) or another
exported revision (``--after REV``). Each benchmark command is run as a subprocess, alternately
under the two versions (before, after, before, after, ... for ``--pairs`` pairs; ``--order abba``
swaps the order in every other pair), never more than one process at a time. Only the package
differs between the two runs of a pair: the benchmark *script* is always the after tree's (``--scripts own``:
each version's own copy, for when the after script needs the new package), and ``lightning_mtl`` is
imported from the before tree or the after tree:

- the subprocess runs with ``PYTHONPATH=<tree>`` and a ``python -c`` bootstrap that puts ``<tree>``
  first on ``sys.path`` (right after the script's own directory, as ``python script.py`` would),
  removes setuptools' editable-install finder (``__editable__..._finder``) from ``sys.meta_path``, and,
  before handing over to the script with ``runpy``, checks that ``lightning_mtl`` comes from
  ``<tree>``; when the script ends it checks every loaded ``lightning_mtl*`` module again;
- a preflight subprocess per version prints where ``lightning_mtl`` is imported from (and fails
  early if the after tree does not import, e.g. in the middle of a refactor);
- glibc's allocator is pinned with ``MALLOC_MMAP_THRESHOLD_=4294967295 MALLOC_TRIM_THRESHOLD_=4294967295``
  (see ``balancers.py``: otherwise parameter-mode ratios depend on what ran before).

Parsed from each run: ``balancers.py``'s "ratio to static" column per workload/K/balancer/mode (the
per-run median over rounds of the per-round ratio), and ``overhead.py``'s "model vs bare" figure
(``model: MultiTaskModule / hand-written (bare) = 1.047x``). ``--all-ratios`` adds balancers.py's
"ratio without it" and "ours / torchjd" columns and overhead.py's "same logging", round-robin and
temperature data-loader ratios. Reported: one markdown table with the median over pairs of each
ratio before and after, ``after/before - 1`` in percent, and whether it lies within ``--tolerance``
(default ±2 %), with the per-pair values; and a header with the machine, versions, date, load average.

Resolution: balancers.py prints ratios with two decimals, so near 1.0× one printed step is ~1 %
(and ~0.6 % near 1.7×): a ±2 % verdict on those rows is a verdict on at most two printed steps.
overhead.py prints three decimals.

Exit status: 0 if every parsed ratio is within the tolerance, 1 if one is not (or is missing on
one side), 2 if a run failed.

    # the real comparison (HEAD against the working tree, both default benchmarks, 3 pairs)
    python benchmarks/compare_revisions.py --pairs 3
    # a quick check that the tool works (small settings; compare two revisions)
    python benchmarks/compare_revisions.py --pairs 1 --after HEAD \\
        --benchmark "benchmarks/balancers.py --rounds 1 --steps 5 --workloads mlp-k2 --balancers uw,upgrad" \\
        --benchmark "benchmarks/overhead.py --rounds 1 --steps 10"
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = "lightning_mtl"
DEFAULT_BENCHMARKS = (
    "benchmarks/balancers.py --rounds 3 --steps 30 --workloads mlp-k2 --balancers uw,famo,upgrad,mgda,pcgrad,imtlg",
    "benchmarks/overhead.py --rounds 3 --steps 150",
)
ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": "4294967295", "MALLOC_TRIM_THRESHOLD_": "4294967295"}

# Run inside each benchmark subprocess as ``python -c BOOTSTRAP TREE SCRIPT ARGS...``.
BOOTSTRAP = r"""
import os, runpy, sys
tree, script = os.path.realpath(sys.argv[1]), os.path.realpath(sys.argv[2])
sys.argv = [script] + sys.argv[3:]
# As `python script.py` with PYTHONPATH=tree would have it: the script's directory, then the tree.
sys.path[:] = [os.path.dirname(script), tree] + [p for p in sys.path[1:] if p and os.path.realpath(p) != tree]
# The editable install's finder maps lightning_mtl to the repository; it must never answer.
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
def check(where):
    bad = {name: getattr(module, "__file__", None) for name, module in list(sys.modules.items())
           if (name == "lightning_mtl" or name.startswith("lightning_mtl."))
           and not os.path.realpath(getattr(module, "__file__", None) or "/").startswith(tree + os.sep)}
    if bad:
        sys.stderr.write(f"compare_revisions: lightning_mtl modules not from {tree} ({where}): {bad}\n")
        sys.exit(97)
import lightning_mtl
check("before the script")
print(f"# compare_revisions: lightning_mtl from {os.path.dirname(os.path.realpath(lightning_mtl.__file__))}", flush=True)
if script.endswith("__preflight__"):
    import importlib, pkgutil
    for info in pkgutil.walk_packages(lightning_mtl.__path__, "lightning_mtl."):
        if info.name.rsplit(".", 1)[-1] in ("__main__", "cli"):
            continue
        try:
            importlib.import_module(info.name)
        except ModuleNotFoundError as error:  # an optional third-party dependency (wandb, cvxpy, ...)
            if (error.name or "").split(".")[0] == "lightning_mtl":
                raise
    check("after importing every submodule")
    import torch, lightning
    print(f"# compare_revisions: preflight ok | torch {torch.__version__} | lightning {lightning.__version__} | "
          f"torch threads {torch.get_num_threads()}", flush=True)
    sys.exit(0)
try:
    runpy.run_path(script, run_name="__main__")
finally:
    check("after the script")
"""


@dataclass
class Tree:
    """One code version: a directory holding ``lightning_mtl/`` (and the benchmarks)."""

    label: str  # "before" / "after"
    description: str
    path: Path
    package_digest: str = ""


@dataclass
class Run:
    benchmark: str
    tree: str
    pair: int
    seconds: float
    load_before: str
    load_after: str
    values: dict[str, float] = field(default_factory=dict)


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], check=True, capture_output=True, text=True).stdout.strip()


def export(revision: str, workdir: Path, label: str) -> Tree:
    sha = git("rev-parse", "--verify", f"{revision}^{{commit}}")
    target = workdir / label
    target.mkdir()
    archive = subprocess.Popen(["git", "-C", str(REPO), "archive", "--format=tar", sha], stdout=subprocess.PIPE)
    tar = subprocess.run(["tar", "-x", "-C", str(target)], stdin=archive.stdout)
    archive.stdout.close()
    if archive.wait() != 0 or tar.returncode != 0:
        raise SystemExit(f"git archive {revision} | tar -x -C {target} failed")
    subject = git("log", "-1", "--format=%s", sha)
    return Tree(label, f"{revision} = {sha[:10]} ({subject[:70]}{'…' if len(subject) > 70 else ''})", target)


def working_tree(workdir: Path, snapshot: bool) -> Tree:
    head = git("rev-parse", "HEAD")[:10]
    changed = git("status", "--porcelain", "--untracked-files=all", "--", PACKAGE).splitlines()
    state = f"{len(changed)} changed/untracked file(s) under {PACKAGE}/" if changed else f"no changes under {PACKAGE}/"
    if not snapshot:
        return Tree("after", f"working tree {REPO} (HEAD {head}, {state})", REPO)
    target = workdir / "after"
    target.mkdir()
    shutil.copytree(REPO / PACKAGE, target / PACKAGE, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "benchmarks", target / "benchmarks", ignore=shutil.ignore_patterns("__pycache__"))
    return Tree("after", f"snapshot of the working tree taken at start (HEAD {head}, {state})", target)


def package_digest(root: Path) -> str:
    """Hash of the package's source files: tells identical trees apart and catches edits during the runs."""
    digest = hashlib.sha256()
    for path in sorted((root / PACKAGE).rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix in (".py", ".typed", ".json", ".yaml"):
            digest.update(str(path.relative_to(root)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def environment(tree: Tree) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONSTARTUP", "PYTHONHOME")}
    env.update(ALLOCATOR)
    env["PYTHONPATH"] = str(tree.path)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def command(tree: Tree, script: Path, args: list[str]) -> list[str]:
    return [sys.executable, "-c", BOOTSTRAP, str(tree.path), str(script), *args]


def load() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def preflight(tree: Tree) -> str:
    done = subprocess.run(
        command(tree, tree.path / "__preflight__", []), env=environment(tree), cwd=REPO, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(
            f"preflight failed for {tree.label} ({tree.description}): exit {done.returncode}\n"
            f"{(done.stdout + done.stderr)[-4000:]}\n"
            "(if the working tree is mid-change, compare two revisions with --after REV)"
        )
    return "\n".join(line for line in done.stdout.splitlines() if line.startswith("# compare_revisions"))


# ---------------------------------------------------------------------------------------------------------------
# Parsing


def cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def number(text: str) -> float | None:
    match = re.match(r"^\s*([0-9]*\.?[0-9]+)\s*[×x]?\s*$", text)
    return float(match.group(1)) if match else None


# (column holding the ratio, columns naming the configuration, label of the ratio or "" for the main one)
BALANCER_COLUMNS = {
    "ratio to static": (("workload", "K", "balancer", "mode"), "ratio to static", True),
    "ratio without it": (("workload", "K", "balancer", "mode"), "ratio without own call", False),
    "ours / torchjd": (("workload", "K", "balancer", "ours", "torchjd"), "ours / torchjd", False),
}


def parse_tables(output: str, all_ratios: bool) -> dict[str, float]:
    """Every markdown table row of balancers.py-style output, keyed by its configuration."""
    values: dict[str, float] = {}
    header: list[str] | None = None
    for line in output.splitlines():
        if not line.startswith("|"):
            header = None
            continue
        row = cells(line)
        if header is None:
            header = row
            continue
        if all(set(cell) <= set("-: ") for cell in row):
            continue
        if len(row) != len(header):
            continue
        for column, (keys, label, main) in BALANCER_COLUMNS.items():
            if column not in header or not all(key in header for key in keys) or not (main or all_ratios):
                continue
            value = number(row[header.index(column)])
            if value is None:
                continue
            named = {key: row[header.index(key)] for key in keys}
            if named["balancer"] == "Static":  # the reference itself: 1.00x by definition
                continue
            if "ours" in named:
                name = f"{named['workload']} K={named['K']} {named['balancer']} {named['ours']} vs torchjd {named['torchjd']}"
            else:
                name = f"{named['workload']} K={named['K']} {named['balancer']} {named['mode']}"
            values[f"{name}: {label}"] = value
    return values


OVERHEAD_PATTERNS = {
    "model vs bare": (r"model: MultiTaskModule / hand-written \(bare\) = ([0-9.]+)x", True),
    "model vs same logging": (r"/ hand-written \(same logging\) = ([0-9.]+)x", False),
    "data: round_robin vs plain": (r"data: round_robin / plain DataLoader = ([0-9.]+)x", False),
    "data: temperature vs plain": (r"temperature / plain = ([0-9.]+)x", False),
}


def parse_overhead(output: str, all_ratios: bool) -> dict[str, float]:
    values = {}
    for label, (pattern, main) in OVERHEAD_PATTERNS.items():
        match = re.search(pattern, output)
        if match and (main or all_ratios):
            values[label] = float(match.group(1))
    return values


def parse(output: str, all_ratios: bool) -> dict[str, float]:
    return parse_tables(output, all_ratios) | parse_overhead(output, all_ratios)


# ---------------------------------------------------------------------------------------------------------------


def versions() -> str:
    found = []
    for name in ("torch", "lightning", "torchmetrics", "torchjd"):
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{name} (not installed)")
    return f"python {platform.python_version()} | " + " | ".join(found)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def report(
    benchmarks: list[tuple[str, list[str]]], runs: list[Run], tolerance: float, header: list[str]
) -> tuple[int, int]:
    print("\n".join(header))
    print()
    print(
        "| benchmark | configuration | before (median) | after (median) | after/before − 1 | "
        f"within ±{tolerance:g}% | before, per pair | after, per pair |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    within = total = 0
    for name, _ in benchmarks:
        mine = [run for run in runs if run.benchmark == name]
        keys: list[str] = []
        for run in mine:
            keys += [key for key in run.values if key not in keys]
        for key in keys:
            per = {
                side: [run.values[key] for run in sorted(mine, key=lambda r: r.pair) if run.tree == side and key in run.values]
                for side in ("before", "after")
            }
            total += 1
            if not per["before"] or not per["after"]:
                print(f"| {name} | {key} | {'—' if not per['before'] else ''} | {'—' if not per['after'] else ''} | | missing | | |")
                continue
            before, after = statistics.median(per["before"]), statistics.median(per["after"])
            change = (after / before - 1) * 100
            ok = abs(change) <= tolerance
            within += ok
            print(
                f"| {name} | {key} | {before:.3f}× | {after:.3f}× | {change:+.1f}% | {'yes' if ok else '**NO**'} | "
                f"{' '.join(f'{v:g}' for v in per['before'])} | {' '.join(f'{v:g}' for v in per['after'])} |"
            )
    return within, total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default="HEAD", help="git revision for 'before' (default HEAD)")
    parser.add_argument(
        "--after", default=None, help="git revision for 'after' (default: the working tree, imported in place)"
    )
    parser.add_argument("--pairs", type=int, default=3, help="before/after pairs per benchmark (default 3)")
    parser.add_argument(
        "--benchmark",
        action="append",
        metavar="'SCRIPT ARGS'",
        help="benchmark command, a script path relative to the after tree plus its arguments; repeatable "
        f"(default: {' and '.join(repr(b) for b in DEFAULT_BENCHMARKS)})",
    )
    parser.add_argument("--order", choices=("ab", "abba"), default="ab", help="ab: before first in every pair; abba: alternate")
    parser.add_argument(
        "--scripts",
        choices=("after", "own"),
        default="after",
        help="after: both versions run the after tree's benchmark script (only the package differs); own: each "
        "version runs its own copy (when the after tree's script needs the new package, e.g. private names)",
    )
    parser.add_argument("--tolerance", type=float, default=2.0, help="allowed |after/before - 1| in percent (default 2)")
    parser.add_argument("--all-ratios", action="store_true", help="also compare the secondary ratio columns")
    parser.add_argument(
        "--snapshot-after",
        action="store_true",
        help="copy the working tree's package at start and time that copy (the working tree may change meanwhile)",
    )
    parser.add_argument("--log-dir", type=Path, default=None, help="save every run's full output here")
    parser.add_argument("--keep", action="store_true", help="keep the exported trees (printed path)")
    args = parser.parse_args()
    if args.pairs < 1:
        parser.error("--pairs must be at least 1")
    benchmarks = []
    for text in args.benchmark or DEFAULT_BENCHMARKS:
        script, *script_args = shlex.split(text)
        benchmarks.append((Path(script).name.removesuffix(".py"), [script, *script_args]))

    workdir = Path(tempfile.mkdtemp(prefix="lightning-mtl-compare-"))
    if workdir.resolve().is_relative_to(REPO):
        raise SystemExit(f"temporary directory {workdir} lies inside the repository; set TMPDIR elsewhere")
    if args.log_dir is not None:
        args.log_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    start_load = load()
    date = datetime.now(timezone.utc).isoformat(timespec="seconds")
    runs: list[Run] = []
    try:
        trees = {
            "before": export(args.before, workdir, "before"),
            "after": export(args.after, workdir, "after") if args.after else working_tree(workdir, args.snapshot_after),
        }
        for tree in trees.values():
            tree.package_digest = package_digest(tree.path)
        for _, (script, *_) in benchmarks:
            for label in ("before", "after") if args.scripts == "own" else ("after",):
                if not (trees[label].path / script).is_file():
                    raise SystemExit(f"no benchmark script {script} in the {label} tree {trees[label].path}")
        imports = {}
        for label, tree in trees.items():
            imports[label] = preflight(tree)
            print(f"[preflight {label}] {imports[label]}", file=sys.stderr, flush=True)

        for pair in range(1, args.pairs + 1):
            order = ["before", "after"] if args.order == "ab" or pair % 2 else ["after", "before"]
            for name, (script, *script_args) in benchmarks:
                for label in order:
                    tree = trees[label]
                    if label == "after" and args.after is None and not args.snapshot_after:
                        now = package_digest(tree.path)
                        if now != tree.package_digest:
                            print(
                                f"WARNING: the working tree's {PACKAGE}/ changed since the start "
                                f"({tree.package_digest} -> {now}); use --snapshot-after to pin it",
                                file=sys.stderr,
                            )
                            tree.description += f"; CHANGED during the runs ({tree.package_digest} -> {now})"
                            tree.package_digest = now
                    load_before = load()
                    t0 = time.perf_counter()
                    done = subprocess.run(
                        command(tree, trees[label if args.scripts == "own" else "after"].path / script, script_args),
                        env=environment(tree),
                        cwd=REPO,
                        capture_output=True,
                        text=True,
                    )
                    seconds = time.perf_counter() - t0
                    output = done.stdout + ("\n[stderr]\n" + done.stderr if done.stderr else "")
                    if args.log_dir is not None:
                        (args.log_dir / f"pair{pair}-{name}-{label}.log").write_text(output)
                    if done.returncode != 0:
                        print(output[-4000:], file=sys.stderr)
                        print(f"{name} under {label} failed (exit {done.returncode})", file=sys.stderr)
                        return 2
                    expected = f"# compare_revisions: lightning_mtl from {tree.path.resolve() / PACKAGE}"
                    if expected not in done.stdout:
                        print(f"{name} under {label}: the import check line is missing ({expected!r})", file=sys.stderr)
                        return 2
                    values = parse(done.stdout, args.all_ratios)
                    if not values:
                        print(done.stdout[-4000:], file=sys.stderr)
                        print(f"{name} under {label}: no ratios found in its output", file=sys.stderr)
                        return 2
                    runs.append(Run(name, label, pair, seconds, load_before, load(), values))
                    print(
                        f"[pair {pair}/{args.pairs}] {name} {label}: {seconds:.0f} s, {len(values)} ratios, "
                        f"load {load_before} -> {load()}",
                        file=sys.stderr,
                        flush=True,
                    )

        elapsed = time.perf_counter() - started
        per_benchmark = "; ".join(
            f"{name} {statistics.median([r.seconds for r in runs if r.benchmark == name]):.0f} s/run"
            for name, _ in benchmarks
        )
        run_loads = [float(run.load_before.split()[0]) for run in runs]
        same = trees["before"].package_digest == trees["after"].package_digest
        header = [
            f"# lightning-mtl before/after benchmark comparison — {date}",
            f"# {platform.platform()} | {cpu_model()} | {os.cpu_count()} CPUs",
            f"# {versions()}",
            f"# load average (1, 5, 15 min): start {start_load}, end {load()}; 1-min load at the runs' starts "
            f"{min(run_loads):.2f}–{max(run_loads):.2f}",
        ] + (
            [
                f"# WARNING: 1-min load up to {max(run_loads):.2f} on {os.cpu_count()} CPUs at a run's start: other "
                "processes competed with the benchmarks (a benchmark alone keeps it near its thread count); "
                "the ratios are not reliable at ±2 %. Rerun on an idle machine."
            ]
            if max(run_loads) > (os.cpu_count() or 1) + 0.5
            else []
        ) + [
            f"# allocator: {', '.join(f'{k}={v}' for k, v in ALLOCATOR.items())}",
            f"# before: {trees['before'].description} [{PACKAGE}/ digest {trees['before'].package_digest}]",
            f"# after:  {trees['after'].description} [{PACKAGE}/ digest {trees['after'].package_digest}]"
            + (" — IDENTICAL package sources" if same else ""),
            f"# imports: before {imports['before'].splitlines()[0].split(' from ')[-1]}, "
            f"after {imports['after'].splitlines()[0].split(' from ')[-1]}",
            f"# {args.pairs} pair(s), order {args.order}, run one at a time; "
            f"{'each version runs its own script' if args.scripts == 'own' else 'script from the after tree'}; "
            f"total {elapsed:.0f} s ({per_benchmark})",
        ] + [f"# benchmark {name}: python {shlex.join(argv)}" for name, argv in benchmarks]
        within, total = report(benchmarks, runs, args.tolerance, header)
        print()
        print(f"{within}/{total} ratios within ±{args.tolerance:g}% (median over pairs of each run's ratio).")
        return 0 if within == total else 1
    finally:
        if args.keep:
            print(f"exported trees kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
