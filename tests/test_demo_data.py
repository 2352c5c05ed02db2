"""Tests for tools/make_demo_data.py (synthetic dataset in the distributed format)."""
import os
import subprocess
import sys
from collections import defaultdict

import numpy as np
import pytest

from data import INTER_HEADER
from tools.make_demo_data import (
    TEXT_HEADER,
    generate_downstream,
    make_world,
    write_downstream,
    write_pretrain,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIM = 512
SMALL = dict(n_users=120, n_items=60, n_interests=6)
SMALL_PT = dict(n_users_per_domain=60, n_items_per_domain=40, n_interests=6)


def read_inter(path):
    with open(path, "rb") as f:
        raw = f.read()
    assert raw.endswith(b"\n")
    text = raw.decode("utf-8")
    lines = text.split("\n")[:-1]
    assert lines[0] == INTER_HEADER
    rows = []
    for ln in lines[1:]:
        parts = ln.split("\t")
        assert len(parts) == 3, ln
        u, hist, tgt = parts
        h = hist.split(" ")
        assert all(x != "" for x in h), f"bad separators in {ln!r}"
        rows.append((u, h, tgt))
    return rows


def read_feat(path):
    a = np.fromfile(path, dtype="<f4")
    assert a.size % DIM == 0
    return a.reshape(-1, DIM)


@pytest.fixture(scope="module")
def small(make_demo):
    root, data = make_demo(name="Demo", seed=7, **SMALL)
    return str(root / "Demo"), data


@pytest.fixture(scope="module")
def small_pt(make_demo):
    root, data = make_demo("pretrain", name="DemoPT", domains=("DemoA", "DemoB", "DemoC"), seed=7, **SMALL_PT)
    return str(root / "DemoPT"), data


def test_files_and_headers(small):
    folder, _ = small
    names = sorted(os.listdir(folder))
    assert names == sorted(f"Demo.{s}" for s in (
        "train.inter", "valid.inter", "test.inter", "feat1CLS", "feat3CLS",
        "item2index", "user2index", "text"))  # no temp files left behind
    for s in ("train", "valid", "test"):
        with open(os.path.join(folder, f"Demo.{s}.inter"), "rb") as f:
            assert f.readline() == b"user_id:token\titem_id_list:token_seq\titem_id:token\n"
    with open(os.path.join(folder, "Demo.text"), "rb") as f:
        assert f.readline() == TEXT_HEADER.encode() == b"item_id:token\ttext:token_seq\n"


def test_split_rule_and_tokens(small):
    folder, data = small
    n_items, n_users = SMALL["n_items"], SMALL["n_users"]
    train = read_inter(os.path.join(folder, "Demo.train.inter"))
    valid = read_inter(os.path.join(folder, "Demo.valid.inter"))
    test = read_inter(os.path.join(folder, "Demo.test.inter"))
    assert len(valid) == len(test) == n_users
    assert [r[0] for r in test] == [str(u) for u in range(n_users)]
    assert [r[0] for r in valid] == [str(u) for u in range(n_users)]
    by_user = defaultdict(list)
    for r in train:
        by_user[r[0]].append(r)
    total = 0
    for (u, th, tt), (vu, vh, vt) in zip(test, valid):
        full = th + [tt]
        n = len(full)
        assert 5 <= n <= 20
        assert len(set(full)) == n
        assert full == [str(x) for x in data.sequences[int(u)]]
        assert vh == full[:n - 2] and vt == full[n - 2]
        rows = by_user[u]
        assert len(rows) == n - 3
        total += n - 3
        # every prefix, longest first (as in Scientific_mini)
        for i, (_, h, t) in enumerate(rows):
            tpos = n - 3 - i
            assert h == full[:tpos] and t == full[tpos]
    assert total == len(train)
    # every token is a decimal row index of the feature files
    for rows in (train, valid, test):
        for _, h, t in rows:
            for tok in h + [t]:
                assert tok.isdigit() and str(int(tok)) == tok and 0 <= int(tok) < n_items
                assert len(h) <= 50
    # tokens numbered by first appearance over users (like the real data)
    seen = []
    for s in data.sequences:
        for x in s:
            if x not in seen:
                seen.append(x)
    assert seen == list(range(len(seen)))


def test_history_cut_to_50(tmp_path):
    folder, data = write_downstream(str(tmp_path), name="Long", n_users=8, n_items=240,
                                    n_interests=3, seed=1, min_len=56, max_len=60,
                                    return_data=True)
    for s in ("train", "valid", "test"):
        rows = read_inter(os.path.join(folder, f"Long.{s}.inter"))
        assert max(len(h) for _, h, _ in rows) == 50
        for u, h, t in rows:
            seq = [str(x) for x in data.sequences[int(u)]]
            pos = seq.index(t)
            assert h == seq[max(0, pos - 50):pos]


def test_features_and_maps(small):
    folder, data = small
    n_items, n_users = SMALL["n_items"], SMALL["n_users"]
    for suf in ("feat1CLS", "feat3CLS"):
        assert os.path.getsize(os.path.join(folder, f"Demo.{suf}")) == n_items * DIM * 4
    text = read_feat(os.path.join(folder, "Demo.feat1CLS"))
    img = read_feat(os.path.join(folder, "Demo.feat3CLS"))
    np.testing.assert_array_equal(text, data.items.text)
    np.testing.assert_array_equal(img, data.items.img)
    # missing modality: exact zero rows, as flagged; present rows never sum to 0
    assert data.items.img_missing.any()
    assert (img.sum(1) == 0).tolist() == data.items.img_missing.tolist()
    assert (text.sum(1) == 0).tolist() == data.items.text_missing.tolist()
    assert np.all(img[data.items.img_missing] == 0)
    assert np.all(text[data.items.text_missing] == 0)
    assert not (data.items.img_missing & data.items.text_missing).any()
    assert np.isfinite(text).all() and np.isfinite(img).all()
    # index files: raw_id \t index, no header, index = line number
    for fname, n, prefix in (("Demo.item2index", n_items, "I"), ("Demo.user2index", n_users, "U")):
        with open(os.path.join(folder, fname)) as f:
            lines = f.read().split("\n")
        assert lines[-1] == "" and len(lines) - 1 == n
        raws = set()
        for i, ln in enumerate(lines[:-1]):
            raw, idx = ln.split("\t")
            assert idx == str(i) and raw.startswith(prefix)
            raws.add(raw)
        assert len(raws) == n
    with open(os.path.join(folder, "Demo.text")) as f:
        lines = f.read().split("\n")[1:-1]
    assert len(lines) == n_items
    assert all(len(ln.split("\t")) == 2 for ln in lines)


def _all_bytes(folder):
    return {n: open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder))}


