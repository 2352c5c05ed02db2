"""What the entry scripts run (RecBole's quick_start): their command lines, one fine-tuning or
pre-training run of one process, launching one process or several, and the final report.

    finetune.py, ddp_finetune.py  ->  main('finetune', ...)   (-m MISSRec | SASRec | Pop | TextSim)
    ddp_pretrain.py               ->  main('pretrain', ...)

    from quick_start import build_config, finetune, parse_args
    out = finetune(build_config('finetune', *parse_args('finetune', ['-d', 'Demo', '--epochs=2'])))

A run reads and checks every input (config, data, checkpoints) before it writes
anything; a bad input stops it with one line `error: ...` and exit code 2.
"""
import argparse
import logging
import os
import signal
import sys
import threading
import time
import traceback

# OpenMP threads that wait for work sleep instead of spinning (before torch loads its OpenMP runtime,
# which reads this once). Spinning threads fight any other process for the cores: with two busy
# processes on the 2 cores here a demo fine-tuning took 120 s (51-188) spinning and 28 s sleeping; on a
# quiet machine sleeping costs about 2% (13.3 s against 13.0 s). OMP_WAIT_POLICY=ACTIVE restores spinning.
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

import torch

import distributed as D
import metrics as M
from checkpoints import CheckpointError, build_model, check_writable, load_pretrained, model_from_checkpoint
from config import MODELS, Config, ConfigError, parse_overrides, stage_files
from curves import open_curves
from data.dataset import DataError, SeqDataset, dataset_folder
from data.loader import SeqBatches
from data.pretrain import PretrainDataset
from sasrec import Pop
from run_log import claim_run_id, init_logger, init_seed, start_logging
from trainer import DiscoveryFailed, Pretrainer, Trainer

logger = logging.getLogger(__name__)

# what stops a run with one line (bad input, a NaN); anything else is a bug and shows its traceback
USER_ERRORS = (ConfigError, DataError, CheckpointError, FloatingPointError, FileExistsError, DiscoveryFailed)


# ---------------------------------------------------------------- command line
def parse_args(stage, argv=None, description=None):
    """The command line of a stage's entry scripts; returns (args, ['--key=value', ...])."""
    finetune_stage = stage == 'finetune'
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('-d', type=str, default='Scientific_mm_full' if finetune_stage else 'FHCKM_mm_full',
                        help='dataset name')
    if finetune_stage:
        parser.add_argument('-p', type=str, default='', help='pre-trained checkpoint to start from')
        parser.add_argument('-f', '--freeze', action=argparse.BooleanOptionalAction, default=True,
                            help='with -p: freeze the position embedding and the Transformer (default on)')
        parser.add_argument('-mode', choices=['transductive', 'inductive'], default='transductive')
        parser.add_argument('-m', '--model', choices=MODELS, default='MISSRec',
                            help='MISSRec, or a baseline of sasrec.py: SASRec (props/SASRec.yaml in place of '
                            'props/MISSRec.yaml), Pop (most-popular) or TextSim (text similarity; both without '
                            'training)')
        parser.add_argument('--eval_only', action='store_true', help='with -p CKPT (a fine-tuned checkpoint, '
                            "ours or the original code's) and the training run's data flags: print its valid and "
                            'test metrics in both conventions; no training, no checkpoint written. With a '
                            'pre-training checkpoint: zero-shot, its weights and interests discovered on the '
                            'target items (-mode inductive: without the untrained ID embedding)')
    parser.add_argument('-props', type=str, default='', help='comma-separated props files '
                        f'(default: props/MISSRec.yaml,props/{stage}.yaml)')
    parser.add_argument('-note', type=str, default='', help='a word added to the log file name')
    parser.add_argument('--resume', type=str, default='', help='checkpoint to continue from: the '
                        'saved/MISSRec-{time}-last.pth of a fine-tuning run, or a pre-training checkpoint '
                        '(same command line otherwise)')
    parser.add_argument('--nproc', type=int, default=None, help='processes to spawn (0: one per visible GPU, '
                        'or 1; default: the script\'s)')
    return parser.parse_known_args(argv)


def build_config(stage, args, rest):
    """The run's `Config` from the parsed command line (SPEC 2)."""
    overrides = parse_overrides(rest)
    if stage == 'finetune':
        overrides.setdefault('train_stage', f'{args.mode}_ft')
        overrides['pretrained_file'] = '' if args.eval_only else args.p
        overrides['freeze_trm'] = args.freeze
    else:
        overrides['train_stage'] = 'pretrain'
    overrides['note'] = args.note
    model = getattr(args, 'model', 'MISSRec')
    overrides['model'] = model
    files = args.props.split(',') if args.props else stage_files(stage, model)
    return Config(dataset=args.d, config_files=files, overrides=overrides)


