"""Compare training logs (ours or the original's) with the reference metrics and the original's curves.

Example:
    python tools/compare.py --logs log/ reference_log/ --plot curves.png

A log (files given directly, or every ``*.log`` under a given folder) identifies
its run by the config lines ``dataset = X`` (the original's logs: the last part of
``data_path``), ``train_stage = ...``, optionally ``script = runNN.sh`` and
``pretrained_file = ...`` (the original's: a ``Loading from X`` line). With a
``script`` line the reference row of that script is used; otherwise the row whose
dataset is a prefix of the log's dataset (``Scientific_mm_full`` -> ``Scientific``),
with ``with_id`` = 1 for transductive_ft / 0 for inductive_ft and ``pretrained`` = 1
when a pretrained file is named. Metrics come from the last
``test result (original top-K+1): OrderedDict([...])`` line when present (our
logs print the original's metric convention there), else from the last
``test result: OrderedDict([...])``. R@K = hit@K, N@K = ndcg@K.

For every run one table is printed: ours, reference, difference and relative
difference per metric. The reference rows are the paper's, on its full datasets
(``Scientific`` = the original's ``Scientific_mm_full``): a run on other data (e.g.
``Scientific_mini``) is matched by script and mode, but the table says plainly that
the datasets differ and leaves the differences out unless ``--cross-dataset``.

The original code's own logs (``--original``, default ``reference_log/original/``
of this repository: one per reference row) give per-epoch curves: each of our runs
is shown beside the original's run of the same reference row (same script, or same
dataset / transductive-inductive / pre-trained), epoch by epoch (training loss,
validation NDCG@10, ``*`` = the best epoch), with a note where the datasets,
modalities or metric conventions differ. Logs under that folder are read as the
reference, not listed, unless ``--logs`` names that folder (or one inside it).
``--plot out.png`` draws training loss and validation NDCG@10 per epoch of all
listed logs, each matched original dashed in the same colour (needs matplotlib).
Where a log has its curves file beside it (``log/{run}.csv``, written by every run
of ours, see curves.py), the per-epoch values come from it at full precision;
a log alone works as well.

``--table`` prints one markdown table of all listed runs instead (scripts/baselines.sh):
one row per model / dataset / stage / note, the test metrics in both conventions
(mean and, over several runs such as seeds, the spread as ``±`` one standard
deviation), the number of runs, epochs and seconds per training epoch.

``--paired`` prints what pre-training changed instead (scripts/transfer_btg.sh): each
pre-trained run minus the run from scratch with the same model, dataset, stage, kmeans_mode
and seed, the differences of the test metrics over the seeds as mean ± standard deviation and
a 95% interval (Student's t), in both conventions, and in how many pairs N@10 rose. With
``--baseline TEXT`` the other side of each pair is the pre-trained run whose note contains TEXT
instead of the run from scratch (one pre-training against another, e.g. ``--baseline orig4``).
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

from io_utils import ToolError, atomic_open, run_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ORIGINAL_DIR = os.path.join(REPO, "reference_log", "original")
METRICS = ("R@10", "N@10", "R@50", "N@50")
REF_COLUMNS = ["script", "dataset", "with_id", "pretrained"] + list(METRICS)
_PREFIX_RE = re.compile(
    r"^(?:[A-Z][a-z]{2} )?\d{1,2} [A-Z][a-z]{2} \d{4} \d{2}:\d{2}:\d{2}\s+[A-Z]+\s+"  # Fri 20 Oct 2023 03:18:55 INFO
    r"|^\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}:\d{2}(?:[.,]\d+)?\s+[A-Z]+\s+")              # 2023-10-20 03:18:55,123 INFO
_CONFIG_RE = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*=\s*(.*?)\s*$")
_NUM = r"([-+0-9.eE]+|nan|inf)"
_EPOCH_RE = re.compile(r"epoch (\d+) evaluating \[.*?valid_score: " + _NUM + r"\]")
_TRAIN_RE = re.compile(r"epoch (\d+) training \[time: " + _NUM + r"s, train loss: " + _NUM + r"\]")
_VALID_RE = re.compile(r"^valid result:\s*(.*)$")           # the metrics follow on the next line
_VALUES_RE = re.compile(r"([A-Za-z]+@\d+)\s*:\s*" + _NUM)  # hit@10 : 0.1054    ndcg@10 : 0.0534
_BEST_RE = re.compile(r"best eval result in epoch (\d+)")
_LOADING_RE = re.compile(r"^Loading from (\S+)")            # the original's fine-tuning from a checkpoint
_CONFIG_KEYS = ("dataset", "data_path", "train_stage", "script", "pretrained_file", "seed", "modal_type",
                "eval_topk_plus_one", "note", "model", "kmeans_mode")
_RESULT_RE = re.compile(
    r"^(best valid|test result)\s*(\((?:original top-K\+1|exact top-K)\))?\s*:\s*(.*)$")
_PAIR_RE = re.compile(r"\(\s*['\"]([^'\"]+)['\"]\s*,\s*(?:[A-Za-z_][\w.]*\()?\s*([-+0-9.eE]+|nan|inf)\s*\)?\s*\)")


class FormatError(ToolError):
    def __init__(self, path: str, lineno: int, msg: str):
        super().__init__(f"{path}:{lineno}: {msg}")


@dataclass
class LogRun:
    path: str
    config: Dict[str, str] = field(default_factory=dict)
    valid_curve: List[Tuple[int, float]] = field(default_factory=list)          # (epoch, valid_score)
    train_curve: List[Tuple[int, float, float]] = field(default_factory=list)   # (epoch, seconds, train loss)
    valid_results: Dict[int, Dict[str, float]] = field(default_factory=dict)   # epoch -> 'valid result' metrics
    results: Dict[str, Dict[str, float]] = field(default_factory=dict)  # 'test', 'test_orig', 'valid', 'valid_orig'
    best_epoch: Optional[int] = None
    original: bool = False  # written by the original code (its RecBole config dump)

    @property
    def dataset(self) -> str:
        if self.config.get("dataset"):
            return self.config["dataset"]
        # the original logs no dataset line; its data_path ends in the dataset folder
        data_path = self.config.get("data_path", "").strip("'\"")
        return os.path.basename(os.path.normpath(data_path)) if data_path else ""

    @property
    def topk_plus_one(self) -> Optional[bool]:
        """Whether the per-epoch validation metrics are in the original's top-K+1 convention."""
        if self.original:
            return True
        return {"true": True, "false": False}.get(self.config.get("eval_topk_plus_one", "").lower())

    @property
    def label(self) -> str:
        note = self.config.get("note", "").strip("'\"")
        return note or os.path.basename(self.path)

    def valid_ndcg10(self) -> List[Tuple[int, float]]:
        """(epoch, validation NDCG@10): the 'valid result' line, else the valid_score."""
        return [(epoch, self.valid_results.get(epoch, {}).get("ndcg@10", score)) for epoch, score in self.valid_curve]

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

    def test_in(self, convention: str) -> Optional[Dict[str, float]]:
        """The test metrics in one convention, 'exact' or 'original' (top-K+1), or None. The line
        ``test result:`` is in the convention the run selected on (the original's: top-K+1)."""
        labelled = self.results.get("test_exact" if convention == "exact" else "test_orig")
        if labelled is not None or "test" not in self.results:
            return labelled
        return self.results["test"] if bool(self.topk_plus_one) == (convention == "original") else None

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
    valid_pending = None  # (line number, epoch) of a 'valid result:' whose metrics are on the next line
    for lineno, raw in enumerate(lines, 1):
        msg = _PREFIX_RE.sub("", raw, count=1).strip()
        if not msg:
            continue
        if valid_pending is not None:
            values = _VALUES_RE.findall(msg)
            if not values:
                raise FormatError(path, lineno, "expected 'metric : value' pairs after 'valid result:'")
            run.valid_results[valid_pending[1]] = {k.lower(): float(v) for k, v in values}
            valid_pending = None
            continue
        if msg == "General Hyper Parameters:":
            run.original = True
            continue
        m = _TRAIN_RE.search(msg)
        if m:
            run.train_curve.append((int(m.group(1)), float(m.group(2)), float(m.group(3))))
            continue
        m = _EPOCH_RE.search(msg)
        if m:
            run.valid_curve.append((int(m.group(1)), float(m.group(2))))
            continue
        m = _VALID_RE.match(msg)
        if m:
            epoch = run.valid_curve[-1][0] if run.valid_curve else -1
            values = _VALUES_RE.findall(m.group(1))
            if values:
                run.valid_results[epoch] = {k.lower(): float(v) for k, v in values}
            else:
                valid_pending = (lineno, epoch)
            continue
        m = _BEST_RE.search(msg)
        if m:
            run.best_epoch = int(m.group(1))
            continue
        m = _LOADING_RE.match(msg)
        if m:
            run.config.setdefault("pretrained_file", m.group(1))
            continue
        m = _RESULT_RE.match(msg)
        if m:
            kind = "valid" if m.group(1) == "best valid" else "test"
            if m.group(2):
                kind += "_exact" if "exact" in m.group(2) else "_orig"
            metrics = parse_metric_dict(m.group(3))
            if metrics is None:
                raise FormatError(path, lineno, f"expected '{m.group(1)}{' ' + m.group(2) if m.group(2) else ''}"
                                                f": OrderedDict([(metric, number), ...])'")
            run.results[kind] = metrics
            continue
        m = _CONFIG_RE.match(msg)
        if m and m.group(1) in _CONFIG_KEYS:
            # keep the first occurrence of each key (the hyper-parameter block at the top)
            run.config.setdefault(m.group(1), m.group(2))
    if valid_pending is not None:
        raise FormatError(path, valid_pending[0], "expected 'metric : value' pairs after 'valid result:'")
    read_curves_csv(run)
    return run


