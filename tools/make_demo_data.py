"""Generate a small synthetic multi-modal dataset in the distributed MISSRec format.

The files match docs/spec.md section 1 (and the real ``Scientific_mini`` files) byte
for byte in layout:

* ``{D}.train.inter`` / ``.valid.inter`` / ``.test.inter``: TSV with header
  ``user_id:token\\titem_id_list:token_seq\\titem_id:token``; train rows of a
  user are every prefix, longest first; valid / test are leave-one-out.
* ``{D}.feat1CLS`` (text) and ``{D}.feat3CLS`` (image): raw little-endian
  float32, 512 columns, no header, row r = item token r. A zero row means the
  modality is missing for that item.
* ``{D}.item2index`` / ``{D}.user2index``: ``raw_id\\tindex`` (no header).
* ``{D}.text``: header ``item_id:token\\ttext:token_seq``, then ``raw_id\\ttext``.

Planted structure (so a sequential model clearly beats most-popular):
items belong to latent interests; an item's text and image features are two
different fixed random linear maps of (interest centre + item noise) plus a
little noise. Each user has 2-3 preferred interests and walks between them
Markov-style (mostly staying in the interest of the last item); inside an
interest the item follows a Zipf-like popularity, so popularity is a real but
weaker baseline.

The pre-training corpus (``write_pretrain``) uses the same interest centres and
modality maps as the downstream data made with the same seed (the "world"
depends only on seed, n_interests, dim and latent_dim), so pre-training
transfers.

Deterministic by seed (numpy Generator); every file is written atomically.

CLI::

    python tools/make_demo_data.py --out datasets/downstream [--name Demo] \\
        [--seed 2020] [--pretrain-out datasets/pretrain]
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

if __package__ in (None, ""):  # run as a script: make `tools` and `data` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from data import INTER_HEADER
from io_utils import atomic_write_bytes

TEXT_HEADER = "item_id:token\ttext:token_seq\n"
MAX_HISTORY = 50

# Defaults: ~1,500 users / ~400 items, trains in about a minute on 2 cores.
DEFAULT_USERS = 1500
DEFAULT_ITEMS = 400
DEFAULT_INTERESTS = 12
DEFAULT_DIM = 512
DEFAULT_LATENT = 32
DEFAULT_SEED = 2020

# Scale of the features: similar norms to CLIP ViT-B/32 features in
# Scientific_mini (text row norm ~7.5, image ~9.5).
TEXT_SCALE = 0.33
IMG_SCALE = 0.42

# Stream ids for numpy's SeedSequence, so that world / downstream / each
# pre-training domain draw from independent, reproducible streams.
_STREAM_WORLD = 0
_STREAM_DOWNSTREAM = 1
_STREAM_PRETRAIN = 2

_WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi "
          "omicron pi rho sigma tau upsilon phi chi psi omega").split()


# --------------------------------------------------------------------------
# data classes
# --------------------------------------------------------------------------
@dataclass
class World:
    """Shared latent structure: interest centres and the two modality maps."""
    centres: np.ndarray       # [K, latent] float64
    text_map: np.ndarray      # [latent, dim]
    img_map: np.ndarray       # [latent, dim]
    text_offset: np.ndarray   # [dim] common mean direction (CLIP-like)
    img_offset: np.ndarray    # [dim]

    @property
    def n_interests(self) -> int:
        return self.centres.shape[0]

    @property
    def dim(self) -> int:
        return self.text_map.shape[1]


@dataclass
class ItemSet:
    """Items of one domain, indexed by feature row (= item token)."""
    interest: np.ndarray        # [n] int, latent interest of each row
    text: np.ndarray            # [n, dim] float32 (zero row = missing text)
    img: np.ndarray             # [n, dim] float32 (zero row = missing image)
    raw_ids: List[str]          # raw id of each row
    text_missing: np.ndarray    # [n] bool
    img_missing: np.ndarray     # [n] bool
    latent: np.ndarray          # [n, latent] float64


@dataclass
class DemoData:
    """Everything written for one downstream dataset plus its metadata."""
    name: str
    items: ItemSet
    sequences: List[List[int]]      # per user token, item rows in order
    user_raw_ids: List[str]
    user_interests: List[List[int]]  # preferred interests of each user
    world: World
    train_rows: List[tuple] = field(default_factory=list)
    valid_rows: List[tuple] = field(default_factory=list)
    test_rows: List[tuple] = field(default_factory=list)
    texts: List[str] = field(default_factory=list)


# --------------------------------------------------------------------------
# generation
# --------------------------------------------------------------------------
def make_world(seed: int = DEFAULT_SEED, n_interests: int = DEFAULT_INTERESTS,
               dim: int = DEFAULT_DIM, latent_dim: int = DEFAULT_LATENT) -> World:
    """Interest centres and modality maps; depends only on its arguments."""
    rng = np.random.default_rng([int(seed), _STREAM_WORLD])
    centres = rng.normal(0.0, 1.0, size=(n_interests, latent_dim))
    text_map = rng.normal(0.0, 1.0 / np.sqrt(latent_dim), size=(latent_dim, dim))
    img_map = rng.normal(0.0, 1.0 / np.sqrt(latent_dim), size=(latent_dim, dim))
    text_offset = rng.normal(0.0, 0.3, size=dim)
    img_offset = rng.normal(0.0, 0.3, size=dim)
    return World(centres, text_map, img_map, text_offset, img_offset)


def _nonzero_sum_rows(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Make sure no present row sums to exactly 0 (that would read as missing)."""
    for _ in range(100):
        bad = (x.sum(axis=1, dtype=np.float32) == 0) | (x.astype(np.float64).sum(axis=1) == 0)
        if not bad.any():
            return x
        x[bad, 0] += np.float32(1e-3) * (1 + rng.random(int(bad.sum()))).astype(np.float32)
    return x  # pragma: no cover


