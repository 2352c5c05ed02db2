"""Tests for tools/compare.py on small logs written here."""

import os
import subprocess
import sys

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
    # Scientific_mini is not the paper's Scientific: said plainly, differences left out
    assert "DIFFERENT DATASETS: this run is on Scientific_mini, the reference row run03.sh on Scientific" in ours
    r10 = next(line for line in ours.splitlines() if line.strip().startswith("R@10"))
    assert r10.split() == ["R@10", "0.1369", "0.1269", "n/a", "n/a"]
    assert "DIFFERENT" not in orig and "+6.1%" in orig
    assert "NOTE: 1 of 3 runs were compared with a reference row of another dataset (Scientific_mini vs " \
           "Scientific)" in out
    pantry = next(b for b in blocks if "pantry.log" in b)
    assert "run05.sh" in pantry and "no test result" in pantry and "DIFFERENT" not in pantry
    # asked for: the differences are shown, still flagged
    assert compare.main(["--logs", str(logs / "sub"), "--reference", str(ref), "--cross-dataset"]) == 0
    ours = capsys.readouterr().out
    assert "DIFFERENT DATASETS" in ours and "differences shown because of --cross-dataset" in ours
    r10 = next(line for line in ours.splitlines() if line.strip().startswith("R@10"))
    assert r10.split() == ["R@10", "0.1369", "0.1269", "+0.0100", "+7.9%"]
    n50 = next(line for line in ours.splitlines() if line.strip().startswith("N@50"))
    assert n50.split()[1:4] == ["0.0891", "0.0891", "+0.0000"]


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
    # ours.log (run03.sh) and pantry.log (run05.sh) with the original's run of their row
    assert "of 3 logs, with 2 of the original's dashed" in capsys.readouterr().out
    assert not [f for f in os.listdir(tmp) if f.endswith(".tmp")]


def test_plot_without_matplotlib(files, capsys, monkeypatch):
    tmp, ref, logs = files
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    assert compare.main(["--logs", str(logs), "--reference", str(ref), "--plot", str(tmp / "p.png"),
                         "--original", ""]) == 2
    assert "--plot needs matplotlib" in capsys.readouterr().err
    assert not (tmp / "p.png").exists()


# ------------------------------------------------------------- the original's own logs
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ORIGINAL = os.path.join(REPO, "reference_log", "original")
REFERENCE = os.path.join(REPO, "reference_log", "reference_metrics.csv")
# epochs run by each of the original's 20 logs (early stopping 11 epochs after the best)
ORIGINAL_EPOCHS = {
    "Arts/ID0/PT0": 118, "Arts/ID0/PT1": 125, "Arts/ID1/PT0": 46, "Arts/ID1/PT1": 177,
    "Instruments/ID0/PT0": 82, "Instruments/ID0/PT1": 99, "Instruments/ID1/PT0": 42, "Instruments/ID1/PT1": 76,
    "Office/ID0/PT0": 137, "Office/ID0/PT1": 101, "Office/ID1/PT0": 69, "Office/ID1/PT1": 167,
    "Pantry/ID0/PT0": 31, "Pantry/ID0/PT1": 61, "Pantry/ID1/PT0": 35, "Pantry/ID1/PT1": 43,
    "Scientific/ID0/PT0": 40, "Scientific/ID0/PT1": 91, "Scientific/ID1/PT0": 61, "Scientific/ID1/PT1": 87,
}