def read_curves_csv(run: LogRun) -> bool:
    """Per-epoch curves from the CSV beside the log (``{run}.csv``, curves.py) when there is one:
    training loss and time, valid score and metrics at full precision. Returns whether one was read."""
    path = os.path.splitext(run.path)[0] + ".csv"
    if not os.path.isfile(path):
        return False
    try:
        with open(path, "r", encoding="utf-8", newline="") as fp:
            rows = list(csv.DictReader(fp))
    except (OSError, csv.Error, UnicodeDecodeError) as e:
        raise ToolError(f"{path}: cannot read the curves file ({e})") from None
    if rows and not {"epoch", "train_loss"} <= set(rows[0]):
        raise FormatError(path, 1, "expected a curves header with epoch and train_loss (curves.py)")
    train, valid, results = [], [], {}
    try:
        for row in rows:
            epoch = int(float(row["epoch"]))
            if row.get("train_loss"):
                train.append((epoch, float(row.get("train_time_s") or 0.0), float(row["train_loss"])))
            if row.get("valid_score"):
                valid.append((epoch, float(row["valid_score"])))
                results[epoch] = {k[len("valid_"):]: float(v) for k, v in row.items()
                                  if k.startswith("valid_") and "@" in k and v}
    except (TypeError, ValueError):
        raise FormatError(path, 1, "expected numbers in the curves file") from None
    run.train_curve = train or run.train_curve
    run.valid_curve = valid or run.valid_curve
    run.valid_results = results or run.valid_results
    return True


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
    if run.config.get("model", "MISSRec").strip("'\"") != "MISSRec":
        return None  # a baseline (SASRec, Pop): the reference rows are MISSRec's
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


