"""MISSRec: Pre-training and Transferring Multi-modal Interest-aware Sequence
Representation for Recommendation (Wang et al., ACM MM 2023, arXiv 2308.11175).

The model of SPEC section 3: an encoder over the user's distinct interest tokens
(item-modality clusters), a decoder over the item sequence that cross-attends
to them, and a dynamic fusion of per-modality item scores.

API (RecBole style): `calculate_loss(batch, gather=None) -> loss` for both stages,
`full_sort_predict(batch) -> [B, N]`, `seq_output(...) -> ([B, H], reg)`;
`interest_points()` (fine-tuning) or `pretrain_interest_points(...)`, then
`set_interests(...)`, for interest discovery. The interest tables are buffers of
the model in both stages.

Host and device: everything whose size or positions depend on the data (distinct
interests, buckets, packed positions) is planned on the host, from the batch's host
tensors (`batch['host']` on a GPU, the batch itself on the CPU) and one host copy of
the interest lookup tables per step, and only index tensors are copied to the model's
device. So a training step waits for the GPU about once (bench/host_syncs.py).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from cluster_utils import write_interest_tables
from distributed import max_over_ranks
from model_utils import Packer, SeqTransformer, dropout, query_only_sums, to_device


def unique_interests(ids):
    """Per-row sorted distinct non-zero ids, left-aligned and right-padded with 0.

    Args:
        ids: long [B, X] interest ids (0 = none).
    Returns:
        (long [B, Qv] distinct non-zero ids, long [B] their counts), Qv >= 1.
    """
    s, _ = ids.sort(dim=1)                                             # [B, X]
    first = torch.ones_like(s, dtype=torch.bool)
    first[:, 1:] = s[:, 1:] != s[:, :-1]
    keep = first & (s != 0)
    counts = keep.sum(1)                                               # [B]
    width = max(int(counts.max()), 1) if len(counts) else 1
    slot = keep.cumsum(1) - 1                                          # target column of kept ids
    out = s.new_zeros(s.shape[0], width + 1)
    rows = torch.arange(s.shape[0], device=s.device)[:, None].expand_as(s)
    out[rows[keep], slot[keep]] = s[keep]
    return out[:, :width], counts


def interest_buckets(n_valid):
    """Rows grouped by their number of distinct interests: 1-2, 3-4, 5-8, 9-16, ...

    Rows are independent in the interest encoder, so each group can be padded to its own
    longest row. Yields long [R] row indices of each non-empty group, smallest first."""
    lower, upper, most = 0, 2, int(n_valid.max()) if len(n_valid) else 0
    while lower < most:
        rows = ((n_valid > lower) & (n_valid <= upper)).nonzero().squeeze(1)
        if len(rows):
            yield rows
        lower, upper = upper, upper * 2


class MISSRec(SeqTransformer):
    """MISSRec for stages pretrain, inductive_ft and transductive_ft.

    Args:
        config: `config.Config` (or a dict with the same keys).
        n_items: number of item rows N including PAD row 0.
        plm_table, img_table: float [N, plm_size] / [N, img_size] feature tables
            for fine-tuning (row 0 zeros); None in pre-training.
    """

    def __init__(self, config, n_items, plm_table=None, img_table=None):
        super().__init__(config, n_items)
        self.train_stage = config['train_stage']
        self.temperature = config['temperature']
        self.lam = config['lambda']
        self.gamma = config['gamma']
        self.reg_pad_draws = config['reg_pad_draws']
        self.modal_type = config['modal_type']
        self.id_type = config['id_type']
        self.seq_mm_fusion = config['seq_mm_fusion']
        self.item_mm_fusion = config['item_mm_fusion']
        self.contextual_gather_quirk = config['contextual_gather_quirk']
        self.modalities = [m for m in ('text', 'img') if m in self.modal_type]
        self.use_id = self.train_stage == 'transductive_ft' and self.id_type != 'none'
        if self.train_stage != 'transductive_ft':
            self.item_embedding = None
        if not self.modalities and not self.use_id:
            raise ValueError(f"modal_type none needs train_stage transductive_ft with id_type id "
                             f"(got train_stage {self.train_stage}, id_type {self.id_type})")

        if self.train_stage != 'pretrain':
            tables = {'text': plm_table, 'img': img_table}
            for m in self.modalities:
                if tables[m] is None:
                    raise ValueError(f'modal_type {self.modal_type} needs the {m} feature table')
                emb = nn.Embedding.from_pretrained(torch.as_tensor(tables[m], dtype=torch.float),
                                                   freeze=True, padding_idx=0)
                setattr(self, self._table_name(m), emb)
                self.register_buffer(f'{self._table_name(m)}_empty_mask', ~emb.weight.data.sum(-1).bool())

        # interest tables (SPEC 3.1), written by interest discovery before every epoch; pre-training
        # rebuilds them from its own items, so they are not part of a pre-trained checkpoint
        persistent = self.train_stage != 'pretrain'
        for m in self.modalities:
            self.register_buffer(f'{self._prefix(m)}_interest_lookup_table', torch.zeros(n_items, dtype=torch.long),
                                 persistent=persistent)
        points = len(self.modalities) * (n_items - 1)
        self.num_interest = max(math.ceil(points * config['interest_ratio']), 1)
        self.register_buffer('interest_embeddings', torch.zeros(self.num_interest + 1, self.hidden_size),
                             persistent=persistent)

        if len(self.modalities) == 2 and self.item_mm_fusion != 'static':
            shape = (n_items,) if self.item_mm_fusion == 'dynamic_instance' else ()
            self.fusion_factor = nn.Parameter(torch.zeros(shape))
        if 'text' in self.modalities:
            self.text_adaptor = nn.Linear(config['plm_size'], self.hidden_size)
        if 'img' in self.modalities:
            self.img_adaptor = nn.Linear(config['img_size'], self.hidden_size)

    @staticmethod
    def _table_name(m):
        return 'plm_embedding' if m == 'text' else 'img_embedding'

    @staticmethod
    def _prefix(m):
        return 'plm' if m == 'text' else 'img'

    def adaptor(self, m):
        return self.text_adaptor if m == 'text' else self.img_adaptor

    # ------------------------------------------------------------------ tables
    def adapted_tables(self):
        """{modality: [N, H]} adaptor outputs of the whole feature tables (fine-tuning)."""
        return {m: self.adaptor(m)(getattr(self, self._table_name(m)).weight) for m in self.modalities}

    @torch.no_grad()
    def interest_points(self):
        """[M * (N-1), H] adapted item rows 1..N-1, text rows then image rows (SPEC 3.1)."""
        tables = self.adapted_tables()
        return torch.cat([tables[m][1:] for m in self.modalities], dim=0)

    def interest_tables(self):
        """The buffers interest discovery writes: [interest_embeddings, lookup table of each modality]."""
        return [self.interest_embeddings] + [getattr(self, f'{self._prefix(m)}_interest_lookup_table')
                                             for m in self.modalities]

    @torch.no_grad()
    def set_interests(self, labels, centroids):
        """Write k-means results: centroids to interest_embeddings[1:], labels+1 to the lookups."""
        embeddings, *lookups = self.interest_tables()
        write_interest_tables(labels, centroids, embeddings, lookups)

    def interest_ids(self, item_seq, lookups=None):
        """[B, M*L] interest ids of every item and modality of the sequences.

        `item_seq` is long [B, L], or {modality: long [B, L]} when the modalities follow
        different sequences (pre-training's augmented side, see data/pretrain.py).
        `lookups`: {modality: lookup table} to read instead of the buffers (`host_tables`)."""
        seqs = item_seq if isinstance(item_seq, dict) else dict.fromkeys(self.modalities, item_seq)
        lookups = lookups or {m: getattr(self, f'{self._prefix(m)}_interest_lookup_table') for m in self.modalities}
        return torch.cat([lookups[m][seqs[m]] for m in self.modalities], dim=1)

    def host_tables(self, empty_masks=False):
        """Host copies of the interest lookup tables {modality: long [N]} (and, with `empty_masks`,
        of the modality-missing masks {modality: bool [N]}), made in one copy."""
        tables = [getattr(self, f'{self._prefix(m)}_interest_lookup_table') for m in self.modalities]
        if empty_masks:
            tables += [getattr(self, f'{self._table_name(m)}_empty_mask').long() for m in self.modalities]
        if not tables:
            return {}, {}
        host = torch.stack(tables).to('cpu', copy=True).unbind(0)
        m = len(self.modalities)
        return dict(zip(self.modalities, host[:m])), dict(zip(self.modalities, (t.bool() for t in host[m:])))

    # ------------------------------------------------------------ sequence side
    def seq_output(self, item_seq, item_seq_len, modal_emb, empty_masks, interest_ids, interest_table,
                   pad_len=None, width_max=None):
        """Interest-aware sequence representation (SPEC 3.2).

        Args (item_seq, item_seq_len, empty_masks and interest_ids on the host):
            item_seq: long [B, L] left-aligned item ids, 0 = PAD.
            item_seq_len: long [B].
            modal_emb: {modality: (table float [R, H], index long [B, L])} on the model's device:
                the adapted feature of position (b, l) is table[index[b, l]].
            empty_masks: {modality: bool [B, L]} True where the modality is missing.
            interest_ids: long [B, X] interest ids of the sequence (0 = PAD interest).
            interest_table: float [K+1, H] interest embeddings (row 0 = PAD).
            pad_len: the padded sequence length of the original code (the longest
                history of the dataset); only the regulariser depends on it.
        Returns:
            (s float [B, H] L2-normalised, reg scalar tensor).
        """
        memory, reg = self._encode_interests(item_seq, item_seq_len, interest_ids, interest_table, pad_len,
                                             width_max)
        tokens, packer, key_mask, query_rows, query_packer, n_out = self._decoder_tokens(
            item_seq, item_seq_len, modal_emb, empty_masks)
        out = self.decode(tokens, packer, key_mask, memory, query_rows, query_packer)   # [B*P, H]
        out = out.view(item_seq.shape[0], n_out, -1).mean(1)                            # [B, H]
        return F.normalize(out, dim=1), reg

    def _encode_interests(self, item_seq, item_seq_len, interest_ids, interest_table, pad_len, width_max=None):
        """Encoder over distinct interest tokens; returns (memory, reg).

        The original pads each row's distinct ids to the longest row of the batch
        (Q slots); padded slots (and an explicit 0 id) hold the zero PAD interest and
        are masked as keys. The decoder gets each row's valid slots and one PAD slot.
        Without dropout every PAD slot of a row has the same output, so one is
        computed and the regulariser counts it Q - n times. In training, each PAD
        slot has its own dropout draw (SPEC 3.2 step 4): the other Q - n - 1 are
        computed as query-only tokens (`model_utils.query_only_sums`; with more than
        one encoder layer, as extra slots of the rows), unless `reg_pad_draws: shared`
        (faster, not the original's distribution).
        """
        device = interest_table.device if self.modalities else None
        if not self.modalities:
            return None, self.position_embedding.weight.new_zeros(())
        ids, n_valid = unique_interests(interest_ids)                    # [B, Qv], [B] (host)
        b, qv = ids.shape
        full_len = item_seq.shape[1] if pad_len is None else pad_len
        has_zero = (item_seq_len < full_len).long()                      # a padded item gives id 0
        q_orig = int((n_valid + has_zero).max())                         # the batch's padded width
        if width_max is not None:   # a share of a global batch: the width of the whole batch
            q_orig = width_max(q_orig)
        n_pad = q_orig - n_valid                                         # PAD slots of the original
        draws = self._independent_pad_draws()
        layers = self.trm_model.encoder.layers
        widened = draws and len(layers) > 1                              # every PAD slot in the rows
        pads = n_pad.clamp(min=1) if widened else torch.ones_like(n_valid)
        width = max(qv + 1, int((n_valid + pads).max()))
        ids = torch.cat([ids, ids.new_zeros(b, width - qv)], dim=1)
        key_mask = ids == 0                                              # [B, width]
        slot = torch.arange(width, device=ids.device)
        active = slot[None, :] < (n_valid + pads)[:, None]
        # The encoder's inputs are rows of the interest table, so the first layer's
        # in-projection is computed once per distinct interest of the batch and gathered (exact).
        used, ids_in_used = torch.unique(ids, return_inverse=True)      # [U], [B, width]
        used_rows = interest_table.index_select(0, to_device(used, device))   # [U, H]
        qkv = (F.linear(used_rows, layers[0].self_attn.in_proj_weight, layers[0].self_attn.in_proj_bias)
               if len(layers) else None)                                 # [U, 3H]
        memory = self._encode_in_buckets(used_rows, qkv, ids_in_used, n_valid, active, key_mask)  # [T, H]

        # Regulariser (SPEC 3.2 step 4): pooled = n/Q * (sum of the n valid outputs + the
        # Q - n PAD outputs), from the packed outputs (a row's n valid tokens, then its PADs).
        w = n_valid.float() / q_orig                                     # [B]
        per_row = n_valid + pads
        row = torch.repeat_interleave(torch.arange(b, device=ids.device), per_row)   # [T]
        coef = w[row]
        is_pad = torch.arange(len(row), device=ids.device) - (per_row.cumsum(0) - per_row)[row] >= n_valid[row]
        one_draw = draws and not widened                                 # the other draws: _other_pad_draws
        stands_for = n_pad.clamp(max=1) if one_draw else n_pad          # PAD outputs the computed ones stand for
        coef[is_pad] *= (stands_for.float() / pads.float())[row[is_pad]]
        pooled = memory.new_zeros(b, memory.shape[1]).index_add(
            0, to_device(row, device), memory * to_device(coef, device).unsqueeze(1))
        if one_draw:
            pooled = pooled + to_device(w, device)[:, None] * self._other_pad_draws(
                used, used_rows, qkv, ids_in_used[:, :qv], n_valid, n_pad - 1)
        reg = (pooled * pooled).sum() / pooled.shape[1]

        # the decoder's memory: valid slots and the first PAD slot of each row
        keep = active & (slot[None, :] <= n_valid[:, None])
        if not bool(keep.equal(active)):
            memory = memory.index_select(0, to_device((active.reshape(-1).long().cumsum(0) - 1)[keep.reshape(-1)],
                                                      device))
        return (memory, Packer(keep[:, :qv + 1], device), to_device(key_mask[:, :qv + 1], device)), reg

    def _independent_pad_draws(self):
        """True when the PAD slots' dropout draws must each be computed (SPEC 3.2 step 4)."""
        if not self.training or self.reg_pad_draws == 'shared':
            return False
        layer = self.trm_model.encoder.layers[0] if len(self.trm_model.encoder.layers) else None
        return layer is not None and max(layer.dropout1.p, layer.dropout2.p, layer.dropout.p,
                                         layer.self_attn.dropout) > 0

    def _other_pad_draws(self, used, used_rows, qkv, ids_in_used, n_valid, counts):
        """[B, H] per row, the sum of `counts` more PAD slot outputs of a one-layer encoder,
        each with its own dropout draws; rows grouped by their number of keys, like the encoder."""
        device = used_rows.device
        pad = int(torch.searchsorted(used, used.new_zeros(())))          # the PAD interest among `used`
        out = used_rows.new_zeros(len(n_valid), used_rows.shape[1])
        for rows in interest_buckets(n_valid):
            rows = rows[counts[rows] > 0]
            if len(rows):
                n = int(n_valid[rows].max())
                key_mask = torch.arange(n, device=rows.device)[None, :] >= n_valid[rows, None]
                sums = query_only_sums(self.trm_model.encoder.layers[0], self.trm_model.encoder.norm,
                                       used_rows[pad], qkv, to_device(ids_in_used[rows, :n], device),
                                       to_device(key_mask, device), counts[rows], self.training)
                out = out.index_add(0, to_device(rows, device), sums)
        return out

    def _encode_in_buckets(self, used_rows, qkv, ids_in_used, n_valid, active, key_mask):
        """Encoder outputs [T, H] of the active slots, packed like `Packer(active)`.

        Slot (b, j) holds interest `used_rows[ids_in_used[b, j]]`, whose first-layer in-projection
        is `qkv[ids_in_used[b, j]]`. The groups of `interest_buckets` are encoded one by one,
        each padded to its own longest row: the attention then costs at most 4x the unpadded
        one instead of growing with the longest row of the batch."""
        device = used_rows.device
        position = active.reshape(-1).long().cumsum(0) - 1               # packed index of each slot
        width = active.shape[1]
        outputs, targets = [], []
        for rows in interest_buckets(n_valid):
            q = int(active[rows].sum(1).max())
            sub_active, sub_mask = active[rows, :q], key_mask[rows, :q]
            sub = Packer(sub_active, device)
            idx = to_device(sub.pack(ids_in_used[rows, :q]), device)     # [t] rows of `used`
            # keys and values: a row's valid slots (its first n tokens); its PAD slots are
            # masked keys, so they are queries only
            n_rows = n_valid[rows]
            counts = sub_active.sum(1)
            kv_mask = torch.arange(int(n_rows.max()), device=rows.device)[None, :] >= n_rows[:, None]
            key_index = ((counts.cumsum(0) - counts)[:, None]
                         + torch.arange(kv_mask.shape[1], device=rows.device)[None, :])[~kv_mask]
            outputs.append(self.encode_memory(used_rows.index_select(0, idx), sub, to_device(sub_mask, device),
                                              None if qkv is None else qkv.index_select(0, idx),
                                              keys=(to_device(key_index, device), Packer(~kv_mask, device),
                                                    to_device(kv_mask, device))))
            flat = (rows[:, None] * width + torch.arange(q, device=rows.device)[None, :])[sub_active]
            targets.append(position[flat])
        out = torch.cat(outputs)
        return out.new_empty(out.shape).index_copy(0, to_device(torch.cat(targets), device), out)

    def _decoder_tokens(self, item_seq, item_seq_len, modal_emb, empty_masks):
        """Packed decoder inputs (SPEC 3.2 step 5) and the rows to read out (step 6)."""
        b, l = item_seq.shape
        pad = item_seq == 0                                              # [B, L]
        last = (item_seq_len - 1).clamp(min=0)
        rows = torch.arange(b, device=item_seq.device)
        contextual = self.seq_mm_fusion == 'contextual' and self.modalities
        if not contextual:
            key_mask = pad
            out_pos = last[:, None]                                      # [B, 1]
        else:  # one token per (modality, position), flattened to [B, M*L]
            key_mask = torch.cat([pad | empty_masks[m] for m in self.modalities], dim=1)
            if self.contextual_gather_quirk:   # SPEC 3.2 QUIRK: lands in the text block
                out_pos = last[:, None]
            else:                              # the last item's token of every modality
                out_pos = last[:, None] + l * torch.arange(len(self.modalities), device=last.device)[None]
        active = ~key_mask
        active[rows[:, None].expand_as(out_pos), out_pos] = True
        device = self.position_embedding.weight.device
        packer = Packer(active, device)

        # inputs of the active tokens only: features (+ ID) + position
        flat = packer.host_index                                         # [T] into [B, M*L] or [B, L]
        seq_pos = (flat // active.shape[1]) * l + flat % l               # [T] into [B, L]
        seq_pos_dev = to_device(seq_pos, device)
        # index_select: its backward is a fast index_add (indexing's is a slow accumulate)
        x = self.position_embedding.weight.index_select(0, to_device(seq_pos % l, device))     # [T, H]
        if self.use_id:
            x = x + self.item_embedding.weight.index_select(0, to_device(item_seq.reshape(-1)[seq_pos], device))
        if contextual:
            modality = (flat % active.shape[1]) // l
            for i, m in enumerate(self.modalities):
                table, index = modal_emb[m]
                x = x + table.index_select(0, index.reshape(-1)[seq_pos_dev]) * to_device(modality == i,
                                                                                          device).unsqueeze(1)
        else:
            for m in self.modalities:
                table, index = modal_emb[m]
                x = x + table.index_select(0, index.reshape(-1)[seq_pos_dev])
        tokens = dropout(self.LayerNorm(x), self.dropout.p, self.training)   # [T, H]

        # position of each output token inside the packed tokens
        packed_index = active.reshape(-1).long().cumsum(0) - 1
        query_rows = to_device(packed_index[(rows[:, None] * active.shape[1] + out_pos).reshape(-1)], device)
        query_packer = Packer(torch.ones_like(out_pos, dtype=torch.bool), device)
        return tokens, packer, to_device(key_mask, device), query_rows, query_packer, out_pos.shape[1]

    # --------------------------------------------------------------- item side
    def fused_logits(self, s, item_emb, item_ids=None):
        """Similarity of sequences s [B, H] to items {modality: [I, H]} (SPEC 3.3), before temperature.

        `item_emb` may also hold 'id': [I, H] ID embeddings (transductive_ft). `item_ids`
        [I] selects the per-item fusion factors of dynamic_instance when the candidates
        are not all N items (pre-training's in-batch targets; the original cannot run this)."""
        if len(self.modalities) == 2:
            text = s @ F.normalize(item_emb['text'], dim=1).t()          # [B, I]
            img = s @ F.normalize(item_emb['img'], dim=1).t()            # [B, I]
            if self.item_mm_fusion == 'static':
                fused = (text + img) / 2
            else:
                # sum(x * softmax(x * f)) over the two modalities, written with a
                # sigmoid: softmax([a, b])[0] = sigmoid(a - b); no [B, I, 2] tensor
                factor = self._fusion_factor(item_ids)
                diff = text - img
                fused = img + diff * torch.sigmoid(diff * factor)
            if 'id' in item_emb:
                fused = (s @ F.normalize(item_emb['id'], dim=1).t() + 2 * fused) / 3
            return fused
        emb = sum(item_emb[k] for k in item_emb)                         # one modality (+ id)
        return s @ F.normalize(emb, dim=1).t()

    def fusion_weights(self, text, img, item_ids=None):
        """The modality weights of the item-side fusion (SPEC 3.3) for per-modality scores text, img
        [B, I] (s against the normalised adapted text / image rows): float [B, I, 2], (text, image)
        weights softmax(x * fusion_factor); `fused_logits` is the sum of x times these (static: 1/2 each).
        `item_ids` [I]: the candidates' rows of a dynamic_instance factor when they are not all N items."""
        if len(self.modalities) != 2:
            raise ValueError(f'fusion_weights: modal_type {self.modal_type} has one modality, nothing to fuse')
        x = torch.stack([text, img], dim=-1)                             # [B, I, 2]
        if self.item_mm_fusion == 'static':
            return torch.full_like(x, 0.5)
        return F.softmax(x * self._fusion_factor(item_ids).unsqueeze(-1), dim=-1)

    def _fusion_factor(self, item_ids=None):
        """The dynamic fusion factor: a scalar (dynamic_shared), or per item (dynamic_instance: [N], or
        the rows `item_ids` of candidates that are not all N items)."""
        if item_ids is not None and self.item_mm_fusion == 'dynamic_instance':
            return self.fusion_factor[item_ids]
        return self.fusion_factor

    # ---------------------------------------------------------- fine-tuning API
    def finetune_seq_output(self, item_seq, item_seq_len, tables, pad_len=None, width_max=None):
        """`seq_output` of fine-tuning: item_seq, item_seq_len on the host, tables {m: [N, H]}."""
        device = self.position_embedding.weight.device
        modal_emb = {m: (tables[m], to_device(item_seq, device)) for m in self.modalities}
        contextual = self.seq_mm_fusion == 'contextual'
        lookups, empty_tables = self.host_tables(empty_masks=contextual)
        empty = {m: empty_tables[m][item_seq] for m in empty_tables}
        ids = self.interest_ids(item_seq, lookups) if self.modalities else None
        table = self.interest_embeddings if self.modalities else None
        return self.seq_output(item_seq, item_seq_len, modal_emb, empty, ids, table, pad_len, width_max)

    def forward(self, item_seq, item_seq_len, attention=False, pad_len=None):
        """The fine-tuning sequence representation (SPEC 3.2) written plainly: padded tensors through
        torch's own Transformer layers, as the original computes it. `finetune_seq_output` computes
        the same values and gradients on packed tokens, faster (tests/test_forward.py); this is the
        version to read.

        Args:
            item_seq: long [B, L] left-aligned item ids, 0 = PAD; item_seq_len: long [B].
            attention: also return what the last decoder layer attended to (in eval mode; in
                training the weights carry dropout).
            pad_len: the original's padded length (the dataset's longest history); only the
                regulariser depends on it.
        Returns:
            (s float [B, H] L2-normalised, reg scalar); with `attention` also a dict:
            'interest_seq' long [B, Q]: each row's distinct interest ids, then 0 (PAD slots);
            'attention' float [B, heads, Q]: the last decoder layer's cross-attention weights at
            the output position over those slots (the mean over the output positions of
            contextual fusion without the gather quirk).
        """
        if not self.modalities:
            raise ValueError('forward: modal_type none has no interest tokens (use finetune_seq_output)')
        if pad_len is not None:
            item_seq = F.pad(item_seq, (0, pad_len - item_seq.shape[1]))
        b, l = item_seq.shape
        pad = item_seq == 0

        # 1. encoder over the interest tokens: a row's distinct interests, then PAD slots (masked keys)
        interest_seq, n = unique_interests(self.interest_ids(item_seq))         # [B, Qv], [B]
        q = int((n + pad.any(1)).max())            # the original's width: a padded item adds the PAD interest
        interest_seq = F.pad(interest_seq, (0, q - interest_seq.shape[1]))       # [B, Q]
        src_mask = interest_seq == 0
        memory = self.interest_embeddings[interest_seq]                         # [B, Q, H]
        for layer in self.trm_model.encoder.layers:   # (the encoder's nested-tensor path would zero the PAD slots)
            memory = layer(memory, src_key_padding_mask=src_mask)
        memory = self.trm_model.encoder.norm(memory)
        pooled = memory.sum(1) * (n / q).unsqueeze(1)                           # n/Q times the sum of all Q slots
        reg = (pooled * pooled).sum() / pooled.shape[1]

        # 2. decoder inputs: features (+ ID) + position of every item ('add') or item and modality
        feats = [self.adaptor(m)(getattr(self, self._table_name(m))(item_seq)) for m in self.modalities]
        extra = self.position_embedding.weight[:l] + (self.item_embedding(item_seq) if self.use_id else 0)
        last = (item_seq_len - 1).unsqueeze(1)                                   # [B, 1]
        if self.seq_mm_fusion == 'add':
            x, tgt_mask, out_pos = sum(feats) + extra, pad, last
        else:                                                                    # [B, M*L, H]
            x = torch.cat([f + extra for f in feats], dim=1)
            tgt_mask = torch.cat([pad | getattr(self, f'{self._table_name(m)}_empty_mask')[item_seq]
                                  for m in self.modalities], dim=1)
            blocks = 1 if self.contextual_gather_quirk else len(self.modalities)  # the quirk: the text block
            out_pos = last + l * torch.arange(blocks, device=last.device)
        x = self.dropout(self.LayerNorm(x))

        # 3. decoder: torch's layers, the last one step by step as its post-norm forward, to read the
        # cross-attention weights; the output is the mean over the output positions, normalised
        *layers, final = self.trm_model.decoder.layers
        for layer in layers:
            x = layer(x, memory, tgt_key_padding_mask=tgt_mask, memory_key_padding_mask=src_mask)
        x = final.norm1(x + final.dropout1(final.self_attn(x, x, x, key_padding_mask=tgt_mask,
                                                           need_weights=False)[0]))
        cross, weights = final.multihead_attn(x, memory, memory, key_padding_mask=src_mask, need_weights=True,
                                              average_attn_weights=False)       # weights [B, heads, L', Q]
        x = final.norm2(x + final.dropout2(cross))
        x = final.norm3(x + final.dropout3(final.linear2(final.dropout(final.activation(final.linear1(x))))))
        out = self.trm_model.decoder.norm(x)
        rows = torch.arange(b, device=out.device).unsqueeze(1)
        s = F.normalize(out[rows, out_pos].mean(1), dim=1)
        if not attention:
            return s, reg
        at_output = weights.transpose(1, 2)[rows, out_pos].mean(1)              # [B, heads, Q]
        return s, reg, {'interest_seq': interest_seq, 'attention': at_output}

    def _all_item_logits(self, batch, width_max=None):
        tables = self.adapted_tables()                                   # [N, H] per modality
        host = batch.get('host', batch)
        s, reg = self.finetune_seq_output(host['item_seq'], host['item_seq_len'], tables,
                                          batch.get('pad_len'), width_max)
        item_emb = dict(tables)
        if self.use_id:
            item_emb['id'] = self.item_embedding.weight
        # in place: no second [B, N] tensor (the fused logits are not saved for backward)
        return self.fused_logits(s, item_emb).div_(self.temperature), reg

    def calculate_loss(self, batch, gather=None, parts=False):
        """Training loss of a batch, both stages.

        Fine-tuning (SPEC 4): cross-entropy over all N items (PAD column included, as in the
        original) + gamma * reg. Pre-training (SPEC 3.4): sequence-item cross-entropy over the
        in-batch targets + lambda * sequence-sequence cross-entropy + gamma * (reg + reg').
        Cross-entropies are means over the rows; the regularisers are sums over them.

        Args:
            batch: a batch of data/loader.py (fine-tuning) or data/pretrain.py (pre-training).
            gather: None when the batch stands alone. Otherwise the batch is this process's
                share of a global batch and gather(x) -> (x of all processes, offset of these
                rows) (`distributed.all_gather_with_grad`): the means run over the global batch
                (`batch['global_rows']` rows), pre-training draws its contrastive candidates from
                all of it, and the losses of all processes sum to the loss of the global batch.
            parts: also return the weighted terms, detached, that sum to the loss.
        Returns:
            scalar loss, or (loss, {term: scalar}) with `parts`: 'seq_item', 'lambda*seq_seq' and
            'gamma*reg' in pre-training, 'ce' and 'gamma*reg' in fine-tuning.
        """
        n = len(batch['item_id']) if gather is None else batch['global_rows']
        if self.train_stage == 'pretrain':
            host = batch.get('host', batch)
            lookups, _ = self.host_tables()
            batch = dict(batch, interest_ids=self.interest_ids(host['item_seq'], lookups),
                         interest_ids_aug=self.interest_ids(host['modal_seq_aug'], lookups))
            seq_item, seq_seq, reg = self.pretrain_losses(batch, self.interest_embeddings, gather)
            seq_item, seq_seq = seq_item.sum(), seq_seq.sum()
            loss = (seq_item + self.lam * seq_seq) / n + self.gamma * reg
            terms = {'seq_item': seq_item / n, 'lambda*seq_seq': self.lam * seq_seq / n}
        else:
            logits, reg = self._all_item_logits(batch, self._width_max(gather))
            ce = F.cross_entropy(logits, batch['item_id'], reduction='sum')
            loss = ce / n + self.gamma * reg
            terms = {'ce': ce / n}
        if not parts:
            return loss
        terms['gamma*reg'] = self.gamma * reg
        return loss, {k: v.detach() for k, v in terms.items()}

    @staticmethod
    def _width_max(gather):
        """x -> the largest x over the processes sharing a global batch (None: this batch alone).
        The regulariser's padded width is that of the whole batch, as with one process."""
        return None if gather is None else max_over_ranks

    def full_sort_predict(self, batch):
        """Scores [B, N] of every item (column 0 is the PAD item)."""
        return self._all_item_logits(batch)[0]

    # ---------------------------------------------------------- pre-training API
    def pretrain_losses(self, batch, interest_table, gather=None):
        """Per-row pre-training losses of a batch (SPEC 3.4), built by data/pretrain.py.

        Args:
            batch: dict of `data.pretrain.build_batch` (features of the batch's distinct items),
                with the interest ids `interest_ids` / `interest_ids_aug` [B, M*L] (on the host)
                that `calculate_loss` looks up.
            interest_table: float [K+1, H] interest embeddings (row 0 = PAD).
            gather: x [b, ...] -> (x of the whole global batch [B, ...], offset of these rows);
                None = this batch alone (one process, or `contrastive_negatives: local`).
        Returns:
            (seq_item [b], seq_seq [b] per-row cross-entropies, reg + reg' scalar of these rows).
        """
        width_max = self._width_max(gather)
        gather = gather or (lambda x: (x, 0))
        host = batch.get('host', batch)
        tables = {m: self.adaptor(m)(batch['feat'][m]) for m in self.modalities}          # [R, H]
        s, reg = self.seq_output(host['item_seq'], host['item_seq_len'],
                                 {m: (tables[m], batch['index'][m]) for m in self.modalities},
                                 host['empty'], batch['interest_ids'], interest_table, batch['pad_len'], width_max)
        aug_tables = dict(tables)
        if 'text_aug' in batch['feat']:   # word drop: rows R.. hold the word-dropped text features
            aug_tables['text'] = torch.cat([tables['text'], self.text_adaptor(batch['feat']['text_aug'])])
        s_aug, reg_aug = self.seq_output(host['item_seq_aug'], host['item_seq_len_aug'],
                                         {m: (aug_tables[m], batch['index_aug'][m]) for m in self.modalities},
                                         host['empty_aug'], batch['interest_ids_aug'], interest_table,
                                         batch['pad_len'], width_max)
        # sequence-item: the in-batch target items are the candidates
        items = {m: gather(tables[m].index_select(0, batch['target_index']))[0] for m in self.modalities}
        item_ids, offset = gather(batch['item_id'])                                       # [B]
        labels = torch.arange(len(s), device=s.device) + offset
        logits = self.fused_logits(s, items, item_ids).div_(self.temperature)             # [b, B]
        seq_item = F.cross_entropy(logits, labels, reduction='none')
        # sequence-sequence: each sequence against the augmented copies
        s_aug_all = gather(s_aug)[0]                                                       # [B, H]
        seq_seq = F.cross_entropy((s @ s_aug_all.t()).div_(self.temperature), labels, reduction='none')
        return seq_item, seq_seq, reg + reg_aug

    @torch.no_grad()
    def pretrain_interest_points(self, tables, chunk):
        """[M*(N-1), H] adapted rows 1..N-1 of the pre-training feature tables {m: [N, D]},
        text rows then image rows, projected `chunk` rows at a time (SPEC 3.1)."""
        out = []
        for m in self.modalities:
            rows = tables[m][1:]
            out += [self.adaptor(m)(rows[i:i + chunk]) for i in range(0, len(rows), chunk)]
        return torch.cat(out, dim=0)
