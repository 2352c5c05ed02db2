"""Opening the original code's checkpoints safely: a restricted unpickler for their pickled RecBole
`Config` (checkpoints.load_checkpoint falls back to it when `torch.load(..., weights_only=True)` refuses
a file).

    from original_pickle import config_dict, load
    ckpt = load('saved/MISSRec-FHCKM_mm_full-100.pth')     # stand-ins in place of RecBole's objects
    config_dict(ckpt['config'])                           # the Config's final_config_dict, plain values

The original code's checkpoints hold a pickled
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

Any other global raises `UnsafePickleError` (an `UnpicklingError`) that
names it, and so does setting state on a class or function (BUILD), which could
monkey-patch it. `config_dict` turns the recorded Config into a plain dict: its
`final_config_dict` (enum members become strings like 'ModelType.SEQUENTIAL',
class references strings like 'missrec.MISSRec').
"""
import collections
import io
import pickle
import types

import torch

__all__ = ['load', 'config_dict', 'UnsafePickleError', 'RecordedObject', 'EnumStandIn', 'GlobalRef',
           'RestrictedUnpickler', 'restricted_pickle', 'allowed_globals']


class UnsafePickleError(pickle.UnpicklingError):
    """The file references a global that is not on the allow-list (or sets state on a class)."""


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
        raise UnsafePickleError(f"the checkpoint tries to call {self.module}.{self.name}, which is only "
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
    raise UnsafePickleError(
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
    """Resolves only the allow-listed globals; anything else raises UnsafePickleError.

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
        raise UnsafePickleError(
            f"refusing to load global '{module}.{name}': not on the allow-list of original_pickle.py "
            '(expected tensors, plain Python values and the RecBole Config/enums of the original code)')

    def load_build(self):
        inst = self.stack[-2]                          # [..., inst, state]
        if callable(inst):
            raise UnsafePickleError(f'refusing to set the state of {inst!r} (a class or function); '
                                        'expected state only on plain objects')
        pickle._Unpickler.load_build(self)

    dispatch[pickle.BUILD[0]] = load_build


def _restricted_load(file, **kwargs):
    return RestrictedUnpickler(file, **kwargs).load()


def _restricted_loads(data, **kwargs):
    return RestrictedUnpickler(io.BytesIO(data), **kwargs).load()


# A module object usable as torch.load(pickle_module=...).
restricted_pickle = types.ModuleType('original_pickle_restricted')
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


def load(path, map_location='cpu'):
    """`torch.load` of `path` through the restricted unpickler; raises UnsafePickleError (a global
    outside the allow-list) or torch's own errors (not a checkpoint)."""
    return torch.load(path, map_location=map_location, pickle_module=restricted_pickle, weights_only=False)
