"""tools/gpu_check.py (scripts/gpu_check.sh): its dry run on the CPU, and how it judges the test suite."""
import os
import subprocess
import sys

from tools import gpu_check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_dry_run_of_the_kernel_and_process_group_steps(tmp_path):
    out = subprocess.run([sys.executable, 'tools/gpu_check.py', '--dry-run', '--no-suite', '--steps', 'kernels,nccl',
                          '--out', str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    table = out.stdout[out.stdout.index('## GPU check verdict'):]
    for line in ('| kernels: k-means original | PASS', '| kernels: k-means lloyd | PASS', '| kernels: DPC-KNN | PASS',
                 '| kernels: FHCKM-size assignment, sampled | PASS', '| kernels: CuPy path ran | SKIPPED',
                 '| timing: FHCKM-size discovery, lloyd | PASS', '| gloo: DDP pre-training, 1 rank | PASS',
                 '| gloo: ddp_finetune epoch, sharded evaluation | PASS', '| suite: all tests | SKIPPED'):
        assert line in table, line
    assert '8 passed, 0 failed, 4 skipped' in table


def test_a_failing_step_is_a_fail_row(tmp_path):
    rows = gpu_check.run_step('no_such_step', {'dry': True, 'data': '', 'out': str(tmp_path)}, 120)
    assert [(r['step'], r['status']) for r in rows] == [('no_such_step', 'FAIL')]
    assert "KeyError: 'step_no_such_step'" in rows[0]['detail']


def test_suite_verdict_on_a_gpu_refuses_skipped_cuda_tests(tmp_path):
    log = tmp_path / 'suite.log'
    log.write_text('....s.\nSKIPPED [2] tests/test_cluster.py:250: needs CUDA and cupy\n'
                   'SKIPPED [3] tests/test_real_data.py:17: ../shared/datasets/downstream/Scientific_mini not found\n'
                   '230 passed, 5 skipped in 80.00s\n')

    class Done:
        returncode = 0
    gpu = gpu_check.suite_rows(Done, str(log), dry=False)
    assert [r['status'] for r in gpu] == ['FAIL'] and 'needs CUDA and cupy' in gpu[0]['detail']
    dry = gpu_check.suite_rows(Done, str(log), dry=True)
    assert [(r['status'], r['detail']) for r in dry] == [('PASS', '230 passed, 5 skipped in 80.00s'),
                                                         ('SKIPPED', '2 skipped without CUDA/CuPy')]
    Done.returncode = 1
    assert gpu_check.suite_rows(Done, str(log), dry=True)[0]['status'] == 'FAIL'