def _check_files(config, resume):
    """Before training: the checkpoint to resume from exists, and checkpoints can be written."""
    if resume and not os.path.exists(resume):
        raise CheckpointError(f'{resume}: checkpoint to resume from not found')
    if D.is_main_process():
        check_writable(config['checkpoint_dir'])


def _log_restart(resume):
    logger.info(f'torchrun restart {D.restart_count()}: ' +
                (f'resuming from {resume}' if resume else 'no checkpoint of this job yet, starting over'))


# ----------------------------------------------------------------- fine-tuning
def build_finetune(config, device):
    """Dataset and model (with the pre-trained weights if any) of a fine-tuning run, and the
    lines to log about the loaded weights."""
    name = config['model']
    if name in ('SASRec', 'Pop') and (config['train_stage'] != 'transductive_ft' or config['pretrained_file']):
        raise ConfigError(f'{name}: an ID-based baseline; it takes neither -mode inductive nor -p')
    if name == 'TextSim' and (config['pretrained_file'] or config['modal_type'] != 'text'):
        raise ConfigError('TextSim: a training-free text baseline; it takes no -p, and modal_type text')
    decay = config['textsim_decay']
    if name == 'TextSim' and (not isinstance(decay, (int, float)) or isinstance(decay, bool) or decay < 0):
        raise ConfigError(f'textsim_decay = {decay!r}; expected a number >= 0')
    dataset = SeqDataset(config)
    model = build_model(config, dataset)
    loaded = []
    if config['pretrained_file']:
        loaded = load_pretrained(model, config['pretrained_file'], config['freeze_trm'])
    return dataset, model.to(device), loaded


def finetune(config, resume=''):
    """One process's fine-tuning run (a process group, if any, is set up).

    Returns {'best_valid', 'test', 'popularity', 'log', 'checkpoint', 'best_epoch'} (every rank).
    """
    start_logging(D.is_main_process())
    init_seed(config['seed'], config['reproducibility'])              # the same initial weights on every rank
    device = D.process_device(config['use_gpu'])
    dataset, model, loaded = build_finetune(config, device)
    if D.rank():   # dropout differs per rank; rank 0 draws what a single process draws
        init_seed(config['seed'] + D.rank(), config['reproducibility'])
    _check_files(config, resume)

    name = [config['model'], config['dataset'], config['note'], config['train_stage']]
    run_id = claim_run_id(config, name)
    log_path = init_logger(config, name + [run_id], main_process=D.is_main_process())
    logger.info(f'run id: {run_id}')
    logger.info('\n' + str(config) + '\n')
    logger.info(str(dataset))
    for line in loaded:
        logger.info(line)
    logger.info(str(model))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    logger.info(f'Trainable parameters: {float(sum(p.numel() for p in model.parameters() if p.requires_grad))}')
    logger.info(f'Trainable parameters: {trainable}')
    logger.info(f'processes: {D.world_size()}, device: {device}')

    shard = dict(pad_len=dataset.pad_len, rank=D.rank(), world_size=D.world_size())
    train = SeqBatches(dataset.splits['train'], config['train_batch_size'], shuffle=True, seed=config['seed'],
                       **shard)
    valid = SeqBatches(dataset.splits['valid'], config['eval_batch_size'], **shard)
    test = SeqBatches(dataset.splits['test'], config['eval_batch_size'], **shard)
    trainer = Trainer(config, model, device, run_id)
    if config['model'] in ('Pop', 'TextSim'):   # nothing to learn: evaluated as they are
        return dict(finish(trainer, dataset, config, test, log_path, valid), run_id=run_id)
    trainer.curves = open_curves(config, log_path)                    # log/{run}.csv, one row per epoch
    if D.restart_count() and not resume:   # torchrun --max-restarts: continue this job's run
        resume = trainer.last_model_file if os.path.exists(trainer.last_model_file) else ''
        _log_restart(resume)
    if resume:
        trainer.resume(resume)
    trainer.fit(train, valid)
    if trainer.curves:
        trainer.curves.close()
    return dict(finish(trainer, dataset, config, test, log_path), run_id=run_id)


