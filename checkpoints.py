"""Checkpoints: the one format that both training stages write and resume from, loading a
pre-trained state dict, and opening checkpoints safely, ours and those of the original code.

    from checkpoints import load_checkpoint
    ckpt = load_checkpoint('saved/MISSRec-FHCKM_mm_full-100.pth')
    ckpt['config']['hidden_size'], ckpt['state_dict'], ckpt.get('epoch')

Our format (`save_checkpoint`, read back by `resume_from`): one dict with `config`,
`epoch` (the last finished epoch, 0-based), `state_dict` (buffers included),
`optimizer`, `rng_states` (the random states of every process, in rank order) and,
in fine-tuning, the early-stopping state (`cur_step`, `best_valid_score`,
`best_valid_result`, `best_valid_epoch`, `best_model_file`). Files are written
atomically (a temporary file renamed over the name), so a kill never leaves a
partial checkpoint.

Our checkpoints hold only plain values and open with `torch.load(...,
weights_only=True)`. The original code's checkpoints hold a pickled
`recbole.config.configurator.Config` (with RecBole enum members, a
`torch.device`, the model and YAML-loader classes, numpy scalars) that
`weights_only` refuses. Those are opened with a restricted unpickler that
resolves only an explicit allow-list of globals, and never imports recbole or
runs pickled code:

* `recbole.config.configurator.Config` -> `RecordedObject`, a plain object
  that only records the pickled state (its `__dict__`);
* the RecBole enums (`recbole.utils.enum_type.ModelType`, `InputType`,
  `EvaluatorType`, ...) -> `EnumStandIn` keeping the member's name and value;
* class objects stored as values (the model class `missrec.MISSRec`, the YAML
  loader `yaml.loader.FullLoader`) -> `GlobalRef`, an inert name that cannot
  be called or instantiated;
* everything torch's own `weights_only` unpickler allows (tensor and storage
  classes, the `torch._utils._rebuild_*` functions, `collections.OrderedDict`,
  `torch.device`, `torch.Size`, `_codecs.encode`, ...);
* numpy scalars and arrays (`numpy[._]core.multiarray.scalar`/`_reconstruct`,
  `numpy.dtype`, `numpy.ndarray`);
* `builtins.getattr` only as early Python 3.11 releases (3.11.2, Debian 12's,
  among them) pickle Enum members, `getattr(<RecBole enum>, 'MEMBER')` (Python
  <= 3.10, 3.11.7 and 3.12 pickle them by value, `<RecBole enum>(value)`): it
  resolves to a function that accepts only a RecBole enum stand-in and a member
  name, and never calls the builtin.

Any other global raises `UnsafeCheckpointError` (an `UnpicklingError`) that
names it, and so does setting state on a class or function (BUILD), which could
monkey-patch it. The returned dict has `config` as a plain dict: the Config's
`final_config_dict` (enum members become strings like 'ModelType.SEQUENTIAL',
class references strings like 'missrec.MISSRec').
"""
import collections
import io
import logging
import os
import pickle
import random
import tempfile
import types

import numpy as np
import torch

import distributed as D
from io_utils import atomic_open

__all__ = ['load_checkpoint', 'state_dict_of', 'save_checkpoint', 'resume_from', 'load_pretrained',
           'shape_mismatches', 'CheckpointError', 'UnsafeCheckpointError', 'RecordedObject', 'EnumStandIn',
           'GlobalRef', 'check_writable']

