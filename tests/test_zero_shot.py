"""finetune.py --eval_only -p PRETRAINED.pth: zero-shot evaluation of a pre-training checkpoint on a
downstream dataset (quick_start.evaluate_checkpoint): its weights, its structure, the run's stage and
interest ratio, interests discovered once on the target items, nothing written.

The data: the demo corpus and downstream set of tools/make_demo_data.py with the same seed share their
latent world (interest centres, text and image maps), but their users mostly stay in the interest of
the last item, which text similarity alone already predicts: a randomly initialised model is nearly as
good there (valid ndcg@10 0.350, against 0.360 after 6 pre-training epochs). Here every user walks the
interests in a fixed cycle instead (the next item is in interest j+1 after one in interest j), in both
sets, so only what pre-training learns transfers."""
import math
import os

import numpy as np
import pytest
import torch

import quick_start
from missrec import MISSRec
from tools.make_demo_data import _inter_bytes, pretrain_rows, split_rows, write_downstream, write_pretrain
from run_log import init_seed
from trainer import Trainer

TINY = ['--plm_size=32', '--img_size=32', '--hidden_size=32', '--inner_size=32', '--n_heads=2',
        '--show_progress=False', '--use_gpu=False']


pytestmark = pytest.mark.usefixtures('one_thread')   # (conftest.py)


def cyclic_sequences(interest, n_users, rng):
    """Each user: 6..K items of the interests start, start+1, ... (mod K), one item of each."""
    k = int(interest.max()) + 1
    members = [np.flatnonzero(interest == j) for j in range(k)]
    seqs = []
    for _ in range(n_users):
        start, n = rng.integers(k), rng.integers(6, k + 1)
        seqs.append([int(rng.choice(members[(start + t) % k])) for t in range(n)])
    return seqs


@pytest.fixture(scope='module')
def cyclic(tmp_path_factory):
    """{'demo': data_path of Demo (150 users, 60 items), 'pretrain': data_path of DemoPT (3 domains of
    40 users and 40 items)}, 32-d features, the interaction files rewritten with cyclic walks."""
    root, rng = tmp_path_factory.mktemp('cyclic'), np.random.default_rng(0)
    folder, data = write_downstream(root / 'down', name='Demo', n_users=150, n_items=60, dim=32, seed=7,
                                    return_data=True)
    rows = split_rows([str(u) for u in range(150)], cyclic_sequences(data.items.interest, 150, rng))
    for split, part in zip(('train', 'valid', 'test'), rows):
        open(os.path.join(folder, f'Demo.{split}.inter'), 'wb').write(_inter_bytes(part))
    folder, data = write_pretrain(root / 'pre', name='DemoPT', n_users_per_domain=40, n_items_per_domain=40,
                                  dim=32, seed=7, return_data=True)
    rows = []
    for d, domain in enumerate(data.domains):
        rows += pretrain_rows([f'{d}-{u}' for u in range(40)], cyclic_sequences(domain.items.interest, 40, rng),
                              item_token=lambda x, d=d: f'{d}-{x}')
    open(os.path.join(folder, 'DemoPT.train.inter'), 'wb').write(_inter_bytes(rows))
    return {'demo': root / 'down', 'pretrain': root / 'pre'}


@pytest.fixture(scope='module')
def pretrained(cyclic, tmp_path_factory):
    """{'trained': a checkpoint pre-trained 6 epochs on DemoPT, 'untrained': one of the same structure
    holding the initial weights}."""
    tmp = tmp_path_factory.mktemp('zero_shot')
    args = ['-d', 'DemoPT', f"--data_path={cyclic['pretrain']}", f'--checkpoint_dir={tmp}/saved',
            f'--log_dir={tmp}/log', *TINY, '--pretrain_epochs=6', '--save_step=6', '--train_batch_size=64']
    config = quick_start.build_config('pretrain', *quick_start.parse_args('pretrain', args))
    out = quick_start.pretrain(config)
    init_seed(config['seed'])
    untrained = tmp / 'untrained.pth'
    torch.save({'config': config.to_dict(), 'epoch': -1, 'state_dict': MISSRec(config, 2).state_dict()}, untrained)
    return {'trained': out['checkpoints'][-1], 'untrained': str(untrained)}


@pytest.fixture(scope='module')
def demo(cyclic):
    return cyclic['demo']


def flags(demo, path, mode, *extra):
    """Only the downstream data flags: the structure (hidden_size 32, ...) comes from the checkpoint."""
    return ['-d', 'Demo', f'--data_path={demo}', '--eval_only', '-p', str(path), '-mode', mode,
            '--show_progress=False', '--use_gpu=False', *extra]