def finish(trainer, dataset, config, test_batches, log_path, untrained_valid=None):
    """Reload the best checkpoint, evaluate on test, log the final lines (SPEC 5). With
    `untrained_valid` (Pop, TextSim) the model is evaluated as it is on those batches, and no checkpoint exists."""
    if untrained_valid is None:
        trainer.load_best()
    else:
        trainer.best_valid_result = trainer.evaluate(untrained_valid, desc='Valid')
        trainer.saved_model_file = None
    test_results = trainer.evaluate(test_batches, desc='Test')
    best = trainer.best_valid_result
    logger.info(f'best valid : {M.ordered_repr(trainer.primary(best))}')
    logger.info(f'test result: {M.ordered_repr(trainer.primary(test_results))}')
    logger.info(f'best valid (original top-K+1) : {M.ordered_repr(best[1])}')
    logger.info(f'test result (original top-K+1): {M.ordered_repr(test_results[1])}')
    logger.info(f'best valid (exact top-K) : {M.ordered_repr(best[0])}')
    logger.info(f'test result (exact top-K): {M.ordered_repr(test_results[0])}')
    pop = popularity_result(dataset, config)
    logger.info(f'most-popular baseline, test: {M.ordered_repr(pop)}')
    return {'model': config['model'], 'best_valid': best, 'test': test_results, 'popularity': pop,
            'log': log_path,
            'checkpoint': trainer.saved_model_file, 'best_epoch': trainer.best_valid_epoch}


def popularity_result(dataset, config):
    """Most-popular baseline on test: items ranked by their count as train targets."""
    counts = Pop(dataset.splits['train']['item_id'], dataset.n_items).counts
    counts[0] = -float('inf')                                          # never rank PAD
    target = dataset.splits['test']['item_id']
    # every row has the same scores: rank 1024 rows at a time without a [rows, N] copy
    rank = torch.cat([M.ranks(counts.expand(len(t), -1), t) for t in target.split(1024)])
    sums = M.metric_sums(rank, config['metrics'], config['topk'])
    return M.average(sums, len(rank))


def print_table(out):
    """The test metrics of a fine-tuning run as a markdown table, then the log and checkpoint."""
    name = out.get('model', 'MISSRec')
    rows = [(f'{name} test (exact top-K)', out['test'][0]),
            (f'{name} test (original top-K+1)', out['test'][1]),
            ('most-popular test (exact top-K)', out['popularity'])]
    keys = list(out['test'][0])
    print('\n| run | ' + ' | '.join(keys) + ' |')
    print('|---|' + '---|' * len(keys))
    for name, res in rows:
        print(f'| {name} | ' + ' | '.join(f'{res[k]:.4f}' for k in keys) + ' |')
    print(f"\nrun id: {out.get('run_id')}\nlog: {out['log']}\n"
          f"best checkpoint: {out['checkpoint']} (epoch {out['best_epoch']})")


# ------------------------------------------------------ evaluating a checkpoint
def checkpoint_model(config, path):
    """The model of `--eval_only -p CKPT` (`evaluate_checkpoint`; also tools/show_interests.py):
    `checkpoints.model_from_checkpoint` with the run's config, and, for a pre-training checkpoint
    (zero-shot), interests discovered on the target items. Logs what it loaded.

    Returns (config with the checkpoint's structure, SeqDataset, model, Trainer, zero_shot)."""
    device = D.process_device(config['use_gpu'])
    config, dataset, model, info = model_from_checkpoint(path, config, device)
    zero_shot = info['zero_shot']
    what = 'Zero-shot evaluation of the pre-training checkpoint' if zero_shot else 'Evaluating'
    epoch = 'unknown' if info['epoch'] is None else info['epoch']
    logger.info(f'{what} {path} (epoch {epoch}) on {config["dataset"]}')
    for line in info['lines']:
        logger.info(line)
    trainer = Trainer(config, model, device)
    if zero_shot:
        if config['train_stage'] == 'transductive_ft' and model.use_id:
            logger.info('transductive: the ID embedding is untrained (random initialisation); '
                        '-mode inductive is the meaningful zero-shot evaluation')
        trainer.discover(0)                                            # interests of the target items
    return config, dataset, model, trainer, zero_shot