logger = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read; the message names the file and what was expected."""


class UnsafeCheckpointError(CheckpointError, pickle.UnpicklingError):
    """The checkpoint references a global that is not on the allow-list."""


# ------------------------------------------------------------------ stand-ins
class RecordedObject:
    """Stand-in for a pickled RecBole object: records its constructor arguments
    (if any) and its pickled state; runs no code of the original class."""

    _origin = '?'

    def __init__(self, *args, **kwargs):
        self.__dict__['_recorded_args'] = (args, kwargs)

    def __setstate__(self, state):
        slots = None
        if isinstance(state, tuple) and len(state) == 2 and (state[1] is None or isinstance(state[1], dict)):
            state, slots = state
        if isinstance(state, dict):
            self.__dict__.update(state)
        elif state is not None:
            self.__dict__['_recorded_state'] = state
        if slots:
            self.__dict__.update(slots)

    def __repr__(self):
        return f'<stand-in for {self._origin}>'


class EnumStandIn:
    """Stand-in for a member of a RecBole enum: keeps the class name, member name and value."""

    _enum = '?'
    _members = {}

    def __init__(self, value):
        self.value = value
        self.name = self._members.get(value, str(value))

    @classmethod
    def _from_name(cls, name):
        """The member called `name` (pickled by name, as early Python 3.11 releases do); a name that
        the table does not know keeps the name as its value."""
        values = [v for v, n in cls._members.items() if n == name]
        member = cls(values[0] if values else name)
        member.name = name
        return member

    def __eq__(self, other):
        return (isinstance(other, EnumStandIn) and (self._enum, self.value) == (other._enum, other.value))

    def __hash__(self):
        return hash((self._enum, self.value))

    def __str__(self):
        return f'{self._enum}.{self.name}'

    def __repr__(self):
        return f'<{self._enum}.{self.name}: {self.value!r}>'


class GlobalRef:
    """An inert reference to a class stored as a value (e.g. the model class); cannot be called."""

    def __init__(self, module, name):
        self.module, self.name = module, name

    def __call__(self, *args, **kwargs):
        raise UnsafeCheckpointError(f"the checkpoint tries to call {self.module}.{self.name}, which is only "
                                    'allowed as a stored reference')

    def __str__(self):
        return f'{self.module}.{self.name}'

    def __repr__(self):
        return f'<reference to {self}>'


def _enum_member(*args):
    """What the unpickler calls for `builtins.getattr`. Early Python 3.11 releases (3.11.2 among
    them) pickle Enum members by name, `getattr(EnumClass, 'MEMBER')`; 3.10 and earlier, 3.11.7 and
    3.12 by value, `EnumClass(value)`. Only that pattern is accepted: two arguments, one of the
    allow-listed RecBole enum stand-ins and a member name (a plain str). Nothing is looked up on any
    object: the stand-in member is made from the name. Anything else is refused like an unlisted
    global."""
    if len(args) == 2:
        cls, name = args
        if (isinstance(cls, type) and cls in _enum_classes() and type(name) is str
                and name.isidentifier() and not name.startswith('_')):
            return cls._from_name(name)
    raise UnsafeCheckpointError(
        f"refusing to load global 'builtins.getattr' called on ({', '.join(map(_describe, args))}): "
        "only getattr(<RecBole enum>, '<member name>'), as Python 3.11 pickles Enum members, is allowed")


def _describe(obj):
    """A short, safe description of an unpickled argument for a refusal message."""
    if isinstance(obj, str):
        return repr(obj[:40])
    if isinstance(obj, type):
        return f'class {obj.__module__}.{obj.__qualname__}'
    return type(obj).__name__


def _enum_classes():
    allowed = allowed_globals()
    return {allowed[f'recbole.utils.enum_type.{name}'] for name in _RECBOLE_ENUMS}


def _recorded_class(module, name):
    return type(name, (RecordedObject,), {'_origin': f'{module}.{name}', '__module__': __name__})


def _enum_class(name, members):
    return type(name, (EnumStandIn,), {'_enum': name, '_members': members, '__module__': __name__})


# RecBole 1.x recbole/utils/enum_type.py: member values -> names.
_RECBOLE_ENUMS = {
    'ModelType': {1: 'GENERAL', 2: 'SEQUENTIAL', 3: 'CONTEXT', 4: 'KNOWLEDGE', 5: 'TRADITIONAL',
                  6: 'DECISIONTREE'},
    'DataLoaderType': {1: 'ORIGIN', 2: 'FULL', 3: 'NEGSAMPLE'},
    'KGDataLoaderState': {1: 'RSKG', 2: 'RS', 3: 'KG'},
    'EvaluatorType': {1: 'RANKING', 2: 'VALUE'},
    'InputType': {1: 'POINTWISE', 2: 'PAIRWISE', 3: 'LISTWISE'},
    'FeatureType': {'token': 'TOKEN', 'float': 'FLOAT', 'token_seq': 'TOKEN_SEQ', 'float_seq': 'FLOAT_SEQ'},
    'FeatureSource': {'inter': 'INTERACTION', 'user': 'USER', 'item': 'ITEM', 'user_id': 'USER_ID',
                      'item_id': 'ITEM_ID', 'kg': 'KG', 'net': 'NET'},
}

# Class objects that the original Config stores as values (Config.model_class, Config.yaml_loader).
_REFERENCE_ONLY = {
    ('missrec', 'MISSRec'), ('__main__', 'MISSRec'),
    ('yaml.loader', 'FullLoader'), ('yaml.loader', 'Loader'), ('yaml.loader', 'SafeLoader'),
    ('yaml.loader', 'UnsafeLoader'), ('yaml.loader', 'BaseLoader'),
}


def _numpy_globals():
    try:
        import numpy as np
    except ImportError:                                                 # pragma: no cover
        return {}
    try:
        from numpy._core import multiarray                              # numpy >= 2
    except ImportError:                                                 # pragma: no cover
        from numpy.core import multiarray                               # numpy 1.x
    out = {}
    for mod in ('numpy.core.multiarray', 'numpy._core.multiarray'):
        out[f'{mod}.scalar'] = multiarray.scalar
        out[f'{mod}._reconstruct'] = multiarray._reconstruct
    out['numpy.dtype'] = np.dtype
    out['numpy.ndarray'] = np.ndarray
    return out


def _torch_globals():
    """The globals torch's weights_only unpickler allows (tensors, storages, rebuild functions)."""
    try:
        from torch._weights_only_unpickler import _get_allowed_globals
        return dict(_get_allowed_globals())
    except Exception:                                                   # pragma: no cover
        import torch._utils as tu
        out = {'collections.OrderedDict': collections.OrderedDict, 'torch.device': torch.device,
               'torch.Size': torch.Size, 'torch.nn.parameter.Parameter': torch.nn.Parameter,
               'torch._tensor._rebuild_from_type_v2': torch._tensor._rebuild_from_type_v2}
        for name in ('_rebuild_tensor', '_rebuild_tensor_v2', '_rebuild_tensor_v3', '_rebuild_parameter',
                     '_rebuild_parameter_with_state'):
            if hasattr(tu, name):
                out[f'torch._utils.{name}'] = getattr(tu, name)
        import codecs
        out['_codecs.encode'] = codecs.encode
        return out


