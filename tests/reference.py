"""Slow, literal re-statements of SPEC behaviour, used as oracles by the tests.

They follow the original code's padded layout step by step (per-row
`unique`, `nn.Transformer` encoder/decoder on padded batches) and are only
meant to be obviously right, not fast.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


def seq_output(model, item_seq, item_seq_len, raw=None, lookup=None, interest_embeddings=None):
    """SPEC 3.2 on padded [B, L] sequences, through nn.Transformer itself.

    raw: {modality: float [B, L, D]} raw features of each position (default: the
    model's fine-tuning tables); lookup: {modality: long [B, L]} interest ids
    (default: the model's lookup tables); interest_embeddings: [K+1, H]."""
    mods = model.modalities
    if raw is None:
        raw = {m: getattr(model, model._table_name(m))(item_seq) for m in mods}
    if lookup is None:
        lookup = {m: getattr(model, f'{model._prefix(m)}_interest_lookup_table')[item_seq] for m in mods}
    if interest_embeddings is None:
        interest_embeddings = model.interest_embeddings
    feats = {m: model.adaptor(m)(raw[m]) for m in mods}
    empty = {m: ~raw[m].sum(-1).bool() for m in mods}
    if model.seq_mm_fusion == 'add':
        item_emb = sum(feats[m] for m in mods)                           # [B, L, H]
    else:
        item_emb = torch.stack([feats[m] for m in mods], dim=1)          # [B, M, L, H]

    lookups = torch.cat([lookup[m] for m in mods], dim=-1)
    uniq = [row.unique() for row in lookups]
    interest_seq = nn.utils.rnn.pad_sequence(uniq, batch_first=True, padding_value=0)
    interest_emb = interest_embeddings[interest_seq]
    src_mask = interest_seq == 0

    pos = model.position_embedding(torch.arange(item_seq.shape[1]))
    dec = item_emb + pos
    if model.use_id:
        ids = model.item_embedding(item_seq)
        dec = dec + (ids if model.seq_mm_fusion == 'add' else ids.unsqueeze(1))
    if model.seq_mm_fusion != 'add':
        dec = dec.reshape(dec.shape[0], -1, dec.shape[-1])
        tgt_mask = torch.logical_or((item_seq == 0).unsqueeze(1),
                                    torch.stack([empty[m] for m in mods], 1)).flatten(1)
    else:
        tgt_mask = item_seq == 0
    dec = model.dropout(model.LayerNorm(dec))

    memory = model.trm_model.encoder(src=interest_emb, src_key_padding_mask=src_mask)
    w = (~src_mask).unsqueeze(-1).float().mean(1, keepdim=True)
    pooled = (memory * w).sum(1)
    reg = (pooled * pooled).sum() / pooled.shape[1]
    out = model.trm_model.decoder(dec, memory, tgt_key_padding_mask=tgt_mask,
                                  memory_key_padding_mask=src_mask)
    last = out[torch.arange(out.shape[0]), item_seq_len - 1]
    return F.normalize(last, dim=1), reg


def scores(model, s):
    """SPEC 3.3: [B, N] logits / temperature, literal."""
    t = {m: model.adaptor(m)(getattr(model, model._table_name(m)).weight) for m in model.modalities}
    if len(t) == 2:
        tl = s @ F.normalize(t['text'], dim=1).t()
        vl = s @ F.normalize(t['img'], dim=1).t()
        x = torch.stack([tl, vl], -1)
        if model.item_mm_fusion == 'static':
            fused = x.mean(-1)
        else:
            fused = (x * F.softmax(x * model.fusion_factor.unsqueeze(-1), -1)).sum(-1)
        if model.use_id:
            fused = (s @ F.normalize(model.item_embedding.weight, dim=1).t() + 2 * fused) / 3
    else:
        emb = sum(t.values()) if t else 0
        if model.use_id:
            emb = emb + model.item_embedding.weight
        fused = s @ F.normalize(emb, dim=1).t()
    return fused / model.temperature


def pretrain_loss(model, tables, seq, lens, seq_aug, lens_aug, text_aug, img_seq_aug, pad_len):
    """Sequence sides of SPEC 3.4 for one process: (s, s', reg + reg'), padded to `pad_len` as the original.

    tables: {'text', 'text_aug', 'img': [N, D]}; the interest tables are the model's;
    text_aug: bool [B, L] positions whose text is the word-dropped feature (word drop) or None;
    img_seq_aug: the sequence the augmented copy takes its image side from."""
    lookup_table = {m: getattr(model, f'{model._prefix(m)}_interest_lookup_table') for m in model.modalities}
    def pad(x):
        return F.pad(x, (0, pad_len - x.shape[1]))
    seq, seq_aug, img_seq_aug = pad(seq), pad(seq_aug), pad(img_seq_aug)
    text_aug = None if text_aug is None else pad(text_aug)
    mods = model.modalities
    raw = {m: tables[m][seq] for m in mods}
    lookup = {m: lookup_table[m][seq] for m in mods}
    s, reg = seq_output(model, seq, lens, raw, lookup, model.interest_embeddings)
    raw_aug, lookup_aug = {}, {}
    for m in mods:
        side = seq_aug if m == 'text' else img_seq_aug
        raw_aug[m] = tables[m][side]
        if m == 'text' and text_aug is not None:
            raw_aug[m] = torch.where(text_aug.unsqueeze(-1), tables['text_aug'][side], raw_aug[m])
        lookup_aug[m] = lookup_table[m][side]
    s_aug, reg_aug = seq_output(model, seq_aug, lens_aug, raw_aug, lookup_aug, model.interest_embeddings)
    return s, s_aug, reg + reg_aug


def fused(model, s, item_vectors):
    """SPEC 3.3 fusion of per-modality logits, literal (two-way softmax)."""
    if len(item_vectors) == 1:
        return s @ F.normalize(next(iter(item_vectors.values())), dim=1).t()
    x = torch.stack([s @ F.normalize(item_vectors[m], dim=1).t() for m in ('text', 'img')], -1)
    if model.item_mm_fusion == 'static':
        return x.mean(-1)
    return (x * F.softmax(x * model.fusion_factor.unsqueeze(-1), -1)).sum(-1)