def evaluate_checkpoint(config, path):
    """One process of `--eval_only -p CKPT`: load a fine-tuned checkpoint (ours, or the original code's
    through the safe loader) strictly, buffers and interest tables included, and evaluate it on valid
    and test in both conventions. No training, no interest discovery, no checkpoint and no log file.

    A pre-training checkpoint is evaluated zero-shot: the fine-tuning model of the run's stage with the
    checkpoint's structure, its weights loaded as for fine-tuning with -p (`load_pretrained`), and
    interests discovered once on the target items (epoch 0). Transductive: the ID embedding is untrained.

    Returns {'model', 'checkpoint', 'valid', 'test', 'rank0', 'zero_shot'}; valid and test are
    (exact top-K, original top-K+1) OrderedDicts."""
    start_logging(D.is_main_process())
    config, dataset, model, trainer, zero_shot = checkpoint_model(config, path)
    shard = dict(pad_len=dataset.pad_len, rank=D.rank(), world_size=D.world_size())
    valid = trainer.evaluate(SeqBatches(dataset.splits['valid'], config['eval_batch_size'], **shard), desc='Valid')
    test = trainer.evaluate(SeqBatches(dataset.splits['test'], config['eval_batch_size'], **shard), desc='Test')
    for split, res in (('valid', valid), ('test', test)):
        logger.info(f'{split} result: {M.ordered_repr(res[0])}')
        logger.info(f'{split} result (original top-K+1): {M.ordered_repr(res[1])}')
    return {'model': config['model'], 'checkpoint': path, 'valid': valid, 'test': test, 'log': None,
            'rank0': D.is_main_process(), 'zero_shot': zero_shot}


def print_evaluation(out):
    """The valid and test metrics of `evaluate_checkpoint` in both conventions as a markdown table."""
    keys = list(out['test'][0])
    print(f"\n{out['model']} checkpoint {out['checkpoint']}\n")
    print('| split | ' + ' | '.join(keys) + ' |')
    print('|---|' + '---|' * len(keys))
    for split in ('valid', 'test'):
        for j, convention in enumerate(('exact top-K', 'original top-K+1')):
            print(f'| {split} ({convention}) | ' + ' | '.join(f"{out[split][j][k]:.4f}" for k in keys) + ' |')


# ---------------------------------------------------------------- pre-training
def pretrain(config, resume=''):
    """One process's pre-training run (a process group, if any, is set up).

    Returns {'losses': [...], 'checkpoints': [...], 'log': path or None, 'trainer': Pretrainer}.
    """
    start_logging(D.is_main_process())
    device = D.process_device(config['use_gpu'])
    dataset = PretrainDataset(config).to(device)
    _check_files(config, resume)
    name = ['MISSRec', config['dataset'], config['note'], 'pretrain']
    run_id = claim_run_id(config, name)
    log_path = init_logger(config, name + [run_id], main_process=D.is_main_process())
    logger.info(f'run id: {run_id}')
    logger.info('\n' + str(config) + '\n')
    logger.info(str(dataset))
    trainer = Pretrainer(config, dataset, device)
    if config['sync_gradients']:
        regime = f'one model, gradients synchronised, contrastive negatives: {config["contrastive_negatives"]}'
    else:
        shares = trainer.batches.world_size
        regime = (f'gradients not synchronised (the original\'s regime): a model per share of 1/{shares} '
                  f'of each batch, its own in-batch negatives; rank 0\'s model is saved')
    logger.info(f'processes: {D.world_size()}, device: {device}, {regime}')
    logger.info(str(trainer.model))
    logger.info(f'Interests: {trainer.model.num_interest}')
    trainer.curves = open_curves(config, log_path, validation=False)  # log/{run}.csv, one row per epoch
    if D.restart_count() and not resume:   # torchrun --max-restarts: continue from this job's newest checkpoint
        resume = trainer.newest_checkpoint()
        _log_restart(resume)
    if resume:
        trainer.resume(resume)
    trainer.check_overwrite(resumed=bool(resume) or D.restart_count() > 0)
    losses = trainer.fit()
    if trainer.curves:
        trainer.curves.close()
    logger.info(f'run id: {run_id}; checkpoints: {", ".join(trainer.saved) or "none"}')
    return {'losses': losses, 'checkpoints': trainer.saved, 'log': log_path, 'trainer': trainer}


