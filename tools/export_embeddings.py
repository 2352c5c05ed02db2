"""Export the item and sequence vectors of a fine-tuned MISSRec checkpoint, to serve them with an
approximate-nearest-neighbour index (faiss, ScaNN, ...).

    python tools/export_embeddings.py --checkpoint saved/MISSRec-{run}.pth --out emb/ --split test
    python tools/export_embeddings.py --checkpoint CKPT --out emb/ --history "12 40 7" --history "5 9"
    python tools/export_embeddings.py --checkpoint CKPT --out emb/ --items new.feat1CLS new.feat3CLS

What is written to --out (float32 .npy; row r of an item file = internal item id r, row 0 = PAD):

    items_fused.npy        [N, H] v_i such that the model's score of item i for sequence s is s . v_i
                           (full_sort_predict divides it by `temperature`, which keeps the ranking)
    items_{text,img,id}.npy  [N, H] the per-modality vectors that scoring uses (L2-normalised)
    item_ids.tsv           row, item token (as in the .inter files), raw id ({D}.item2index)
    fusion.json            modalities, item_mm_fusion, fusion_factor, temperature, and `exact`
    seq_{split}.npy, seq_{split}.tsv   [R, H] sequence vectors s of every row of a split (--split;
                           the tsv: row, target item token)
    seq_history.npy, seq_history.tsv   ... of the --history histories
    new_items_fused.npy, new_items_{text,img}.npy, new_item_ids.tsv   items of --items FEATURE_FILES

Exact and approximate:
  * Sequence vectors and per-modality item vectors are exactly what the model computes.
  * items_fused is exact (top-K by dot product = full_sort_predict's ranking) for one modality
    (with or without IDs: v = normalize(adapted feature + ID embedding)), and for two modalities with
    item_mm_fusion static (v = (t + i)/2, with IDs (d + t + i)/3).
  * dynamic_shared / dynamic_instance: the score is not a dot product: with per-modality scores
    a = s . t_i and b = s . i_i it is b + (a - b) * sigmoid((a - b) * f) (f = fusion_factor, per item
    for dynamic_instance; with IDs (s . d_i + 2 * that) / 3). items_fused then holds the static mean
    (t + i)/2 (with IDs (d + t + i)/3), which is exact only where f = 0 (its initial value) and an
    approximation otherwise: retrieve candidates with it, then rescore them exactly from the
    per-modality files and fusion.json (fusion.json says `"exact": false`).
  * New items (--items, inductive setting): their per-modality vectors are exact (the adaptor of their
    features); their fused vector has no ID term (they have no ID embedding), so for a transductive
    checkpoint (with IDs) it is what an inductive use of the model scores, not a training item's formula.

--items takes raw little-endian float32 feature files as the datasets hold them (`{name}.feat1CLS` text,
`{name}.feat3CLS` image: the checkpoint's plm_suffix / img_suffix decide), one row per new item, the same
rows in each file; every modality of the checkpoint needs one file.
"""
import argparse
import json
import os
import sys

if __package__ in (None, ''):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch
import torch.nn.functional as F

from data.loader import SeqBatches
from inference import history_ids, item_info, load_model
from io_utils import ToolError, atomic_open, run_main

DESCRIPTION = __doc__.split('\n\n')[0]


# ------------------------------------------------------------------- vectors
@torch.no_grad()
def item_vectors(model, tables=None):
    """({name: [R, H]} per-modality (and 'id') vectors, fused [R, H], exact) for the adapted tables
    `tables` ({modality: [R, H]}; default: the model's own N items, with their ID embeddings)."""
    own = tables is None
    if own:
        tables = model.adapted_tables()
    emb = dict(tables)
    if own and model.use_id:
        emb['id'] = model.item_embedding.weight
    per = {k: F.normalize(v, dim=1) for k, v in emb.items()}
    if len(model.modalities) == 2:
        mean = (per['text'] + per['img']) / 2
        fused = (per['id'] + 2 * mean) / 3 if 'id' in per else mean
        exact = model.item_mm_fusion == 'static' or not bool(model.fusion_factor.detach().any())
    else:
        fused = F.normalize(sum(emb.values()), dim=1)
        exact = True
    return per, fused, exact