def make_items(rng: np.random.Generator, world: World, n_items: int,
               item_noise: float = 0.4, feat_noise: float = 0.1,
               missing_image_frac: float = 0.03, missing_text_frac: float = 0.01,
               raw_prefix: str = "I") -> ItemSet:
    """Items in generation order (balanced interests, a few missing modalities)."""
    k = world.n_interests
    if n_items < k:
        raise ValueError(f"n_items ({n_items}) must be >= n_interests ({k})")
    interest = rng.permutation(np.arange(n_items) % k)
    latent = world.centres[interest] + rng.normal(0.0, item_noise, size=(n_items, world.centres.shape[1]))
    dim = world.dim
    text = (latent @ world.text_map + world.text_offset
            + rng.normal(0.0, feat_noise, size=(n_items, dim))) * TEXT_SCALE
    img = (latent @ world.img_map + world.img_offset
           + rng.normal(0.0, feat_noise, size=(n_items, dim))) * IMG_SCALE
    text = text.astype(np.float32)
    img = img.astype(np.float32)
    text = _nonzero_sum_rows(text, rng)
    img = _nonzero_sum_rows(img, rng)

    n_img_missing = int(round(missing_image_frac * n_items))
    if missing_image_frac > 0:
        n_img_missing = max(n_img_missing, 1)
    n_text_missing = int(round(missing_text_frac * n_items))
    if missing_text_frac > 0:
        n_text_missing = max(n_text_missing, 1)
    n_text_missing = min(n_text_missing, n_items - n_img_missing)
    order = rng.permutation(n_items)
    img_missing = np.zeros(n_items, dtype=bool)
    text_missing = np.zeros(n_items, dtype=bool)
    img_missing[order[:n_img_missing]] = True          # never both missing
    text_missing[order[n_img_missing:n_img_missing + n_text_missing]] = True
    img[img_missing] = 0.0
    text[text_missing] = 0.0
    raw_ids = [f"{raw_prefix}{i:05d}" for i in range(n_items)]
    return ItemSet(interest, text, img, raw_ids, text_missing, img_missing, latent)


