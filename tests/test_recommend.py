"""recommend.py (its library: inference.py) on a checkpoint fine-tuned for one epoch on tiny demo data."""
import os
import subprocess
import sys

import pytest
import torch

from data.dataset import SeqDataset
import inference
from inference import recommend as recommend_items
from missrec import MISSRec
from tests.conftest import save_original_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def trained(finetuned):
    assert os.path.isfile(finetuned['checkpoint'])
    return finetuned


@pytest.fixture(scope='module')
def reference(trained):
    """Model and dataset rebuilt independently of recommend.py (the training config, weights_only load)."""
    config = trained['config']
    data = SeqDataset(config)
    model = MISSRec(config, data.n_items, data.plm_table, data.img_table)
    ckpt = torch.load(trained['checkpoint'], map_location='cpu', weights_only=True)
    model.load_state_dict(ckpt['state_dict'])
    model.eval()
    return data, model


def _test_histories(data, n=3):
    test = data.splits['test']
    out = []
    for r in range(n):
        ids = test['item_seq'][r, :test['item_seq_len'][r]].tolist()
        out.append([data.item_tokens[i - 1] for i in ids])
    return out


def test_top1_is_argmax_of_full_sort_predict(trained, reference):
    data, model = reference
    histories = _test_histories(data)
    results = recommend_items(trained['checkpoint'], [' '.join(h) for h in histories], topk=5)
    assert len(results) == len(histories)
    index = {t: i + 1 for i, t in enumerate(data.item_tokens)}
    for hist, res in zip(histories, results):
        ids = torch.tensor([[index[t] for t in hist]])
        with torch.no_grad():
            scores = model.full_sort_predict({'item_seq': ids, 'item_seq_len': torch.tensor([len(hist)])})
        scores[:, 0] = -float('inf')
        best = int(scores[0].argmax())
        assert res['history'] == hist
        assert len(res['items']) == 5 and [it['rank'] for it in res['items']] == [1, 2, 3, 4, 5]
        assert res['items'][0]['item_id'] == best and res['items'][0]['token'] == data.item_tokens[best - 1]
        assert res['items'][0]['score'] == pytest.approx(float(scores[0, best]), abs=1e-4)
        got = [it['score'] for it in res['items']]
        assert got == sorted(got, reverse=True)
        assert all(it['raw_id'] and it['text'] for it in res['items'])


def test_exclude_history_drops_history_items(trained, reference):
    data, _ = reference
    hist = _test_histories(data, 1)[0]
    everything = recommend_items(trained['checkpoint'], [' '.join(hist)], topk=data.n_items)[0]['items']
    assert len(everything) == data.n_items - 1                        # every item but PAD
    excluded = recommend_items(trained['checkpoint'], [' '.join(hist)], topk=10,
                                   exclude_history=True)[0]['items']
    assert not {it['token'] for it in excluded} & set(hist)
    assert [it['token'] for it in excluded] == [it['token'] for it in everything if it['token'] not in hist][:10]


def test_raw_ids_give_the_same_result(trained, reference):
    data, _ = reference
    hist = _test_histories(data, 1)[0]
    path = os.path.join(trained['data_path'], 'Demo', 'Demo.item2index')
    raw_of = {}
    for line in open(path, encoding='utf-8'):
        raw, idx = line.rstrip('\n').split('\t')
        raw_of[idx] = raw
    by_token = recommend_items(trained['checkpoint'], [' '.join(hist)], topk=3)
    by_raw = recommend_items(trained['checkpoint'], [' '.join(raw_of[t] for t in hist)], raw=True, topk=3)
    assert by_token == by_raw


def test_cli_prints_ranked_table(trained, reference, capsys):
    data, _ = reference
    hist = _test_histories(data, 2)
    rc = inference.main(['--checkpoint', trained['checkpoint'], '--history', ' '.join(hist[0]),
                         '--history', ' '.join(hist[1]), '--topk', '4'])
    out = capsys.readouterr().out
    assert rc == 0
    assert out.count('rank  item') == 2 and 'history 2 (' in out
    first = recommend_items(trained['checkpoint'], [' '.join(hist[0])], topk=1)[0]['items'][0]
    line = next(ln for ln in out.splitlines() if ln.strip().startswith('1 '))
    assert first['token'] in line and first['raw_id'] in line and f"{first['score']:.4f}" in line
    assert all(len(ln) <= 2 + 4 + 2 + 6 + 2 + 12 + 2 + 10 + 2 + 80 for ln in out.splitlines())


@pytest.mark.parametrize('extra, expected', [
    (['--history', '0 999999'], "item token '999999' does not occur"),
    (['--raw', '--history', 'NO_SUCH_ITEM'], "raw item id 'NO_SUCH_ITEM' is not in"),
    (['--history', ''], 'history 1: empty'),
])
def test_unknown_items_give_one_line_error(trained, capsys, extra, expected):
    rc = inference.main(['--checkpoint', trained['checkpoint'], *extra])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith('error: ') and expected in err and err.count('\n') == 1


def test_wrong_dataset_and_missing_checkpoint(trained, make_demo, tmp_path, capsys):
    other, _ = make_demo(name='Demo', n_users=30, n_items=15, dim=32, seed=5)
    rc = inference.main(['--checkpoint', trained['checkpoint'], '--data_path', str(other), '--history', '1'])
    err = capsys.readouterr().err
    assert rc == 2 and 'do not fit dataset Demo' in err and err.count('\n') == 1
    rc = inference.main(['--checkpoint', str(tmp_path / 'none.pth'), '--history', '1'])
    err = capsys.readouterr().err
    assert rc == 2 and err == f"error: {tmp_path / 'none.pth'}: checkpoint file not found\n"


def test_script_runs_from_the_command_line(trained):
    proc = subprocess.run([sys.executable, 'recommend.py', '--checkpoint', trained['checkpoint'],
                           '--history', 'nope'], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: history 1: item token 'nope'")


def test_original_format_checkpoint(trained, reference, tmp_path, fake_recbole):
    """A fine-tuned checkpoint in the original's layout (pickled recbole Config, data_path joined with
    the dataset name, RecBole-only keys) gives the same recommendations."""
    data, _ = reference
    ckpt = torch.load(trained['checkpoint'], weights_only=True)
    final = dict(ckpt['config'])
    final['data_path'] = os.path.join(trained['data_path'], 'Demo')
    final.update({'model': 'MISSRec', 'eval_args': {'mode': 'full'}, 'device': torch.device('cpu'),
                  'metrics': ['Recall', 'NDCG', 'Precision'], 'learner': 'Adam'})
    for k in ('kmeans_mode', 'interest_clustering', 'cluster_memory_mb', 'contextual_gather_quirk'):
        final.pop(k, None)
    path = save_original_checkpoint(fake_recbole, tmp_path / 'original.pth', final, ckpt, input_type=True)
    hist = ' '.join(_test_histories(data, 1)[0])
    assert recommend_items(str(path), [hist], topk=5) == recommend_items(trained['checkpoint'], [hist], topk=5)
