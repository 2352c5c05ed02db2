"""Merge several processed downstream domains into one pre-training set (SPEC section 1).

Example:
    python tools/merge_pretrain.py --domains Food Home CDs Kindle Movies \
        --data-path datasets/downstream --out datasets/pretrain --name FHCKM_mm_full

For domain number d (0-based position in ``--domains``) with folder
``{data-path}/{D}/``, every row of ``{D}.train.inter`` becomes a row of
``{name}.train.inter`` whose user and item tokens are prefixed ``"{d}-"``
(``0-12\\t0-3 0-7\\t0-9``). Also written: ``{name}.pt_datasets`` (one line, the
comma-separated domain names) and, per domain, its feature files copied
(``--link``: hard-linked when possible) into the output folder, with its
``{D}.item2index`` and ``{D}.text`` when present.

Modalities follow the files present in every domain: text = ``{D}.feat1CLS`` and the
word-dropped ``{D}.feat2CLS`` (both needed by pre-training), image = ``{D}.feat3CLS``.
A text-only corpus (e.g. features from ``tools/extract_features.py --encoder
sentence``) merges as text only, and the summary says which modalities were merged
and the matching ``--modal_type``/``--plm_size``. Domains with different modalities
are refused, unless ``--modal-type`` picks the ones they share. Feature files are
checked: size a whole number of rows of ``--dim`` float32 values (default: the width
implied by the item count of ``{D}.item2index``; text and image may differ, every
domain must agree) and at least (largest item token + 1) rows. Nothing is written
unless every input is valid. A domain may also be given as a path to its folder (the
name is the folder's name).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List, Optional, Tuple

if __package__ in (None, ""):  # run as a script: make `tools` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tqdm import tqdm

from io_utils import AtomicGroup, ToolError, run_main

INTER_HEADER = "user_id:token\titem_id_list:token_seq\titem_id:token"
MODALITY_FILES = {"text": ("feat1CLS", "feat2CLS"), "img": ("feat3CLS",)}  # the modal_type names
MODAL_TYPES = {"text": ("text",), "img": ("img",), "img_text": ("text", "img")}
INFO_SUFFIXES = ("item2index", "text")  # copied when present; not read by training


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


def count_items(path: str) -> Optional[int]:
    """Non-empty lines of an ``.item2index`` file (= feature rows), None when it is absent."""
    if not os.path.isfile(path):
        return None
    with open(path, "r", encoding="utf-8") as fp:
        return sum(1 for line in fp if line.strip())


def domain_modalities(folder: str, dname: str, wanted: Optional[Tuple[str, ...]]) -> List[str]:
    """The modalities whose feature files are all present; a text modality with only
    one of its two files is an error when text may be merged (``wanted`` None = any)."""
    have = []
    for modality, suffixes in MODALITY_FILES.items():
        present = [os.path.isfile(os.path.join(folder, f"{dname}.{suf}")) for suf in suffixes]
        if all(present):
            have.append(modality)
        elif any(present) and (wanted is None or modality in wanted):
            missing = os.path.join(folder, f"{dname}.{suffixes[present.index(False)]}")
            other = "" if wanted is not None else ", or leave text out with --modal-type img"
            raise ToolError(f"{missing}: feature file missing for domain {dname} ({modality} needs "
                            f"{' and '.join(suffixes)}; run tools/extract_features.py first{other})")
    return have


def choose_modalities(found: List[Tuple[str, str, List[str]]], modal_type: str) -> Tuple[str, ...]:
    """The modalities to merge: those of every domain (``auto``) or the ones asked for."""
    if modal_type != "auto":
        wanted = MODAL_TYPES[modal_type]
        for dname, folder, have in found:
            for modality in wanted:
                if modality not in have:
                    suf = MODALITY_FILES[modality][0]
                    raise ToolError(f"{os.path.join(folder, f'{dname}.{suf}')}: feature file missing for domain "
                                    f"{dname} (--modal-type {modal_type} needs {' and '.join(MODALITY_FILES[modality])}"
                                    f"; run tools/extract_features.py first)")
        return wanted
    sets = {tuple(have) for _, _, have in found}
    if sets == {()}:
        dname, folder, _ = found[0]
        raise ToolError(f"{folder}: no feature files for domain {dname} (expected {dname}.feat1CLS + "
                        f"{dname}.feat2CLS for text and/or {dname}.feat3CLS for images; "
                        f"run tools/extract_features.py first)")
    if len(sets) > 1:
        desc = ", ".join(f"{dname} {'+'.join(have) or 'none'}" for dname, _, have in found)
        common = [m for m in MODALITY_FILES if all(m in have for _, _, have in found)]
        hint = (f"merge the shared ones with --modal-type {'img_text' if len(common) == 2 else common[0]}, or "
                if common else "")
        raise ToolError(f"domains disagree on modalities: {desc}; {hint}extract the missing features "
                        f"with tools/extract_features.py")
    return sets.pop()


def feature_rows(fpath: str, dim: Optional[int], n_items: Optional[int], dname: str) -> Tuple[int, int]:
    """(rows, columns) of a float32 feature file: columns ``dim``, or implied by ``n_items``."""
    size = os.path.getsize(fpath)
    if dim is None:
        if n_items is None:
            raise ToolError(f"{fpath}: cannot tell its width without {dname}.item2index (the item count); "
                            f"give --dim")
        if not n_items or size % (4 * n_items):
            raise ToolError(f"{fpath}: size {size} bytes is not {n_items} rows ({dname}.item2index) of float32 "
                            f"values; give --dim if the rows differ from the items")
        dim = size // (4 * n_items)
    if size % (4 * dim):
        raise ToolError(f"{fpath}: size {size} bytes is not a multiple of {dim} float32 values")
    return size // (4 * dim), dim


def merge(domains: List[str], data_path: str, out: str, name: str, dim: Optional[int] = None,
          link: bool = False, quiet: bool = False, modal_type: str = "auto") -> dict:
    if not domains:
        raise ToolError("no domains given")
    if modal_type != "auto" and modal_type not in MODAL_TYPES:
        raise ToolError(f"unknown modal type {modal_type!r} (expected auto, {', '.join(MODAL_TYPES)})")
    resolved = [resolve_domain(d, data_path) for d in domains]
    names = [n for n, _ in resolved]
    if len(set(names)) != len(names):
        raise ToolError(f"duplicate domain names: {','.join(names)}")
    for n in names:
        if "," in n:
            raise ToolError(f"domain name {n!r} contains a comma")
    found = []
    for dname, folder in resolved:
        if not os.path.isdir(folder):
            raise ToolError(f"{folder}: domain folder not found")
        found.append((dname, folder, domain_modalities(folder, dname, None if modal_type == "auto"
                                                       else MODAL_TYPES[modal_type])))
    modalities = choose_modalities(found, modal_type)
    per_domain = []
    widths: Dict[str, Tuple[int, str]] = {}  # modality -> (columns, first file), the same in every domain
    for d, (dname, folder) in enumerate(resolved):
        rows, max_item = read_train_rows(os.path.join(folder, f"{dname}.train.inter"))
        n_items = count_items(os.path.join(folder, f"{dname}.item2index"))
        feats = []
        for modality in modalities:
            for suf in MODALITY_FILES[modality]:
                fpath = os.path.join(folder, f"{dname}.{suf}")
                n_rows, cols = feature_rows(fpath, dim, n_items, dname)
                if n_rows <= max_item:
                    raise ToolError(f"{fpath}: {n_rows} feature rows but the train file uses item token {max_item}")
                first_cols, first = widths.setdefault(modality, (cols, fpath))
                if cols != first_cols:
                    raise ToolError(f"{fpath}: {cols} columns, but {first} has {first_cols}; every domain's "
                                    f"{modality} features must have the same width")
                feats.append(fpath)
        feats += [p for p in (os.path.join(folder, f"{dname}.{suf}") for suf in INFO_SUFFIXES) if os.path.isfile(p)]
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
    modal = "img_text" if len(modalities) == 2 else modalities[0]
    flags = f"--modal_type={modal}" + "".join(
        f" --{'plm' if m == 'text' else 'img'}_size={widths[m][0]}" for m in modalities)
    if not quiet:
        for d, dname, rows, _ in per_domain:
            print(f"domain {d} {dname}: {len(rows)} train rows")
        merged = " and ".join(f"{m} ({', '.join(MODALITY_FILES[m])}, {widths[m][0]} columns)" for m in modalities)
        print(f"modalities: {merged}; pre-train with {flags}")
        print(f"{name}: {total} train rows from {len(names)} domains -> {folder}")
    return {"rows": total, "domains": names, "folder": folder, "modal_type": modal,
            "dims": {m: widths[m][0] for m in modalities}}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--domains", nargs="+", required=True, help="domain names (or folders), in domain order")
    p.add_argument("--data-path", default="datasets/downstream", help="root of the processed domains")
    p.add_argument("--out", default="datasets/pretrain", help="output root (default datasets/pretrain)")
    p.add_argument("--name", default="FHCKM_mm_full", help="pre-training set name")
    p.add_argument("--dim", type=int, default=None,
                   help="feature columns, for the size check (default: implied by each {D}.item2index)")
    p.add_argument("--modal-type", default="auto", choices=["auto"] + list(MODAL_TYPES),
                   help="modalities to merge: auto (those every domain has; refused when they differ), "
                        "text (feat1CLS+feat2CLS), img (feat3CLS) or img_text")
    p.add_argument("--link", action="store_true", help="hard-link the feature files instead of copying")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    def _run(a):
        args = build_parser().parse_args(a)
        if args.dim is not None and args.dim < 1:
            raise ToolError("--dim must be >= 1")
        merge(args.domains, args.data_path, args.out, args.name, args.dim, args.link, modal_type=args.modal_type)
        return 0
    return run_main(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