def make_sequences(rng: np.random.Generator, items: ItemSet, n_users: int,
                   min_len: int = 5, max_len: int = 20, p_stay: float = 0.8,
                   zipf_a: float = 1.0, n_pref=(2, 3), len_p: float = 0.15):
    """User sequences of item rows (no repeated item within a user).

    Each user picks 2-3 preferred interests; the next item stays in the
    interest of the last item with probability ``p_stay`` and otherwise moves to
    another preferred interest; within an interest items follow Zipf weights
    ``1 / rank**zipf_a`` (random rank order per interest).
    """
    if min_len < 4:
        raise ValueError("min_len must be >= 4 (one train, one valid, one test row)")
    k = int(items.interest.max()) + 1
    members = [np.flatnonzero(items.interest == j) for j in range(k)]
    weights = []
    for m in members:
        ranks = rng.permutation(len(m))
        weights.append(1.0 / (ranks + 1.0) ** zipf_a)
    seqs, prefs = [], []
    for _ in range(n_users):
        n_p = int(rng.integers(n_pref[0], n_pref[1] + 1))
        pref = [int(x) for x in rng.choice(k, size=min(n_p, k), replace=False)]
        length = min_len + min(int(rng.geometric(len_p)) - 1, max_len - min_len)
        used = set()
        seq = []
        cur = pref[int(rng.integers(len(pref)))]
        while len(seq) < length:
            if seq and len(pref) > 1 and rng.random() >= p_stay:
                others = [p for p in pref if p != cur]
                cur = others[int(rng.integers(len(others)))]
            m, w = members[cur], weights[cur]
            avail = np.array([int(x) not in used for x in m])
            if not avail.any():
                # interest exhausted: fall back to any unused item
                cand = [p for p in pref if any(int(x) not in used for x in members[p])]
                if not cand:
                    cand = [j for j in range(k) if any(int(x) not in used for x in members[j])]
                    if not cand:
                        break
                cur = cand[int(rng.integers(len(cand)))]
                continue
            ww = w * avail
            it = int(m[rng.choice(len(m), p=ww / ww.sum())])
            used.add(it)
            seq.append(it)
        seqs.append(seq)
        prefs.append(pref)
    return seqs, prefs


def relabel_by_first_appearance(items: ItemSet, seqs: List[List[int]]):
    """Renumber item rows in order of first appearance (as Scientific_mini does);
    items that never appear go last, in generation order."""
    n = len(items.raw_ids)
    new_of_old = -np.ones(n, dtype=np.int64)
    nxt = 0
    for s in seqs:
        for it in s:
            if new_of_old[it] < 0:
                new_of_old[it] = nxt
                nxt += 1
    for it in range(n):
        if new_of_old[it] < 0:
            new_of_old[it] = nxt
            nxt += 1
    old_of_new = np.argsort(new_of_old)
    new_items = ItemSet(
        interest=items.interest[old_of_new],
        text=np.ascontiguousarray(items.text[old_of_new]),
        img=np.ascontiguousarray(items.img[old_of_new]),
        raw_ids=[items.raw_ids[i] for i in old_of_new],
        text_missing=items.text_missing[old_of_new],
        img_missing=items.img_missing[old_of_new],
        latent=items.latent[old_of_new],
    )
    new_seqs = [[int(new_of_old[it]) for it in s] for s in seqs]
    return new_items, new_seqs


