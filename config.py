"""Run configuration, RecBole style.

Values merge in this order, later wins:

    DEFAULTS  <  props/{model}.yaml (MISSRec.yaml; SASRec.yaml, Pop.yaml or TextSim.yaml for the baselines)
              <  stage file (props/pretrain.yaml or props/finetune.yaml)  <  --key=value

Every key has one snake_case name in YAML, in `config[key]` and on the command
line. Unknown keys are rejected with the closest known key suggested; values
given on the command line are parsed as YAML (`--topk=[10,50]`, `--gamma=1e-4`).
`Config` has no side effects: it does not touch devices, seeds or files.
"""
import difflib
import os
import re

import yaml

from metrics import METRICS


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-4` as a string; like RecBole, read it as a float."""


_Loader.add_implicit_resolver(
    'tag:yaml.org,2002:float',
    re.compile(r'''^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$''', re.X),
    list('-+0123456789.'))


def load_yaml(text):
    return yaml.load(text, Loader=_Loader)

PROPS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'props')

DEFAULTS = {
    # general
    'dataset': None,
    'data_path': 'datasets/downstream/',
    'checkpoint_dir': 'saved',
    'log_dir': 'log',
    'gpu_id': None,           # e.g. 0 or '0,1': sets CUDA_VISIBLE_DEVICES, as RecBole did; None keeps it
    'use_gpu': True,
    'seed': 2020,
    'reproducibility': True,
    'show_progress': True,
    'note': '',
    'pretrained_file': '',
    'freeze_trm': True,
    'script': '',
    'tensorboard': False,     # also write TensorBoard event files (needs the optional `tensorboard` package)
    # model (SPEC 2); `model` picks MISSRec or a baseline (sasrec.py) and its props file
    'model': 'MISSRec',
    'textsim_decay': 0.5,     # TextSim baseline: weight factor per step back in the history's mean (0: last item)
    'n_layers': 2,
    'n_heads': 4,
    'hidden_size': 300,
    'inner_size': 256,
    'hidden_dropout_prob': 0.5,
    'attn_dropout_prob': 0.5,
    'hidden_act': 'gelu',
    'layer_norm_eps': 1e-12,
    'initializer_range': 0.02,
    'plm_size': 512,
    'img_size': 512,
    'temperature': 0.07,
    'modal_type': 'img_text',
    'id_type': 'id',
    'seq_mm_fusion': 'add',
    'item_mm_fusion': 'dynamic_shared',
    'lambda': 1e-3,
    'gamma': 1e-4,
    # PAD interest slots in training: each its own dropout draw, as the original (SPEC 3.2
    # step 4), or one shared draw counted Q - n times (faster, a different distribution; packed
    # path only: the plain path computes every slot)
    'reg_pad_draws': 'independent',
    # the sequence encoder: 'packed' (packed.py, the fast path) or 'plain' (missrec.py, padded tensors
    # as the original computes them); the same values and gradients
    'forward_path': 'packed',
    'item_drop_ratio': 0.2,
    'item_drop_coefficient': 0.9,
    'plm_suffix': 'feat1CLS',
    'plm_suffix_aug': 'feat2CLS',
    'img_suffix': 'feat3CLS',
    'MAX_ITEM_LIST_LENGTH': 50,
    # training and evaluation
    'train_stage': 'transductive_ft',
    'epochs': 300,
    'pretrain_epochs': 100,
    'save_step': 10,
    'ckpt_suffix': '',
    'overwrite': False,          # pre-training: replace existing checkpoints of the same name
    'train_batch_size': 512,
    'eval_batch_size': 1024,
    'learner': 'adam',
    'learning_rate': 0.001,
    'weight_decay': 0.0,
    'clip_grad_norm': None,
    'loss_read_step': 50,     # read the batch losses on the host every N batches (each read stalls a GPU)
    'stopping_step': 10,
    'eval_step': 1,
    'valid_metric': 'NDCG@10',
    'metrics': ['HIT', 'NDCG'],
    'topk': [10, 50],
    'metric_decimal_place': 4,
    # interest discovery (SPEC 3.1)
    'interest_ratio': 0.5,
    'knn_local_ratio': 0.1,
    'interest_clustering': 'kmeans',
    'kmeans_mode': 'original',
    'cluster_memory_mb': 256,
    # switches for the original code's defects (README, "Differences from the original code")
    'eval_topk_plus_one': False,
    'contextual_gather_quirk': True,
    'item_drop_quirk': True,          # SPEC 3.4 QUIRK, see data/pretrain.py item_drop()
    # multi-process pre-training: contrastive negatives of the whole global batch or of each rank
    'contrastive_negatives': 'global',
    # pre-training regime (SPEC 4 QUIRK): True = one model, gradients synchronised over the processes
    # (the paper); False = the original's effective regime: every process trains a model of its own on
    # its rows r::W of each global batch, with its own in-batch negatives, and rank 0's model is saved
    'sync_gradients': True,
    # with sync_gradients False: W, the number of models that split each global batch (null: the number
    # of processes); one process with W = 4 trains rank 0's model of the original's 4-GPU run
    'models_per_batch': None,
}

MODELS = ('MISSRec', 'SASRec', 'Pop', 'TextSim')

CHOICES = {
    'model': MODELS,
    'modal_type': ('none', 'text', 'img', 'img_text'),
    'id_type': ('none', 'id'),
    'seq_mm_fusion': ('add', 'contextual'),
    'item_mm_fusion': ('static', 'dynamic_shared', 'dynamic_instance'),
    'train_stage': ('pretrain', 'inductive_ft', 'transductive_ft'),
    'learner': ('adam',),
    'hidden_act': ('gelu', 'relu'),
    'interest_clustering': ('kmeans', 'dpc_knn'),
    'kmeans_mode': ('original', 'lloyd'),
    'contrastive_negatives': ('global', 'local'),
    'reg_pad_draws': ('independent', 'shared'),
    'forward_path': ('packed', 'plain'),
}

# Keys the original props files carry but that change nothing here (loss_type: the loss is always CE).
IGNORED_KEYS = ('benchmark_filename', 'alias_of_item_id', 'load_col', 'neg_sampling',
                'transform', 'log_prefix', 'log_suffix', 'ddp', 'rank', 'world_size', 'nproc', 'loss_type')


class ConfigError(ValueError):
    """A bad configuration key or value; the message names the key and the source."""


def _check_key(key, source):
    if key in DEFAULTS or key in IGNORED_KEYS:
        return
    close = difflib.get_close_matches(key, DEFAULTS.keys(), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ''
    raise ConfigError(f"{source}: unknown config key '{key}'{hint}")


def _read_yaml(path):
    try:
        with open(path) as f:
            data = load_yaml(f) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f'{path}: not valid YAML ({e})') from None
    if not isinstance(data, dict):
        raise ConfigError(f'{path}: expected a mapping of key: value')
    return data


def parse_overrides(args):
    """['--key=value', ...] -> {key: YAML-typed value}."""
    out = {}
    for arg in args:
        if not arg.startswith('--') or '=' not in arg:
            raise ConfigError(f"command line: expected --key=value, got '{arg}'")
        key, value = arg[2:].split('=', 1)
        out[key] = load_yaml(value) if value != '' else ''
    return out


class Config:
    """Merged run configuration; read it like a dict: `config['hidden_size']`."""

    def __init__(self, dataset=None, config_files=(), overrides=None):
        self.final = dict(DEFAULTS)
        self.sources = {}
        layers = []
        for path in config_files:
            if not os.path.exists(path):
                raise ConfigError(f'{path}: config file not found')
            layers.append((path, _read_yaml(path)))
        layers.append(('command line', dict(overrides or {})))
        for source, values in layers:
            for key, value in values.items():
                _check_key(key, source)
                if key in DEFAULTS:
                    self.final[key] = value
                    self.sources[key] = source
        if dataset is not None:
            self.final['dataset'] = dataset
        self._check()

    def _check(self):
        c = self.final
        for key, allowed in CHOICES.items():
            if c[key] not in allowed:
                raise ConfigError(f"{self.sources.get(key, 'defaults')}: {key} = {c[key]!r}; "
                                  f"expected one of {', '.join(allowed)}")
        if c['gpu_id'] is not None and not re.fullmatch(r'\d+(,\d+)*', str(c['gpu_id'])):
            raise ConfigError(f"{self.sources.get('gpu_id', 'defaults')}: gpu_id = {c['gpu_id']!r}; "
                              "expected GPU indices like 0 or '0,1'")
        if c['model'] == 'MISSRec' and (not isinstance(c['n_layers'], int) or c['n_layers'] < 2
                                        or c['n_layers'] % 2):
            raise ConfigError(f"{self.sources.get('n_layers', 'defaults')}: n_layers = {c['n_layers']!r}; "
                              'expected an even integer >= 2 (half encoder, half decoder layers)')
        if not isinstance(c['interest_ratio'], (int, float)) or not 0 < c['interest_ratio'] <= 1:
            raise ConfigError(f"{self.sources.get('interest_ratio', 'defaults')}: interest_ratio = "
                              f"{c['interest_ratio']!r}; expected a number in (0, 1]")
        for key in ('hidden_size', 'n_heads', 'inner_size', 'train_batch_size', 'eval_batch_size',
                    'epochs', 'stopping_step', 'eval_step', 'MAX_ITEM_LIST_LENGTH', 'plm_size', 'img_size',
                    'loss_read_step'):
            if not isinstance(c[key], int) or isinstance(c[key], bool) or c[key] < 1:
                raise ConfigError(f"{self.sources.get(key, 'defaults')}: {key} = {c[key]!r}; "
                                  'expected a positive integer')
        if not isinstance(c['sync_gradients'], bool):
            raise ConfigError(f"{self.sources.get('sync_gradients', 'defaults')}: sync_gradients = "
                              f"{c['sync_gradients']!r}; expected True or False")
        shares = c['models_per_batch']
        if shares is not None and (not isinstance(shares, int) or isinstance(shares, bool) or shares < 1
                                   or c['sync_gradients']):
            raise ConfigError(f"{self.sources.get('models_per_batch', 'defaults')}: models_per_batch = {shares!r}; "
                              'expected null, or a positive integer together with sync_gradients False')
        if c['hidden_size'] % c['n_heads']:
            raise ConfigError(f"hidden_size = {c['hidden_size']} is not divisible by n_heads = {c['n_heads']}")
        for key in ('learning_rate', 'temperature', 'gamma', 'lambda', 'weight_decay',
                    'hidden_dropout_prob', 'layer_norm_eps'):
            if not isinstance(c[key], (int, float)) or isinstance(c[key], bool):
                raise ConfigError(f"{self.sources.get(key, 'defaults')}: {key} = {c[key]!r}; expected a number")
        if isinstance(c['topk'], int):
            c['topk'] = [c['topk']]
        if isinstance(c['metrics'], str):
            c['metrics'] = [c['metrics']]
        known = set(METRICS)
        for m in c['metrics']:
            if str(m).lower() not in known:
                raise ConfigError(f"metrics: unknown metric {m!r}; expected some of "
                                  f"{', '.join(name.upper() for name in METRICS)}")
        name, _, k = str(c['valid_metric']).partition('@')
        if name.lower() not in known or not k.isdigit():
            raise ConfigError(f"valid_metric = {c['valid_metric']!r}; expected e.g. NDCG@10")

    def __getitem__(self, key):
        return self.final[key]

    def __setitem__(self, key, value):
        _check_key(key, 'config')
        self.final[key] = value

    def __contains__(self, key):
        return key in self.final

    def get(self, key, default=None):
        return self.final.get(key, default)

    def to_dict(self):
        """Plain dict of the resolved values (stored in checkpoints)."""
        return dict(self.final)

    def __str__(self):
        return '\n'.join(f'{k} = {v}' for k, v in self.final.items())


def stage_files(stage, model='MISSRec'):
    """The stacked props files of a stage ('pretrain' or 'finetune') for a model: props/{model}.yaml
    (a baseline's in place of MISSRec's), then the stage's."""
    return [os.path.join(PROPS_DIR, f'{model}.yaml'), os.path.join(PROPS_DIR, f'{stage}.yaml')]