# ------------------------------------------------------------------- processes
def process_main(run, config, resume='', report=None):
    """One process of a run: the process group from the environment (torchrun, or `main`'s
    spawned processes), `run(config, resume)`, teardown; then `report(out)` on rank 0.
    Returns the exit code: 2 after a USER_ERRORS exception, printed as one line; 130 after Ctrl-C
    (SIGINT), with one line on rank 0 naming where the run stopped and the checkpoint to resume
    from (`interrupted_line`)."""
    ctrl_c = CtrlC()
    try:
        try:
            D.select_gpus(config['gpu_id'], config['use_gpu'])   # under torchrun: before CUDA starts
            device = D.init_from_env(config['use_gpu'])
            if D.is_dist() and device.type == 'cpu' and 'OMP_NUM_THREADS' not in os.environ:
                torch.set_num_threads(D.cpu_threads())
            out = run(config, resume)
        except BaseException as e:
            try:   # also a Ctrl-C still pending: another rank's interrupt can reach this one first as an error
                interrupted = isinstance(e, KeyboardInterrupt) or ctrl_c.received()
            except KeyboardInterrupt:
                interrupted = True
            if interrupted:
                if D.is_main_process():
                    print(interrupted_line(e, run, resume), file=sys.stderr, flush=True)
                return 130
            if isinstance(e, USER_ERRORS):
                print(f'error (rank {D.rank()}): {e}' if D.is_dist() else f'error: {e}', file=sys.stderr)
                return 2
            if D.is_dist():   # printed before the group goes down: the other ranks then fail with
                # "connection reset", and the launcher may report that secondary error first
                print(f'rank {D.rank()} failed:\n{traceback.format_exc()}', file=sys.stderr, flush=True)
            raise
        finally:
            D.teardown()
    finally:
        ctrl_c.restore()
    if report and (out['log'] or out.get('rank0')):          # the log path: rank 0 only
        report(out)
    return 0


