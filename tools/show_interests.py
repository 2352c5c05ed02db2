"""Interests you can see: what a MISSRec model discovered, and why it recommends what it does.

    python tools/show_interests.py -d Scientific_mini -p saved/MISSRec-{run}.pth \\
        --data_path=../shared/datasets/downstream/ [--users 17,230] [--top 10] [--out DIR]
    python tools/show_interests.py -d Demo -p saved/MISSRec-DemoPT-10.pth -mode inductive \\
        --data_path=datasets/downstream --kmeans_mode=lloyd          # zero-shot: a pre-training checkpoint

A fine-tuned checkpoint brings its interest tables; with a pre-training checkpoint interests are
discovered once on the dataset's items, as `finetune.py --eval_only -p` does for zero-shot
(`quick_start.checkpoint_model`; the run's flags decide the stage, interest_ratio and kmeans_mode).
The data flags are finetune.py's (-d, --data_path, -mode, --key=value).

Written into --out (default log/interests-{dataset}-{time}/), all at once at the end:
    report.html      self-contained (PNG figures embedded); tables only without matplotlib
    sizes.png, map.png, user-{U}.png   interest sizes, a 2-D map (PCA) of the item rows the
                     interests were discovered from (`interest_points`) with the users' histories,
                     each user's attention over its interest tokens
    summary.csv      interests asked for and used, largest share, k-means objective, collapse flag
    interests.csv    every used interest: size, rows per modality, the items nearest its centre
    items.csv        every item: token, raw id, text, interest of each modality
    map.csv          every item row: modality, interest, 2-D coordinates
    users.csv        per user: held-out (test) item and its rank, the most attended interest
    history.csv, attention.csv, recommendations.csv   per user: the history with interests, the last
                     decoder layer's attention over the interest tokens (per head and mean), the top-K
                     (the scores of recommend.py) with the dynamic fusion's modality weights

Users are those of the test split (`{D}.test.inter`): the history is the test row's, the held-out
item its target. Without --users, --n_users users spread over the test split. Bad input (an unknown
user, a checkpoint of another dataset, no `{D}.text`, ...) stops with one line `error: ...`, exit
code 2, and writes nothing.
"""
import argparse
import base64
import csv
import html
import io
import os
import shutil
import sys
import tempfile
import time

if __package__ in (None, ''):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch
import torch.nn.functional as F

import metrics as M
import quick_start
from checkpoints import CheckpointError, load_checkpoint
from data.dataset import DataError, read_inter
from inference import item_info, load_model, score_histories
from io_utils import ToolError, run_main

DESCRIPTION = __doc__.split('\n\n')[0]
# collapsed: fewer than a quarter of the asked-for interests in use (the original mini-batch k-means
# leaves 1 of 1,585 on Scientific_mini, 10-11 of 60 on the demo data; Lloyd's uses all), or one
# interest holding more than half of the item rows
COLLAPSE_USED = 0.25
COLLAPSE_LARGEST = 0.5
N_LARGEST, N_SAMPLE, N_NEAREST = 5, 5, 5
MAP_POINTS = 20000         # at most this many item rows drawn on the map (all in map.csv)
MODALITY_NAME = {'text': 'text', 'img': 'image'}


# ------------------------------------------------------------------- loading
def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument('-p', '--checkpoint', required=True,
                   help='a fine-tuned checkpoint, or a pre-training one (zero-shot, with -d)')
    p.add_argument('-d', '--dataset', default=None, help="dataset name (default: a fine-tuned checkpoint's)")
    p.add_argument('--data_path', '--data-path', default=None, help='folder holding {dataset}/')
    p.add_argument('--users', default='', help='comma-separated user ids of the test split (default: a sample)')
    p.add_argument('--n_users', type=int, default=3, help='users to sample without --users (default 3)')
    p.add_argument('--top', type=int, default=10, help='recommendations per user (default 10)')
    p.add_argument('--exclude-history', action='store_true', help="don't recommend items of the history")
    p.add_argument('--out', default=None, help='output folder (default log/interests-{dataset}-{time}/)')
    return p


def _parse(argv):
    """(args, finetune.py's remaining flags: -mode, --key=value)."""
    args, rest = build_parser().parse_known_args(argv)
    if args.top < 1 or args.n_users < 1:
        raise ToolError('--top and --n_users take a positive integer')
    return args, rest


