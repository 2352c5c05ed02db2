"""Tests for tools/process_amazon.py and tools/merge_pretrain.py on tiny files."""

import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tools import merge_pretrain, process_amazon
from io_utils import ToolError, atomic_open

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADER = "user_id:token\titem_id_list:token_seq\titem_id:token"


def _write_meta(path, records, extra_lines=()):
    with gzip.open(path, "wt", encoding="utf-8") as fp:
        for r in records:
            fp.write(json.dumps(r) + "\n")
        for line in extra_lines:
            fp.write(line + "\n")


def _meta_records():
    recs = [
        {"asin": "C1", "title": "Glue &amp; Tape \"Pro\"\tX", "category": ["Industrial & Scientific", "Tapes"],
         "brand": "Gorilla", "imageURLHighRes": ["http://img/c1_big.jpg"], "imageURL": ["http://img/c1.jpg"]},
        {"asin": "C2", "title": "Bottle...", "category": [], "brand": "Acme", "imageURL": ["http://img/c2.jpg"]},
        {"asin": "C3", "title": "Beaker", "category": ["Lab"]},
        {"asin": "C4", "title": "Flask\nLarge", "category": ["Lab", "Glass"], "brand": "Pyrex"},
        {"asin": "C5", "title": "Scale", "category": ["Lab"], "brand": "Ohaus"},
        {"asin": "X1", "title": "Rare thing"},
        {"asin": "X2", "title": "Semi rare"},
        {"asin": "N", "title": "", "brand": "NoTitle"},
        {"asin": "C1", "title": "duplicate record ignored"},
    ]
    return recs


def _ratings_rows():
    rows = []
    # file order of users deliberately not sorted
    for u in ("U3", "U5", "U4"):
        rows += [("C1", u, 1), ("C2", u, 2), ("C3", u, 3), ("C4", u, 4), ("C5", u, 5)]
    rows += [("X2", "U3", 9), ("X2", "U4", 9)]
    # U1: reversed chronology, a duplicate, items without title / metadata
    rows += [("C1", "U1", 5), ("C2", "U1", 4), ("C3", "U1", 3), ("C4", "U1", 2), ("C5", "U1", 1),
             ("C5", "U1", 100), ("N", "U1", 6), ("M", "U1", 7), ("X2", "U1", 8)]
    # U2: tie between C3 and C2 (C3 first in the file)
    rows += [("C1", "U2", 10), ("C3", "U2", 20), ("C2", "U2", 20), ("C4", "U2", 30), ("C5", "U2", 40), ("X2", "U2", 50)]
    # U6 is removed by the second k-core pass, which then removes X2 in the third
    rows += [("C1", "U6", 1), ("C2", "U6", 2), ("C3", "U6", 3), ("X1", "U6", 4), ("X2", "U6", 5)]
    return [f"{i},{u},5.0,{t}" for i, u, t in rows]


def _make_inputs(tmp_path, ratings_lines=None, meta_extra=()):
    ratings = tmp_path / "ratings.csv"
    ratings.write_text("\n".join(ratings_lines if ratings_lines is not None else _ratings_rows()) + "\n")
    meta = tmp_path / "meta_Test.json.gz"
    _write_meta(meta, _meta_records(), meta_extra)
    return str(ratings), str(meta)


