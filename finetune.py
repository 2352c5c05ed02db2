"""Fine-tune MISSRec on a downstream dataset and report valid/test metrics.

    python finetune.py -d Scientific_mm_full                          # from scratch, with item IDs
    python finetune.py -d Scientific_mm_full -p saved/MISSRec-FHCKM_mm_full-100.pth
    python finetune.py -d Scientific_mm_full -mode inductive          # no ID embedding
    python finetune.py -d Scientific_mini --data_path=../shared/datasets/downstream/ --kmeans_mode=lloyd

Multi-process: `torchrun --nproc_per_node=4 ddp_finetune.py -d ...`.
Any config key can be overridden with --key=value (see config.py and props/).
"""
import argparse
import logging
import os
import sys

import torch

import distributed as D
import metrics as M
from checkpoints import CheckpointError, load_checkpoint
from config import Config, ConfigError, parse_overrides, stage_files
from data.dataset import DataError, SeqDataset
from data.loader import SeqBatches
from missrec import MISSRec
from trainer import Trainer, init_logger, init_seed, local_time, logger


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('-d', type=str, default='Scientific_mm_full', help='dataset name')
    parser.add_argument('-p', type=str, default='', help='pre-trained checkpoint to start from')
    parser.add_argument('-f', '--freeze', action=argparse.BooleanOptionalAction, default=True,
                        help='with -p: freeze the position embedding and the Transformer (default on)')
    parser.add_argument('-props', type=str, default='', help='comma-separated props files '
                        '(default: props/MISSRec.yaml,props/finetune.yaml)')
    parser.add_argument('-mode', choices=['transductive', 'inductive'], default='transductive')
    parser.add_argument('-note', type=str, default='', help='a word added to the log file name')
    parser.add_argument('--resume', type=str, default='', help='continue an interrupted run from its '
                        'saved/MISSRec-{time}-last.pth (same command line otherwise)')
    args, rest = parser.parse_known_args(argv)
    return args, rest


def build_config(args, rest):
    overrides = parse_overrides(rest)
    overrides.setdefault('train_stage', f'{args.mode}_ft')
    overrides['pretrained_file'] = args.p
    overrides['freeze_trm'] = args.freeze
    overrides['note'] = args.note
    files = args.props.split(',') if args.props else stage_files('finetune')
    return Config(dataset=args.d, config_files=files, overrides=overrides)


def pick_device(config):
    D.select_gpus(config['gpu_id'], config['use_gpu'])
    device = D.process_device(config['use_gpu'])
    if config['use_gpu'] and device.type == 'cpu':
        print('no CUDA device found: running on the CPU', file=sys.stderr)
    return device


