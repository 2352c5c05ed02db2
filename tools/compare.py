"""Compare training logs (ours or the original's) with the reference metrics.

Example:
    python tools/compare.py --logs log/ --reference reference_log/reference_metrics.csv --plot valid_ndcg.png

A log (files given directly, or every ``*.log`` under a given folder) identifies
its run by the config lines ``dataset = X``, ``train_stage = ...``, optionally
``script = runNN.sh`` and ``pretrained_file = ...``. With a ``script`` line the
reference row of that script is used; otherwise the row whose dataset is a prefix
of the log's dataset (``Scientific_mm_full`` -> ``Scientific``), with
``with_id`` = 1 for transductive_ft / 0 for inductive_ft and ``pretrained`` = 1
when ``pretrained_file`` is non-empty. Metrics come from the last
``test result (original top-K+1): OrderedDict([...])`` line when present (our
logs print the original's metric convention there), else from the last
``test result: OrderedDict([...])``. R@K = hit@K, N@K = ndcg@K.
For every run one table is printed: ours, reference, difference and relative
difference per metric. ``--plot out.png`` draws the per-epoch ``valid_score``
(validation NDCG@10) curves of all logs in one PNG (needs matplotlib).
"""

from __future__ import annotations

import argparse
import ast
import csv
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

if __package__ in (None, ""):  # run as a script: make `tools` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tqdm import tqdm

from tools._io import ToolError, atomic_open, run_main

METRICS = ("R@10", "N@10", "R@50", "N@50")
REF_COLUMNS = ["script", "dataset", "with_id", "pretrained"] + list(METRICS)
_PREFIX_RE = re.compile(
    r"^(?:[A-Z][a-z]{2} )?\d{1,2} [A-Z][a-z]{2} \d{4} \d{2}:\d{2}:\d{2}\s+[A-Z]+\s+"  # Fri 20 Oct 2023 03:18:55 INFO
    r"|^\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}:\d{2}(?:[.,]\d+)?\s+[A-Z]+\s+")              # 2023-10-20 03:18:55,123 INFO
_CONFIG_RE = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*=\s*(.*?)\s*$")
_EPOCH_RE = re.compile(r"epoch (\d+) evaluating \[.*?valid_score: ([-+0-9.eE]+|nan|inf)\]")
_RESULT_RE = re.compile(
    r"^(best valid|test result)\s*(\(original top-K\+1\))?\s*:\s*(.*)$")
_PAIR_RE = re.compile(r"\(\s*['\"]([^'\"]+)['\"]\s*,\s*(?:[A-Za-z_][\w.]*\()?\s*([-+0-9.eE]+|nan|inf)\s*\)?\s*\)")


class FormatError(ToolError):
    def __init__(self, path: str, lineno: int, msg: str):
        super().__init__(f"{path}:{lineno}: {msg}")


@dataclass
class LogRun:
    path: str
    config: Dict[str, str] = field(default_factory=dict)
    valid_curve: List[Tuple[int, float]] = field(default_factory=list)
    results: Dict[str, Dict[str, float]] = field(default_factory=dict)  # 'test', 'test_orig', 'valid', 'valid_orig'

    @property
    def dataset(self) -> str:
        return self.config.get("dataset", "")

    @property
    def stage(self) -> str:
        return self.config.get("train_stage", "")

    @property
    def script(self) -> str:
        return os.path.basename(self.config.get("script", "").strip("'\""))

    @property
    def with_id(self) -> Optional[int]:
        return {"transductive_ft": 1, "inductive_ft": 0}.get(self.stage)

    @property
    def pretrained(self) -> int:
        value = self.config.get("pretrained_file", "").strip().strip("'\"")
        return 0 if value in ("", "None", "null", "none") else 1

    @property
    def test_metrics(self) -> Tuple[Optional[Dict[str, float]], str]:
        if "test_orig" in self.results:
            return self.results["test_orig"], "test result (original top-K+1)"
        if "test" in self.results:
            return self.results["test"], "test result"
        return None, ""


