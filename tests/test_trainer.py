"""trainer.py: early stopping and the best checkpoint (SPEC 4), the one epoch of both stages,
and logging (every module's warnings reach the run's log)."""
import collections
import re

import torch

import quick_start
from checkpoints import load_checkpoint
from config import Config
from missrec import MISSRec
from trainer import Trainer


def scripted_trainer(tmp_path, scores, stopping_step, caplog):
    """A Trainer whose epochs only mark the weights with the epoch number and whose validation
    returns `scores[epoch]` as NDCG@10."""
    cfg = Config('Demo', overrides=dict(hidden_size=16, inner_size=16, n_heads=2, plm_size=8, img_size=8,
                                        epochs=len(scores), stopping_step=stopping_step, show_progress=False,
                                        checkpoint_dir=str(tmp_path)))
    table = torch.randn(12, 8)
    model = MISSRec(cfg, 12, table, table.clone())
    trainer = Trainer(cfg, model, torch.device('cpu'))
    evaluated = []

    def fit_epoch(batches, epoch):
        with torch.no_grad():
            model.LayerNorm.bias.fill_(epoch)
        return 0.0

    def evaluate(batches, desc='Evaluate'):
        epoch = int(model.LayerNorm.bias[0])
        evaluated.append(epoch)
        result = collections.OrderedDict([('ndcg@10', scores[epoch])])
        return result, result

    trainer._fit_epoch, trainer.evaluate = fit_epoch, evaluate
    caplog.set_level('INFO')
    return trainer, evaluated


def test_early_stopping_ties_count_as_improvement_and_the_best_checkpoint_comes_back(tmp_path, caplog):
    #         epoch:  0     1     2     3     4     5     6     7
    scores = [0.10, 0.10, 0.09, 0.10, 0.08, 0.07, 0.06, 0.50]
    trainer, evaluated = scripted_trainer(tmp_path, scores, stopping_step=2, caplog=caplog)
    best_score, best_results = trainer.fit(None, None)
    # ties (>=) are improvements: epochs 1 and 3 became the best; epochs 4, 5 and 6 did not improve,
    # and the stopping_step + 1 = 3rd evaluation without improvement stopped the run (7 never ran)
    assert evaluated == [0, 1, 2, 3, 4, 5, 6]
    assert trainer.best_valid_epoch == 3 and best_score == 0.10 and best_results[0]['ndcg@10'] == 0.10
    assert 'Finished training, best eval result in epoch 3' in caplog.text
    assert caplog.text.count('Saving current:') == 3                  # epochs 0, 1 and 3
    best = load_checkpoint(trainer.saved_model_file)
    last = load_checkpoint(trainer.last_model_file)
    assert best['epoch'] == 3 and best['cur_step'] == 0
    assert last['epoch'] == 6 and last['cur_step'] == 3 and last['best_valid_epoch'] == 3
    # the weights at the end are epoch 6's; the best checkpoint brings back epoch 3's, buffers included
    assert torch.equal(trainer.model.LayerNorm.bias, torch.full((16,), 6.0))
    trainer.load_best()
    assert torch.equal(trainer.model.LayerNorm.bias, torch.full((16,), 3.0))
    assert torch.equal(trainer.model.interest_embeddings, best['state_dict']['interest_embeddings'])


def test_a_run_without_improvement_stops_after_stopping_step_plus_one_evaluations(tmp_path, caplog):
    scores = [0.3, 0.2, 0.2, 0.2, 0.2, 0.9]
    trainer, evaluated = scripted_trainer(tmp_path, scores, stopping_step=3, caplog=caplog)
    trainer.fit(None, None)
    assert evaluated == [0, 1, 2, 3, 4] and trainer.best_valid_epoch == 0


def test_the_warnings_of_every_module_reach_the_log_of_the_run(demo, tmp_path):
    """data/dataset.py warns while it reads, before the log file exists; the run's log has the warning."""
    args = ['-d', 'Demo', f'--data_path={demo}', f'--checkpoint_dir={tmp_path}/saved', f'--log_dir={tmp_path}/log',
            '--epochs=1', '--hidden_size=8', '--inner_size=8', '--n_heads=2', '--plm_size=32', '--img_size=32',
            '--use_gpu=False', '--show_progress=False', '--MAX_ITEM_LIST_LENGTH=3']
    log = open(quick_start.finetune(quick_start.build_config('finetune', *quick_start.parse_args('finetune', args)))
               ['log']).read()
    warning = re.search(r'WARNING  (\d+) histories are longer than MAX_ITEM_LIST_LENGTH = 3', log)
    assert warning and int(warning.group(1)) > 0
    assert log.index('histories are longer') < log.index('epoch 0 training')
