"""Pre-training (one process, CPU): data, augmentation, losses, the loop (trainer.Pretrainer), resume,
and transfer to fine-tuning."""
import os
import re
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import quick_start
from config import Config, ConfigError, parse_overrides, stage_files
from data.dataset import DataError
from data.pretrain import PretrainBatches, PretrainDataset, batch_seed, build_batch, draw_augmentation, item_drop
from missrec import MISSRec
from trainer import Pretrainer

# the CPU even where a GPU is present: resumed runs are compared bit for bit
TINY = ['--plm_size=32', '--img_size=32', '--hidden_size=32', '--inner_size=32', '--n_heads=2',
        '--show_progress=False', '--use_gpu=False']


pytestmark = pytest.mark.usefixtures('one_thread')   # (conftest.py)


@pytest.fixture(scope='module')
def pre(demo_pretrain):
    return demo_pretrain


def config(root, **kw):
    over = {'data_path': str(root), 'plm_size': 32, 'img_size': 32, 'hidden_size': 32, 'inner_size': 32,
            'n_heads': 2, 'train_stage': 'pretrain', 'show_progress': False, 'use_gpu': False, **kw}
    return Config('DemoPT', stage_files('pretrain'), over)


def arguments(root, tmp, *extra):
    return ['-d', 'DemoPT', f'--data_path={root}', f'--checkpoint_dir={tmp}/saved', f'--log_dir={tmp}/log',
            *TINY, *extra]


def pretrain(root, tmp, *extra, resume=''):
    config = quick_start.build_config('pretrain', *quick_start.parse_args('pretrain', arguments(root, tmp, *extra)))
    return quick_start.pretrain(config, resume)