def split_rows(user_tokens: Sequence[str], seqs: List[List[int]], item_token=str,
               max_history: int = MAX_HISTORY):
    """Train (every prefix, longest first), valid and test rows per user."""
    train, valid, test = [], [], []
    for u, s in zip(user_tokens, seqs):
        n = len(s)
        toks = [item_token(x) for x in s]
        for t in range(n - 3, 0, -1):
            train.append((u, toks[max(0, t - max_history):t], toks[t]))
        valid.append((u, toks[max(0, n - 2 - max_history):n - 2], toks[n - 2]))
        test.append((u, toks[max(0, n - 1 - max_history):n - 1], toks[n - 1]))
    return train, valid, test


def pretrain_rows(user_tokens: Sequence[str], seqs: List[List[int]], item_token=str,
                  max_history: int = MAX_HISTORY):
    """Every prefix of every sequence (t = n-1 .. 1), histories cut to the last 50."""
    rows = []
    for u, s in zip(user_tokens, seqs):
        toks = [item_token(x) for x in s]
        for t in range(len(s) - 1, 0, -1):
            rows.append((u, toks[max(0, t - max_history):t], toks[t]))
    return rows


def _item_texts(rng: np.random.Generator, items: ItemSet) -> List[str]:
    k = int(items.interest.max()) + 1
    vocab = [[f"{_WORDS[(j * 3 + w) % len(_WORDS)]}{j}" for w in range(6)] for j in range(k)]
    texts = []
    for tok, j in enumerate(items.interest):
        words = " ".join(vocab[j][int(x)] for x in rng.integers(0, 6, size=4))
        texts.append(f"interest {int(j)} item {tok} {words}")
    return texts


def generate_downstream(name: str = "Demo", n_users: int = DEFAULT_USERS,
                        n_items: int = DEFAULT_ITEMS, n_interests: int = DEFAULT_INTERESTS,
                        dim: int = DEFAULT_DIM, seed: int = DEFAULT_SEED,
                        latent_dim: int = DEFAULT_LATENT, min_len: int = 5,
                        max_len: int = 20, p_stay: float = 0.8, zipf_a: float = 1.0,
                        missing_image_frac: float = 0.03,
                        missing_text_frac: float = 0.01,
                        max_history: int = MAX_HISTORY) -> DemoData:
    """Generate (without writing) a downstream dataset and its metadata."""
    world = make_world(seed, n_interests, dim, latent_dim)
    rng = np.random.default_rng([int(seed), _STREAM_DOWNSTREAM])
    items = make_items(rng, world, n_items, missing_image_frac=missing_image_frac,
                       missing_text_frac=missing_text_frac, raw_prefix="I")
    seqs, prefs = make_sequences(rng, items, n_users, min_len=min_len, max_len=max_len,
                                 p_stay=p_stay, zipf_a=zipf_a)
    items, seqs = relabel_by_first_appearance(items, seqs)
    users = [str(u) for u in range(n_users)]
    train, valid, test = split_rows(users, seqs, max_history=max_history)
    data = DemoData(name=name, items=items, sequences=seqs,
                    user_raw_ids=[f"U{u:05d}" for u in range(n_users)],
                    user_interests=prefs, world=world,
                    train_rows=train, valid_rows=valid, test_rows=test)
    data.texts = _item_texts(rng, items)
    return data


# --------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------
def _inter_bytes(rows) -> bytes:
    lines = [INTER_HEADER + "\n"]
    for u, hist, tgt in rows:
        lines.append(f"{u}\t{' '.join(hist)}\t{tgt}\n")
    return "".join(lines).encode("utf-8")


def _feat_bytes(x: np.ndarray) -> bytes:
    return np.ascontiguousarray(x, dtype="<f4").tobytes()


def _index_bytes(raw_ids: Sequence[str]) -> bytes:
    return "".join(f"{r}\t{i}\n" for i, r in enumerate(raw_ids)).encode("utf-8")