def load(args, rest):
    """{'config', 'data', 'model' (eval mode, CPU), 'zero_shot'} of the checkpoint and the data flags."""
    path = args.checkpoint
    try:
        stored = load_checkpoint(path, map_location='cpu').get('config') or {}
    except CheckpointError as e:
        raise ToolError(str(e)) from None
    if stored.get('train_stage') == 'pretrain':
        if not args.dataset:
            raise ToolError(f'{path}: a pre-training checkpoint; name the downstream dataset with -d')
        argv = ['-d', args.dataset, '-p', path, *rest, '--use_gpu=False', '--show_progress=False']
        if args.data_path:
            argv.append(f'--data_path={args.data_path}')
        try:
            config = quick_start.build_config('finetune', *quick_start.parse_args('finetune', argv))
            config, data, model, _, _ = quick_start.checkpoint_model(config, path)
        except quick_start.USER_ERRORS as e:
            raise ToolError(str(e)) from None
        return {'config': config, 'data': data, 'model': model.eval(), 'zero_shot': True}
    unused = [a for a in rest if not a.startswith('--use_gpu') and not a.startswith('--show_progress')]
    if unused:
        print(f'note: {" ".join(unused)} ignored: a fine-tuned checkpoint brings its own config', file=sys.stderr)
    name = stored.get('dataset')
    if args.dataset and name and args.dataset != name:
        raise ToolError(f'{path}: a checkpoint of dataset {name}, not {args.dataset}; pass -d {name} '
                        '(or leave -d out)')
    config, data, model = load_model(path, args.dataset, args.data_path)
    if config['model'] != 'MISSRec':
        raise ToolError(f'{path}: a {config["model"]} checkpoint; its interests are those of a MISSRec one')
    return {'config': config, 'data': data, 'model': model, 'zero_shot': False}


def pick_users(config, users, n):
    """[(user id, row of the test split)]: the --users, or n users spread over the split."""
    base = os.path.join(config['data_path'], config['dataset'], config['dataset'])
    try:
        test = read_inter(base + '.test.inter')
    except DataError as e:
        raise ToolError(str(e)) from None
    row_of = {}
    for r, u in enumerate(test.users.tolist()):
        row_of.setdefault(str(u), r)
    if len(row_of) == 0:
        raise ToolError(f'{base}.test.inter: no rows')
    if not users:
        rows = sorted(set(np.linspace(0, len(test.users) - 1, min(n, len(test.users))).round().astype(int)))
        return [(str(test.users[r]), int(r)) for r in rows]
    out = []
    for u in users:
        if u not in row_of:
            raise ToolError(f"user '{u}' is not in {base}.test.inter (user ids as in its first column, "
                            f'e.g. {", ".join(list(row_of)[:3])})')
        out.append((u, row_of[u]))
    return out


# ----------------------------------------------------------------- interests
def item_interests(model):
    """{modality: long [N]} interest of every item row (0 = PAD row)."""
    return {m: getattr(model, f'{model._prefix(m)}_interest_lookup_table').cpu() for m in model.modalities}


