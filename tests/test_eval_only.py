"""finetune.py --eval_only -p CKPT: a fine-tuned checkpoint's valid and test metrics, both conventions,
without training and without writing a checkpoint; exactly what its training run logged."""
import os
import re

import torch

import metrics as M
from checkpoints import STRUCTURE_KEYS
from data.loader import SeqBatches
from inference import load_model
from tests.conftest import FINETUNED_ARGS, save_original_checkpoint
from quick_start import build_config, checkpoint_model, evaluate_checkpoint, main, parse_args


def data_flags(finetuned, *extra):
    return ['-d', 'Demo', f"--data_path={finetuned['data_path']}", '--show_progress=False', '--use_gpu=False',
            *extra]


def evaluate(finetuned, path, *extra):
    args, rest = parse_args('finetune', data_flags(finetuned, '--eval_only', '-p', str(path), *extra))
    return evaluate_checkpoint(build_config('finetune', args, rest), str(path))


def test_eval_only_gives_the_logged_metrics(finetuned):
    out = finetuned['out']
    # the training run's flags, or only the data flags (the model's structure comes from the checkpoint)
    for extra in (FINETUNED_ARGS, []):
        got = evaluate(finetuned, finetuned['checkpoint'], *extra)
        assert got['valid'] == out['best_valid'] and got['test'] == out['test']
    log = open(out['log']).read()   # and the lines of the training run's log
    for name, res in (('best valid', got['valid']), ('test result', got['test'])):
        assert re.search(rf'{name} : (OrderedDict.*)', log.replace('test result:', 'test result :')).group(1) \
            == M.ordered_repr(res[0])
        assert re.search(rf'{name} \(original top-K\+1\)\s?: (OrderedDict.*)', log).group(1) == M.ordered_repr(res[1])


def test_eval_only_cli_prints_both_conventions_and_writes_nothing(finetuned, capsys):
    folder = os.path.dirname(finetuned['checkpoint'])
    before = sorted(os.listdir(folder))
    log_dir = os.path.dirname(finetuned['out']['log'])
    logs = sorted(os.listdir(log_dir))
    assert main('finetune', data_flags(finetuned, '--eval_only', '-p', finetuned['checkpoint'])) == 0
    printed = capsys.readouterr().out
    out = finetuned['out']
    for split, res in (('valid', out['best_valid']), ('test', out['test'])):
        for j, convention in enumerate(('exact top-K', 'original top-K+1')):
            row = f'| {split} ({convention}) | ' + ' | '.join(f'{v:.4f}' for v in res[j].values()) + ' |'
            assert row in printed
    assert 'epoch 0 training' not in printed and 'Discovering' not in printed
    assert sorted(os.listdir(folder)) == before and sorted(os.listdir(log_dir)) == logs


def test_eval_only_needs_a_checkpoint(finetuned, capsys):
    assert main('finetune', data_flags(finetuned, '--eval_only')) == 2
    assert '-p CKPT' in capsys.readouterr().err


def test_eval_only_original_format_checkpoint(finetuned, tmp_path, fake_recbole):
    """The original code's layout (pickled recbole Config) through the safe loader: the same metrics."""
    ckpt = torch.load(finetuned['checkpoint'], weights_only=True)
    final = dict(ckpt['config'])
    final['data_path'] = os.path.join(finetuned['data_path'], 'Demo')
    final.update({'model': 'MISSRec', 'device': torch.device('cpu'), 'metrics': ['Recall', 'NDCG']})
    path = save_original_checkpoint(fake_recbole, tmp_path / 'original.pth', final, ckpt)
    got = evaluate(finetuned, path)
    assert got['valid'] == finetuned['out']['best_valid'] and got['test'] == finetuned['out']['test']


def test_eval_only_sasrec_checkpoint(demo, tmp_path):
    from quick_start import finetune
    args = ['-d', 'Demo', '-m', 'SASRec', f'--data_path={demo}', f'--checkpoint_dir={tmp_path}/saved',
            f'--log_dir={tmp_path}/log', '--show_progress=False', '--use_gpu=False', '--epochs=2']
    out = finetune(build_config('finetune', *parse_args('finetune', args)))
    # the checkpoint says SASRec: no -m needed
    got = evaluate({'data_path': str(demo)}, out['checkpoint'])
    assert got['model'] == 'SASRec' and got['valid'] == out['best_valid'] and got['test'] == out['test']


def test_eval_only_and_recommend_build_the_same_model(finetuned, tmp_path):
    """One rule (checkpoints.model_from_checkpoint): from one checkpoint, --eval_only, whose command line
    says other structure values, and recommend.py (inference.load_model) build the model of the stored
    structure, with the same weights and the same scores."""
    ckpt = torch.load(finetuned['checkpoint'], weights_only=True)
    stored = dict(ckpt['config'], seq_mm_fusion='contextual', contextual_gather_quirk=False, temperature=0.05)
    path = str(tmp_path / 'structure.pth')
    torch.save(dict(ckpt, config=stored), path)
    flags = data_flags(finetuned, '--eval_only', '-p', path, '--hidden_size=64', '--temperature=0.07',
                       '--seq_mm_fusion=add', '--contextual_gather_quirk=True')
    evaluated, _, eval_model, _, _ = checkpoint_model(build_config('finetune', *parse_args('finetune', flags)), path)
    recommended, data, rec_model = load_model(path)
    assert ({k: evaluated[k] for k in STRUCTURE_KEYS} == {k: recommended[k] for k in STRUCTURE_KEYS}
            == {k: stored[k] for k in STRUCTURE_KEYS})
    assert eval_model.state_dict().keys() == rec_model.state_dict().keys()
    assert all(torch.equal(v, rec_model.state_dict()[k]) for k, v in eval_model.state_dict().items())
    batch = next(iter(SeqBatches(data.splits['test'], 64, pad_len=data.pad_len)))
    with torch.no_grad():
        assert torch.equal(eval_model.eval().full_sort_predict(batch), rec_model.eval().full_sort_predict(batch))
