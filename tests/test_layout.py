"""The layout of README "Architecture": entry scripts only hand their command line to the library,
and nothing imports an entry script."""
import ast
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRY_SCRIPTS = {'finetune', 'ddp_finetune', 'ddp_pretrain', 'recommend'}


def python_files():
    out = subprocess.run(['git', 'ls-files', '-co', '--exclude-standard', '*.py'], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.split()
    return [p for p in out if os.path.exists(os.path.join(ROOT, p))]


def imported_modules(path):
    """Top-level names of the modules a file imports, except in `except ImportError:` fallbacks
    (bench/pretrain.py times older trees, where the loops lived elsewhere)."""
    tree = ast.parse(open(os.path.join(ROOT, path)).read())
    fallbacks = {id(n) for h in ast.walk(tree) if isinstance(h, ast.ExceptHandler)
                 and getattr(h.type, 'id', None) == 'ImportError' for n in ast.walk(h)}
    names = set()
    for node in ast.walk(tree):
        if id(node) in fallbacks:
            continue
        if isinstance(node, ast.Import):
            names |= {a.name.split('.')[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split('.')[0])
    return names


def test_nothing_imports_an_entry_script():
    importers = {p: imported_modules(p) & ENTRY_SCRIPTS for p in python_files()}
    assert {p: names for p, names in importers.items() if names} == {}


def test_entry_scripts_import_only_their_library_entry():
    for name in ENTRY_SCRIPTS:
        assert imported_modules(f'{name}.py') <= {'sys', 'quick_start', 'inference'}, name


def test_the_library_imports_neither_tools_nor_bench():
    """tools/ and bench/ stand on the library; nothing of the library reaches up into them."""
    library = [p for p in python_files() if p.count('/') == 0 or p.startswith('data/')]
    importers = {p: imported_modules(p) & {'tools', 'bench'} for p in library}
    assert {p: names for p, names in importers.items() if names} == {}
    assert {p: names for p in python_files() if p.startswith('tools/')
            for names in [imported_modules(p) & {'bench'}] if names} == {}


def test_the_entry_scripts_make_openmp_threads_sleep_unless_told_otherwise():
    """OMP_WAIT_POLICY is read once, when torch loads OpenMP: quick_start sets it before importing torch."""
    code = 'import os, quick_start; print(os.environ["OMP_WAIT_POLICY"])'
    env = {k: v for k, v in os.environ.items() if k != 'OMP_WAIT_POLICY'}
    for given, expected in ((None, 'PASSIVE'), ('ACTIVE', 'ACTIVE')):
        run_env = dict(env, **({'OMP_WAIT_POLICY': given} if given else {}))
        out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=run_env, capture_output=True, text=True)
        assert out.stdout.strip() == expected, out.stderr[-500:]