@torch.no_grad()
def analyse_interests(model, config, data, seed=0):
    """What interest discovery produced: sizes, the collapse check, the objective, the largest
    interests and a sample of others with the items nearest their centre."""
    points = model.interest_points().float().cpu()                      # [M*(N-1), H]
    lookups = item_interests(model)
    labels = torch.cat([lookups[m][1:] for m in model.modalities])      # [M*(N-1)] interest ids 1..K
    centres = model.interest_embeddings.float().cpu()
    asked = model.num_interest
    if not bool((labels > 0).all()):
        raise ToolError(f'{int((labels == 0).sum())} item rows have no interest: the model holds no interest '
                        'tables (no interest discovery yet)')
    sizes = torch.bincount(labels, minlength=asked + 1)[1:]             # [K] item rows per interest
    used = int((sizes > 0).sum())
    largest_share = float(sizes.max()) / len(labels)
    collapsed = used < COLLAPSE_USED * asked or largest_share > COLLAPSE_LARGEST
    n_items = data.n_items - 1
    per_modality = {m: torch.bincount(lookups[m][1:], minlength=asked + 1)[1:] for m in model.modalities}

    dist = ((points - centres[labels]) ** 2).sum(1)
    objective = float(dist.mean())
    # the rows of every interest, nearest its centre first: sorted by distance, then (stably) by interest
    by_dist = dist.argsort()
    grouped = by_dist[labels[by_dist].argsort(stable=True)]
    starts = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)])  # k: grouped[starts[k-1]:starts[k]]
    items = torch.arange(len(labels)) % n_items + 1                     # item id of every row

    def nearest(k):
        out = []
        for i in items[grouped[starts[k - 1]:starts[k]]].tolist():
            if i not in out:
                out.append(i)
                if len(out) == N_NEAREST:
                    break
        return out

    order = sizes.argsort(descending=True, stable=True)
    used_ids = [int(k) + 1 for k in order if sizes[k] > 0]
    largest = used_ids[:N_LARGEST]
    rest = used_ids[N_LARGEST:]
    g = np.random.default_rng(seed)
    sample = sorted(g.choice(rest, size=min(N_SAMPLE, len(rest)), replace=False).tolist()) if rest else []
    table = []
    for k in used_ids:
        table.append({'interest': k, 'size': int(sizes[k - 1]), 'share': float(sizes[k - 1]) / len(labels),
                      **{f'{m}_rows': int(per_modality[m][k - 1]) for m in model.modalities},
                      'nearest': nearest(k)})
    message = ''
    if collapsed:
        why = []
        if used < COLLAPSE_USED * asked:
            why.append(f'only {used} of the {asked} interests asked for are used (under {100 * COLLAPSE_USED:.0f}%)')
        else:
            why.append(f'{used} of the {asked} interests asked for are used')
        share = f'the largest holds {100 * largest_share:.1f}% of the {len(labels)} item rows'
        why.append(share + (f' (over {100 * COLLAPSE_LARGEST:.0f}%)' if largest_share > COLLAPSE_LARGEST else ''))
        how = (f'interest discovery ran with kmeans_mode {config["kmeans_mode"]}; '
               if config['interest_clustering'] == 'kmeans' else '')
        message = (f'the items collapsed onto few interests: {", ".join(why)}. {how}--kmeans_mode=lloyd '
                   '(when fine-tuning, or here with a pre-training checkpoint) spreads them')
    return {'asked': asked, 'used': used, 'rows': len(labels), 'sizes': sizes, 'largest_share': largest_share,
            'objective': objective, 'collapsed': collapsed, 'message': message, 'table': table,
            'shown': largest + sample, 'largest': largest, 'sample': sample, 'points': points, 'labels': labels,
            'lookups': lookups, 'centres': centres}


def pca_2d(points, centres):
    """2-D coordinates of the points and the centres on the points' first two principal axes (SVD)."""
    mean = points.mean(0)
    x = points - mean
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    axes = vh[:2]
    sign = torch.sign(axes.gather(1, axes.abs().argmax(1, keepdim=True)))   # a fixed orientation
    axes = axes * sign
    explained = (s[:2] ** 2 / (s ** 2).sum()).tolist() if len(s) else [0.0, 0.0]
    return x @ axes.t(), (centres - mean) @ axes.t(), explained