def load_pretrained(model, path, freeze):
    """Load a pre-trained state dict non-strictly; freeze position embedding and Transformer.
    Returns the lines to log (missing and unexpected keys)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f'{path}: pre-trained checkpoint not found')
    ckpt = load_checkpoint(path, map_location='cpu')
    state = ckpt.get('state_dict', ckpt)
    own = model.state_dict()
    mismatched = [f'{k} {tuple(v.shape)} vs {tuple(own[k].shape)}' for k, v in state.items()
                  if k in own and own[k].shape != v.shape]
    if mismatched:
        raise CheckpointError(f'{path}: parameter shapes differ from the model: ' + '; '.join(mismatched))
    result = model.load_state_dict(state, strict=False)
    if freeze:
        for p in list(model.position_embedding.parameters()) + list(model.trm_model.parameters()):
            p.requires_grad = False
    return [f'Loading pre-trained model from {path}',
            f'missing keys (kept as initialised): {result.missing_keys}',
            f'unexpected keys (ignored): {result.unexpected_keys}']


def popularity_result(dataset, config):
    """Most-popular baseline on test: items ranked by their count as train targets."""
    counts = torch.bincount(dataset.splits['train']['item_id'], minlength=dataset.n_items).float()
    test = dataset.splits['test']
    scores = counts.expand(len(test['item_id']), -1).clone()
    scores[:, 0] = -float('inf')
    rank = M.ranks(scores, test['item_id'])
    sums = M.metric_sums(rank, config['metrics'], config['topk'])
    return M.average(sums, len(rank))


def build(config, device):
    """Dataset and model (with the pre-trained weights if any) of a fine-tuning run.
    Every input is read and checked here, before anything is written."""
    dataset = SeqDataset(config)
    model = MISSRec(config, dataset.n_items, dataset.plm_table, dataset.img_table)
    loaded = []
    if config['pretrained_file']:
        loaded = load_pretrained(model, config['pretrained_file'], config['freeze_trm'])
    return dataset, model.to(device), loaded


def run(config, resume=''):
    """One fine-tuning run; returns {'best_valid', 'test', 'popularity', 'log', 'checkpoint', 'best_epoch'}."""
    init_seed(config['seed'], config['reproducibility'])
    device = pick_device(config)
    dataset, model, loaded = build(config, device)
    if resume and not os.path.exists(resume):
        raise FileNotFoundError(f'{resume}: checkpoint to resume from not found')

    log_path = init_logger(config, ['MISSRec', config['dataset'], config['note'], config['train_stage'],
                                    local_time()])
    logger.info('\n' + str(config) + '\n')
    logger.info(str(dataset))
    for line in loaded:
        logger.info(line)
    logger.info(str(model))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    logger.info(f'Trainable parameters: {float(sum(p.numel() for p in model.parameters() if p.requires_grad))}')
    logger.info(f'Trainable parameters: {trainable}')

    train = SeqBatches(dataset.splits['train'], config['train_batch_size'], shuffle=True,
                       seed=config['seed'], pad_len=dataset.pad_len)
    valid = SeqBatches(dataset.splits['valid'], config['eval_batch_size'], pad_len=dataset.pad_len)
    test = SeqBatches(dataset.splits['test'], config['eval_batch_size'], pad_len=dataset.pad_len)
    trainer = Trainer(config, model, device)
    if resume:
        trainer.resume(resume)
    trainer.fit(train, valid)
    return finish(trainer, dataset, config, test, log_path)


def finish(trainer, dataset, config, test_batches, log_path):
    """Reload the best checkpoint, evaluate on test, log the final lines (SPEC 5)."""
    trainer.load_best()
    test_results = trainer.evaluate(test_batches, desc='Test')
    best = trainer.best_valid_result
    logger.info(f'best valid : {M.ordered_repr(trainer.primary(best))}')
    logger.info(f'test result: {M.ordered_repr(trainer.primary(test_results))}')
    logger.info(f'best valid (original top-K+1) : {M.ordered_repr(best[1])}')
    logger.info(f'test result (original top-K+1): {M.ordered_repr(test_results[1])}')
    pop = popularity_result(dataset, config)
    logger.info(f'most-popular baseline, test: {M.ordered_repr(pop)}')
    return {'best_valid': best, 'test': test_results, 'popularity': pop, 'log': log_path,
            'checkpoint': trainer.saved_model_file, 'best_epoch': trainer.best_valid_epoch}


def print_table(out):
    rows = [('MISSRec test (exact top-K)', out['test'][0]),
            ('MISSRec test (original top-K+1)', out['test'][1]),
            ('most-popular test (exact top-K)', out['popularity'])]
    keys = list(out['test'][0])
    print('\n| run | ' + ' | '.join(keys) + ' |')
    print('|---|' + '---|' * len(keys))
    for name, res in rows:
        print(f'| {name} | ' + ' | '.join(f'{res[k]:.4f}' for k in keys) + ' |')
    print(f"\nlog: {out['log']}\nbest checkpoint: {out['checkpoint']} (epoch {out['best_epoch']})")


def main(argv=None):
    args, rest = parse_args(argv)
    try:
        config = build_config(args, rest)
        out = run(config, args.resume)
    except (ConfigError, DataError, FileNotFoundError, CheckpointError, FloatingPointError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    print_table(out)
    return 0


if __name__ == '__main__':
    logging.captureWarnings(True)
    sys.exit(main())