@torch.no_grad()
def sequence_vectors(model, split, batch_size=1024, pad_len=None):
    """[R, H] the model's sequence vectors s of a split's rows (or of {'item_seq', 'item_seq_len'})."""
    model.eval()
    tables = model.adapted_tables()
    out = []
    for batch in SeqBatches(split, batch_size, pad_len=pad_len):
        s, _ = model(batch['item_seq'], batch['item_seq_len'], pad_len, tables)
        out.append(s)
    return torch.cat(out) if out else torch.zeros(0, model.hidden_size)


def read_feature_file(path, dim):
    size = os.path.getsize(path)
    if size % (4 * dim):
        raise ToolError(f'{path}: {size} bytes is not a whole number of float32 rows of width {dim}')
    rows = np.fromfile(path, dtype='<f4').reshape(-1, dim)
    if not np.isfinite(rows).all():
        raise ToolError(f'{path}: NaN or infinite values')
    return torch.from_numpy(rows.copy())


def new_item_tables(model, config, files):
    """{modality: adapted [R, H]} of the --items feature files."""
    by_suffix = {config['plm_suffix']: ('text', config['plm_size']), config['img_suffix']: ('img', config['img_size'])}
    tables, rows = {}, None
    for path in files:
        suffix = path.rsplit('.', 1)[-1]
        if suffix not in by_suffix:
            raise ToolError(f'{path}: expected a .{config["plm_suffix"]} (text) or .{config["img_suffix"]} '
                            '(image) feature file')
        m, dim = by_suffix[suffix]
        if m not in model.modalities:
            raise ToolError(f'{path}: the checkpoint uses modal_type {config["modal_type"]}, not {m}')
        if not os.path.isfile(path):
            raise ToolError(f'{path}: feature file not found')
        feats = read_feature_file(path, dim)
        if rows is not None and len(feats) != rows:
            raise ToolError(f'{path}: {len(feats)} rows; the other --items file has {rows}')
        rows = len(feats)
        with torch.no_grad():
            tables[m] = model.adaptor(m)(feats.to(next(model.parameters()).device))
    missing = [m for m in model.modalities if m not in tables]
    if missing:
        raise ToolError(f'--items: no feature file for modality {", ".join(missing)} of the checkpoint '
                        f'(modal_type {config["modal_type"]})')
    return tables


# -------------------------------------------------------------------- output
def _save(out, name, tensor):
    with atomic_open(os.path.join(out, name), 'wb') as f:
        np.save(f, tensor.detach().float().cpu().numpy())


def _save_text(out, name, lines):
    with atomic_open(os.path.join(out, name), 'w') as f:
        f.write('\n'.join(lines) + '\n')


