"""tools/gpu_check.py (scripts/gpu_check.sh): its dry run on the CPU, how it judges the suite's part,
the CuPy row, timeouts that end whole process groups, and the interpreter the script picks."""
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time

import pytest

from tools import gpu_check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_dry_run_of_the_kernel_and_process_group_steps(tmp_path):
    out = subprocess.run([sys.executable, 'tools/gpu_check.py', '--dry-run', '--no-suite', '--steps',
                          'kernels,nccl,gloo', '--out', str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                         timeout=600, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    table = out.stdout[out.stdout.index('## GPU check verdict'):]
    for line in ('| kernels: k-means original | PASS', '| kernels: k-means lloyd | PASS', '| kernels: DPC-KNN | PASS',
                 '| kernels: FHCKM-size assignment, sampled | PASS', '| kernels: CuPy path ran | SKIPPED',
                 '| timing: FHCKM-size discovery, lloyd | PASS', '| gloo: DDP pre-training, 1 rank | PASS',
                 '| gloo: ddp_finetune epoch, sharded evaluation | PASS',
                 '| gloo: 2 ranks on one CPU, DDP pretrain | PASS', '| gloo: 2 ranks on one CPU, DDP finetune | PASS',
                 '| suite: CUDA/CuPy tests, CPU subset | SKIPPED'):
        assert line in table, line
    assert '10 passed, 0 failed, 4 skipped' in table
    # the verdict names what it ran with, in the table and in verdict.json
    import numpy
    import torch
    verdict = json.loads((tmp_path / 'verdict.json').read_text())
    env = verdict['environment']
    assert env['torch'] == torch.__version__ and env['numpy'] == numpy.__version__
    assert env['python'].startswith(sys.version.split()[0]) and sys.executable in env['python']
    assert env['cuda'] == (torch.version.cuda or 'none (a CPU build of torch)') and env['cupy']
    assert f"python {env['python']}, torch {env['torch']}, CUDA {env['cuda']}, cupy {env['cupy']}" in table
    assert verdict['counts'] == {'PASS': 10, 'FAIL': 0, 'SKIPPED': 4} and len(verdict['rows']) == 14
    assert 'uneven' in next(r['detail'] for r in verdict['rows'] if r['step'].endswith('DDP pretrain'))


def test_a_failing_step_is_a_fail_row(tmp_path):
    rows = gpu_check.run_step('no_such_step', {'dry': True, 'data': '', 'out': str(tmp_path)}, 120)
    assert [(r['step'], r['status']) for r in rows] == [('no_such_step', 'FAIL')]
    assert "KeyError: 'step_no_such_step'" in rows[0]['detail']


# ----------------------------------------------------------------------------- timeouts

def _gone(pid, wait_s=10):
    """The process has exited (no such pid, or a zombie waiting for its new parent to reap it)."""
    end = time.time() + wait_s
    while time.time() < end:
        try:
            with open(f'/proc/{pid}/stat') as f:
                if f.read().rsplit(')', 1)[1].split()[0] == 'Z':
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


def _sleeper(pid_file):
    """A command that starts a sleeping child, writes its pid, then sleeps itself."""
    code = (f'import subprocess, sys, time; p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"]); '
            f'open({str(pid_file)!r}, "w").write(str(p.pid)); time.sleep(120)')
    return [sys.executable, '-c', code]


def _pid(pid_file, wait_s=30):
    end = time.time() + wait_s
    while time.time() < end:
        if pid_file.exists() and pid_file.read_text():
            return int(pid_file.read_text())
        time.sleep(0.05)
    raise AssertionError(f'{pid_file} was not written')


def test_a_timed_out_step_is_killed_with_its_children(tmp_path, monkeypatch):
    pid_file = tmp_path / 'child.pid'
    monkeypatch.setattr(gpu_check, 'step_cmd', lambda name, ctx, result: _sleeper(pid_file))
    start = time.time()
    rows = gpu_check.run_step('sleeper', {'dry': True, 'data': '', 'out': str(tmp_path)}, 3)
    assert [(r['step'], r['status'], r['detail']) for r in rows] == [('sleeper', 'FAIL', 'timed out after 3 s')]
    assert time.time() - start < 3 + gpu_check.KILL_GRACE_S + 5
    assert _gone(_pid(pid_file)), 'the child of the timed-out step is still running'
    assert 'timed out after 3 s, killed' in (tmp_path / 'sleeper.out').read_text()
    assert not gpu_check._GROUPS


def test_a_step_told_to_stop_ends_the_commands_it_started(tmp_path):
    """The orchestrator's timeout reaches a step's own commands too, though each runs in a session
    of its own: the step process kills their groups when SIGTERM comes."""
    pid_file = tmp_path / 'grandchild.pid'
    step = textwrap.dedent(f'''
        import signal, sys
        sys.path.insert(0, {ROOT!r})
        from tools import gpu_check
        signal.signal(signal.SIGTERM, gpu_check._stop_on_term)
        gpu_check.run({_sleeper(pid_file)!r}, {str(tmp_path / 'inner.log')!r}, 300)
    ''')
    with pytest.raises(gpu_check.TimedOut, match=r'^timed out after 5 s'):
        gpu_check.run([sys.executable, '-c', step], str(tmp_path / 'outer.log'), 5)
    assert _gone(_pid(pid_file)), 'the command the step started is still running'


# ----------------------------------------------------------------------------- the suite's part

def test_suite_verdict_on_a_gpu_refuses_skipped_cuda_tests(tmp_path):
    log = tmp_path / 'suite.log'
    log.write_text('....s.\nSKIPPED [2] tests/test_cluster.py:250: needs CUDA and cupy\n'
                   'SKIPPED [3] tests/test_real_data.py:17: ../shared/datasets/downstream/Scientific_mini not found\n'
                   '30 passed, 5 skipped in 8.00s\n')
    cuda = 'suite: CUDA/CuPy tests'
    gpu = gpu_check.suite_rows(cuda, 0, str(log), dry=False)
    assert [r['status'] for r in gpu] == ['FAIL'] and 'needs CUDA and cupy' in gpu[0]['detail']
    dry = gpu_check.suite_rows(cuda, 0, str(log), dry=True)
    assert [(r['status'], r['detail']) for r in dry] == [
        ('SKIPPED', '2 skipped without CUDA/CuPy (30 passed, 5 skipped in 8.00s)')]
    assert gpu_check.suite_rows(cuda, 1, str(log), dry=True)[0]['status'] == 'FAIL'
    log.write_text('....\n4 passed in 3.00s\n')
    assert [(r['status'], r['detail']) for r in gpu_check.suite_rows(cuda, 0, str(log), dry=False)] == [
        ('PASS', '4 passed in 3.00s; none skipped for want of CUDA/CuPy')]
    log.write_text('\n12 deselected in 3.00s\n')
    assert gpu_check.suite_rows(cuda, 0, str(log), dry=False)[0]['status'] == 'FAIL'       # nothing ran
    cpu = gpu_check.suite_rows('suite: CPU subset', 5, str(log), dry=False)
    assert cpu[0]['status'] == 'FAIL' and cpu[0]['detail'].startswith('pytest exit status 5')


def test_suite_commands_run_in_parallel_where_xdist_is_installed(monkeypatch):
    for installed in (True, False):
        monkeypatch.setattr(gpu_check.importlib.util, 'find_spec', lambda name, _i=installed: object() if _i else None)
        monkeypatch.setattr(gpu_check.os, 'cpu_count', lambda: 16)
        cmds = gpu_check.suite_cmds()
        assert list(cmds) == ['suite: CUDA/CuPy tests', 'suite: CPU subset']
        for cmd, env in cmds.values():
            assert '-x' not in cmd and cmd[:3] == [sys.executable, '-m', 'pytest']
            assert cmd[cmd.index('-p', cmd.index('no:cacheprovider')) + 1] == 'tools.gpu_check'
        assert cmds['suite: CUDA/CuPy tests'] == (cmds['suite: CUDA/CuPy tests'][0], {'GPU_CHECK_TESTS': 'cuda'})
        assert cmds['suite: CUDA/CuPy tests'][0][-1] == 'tests'
        assert cmds['suite: CPU subset'][1] == {'GPU_CHECK_TESTS': 'cpu'}
        assert ('-n' in cmds['suite: CPU subset'][0]) == installed
        assert '-n' not in cmds['suite: CUDA/CuPy tests'][0]
    assert all(os.path.isfile(os.path.join(ROOT, f)) for f in gpu_check.CPU_SUBSET)


def _collect(part, paths):
    out = subprocess.run([sys.executable, '-m', 'pytest', '--collect-only', '-q', '-p', 'no:cacheprovider',
                          '-p', 'tools.gpu_check', *paths], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS='1', **({'GPU_CHECK_TESTS': part} if part else {})))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return {line for line in out.stdout.splitlines() if '::' in line}


def test_the_check_selects_the_tests_that_skip_without_cuda_by_their_marker():
    """Selected by skipif marker, not by name: a CUDA test of any name is in the CUDA part, and the
    CPU subset runs none of them (they run once)."""
    cuda = _collect('cuda', ['tests'])
    for test in ('tests/test_cluster.py::test_cupy_matches_torch[original]',
                 'tests/test_cluster.py::test_non_finite_point_on_cuda_stops_before_the_kernels',
                 'tests/test_model.py::test_packed_forward_on_cuda_equals_the_cpu',
                 'tests/test_checkpoints.py::test_cuda_random_states_restore_after_a_cuda_map_location'):
        assert test in cuda, test
    assert not any('test_kernels_compile_to_ptx' in t or 'warns_once' in t for t in cuda)   # CPU tests
    subset = ['tests/test_cluster.py', 'tests/test_model.py']
    everything, cpu = _collect(None, subset), _collect('cpu', subset)
    assert cpu and not cpu & cuda and cpu | {t for t in cuda if t.split('::')[0] in subset} == everything


# ----------------------------------------------------------------------------- the CuPy row

def test_the_cupy_row_fails_on_a_gpu_naming_why():
    reason = "cupy does not import (ModuleNotFoundError: No module named 'cupy')"
    r = gpu_check.cupy_row(True, 'torch', 0, reason)
    assert r['status'] == 'FAIL' and reason in r['detail'] and 'torch fall-back' in r['detail']
    r = gpu_check.cupy_row(True, 'torch', 0, 'cluster_kernels.cu failed to compile on cuda:0 (CompileException: x)')
    assert r['status'] == 'FAIL' and 'failed to compile' in r['detail']
    assert gpu_check.cupy_row(True, 'cupy', 12, None)['status'] == 'PASS'
    assert gpu_check.cupy_row(True, 'cupy', 0, None)['status'] == 'FAIL'
    assert gpu_check.cupy_row(False, 'torch', 0, None)['status'] == 'SKIPPED'          # dry run


# ----------------------------------------------------------------------------- scripts/gpu_check.sh

def _fake(folder, name):
    path = folder / name
    path.write_text(f'#!/bin/sh\necho "{name} ran: $*"\n')
    path.chmod(0o755)
    return path


@pytest.mark.skipif(shutil.which('dirname') is None, reason='needs dirname')
def test_gpu_check_sh_runs_python3_or_python_or_PYTHON(tmp_path):
    """No `python` on the GPU image: python3 first, python where it is the only one, $PYTHON over both."""
    script = os.path.join(ROOT, 'scripts', 'gpu_check.sh')
    both, only_python, none = tmp_path / 'both', tmp_path / 'only', tmp_path / 'none'
    for folder in (both, only_python, none):
        folder.mkdir()
        os.symlink(shutil.which('dirname'), folder / 'dirname')
    _fake(both, 'python3'), _fake(both, 'python'), _fake(only_python, 'python')
    other = _fake(tmp_path, 'other-python')

    def sh(path, **env):
        env = dict({k: v for k, v in os.environ.items() if k != 'PYTHON'}, PATH=str(path), **env)
        return subprocess.run(['/bin/bash', script, '--dry-run'], capture_output=True, text=True, env=env, timeout=60)
    assert sh(both).stdout == 'python3 ran: tools/gpu_check.py --dry-run\n'
    assert sh(only_python).stdout == 'python ran: tools/gpu_check.py --dry-run\n'
    assert sh(both, PYTHON=str(other)).stdout == 'other-python ran: tools/gpu_check.py --dry-run\n'
    missing = sh(none)
    assert missing.returncode == 2 and 'no python3 or python on PATH' in missing.stderr
    with open(script) as f:
        assert not re.search(r'\bpip3?\b|\bconda\b|apt-get|uv ', f.read())          # installs nothing
