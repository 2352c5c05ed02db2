"""Tests for tools/compare.py on small logs written here."""

import os

import pytest

from tools import compare

REF = """script,dataset,with_id,pretrained,R@10,N@10,R@50,N@50
run01.sh,Scientific,1,0,0.1282,0.0711,0.2376,0.0946
run02.sh,Scientific,1,1,0.136,0.0753,0.2431,0.0983
run03.sh,Scientific,0,0,0.1269,0.0659,0.2354,0.0891
run05.sh,Pantry,1,0,0.0771,0.0363,0.1804,0.0583
"""

TS = "Fri 20 Oct 2023 03:18:55 INFO  "

ORIGINAL_LOG = f"""{TS}
General Hyper Parameters:
gpu_id = 0
seed = 2020

dataset = Scientific_mm_full
train_stage = transductive_ft

{TS}epoch 0 training [time: 6.32s, train loss: 513.0105]
{TS}epoch 0 evaluating [time: 0.70s, valid_score: 0.053400]
{TS}valid result: 
hit@10 : 0.1054    hit@50 : 0.2207    ndcg@10 : 0.0534    ndcg@50 : 0.078
{TS}epoch 1 training [time: 6.32s, train loss: 480.0105]
{TS}epoch 1 evaluating [time: 0.70s, valid_score: 0.061200]
{TS}valid result: 
hit@10 : 0.12    hit@50 : 0.23    ndcg@10 : 0.0612    ndcg@50 : 0.08
{TS}Finished training, best eval result in epoch 1
{TS}best valid : OrderedDict([('hit@10', 0.1416), ('hit@50', 0.2592), ('ndcg@10', 0.0745), ('ndcg@50', 0.1003)])
{TS}test result: OrderedDict([('hit@10', 0.136), ('hit@50', 0.2431), ('ndcg@10', 0.0753), ('ndcg@50', 0.0983)])
"""

OUR_LOG = f"""{TS}
dataset = Scientific_mini
train_stage = inductive_ft
pretrained_file = 
script = run03.sh
{TS}epoch 0 evaluating [time: 0.70s, valid_score: 0.010000]
{TS}epoch 1 evaluating [time: 0.70s, valid_score: 0.020000]
{TS}epoch 2 evaluating [time: 0.70s, valid_score: 0.015000]
{TS}best valid : OrderedDict([('hit@10', 0.2), ('hit@50', 0.3), ('ndcg@10', 0.1), ('ndcg@50', 0.12)])
{TS}best valid (original top-K+1) : OrderedDict([('hit@10', 0.21), ('hit@50', 0.31), ('ndcg@10', 0.11), ('ndcg@50', 0.13)])
{TS}test result: OrderedDict([('hit@10', 0.5), ('hit@50', 0.5), ('ndcg@10', 0.5), ('ndcg@50', 0.5)])
{TS}test result (original top-K+1): OrderedDict([('hit@10', np.float64(0.1369)), ('hit@50', 0.2354), ('ndcg@10', 0.0659), ('ndcg@50', 0.0891)])
"""

PANTRY_LOG = f"""{TS}
dataset = Pantry
train_stage = transductive_ft
pretrained_file = ''
{TS}epoch 0 evaluating [time: 0.70s, valid_score: 0.030000]
"""


@pytest.fixture
def files(tmp_path):
    ref = tmp_path / "reference_metrics.csv"
    ref.write_text(REF)
    logs = tmp_path / "logs"
    (logs / "sub").mkdir(parents=True)
    (logs / "orig.log").write_text(ORIGINAL_LOG)
    (logs / "sub" / "ours.log").write_text(OUR_LOG)
    (logs / "pantry.log").write_text(PANTRY_LOG)
    (logs / "notes.txt").write_text("not a log")
    return tmp_path, ref, logs


def test_parse_log_original_format(files):
    _, _, logs = files
    run = compare.parse_log(str(logs / "orig.log"))
    assert run.dataset == "Scientific_mm_full" and run.stage == "transductive_ft"
    assert run.with_id == 1 and run.pretrained == 0 and run.script == ""
    assert run.valid_curve == [(0, 0.0534), (1, 0.0612)]
    metrics, source = run.test_metrics
    assert source == "test result" and metrics["hit@10"] == 0.136 and metrics["ndcg@50"] == 0.0983
    assert run.results["valid"]["ndcg@10"] == 0.0745


