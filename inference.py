"""Top-K recommendations of a fine-tuned checkpoint for given histories (recommend.py).

    from inference import format_results, recommend
    print(format_results(recommend('saved/MISSRec-....pth', ['12 40 7'], topk=5)))

The checkpoint's stored config rebuilds the dataset (item numbering, feature
tables) and the model (`checkpoints.model_from_checkpoint`, as finetune.py
--eval_only does); the state dict is loaded strictly, buffers included, so
the interest tables are those saved with the checkpoint. Items are scored with
`full_sort_predict` as evaluation does (PAD column set to -inf). Errors are one-line
`ToolError`s.
"""
import argparse
import os
import sys

import numpy as np
import torch

from checkpoints import CheckpointError, model_from_checkpoint
from config import ConfigError
from data.dataset import DataError, pad_histories, read_item2index, read_texts
from data.loader import to_device
from io_utils import ToolError, run_main

TEXT_WIDTH = 80


# ------------------------------------------------------------------ loading
def load_model(checkpoint, dataset=None, data_path=None, device='cpu'):
    """(config, SeqDataset, model in eval mode with the checkpoint's state dict, buffers included):
    `checkpoints.model_from_checkpoint` with the checkpoint's own config; errors as ToolErrors."""
    try:
        config, data, model, _ = model_from_checkpoint(checkpoint, None, device, dataset, data_path)
    except (CheckpointError, ConfigError, DataError) as e:
        raise ToolError(str(e)) from None
    return config, data, model


def item_info(base, texts=True, text_required=False):
    """({item token: raw id} of `{base}.item2index`, {item token: text} of `{base}.text` (with `texts`)):
    `data.dataset.read_item2index` and `read_texts` by item token; {} for an absent file (a ToolError
    for an absent text file with `text_required`, or for a malformed file)."""
    try:
        item2index = read_item2index(base + '.item2index')
        text_of = read_texts(base + '.text', item2index, text_required) if texts else {}
    except DataError as e:
        raise ToolError(str(e)) from None
    return {str(i): r for r, i in item2index.items()}, {str(i): t for i, t in text_of.items()}


# ----------------------------------------------------------------- scoring
def history_ids(tokens, item_index, raw, token_of_raw, n, dataset, item2index_path):
    """Internal item ids of one history; a clear error for unknown items."""
    if not tokens:
        raise ToolError(f'history {n}: empty; expected space-separated item '
                        + ('raw ids' if raw else 'tokens'))
    ids = []
    for tok in tokens:
        if raw:
            if not token_of_raw:
                raise ToolError(f'--raw needs {item2index_path} (raw_id<TAB>index), which was not found')
            if tok not in token_of_raw:
                raise ToolError(f"history {n}: raw item id '{tok}' is not in {item2index_path}")
            key = token_of_raw[tok]
            if key not in item_index:
                raise ToolError(f"history {n}: raw item id '{tok}' (token {key}) does not occur in the "
                                f".inter files of dataset {dataset}, so the model has no row for it")
        else:
            key = tok
            if key not in item_index:
                hint = ' (use --raw for raw item ids)' if token_of_raw and tok in token_of_raw else ''
                raise ToolError(f"history {n}: item token '{tok}' does not occur in the .inter files of "
                                f'dataset {dataset}; expected item tokens as in those files{hint}')
        ids.append(item_index[key])
    return ids


@torch.no_grad()
def score_histories(model, histories, pad_len=None):
    """[B, N] full-sort scores as evaluation computes them (PAD column 0 = -inf)."""
    device = next(model.parameters()).device
    offsets = np.cumsum([0] + [len(h) for h in histories])
    seq, lengths = pad_histories(np.concatenate(histories), offsets, int(max(np.diff(offsets))))
    batch = to_device({'item_seq': seq, 'item_seq_len': lengths}, device)
    if pad_len is not None:
        batch['pad_len'] = pad_len
    model.eval()
    scores = model.full_sort_predict(batch).float().cpu()
    scores[:, 0] = -float('inf')
    return scores