def write_downstream(out_dir: str, name: str = "Demo", n_users: int = DEFAULT_USERS,
                     n_items: int = DEFAULT_ITEMS, n_interests: int = DEFAULT_INTERESTS,
                     dim: int = DEFAULT_DIM, seed: int = DEFAULT_SEED,
                     return_data: bool = False, **kwargs):
    """Write ``{out_dir}/{name}/`` and return its path (or ``(path, DemoData)``
    when ``return_data``). Extra keyword arguments go to ``generate_downstream``."""
    data = generate_downstream(name=name, n_users=n_users, n_items=n_items,
                               n_interests=n_interests, dim=dim, seed=seed, **kwargs)
    folder = os.path.join(out_dir, name)
    os.makedirs(folder, exist_ok=True)
    p = lambda suffix: os.path.join(folder, f"{name}.{suffix}")  # noqa: E731
    atomic_write_bytes(p("train.inter"), _inter_bytes(data.train_rows))
    atomic_write_bytes(p("valid.inter"), _inter_bytes(data.valid_rows))
    atomic_write_bytes(p("test.inter"), _inter_bytes(data.test_rows))
    atomic_write_bytes(p("feat1CLS"), _feat_bytes(data.items.text))
    atomic_write_bytes(p("feat3CLS"), _feat_bytes(data.items.img))
    atomic_write_bytes(p("item2index"), _index_bytes(data.items.raw_ids))
    atomic_write_bytes(p("user2index"), _index_bytes(data.user_raw_ids))
    text = TEXT_HEADER + "".join(f"{r}\t{t}\n" for r, t in zip(data.items.raw_ids, data.texts))
    atomic_write_bytes(p("text"), text.encode("utf-8"))
    return (folder, data) if return_data else folder


@dataclass
class PretrainDomain:
    name: str
    items: ItemSet
    text_aug: np.ndarray
    sequences: List[List[int]]


@dataclass
class PretrainData:
    name: str
    domains: List[PretrainDomain]
    rows: List[tuple]
    world: World


def generate_pretrain(name: str = "DemoPT", domains: Sequence[str] = ("DemoA", "DemoB", "DemoC"),
                      seed: int = DEFAULT_SEED, n_users_per_domain: int = 600,
                      n_items_per_domain: int = 300, n_interests: int = DEFAULT_INTERESTS,
                      dim: int = DEFAULT_DIM, latent_dim: int = DEFAULT_LATENT,
                      min_len: int = 5, max_len: int = 20, p_stay: float = 0.8,
                      zipf_a: float = 1.0, aug_noise: float = 0.3,
                      missing_image_frac: float = 0.03, missing_text_frac: float = 0.01,
                      max_history: int = MAX_HISTORY) -> PretrainData:
    """Pre-training corpus sharing the downstream world (same seed => same centres/maps)."""
    world = make_world(seed, n_interests, dim, latent_dim)
    out, rows = [], []
    for d, dname in enumerate(domains):
        rng = np.random.default_rng([int(seed), _STREAM_PRETRAIN, d])
        items = make_items(rng, world, n_items_per_domain, missing_image_frac=missing_image_frac,
                           missing_text_frac=missing_text_frac, raw_prefix=f"D{d}I")
        seqs, _ = make_sequences(rng, items, n_users_per_domain, min_len=min_len,
                                 max_len=max_len, p_stay=p_stay, zipf_a=zipf_a)
        items, seqs = relabel_by_first_appearance(items, seqs)
        # "text with words randomly dropped": text feature plus a perturbation.
        scale = float(items.text[~items.text_missing].std()) if (~items.text_missing).any() else 1.0
        aug = items.text + rng.normal(0.0, aug_noise * scale, size=items.text.shape).astype(np.float32)
        aug = _nonzero_sum_rows(aug.astype(np.float32), rng)
        aug[items.text_missing] = 0.0
        out.append(PretrainDomain(dname, items, aug, seqs))
        users = [f"{d}-{u}" for u in range(n_users_per_domain)]
        rows.extend(pretrain_rows(users, seqs, item_token=lambda x, d=d: f"{d}-{x}",
                                  max_history=max_history))
    return PretrainData(name, out, rows, world)