def test_parse_all_original_logs():
    rows = compare.load_reference(REFERENCE)
    paths = compare.collect_logs([ORIGINAL])
    assert len(paths) == 20
    scripts = set()
    for path in paths:
        key = os.path.relpath(os.path.dirname(path), os.path.join(ORIGINAL, "full"))
        folder, id_dir, pt_dir = key.split(os.sep)
        run = compare.parse_log(path)
        # the run's identity from its content agrees with the folder it is filed under
        assert run.original and run.dataset == f"{folder}_mm_full", path
        assert run.with_id == int(id_dir[2:]) and run.pretrained == int(pt_dir[2:]), path
        assert run.config["modal_type"] == "img_text" and run.topk_plus_one is True
        # every epoch: a training line (time, loss), an evaluating line and its valid result
        n = ORIGINAL_EPOCHS[key]
        assert [e for e, _, _ in run.train_curve] == list(range(n)), path
        assert [e for e, _ in run.valid_curve] == list(range(n)), path
        assert sorted(run.valid_results) == list(range(n)), path
        assert all(t > 0 and loss > 0 for _, t, loss in run.train_curve)
        for epoch, score in run.valid_curve:
            metrics = run.valid_results[epoch]
            assert sorted(metrics) == ["hit@10", "hit@50", "ndcg@10", "ndcg@50"]
            assert round(metrics["ndcg@10"], 4) == round(score, 4)  # valid_score = NDCG@10
        # the final lines: best epoch, its valid result, the test result = the paper's row
        assert run.best_epoch == n - 12 and run.results["valid"] == run.valid_results[run.best_epoch]
        row = compare.match_reference(run, rows)
        metrics, source = run.test_metrics
        assert source == "test result"
        assert compare.ours_metrics(metrics) == {k: row[k] for k in compare.METRICS}, path
        scripts.add(row["script"])
    assert len(scripts) == 20  # one log per reference row
    sci = compare.parse_log(compare.collect_logs([os.path.join(ORIGINAL, "full", "Scientific", "ID1", "PT0")])[0])
    assert sci.train_curve[0] == (0, 6.32, 513.0105)
    assert sci.valid_curve[0] == (0, 0.0534) and sci.valid_results[0]["hit@10"] == 0.1054


OUR_RUN01 = f"""{TS}
dataset = Scientific_mini
train_stage = transductive_ft
pretrained_file = 
script = run01.sh
modal_type = text
eval_topk_plus_one = False
note = run01-text
{TS}epoch 0 training [time: 7.91s, train loss: 148.3623]
{TS}epoch 0 evaluating [time: 0.73s, valid_score: 0.071700]
{TS}valid result: 
hit@10 : 0.1352    hit@50 : 0.3135    ndcg@10 : 0.0717    ndcg@50 : 0.1102
{TS}epoch 1 training [time: 7.75s, train loss: 138.3870]
{TS}epoch 1 evaluating [time: 1.00s, valid_score: 0.077700]
{TS}valid result: 
hit@10 : 0.1500    hit@50 : 0.3200    ndcg@10 : 0.0777    ndcg@50 : 0.1150
{TS}Finished training, best eval result in epoch 1
{TS}test result (original top-K+1): OrderedDict([('hit@10', 0.1636), ('hit@50', 0.3323), ('ndcg@10', 0.0849), ('ndcg@50', 0.1208)])
"""

OUR_PANTRY = f"""{TS}
dataset = Pantry_mm_full
train_stage = inductive_ft
pretrained_file = saved/MISSRec-FHCKM_mm_full-100.pth
modal_type = img_text
eval_topk_plus_one = True
{TS}epoch 0 training [time: 3.00s, train loss: 1390.5]
{TS}epoch 0 evaluating [time: 0.50s, valid_score: 0.030000]
{TS}valid result: 
hit@10 : 0.05    hit@50 : 0.1    ndcg@10 : 0.03    ndcg@50 : 0.04
"""


def _block(out, name):
    return next(b for b in out.split("\n\n") if b.startswith("==") and name in b.splitlines()[0])


def test_curves_beside_the_original(tmp_path, capsys):
    (tmp_path / "ours.log").write_text(OUR_RUN01)
    (tmp_path / "pantry.log").write_text(OUR_PANTRY)
    assert compare.main(["--logs", str(tmp_path), "--reference", REFERENCE, "--original", ORIGINAL]) == 0
    out = capsys.readouterr().out
    ours = _block(out, "ours.log")
    # matched by its script line to the original's run01.sh log, and every difference said
    assert "beside the original's run01.sh:" in ours and "Scientific/ID1/PT0/Oct-20-2023_03-18-42.log" in ours
    assert "DIFFERENT DATASETS: Scientific_mini vs the original's Scientific_mm_full" in ours
    assert "DIFFERENT MODALITIES: this run uses modal_type text, the original img_text" in ours
    assert "valid N@10 conventions differ: ours exact top-K, the original top-K+1" in ours
    rows = {line.split()[0]: line.split() for line in ours.splitlines() if line.strip()[:1].isdigit()}
    assert rows["0"] == ["0", "148.3623", "513.0105", "0.0717", "0.0534"]
    assert rows["1"][1] == "138.3870*" and rows["1"][3] == "0.0777*"  # our best epoch
    assert rows["49"] == ["49", "-", "390.0385*", "-", "0.0735*"]    # the original's best epoch
    assert len(rows) == 61
    assert "training time per epoch: ours 7.83 s" in ours
    # no script line: matched by dataset, mode and pre-training (Pantry, inductive, pre-trained = run08.sh)
    pantry = _block(out, "pantry.log")
    assert "beside the original's run08.sh:" in pantry and "Pantry/ID0/PT1/" in pantry
    assert "DIFFERENT" not in pantry and "conventions differ" not in pantry
    assert "NOTE: 1 of 2 runs were compared with a reference row of another dataset" in out
    # --no-curves: the tables alone
    assert compare.main(["--logs", str(tmp_path), "--reference", REFERENCE, "--no-curves"]) == 0
    assert "beside the original" not in capsys.readouterr().out


