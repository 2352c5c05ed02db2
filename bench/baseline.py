"""The code of another commit, for before/after measurements made in one run (`--baseline REV`)."""
import os
import subprocess


def extract_revision(root, rev, dest):
    """Write `git archive REV` of the repository at `root` into the new folder `dest`; returns `dest`."""
    os.makedirs(dest)
    archive = subprocess.run(['git', '-C', str(root), 'archive', rev], check=True, capture_output=True).stdout
    subprocess.run(['tar', '-x', '-C', dest], input=archive, check=True)
    return dest