def export(checkpoint, out, dataset=None, data_path=None, split=None, histories=(), items=(), device='cpu'):
    """Write the vectors (module docstring); returns {file name: shape}."""
    config, data, model = load_model(checkpoint, dataset, data_path, device)
    if config['model'] != 'MISSRec':
        raise ToolError(f'{checkpoint}: a {config["model"]} checkpoint; expected a MISSRec one')
    if not model.modalities and not model.use_id:
        raise ToolError(f'{checkpoint}: nothing to export')
    os.makedirs(out, exist_ok=True)
    written = {}

    def save(name, tensor):
        _save(out, name, tensor)
        written[name] = tuple(tensor.shape)

    per, fused, exact = item_vectors(model)
    save('items_fused.npy', fused)
    for k, v in per.items():
        save(f'items_{k}.npy', v)
    base = os.path.join(config['data_path'], config['dataset'], config['dataset'])
    raw_of_token, _ = item_info(base, texts=False)
    _save_text(out, 'item_ids.tsv', ['row\ttoken\traw_id', '0\t[PAD]\t']
               + [f'{i}\t{t}\t{raw_of_token.get(t, "")}' for i, t in enumerate(data.item_tokens, start=1)])
    factor = getattr(model, 'fusion_factor', None)
    meta = {'checkpoint': os.fspath(checkpoint), 'dataset': config['dataset'], 'modalities': model.modalities,
            'with_ids': model.use_id, 'item_mm_fusion': config['item_mm_fusion'] if len(model.modalities) == 2 else None,
            'fusion_factor': None if factor is None else factor.detach().cpu().tolist(),
            'temperature': config['temperature'], 'exact': exact,
            'score': 'full_sort_predict = (s . items_fused) / temperature' if exact else
                     'approximate: see tools/export_embeddings.py --help'}
    with atomic_open(os.path.join(out, 'fusion.json'), 'w') as f:
        json.dump(meta, f, indent=1)

    if split:
        if split not in data.splits:
            raise ToolError(f'--split {split}: expected train, valid or test')
        save(f'seq_{split}.npy', sequence_vectors(model, data.splits[split], config['eval_batch_size'], data.pad_len))
        targets = data.splits[split]['item_id'].tolist()
        _save_text(out, f'seq_{split}.tsv', ['row\ttarget_token']
                   + [f'{r}\t{data.item_tokens[t - 1]}' for r, t in enumerate(targets)])
    if histories:
        item_index = {tok: i + 1 for i, tok in enumerate(data.item_tokens)}
        max_len = config['MAX_ITEM_LIST_LENGTH']
        seqs = [history_ids(h.split(), item_index, False, {}, n, config['dataset'], base + '.item2index')[-max_len:]
                for n, h in enumerate(histories, start=1)]
        seq = torch.zeros(len(seqs), max(map(len, seqs)), dtype=torch.long)
        for r, ids in enumerate(seqs):
            seq[r, :len(ids)] = torch.tensor(ids)
        split_like = {'item_seq': seq, 'item_seq_len': torch.tensor([len(s) for s in seqs]),
                      'item_id': torch.zeros(len(seqs), dtype=torch.long)}
        save('seq_history.npy', sequence_vectors(model, split_like, config['eval_batch_size'], data.pad_len))
        _save_text(out, 'seq_history.tsv', ['row\thistory'] + [f'{r}\t{h}' for r, h in enumerate(histories)])
    if items:
        if not model.modalities:
            raise ToolError('--items: the checkpoint has no feature modality (modal_type none)')
        tables = new_item_tables(model, config, items)
        new_per, new_fused, _ = item_vectors(model, tables)
        save('new_items_fused.npy', new_fused)
        for k, v in new_per.items():
            save(f'new_items_{k}.npy', v)
        _save_text(out, 'new_item_ids.tsv', ['row'] + [str(r) for r in range(len(new_fused))])
    return written


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--checkpoint', required=True, help='fine-tuned MISSRec checkpoint (ours or the original code\'s)')
    p.add_argument('--out', required=True, help='folder to write the files to')
    p.add_argument('-d', '--dataset', default=None, help="dataset name (default: the checkpoint's)")
    p.add_argument('--data_path', '--data-path', default=None, help="folder holding {dataset}/ (default: the "
                   "checkpoint's)")
    p.add_argument('--split', choices=['train', 'valid', 'test'], default=None,
                   help='also export the sequence vectors of every row of this split')
    p.add_argument('--history', action='append', default=[], help='also export the sequence vector of this history '
                   '(space-separated item tokens, oldest first; repeat for several)')
    p.add_argument('--items', nargs='+', default=[], metavar='FEATURE_FILE',
                   help='new items: one feature file per modality (.feat1CLS text, .feat3CLS image), one row each')
    p.add_argument('--device', default='cpu')
    return p


def main(argv=None):
    def _run(a):
        args = build_parser().parse_args(a)
        written = export(args.checkpoint, args.out, args.dataset, args.data_path, args.split, args.history,
                         args.items, args.device)
        for name, shape in written.items():
            print(f'{os.path.join(args.out, name)}  {list(shape)}')
        meta = json.load(open(os.path.join(args.out, 'fusion.json')))
        print('items_fused: ' + ('exact (score = s . v / temperature)' if meta['exact'] else
                                 f"an approximation ({meta['item_mm_fusion']} fusion: rescore with the "
                                 'per-modality files and fusion.json)'))
        return 0
    return run_main(_run, argv)


if __name__ == '__main__':
    sys.exit(main())