def base_dataset(name: str) -> str:
    """The paper's name of a dataset: the original's folders are ``{X}_mm_full``."""
    return name[:-len("_mm_full")] if name.endswith("_mm_full") else name


def same_dataset(a: str, b: str) -> bool:
    return bool(a) and base_dataset(a) == base_dataset(b)


def ours_metrics(metrics: Dict[str, float]) -> Dict[str, Optional[float]]:
    out: Dict[str, Optional[float]] = {}
    for name in METRICS:
        k = name.split("@")[1]
        keys = (f"hit@{k}", f"recall@{k}") if name.startswith("R") else (f"ndcg@{k}",)
        out[name] = next((metrics[key] for key in keys if key in metrics), None)
    return out


def _fmt(v: Optional[float], spec: str = "{:.4f}") -> str:
    return "-" if v is None else spec.format(v)


def differences(run: LogRun, ref: Optional[Dict[str, object]], orig: Optional[LogRun]) -> List[str]:
    """Plain notes on what differs between a run and what it is compared with."""
    notes = []
    if ref and not same_dataset(run.dataset, str(ref["dataset"])):
        notes.append(f"DIFFERENT DATASETS: this run is on {run.dataset or '?'}, the reference row "
                     f"{ref['script']} on {ref['dataset']} (the paper's full data): not a reproduction")
    if orig is not None:
        mine, theirs = run.config.get("modal_type"), orig.config.get("modal_type")
        if mine and theirs and mine != theirs:
            notes.append(f"DIFFERENT MODALITIES: this run uses modal_type {mine}, the original {theirs}")
    return notes