def parse_metric_dict(text: str) -> Optional[Dict[str, float]]:
    """``OrderedDict([('hit@10', 0.1), ...])`` or ``{'hit@10': 0.1}`` -> dict; None if unparsable.
    Uses ast.literal_eval on the literal part (never eval), with a regex fallback for
    values such as ``np.float64(0.1)``."""
    text = text.strip()
    m = re.fullmatch(r"OrderedDict\((.*)\)", text, re.S)
    literal = m.group(1) if m else text
    try:
        value = ast.literal_eval(literal) if literal else None
        pairs = list(value.items()) if isinstance(value, dict) else list(value)
        out = {str(k).lower(): float(v) for k, v in pairs}
        if out:
            return out
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        pass
    pairs = _PAIR_RE.findall(literal)
    if pairs:
        return {k.lower(): float(v) for k, v in pairs}
    return None


def parse_log(path: str) -> LogRun:
    run = LogRun(path=path)
    try:
        with open(path, "r", encoding="utf-8", errors="replace") as fp:
            lines = fp.read().splitlines()
    except OSError as e:
        raise ToolError(f"{path}: cannot read ({e.strerror})") from None
    for lineno, raw in enumerate(lines, 1):
        msg = _PREFIX_RE.sub("", raw, count=1).strip()
        if not msg:
            continue
        m = _EPOCH_RE.search(msg)
        if m:
            run.valid_curve.append((int(m.group(1)), float(m.group(2))))
            continue
        m = _RESULT_RE.match(msg)
        if m:
            kind = "valid" if m.group(1) == "best valid" else "test"
            if m.group(2):
                kind += "_orig"
            metrics = parse_metric_dict(m.group(3))
            if metrics is None:
                raise FormatError(path, lineno, f"expected '{m.group(1)}{' ' + m.group(2) if m.group(2) else ''}"
                                                f": OrderedDict([(metric, number), ...])'")
            run.results[kind] = metrics
            continue
        m = _CONFIG_RE.match(msg)
        if m and m.group(1) in ("dataset", "train_stage", "script", "pretrained_file", "seed"):
            # keep the first occurrence of each key (the hyper-parameter block at the top)
            run.config.setdefault(m.group(1), m.group(2))
    return run


def load_reference(path: str) -> List[Dict[str, object]]:
    if not os.path.isfile(path):
        raise ToolError(f"{path}: reference file not found")
    rows = []
    with open(path, "r", encoding="utf-8", newline="") as fp:
        reader = csv.reader(fp)
        for lineno, rec in enumerate(reader, 1):
            if lineno == 1:
                if [c.strip() for c in rec] != REF_COLUMNS:
                    raise FormatError(path, 1, f"expected the header {','.join(REF_COLUMNS)}")
                continue
            if not rec or not "".join(rec).strip():
                continue
            if len(rec) != len(REF_COLUMNS):
                raise FormatError(path, lineno, f"expected {len(REF_COLUMNS)} comma-separated fields, got {len(rec)}")
            try:
                row: Dict[str, object] = {"script": rec[0].strip(), "dataset": rec[1].strip(),
                                          "with_id": int(rec[2]), "pretrained": int(rec[3])}
                for k, v in zip(METRICS, rec[4:]):
                    row[k] = float(v)
            except ValueError:
                raise FormatError(path, lineno, "expected integer with_id/pretrained and numeric metric values") from None
            rows.append(row)
    return rows


def match_reference(run: LogRun, reference: List[Dict[str, object]]) -> Optional[Dict[str, object]]:
    if run.script:
        for row in reference:
            if row["script"] == run.script:
                return row
    if run.with_id is None or not run.dataset:
        return None
    candidates = [r for r in reference
                  if (run.dataset == r["dataset"] or run.dataset.startswith(str(r["dataset"]) + "_"))
                  and r["with_id"] == run.with_id and r["pretrained"] == run.pretrained]
    candidates.sort(key=lambda r: -len(str(r["dataset"])))
    return candidates[0] if candidates else None


def ours_metrics(metrics: Dict[str, float]) -> Dict[str, Optional[float]]:
    out: Dict[str, Optional[float]] = {}
    for name in METRICS:
        k = name.split("@")[1]
        keys = (f"hit@{k}", f"recall@{k}") if name.startswith("R") else (f"ndcg@{k}",)
        out[name] = next((metrics[key] for key in keys if key in metrics), None)
    return out


