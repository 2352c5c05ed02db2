"""README.md, pretrained/README.md and docs/*.md: every relative link resolves to a file of the repository (and every
#anchor to a heading of its page), so a clone explains itself; the README stays short."""
import glob
import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINK = re.compile(r'!?\[[^\]]*\]\(([^)\s]+)\)')
README_MAX_LINES = 260


def pages():
    return ['README.md', 'pretrained/README.md'] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, 'docs', '*.md')))


def repository_files():
    """Tracked files, and new ones git does not ignore (a clean clone has exactly the tracked ones);
    ignored paths (datasets/, saved/, log/) never count."""
    try:
        out = subprocess.run(['git', 'ls-files', '-co', '--exclude-standard'], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.split('\n')
    except (OSError, subprocess.CalledProcessError):
        pytest.skip('not a git checkout')
    return {p for p in out if p and os.path.exists(os.path.join(ROOT, p))}


def slug(heading):
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r'[`*]', '', heading.strip().lower())
    return re.sub(r'[^\w\- ]', '', text).replace(' ', '-')


def anchors(path):
    with open(os.path.join(ROOT, path)) as f:
        lines = f.read().split('\n')
    return {slug(line.lstrip('#')) for line in lines if re.match(r'#{1,6} ', line)}


def links(path):
    with open(os.path.join(ROOT, path)) as f:
        text = f.read()
    return [m.group(1) for m in LINK.finditer(text)]


@pytest.mark.parametrize('page', pages())
def test_every_relative_link_resolves(page):
    files = repository_files()
    dirs = set()
    for p in files:
        while os.path.dirname(p):
            p = os.path.dirname(p)
            dirs.add(p)
    broken = []
    for target in links(page):
        if re.match(r'[a-z]+:', target):                        # https:, mailto:
            continue
        path, _, anchor = target.partition('#')
        resolved = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
        while resolved.endswith('/'):
            resolved = resolved[:-1]
        if resolved not in files and resolved not in dirs:
            broken.append(f'{target}: no such file in the repository')
        elif anchor and resolved.endswith('.md') and anchor not in anchors(resolved):
            broken.append(f'{target}: no heading #{anchor} in {resolved}')
    assert broken == []


def test_the_readme_is_short():
    with open(os.path.join(ROOT, 'README.md')) as f:
        assert len(f.read().splitlines()) <= README_MAX_LINES