def format_run(run: LogRun, ref: Optional[Dict[str, object]], orig: Optional[LogRun] = None,
               cross_dataset: bool = False) -> str:
    metrics, source = run.test_metrics
    ident = (f"dataset {run.dataset or '?'}, {run.stage or '?'}, pretrained {run.pretrained}"
             + (f", script {run.script}" if run.script else "") + (", original code" if run.original else ""))
    refdesc = (f"{ref['script']} ({ref['dataset']}, with_id {ref['with_id']}, pretrained {ref['pretrained']})"
               if ref else "no reference row")
    lines = [f"== {run.path}", f"   {ident} -> {refdesc}"]
    mismatch = bool(ref) and not same_dataset(run.dataset, str(ref["dataset"]))
    for note in differences(run, ref, orig):
        lines.append(f"   {note}")
    if mismatch:
        lines.append("   differences shown because of --cross-dataset" if cross_dataset
                     else "   differences not shown (--cross-dataset shows them)")
    if metrics is None:
        lines.append("   (no test result in this log)")
        return "\n".join(lines)
    who = "log" if run.original else "ours"
    lines.append(f"   {who} from '{source}'" + (f", {len(run.valid_curve)} evaluated epochs" if run.valid_curve else ""))
    ours = ours_metrics(metrics)
    show_diff = not mismatch or cross_dataset
    lines.append(f"   {'metric':<7}{who:>9}{'reference':>11}{'diff':>10}{'rel diff':>10}")
    for name in METRICS:
        o = ours[name]
        r = float(ref[name]) if ref else None
        diff = o - r if o is not None and r is not None else None
        rel = diff / r * 100 if diff is not None and r else None
        if show_diff:
            tail = f"{_fmt(diff, '{:+.4f}'):>10}{_fmt(rel, '{:+.1f}%'):>10}"
        else:
            tail = f"{'n/a':>10}{'n/a':>10}"
        lines.append(f"   {name:<7}{_fmt(o):>9}{_fmt(r):>11}{tail}")
    return "\n".join(lines)


def _convention(run: LogRun) -> str:
    return {True: "top-K+1", False: "exact top-K", None: "convention not logged"}[run.topk_plus_one]


def format_curves(run: LogRun, orig: LogRun, script: str) -> str:
    """Training loss and validation NDCG@10 per epoch, ours beside the original's run."""
    lines = [f"   per epoch, beside the original's {script}: {_short(orig.path)} ({orig.dataset or '?'})"]
    if not same_dataset(run.dataset, orig.dataset):
        lines.append(f"   DIFFERENT DATASETS: {run.dataset or '?'} vs the original's {orig.dataset or '?'}: "
                     f"compare the shapes, not the values")
    if run.topk_plus_one is not True:
        lines.append(f"   valid N@10 conventions differ: ours {_convention(run)}, the original top-K+1 "
                     f"(its @10 counts ranks 1..11)")
    losses = [{e: loss for e, _, loss in r.train_curve} for r in (run, orig)]
    valids = [dict(r.valid_ndcg10()) for r in (run, orig)]
    epochs = sorted(set().union(*losses, *valids))
    if not epochs:
        lines.append("   (no epoch lines in either log)")
        return "\n".join(lines)

    def cell(table, r, e, spec):
        if e not in table:
            return "-" + " "
        return spec.format(table[e]) + ("*" if e == r.best_epoch else " ")

    lines.append(f"   {'epoch':>5}{'loss ours':>13}{'original':>13}{'valid N@10 ours':>17}{'original':>10}")
    for e in epochs:
        lines.append(f"   {e:>5}" + "".join(f"{cell(losses[i], r, e, '{:.4f}'):>13}" for i, r in enumerate((run, orig)))
                     + f"{cell(valids[0], run, e, '{:.4f}'):>17}{cell(valids[1], orig, e, '{:.4f}'):>10}")
    times = [sum(t for _, t, _ in r.train_curve) / len(r.train_curve) if r.train_curve else None for r in (run, orig)]
    lines.append(f"   * = best epoch; training time per epoch: ours {_fmt(times[0], '{:.2f} s')}, "
                 f"original {_fmt(times[1], '{:.2f} s')} (machines differ)")
    return "\n".join(lines)