# --------------------------------------------------------------------- users
@torch.no_grad()
def analyse_users(model, data, users, top, exclude_history):
    """Per user: history, interest tokens and attention, top-K with scores (as recommend.py) and fusion
    weights, the held-out item and its rank."""
    test = data.splits['test']
    rows = torch.tensor([r for _, r in users])
    seq, lens, targets = test['item_seq'][rows], test['item_seq_len'][rows], test['item_id'][rows]
    width = int(lens.max())
    seq = seq[:, :width]
    histories = [seq[i, :lens[i]].numpy() for i in range(len(users))]
    scores = score_histories(model, histories, data.pad_len)            # [U, N], recommend.py's scores
    if exclude_history:
        for i, h in enumerate(histories):
            scores[i, torch.from_numpy(h)] = -float('inf')
    ranks = M.ranks(scores, targets)
    s, _, info = model(seq, lens, attention=True)
    interest_seq, attention = info['interest_seq'], info['attention']   # [U, Q], [U, heads, Q]
    fusion = None
    if len(model.modalities) == 2:
        tables = model.adapted_tables()
        x = [s @ F.normalize(tables[m], dim=1).t() for m in ('text', 'img')]
        fusion = (x[0], x[1], model.fusion_weights(x[0], x[1]))          # [U, N] x2, [U, N, 2]
    out = []
    for i, (user, _) in enumerate(users):
        k = min(top, int(torch.isfinite(scores[i]).sum()))
        best = torch.topk(scores[i], k)
        valid = interest_seq[i] != 0
        slots = interest_seq[i][valid].tolist()
        weights = attention[i][:, valid]                                 # [heads, n]
        mean = weights.mean(0)
        recs = []
        for rank, (score, item) in enumerate(zip(best.values.tolist(), best.indices.tolist()), start=1):
            rec = {'rank': rank, 'item': item, 'score': score}
            if fusion is not None:
                rec.update(text_score=float(fusion[0][i, item]), img_score=float(fusion[1][i, item]),
                           text_weight=float(fusion[2][i, item, 0]), img_weight=float(fusion[2][i, item, 1]))
            recs.append(rec)
        target = int(targets[i])
        held = {'item': target, 'rank': int(ranks[i]), 'score': float(scores[i, target])}
        if fusion is not None:
            held.update(text_weight=float(fusion[2][i, target, 0]), img_weight=float(fusion[2][i, target, 1]))
        out.append({'user': user, 'history': histories[i].tolist(), 'slots': slots, 'attention': weights,
                    'mean': mean, 'top_slot': int(mean.argmax()), 'recs': recs, 'held_out': held,
                    'n_items': data.n_items - 1})
    return out