# ------------------------------------------------------------------- data
def test_dataset_numbers_items_globally(pre):
    ds = PretrainDataset(config(pre))
    assert ds.domains == ['DemoA', 'DemoB', 'DemoC']
    assert set(ds.tables) == {'text', 'text_aug', 'img'} and ds.tables['text'].shape == (ds.n_items, 32)
    assert ds.tables['text'][0].abs().sum() == 0
    # item i's row is the feature row of its token in its domain's file
    i = 5
    d, r = map(int, ds.item_tokens[i - 1].split('-'))
    raw = np.fromfile(os.path.join(pre, 'DemoPT', f'{ds.domains[d]}.feat3CLS'), dtype='<f4').reshape(-1, 32)
    assert torch.equal(ds.tables['img'][i], torch.from_numpy(raw[r]))
    model = MISSRec(config(pre), ds.n_items)                        # the interest tables are the model's
    assert model.num_interest == max(-(-2 * (ds.n_items - 1) * 2 // 100), 1)           # ceil(M(N-1)*0.02)
    assert model.plm_interest_lookup_table.shape == (ds.n_items,)


def broken_copy(pre, tmp_path):
    dst = tmp_path / 'DemoPT'
    shutil.copytree(os.path.join(pre, 'DemoPT'), dst)
    return dst


def test_clear_errors_for_bad_pretraining_data(pre, tmp_path):
    dst = broken_copy(pre, tmp_path)
    os.remove(dst / 'DemoB.feat2CLS')
    with pytest.raises(DataError, match=r"DemoB\.feat2CLS: feature file of domain 'DemoB'"):
        PretrainDataset(config(tmp_path))
    shutil.copy(os.path.join(pre, 'DemoPT', 'DemoB.feat2CLS'), dst / 'DemoB.feat2CLS')
    inter = (dst / 'DemoPT.train.inter').read_text().splitlines()
    inter[1] = inter[1].rsplit('\t', 1)[0] + '\t7-0'
    (dst / 'DemoPT.train.inter').write_text('\n'.join(inter) + '\n')
    with pytest.raises(DataError, match=r"item token '7-0' names domain 7, but .* lists 3 domains"):
        PretrainDataset(config(tmp_path))
    inter[1] = inter[1].rsplit('\t', 1)[0] + '\t1-99999'
    (dst / 'DemoPT.train.inter').write_text('\n'.join(inter) + '\n')
    with pytest.raises(DataError, match=r"DemoB\.feat1CLS: item token '1-99999' has no feature row"):
        PretrainDataset(config(tmp_path))


# ----------------------------------------------------------- augmentation
def test_item_drop_compacts_and_quirk_overwrites():
    seq = torch.tensor([[11, 12, 13, 14, 0], [21, 22, 23, 0, 0]])
    lens = torch.tensor([4, 3])
    keep = torch.tensor([[True, False, True, False, True], [True, True, False, True, True]])
    fixed, fixed_len = item_drop(seq, lens, keep, quirk=False)
    assert fixed.tolist() == [[11, 13, 0, 0, 0], [21, 22, 0, 0, 0]] and fixed_len.tolist() == [2, 2]
    # the original's scatter: a dropped item overwrites the kept item before it
    quirk, quirk_len = item_drop(seq, lens, keep, quirk=True)
    assert quirk.tolist() == [[12, 14, 0, 0, 0], [21, 23, 0, 0, 0]] and quirk_len.tolist() == [2, 2]


def test_draw_augmentation_keeps_padding_and_first_item():
    seq = torch.arange(1, 41).view(4, 10)
    seq[:, 6:] = 0
    lens = torch.full((4,), 6)
    g = torch.Generator().manual_seed(0)
    aug = draw_augmentation(seq, lens, 0.9, 1.0, False, g)                 # always item drop
    assert aug['mode'] == 'item' and torch.equal(aug['item_seq_aug'][:, 0], seq[:, 0])
    assert (aug['item_seq_len_aug'] >= 1).all() and (aug['item_seq_aug'][:, 6:] == 0).all()
    aug = draw_augmentation(seq, lens, 0.5, 0.0, False, torch.Generator().manual_seed(0))   # word drop
    assert aug['mode'] == 'word' and aug['word_mask'].any() and torch.equal(aug['item_seq_aug'], seq)


def test_quirk_keeps_unaugmented_image_side(pre):
    ds = PretrainDataset(config(pre))
    model = MISSRec(config(pre), ds.n_items)
    model.set_interests(torch.arange(2 * (ds.n_items - 1)) % model.num_interest, torch.randn(model.num_interest, 32))
    rows = torch.arange(16)
    split = ds.split
    lens = split['item_seq_len'][rows]
    seq = split['item_seq'][rows, :int(lens.max())]
    keep = torch.rand(seq.shape, generator=torch.Generator().manual_seed(1)) < 0.5
    keep |= seq == 0
    keep[:, 0] = True
    out = {}
    for quirk in (False, True):
        aug, aug_len = item_drop(seq, lens, keep, quirk)
        b = {'item_seq': seq, 'item_seq_len': lens, 'item_id': split['item_id'][rows], 'item_seq_aug': aug,
             'item_seq_len_aug': aug_len, 'word_mask': None}
        out[quirk] = build_batch(ds, b, 'item', quirk)
    fixed, quirk = out[False], out[True]
    assert not torch.equal(fixed['item_seq_aug'], quirk['item_seq_aug'])
    # fixed: the image side follows the augmented sequence; quirk: it stays the original one
    assert torch.equal(fixed['index_aug']['img'], fixed['index_aug']['text'])
    assert torch.equal(quirk['index_aug']['img'], quirk['index']['img'])
    assert torch.equal(quirk['empty_aug']['img'], quirk['empty']['img'])
    assert torch.equal(quirk['modal_seq_aug']['img'], seq)
    assert torch.equal(quirk['modal_seq_aug']['text'], quirk['item_seq_aug'])
    assert torch.equal(fixed['modal_seq_aug']['img'], fixed['item_seq_aug'])
    # the interests the model looks up for the augmented copy: the image block is the un-augmented one
    L = seq.shape[1]
    ids = {q: (model.interest_ids(out[q]['item_seq']), model.interest_ids(out[q]['modal_seq_aug'])) for q in out}
    assert torch.equal(ids[True][1][:, L:], ids[True][0][:, L:])
    assert not torch.equal(ids[False][1][:, L:], ids[False][0][:, L:])


# ----------------------------------------------------------------- training
@pytest.fixture(scope='module')
def variant_losses(pre, tmp_path_factory):
    """variant_losses(*flags) -> [epoch 0 loss, epoch 1 loss] of a two-epoch pre-training run, each
    setting run once. One batch per epoch (1,074 rows): epoch 0's loss is the initial model's (the
    same weights and dropout draws for every setting), epoch 1's the loss after one optimiser step."""
    done = {}

    def losses(*extra):
        if extra not in done:
            out = pretrain(pre, tmp_path_factory.mktemp('variant'), '--pretrain_epochs=2', '--save_step=1',
                           '--train_batch_size=2048', *extra)
            ckpt = torch.load(out['checkpoints'][0], weights_only=True)
            assert ckpt['epoch'] == 0 and os.path.basename(out['checkpoints'][0]) == 'MISSRec-DemoPT-1.pth'
            assert ckpt['config']['train_stage'] == 'pretrain'
            assert {k: ckpt['config'][k] for k in parse_overrides(extra)} == parse_overrides(extra)
            assert len(out['losses']) == 2 and all(v > 0 for v in out['losses'])
            done[extra] = out['losses']
        return done[extra]
    return losses


@pytest.mark.parametrize('extra, base, changed', [
    # a computation of its own from the first step
    (['--modal_type=text'], [], 'from the first step'),
    (['--modal_type=img'], [], 'from the first step'),
    (['--seq_mm_fusion=contextual'], [], 'from the first step'),
    (['--item_drop_coefficient=1.0', '--item_drop_quirk=False'], ['--item_drop_coefficient=1.0'],
     'from the first step'),                                          # every batch item-dropped
    # per-item fusion factors start at 0 like the shared one: the same first step, then other updates
    (['--item_mm_fusion=dynamic_instance'], [], 'after the first step'),
    # the quirk is item drop's (none with word drop only); one modality has nothing to fuse
    (['--item_drop_coefficient=0.0', '--item_drop_quirk=False'], ['--item_drop_coefficient=0.0'], 'nothing'),
    (['--modal_type=text', '--item_mm_fusion=dynamic_instance'], ['--modal_type=text'], 'nothing'),
])
def test_pretraining_variants_change_the_loss_where_they_should(variant_losses, extra, base, changed):
    """Each setting reaches the training computation: with the same seed its losses differ from those of
    the run without it where it changes the computation, and are the same, bit for bit, where it does not."""
    got, expected = variant_losses(*extra), variant_losses(*base)
    if changed == 'from the first step':
        assert got[0] != expected[0]
    elif changed == 'after the first step':
        assert got[0] == expected[0] and got[1] != expected[1]
    else:
        assert got == expected


@pytest.mark.parametrize('quirk', [True, False])
def test_the_quirk_switch_reaches_the_training_step(pre, quirk):
    """The first training step of epoch 0 trains on the first global batch, item-dropped as the switch
    says (SPEC 3.4 QUIRK: the dropped item overwrites the kept one; the image side stays)."""
    cfg = config(pre, hidden_dropout_prob=0.0, item_drop_quirk=quirk, item_drop_coefficient=1.0, train_batch_size=64)
    trainer = Pretrainer(cfg, PretrainDataset(cfg), torch.device('cpu'))
    trainer.discover(0)
    trainer.batches.set_epoch(0)
    batch = next(iter(trainer.batches))
    split = trainer.dataset.split
    rows = trainer.batches.order()[:64]
    lens = split['item_seq_len'][rows]
    seq = split['item_seq'][rows, :int(lens.max())]

    def draw(q):   # the augmentation of global batch 0 of epoch 0
        g = torch.Generator().manual_seed(batch_seed(cfg['seed'], 0, 0))
        return draw_augmentation(seq, lens, cfg['item_drop_ratio'], 1.0, q, g)
    aug = draw(quirk)
    assert aug['mode'] == 'item' and not torch.equal(aug['item_seq_aug'], draw(not quirk)['item_seq_aug'])
    assert torch.equal(batch['item_seq_aug'], aug['item_seq_aug'])
    assert torch.equal(batch['item_seq_len_aug'], aug['item_seq_len_aug'])
    assert torch.equal(batch['modal_seq_aug']['img'], seq if quirk else aug['item_seq_aug'])
    with torch.no_grad():
        expected = trainer.model.calculate_loss(batch).item()
    assert trainer.step(batch) == pytest.approx(expected, rel=1e-6)


def test_resume_reproduces_uninterrupted_run(pre, tmp_path):
    common = ['--save_step=1', '--train_batch_size=128', '--ckpt_suffix=t']
    full = pretrain(pre, tmp_path / 'full', '--pretrain_epochs=3', *common)
    part = pretrain(pre, tmp_path / 'part', '--pretrain_epochs=2', *common)      # "interrupted" after 2
    resumed = pretrain(pre, tmp_path / 'part', '--pretrain_epochs=3', *common, resume=part['checkpoints'][-1])
    assert os.path.basename(resumed['checkpoints'][-1]) == 'MISSRec-DemoPT-3-t.pth'
    a = torch.load(full['checkpoints'][-1], weights_only=True)
    b = torch.load(resumed['checkpoints'][-1], weights_only=True)
    assert a['epoch'] == b['epoch'] == 2
    for k, v in a['state_dict'].items():
        assert torch.equal(v, b['state_dict'][k]), k
    assert full['losses'][2] == resumed['losses'][0]
    assert 'resuming at epoch 2' in open(resumed['log']).read()


def test_log_lines(pre, tmp_path):
    """The epoch's loss and its terms as logged: the terms sum to the loss, and each is its own weight
    times its own loss: with lambda 10 times and gamma 100 times the default (and learning rate 0, so
    that both runs score every batch with the same model) seq_item stays, the others scale by 10 and 100."""
    def logged(folder, *extra):
        out = pretrain(pre, folder, '--pretrain_epochs=1', '--train_batch_size=256', '--learning_rate=0', *extra)
        log = open(out['log']).read()
        loss = float(re.search(r'epoch 0 training \[time: [\d.]+s, train loss: ([\d.]+)\]', log).group(1))
        assert 'interests used' in log and loss == pytest.approx(out['losses'][0], abs=1e-4)
        terms = re.search(r'epoch 0 loss terms \[seq_item: ([\d.]+), lambda\*seq_seq: ([\d.]+), '
                          r'gamma\*reg: ([\d.]+)\]', log).groups()
        terms = [float(t) for t in terms]
        assert sum(terms) == pytest.approx(loss, abs=2e-4)
        return terms
    base = logged(tmp_path / 'base')
    assert all(t > 0 for t in base)
    item, pair, reg = logged(tmp_path / 'scaled', '--lambda=0.01', '--gamma=0.01')
    assert item == base[0]
    assert pair == pytest.approx(10 * base[1], abs=10 * 5e-5 + 5e-5)          # (4 decimals in the log)
    assert reg == pytest.approx(100 * base[2], abs=100 * 5e-5 + 5e-5)


def test_original_regime_trains_rank0_share_and_resumes_exactly(pre, tmp_path):
    """sync_gradients False with 4 models per batch: this process trains rank 0's model of the
    original's 4-process run (rows 0::4 of each global batch, its own negatives); killed after 2 epochs
    and resumed, it ends with the checkpoint of an uninterrupted run."""
    common = ['--save_step=1', '--train_batch_size=128', '--sync_gradients=False', '--models_per_batch=4']
    full = pretrain(pre, tmp_path / 'full', '--pretrain_epochs=3', *common)
    part = pretrain(pre, tmp_path / 'part', '--pretrain_epochs=2', *common)
    resumed = pretrain(pre, tmp_path / 'part', '--pretrain_epochs=3', *common, resume=part['checkpoints'][-1])
    a = torch.load(full['checkpoints'][-1], weights_only=True)['state_dict']
    b = torch.load(resumed['checkpoints'][-1], weights_only=True)['state_dict']
    for k, v in a.items():
        assert torch.equal(v, b[k]), k
    assert full['losses'][2] == resumed['losses'][0]
    batches = full['trainer'].batches
    assert (batches.rank, batches.world_size) == (0, 4)
    first = next(iter(batches))
    assert len(first['item_id']) == 32                                  # 128 rows / 4 models
    assert "gradients not synchronised (the original's regime)" in open(full['log']).read()
    synced = pretrain(pre, tmp_path / 'synced', '--pretrain_epochs=1', '--save_step=1', '--train_batch_size=128')
    assert synced['losses'][0] != full['losses'][0]


def test_models_per_batch_needs_unsynced_gradients(pre, tmp_path):
    with pytest.raises(ConfigError, match='models_per_batch = 4'):
        config(pre, models_per_batch=4)


def test_batches_are_the_global_batch_sharded(pre):
    ds = PretrainDataset(config(pre))
    one = next(iter(PretrainBatches(ds, 64, config(pre), seed=3)))
    halves = [next(iter(PretrainBatches(ds, 64, config(pre), seed=3, rank=r, world_size=2))) for r in (0, 1)]
    assert torch.equal(one['item_seq_aug'][0::2], halves[0]['item_seq_aug'])
    assert torch.equal(one['item_seq_aug'][1::2], halves[1]['item_seq_aug'])


# ---------------------------------------------------------------- transfer
def test_pretraining_helps_finetuning(make_demo, tmp_path):
    """Pre-train 20 epochs on the demo corpus, then fine-tune 3 epochs on the demo downstream set
    (which shares its latent world): the pre-trained start reaches a better valid NDCG@10 than a
    random start, with and without item IDs. Measured: transductive 0.3656 vs 0.3554, inductive
    0.3490 vs 0.3397; the runs are deterministic on the CPU, so the comparison is stable."""
    pre, _ = make_demo('pretrain', name='DemoPT', n_users_per_domain=300, n_items_per_domain=100, dim=32, seed=7)
    down, _ = make_demo(name='Demo', n_users=300, n_items=100, dim=32, seed=7)
    out = pretrain(pre, tmp_path, '--pretrain_epochs=20', '--save_step=20', '--train_batch_size=256')
    for mode in ('transductive', 'inductive'):
        scores = {}
        for name, p in (('pretrained', ['-p', out['checkpoints'][-1]]), ('scratch', [])):
            args = ['-d', 'Demo', f'--data_path={down}', '-mode', mode, *p, '--epochs=3',
                    f'--checkpoint_dir={tmp_path}/saved', f'--log_dir={tmp_path}/log', *TINY]
            config = quick_start.build_config('finetune', *quick_start.parse_args('finetune', args))
            scores[name] = quick_start.finetune(config)['best_valid'][0]['ndcg@10']
        print(mode, 'valid ndcg@10:', scores)
        assert scores['pretrained'] > scores['scratch'] + 0.005


def literal_side(model, ds, item_seq, lens, modal_seqs, word=None):
    """One sequence side of SPEC 3.4 through the model's `seq_output`, its inputs made here from the raw
    feature tables, not by build_batch: modal_seqs {modality: long [B, L]} the items each modality is read
    from; word: bool [B, L] where the text is the word-dropped feature. Returns (s, reg)."""
    modal_emb, empty = {}, {}
    for m in model.modalities:
        raw = ds.tables[m][modal_seqs[m]]                                          # [B, L, D]
        if m == 'text' and word is not None:
            raw = torch.where(word.unsqueeze(-1), ds.tables['text_aug'][modal_seqs[m]], raw)
        adapted = model.adaptor(m)(raw)                                            # [B, L, H]
        modal_emb[m] = (adapted.flatten(0, 1), torch.arange(raw.shape[0] * raw.shape[1]).view(raw.shape[:2]))
        empty[m] = ~raw.sum(-1).bool()
    return model.seq_output(item_seq, lens, modal_emb, empty, model.interest_ids(modal_seqs),
                            model.interest_embeddings, ds.pad_len)


def literal_fused(model, s, items):
    """SPEC 3.3's fusion of the per-modality logits, literally (a two-way softmax)."""
    x = torch.stack([s @ F.normalize(items[m], dim=1).t() for m in model.modalities], -1)
    if x.shape[-1] == 1:
        return x[..., 0]
    if model.item_mm_fusion == 'static':
        return x.mean(-1)
    return (x * F.softmax(x * model.fusion_factor.unsqueeze(-1), -1)).sum(-1)


@pytest.mark.parametrize('mode,quirk,fusion', [('item', True, 'dynamic_shared'), ('item', False, 'static'),
                                               ('word', True, 'dynamic_shared')])
def test_pretraining_step_loss_equals_a_literal_reference(pre, mode, quirk, fusion, plain):
    """The loss of a training step (Pretrainer.step, the packed path) is seq-item + lambda * seq-seq
    + gamma * (reg + reg') of SPEC 3.4, against the plain padded path on inputs made from the raw tables."""
    cfg = config(pre, hidden_dropout_prob=0.0, item_mm_fusion=fusion, kmeans_mode='lloyd', train_batch_size=64)
    ds = PretrainDataset(cfg)
    trainer = Pretrainer(cfg, ds, torch.device('cpu'))
    model = trainer.model
    if fusion != 'static':
        with torch.no_grad():
            model.fusion_factor.fill_(0.7)
    trainer.discover(0)
    assert len(model.plm_interest_lookup_table.unique()) > 2           # lloyd: several interests in use

    rows = torch.arange(24)
    lens = ds.split['item_seq_len'][rows]
    seq = ds.split['item_seq'][rows, :int(lens.max())]
    g = torch.Generator().manual_seed(3)
    keep = torch.rand(seq.shape, generator=g) < 0.7
    if mode == 'item':
        forced = keep | (seq == 0)
        forced[:, 0] = True
        seq_aug, lens_aug = item_drop(seq, lens, forced, quirk)
        word = None
    else:
        seq_aug, lens_aug, word = seq, lens, ~keep
    batch = build_batch(ds, {'item_seq': seq, 'item_seq_len': lens, 'item_id': ds.split['item_id'][rows],
                             'item_seq_aug': seq_aug, 'item_seq_len_aug': lens_aug, 'word_mask': word}, mode, quirk)
    with torch.no_grad():
        img_side = seq if (mode == 'item' and quirk) else seq_aug
        s, reg = plain(model, lambda: literal_side(model, ds, seq, lens, dict.fromkeys(model.modalities, seq)))
        s_aug, reg_aug = plain(model, lambda: literal_side(model, ds, seq_aug, lens_aug,
                                                           {'text': seq_aug, 'img': img_side}, word))
        target = ds.split['item_id'][rows]
        items = {m: model.adaptor(m)(ds.tables[m][target]) for m in model.modalities}
        labels = torch.arange(len(rows))
        expected = (F.cross_entropy(literal_fused(model, s, items) / model.temperature, labels)
                    + model.lam * F.cross_entropy(s @ s_aug.t() / model.temperature, labels)
                    + model.gamma * (reg + reg_aug))
    loss = trainer.step(batch)
    assert loss == pytest.approx(float(expected), rel=1e-5)


def test_a_nan_loss_stops_pretraining_naming_epoch_and_batch(pre, tmp_path, monkeypatch, capsys):
    real = MISSRec.pretrain_losses
    calls = {'n': 0}

    def nan_at_third_batch(self, *args, **kwargs):
        calls['n'] += 1
        seq_item, seq_seq, reg = real(self, *args, **kwargs)
        return (seq_item * float('nan'), seq_seq, reg) if calls['n'] == 3 else (seq_item, seq_seq, reg)

    monkeypatch.setattr(MISSRec, 'pretrain_losses', nan_at_third_batch)
    assert quick_start.main('pretrain', arguments(pre, tmp_path, '--pretrain_epochs=2', '--train_batch_size=64')) == 2
    assert 'training loss is nan at epoch 0, batch 2; the last good checkpoint is none yet' in capsys.readouterr().err


def test_nan_item_rows_stop_pretraining_at_interest_discovery(pre, tmp_path, monkeypatch, capsys):
    real = MISSRec.pretrain_interest_points
    calls = {'n': 0}

    def inf_before_third_epoch(self, *args):
        calls['n'] += 1
        points = real(self, *args)
        if calls['n'] == 3:
            points[5:7, 1] = float('inf')
        return points

    monkeypatch.setattr(MISSRec, 'pretrain_interest_points', inf_before_third_epoch)
    args = arguments(pre, tmp_path, '--pretrain_epochs=3', '--save_step=1', '--train_batch_size=128')
    assert quick_start.main('pretrain', args) == 2
    err = capsys.readouterr().err
    assert (f"error: interest discovery before epoch 2: 2 of 240 points are not finite (NaN or inf); "
            f"the last good checkpoint is {tmp_path}/saved/MISSRec-DemoPT-2.pth\n") in err


def test_text_only_corpus_like_btg_text_runs_and_resumes(make_demo, tmp_path):
    """A corpus shaped like BTG_text: 384-d text features, an .item2index per domain, no image
    files; pre-trained with --modal_type=text --plm_size=384, resumed after one epoch, it ends
    with the checkpoint of an uninterrupted run."""
    src = make_demo('pretrain', name='DemoPT', n_users_per_domain=20, n_items_per_domain=30, dim=384, seed=3)[0]
    root = tmp_path / 'data'
    shutil.copytree(src, root)
    for path in (root / 'DemoPT').glob('*.feat3CLS'):
        rows = path.stat().st_size // (384 * 4)
        (root / 'DemoPT' / (path.stem + '.item2index')).write_text(''.join(f'item{i}\t{i}\n' for i in range(rows)))
        path.unlink()
    args = ['--modal_type=text', '--plm_size=384', '--hidden_size=32', '--inner_size=32', '--n_heads=2',
            '--show_progress=False', '--use_gpu=False', '--save_step=1', '--train_batch_size=64']

    def run(tmp, *extra, resume=''):
        argv = ['-d', 'DemoPT', f'--data_path={root}', f'--checkpoint_dir={tmp}/saved', f'--log_dir={tmp}/log',
                *args, *extra]
        return quick_start.pretrain(quick_start.build_config('pretrain', *quick_start.parse_args('pretrain', argv)),
                                    resume)
    full = run(tmp_path / 'full', '--pretrain_epochs=2')
    part = run(tmp_path / 'part', '--pretrain_epochs=1')
    resumed = run(tmp_path / 'part', '--pretrain_epochs=2', resume=part['checkpoints'][-1])
    assert full['trainer'].model.modalities == ['text']
    a = torch.load(full['checkpoints'][-1], weights_only=True)['state_dict']
    b = torch.load(resumed['checkpoints'][-1], weights_only=True)['state_dict']
    assert not any('img' in k for k in a) and all(torch.equal(a[k], b[k]) for k in a)
    assert full['losses'][1] == resumed['losses'][0]
