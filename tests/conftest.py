"""Shared fixtures: generated demo data (tools/make_demo_data.py), a checkpoint fine-tuned on it,
and stand-ins for the `recbole` modules that the original code's checkpoints reference."""
import enum
import sys
import types

import pytest
import torch

from tools.make_demo_data import write_downstream, write_pretrain

# the fine-tuning run behind the `finetuned` checkpoint (CPU even where a GPU is present)
FINETUNED_ARGS = ['--hidden_size=32', '--inner_size=32', '--plm_size=32', '--img_size=32', '--epochs=1',
                  '--show_progress=False', '--use_gpu=False']


@pytest.fixture
def one_thread():
    """One torch thread for the test (2 shared cores: more threads only add contention at test sizes)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _plain(model, run):
    model.forward_path = 'plain'
    try:
        return run()
    finally:
        model.forward_path = 'packed'


@pytest.fixture
def plain():
    """plain(model, run) -> run() with the model on `forward_path: plain`, the padded code of
    missrec.py that the packed fast path (the default) must equal."""
    return _plain


@pytest.fixture(scope='session')
def make_demo(tmp_path_factory):
    """Demo datasets, each written once per session:
    make_demo('downstream' | 'pretrain', **arguments of write_downstream / write_pretrain)
    -> (the folder holding the dataset's folder, the generated data). Tests that damage
    a dataset copy it first."""
    made = {}

    def make(kind='downstream', **kwargs):
        key = (kind, tuple(sorted(kwargs.items())))
        if key not in made:
            root = tmp_path_factory.mktemp(kind)
            write = {'downstream': write_downstream, 'pretrain': write_pretrain}[kind]
            made[key] = (root, write(root, return_data=True, **kwargs)[1])
        return made[key]
    return make


@pytest.fixture(scope='session')
def demo(make_demo):
    """The data_path of `Demo`: 150 users, 60 items, 32-d features."""
    return make_demo(name='Demo', n_users=150, n_items=60, dim=32, seed=7)[0]


@pytest.fixture(scope='session')
def demo_pretrain(make_demo):
    """The data_path of the pre-training corpus `DemoPT`: 3 domains of 40 users and 40 items, 32-d features."""
    return make_demo('pretrain', name='DemoPT', n_users_per_domain=40, n_items_per_domain=40, dim=32, seed=7)[0]


@pytest.fixture(scope='session')
def finetuned(demo, tmp_path_factory):
    """A checkpoint fine-tuned for one epoch on `Demo`: {'checkpoint', 'data_path', 'config', 'out'}."""
    from quick_start import build_config, finetune, parse_args
    root = tmp_path_factory.mktemp('finetuned')
    config = build_config('finetune', *parse_args('finetune', [
        '-d', 'Demo', f'--data_path={demo}', f'--checkpoint_dir={root}/saved', f'--log_dir={root}/log',
        *FINETUNED_ARGS]))
    out = finetune(config)
    return {'checkpoint': out['checkpoint'], 'data_path': str(demo), 'config': config, 'out': out}


FAKE_MODULES = ('recbole', 'recbole.config', 'recbole.config.configurator', 'recbole.utils',
                'recbole.utils.enum_type')


@pytest.fixture
def fake_recbole():
    """Throwaway stand-ins for the original's recbole classes, registered in sys.modules while the
    test builds its checkpoint: yields (install, remove); install() -> (Config, ModelType, InputType)."""
    def install():
        mods = {name: types.ModuleType(name) for name in FAKE_MODULES}

        class Config:
            def __init__(self, final):
                self.final_config_dict = final
                self.parameters = {'General': ['seed']}
                self.dataset = final['dataset']

        Config.__module__ = 'recbole.config.configurator'
        Config.__qualname__ = 'Config'
        ModelType = enum.Enum('ModelType', [('GENERAL', 1), ('SEQUENTIAL', 2)], module='recbole.utils.enum_type')
        InputType = enum.Enum('InputType', [('POINTWISE', 1), ('PAIRWISE', 2)], module='recbole.utils.enum_type')
        mods['recbole.config.configurator'].Config = Config
        mods['recbole.utils.enum_type'].ModelType = ModelType
        mods['recbole.utils.enum_type'].InputType = InputType
        for name, mod in mods.items():
            assert name not in sys.modules
            sys.modules[name] = mod
        return Config, ModelType, InputType

    def remove():
        for name in FAKE_MODULES:
            sys.modules.pop(name, None)

    yield install, remove
    remove()


def save_original_checkpoint(fake_recbole, path, final, ckpt, input_type=False):
    """Write our fine-tuned `ckpt` in the original code's layout: a pickled recbole Config over
    `final` (MODEL_TYPE sequential, and MODEL_INPUT_TYPE pointwise with `input_type`)."""
    install, remove = fake_recbole
    config, model_type, inputs = install()
    try:
        final = dict(final, MODEL_TYPE=model_type.SEQUENTIAL)
        if input_type:
            final['MODEL_INPUT_TYPE'] = inputs.POINTWISE
        torch.save({'config': config(final), 'epoch': 0, 'cur_step': 0, 'best_valid_score': 0.1,
                    'state_dict': ckpt['state_dict'], 'other_parameter': None, 'optimizer': ckpt['optimizer']}, path)
    finally:
        remove()
    return path