def test_deterministic(tmp_path):
    a = write_downstream(str(tmp_path / "a"), seed=3, **SMALL)
    b = write_downstream(str(tmp_path / "b"), seed=3, **SMALL)
    c = write_downstream(str(tmp_path / "c"), seed=4, **SMALL)
    assert _all_bytes(a) == _all_bytes(b)
    assert _all_bytes(a)["Demo.feat1CLS"] != _all_bytes(c)["Demo.feat1CLS"]
    pa = write_pretrain(str(tmp_path / "pa"), seed=3, **SMALL_PT)
    pb = write_pretrain(str(tmp_path / "pb"), seed=3, **SMALL_PT)
    assert _all_bytes(pa) == _all_bytes(pb)
    # rewriting in place replaces files atomically and leaves no temp files
    write_downstream(str(tmp_path / "a"), seed=3, **SMALL)
    assert _all_bytes(a) == _all_bytes(b)


def test_planted_structure(small):
    _, data = small
    it = data.items
    k = SMALL["n_interests"]
    same = np.mean([it.interest[int(h[-1])] == it.interest[int(t)] for _, h, t in data.train_rows])
    # chance level with balanced interests is ~1/k; planted stay probability 0.8
    assert same > 0.65 and same > 3.0 / k
    # each modality alone recovers the interest (nearest class centroid)
    for feat, miss in ((it.text, it.text_missing), (it.img, it.img_missing)):
        x = feat[~miss].astype(np.float64)
        y = it.interest[~miss]
        cent = np.stack([x[y == j].mean(0) for j in range(k)])
        d = ((x[:, None, :] - cent[None]) ** 2).sum(-1)
        assert np.mean(d.argmin(1) == y) > 0.95


def test_sequential_beats_popularity():
    data = generate_downstream(seed=11, n_users=600, n_items=240, n_interests=8)
    it = data.items
    cnt = np.zeros(len(it.raw_ids))
    for _, _, t in data.train_rows:
        cnt[int(t)] += 1
    top = set(np.argsort(-cnt, kind="stable")[:10].tolist())
    pop_hr = np.mean([int(t) in top for _, _, t in data.test_rows])
    hits = []
    for _, h, t in data.test_rows:
        k = it.interest[int(h[-1])]
        hist = {int(x) for x in h}
        cand = [i for i in np.flatnonzero(it.interest == k) if i not in hist]
        cand.sort(key=lambda i: -cnt[i])
        hits.append(int(t) in set(cand[:10]))
    seq_hr = np.mean(hits)
    assert seq_hr > 2 * pop_hr and seq_hr > 0.3


