"""scripts/baselines.sh: Pop, TextSim, SASRec and MISSRec (run01 and run03 settings) on one dataset, then one table."""
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_baselines_script_on_demo(demo, tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES='', BASELINES_LOG_DIR=str(tmp_path / 'log'), OMP_NUM_THREADS='1')
    cmd = ['bash', 'scripts/baselines.sh', 'Demo', f'--data_path={demo}', f'--checkpoint_dir={tmp_path}/saved',
           '--epochs=1', '--hidden_size=16', '--inner_size=16', '--plm_size=32', '--img_size=32',
           '--show_progress=False']
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    table = open(tmp_path / 'log' / 'table.md').read().strip()
    assert out.stdout.rstrip().endswith(table + f"\ntable: {tmp_path / 'log' / 'table.md'}")
    rows = [l for l in table.splitlines() if l.startswith('| ') and not l.startswith('| model')]
    assert len(rows) == 10                                    # 5 runs x 2 conventions
    names = sorted({(r.split(' | ')[0][2:], r.split(' | ')[2], r.split(' | ')[4]) for r in rows})
    assert names == [('MISSRec', 'inductive_ft', 'run03'), ('MISSRec', 'transductive_ft', 'run01'),
                     ('Pop', 'transductive_ft', ''), ('SASRec', 'transductive_ft', ''),
                     ('TextSim', 'transductive_ft', '')]
    assert sorted(f.split('-')[0] for f in os.listdir(tmp_path / 'log') if f.endswith('.log')) == \
        ['MISSRec', 'MISSRec', 'Pop', 'SASRec', 'TextSim']


def test_baselines_script_needs_a_dataset():
    out = subprocess.run(['bash', 'scripts/baselines.sh'], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and 'usage' in out.stderr