def load_originals(folder: str, reference: List[Dict[str, object]]) -> Dict[str, LogRun]:
    """The original code's logs under ``folder``, by the script of their reference row."""
    by_script: Dict[str, LogRun] = {}
    for path in collect_logs([folder]):
        run = parse_log(path)
        ref = match_reference(run, reference)
        if ref is not None:
            by_script.setdefault(str(ref["script"]), run)
    return by_script


def _short(path: str) -> str:
    """``path`` relative to the working folder when it lies below it (this repository's logs)."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder + os.sep)


def collect_logs(specs: List[str], skip: Optional[str] = None) -> List[str]:
    """Log files named or found under the given folders; a folder walk leaves out ``skip``
    (the original's logs) unless the folder given lies inside it."""
    paths: List[str] = []
    for spec in specs:
        if os.path.isdir(spec):
            found = []
            for root, dirs, files in os.walk(spec):
                if skip and not _inside(spec, skip):
                    dirs[:] = [d for d in dirs if not _inside(os.path.join(root, d), skip)]
                found += [os.path.join(root, f) for f in files if f.endswith(".log")]
            paths += sorted(found)
        elif os.path.isfile(spec):
            paths.append(spec)
        else:
            raise ToolError(f"{spec}: no such log file or folder")
    if not paths:
        raise ToolError(f"no *.log files found in {' '.join(specs)}")
    return paths


def plot_curves(pairs: List[Tuple[LogRun, Optional[LogRun]]], out: str) -> Tuple[int, int]:
    """Training loss and validation NDCG@10 per epoch; each run's matched original dashed
    in its colour. Returns (runs drawn, originals drawn)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ToolError("--plot needs matplotlib (pip install matplotlib, see requirements-tools.txt)") from None
    fig, (ax_loss, ax_valid) = plt.subplots(1, 2, figsize=(13, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key().get("color", ["C0"])
    drawn, originals_drawn = 0, set()

    def draw(run, label, color, style):
        if run.train_curve:
            ax_loss.plot([e for e, _, _ in run.train_curve], [v for _, _, v in run.train_curve], style,
                         color=color, label=label, linewidth=1.2)
        valid = run.valid_ndcg10()
        if valid:
            ax_valid.plot(*zip(*valid), style, color=color, label=label, linewidth=1.2)

    for k, (run, orig) in enumerate(pairs):
        if not run.valid_curve and not run.train_curve:
            continue
        color = colors[k % len(colors)]
        draw(run, f"{run.label} ({run.dataset}, {run.stage}{', pt' if run.pretrained else ''})", color, "-")
        drawn += 1
        if orig is not None and orig.path not in originals_drawn:
            draw(orig, f"original {run.script or ''} ({orig.dataset}, {orig.stage}"
                       f"{', pt' if orig.pretrained else ''})".replace("  ", " "), color, "--")
            originals_drawn.add(orig.path)
    ax_loss.set_ylabel("training loss")
    ax_valid.set_ylabel("validation NDCG@10")
    for ax in (ax_loss, ax_valid):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=6)
    with atomic_open(out, "wb") as fp:
        fig.savefig(fp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return drawn, len(originals_drawn)


def compare(logs: List[str], reference: str, plot: Optional[str] = None, original: Optional[str] = None,
            cross_dataset: bool = False, curves: bool = True) -> List[Tuple[LogRun, Optional[dict]]]:
    """Print one table per run (and its curves beside the original's); ``original`` None =
    this repository's reference_log/original when it exists, '' = none."""
    ref_rows = load_reference(reference)
    if original is None:
        original = ORIGINAL_DIR if os.path.isdir(ORIGINAL_DIR) else ""
    elif original and not os.path.isdir(original):
        raise ToolError(f"{original}: folder of the original's logs not found")
    originals = load_originals(original, ref_rows) if original else {}
    paths = collect_logs(logs, skip=original or None)
    runs = [parse_log(p) for p in tqdm(paths, desc="read logs", disable=len(paths) < 20)]
    out, pairs, mismatched = [], [], []
    for run in runs:
        if not run.results and not run.valid_curve and not run.config:
            continue  # not a training log
        ref = match_reference(run, ref_rows)
        orig = originals.get(str(ref["script"])) if ref and not run.original else None
        if orig is not None and os.path.realpath(orig.path) == os.path.realpath(run.path):
            orig = None
        out.append((run, ref))
        pairs.append((run, orig))
        if ref and not same_dataset(run.dataset, str(ref["dataset"])):
            mismatched.append(f"{run.dataset or '?'} vs {ref['dataset']}")
        print(format_run(run, ref, orig, cross_dataset))
        if orig is not None and curves:
            print(format_curves(run, orig, str(ref["script"])))
        print()
    if not out:
        raise ToolError("none of the given files is a training log")
    skipped = len(collect_logs([original])) if original and any(
        os.path.isdir(spec) and not _inside(spec, original) and _inside(original, spec) for spec in logs) else 0
    if skipped:
        print(f"({skipped} logs of the original code under {_short(original)} served as the reference curves; "
              f"--logs {_short(original)} lists them)")
    if mismatched:
        print(f"NOTE: {len(mismatched)} of {len(out)} runs were compared with a reference row of another dataset "
              f"({', '.join(sorted(set(mismatched)))}): those numbers are not a reproduction of the paper")
    if plot:
        n, m = plot_curves(pairs, plot)
        print(f"plotted training loss and validation NDCG@10 of {n} logs, with {m} of the original's dashed -> {plot}")
    return out


def _mean_spread(values: List[float]) -> str:
    if not values:
        return "-"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.4f}"
    sd = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return f"{mean:.4f} ± {sd:.4f}"


def run_table(logs: List[str]) -> List[str]:
    """One markdown table of the test results of the given runs (``--table``), grouped by
    model, dataset, stage, pre-training and note; returns its lines."""
    groups: Dict[Tuple[str, ...], List[LogRun]] = {}
    for path in collect_logs(logs):
        run = parse_log(path)
        if not run.results:
            continue
        model = run.config.get("model", "MISSRec" if not run.original else "MISSRec (original code)").strip("'\"")
        note = run.config.get("note", "").strip("'\"")
        key = (model, run.dataset or "?", run.stage or "?", "yes" if run.pretrained else "no", note)
        groups.setdefault(key, []).append(run)
    if not groups:
        raise ToolError("none of the given files holds a test result")
    cols = ("hit@10", "ndcg@10", "hit@50", "ndcg@50")
    header = ["model", "dataset", "stage", "pre-trained", "note", "convention", "runs",
              *(n.replace("hit", "R").replace("ndcg", "N") for n in cols), "epochs", "s/epoch"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key, runs in sorted(groups.items()):
        epochs = [float(len(r.train_curve)) for r in runs]
        times = [t for r in runs for _, t, _ in r.train_curve]
        per_epoch = f"{sum(times) / len(times):.2f}" if times else "-"
        n_epochs = f"{sum(epochs) / len(epochs):g}" if any(epochs) else "-"
        for kind, convention in (("exact", "exact top-K"), ("original", "original top-K+1")):
            have = [m for m in (r.test_in(kind) for r in runs) if m is not None]
            if have:
                cells = [_mean_spread([m[c] for m in have if c in m]) for c in cols]
                lines.append("| " + " | ".join([*key, convention, str(len(have)), *cells, n_epochs, per_epoch]) + " |")
    return lines


# Student's t quantile 0.975 by degrees of freedom (a larger df uses the next smaller one listed: wider)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
        10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042, 60: 2.000, 120: 1.980}


def mean_interval(values: List[float]) -> Tuple[float, float, float]:
    """(mean, standard deviation, half-width of the 95% t interval of the mean) of >= 2 values."""
    n = len(values)
    mean = sum(values) / n
    sd = (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5
    t = T975[max(k for k in T975 if k <= n - 1)]
    return mean, sd, t * sd / n ** 0.5


def paired_table(logs: List[str], baseline: Optional[str] = None) -> List[str]:
    """One markdown table of pre-trained minus from-scratch test metrics, paired by seed (``--paired``);
    with ``baseline``, minus the pre-trained run whose note contains it."""
    base: Dict[Tuple[str, ...], LogRun] = {}   # the other side of the pairs (scratch or baseline), by key and seed
    pretrained: Dict[Tuple[str, ...], Dict[str, LogRun]] = {}
    for path in collect_logs(logs):
        run = parse_log(path)
        if not run.results or run.original:
            continue
        cfg = {k: run.config.get(k, "").strip("'\"") for k in ("model", "kmeans_mode", "seed", "note")}
        key = (cfg["model"] or "MISSRec", run.dataset or "?", run.stage or "?", cfg["kmeans_mode"] or "?")
        pair_key = key + (cfg["seed"],)
        if baseline is None:
            is_base = not run.pretrained
        else:
            is_base = run.pretrained and baseline in cfg["note"]
            if is_base and pair_key in base:
                raise ToolError(f"{path}: a second run whose note contains {baseline!r} for {'/'.join(key)}, "
                                f"seed {cfg['seed']} (expected one to pair with)")
        if is_base:
            base[pair_key] = run
        elif run.pretrained:
            pretrained.setdefault(key + (cfg["note"],), {})[cfg["seed"]] = run
    cols = ("hit@10", "ndcg@10", "hit@50", "ndcg@50")
    header = ["model", "dataset", "stage", "kmeans", "pre-trained run", "convention", "pairs",
              *("Δ" + n.replace("hit", "R").replace("ndcg", "N") for n in cols), "N@10 rose"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key, by_seed in sorted(pretrained.items()):
        pairs = [(run, base[key[:4] + (seed,)]) for seed, run in sorted(by_seed.items())
                 if key[:4] + (seed,) in base]
        for kind, convention in (("exact", "exact top-K"), ("original", "original top-K+1")):
            diffs = [{c: a.test_in(kind)[c] - b.test_in(kind)[c] for c in cols}
                     for a, b in pairs if a.test_in(kind) and b.test_in(kind)]
            if len(diffs) < 2:
                continue
            cells = []
            for c in cols:
                mean, sd, half = mean_interval([d[c] for d in diffs])
                cells.append(f"{mean:+.4f} ± {sd:.4f} [{mean - half:+.4f}, {mean + half:+.4f}]")
            rose = sum(d["ndcg@10"] > 0 for d in diffs)
            lines.append("| " + " | ".join([*key, convention, str(len(diffs)), *cells, f"{rose} of {len(diffs)}"]) + " |")
    if len(lines) == 2:
        other = "a run from scratch" if baseline is None else f"a run whose note contains {baseline!r}"
        raise ToolError(f"no pre-trained run has {other} with the same model, dataset, stage, "
                        "kmeans_mode and seed (at least 2 pairs)")
    return lines


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--logs", nargs="+", required=True, help="log files or folders (searched for *.log)")
    p.add_argument("--reference", default=os.path.join(REPO, "reference_log", "reference_metrics.csv"),
                   help="reference metrics CSV (default: this repository's reference_log/reference_metrics.csv)")
    p.add_argument("--original", default=None,
                   help="folder of the original code's logs for the per-epoch curves (default: this "
                        "repository's reference_log/original; '' for none)")
    p.add_argument("--cross-dataset", action="store_true",
                   help="show differences to a reference row of another dataset (always flagged)")
    p.add_argument("--no-curves", action="store_true", help="leave out the per-epoch tables")
    p.add_argument("--plot", default=None, help="write training loss and validation NDCG@10 per epoch to this PNG")
    p.add_argument("--table", action="store_true", help="only one markdown table of the test results of all "
                   "listed runs, grouped by model/dataset/stage/note (mean ± spread over repeated runs)")
    p.add_argument("--paired", action="store_true", help="only one markdown table of pre-trained minus "
                   "from-scratch test metrics, paired by seed (mean ± sd [95%% interval])")
    p.add_argument("--baseline", default=None, metavar="TEXT", help="with --paired: pair with the pre-trained "
                   "run whose note contains TEXT instead of the run from scratch")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    def _run(a):
        args = build_parser().parse_args(a)
        if args.table or args.paired:
            print("\n".join(paired_table(args.logs, args.baseline) if args.paired else run_table(args.logs)))
            return 0
        compare(args.logs, args.reference, args.plot, args.original, args.cross_dataset, not args.no_curves)
        return 0
    return run_main(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