# ------------------------------------------------------------------- figures
def pyplot():
    """matplotlib.pyplot with the Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _png(plt, fig):
    buf = io.BytesIO()
    fig.savefig(buf, format='png', dpi=110, bbox_inches='tight')
    plt.close(fig)
    return buf.getvalue()


def figures(plt, interests, xy, centres_xy, explained, users, model):
    """{file name: PNG bytes}."""
    out = {}
    sizes = interests['sizes'][interests['sizes'] > 0].numpy()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    top = int(sizes.max())
    edges = (np.arange(1, top + 2) - 0.5 if top <= 30 else
             np.unique(np.round(np.logspace(0, np.log10(top + 1), 30))) - 0.5)
    ax.hist(sizes, bins=edges, color='C0', edgecolor='white')
    ax.set_xscale('log')
    ax.set_yscale('log')
    from matplotlib.ticker import NullFormatter, ScalarFormatter
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(ScalarFormatter())
        axis.set_minor_formatter(NullFormatter())
    ax.set_xlabel('item rows in the interest (log scale)')
    ax.set_ylabel('interests (log scale)')
    ax.set_title(f"{interests['used']} of {interests['asked']} interests used; the largest holds {top} of "
                 f"{interests['rows']} item rows", fontsize=10)
    out['sizes.png'] = _png(plt, fig)

    labels = interests['labels'].numpy()
    n = len(labels)
    shown = np.arange(n) if n <= MAP_POINTS else np.sort(
        np.random.default_rng(0).choice(n, MAP_POINTS, replace=False))
    fig, ax = plt.subplots(figsize=(8, 7))
    ax.scatter(xy[shown, 0], xy[shown, 1], c=labels[shown] % 20, cmap='tab20', vmin=0, vmax=19, s=22, alpha=0.9,
               linewidths=0)
    for k in interests['largest']:   # the largest interests' centres
        ax.scatter(*centres_xy[k].tolist(), marker='x', s=40, color='black', linewidths=1)
        ax.annotate(str(k), centres_xy[k].tolist(), fontsize=8, weight='bold', xytext=(3, 3),
                    textcoords='offset points')
    n_items = n // len(model.modalities)
    for j, u in enumerate(users):
        path = np.array([xy[i - 1].tolist() for i in u['history']])     # the first modality's rows
        color = f'C{j % 10}'
        ax.plot(path[:, 0], path[:, 1], '-', color=color, linewidth=1.4, alpha=0.8, label=f"user {u['user']}")
        ax.scatter(path[:, 0], path[:, 1], s=14, color=color, edgecolors='black', linewidths=0.3, zorder=3)
        ax.scatter(path[-1:, 0], path[-1:, 1], s=60, facecolors='none', edgecolors=color)
        t = xy[u['held_out']['item'] - 1]
        ax.scatter([t[0]], [t[1]], marker='*', s=180, color=color, edgecolors='black', linewidths=0.6)
    first = MODALITY_NAME[model.modalities[0]]
    ax.set_title(f'item rows ({n_items} items x {len(model.modalities)} modalities), coloured by interest;\n'
                 f'histories on the {first} rows (o = last item, * = held-out item), x = centres of the largest',
                 fontsize=10)
    ax.set_xlabel(f'PC 1 ({100 * explained[0]:.0f}% of the variance)')
    ax.set_ylabel(f'PC 2 ({100 * explained[1]:.0f}%)')
    if users:
        ax.legend(fontsize=8, loc='best')
    out['map.png'] = _png(plt, fig)

    for u in users:
        heads, q = u['attention'].shape
        fig, ax = plt.subplots(figsize=(min(14.0, 2.5 + 0.45 * q), 3.2))
        x = np.arange(q)
        ax.bar(x, u['mean'].numpy(), 0.7, color='0.75', label='mean over the heads')
        for h in range(heads):
            ax.scatter(x, u['attention'][h].numpy(), s=16, color=f'C{h % 10}', label=f'head {h}', zorder=3)
        ax.set_xticks(x)
        ax.set_xticklabels([str(k) for k in u['slots']], fontsize=8, rotation=90 if q > 25 else 0)
        ax.set_xlabel('interest token')
        ax.set_ylabel('attention')
        ax.set_title(f"user {u['user']}: the last decoder layer's attention at the output position", fontsize=10)
        ax.legend(fontsize=7, ncol=min(heads + 1, 5))
        out[f"user-{safe(u['user'])}.png"] = _png(plt, fig)
    return out


def safe(name):
    return ''.join(c if c.isalnum() or c in '-_' else '_' for c in str(name))


# ---------------------------------------------------------------------- tables
def csv_text(header, rows):
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator='\n')
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def tables(interests, xy, users, model, data, raw_of_token, texts):
    """{file name: CSV text}."""
    mods = model.modalities
    tok = data.item_tokens
    lookups = interests['lookups']

    def text(i):
        return texts.get(tok[i - 1], '')

    out = {}
    out['summary.csv'] = csv_text(['key', 'value'], [
        ('interests_asked', interests['asked']), ('interests_used', interests['used']),
        ('item_rows', interests['rows']), ('largest_share', f"{interests['largest_share']:.6f}"),
        ('kmeans_objective', f"{interests['objective']:.6f}"), ('collapsed', int(interests['collapsed']))])
    out['interests.csv'] = csv_text(
        ['interest', 'size', 'share', *[f'{m}_rows' for m in mods], 'nearest_items', 'nearest_texts'],
        [(t['interest'], t['size'], f"{t['share']:.6f}", *[t[f'{m}_rows'] for m in mods],
          ' '.join(tok[i - 1] for i in t['nearest']), ' | '.join(text(i) for i in t['nearest']))
         for t in interests['table']])
    out['items.csv'] = csv_text(
        ['item_id', 'token', 'raw_id', *[f'interest_{m}' for m in mods], 'text'],
        [(i, tok[i - 1], raw_of_token.get(tok[i - 1], ''), *[int(lookups[m][i]) for m in mods], text(i))
         for i in range(1, data.n_items)])
    n_items = data.n_items - 1
    labels = interests['labels'].tolist()
    out['map.csv'] = csv_text(
        ['item_id', 'token', 'modality', 'interest', 'x', 'y'],
        [(p % n_items + 1, tok[p % n_items], mods[p // n_items], labels[p], f'{xy[p, 0]:.6f}', f'{xy[p, 1]:.6f}')
         for p in range(len(labels))])
    out['users.csv'] = csv_text(
        ['user', 'history_length', 'held_out_item', 'held_out_token', 'held_out_rank', 'interest_tokens',
         'top_interest', 'top_interest_attention'],
        [(u['user'], len(u['history']), u['held_out']['item'], tok[u['held_out']['item'] - 1],
          u['held_out']['rank'], len(u['slots']), u['slots'][u['top_slot']], f"{float(u['mean'][u['top_slot']]):.6f}")
         for u in users])
    out['history.csv'] = csv_text(
        ['user', 'position', 'item_id', 'token', *[f'interest_{m}' for m in mods], 'text'],
        [(u['user'], p, i, tok[i - 1], *[int(lookups[m][i]) for m in mods], text(i))
         for u in users for p, i in enumerate(u['history'], start=1)])
    heads = users[0]['attention'].shape[0] if users else 0
    out['attention.csv'] = csv_text(
        ['user', 'slot', 'interest', *[f'head_{h}' for h in range(heads)], 'mean'],
        [(u['user'], j, k, *[f"{float(u['attention'][h, j]):.6f}" for h in range(heads)],
          f"{float(u['mean'][j]):.6f}") for u in users for j, k in enumerate(u['slots'])])
    fusion = len(mods) == 2
    out['recommendations.csv'] = csv_text(
        ['user', 'rank', 'item_id', 'token', 'raw_id', 'score', *[f'interest_{m}' for m in mods],
         *(['text_score', 'img_score', 'text_weight', 'img_weight'] if fusion else []),
         'in_history', 'held_out', 'text'],
        [(u['user'], r['rank'], r['item'], tok[r['item'] - 1], raw_of_token.get(tok[r['item'] - 1], ''),
          f"{r['score']:.6f}", *[int(lookups[m][r['item']]) for m in mods],
          *([f"{r[k]:.6f}" for k in ('text_score', 'img_score', 'text_weight', 'img_weight')] if fusion else []),
          int(r['item'] in u['history']), int(r['item'] == u['held_out']['item']), text(r['item']))
         for u in users for r in u['recs']])
    return out


# ------------------------------------------------------------------------ html
STYLE = """body{font-family:sans-serif;max-width:1100px;margin:1em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1em;font-size:13px}td,th{border:1px solid #ccc;padding:2px 6px;
text-align:left;vertical-align:top}th{background:#f0f0f0}td.n{text-align:right}.warn{background:#fff3cd;
border:1px solid #e0b000;padding:.6em 1em;margin:1em 0}.note{color:#666}tr.top td{background:#e8f4ff}
tr.held td{background:#e6ffe6}img{max-width:100%}h2{border-bottom:1px solid #ddd}"""


def esc(x):
    return html.escape(str(x))


def html_table(header, rows, classes=None, numeric=()):
    out = ['<table><tr>' + ''.join(f'<th>{esc(h)}</th>' for h in header) + '</tr>']
    for n, row in enumerate(rows):
        cls = f' class="{classes[n]}"' if classes and classes[n] else ''
        out.append(f'<tr{cls}>' + ''.join(f'<td class="n">{esc(v)}</td>' if c in numeric else f'<td>{esc(v)}</td>'
                                          for c, v in enumerate(row)) + '</tr>')
    return '\n'.join(out) + '</table>'


def html_report(meta, interests, explained, users, model, data, raw_of_token, texts, pngs, no_plot_line):
    mods = model.modalities
    tok = data.item_tokens
    lookups = interests['lookups']

    def text(i, width=90):
        t = ' '.join(texts.get(tok[i - 1], '').split())
        return t if len(t) <= width else t[:width - 3] + '...'

    def img(name, alt):
        if name not in pngs:
            return ''
        return f'<p><img alt="{esc(alt)}" src="data:image/png;base64,{base64.b64encode(pngs[name]).decode()}"></p>'

    def item_interests(i):
        return ' / '.join(str(int(lookups[m][i])) for m in mods)

    mod_label = ' / '.join(MODALITY_NAME[m] for m in mods)
    parts = [f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>Interests: {esc(meta["dataset"])}</title>'
             f'<style>{STYLE}</style></head><body>',
             f'<h1>Interests of {esc(os.path.basename(meta["checkpoint"]))} on {esc(meta["dataset"])}</h1>']
    if interests['collapsed']:
        parts.append(f'<div class="warn"><b>Warning:</b> {esc(interests["message"])}.</div>')
    if no_plot_line:
        parts.append(f'<p class="note">{esc(no_plot_line)}</p>')
    parts.append(html_table(['', ''], [
        ('checkpoint', meta['checkpoint']), ('kind', meta['kind']), ('dataset', f"{meta['dataset']} "
         f"({data.n_items - 1} items, {meta['data_path']})"), ('model', meta['model']), ('written', meta['time'])]))

    parts.append('<h2>Interests</h2>')
    parts.append(f"<p>{interests['used']} of {interests['asked']} interests asked for are used by the "
                 f"{interests['rows']} item rows ({data.n_items - 1} items x {len(mods)} modalities: {mod_label}); "
                 f"the largest holds {100 * interests['largest_share']:.1f}% of them. k-means objective (mean squared "
                 f"distance of an item row to its interest's centre, on the model's current item rows"
                 f"{'' if meta['zero_shot'] else ', which fine-tuning moved after the discovery'}): "
                 f"{interests['objective']:.4f}.</p>")
    parts.append(img('sizes.png', 'interest sizes'))
    by_id = {t['interest']: t for t in interests['table']}
    rows, classes = [], []
    for k in interests['shown']:
        t = by_id[k]
        near = '; '.join(f'{tok[i - 1]}: {text(i, 60)}' for i in t['nearest'])
        rows.append((k, 'largest' if k in interests['largest'] else 'sample', t['size'], f"{100 * t['share']:.1f}%",
                     *[t[f'{m}_rows'] for m in mods], near))
        classes.append('')
    parts.append('<p>The largest interests and a sample of the others, with the items nearest their centre '
                 '(all of them in interests.csv):</p>')
    parts.append(html_table(['interest', '', 'item rows', 'share', *[f'{MODALITY_NAME[m]} rows' for m in mods],
                             'items nearest the centre'], rows, numeric=(0, 2, 3)))

    parts.append('<h2>Map of the item rows</h2>')
    parts.append(f'<p>The item representations the interests were discovered from (the adapted features of every '
                 f'item and modality), projected on their first two principal axes ({100 * sum(explained):.0f}% of '
                 'the variance), coloured by interest; the sample users\' histories drawn as paths on the '
                 f'{MODALITY_NAME[mods[0]]} rows, the held-out item as a star. Coordinates in map.csv.</p>')
    parts.append(img('map.png', 'map'))

    for u in users:
        h = u['held_out']
        parts.append(f"<h2>User {esc(u['user'])}</h2>")
        k_top = u['slots'][u['top_slot']]
        parts.append(f"<p>{len(u['history'])} items in the history; {len(u['slots'])} interest tokens seen by the "
                     f"encoder. Most attention: interest <b>{k_top}</b> ({100 * float(u['mean'][u['top_slot']]):.1f}% "
                     f"on average over the heads). Held-out next item: <b>{esc(tok[h['item'] - 1])}</b> "
                     f"({esc(text(h['item'], 70))}), interest {item_interests(h['item'])}, "
                     f"rank <b>{h['rank']}</b> of {u['n_items']}.</p>")
        parts.append(f'<h3>History (oldest first; interest of each {mod_label} row)</h3>')
        parts.append(html_table(['#', 'item', f'interest ({mod_label})', 'text'],
                                [(p, tok[i - 1], item_interests(i), text(i))
                                 for p, i in enumerate(u['history'], start=1)],
                                classes=['top' if k_top in [int(lookups[m][i]) for m in mods] else ''
                                         for i in u['history']], numeric=(0,)))
        heads = u['attention'].shape[0]
        counts = {k: sum(k in [int(lookups[m][i]) for m in mods] for i in u['history']) for k in u['slots']}
        parts.append('<h3>Interest tokens and the decoder\'s attention over them</h3>')
        parts.append(html_table(['interest', 'history items in it', 'mean', *[f'head {h}' for h in range(heads)]],
                                [(k, counts[k], f"{float(u['mean'][j]):.3f}",
                                  *[f"{float(u['attention'][h, j]):.3f}" for h in range(heads)])
                                 for j, k in enumerate(u['slots'])],
                                classes=['top' if j == u['top_slot'] else '' for j in range(len(u['slots']))],
                                numeric=tuple(range(1, heads + 3))))
        parts.append(img(f"user-{safe(u['user'])}.png", 'attention'))
        fusion = len(mods) == 2
        parts.append(f"<h3>Top {len(u['recs'])} recommendations</h3>")
        if fusion:
            parts.append('<p class="note">text / image weight: the item-side fusion\'s modality weights of this '
                         f"item's score ({model.item_mm_fusion}).</p>")
        rows = [(r['rank'], tok[r['item'] - 1], f"{r['score']:.4f}", item_interests(r['item']),
                 *([f"{r['text_weight']:.3f} / {r['img_weight']:.3f}"] if fusion else []),
                 ('held-out ' if r['item'] == h['item'] else '') + ('in history' if r['item'] in u['history'] else ''),
                 text(r['item'])) for r in u['recs']]
        classes = ['held' if r['item'] == h['item'] else '' for r in u['recs']]
        if h['rank'] > len(u['recs']):
            rows.append((h['rank'], tok[h['item'] - 1], f"{h['score']:.4f}", item_interests(h['item']),
                         *([f"{h['text_weight']:.3f} / {h['img_weight']:.3f}"] if fusion else []), 'held-out',
                         text(h['item'])))
            classes.append('held')
        parts.append(html_table(['rank', 'item', 'score', f'interest ({mod_label})',
                                 *(['text / image weight'] if fusion else []), '', 'text'], rows, classes,
                                numeric=(0, 2)))

    parts.append('<h2>Files</h2><p>' + ', '.join(esc(n) for n in meta['files']) + '</p></body></html>')
    return '\n'.join(parts)


# ------------------------------------------------------------------------ main
def report(argv=None):
    """Build the report; returns {'out', 'interests', 'users', 'files'}."""
    args, rest = _parse(argv)
    users_arg = [u.strip() for u in args.users.split(',') if u.strip()]
    loaded = load(args, rest)
    config, data, model = loaded['config'], loaded['data'], loaded['model']
    if not model.modalities:
        raise ToolError(f'{args.checkpoint}: modal_type none (IDs only) has no interests to show')
    raw_of_token, texts = item_info(os.path.join(config['data_path'], config['dataset'], config['dataset']),
                                    text_required=True)   # the report shows item texts
    users = pick_users(config, users_arg, args.n_users)
    out = args.out or os.path.join('log', f"interests-{config['dataset']}-{time.strftime('%b-%d-%Y_%H-%M-%S')}")
    if os.path.exists(out):
        raise ToolError(f'{out}: already exists; choose another --out')

    interests = analyse_interests(model, config, data)
    xy, centres_xy, explained = pca_2d(interests['points'], interests['centres'])
    user_rows = analyse_users(model, data, users, args.top, args.exclude_history)
    plt = pyplot()
    no_plot_line = '' if plt else ('matplotlib is not installed: no figures, tables only '
                                   '(pip install matplotlib, see requirements-tools.txt)')
    pngs = figures(plt, interests, xy.numpy(), centres_xy.numpy(), explained, user_rows, model) if plt else {}
    csvs = tables(interests, xy.numpy(), user_rows, model, data, raw_of_token, texts)
    meta = {'checkpoint': args.checkpoint, 'dataset': config['dataset'], 'data_path': config['data_path'],
            'zero_shot': loaded['zero_shot'], 'time': time.strftime('%Y-%m-%d %H:%M:%S'),
            'kind': (f"pre-training checkpoint, zero-shot ({config['train_stage']}); interests discovered on "
                     f"the dataset's items (kmeans_mode {config['kmeans_mode']})") if loaded['zero_shot']
            else f"fine-tuned ({config['train_stage']}, kmeans_mode {config['kmeans_mode']})",
            'model': (f"modal_type {config['modal_type']}, seq_mm_fusion {config['seq_mm_fusion']}, item_mm_fusion "
                      f"{config['item_mm_fusion']}, hidden {config['hidden_size']}, interest_ratio "
                      f"{config['interest_ratio']}"),
            'files': ['report.html', *pngs, *csvs]}
    page = html_report(meta, interests, explained, user_rows, model, data, raw_of_token, texts, pngs, no_plot_line)

    # everything is computed: write into a temporary folder beside --out, then rename it
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f'.{os.path.basename(os.path.abspath(out))}.', dir=parent)
    try:
        for name, data_bytes in pngs.items():
            with open(os.path.join(tmp, name), 'wb') as f:
                f.write(data_bytes)
        for name, text in [*csvs.items(), ('report.html', page)]:
            with open(os.path.join(tmp, name), 'w', encoding='utf-8', newline='') as f:
                f.write(text)
        os.chmod(tmp, 0o755)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if no_plot_line:
        print(no_plot_line, file=sys.stderr)
    if interests['collapsed']:
        print(f"warning: {interests['message']}", file=sys.stderr)
    print(f"report: {os.path.join(out, 'report.html')} ({len(user_rows)} users; {interests['used']} of "
          f"{interests['asked']} interests used)")
    return {'out': out, 'interests': interests, 'users': user_rows, 'files': meta['files']}


def main(argv=None):
    return run_main(lambda a: report(a) and 0, argv)


if __name__ == '__main__':
    sys.exit(main())