def _error_line(err):
    """The single ``error: ...`` line (progress bars also go to stderr)."""
    assert "Traceback" not in err
    lines = [line for line in err.replace("\r", "\n").split("\n") if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def _read(path):
    with open(path, encoding="utf-8") as fp:
        return fp.read().split("\n")[:-1]


def test_process_amazon_end_to_end(tmp_path, capsys):
    ratings, meta = _make_inputs(tmp_path)
    out = tmp_path / "out"
    rc = process_amazon.main(["--ratings", ratings, "--meta", meta, "--out", str(out), "--name", "Test"])
    assert rc == 0
    d = out / "Test"
    files = sorted(os.listdir(d))
    assert files == sorted(f"Test.{s}" for s in ("train.inter", "valid.inter", "test.inter", "item2index",
                                                 "user2index", "text", "image_urls"))
    # users sorted by raw id, items by first appearance (U1 chronologically: C5 C4 C3 C2 C1)
    assert _read(d / "Test.user2index") == [f"U{i + 1}\t{i}" for i in range(5)]
    assert _read(d / "Test.item2index") == ["C5\t0", "C4\t1", "C3\t2", "C2\t3", "C1\t4"]
    train = _read(d / "Test.train.inter")
    valid = _read(d / "Test.valid.inter")
    test = _read(d / "Test.test.inter")
    assert train[0] == valid[0] == test[0] == HEADER
    # U1 (index 0): 0 1 2 3 4 ; the later duplicate of C5 was dropped
    assert train[1:3] == ["0\t0 1\t2", "0\t0\t1"]
    assert valid[1] == "0\t0 1 2\t3"
    assert test[1] == "0\t0 1 2 3\t4"
    # U2: C1 C3 C2 C4 C5 (tie keeps file order) -> 4 2 3 1 0
    assert train[3:5] == ["1\t4 2\t3", "1\t4\t2"]
    assert valid[2] == "1\t4 2 3\t1" and test[2] == "1\t4 2 3 1\t0"
    assert len(train) == 1 + 5 * 2 and len(valid) == len(test) == 6
    text = _read(d / "Test.text")
    assert text[0] == "item_id:token\ttext:token_seq"
    assert text[1] == "C5\tScale. Lab. Ohaus. "
    assert text[4] == "C2\tBottle. . Acme. "
    assert text[5] == "C1\tGlue & Tape Pro X. Industrial & Scientific Tapes. Gorilla. "
    assert text[3] == "C3\tBeaker. Lab. "
    assert all(len(line.split("\t")) == 2 for line in text)
    urls = _read(d / "Test.image_urls")
    assert urls == ["0\t", "1\t", "2\t", "3\thttp://img/c2.jpg", "4\thttp://img/c1_big.jpg"]
    out_txt = capsys.readouterr().out
    assert "users 5" in out_txt and "items 5" in out_txt and "interactions 25" in out_txt
    assert "sparsity 0.0000%" in out_txt


def test_process_history_cut(tmp_path):
    ratings, meta = _make_inputs(tmp_path)
    stats = process_amazon.process(ratings, meta, str(tmp_path / "o"), "T", max_len=2, quiet=True)
    assert stats["users"] == 5
    test = _read(tmp_path / "o" / "T" / "T.test.inter")
    assert test[1] == "0\t2 3\t4"


@pytest.mark.parametrize("bad,where", [
    ("C1,U1,5.0", "ratings.csv:3: expected 4 comma-separated fields"),
    ("C1,U1,abc,5", "ratings.csv:3: expected a numeric rating"),
    ("C1,U1,5.0,yesterday", "ratings.csv:3: expected an integer timestamp"),
])
def test_process_malformed_ratings(tmp_path, capsys, bad, where):
    lines = _ratings_rows()
    lines.insert(2, bad)
    ratings, meta = _make_inputs(tmp_path, lines)
    out = tmp_path / "out"
    rc = process_amazon.main(["--ratings", ratings, "--meta", meta, "--out", str(out), "--name", "Test"])
    assert rc == 2
    err = _error_line(capsys.readouterr().err)
    assert where in err
    assert not (out / "Test").exists() or os.listdir(out / "Test") == []


def test_process_malformed_meta(tmp_path, capsys):
    ratings, meta = _make_inputs(tmp_path, meta_extra=["{not json"])
    rc = process_amazon.main(["--ratings", ratings, "--meta", meta, "--out", str(tmp_path / "o"), "--name", "T"])
    assert rc == 2
    err = _error_line(capsys.readouterr().err)
    assert "meta_Test.json.gz:10: expected one JSON object per line" in err
    assert not (tmp_path / "o" / "T").exists() or os.listdir(tmp_path / "o" / "T") == []


def test_process_runs_as_script(tmp_path):
    ratings, meta = _make_inputs(tmp_path)
    r = subprocess.run([sys.executable, os.path.join(REPO, "tools", "process_amazon.py"), "--ratings", ratings,
                        "--meta", meta, "--out", str(tmp_path / "o"), "--name", "S"],
                       capture_output=True, text=True, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "o" / "S" / "S.train.inter").exists()


def test_atomic_open_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_open(str(target)) as fp:
            fp.write("new")
            raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["f.txt"]


# ---------------------------------------------------------------- merge_pretrain
def _make_domain(root, name, rows, n_items, dim=4, suffixes=("feat1CLS", "feat2CLS", "feat3CLS")):
    d = root / name
    d.mkdir(parents=True)
    (d / f"{name}.train.inter").write_text(HEADER + "\n" + "".join(r + "\n" for r in rows))
    for k, suf in enumerate(suffixes):
        arr = (np.arange(n_items * dim, dtype="<f4") + 100 * k).reshape(n_items, dim)
        arr.tofile(str(d / f"{name}.{suf}"))
    return d


def test_merge_pretrain(tmp_path, capsys):
    data = tmp_path / "down"
    _make_domain(data, "Food", ["0\t0 1\t2", "0\t0\t1", "1\t3\t0"], n_items=4)
    _make_domain(data, "Home", ["0\t1\t0", "5\t0 1 2\t3"], n_items=5)
    out = tmp_path / "pre"
    rc = merge_pretrain.main(["--domains", "Food", "Home", "--data-path", str(data), "--out", str(out),
                              "--name", "FH", "--dim", "4"])
    assert rc == 0, capsys.readouterr().err
    d = out / "FH"
    assert _read(d / "FH.train.inter") == [HEADER, "0-0\t0-0 0-1\t0-2", "0-0\t0-0\t0-1", "0-1\t0-3\t0-0",
                                           "1-0\t1-1\t1-0", "1-5\t1-0 1-1 1-2\t1-3"]
    assert (d / "FH.pt_datasets").read_text().strip() == "Food,Home"
    for name in ("Food", "Home"):
        for suf in ("feat1CLS", "feat2CLS", "feat3CLS"):
            assert (d / f"{name}.{suf}").read_bytes() == (data / name / f"{name}.{suf}").read_bytes()
    # hard-link mode produces the same result
    rc = merge_pretrain.main(["--domains", str(data / "Food"), "--out", str(out), "--name", "F", "--dim", "4",
                              "--link"])
    assert rc == 0
    assert (out / "F" / "Food.feat3CLS").read_bytes() == (data / "Food" / "Food.feat3CLS").read_bytes()


def test_merge_missing_feature_file(tmp_path, capsys):
    data = tmp_path / "down"
    _make_domain(data, "Food", ["0\t0\t1"], n_items=2)
    _make_domain(data, "Home", ["0\t0\t1"], n_items=2, suffixes=("feat1CLS", "feat3CLS"))
    rc = merge_pretrain.main(["--domains", "Food", "Home", "--data-path", str(data),
                              "--out", str(tmp_path / "pre"), "--dim", "4"])
    assert rc == 2
    err = _error_line(capsys.readouterr().err)
    assert "Home.feat2CLS" in err and "missing" in err and "leave text out with --modal-type img" in err
    assert not (tmp_path / "pre").exists() or not any(os.scandir(tmp_path / "pre" / "FHCKM_mm_full"))


def test_merge_malformed_and_short_features(tmp_path, capsys):
    data = tmp_path / "down"
    _make_domain(data, "Food", ["0\t0\t1", "0\t0 x\t1"], n_items=2)
    rc = merge_pretrain.main(["--domains", "Food", "--data-path", str(data), "--out", str(tmp_path / "p"),
                              "--dim", "4"])
    assert rc == 2
    err = _error_line(capsys.readouterr().err)
    assert "Food.train.inter:3: expected non-negative integer item tokens" in err
    _make_domain(data, "Home", ["0\t0\t7"], n_items=2)
    with pytest.raises(ToolError, match="2 feature rows but the train file uses item token 7"):
        merge_pretrain.merge(["Home"], str(data), str(tmp_path / "p"), "P", dim=4, quiet=True)
    assert not (tmp_path / "p").exists() or not any(os.scandir(tmp_path / "p" / "P"))


def _add_item_files(d, name, n_items):
    (d / f"{name}.item2index").write_text("".join(f"R{i}\t{i}\n" for i in range(n_items)))
    (d / f"{name}.text").write_text("item_id:token\ttext:token_seq\n" + "".join(f"{i}\titem {i}\n"
                                                                                for i in range(n_items)))


def test_merge_text_only(tmp_path, capsys):
    # shaped like BTG_text: feat1CLS + feat2CLS, no feat3CLS; width from the item count
    data = tmp_path / "down"
    for name, n, dim in (("Beauty", 4, 6), ("Toys", 3, 6)):
        _make_domain(data, name, ["0\t0 1\t2", "1\t2\t0"], n_items=n, dim=dim, suffixes=("feat1CLS", "feat2CLS"))
        _add_item_files(data / name, name, n)
    out = tmp_path / "pre"
    rc = merge_pretrain.main(["--domains", "Beauty", "Toys", "--data-path", str(data), "--out", str(out),
                              "--name", "BT_text"])
    assert rc == 0, capsys.readouterr().err
    stdout = capsys.readouterr().out
    assert "modalities: text (feat1CLS, feat2CLS, 6 columns); pre-train with --modal_type=text --plm_size=6" \
        in stdout
    d = out / "BT_text"
    assert sorted(os.listdir(d)) == ["BT_text.pt_datasets", "BT_text.train.inter", "Beauty.feat1CLS",
                                     "Beauty.feat2CLS", "Beauty.item2index", "Beauty.text", "Toys.feat1CLS",
                                     "Toys.feat2CLS", "Toys.item2index", "Toys.text"]
    for name in ("Beauty", "Toys"):
        for suf in ("feat1CLS", "feat2CLS", "item2index", "text"):
            assert (d / f"{name}.{suf}").read_bytes() == (data / name / f"{name}.{suf}").read_bytes()
    assert _read(d / "BT_text.train.inter")[1:] == ["0-0\t0-0 0-1\t0-2", "0-1\t0-2\t0-0",
                                                     "1-0\t1-0 1-1\t1-2", "1-1\t1-2\t1-0"]


def test_merge_image_only_and_both(tmp_path, capsys):
    data = tmp_path / "down"
    _make_domain(data, "Food", ["0\t0\t1"], n_items=2, dim=4, suffixes=("feat3CLS",))
    _add_item_files(data / "Food", "Food", 2)
    res = merge_pretrain.merge(["Food"], str(data), str(tmp_path / "p"), "F", quiet=True)
    assert res["modal_type"] == "img" and res["dims"] == {"img": 4}
    assert sorted(os.listdir(tmp_path / "p" / "F")) == ["F.pt_datasets", "F.train.inter", "Food.feat3CLS",
                                                       "Food.item2index", "Food.text"]
    # text and image of different widths (384-d text, 512-d image in real corpora)
    home = _make_domain(data, "Home", ["0\t0\t1"], n_items=2, dim=3, suffixes=("feat1CLS", "feat2CLS"))
    np.zeros((2, 5), "<f4").tofile(str(home / "Home.feat3CLS"))
    _add_item_files(home, "Home", 2)
    assert merge_pretrain.main(["--domains", "Home", "--data-path", str(data), "--out", str(tmp_path / "p"),
                                "--name", "H"]) == 0
    assert ("text (feat1CLS, feat2CLS, 3 columns) and img (feat3CLS, 5 columns); pre-train with "
            "--modal_type=img_text --plm_size=3 --img_size=5") in capsys.readouterr().out


def test_merge_modalities_disagree(tmp_path, capsys):
    data = tmp_path / "down"
    _make_domain(data, "Food", ["0\t0\t1"], n_items=2)
    _make_domain(data, "Home", ["0\t0\t1"], n_items=2, suffixes=("feat1CLS", "feat2CLS"))
    args = ["--domains", "Food", "Home", "--data-path", str(data), "--out", str(tmp_path / "pre"), "--dim", "4"]
    assert merge_pretrain.main(args) == 2
    err = _error_line(capsys.readouterr().err)
    assert ("domains disagree on modalities: Food text+img, Home text; merge the shared ones with "
            "--modal-type text") in err
    assert not (tmp_path / "pre").exists() or not any(os.scandir(tmp_path / "pre" / "FHCKM_mm_full"))
    # asked for the shared modality: Food's image file is left out
    assert merge_pretrain.main(args + ["--modal-type", "text"]) == 0
    assert "modalities: text (" in capsys.readouterr().out
    assert not [f for f in os.listdir(tmp_path / "pre" / "FHCKM_mm_full") if f.endswith("feat3CLS")]
    assert merge_pretrain.main(args + ["--modal-type", "img"]) == 2
    assert "Home.feat3CLS: feature file missing for domain Home (--modal-type img needs feat3CLS" in \
        _error_line(capsys.readouterr().err)
    _make_domain(data, "Bare", ["0\t0\t1"], n_items=2, suffixes=())
    with pytest.raises(ToolError, match="no feature files for domain Bare"):
        merge_pretrain.merge(["Bare"], str(data), str(tmp_path / "p"), "B", dim=4, quiet=True)


def test_merge_widths(tmp_path):
    data = tmp_path / "down"
    for name, dim in (("Food", 4), ("Home", 6)):
        _make_domain(data, name, ["0\t0\t1"], n_items=3, dim=dim, suffixes=("feat1CLS", "feat2CLS"))
        _add_item_files(data / name, name, 3)
    with pytest.raises(ToolError, match=r"Home\.feat1CLS: 6 columns, but .*Food\.feat1CLS has 4; every domain's "
                                        r"text features must have the same width"):
        merge_pretrain.merge(["Food", "Home"], str(data), str(tmp_path / "p"), "P", quiet=True)
    os.remove(data / "Food" / "Food.item2index")
    with pytest.raises(ToolError, match=r"Food\.feat1CLS: cannot tell its width without Food\.item2index .*give --dim"):
        merge_pretrain.merge(["Food"], str(data), str(tmp_path / "p"), "P", quiet=True)
    with open(data / "Home" / "Home.item2index", "a") as fp:
        fp.write("R3\t3\n")  # 4 items, but 3 x 6 floats in the file
    with pytest.raises(ToolError, match=r"Home\.feat1CLS: size 72 bytes is not 4 rows \(Home\.item2index\)"):
        merge_pretrain.merge(["Home"], str(data), str(tmp_path / "p"), "P", quiet=True)
    assert merge_pretrain.merge(["Home"], str(data), str(tmp_path / "p"), "P", dim=6, quiet=True)["rows"] == 1