def test_compare_table(files, capsys):
    _, ref, logs = files
    rc = compare.main(["--logs", str(logs), "--reference", str(ref)])
    assert rc == 0
    out = capsys.readouterr().out
    blocks = [b for b in out.strip().split("\n\n") if b.startswith("==")]
    assert len(blocks) == 3  # notes.txt ignored
    orig = next(b for b in blocks if "orig.log" in b)
    # Scientific_mm_full, transductive, no pretrained_file -> run01.sh
    assert "run01.sh" in orig
    r10 = next(line for line in orig.splitlines() if line.strip().startswith("R@10"))
    assert r10.split() == ["R@10", "0.1360", "0.1282", "+0.0078", "+6.1%"]
    ours = next(b for b in blocks if "ours.log" in b)
    # script line wins; the original top-K+1 line is preferred over 'test result:'
    assert "run03.sh" in ours and "test result (original top-K+1)" in ours
    r10 = next(line for line in ours.splitlines() if line.strip().startswith("R@10"))
    assert r10.split() == ["R@10", "0.1369", "0.1269", "+0.0100", "+7.9%"]
    n50 = next(line for line in ours.splitlines() if line.strip().startswith("N@50"))
    assert n50.split()[1:4] == ["0.0891", "0.0891", "+0.0000"]
    pantry = next(b for b in blocks if "pantry.log" in b)
    assert "run05.sh" in pantry and "no test result" in pantry


def test_match_by_prefix_and_pretrained(files):
    _, ref, _ = files
    rows = compare.load_reference(str(ref))
    run = compare.LogRun(path="x", config={"dataset": "Scientific_mini", "train_stage": "transductive_ft",
                                           "pretrained_file": "saved/MISSRec-FHCKM-100.pth"})
    assert compare.match_reference(run, rows)["script"] == "run02.sh"
    run = compare.LogRun(path="x", config={"dataset": "Scientificx", "train_stage": "transductive_ft"})
    assert compare.match_reference(run, rows) is None
    run = compare.LogRun(path="x", config={"dataset": "Scientific", "train_stage": "pretrain"})
    assert compare.match_reference(run, rows) is None


def test_parse_metric_dict_safe():
    assert compare.parse_metric_dict("OrderedDict([('hit@10', 0.1), ('ndcg@10', 0.05)])") == {"hit@10": 0.1,
                                                                                            "ndcg@10": 0.05}
    assert compare.parse_metric_dict("{'hit@10': 0.2}") == {"hit@10": 0.2}
    assert compare.parse_metric_dict("OrderedDict([('hit@10', __import__('os'))])") is None
    assert compare.parse_metric_dict("garbage") is None


def test_malformed_inputs(files, capsys):
    tmp, ref, logs = files
    bad = tmp / "bad.log"
    bad.write_text(f"{TS}\ndataset = Scientific\n{TS}test result: OrderedDict([oops\n")
    assert compare.main(["--logs", str(bad), "--reference", str(ref)]) == 2
    err = capsys.readouterr().err
    assert "error: " in err and "bad.log:3: expected 'test result: OrderedDict" in err and "Traceback" not in err
    badref = tmp / "badref.csv"
    badref.write_text(REF + "run09.sh,Instruments,1,zero,0.1,0.1,0.1,0.1\n")
    assert compare.main(["--logs", str(logs), "--reference", str(badref)]) == 2
    err = capsys.readouterr().err
    assert "badref.csv:6: expected integer with_id/pretrained" in err
    assert compare.main(["--logs", str(tmp / "nope"), "--reference", str(ref)]) == 2
    assert "nope: no such log file or folder" in capsys.readouterr().err


def test_plot(files, capsys):
    pytest.importorskip("matplotlib")
    tmp, ref, logs = files
    png = tmp / "curves.png"
    assert compare.main(["--logs", str(logs), "--reference", str(ref), "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "plotted 3 validation curves" in capsys.readouterr().out
    assert not [f for f in os.listdir(tmp) if f.endswith(".tmp")]


def test_plot_without_matplotlib(files, capsys, monkeypatch):
    tmp, ref, logs = files
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    assert compare.main(["--logs", str(logs), "--reference", str(ref), "--plot", str(tmp / "p.png")]) == 2
    assert "--plot needs matplotlib" in capsys.readouterr().err
    assert not (tmp / "p.png").exists()