def write_pretrain(out_dir: str, name: str = "DemoPT",
                   domains: Sequence[str] = ("DemoA", "DemoB", "DemoC"),
                   seed: int = DEFAULT_SEED, return_data: bool = False, **kwargs):
    """Write ``{out_dir}/{name}/`` in the pre-training format; return its path
    (or ``(path, PretrainData)``). Extra keyword arguments go to ``generate_pretrain``."""
    for dname in domains:
        if "," in dname or "-" in dname:
            raise ValueError(f"domain name {dname!r} must not contain ',' or '-'")
    data = generate_pretrain(name=name, domains=tuple(domains), seed=seed, **kwargs)
    folder = os.path.join(out_dir, name)
    os.makedirs(folder, exist_ok=True)
    atomic_write_bytes(os.path.join(folder, f"{name}.train.inter"), _inter_bytes(data.rows))
    # one line, comma-separated, no trailing newline (readers .strip() anyway)
    atomic_write_bytes(os.path.join(folder, f"{name}.pt_datasets"),
                       ",".join(domains).encode("utf-8"))
    for dom in data.domains:
        atomic_write_bytes(os.path.join(folder, f"{dom.name}.feat1CLS"), _feat_bytes(dom.items.text))
        atomic_write_bytes(os.path.join(folder, f"{dom.name}.feat2CLS"), _feat_bytes(dom.text_aug))
        atomic_write_bytes(os.path.join(folder, f"{dom.name}.feat3CLS"), _feat_bytes(dom.items.img))
    return (folder, data) if return_data else folder


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------
def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="downstream data root (writes OUT/NAME/)")
    ap.add_argument("--name", default="Demo")
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED)
    ap.add_argument("--users", type=int, default=DEFAULT_USERS)
    ap.add_argument("--items", type=int, default=DEFAULT_ITEMS)
    ap.add_argument("--interests", type=int, default=DEFAULT_INTERESTS)
    ap.add_argument("--dim", type=int, default=DEFAULT_DIM)
    ap.add_argument("--pretrain-out", default=None, help="pre-training data root (writes PT/PTNAME/)")
    ap.add_argument("--pretrain-name", default="DemoPT")
    ap.add_argument("--pretrain-domains", default="DemoA,DemoB,DemoC")
    ap.add_argument("--pretrain-users", type=int, default=600, help="users per domain")
    ap.add_argument("--pretrain-items", type=int, default=300, help="items per domain")
    a = ap.parse_args(argv)

    folder, d = write_downstream(a.out, name=a.name, n_users=a.users, n_items=a.items,
                                 n_interests=a.interests, dim=a.dim, seed=a.seed,
                                 return_data=True)
    n_used = len({x for s in d.sequences for x in s})
    print(f"wrote {folder}: {len(d.sequences)} users, {len(d.items.raw_ids)} items "
          f"({n_used} interacted), {a.interests} interests, dim {a.dim}; rows train "
          f"{len(d.train_rows)} valid {len(d.valid_rows)} test {len(d.test_rows)}; "
          f"missing text {int(d.items.text_missing.sum())} image {int(d.items.img_missing.sum())}")
    if a.pretrain_out:
        doms = tuple(x for x in a.pretrain_domains.split(",") if x)
        pfolder, pd_ = write_pretrain(a.pretrain_out, name=a.pretrain_name, domains=doms,
                                      seed=a.seed, n_users_per_domain=a.pretrain_users,
                                      n_items_per_domain=a.pretrain_items,
                                      n_interests=a.interests, dim=a.dim, return_data=True)
        print(f"wrote {pfolder}: {len(doms)} domains ({','.join(doms)}), "
              f"{len(doms) * a.pretrain_users} users, "
              f"{sum(len(x.items.raw_ids) for x in pd_.domains)} items; rows train {len(pd_.rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
