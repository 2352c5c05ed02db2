"""Convert Amazon Review 2018 raw files into the distributed downstream format.

Example:
    python tools/process_amazon.py --ratings Industrial_and_Scientific.csv \
        --meta meta_Industrial_and_Scientific.json.gz --out datasets/downstream --name Scientific

Inputs
    ratings CSV, no header, rows ``item,user,rating,timestamp``;
    ``meta_{Category}.json.gz``, one JSON object per line (``asin``, ``title``,
    ``category`` (list), ``brand``, ``imageURLHighRes``/``imageURLHigh``/``imageURL`` (lists)).

Steps (in this order)
    1. keep interactions whose item has metadata with a non-empty ``title``;
    2. de-duplicate (user, item), keeping the first row of the ratings file;
    3. k-core filtering (``--k-core``, default 5), repeated until every user and
       every item has at least k interactions;
    4. sort each user's interactions by timestamp (ties keep the file order);
    5. number users 0..U-1 in sorted order of their raw ids, and items 0..I-1 in
       order of first appearance when walking the users in that order, each user's
       interactions chronologically (as the distributed files do: user 0's items
       are 0, 1, 2, ...);
    6. leave-one-out with n items per user: train rows ``items[0:t] -> items[t]``
       for t = n-3 down to 1 (the distributed files list them longest first),
       valid ``items[0:n-2] -> items[n-2]``, test ``items[0:n-1] -> items[n-1]``;
       histories keep their last ``--max-len`` (50) items.

Outputs in ``{out}/{name}/``: ``{name}.train.inter``, ``.valid.inter``, ``.test.inter``
(header ``user_id:token\\titem_id_list:token_seq\\titem_id:token``), ``.item2index``,
``.user2index`` (``raw_id\\tindex``, no header), ``.text`` (header
``item_id:token\\ttext:token_seq``; one row per item in index order, keyed by the
raw item id as in the distributed files; text = "title. categories. brand. ")
and ``.image_urls`` (``index\\turl``, no header, empty url when the item has none).
All outputs are written to temp files and moved into place only when every one
of them is complete.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import html
import json
import os
import re
import sys
from typing import Dict, List, Optional, Sequence, Tuple

if __package__ in (None, ""):  # run as a script: make `tools` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tqdm import tqdm

from data import INTER_HEADER
from io_utils import AtomicGroup, ToolError, run_main

TEXT_HEADER = "item_id:token\ttext:token_seq\n"
TEXT_KEYS = ("title", "category", "brand")
IMAGE_KEYS = ("imageURLHighRes", "imageURLHigh", "imageURL")


class FormatError(ToolError):
    """A malformed input line: ``file:line: message``."""

    def __init__(self, path: str, lineno: int, msg: str):
        super().__init__(f"{path}:{lineno}: {msg}")


# ----------------------------------------------------------------------------- text
def clean_text(raw) -> str:
    """The original UniSRec/MISSRec cleaning: lists joined by spaces, HTML entities
    unescaped, quotes and newlines removed (tabs become spaces), trailing dots
    collapsed into one final '.', texts of 2000+ characters dropped."""
    if isinstance(raw, list):
        text = " ".join(str(x) for x in raw)
    elif isinstance(raw, dict):
        text = str(raw)
    else:
        text = "" if raw is None else str(raw)
    text = html.unescape(text)
    text = re.sub(r'["\n\r]*', "", text)
    text = text.replace("\t", " ")
    text = text.rstrip(".") + "."
    if len(text) >= 2000:
        text = ""
    return text


def item_text(meta: dict) -> str:
    return "".join(clean_text(meta[k]) + " " for k in TEXT_KEYS if k in meta)


def item_image_url(meta: dict) -> str:
    for key in IMAGE_KEYS:
        val = meta.get(key)
        if isinstance(val, str):
            val = [val]
        if isinstance(val, list):
            for url in val:
                if isinstance(url, str) and url.strip():
                    return url.strip().replace("\t", "").replace("\n", "")
    return ""


def _open_text(path: str):
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, "r", encoding="utf-8")


def load_meta(path: str) -> Dict[str, Tuple[str, str]]:
    """asin -> (text, image url) for every item with a non-empty title (first record wins)."""
    if not os.path.isfile(path):
        raise ToolError(f"{path}: metadata file not found")
    out: Dict[str, Tuple[str, str]] = {}
    with _open_text(path) as fp:
        lineno = 0
        try:
            for lineno, line in enumerate(tqdm(fp, desc="load meta", unit=" lines", mininterval=1), 1):
                if not line.strip():
                    continue
                try:
                    data = json.loads(line)
                except json.JSONDecodeError as e:
                    raise FormatError(path, lineno, f"expected one JSON object per line ({e.msg})") from None
                if not isinstance(data, dict) or not isinstance(data.get("asin"), str):
                    raise FormatError(path, lineno, "expected a JSON object with a string key 'asin'")
                asin = data["asin"]
                title = data.get("title")
                if asin in out or not isinstance(title, str) or not title.strip():
                    continue
                out[asin] = (item_text(data), item_image_url(data))
        except (OSError, EOFError, UnicodeDecodeError) as e:
            raise FormatError(path, lineno + 1, f"unreadable gzip/UTF-8 text ({e})") from None
    return out


# -------------------------------------------------------------------------- ratings
def load_ratings(path: str, keep_items: Optional[Dict[str, object]]) -> List[Tuple[str, str, int, int]]:
    """(user, item, timestamp, file order) for rows whose item is in ``keep_items``,
    first row per (user, item) only."""
    if not os.path.isfile(path):
        raise ToolError(f"{path}: ratings file not found")
    seen = set()
    rows: List[Tuple[str, str, int, int]] = []
    with _open_text(path) as fp:
        for lineno, line in enumerate(tqdm(fp, desc="load ratings", unit=" lines", mininterval=1), 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            parts = line.split(",")
            if len(parts) != 4:
                raise FormatError(path, lineno, f"expected 4 comma-separated fields item,user,rating,timestamp, got {len(parts)}")
            item, user, rating, ts = (p.strip() for p in parts)
            if not item or not user:
                raise FormatError(path, lineno, "expected non-empty item and user ids")
            try:
                float(rating)
            except ValueError:
                raise FormatError(path, lineno, f"expected a numeric rating, got {rating!r}") from None
            try:
                t = int(ts)
            except ValueError:
                try:
                    t = int(float(ts))
                except ValueError:
                    t = None
            if t is None:
                raise FormatError(path, lineno, f"expected an integer timestamp, got {ts!r}")
            if keep_items is not None and item not in keep_items:
                continue
            key = (user, item)
            if key in seen:
                continue
            seen.add(key)
            rows.append((user, item, t, lineno))
    return rows


def k_core(rows: List[Tuple[str, str, int, int]], k: int) -> List[Tuple[str, str, int, int]]:
    """Drop rows until every user and item has at least ``k`` rows."""
    if k <= 1:
        return rows
    while True:
        ucount = collections.Counter(r[0] for r in rows)
        icount = collections.Counter(r[1] for r in rows)
        kept = [r for r in rows if ucount[r[0]] >= k and icount[r[1]] >= k]
        if len(kept) == len(rows):
            return kept
        rows = kept


def build_sequences(rows) -> Tuple[Dict[str, int], Dict[str, int], List[List[int]]]:
    """user2index (sorted raw ids), item2index (first appearance), per-user item lists."""
    by_user: Dict[str, list] = collections.defaultdict(list)
    for user, item, t, order in rows:
        by_user[user].append((t, order, item))
    user2index: Dict[str, int] = {}
    item2index: Dict[str, int] = {}
    seqs: List[List[int]] = []
    for user in sorted(by_user):
        user2index[user] = len(user2index)
        seq = []
        for _, _, item in sorted(by_user[user]):
            if item not in item2index:
                item2index[item] = len(item2index)
            seq.append(item2index[item])
        seqs.append(seq)
    return user2index, item2index, seqs


def split_rows(seqs: Sequence[Sequence[int]], max_len: int = 50):
    """Leave-one-out rows (user, history list, target) for train, valid, test."""
    train, valid, test = [], [], []
    for u, items in enumerate(seqs):
        n = len(items)
        if n < 3:
            raise ToolError(f"user {u} has {n} interactions; leave-one-out needs at least 3 (use --k-core >= 3)")
        for t in range(n - 3, 0, -1):
            train.append((u, items[max(0, t - max_len):t], items[t]))
        valid.append((u, items[max(0, n - 2 - max_len):n - 2], items[n - 2]))
        test.append((u, items[max(0, n - 1 - max_len):n - 1], items[n - 1]))
    return train, valid, test


def _inter_writer(rows):
    def write(fp):
        fp.write(INTER_HEADER + "\n")
        for u, hist, tgt in rows:
            fp.write(f"{u}\t{' '.join(map(str, hist))}\t{tgt}\n")
    return write


def _map_writer(mapping: Dict[str, int]):
    def write(fp):
        for raw, idx in mapping.items():
            fp.write(f"{raw}\t{idx}\n")
    return write


def process(ratings: str, meta: str, out: str, name: str, k: int = 5, max_len: int = 50,
            quiet: bool = False) -> dict:
    metas = load_meta(meta)
    rows = load_ratings(ratings, metas)
    n_dedup = len(rows)
    rows = k_core(rows, k)
    if not rows:
        raise ToolError(f"no interactions left after the metadata and {k}-core filters "
                        f"({n_dedup} before k-core)")
    user2index, item2index, seqs = build_sequences(rows)
    train, valid, test = split_rows(seqs, max_len)
    index2item = list(item2index)

    def write_text(fp):
        fp.write(TEXT_HEADER)
        for raw in index2item:
            fp.write(f"{raw}\t{metas[raw][0]}\n")

    def write_urls(fp):
        for idx, raw in enumerate(index2item):
            fp.write(f"{idx}\t{metas[raw][1]}\n")

    folder = os.path.join(out, name)
    base = os.path.join(folder, name)
    with AtomicGroup() as group:
        group.stage(base + ".train.inter", _inter_writer(train))
        group.stage(base + ".valid.inter", _inter_writer(valid))
        group.stage(base + ".test.inter", _inter_writer(test))
        group.stage(base + ".item2index", _map_writer(item2index))
        group.stage(base + ".user2index", _map_writer(user2index))
        group.stage(base + ".text", write_text)
        group.stage(base + ".image_urls", write_urls)

    n_users, n_items, n_inter = len(user2index), len(item2index), len(rows)
    stats = {
        "users": n_users,
        "items": n_items,
        "interactions": n_inter,
        "avg_length": n_inter / n_users,
        "sparsity": 1.0 - n_inter / (n_users * n_items),
        "train_rows": len(train),
        "items_with_image_url": sum(1 for raw in index2item if metas[raw][1]),
        "folder": folder,
    }
    if not quiet:
        print(f"{name}: users {n_users}  items {n_items}  interactions {n_inter}  "
              f"avg length {stats['avg_length']:.2f}  sparsity {stats['sparsity'] * 100:.4f}%")
        print(f"train rows {len(train)}  valid rows {len(valid)}  test rows {len(test)}  "
              f"items with an image url {stats['items_with_image_url']}  -> {folder}")
    return stats


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ratings", required=True, help="ratings CSV (item,user,rating,timestamp; no header)")
    p.add_argument("--meta", required=True, help="meta_{Category}.json.gz")
    p.add_argument("--out", default="datasets/downstream", help="output root (default datasets/downstream)")
    p.add_argument("--name", required=True, help="dataset name, e.g. Scientific")
    p.add_argument("--k-core", type=int, default=5, help="minimum interactions per user and item (default 5)")
    p.add_argument("--max-len", type=int, default=50, help="history length kept (default 50)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    def _run(a):
        args = build_parser().parse_args(a)
        process(args.ratings, args.meta, args.out, args.name, args.k_core, args.max_len)
        return 0
    return run_main(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