def test_pretrain_format(small_pt):
    folder, data = small_pt
    doms = ["DemoA", "DemoB", "DemoC"]
    with open(os.path.join(folder, "DemoPT.pt_datasets")) as f:
        content = f.read()
    assert content.strip() == "DemoA,DemoB,DemoC" and "\n" not in content.strip()
    expected = {"DemoPT.train.inter", "DemoPT.pt_datasets"} | {
        f"{d}.{s}" for d in doms for s in ("feat1CLS", "feat2CLS", "feat3CLS")}
    assert set(os.listdir(folder)) == expected
    n_items = SMALL_PT["n_items_per_domain"]
    feats = {}
    for d in doms:
        for s in ("feat1CLS", "feat2CLS", "feat3CLS"):
            assert os.path.getsize(os.path.join(folder, f"{d}.{s}")) == n_items * DIM * 4
        feats[d] = [read_feat(os.path.join(folder, f"{d}.{s}")) for s in ("feat1CLS", "feat2CLS", "feat3CLS")]
        t, t2, _ = feats[d]
        miss = t.sum(1) == 0
        assert np.all(t2[miss] == 0) and np.all(t2[~miss].sum(1) != 0)
        assert not np.array_equal(t, t2)
        cos = (t * t2).sum(1)[~miss] / (np.linalg.norm(t, axis=1) * np.linalg.norm(t2, axis=1))[~miss]
        assert cos.min() > 0.8  # a perturbation of the same text, not another item
    rows = read_inter(os.path.join(folder, "DemoPT.train.inter"))
    assert len(rows) == len(data.rows) == sum(len(s) - 1 for dom in data.domains for s in dom.sequences)
    by_user = defaultdict(list)
    for u, h, t in rows:
        ud = u.split("-")[0]
        assert len(h) <= 50
        for tok in h + [t]:
            d, r = tok.split("-")
            assert d == ud and d.isdigit() and 0 <= int(d) < len(doms)
            assert r.isdigit() and 0 <= int(r) < feats[doms[int(d)]][0].shape[0]
        by_user[u].append((h, t))
    for u, lst in by_user.items():
        d, ui = map(int, u.split("-"))
        seq = [f"{d}-{x}" for x in data.domains[d].sequences[ui]]
        assert lst == [(seq[:t], seq[t]) for t in range(len(seq) - 1, 0, -1)]


def test_pretrain_shares_world(small, small_pt):
    _, down = small
    _, pt = small_pt
    assert np.array_equal(down.world.centres, pt.world.centres)
    assert np.array_equal(down.world.text_map, make_world(7, 6).text_map)
    k = SMALL["n_interests"]
    for attr, miss in (("text", "text_missing"), ("img", "img_missing")):
        x = getattr(down.items, attr).astype(np.float64)
        y, m = down.items.interest, getattr(down.items, miss)
        cent = np.stack([x[~m][y[~m] == j].mean(0) for j in range(k)])
        for dom in pt.domains:
            z = getattr(dom.items, attr).astype(np.float64)
            zm = getattr(dom.items, miss)
            d = ((z[~zm][:, None, :] - cent[None]) ** 2).sum(-1)
            assert np.mean(d.argmin(1) == dom.items.interest[~zm]) > 0.95


def test_cli(tmp_path):
    cmd = [sys.executable, os.path.join(REPO, "tools", "make_demo_data.py"),
           "--out", str(tmp_path / "ds"), "--name", "Cli", "--seed", "5",
           "--users", "40", "--items", "30", "--interests", "4",
           "--pretrain-out", str(tmp_path / "pt"), "--pretrain-users", "20", "--pretrain-items", "20"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().split("\n")
    assert len(lines) == 2 and "40 users" in lines[0] and "30 items" in lines[0]
    assert "rows train" in lines[1]
    assert os.path.isfile(tmp_path / "ds" / "Cli" / "Cli.test.inter")
    assert os.path.isfile(tmp_path / "pt" / "DemoPT" / "DemoPT.pt_datasets")
    first = _all_bytes(tmp_path / "ds" / "Cli")
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0 and _all_bytes(tmp_path / "ds" / "Cli") == first


def test_default_sizes():
    data = generate_downstream()
    assert len(data.sequences) == 1500 and len(data.items.raw_ids) == 400
    assert len({x for s in data.sequences for x in s}) == 400  # every item interacted
    assert 8000 < len(data.train_rows) < 14000
    assert data.items.img_missing.sum() == 12 and data.items.text_missing.sum() == 4