_ALLOWED = None


def allowed_globals():
    """{'module.name': object} that the restricted unpickler resolves."""
    global _ALLOWED
    if _ALLOWED is None:
        allowed = _torch_globals()
        allowed['collections.OrderedDict'] = collections.OrderedDict
        allowed['torch.device'] = torch.device
        allowed.update(_numpy_globals())
        allowed['recbole.config.configurator.Config'] = _recorded_class('recbole.config.configurator', 'Config')
        for name, members in _RECBOLE_ENUMS.items():
            cls = _enum_class(name, members)
            allowed[f'recbole.utils.enum_type.{name}'] = cls
            allowed[f'recbole.utils.{name}'] = cls
        # early Python 3.11 releases pickle Enum members as getattr(EnumClass, 'NAME'): a getattr that only
        # makes members of the enum stand-ins above (_enum_member), never the builtin
        allowed['builtins.getattr'] = _enum_member
        _ALLOWED = allowed
    return _ALLOWED


class RestrictedUnpickler(pickle._Unpickler):
    """Resolves only the allow-listed globals; anything else raises UnsafeCheckpointError.

    Built on the pure-Python unpickler (the pickles of a checkpoint are small: tensor
    data lives in separate records) so that BUILD can be checked too: setting state
    on a class or other callable (monkey-patching it) is refused, as torch's
    weights_only unpickler does."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module, name):
        if self.proto < 3 and self.fix_imports:       # torch.save writes protocol 2 with Python 2 names
            from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING
            if (module, name) in NAME_MAPPING:
                module, name = NAME_MAPPING[(module, name)]
            elif module in IMPORT_MAPPING:
                module = IMPORT_MAPPING[module]
        obj = allowed_globals().get(f'{module}.{name}')
        if obj is not None:
            return obj
        if (module, name) in _REFERENCE_ONLY:
            return GlobalRef(module, name)
        raise UnsafeCheckpointError(
            f"refusing to load global '{module}.{name}': not on the allow-list of checkpoints.py "
            '(expected tensors, plain Python values and the RecBole Config/enums of the original code)')

    def load_build(self):
        inst = self.stack[-2]                          # [..., inst, state]
        if callable(inst):
            raise UnsafeCheckpointError(f'refusing to set the state of {inst!r} (a class or function); '
                                        'expected state only on plain objects')
        pickle._Unpickler.load_build(self)

    dispatch[pickle.BUILD[0]] = load_build


def _restricted_load(file, **kwargs):
    return RestrictedUnpickler(file, **kwargs).load()


def _restricted_loads(data, **kwargs):
    import io
    return RestrictedUnpickler(io.BytesIO(data), **kwargs).load()


# A module object usable as torch.load(pickle_module=...).
restricted_pickle = types.ModuleType('checkpoints_restricted_pickle')
restricted_pickle.Unpickler = RestrictedUnpickler
restricted_pickle.load = _restricted_load
restricted_pickle.loads = _restricted_loads
restricted_pickle.UnpicklingError = pickle.UnpicklingError
restricted_pickle.__version__ = '1.0'


# ------------------------------------------------------------------- loading
def _state_of(obj):
    """The recorded state of a RecordedObject (read via vars(): pickled keys may shadow methods)."""
    return {k: v for k, v in vars(obj).items() if k != '_recorded_args'}


def _plain(value):
    """Stand-ins -> plain values (recursively through dicts, lists, tuples, sets)."""
    if isinstance(value, (EnumStandIn, GlobalRef)):
        return str(value)
    if isinstance(value, RecordedObject):
        return {k: _plain(v) for k, v in _state_of(value).items()}
    if isinstance(value, collections.OrderedDict):
        return collections.OrderedDict((k, _plain(v)) for k, v in value.items())
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, (set, frozenset)):
        return type(value)(_plain(v) for v in value)
    return value


def config_dict(config):
    """A checkpoint's `config` as a plain dict (the original Config's final_config_dict)."""
    if isinstance(config, RecordedObject):
        state = _state_of(config)
        final = state.get('final_config_dict')
        return _plain(final if isinstance(final, dict) else state)
    if isinstance(config, dict):
        return _plain(config)
    if config is None:
        return {}
    return _plain(getattr(config, '__dict__', {'value': config}))


def load_checkpoint(path, map_location='cpu'):
    """Read a `.pth` checkpoint without running pickled code; returns its dict with a plain `config`.

    Raises:
        CheckpointError: missing or unreadable file (message: file and what was expected).
        UnsafeCheckpointError: the file references a global outside the allow-list.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f'{path}: checkpoint file not found')
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        # unknown globals (e.g. the original's recbole Config): the restricted unpickler
        try:
            ckpt = torch.load(path, map_location=map_location, pickle_module=restricted_pickle,
                              weights_only=False)
        except UnsafeCheckpointError as e:
            raise UnsafeCheckpointError(f'{path}: {e}') from None
        except Exception as e:
            raise CheckpointError(f'{path}: not a readable checkpoint (expected a file written by '
                                  f'torch.save): {type(e).__name__}: {e}') from None
    except Exception as e:
        raise CheckpointError(f'{path}: not a readable checkpoint (expected a file written by torch.save): '
                              f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}') from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f'{path}: expected a dict (config, epoch, state_dict, ...), '
                              f'got {type(ckpt).__name__}')
    if 'config' in ckpt:
        ckpt = dict(ckpt)
        ckpt['config'] = config_dict(ckpt['config'])
    return ckpt