def test_original_folder_is_the_reference_not_a_run(tmp_path, capsys):
    logs = tmp_path / "reference_log"
    orig = logs / "original" / "full" / "Scientific" / "ID1" / "PT0"
    orig.mkdir(parents=True)
    src = compare.collect_logs([os.path.join(ORIGINAL, "full", "Scientific", "ID1", "PT0")])[0]
    (orig / "run.log").write_bytes(open(src, "rb").read())
    (logs / "ours.log").write_text(OUR_RUN01)
    args = ["--reference", REFERENCE, "--original", str(logs / "original")]
    assert compare.main(["--logs", str(logs)] + args) == 0
    out = capsys.readouterr().out
    assert [b.splitlines()[0] for b in out.split("\n\n") if b.startswith("==")] == [f"== {logs / 'ours.log'}"]
    assert "(1 logs of the original code under" in out and "beside the original's run01.sh" in out
    # named directly, the original's logs are listed (against the paper's rows: same dataset, no note)
    assert compare.main(["--logs", str(logs / "original")] + args) == 0
    out = capsys.readouterr().out
    assert "original code -> run01.sh" in out and "+0.0%" in out and "DIFFERENT" not in out
    assert "beside the original" not in out
    assert compare.main(["--logs", str(logs)] + args[:2] + ["--original", str(tmp_path / "nope")]) == 2
    assert "nope: folder of the original's logs not found" in capsys.readouterr().err


