"""Show what a MISSRec checkpoint holds: epoch, the config keys that matter, parameter counts.

    python tools/inspect_checkpoint.py saved/MISSRec-FHCKM_mm_full-100.pth
    python tools/inspect_checkpoint.py saved/MISSRec-Nov-28-2026_10-02-38.pth --keys

Works on this project's checkpoints (trainer.py, ddp_pretrain.py) and on the
original code's (their pickled RecBole Config is read by checkpoints.py without
recbole and without running pickled code). `--keys` lists every state-dict key
with its shape and dtype.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from checkpoints import CheckpointError, load_checkpoint
from io_utils import ToolError, run_main

CONFIG_KEYS = ('dataset', 'model', 'train_stage', 'modal_type', 'id_type', 'seq_mm_fusion', 'item_mm_fusion',
               'hidden_size', 'n_layers', 'n_heads', 'inner_size', 'hidden_act', 'plm_size', 'img_size',
               'temperature', 'interest_ratio', 'interest_clustering', 'kmeans_mode', 'lambda', 'gamma',
               'learning_rate', 'train_batch_size', 'epochs', 'pretrain_epochs', 'MAX_ITEM_LIST_LENGTH',
               'pretrained_file', 'freeze_trm', 'data_path', 'ckpt_suffix', 'seed')
BUFFER_SUFFIXES = ('_empty_mask', '_interest_lookup_table', 'interest_embeddings')
FEATURE_TABLES = ('plm_embedding.weight', 'img_embedding.weight')


def _strip(key: str) -> str:
    return key[len('module.'):] if key.startswith('module.') else key


def classify(key: str) -> str:
    """'buffer', 'feature table' (frozen copies of the feature files) or 'weight'."""
    k = _strip(key)
    if k.endswith(BUFFER_SUFFIXES):
        return 'buffer'
    if k in FEATURE_TABLES:
        return 'feature table'
    return 'weight'


def describe(ckpt: dict, show_keys: bool = False) -> List[str]:
    lines = []
    cfg = ckpt.get('config') or {}
    origin = 'original code (RecBole Config)' if 'MODEL_TYPE' in cfg or 'eval_args' in cfg else 'this project'
    lines.append(f'written by: {origin}')
    for key in ('epoch', 'cur_step', 'best_valid_score'):
        if key in ckpt:
            value = ckpt[key]
            lines.append(f'{key}: {float(value):.6f}' if key == 'best_valid_score' and value is not None
                         else f'{key}: {value}')
    other = [k for k in ckpt if k not in ('config', 'state_dict', 'epoch', 'cur_step', 'best_valid_score')]
    for key in [k for k in other if isinstance(ckpt[k], (int, float, str)) or ckpt[k] is None]:
        lines.append(f'{key}: {ckpt[key]}')                            # e.g. best_valid_epoch, best_model_file
        other.remove(key)
    if other:
        lines.append(f"other entries: {', '.join(map(str, other))}")
    if cfg:
        lines.append('config:')
        shown = [k for k in CONFIG_KEYS if k in cfg]
        width = max(map(len, shown), default=0)
        lines += [f'  {k:<{width}} = {cfg[k]}' for k in shown]
        lines.append(f'  ({len(cfg)} config keys in all)')
    else:
        lines.append('config: none stored')

    state = ckpt.get('state_dict')
    if state is None and ckpt and all(torch.is_tensor(v) for v in ckpt.values()):
        state = ckpt                                                   # a bare state dict
    if not isinstance(state, dict):
        lines.append('state_dict: none stored')
        return lines
    tensors = {k: v for k, v in state.items() if torch.is_tensor(v)}
    counts = {'weight': 0, 'feature table': 0, 'buffer': 0}
    for k, v in tensors.items():
        counts[classify(k)] += v.numel()
    total = sum(counts.values())
    lines.append(f'parameters: {total:,} values in {len(tensors)} tensors '
                 f"(model weights {counts['weight']:,}; frozen feature tables {counts['feature table']:,}; "
                 f"buffers {counts['buffer']:,})")
    plain = {_strip(k): v for k, v in tensors.items()}
    for name in ('item_embedding.weight', 'plm_embedding.weight', 'img_embedding.weight',
                 'plm_interest_lookup_table', 'img_interest_lookup_table'):
        if name in plain:
            lines.append(f'item rows (incl. PAD): {plain[name].shape[0]} (from {name})')
            break
    if 'interest_embeddings' in plain:
        lines.append(f"interests: {plain['interest_embeddings'].shape[0] - 1}")
    opt = ckpt.get('optimizer')
    if isinstance(opt, dict) and isinstance(opt.get('param_groups'), list):
        lrs = sorted({g.get('lr') for g in opt['param_groups'] if isinstance(g, dict)}, key=str)
        lines.append(f"optimizer: {len(opt['param_groups'])} param group(s), lr {', '.join(map(str, lrs))}")
    if show_keys:
        lines.append('state_dict keys:')
        width = max(map(len, tensors), default=0)
        for k, v in state.items():
            if torch.is_tensor(v):
                lines.append(f"  {k:<{width}}  {str(list(v.shape)):<14} {str(v.dtype).replace('torch.', '')}"
                             f"  {classify(k) if classify(k) != 'weight' else ''}".rstrip())
            else:
                lines.append(f'  {k:<{width}}  ({type(v).__name__})')
    return lines


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('path', help='checkpoint (.pth)')
    p.add_argument('--keys', action='store_true', help='list every state-dict key with its shape')
    return p


def main(argv: Optional[List[str]] = None) -> int:
    def _run(a):
        args = build_parser().parse_args(a)
        try:
            ckpt = load_checkpoint(args.path)
        except CheckpointError as e:
            raise ToolError(str(e)) from None
        print(f'checkpoint: {args.path}')
        print('\n'.join(describe(ckpt, args.keys)))
        return 0
    return run_main(_run, argv)


if __name__ == '__main__':
    sys.exit(main())
