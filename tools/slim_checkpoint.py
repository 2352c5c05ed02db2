"""A pre-training checkpoint as weights only, to ship or to fine-tune from (`finetune.py -p`).

    python tools/slim_checkpoint.py saved/MISSRec-BTG_text-10-orig4.pth pretrained/MISSRec-BTG_text-10-orig4.pth
    python tools/slim_checkpoint.py IN OUT --half        # float16 weights: half the size again

Keeps `config`, `epoch` and the state dict; drops the optimiser's moments and the random
states, which only resuming needs (a third of the size is left). `--half` stores the
floating-point weights as float16; `-p` loads them into the float32 model as they are.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from checkpoints import CheckpointError, atomic_save, load_checkpoint, state_dict_of
from io_utils import ToolError, run_main


def slim(ckpt: dict, path: str, half: bool = False) -> dict:
    """The weights-only checkpoint of `ckpt` (read from `path`)."""
    state = state_dict_of(ckpt, path)
    if half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    return {'config': ckpt.get('config'), 'epoch': ckpt.get('epoch'), 'state_dict': state,
            'slimmed_from': os.path.basename(path), 'half': half}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('src')
    parser.add_argument('dst')
    parser.add_argument('--half', action='store_true', help='store floating-point weights as float16')
    args = parser.parse_args(argv)
    if os.path.abspath(args.src) == os.path.abspath(args.dst):
        raise ToolError(f'{args.dst}: the output would replace its input')
    try:
        out = slim(load_checkpoint(args.src), args.src, args.half)
        atomic_save(out, args.dst)
    except CheckpointError as e:
        raise ToolError(str(e)) from None
    print(f'{args.dst}: {os.path.getsize(args.dst) / 2 ** 20:.1f} MB (from {os.path.getsize(args.src) / 2 ** 20:.1f} MB)')
    return 0


if __name__ == '__main__':
    sys.exit(run_main(main))