def state_dict_of(ckpt, path='checkpoint'):
    """The model state dict of a loaded checkpoint (a bare state dict is accepted;
    a DDP `module.` prefix on every key is removed)."""
    state = ckpt.get('state_dict', ckpt)
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise CheckpointError(f"{path}: expected 'state_dict' to map parameter names to tensors")
    if state and all(k.startswith('module.') for k in state):
        state = collections.OrderedDict((k[len('module.'):], v) for k, v in state.items())
    return state


def shape_mismatches(model, state):
    """['name (checkpoint shape) vs (model shape)', ...] of the entries of `state` that the model
    holds with another shape."""
    own = model.state_dict()
    return [f'{k} {tuple(v.shape)} vs {tuple(own[k].shape)}' for k, v in state.items()
            if k in own and own[k].shape != v.shape]


# ---------------------------------------------------------------- our format
def atomic_save(obj, path):
    """torch.save through a temporary file renamed over `path` (io_utils.py): a kill at any
    moment leaves either the old file or the new one, never a partial one. The bytes are made
    in memory first, so that a failing write (disk full) raises the OSError itself, not
    torch's writer error, and becomes one line."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    try:
        with atomic_open(path, 'wb') as f:
            f.write(buf.getbuffer())
    except OSError as e:
        raise CheckpointError(f'{path}: could not be written ({e.strerror or e}); '
                              f'the checkpoints written before are kept') from e


def check_writable(folder):
    """Create `folder` if needed and write a probe file there, so that a run that could not save
    its checkpoints stops before training."""
    try:
        os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix='.write-probe-', dir=folder)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise CheckpointError(f'{folder}: checkpoint folder cannot be written ({e.strerror or e})') from e


def rng_state():
    """Random states as tensors and plain types, so that `torch.load(weights_only=True)` reads them."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {'torch': torch.get_rng_state(), 'python': random.getstate(),
            'numpy': [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
            'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state):
    torch.set_rng_state(state['torch'].cpu())
    name, keys, pos, has_gauss, cached = state['numpy']
    np.random.set_state((name, keys.cpu().numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state['python']
    random.setstate((version, tuple(internal), gauss))
    if state.get('cuda') is not None and torch.cuda.is_available():
        set_cuda_rng_states(state['cuda'])


_WARNED_GPU_COUNT = False


def set_cuda_rng_states(states):
    """Restore saved CUDA generator states (CPU ByteTensors); a checkpoint written where more (or fewer)
    GPUs were visible restores those it has for the GPUs visible now."""
    global _WARNED_GPU_COUNT
    count = torch.cuda.device_count()
    if len(states) != count and not _WARNED_GPU_COUNT:
        logger.warning(f'the checkpoint holds the random states of {len(states)} GPUs, {count} visible now: '
                       f'restoring {min(len(states), count)}')
        _WARNED_GPU_COUNT = True
    for i, s in enumerate(states[:count]):
        torch.cuda.set_rng_state(s.cpu(), i)


def save_checkpoint(path, config, epoch, model, optimizer, **state):
    """Write a checkpoint of the one format (module docstring). Every process calls it: the random
    states of all are gathered, rank 0 writes, and the others wait until the file is there.

    Args:
        epoch: the last finished epoch (0-based).
        state: further entries (fine-tuning: the early-stopping state).
    """
    states = D.all_gather_object(rng_state())
    if D.is_main_process():
        atomic_save({'config': config.to_dict(), 'epoch': epoch, 'state_dict': model.state_dict(),
                     'optimizer': optimizer.state_dict(), 'rng_states': states, **state}, path)
    D.barrier()


def resume_from(path, model, optimizer, expected, required=()):
    """Load a checkpoint of `save_checkpoint` into model and optimizer and restore this process's
    random states; returns the checkpoint (its `epoch` and any further entries).

    The file is read onto the CPU: the model's and the optimiser's `load_state_dict` copy each
    tensor to its parameter's device, except Adam's step counters, which stay on the host as in a
    fresh run (on a GPU, reading a step counter there would stall every step once per parameter).

    Args:
        expected: what the checkpoint should be, for the message when it is not.
        required: further entries the checkpoint must hold.
    """
    ckpt = load_checkpoint(path)
    if any(k not in ckpt for k in ('state_dict', 'optimizer', 'epoch', 'rng_states', *required)):
        raise CheckpointError(f'{path}: not a checkpoint to resume from (expected {expected})')
    model.load_state_dict(ckpt['state_dict'])
    optimizer.load_state_dict(ckpt['optimizer'])
    states = ckpt['rng_states']
    if len(states) == D.world_size():
        set_rng_state(states[D.rank()])
    else:
        logger.warning(f'{path} was written by {len(states)} processes, now {D.world_size()}: '
                       'random states not restored')
    return ckpt


# ------------------------------------------------------------- pre-trained
def load_pretrained(model, path, freeze):
    """Load a pre-trained state dict non-strictly (SPEC 4); with `freeze`, freeze the position
    embedding and the Transformer. The checkpoint's interest tables, if any, are not loaded:
    they belong to its own items, and interest discovery rebuilds the model's before the first
    epoch. Returns the lines to log (missing and unexpected keys)."""
    if not os.path.exists(path):
        raise CheckpointError(f'{path}: pre-trained checkpoint not found')
    state = state_dict_of(load_checkpoint(path), path)
    interest = {'interest_embeddings', 'plm_interest_lookup_table', 'img_interest_lookup_table'}
    skipped = sorted(k for k in state if k in interest)
    state = {k: v for k, v in state.items() if k not in interest}
    mismatched = shape_mismatches(model, state)
    if mismatched:
        raise CheckpointError(f'{path}: parameter shapes differ from the model: ' + '; '.join(mismatched))
    result = model.load_state_dict(state, strict=False)
    if freeze:
        for p in list(model.position_embedding.parameters()) + list(model.trm_model.parameters()):
            p.requires_grad = False
    lines = [f'Loading pre-trained model from {path}',
             f'missing keys (kept as initialised): {result.missing_keys}',
             f'unexpected keys (ignored): {result.unexpected_keys}']
    if skipped:
        lines.append(f'interest tables of the checkpoint (rebuilt by interest discovery): {skipped}')
    return lines