class CtrlC:
    """Ctrl-C (SIGINT) during a run: the first raises KeyboardInterrupt as Python does, later ones
    are only counted, so that the run's one line and its teardown are not cut short. Installed
    only in the main thread and where Ctrl-C raises KeyboardInterrupt (an inherited 'ignore' stays)."""

    def __init__(self):
        self.count, self.armed, self.previous = 0, True, None
        if (threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
            self.previous = signal.signal(signal.SIGINT, self._handler)

    def _handler(self, signum, frame):
        self.count += 1
        if self.armed:
            self.armed = False
            raise KeyboardInterrupt

    def received(self):
        """Whether a Ctrl-C reached this process, one not yet handled included (taken now). A
        caller guards against the KeyboardInterrupt that a pending one may raise on entry."""
        self.armed = False
        if hasattr(signal, 'pthread_kill'):
            signal.pthread_kill(threading.get_ident(), 0)   # sends nothing; runs pending handlers
        return self.count > 0

    def restore(self):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
            self.previous = None


def _interrupt_point(exc):
    """(loop, epoch, batch, phase) where the run stopped, read off the traceback of `exc` (or of the
    error it interrupted): the Trainer/Pretrainer and its loop variables; loop None before training."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        loop = epoch = batch = phase = None
        tb = exc.__traceback__
        while tb is not None:
            frame, tb = tb.tb_frame, tb.tb_next
            name, local = frame.f_code.co_name, frame.f_locals
            owner = local.get('self')
            if frame.f_code is finish.__code__:
                loop, phase = local.get('trainer'), 'final'
            elif isinstance(owner, (Trainer, Pretrainer)):
                loop = owner
                if name == 'fit':
                    epoch = local.get('epoch')
                elif name == 'train_epoch':
                    # the batch in its step, or the next one when stopped between two batches
                    inside = tb is not None and tb.tb_frame.f_code.co_name in ('_step', '_read_losses')
                    batch = local['i'] + (not inside) if 'i' in local else 0
                elif name in ('discover', '_validate', 'save'):           # the innermost names it
                    phase = {'discover': 'interest discovery', '_validate': 'validation',
                             'save': 'saving a checkpoint'}[name]
        if loop is not None:
            return loop, epoch, batch, phase
        exc = exc.__context__ or exc.__cause__
    return None, None, None, None


def interrupted_line(exc, run, resume=''):
    """The one line after Ctrl-C: where the run stopped, and the checkpoint `--resume` continues
    from (fine-tuning: the -last.pth of the last finished epoch; pre-training: the newest saved)."""
    if run is evaluate_checkpoint:
        return 'interrupted: evaluation only, nothing was written'
    loop, epoch, batch, phase = _interrupt_point(exc)
    if loop is None:
        return 'interrupted before training started: nothing to resume from'
    if phase == 'final':
        return (f'interrupted in the final evaluation, after training; the best model is {loop.saved_model_file} '
                '(evaluate it with --eval_only -p PATH and the same data flags)')
    where = 'interrupted' if epoch is None else f'interrupted at epoch {epoch}'
    where += f', batch {batch}' if batch is not None else f' ({phase})' if phase else ''
    if isinstance(loop, Pretrainer):
        path = loop.saved[-1] if loop.saved else ''
        if not path and loop.start_epoch:
            path = loop.checkpoint_path(loop.start_epoch - 1)
            path = path if os.path.exists(path) else resume
        if not path:
            return f"{where}; no checkpoint saved yet (one every {loop.save_step} epochs): nothing to resume from"
        return f'{where}; resume with --resume {path}'
    if not os.path.exists(loop.last_model_file):
        return f'{where}; no epoch has finished yet: nothing to resume from'
    return f'{where}; resume with --resume {loop.last_model_file}'


def stop_children(grace_s=3.0, timeout_s=60.0):
    """After Ctrl-C in `main` while spawned processes run: they stop on their own (Ctrl-C reaches the
    whole process group) and rank 0 prints the line; wait for them, and interrupt those still running
    after `grace_s` (only this process was interrupted), terminating any left after `timeout_s`."""
    import multiprocessing
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        children = multiprocessing.active_children()
        deadline = time.monotonic() + grace_s
        for p in children:
            p.join(max(0.0, deadline - time.monotonic()))
        running = [p for p in children if p.is_alive()]
        for p in running:
            os.kill(p.pid, signal.SIGINT)
        deadline = time.monotonic() + timeout_s
        for p in running:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.terminate()
    finally:
        signal.signal(signal.SIGINT, previous)


DEMO_DATA = 'python tools/make_demo_data.py --out datasets/downstream --pretrain-out datasets/pretrain'


def check_dataset(stage, config):
    """Before any process starts: the dataset folder exists; else one line naming it and how to get data."""
    try:
        dataset_folder(config, 'pre-training dataset' if stage == 'pretrain' else 'dataset')
    except DataError as e:
        demo = 'DemoPT' if stage == 'pretrain' else 'Demo'
        raise DataError(f"{e}; put the data there (README, 'Data') or set --data_path, or make the demo "
                        f'data with `{DEMO_DATA}` and run -d {demo}') from None


def cpu_fallback_line(config, nproc):
    """The one line when a GPU run finds no CUDA device (printed once, before processes start), or ''."""
    if not config['use_gpu'] or D.visible_gpus(True):
        return ''
    if D.launched_by_torchrun():
        if os.environ.get('RANK', '0') != '0':
            return ''
        nproc = int(os.environ.get('WORLD_SIZE', 1))
    return f"no CUDA device found: running on the CPU, {nproc} process{'es' if nproc > 1 else ''}"


def main(stage, argv=None, nproc=1, description=None):
    """An entry script: parse the command line, then run in this process (one process, or one
    of torchrun's) or in `--nproc` spawned ones (0: one per visible GPU, or 1; default `nproc`).
    Ctrl-C stops it with one line and exit code 130 (`process_main`).

    Args:
        stage: 'finetune' or 'pretrain'.
    Returns:
        the exit code.
    """
    args, rest = parse_args(stage, argv, description)
    try:
        try:
            config = build_config(stage, args, rest)
            if not D.launched_by_torchrun():
                D.select_gpus(config['gpu_id'], config['use_gpu'])
                nproc = D.resolve_nproc(nproc if args.nproc is None else args.nproc, config['use_gpu'])
            check_dataset(stage, config)
        except ValueError as e:   # ConfigError, DataError included
            print(f'error: {e}', file=sys.stderr)
            return 2
        run, report = (finetune, print_table) if stage == 'finetune' else (pretrain, None)
        run_args = (run, config, args.resume, report)
        if getattr(args, 'eval_only', False):
            if not args.p or args.resume:
                print('error: --eval_only evaluates the fine-tuned (or, zero-shot, pre-training) checkpoint '
                      'given with -p CKPT (and takes no --resume)', file=sys.stderr)
                return 2
            run_args = (evaluate_checkpoint, config, args.p, print_evaluation)
        line = cpu_fallback_line(config, nproc)
        if line:
            print(line, file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        print('interrupted before training started: nothing to resume from', file=sys.stderr)
        return 130
    if nproc == 1 or D.launched_by_torchrun():
        return D.launch(process_main, nproc, *run_args)       # here: process_main handles Ctrl-C
    try:
        return D.launch(process_main, nproc, *run_args)
    except KeyboardInterrupt:   # the spawned processes print the line (rank 0) and exit with 130
        stop_children()
        return 130
