"""Config precedence, YAML typing and checks (SPEC 2)."""
import pytest

from config import Config, ConfigError, parse_overrides, stage_files


def test_precedence_defaults_props_stage_command_line(tmp_path):
    extra = tmp_path / 'extra.yaml'
    extra.write_text('hidden_size: 64\nlearning_rate: 1e-2\n')
    cfg = Config('Scientific_mini', stage_files('finetune') + [str(extra)],
                 parse_overrides(['--learning_rate=5e-4', '--topk=[5,20]']))
    assert cfg['hidden_size'] == 64                  # file over MISSRec.yaml
    assert cfg['learning_rate'] == 5e-4              # command line over files
    assert cfg['topk'] == [5, 20]
    assert cfg['gamma'] == 1e-4 and isinstance(cfg['gamma'], float)   # '1e-4' read as a float
    assert cfg['train_stage'] == 'transductive_ft' and cfg['interest_ratio'] == 0.5
    assert Config('P', stage_files('pretrain'))['train_batch_size'] == 4096


def test_unknown_key_suggests_the_closest():
    with pytest.raises(ConfigError, match="unknown config key 'hiden_size'; did you mean 'hidden_size'"):
        Config(overrides={'hiden_size': 3})


@pytest.mark.parametrize('key,value,message', [
    ('train_stage', 'finetune', 'expected one of pretrain, inductive_ft, transductive_ft'),
    ('seq_mm_fusion', 'concat', 'expected one of add, contextual'),
    ('n_layers', 3, 'even integer'),
    ('interest_ratio', 0, r'in \(0, 1\]'),
    ('interest_ratio', 1.5, r'in \(0, 1\]'),
    ('hidden_size', 'big', 'positive integer'),
    ('learning_rate', 'fast', 'expected a number'),
    ('valid_metric', 'NDCG', 'expected e.g. NDCG@10'),
])
def test_bad_values_are_named(key, value, message):
    with pytest.raises(ConfigError, match=message):
        Config(overrides={key: value})


def test_overrides_must_look_like_key_value():
    with pytest.raises(ConfigError, match="expected --key=value, got 'epochs'"):
        parse_overrides(['epochs'])


@pytest.mark.parametrize('value', ['a', '-1', '0, 1', True])
def test_bad_gpu_id_is_named(value):
    with pytest.raises(ConfigError, match=r"gpu_id = .*expected GPU indices like 0 or '0,1'"):
        Config(overrides={'gpu_id': value})