def recommend(checkpoint, histories, dataset=None, data_path=None, raw=False, topk=10, exclude_history=False,
              device='cpu', warn=None):
    """Per history: {'history': [tokens], 'items': [{'rank', 'token', 'raw_id', 'score', 'text'}]}."""
    if topk < 1:
        raise ToolError(f'--topk {topk}: expected a positive integer')
    if not histories:
        raise ToolError('no --history given; expected at least one, e.g. --history "12 40 7"')
    config, data, model = load_model(checkpoint, dataset, data_path, device)
    base = os.path.join(config['data_path'], config['dataset'], config['dataset'])
    raw_of_token, texts = item_info(base)
    token_of_raw = {r: t for t, r in raw_of_token.items()}
    item_index = {tok: i + 1 for i, tok in enumerate(data.item_tokens)}
    max_len = config['MAX_ITEM_LIST_LENGTH']

    seqs = []
    for n, text in enumerate(histories, start=1):
        ids = history_ids(text.split(), item_index, raw, token_of_raw, n, config['dataset'],
                          base + '.item2index')
        if len(ids) > max_len:
            if warn:
                warn(f'history {n}: {len(ids)} items; kept the most recent {max_len} '
                     f'(MAX_ITEM_LIST_LENGTH)')
            ids = ids[-max_len:]
        seqs.append(ids)
    scores = score_histories(model, seqs, data.pad_len)
    if exclude_history:
        for r, ids in enumerate(seqs):
            scores[r, ids] = -float('inf')

    out = []
    for r, ids in enumerate(seqs):
        k = min(topk, int(torch.isfinite(scores[r]).sum()))
        top = torch.topk(scores[r], k) if k else None
        items = []
        for rank, (s, i) in enumerate(zip(top.values.tolist(), top.indices.tolist()) if top else [], start=1):
            tok = data.item_tokens[i - 1]
            items.append({'rank': rank, 'item_id': i, 'token': tok, 'raw_id': raw_of_token.get(tok),
                          'score': s, 'text': texts.get(tok)})
        out.append({'history': [data.item_tokens[i - 1] for i in ids], 'items': items})
    return out


def _short(text, width=TEXT_WIDTH):
    if not text:
        return ''
    text = ' '.join(text.split())
    return text if len(text) <= width else text[:width - 3] + '...'


def format_results(results):
    lines = []
    for n, res in enumerate(results, start=1):
        hist = res['history']
        lines.append(f"history {n} ({len(hist)} items): {' '.join(hist)}")
        rows = [('rank', 'item', 'raw_id', 'score', 'text')]
        rows += [(str(it['rank']), it['token'], it['raw_id'] or '-', f"{it['score']:.4f}", _short(it['text']))
                 for it in res['items']]
        widths = [max(len(r[c]) for r in rows) for c in range(4)]
        for r in rows:
            lines.append('  ' + '  '.join(r[c].rjust(widths[c]) if c in (0, 3) else r[c].ljust(widths[c])
                                          for c in range(4)) + ('  ' + r[4] if r[4] else ''))
        if not res['items']:
            lines.append('  (no item left to recommend)')
        lines.append('')
    return '\n'.join(lines).rstrip('\n')


# ---------------------------------------------------------------- command line
def build_parser(description=None):
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--checkpoint', required=True, help='fine-tuned checkpoint (.pth)')
    p.add_argument('--data_path', '--data-path', default=None,
                   help="folder holding {dataset}/ (default: the checkpoint's stored data_path)")
    p.add_argument('-d', '--dataset', default=None, help="dataset name (default: the checkpoint's)")
    p.add_argument('--history', action='append', default=[],
                   help='space-separated item tokens, oldest first (repeat for several histories)')
    p.add_argument('--raw', action='store_true', help='histories hold raw item ids of {D}.item2index')
    p.add_argument('--topk', type=int, default=10, help='items to list per history (default 10)')
    p.add_argument('--exclude-history', action='store_true', help="don't recommend items of the history")
    p.add_argument('--device', default='cpu', help='torch device (default cpu)')
    return p


def main(argv=None, description=None):
    """recommend.py: parse the command line, print the tables; returns the exit code (2 after a
    ToolError, printed as one line)."""
    def _run(a):
        args = build_parser(description).parse_args(a)
        results = recommend(args.checkpoint, args.history, dataset=args.dataset, data_path=args.data_path,
                            raw=args.raw, topk=args.topk, exclude_history=args.exclude_history,
                            device=args.device, warn=lambda m: print(f'warning: {m}', file=sys.stderr))
        print(format_results(results))
        return 0
    return run_main(_run, argv)
