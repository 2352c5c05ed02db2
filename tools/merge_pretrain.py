"""Merge several processed downstream domains into one pre-training set (SPEC section 1).

Example:
    python tools/merge_pretrain.py --domains Food Home CDs Kindle Movies \
        --data-path datasets/downstream --out datasets/pretrain --name FHCKM_mm_full

For domain number d (0-based position in ``--domains``) with folder
``{data-path}/{D}/``, every row of ``{D}.train.inter`` becomes a row of
``{name}.train.inter`` whose user and item tokens are prefixed ``"{d}-"``
(``0-12\\t0-3 0-7\\t0-9``). Also written: ``{name}.pt_datasets`` (one line, the
comma-separated domain names) and, per domain, ``{D}.feat1CLS``, ``{D}.feat2CLS``,
``{D}.feat3CLS`` copied (``--link``: hard-linked when possible) into the output
folder. Feature files are checked: size a multiple of ``--dim`` float32 values and
at least (largest item token + 1) rows. Nothing is written unless every input is valid.
A domain may also be given as a path to its folder (the name is the folder's name).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional, Tuple

if __package__ in (None, ""):  # run as a script: make `tools` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tqdm import tqdm

from tools._io import AtomicGroup, ToolError, run_main

INTER_HEADER = "user_id:token\titem_id_list:token_seq\titem_id:token"
FEAT_SUFFIXES = ("feat1CLS", "feat2CLS", "feat3CLS")


class FormatError(ToolError):
    def __init__(self, path: str, lineno: int, msg: str):
        super().__init__(f"{path}:{lineno}: {msg}")


def resolve_domain(spec: str, data_path: str) -> Tuple[str, str]:
    """(name, folder) for a domain given by name or by folder path."""
    if "/" in spec or os.sep in spec:
        folder = os.path.normpath(spec)
        return os.path.basename(folder), folder
    return spec, os.path.join(data_path, spec)


def read_train_rows(path: str) -> Tuple[List[Tuple[str, List[str], str]], int]:
    """Parsed rows of a ``.train.inter`` file and the largest item token."""
    if not os.path.isfile(path):
        raise ToolError(f"{path}: train file not found")
    rows = []
    max_item = -1
    with open(path, "r", encoding="utf-8") as fp:
        for lineno, line in enumerate(fp, 1):
            line = line.rstrip("\r\n")
            if lineno == 1:
                if line != INTER_HEADER:
                    raise FormatError(path, 1, f"expected the header {INTER_HEADER!r}")
                continue
            if not line:
                continue
            parts = line.split("\t")
            if len(parts) != 3:
                raise FormatError(path, lineno, f"expected 3 tab-separated fields user, history, target; got {len(parts)}")
            user, hist, target = parts
            hist_items = hist.split(" ") if hist else []
            for tok in hist_items + [target]:
                if not tok.isdigit():
                    raise FormatError(path, lineno, f"expected non-negative integer item tokens separated by single spaces, got {tok!r}")
                max_item = max(max_item, int(tok))
            if not user:
                raise FormatError(path, lineno, "expected a non-empty user token")
            rows.append((user, hist_items, target))
    return rows, max_item


def merge(domains: List[str], data_path: str, out: str, name: str, dim: int = 512,
          link: bool = False, quiet: bool = False) -> dict:
    if not domains:
        raise ToolError("no domains given")
    resolved = [resolve_domain(d, data_path) for d in domains]
    names = [n for n, _ in resolved]
    if len(set(names)) != len(names):
        raise ToolError(f"duplicate domain names: {','.join(names)}")
    for n in names:
        if "," in n:
            raise ToolError(f"domain name {n!r} contains a comma")
    per_domain = []
    for d, (dname, folder) in enumerate(resolved):
        if not os.path.isdir(folder):
            raise ToolError(f"{folder}: domain folder not found")
        rows, max_item = read_train_rows(os.path.join(folder, f"{dname}.train.inter"))
        feats = []
        for suf in FEAT_SUFFIXES:
            fpath = os.path.join(folder, f"{dname}.{suf}")
            if not os.path.isfile(fpath):
                raise ToolError(f"{fpath}: feature file missing for domain {dname} "
                                f"(run tools/extract_features.py first)")
            size = os.path.getsize(fpath)
            if size % (4 * dim):
                raise ToolError(f"{fpath}: size {size} bytes is not a multiple of {dim} float32 values")
            n_rows = size // (4 * dim)
            if n_rows <= max_item:
                raise ToolError(f"{fpath}: {n_rows} feature rows but the train file uses item token {max_item}")
            feats.append(fpath)
        per_domain.append((d, dname, rows, feats))

    def write_inter(fp):
        fp.write(INTER_HEADER + "\n")
        for d, dname, rows, _ in per_domain:
            p = f"{d}-"
            for user, hist, target in tqdm(rows, desc=f"merge {dname}", disable=quiet, mininterval=1):
                fp.write(f"{p}{user}\t{' '.join(p + h for h in hist)}\t{p}{target}\n")

    folder = os.path.join(out, name)
    with AtomicGroup() as group:
        group.stage(os.path.join(folder, f"{name}.train.inter"), write_inter)
        group.stage(os.path.join(folder, f"{name}.pt_datasets"), lambda fp: fp.write(",".join(names) + "\n"))
        for _, dname, _, feats in per_domain:
            for fpath in feats:
                group.stage_copy(fpath, os.path.join(folder, os.path.basename(fpath)), link=link)
    total = sum(len(r) for _, _, r, _ in per_domain)
    if not quiet:
        for d, dname, rows, _ in per_domain:
            print(f"domain {d} {dname}: {len(rows)} train rows")
        print(f"{name}: {total} train rows from {len(names)} domains -> {folder}")
    return {"rows": total, "domains": names, "folder": folder}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--domains", nargs="+", required=True, help="domain names (or folders), in domain order")
    p.add_argument("--data-path", default="datasets/downstream", help="root of the processed domains")
    p.add_argument("--out", default="datasets/pretrain", help="output root (default datasets/pretrain)")
    p.add_argument("--name", default="FHCKM_mm_full", help="pre-training set name")
    p.add_argument("--dim", type=int, default=512, help="feature columns, for the size check (default 512)")
    p.add_argument("--link", action="store_true", help="hard-link the feature files instead of copying")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    def _run(a):
        args = build_parser().parse_args(a)
        merge(args.domains, args.data_path, args.out, args.name, args.dim, args.link)
        return 0
    return run_main(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