def _fmt(v: Optional[float], spec: str = "{:.4f}") -> str:
    return "-" if v is None else spec.format(v)


def format_run(run: LogRun, ref: Optional[Dict[str, object]]) -> str:
    metrics, source = run.test_metrics
    ident = (f"dataset {run.dataset or '?'}, {run.stage or '?'}, pretrained {run.pretrained}"
             + (f", script {run.script}" if run.script else ""))
    refdesc = (f"{ref['script']} ({ref['dataset']}, with_id {ref['with_id']}, pretrained {ref['pretrained']})"
               if ref else "no reference row")
    lines = [f"== {run.path}", f"   {ident} -> {refdesc}"]
    if metrics is None:
        lines.append("   (no test result in this log)")
        return "\n".join(lines)
    lines.append(f"   ours from '{source}'" + (f", {len(run.valid_curve)} evaluated epochs" if run.valid_curve else ""))
    ours = ours_metrics(metrics)
    lines.append(f"   {'metric':<7}{'ours':>9}{'reference':>11}{'diff':>10}{'rel diff':>10}")
    for name in METRICS:
        o = ours[name]
        r = float(ref[name]) if ref else None
        diff = o - r if o is not None and r is not None else None
        rel = diff / r * 100 if diff is not None and r else None
        lines.append(f"   {name:<7}{_fmt(o):>9}{_fmt(r):>11}{_fmt(diff, '{:+.4f}'):>10}{_fmt(rel, '{:+.1f}%'):>10}")
    return "\n".join(lines)


def collect_logs(specs: List[str]) -> List[str]:
    paths: List[str] = []
    for spec in specs:
        if os.path.isdir(spec):
            found = []
            for root, _, files in os.walk(spec):
                found += [os.path.join(root, f) for f in files if f.endswith(".log")]
            paths += sorted(found)
        elif os.path.isfile(spec):
            paths.append(spec)
        else:
            raise ToolError(f"{spec}: no such log file or folder")
    if not paths:
        raise ToolError(f"no *.log files found in {' '.join(specs)}")
    return paths


def plot_curves(runs: List[LogRun], out: str) -> int:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ToolError("--plot needs matplotlib (pip install matplotlib, see requirements-tools.txt)") from None
    fig, ax = plt.subplots(figsize=(8, 5))
    drawn = 0
    for run in runs:
        if not run.valid_curve:
            continue
        xs, ys = zip(*run.valid_curve)
        label = f"{os.path.basename(run.path)} ({run.dataset}, {run.stage}{', pt' if run.pretrained else ''})"
        ax.plot(xs, ys, label=label, linewidth=1.2)
        drawn += 1
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation NDCG@10 (valid_score)")
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=7)
    with atomic_open(out, "wb") as fp:
        fig.savefig(fp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return drawn


def compare(logs: List[str], reference: str, plot: Optional[str] = None) -> List[Tuple[LogRun, Optional[dict]]]:
    ref_rows = load_reference(reference)
    paths = collect_logs(logs)
    runs = [parse_log(p) for p in tqdm(paths, desc="read logs", disable=len(paths) < 20)]
    out = []
    for run in runs:
        if not run.results and not run.valid_curve and not run.config:
            continue  # not a training log
        ref = match_reference(run, ref_rows)
        out.append((run, ref))
        print(format_run(run, ref))
        print()
    if not out:
        raise ToolError("none of the given files is a training log")
    if plot:
        n = plot_curves([r for r, _ in out], plot)
        print(f"plotted {n} validation curves -> {plot}")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--logs", nargs="+", required=True, help="log files or folders (searched for *.log)")
    p.add_argument("--reference", default="reference_log/reference_metrics.csv", help="reference metrics CSV")
    p.add_argument("--plot", default=None, help="write the validation NDCG@10 curves to this PNG")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    def _run(a):
        args = build_parser().parse_args(a)
        compare(args.logs, args.reference, args.plot)
        return 0
    return run_main(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