def zero_shot(demo, path, mode, *extra):
    args, rest = quick_start.parse_args('finetune', flags(demo, path, mode, *extra))
    return quick_start.evaluate_checkpoint(quick_start.build_config('finetune', args, rest), str(path))


@pytest.mark.parametrize('mode', ['inductive', 'transductive'])
def test_pretraining_transfers_zero_shot(demo, pretrained, mode):
    """The pre-trained weights rank the next item far better than the initial ones, without fine-tuning
    (test ndcg@10, measured: inductive 0.211 against 0.012, transductive 0.221 against 0.023)."""
    trained, untrained = (zero_shot(demo, pretrained[k], mode) for k in ('trained', 'untrained'))
    assert trained['zero_shot'] and trained['model'] == 'MISSRec'
    print(mode, 'zero-shot test:', dict(trained['test'][0]), 'untrained:', dict(untrained['test'][0]))
    for split in ('valid', 'test'):
        for j in (0, 1):                                    # exact top-K, original top-K+1
            assert trained[split][j]['ndcg@10'] > untrained[split][j]['ndcg@10'] + 0.1


def test_zero_shot_loads_the_weights_with_the_downstream_stage(demo, pretrained, monkeypatch):
    seen = {}
    real = Trainer.discover

    def spy(self, epoch):
        seen.update(model=self.model, config=self.config, epoch=epoch)
        return real(self, epoch)

    monkeypatch.setattr(Trainer, 'discover', spy)
    zero_shot(demo, pretrained['trained'], 'inductive')
    model, config = seen['model'], seen['config']
    state = torch.load(pretrained['trained'], weights_only=True)['state_dict']
    for key in ('text_adaptor.weight', 'img_adaptor.bias', 'fusion_factor', 'position_embedding.weight'):
        assert torch.equal(model.state_dict()[key], state[key]), key
    # the checkpoint's structure, the run's stage and interest ratio (the pre-training one is 0.02)
    assert (config['hidden_size'], config['plm_size'], config['n_heads']) == (32, 32, 2)
    assert (config['train_stage'], config['interest_ratio'], config['pretrained_file']) == \
        ('inductive_ft', 0.5, pretrained['trained'])
    assert model.item_embedding is None and seen['epoch'] == 0
    n_items = model.plm_embedding.weight.shape[0]
    assert model.num_interest == math.ceil(2 * (n_items - 1) * 0.5)
    assert len(model.plm_interest_lookup_table[1:].unique()) > 1      # interests of the target items


@pytest.mark.parametrize('mode', ['inductive', 'transductive'])
def test_zero_shot_cli_logs_both_conventions_and_writes_nothing(demo, pretrained, mode, tmp_path, capsys):
    out = tmp_path / 'out'
    out.mkdir()
    argv = flags(demo, pretrained['trained'], mode, f'--checkpoint_dir={out}/saved', f'--log_dir={out}/log')
    assert quick_start.main('finetune', argv) == 0
    printed = capsys.readouterr().out
    assert f"Zero-shot evaluation of the pre-training checkpoint {pretrained['trained']}" in printed
    assert 'Discovering multi-modal user interest before 0-th epoch' in printed
    assert 'epoch 0 training' not in printed
    assert ('the ID embedding is untrained' in printed) == (mode == 'transductive')
    for split in ('valid', 'test'):
        assert f'{split} result: OrderedDict' in printed
        assert f'{split} result (original top-K+1): OrderedDict' in printed
        for convention in ('exact top-K', 'original top-K+1'):
            assert f'| {split} ({convention}) |' in printed
    assert list(os.walk(out)) == [(str(out), [], [])]


@pytest.mark.parametrize('half', [False, True])
def test_a_slimmed_checkpoint_evaluates_like_the_full_one(demo, pretrained, tmp_path, half):
    """tools/slim_checkpoint.py: weights only (no optimiser, no random states), optionally float16;
    `-p` takes it and the zero-shot metrics stay those of the full checkpoint (float16: within 0.0005)."""
    from tools.slim_checkpoint import main as slim_main
    slim = tmp_path / 'slim.pth'
    assert slim_main([pretrained['trained'], str(slim)] + (['--half'] if half else [])) == 0
    stored = torch.load(slim, weights_only=True)
    assert set(stored) >= {'config', 'epoch', 'state_dict'} and 'optimizer' not in stored
    assert (stored['state_dict']['text_adaptor.weight'].dtype == torch.float16) == half
    assert os.path.getsize(slim) < os.path.getsize(pretrained['trained']) / (4 if half else 2)
    full, small = (zero_shot(demo, p, 'inductive') for p in (pretrained['trained'], slim))
    for split in ('valid', 'test'):
        for metric, value in full[split][0].items():
            assert small[split][0][metric] == pytest.approx(value, abs=5e-4 if half else 0), (split, metric)