def test_plot_with_originals(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    (tmp_path / "ours.log").write_text(OUR_RUN01)
    (tmp_path / "pantry.log").write_text(OUR_PANTRY)
    png = tmp_path / "curves.png"
    assert compare.main(["--logs", str(tmp_path), "--reference", REFERENCE, "--original", ORIGINAL,
                         "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "of 2 logs, with 2 of the original's dashed" in capsys.readouterr().out


def test_malformed_valid_result(tmp_path, capsys):
    bad = tmp_path / "bad.log"
    bad.write_text(f"{TS}\ndataset = Scientific\n{TS}epoch 0 evaluating [time: 1.0s, valid_score: 0.05]\n"
                   f"{TS}valid result: \n{TS}something else\n")
    assert compare.main(["--logs", str(bad), "--reference", REFERENCE, "--original", ""]) == 2
    assert "bad.log:5: expected 'metric : value' pairs after 'valid result:'" in capsys.readouterr().err


def _seed_log(seed, ndcg, pretrained='', kmeans='lloyd', stage='inductive_ft', note=None):
    note = note or ('pt' if pretrained else 'scratch')
    return (f"{TS}\ndataset = Scientific_mini\ntrain_stage = {stage}\nmodel = MISSRec\nseed = {seed}\n"
            f"kmeans_mode = {kmeans}\npretrained_file = {pretrained}\nnote = {note}\n"
            f"{TS}test result: OrderedDict([('hit@10', 0.2), ('hit@50', 0.3), ('ndcg@10', {ndcg}), ('ndcg@50', 0.1)])\n")


def test_paired_differences_by_seed_with_a_t_interval(tmp_path, capsys):
    """--paired: pre-trained minus scratch of the same seed and kmeans_mode; mean ± sd [95% t interval]."""
    scratch = {1: 0.050, 2: 0.060, 3: 0.055}
    lifted = {1: 0.052, 2: 0.061, 3: 0.058}                      # differences 0.002, 0.001, 0.003
    for seed in scratch:
        (tmp_path / f"s{seed}.log").write_text(_seed_log(seed, scratch[seed]))
        (tmp_path / f"p{seed}.log").write_text(_seed_log(seed, lifted[seed], pretrained='pt.pth'))
        # another kmeans_mode's scratch run of the same seed must not be paired with them
        (tmp_path / f"o{seed}.log").write_text(_seed_log(seed, 0.9, kmeans='original'))
    assert compare.main(["--logs", str(tmp_path), "--paired"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if "| pt |" in line]
    assert len(rows) == 1
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert cells[3] == "lloyd" and cells[5] == "exact top-K" and cells[6] == "3"
    # mean 0.002, sd 0.001, half-width t(0.975, 2) * 0.001 / sqrt(3) = 4.303 * 0.000577 = 0.0025
    assert cells[8] == "+0.0020 ± 0.0010 [-0.0005, +0.0045]"
    assert cells[7].startswith("+0.0000 ± 0.0000") and cells[-1] == "3 of 3"
    assert compare.main(["--logs", str(tmp_path / "s1.log"), "--paired"]) != 0   # nothing to pair
    assert "no pre-trained run has a run from scratch" in capsys.readouterr().err


def test_paired_against_another_pretraining(tmp_path, capsys):
    """--paired --baseline TEXT: each pre-trained run minus the pre-trained run of the same seed and
    kmeans_mode whose note contains TEXT; the runs from scratch are left out of the pairs."""
    for seed, (base, other) in {1: (0.050, 0.053), 2: (0.060, 0.061), 3: (0.055, 0.057)}.items():
        (tmp_path / f"s{seed}.log").write_text(_seed_log(seed, 0.9))
        (tmp_path / f"a{seed}.log").write_text(_seed_log(seed, base, pretrained='a.pth', note='pt-orig4'))
        (tmp_path / f"b{seed}.log").write_text(_seed_log(seed, other, pretrained='b.pth', note='pt-sync'))
    assert compare.main(["--logs", str(tmp_path), "--paired", "--baseline", "orig4"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if "top-K |" in line]
    assert len(rows) == 1 and "| pt-sync |" in rows[0]
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert cells[8] == "+0.0020 ± 0.0010 [-0.0005, +0.0045]" and cells[-1] == "3 of 3"
    (tmp_path / "a1-again.log").write_text(_seed_log(1, 0.07, pretrained='a.pth', note='pt-orig4'))
    assert compare.main(["--logs", str(tmp_path), "--paired", "--baseline", "orig4"]) == 2
    assert "a second run whose note contains 'orig4'" in capsys.readouterr().err
    assert compare.main(["--logs", str(tmp_path), "--paired", "--baseline", "nothing"]) == 2
    assert "no pre-trained run has a run whose note contains 'nothing'" in capsys.readouterr().err


def test_table_reads_each_convention_from_its_own_line(tmp_path, capsys):
    """A run that selects on the original top-K+1 (the run scripts) logs `test result:` in that
    convention and the exact top-K on a line of its own: --table takes each from its line."""
    (tmp_path / "run.log").write_text(
        f"{TS}\ndataset = Scientific_mini\ntrain_stage = inductive_ft\neval_topk_plus_one = True\n"
        f"{TS}test result: OrderedDict([('hit@10', 0.3), ('hit@50', 0.5), ('ndcg@10', 0.2), ('ndcg@50', 0.25)])\n"
        f"{TS}test result (original top-K+1): OrderedDict([('hit@10', 0.3), ('hit@50', 0.5), ('ndcg@10', 0.2), "
        f"('ndcg@50', 0.25)])\n"
        f"{TS}test result (exact top-K): OrderedDict([('hit@10', 0.28), ('hit@50', 0.49), ('ndcg@10', 0.19), "
        f"('ndcg@50', 0.24)])\n")
    (tmp_path / "orig.log").write_text(ORIGINAL_LOG)    # the original code: top-K+1 only
    assert compare.main(["--logs", str(tmp_path), "--table"]) == 0
    rows = {(c[4] or c[0], c[5]): c[7:9] for c in ([x.strip() for x in line.strip("|").split("|")]
                                                  for line in capsys.readouterr().out.splitlines()[2:])}
    assert rows[("MISSRec", "exact top-K")] == ["0.2800", "0.1900"]
    assert rows[("MISSRec", "original top-K+1")] == ["0.3000", "0.2000"]
    original = [k for k in rows if k[0].startswith("MISSRec (original")]
    assert original == [("MISSRec (original code)", "original top-K+1")]


def test_reader_closing_the_pipe_early_ends_quietly():
    """``compare.py --logs reference_log | head -1``: no traceback, exit code 1 (the report, about
    300 kB, is larger than a pipe holds, so the tool is still writing when the reader leaves)."""
    proc = subprocess.Popen(
        [sys.executable, os.path.join(REPO, "tools", "compare.py"), "--logs", os.path.join(REPO, "reference_log")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    assert proc.stdout.readline().startswith(b"==")
    proc.stdout.close()  # the reader goes away with most of the report unwritten
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 1
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
