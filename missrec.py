"""MISSRec: Pre-training and Transferring Multi-modal Interest-aware Sequence
Representation for Recommendation (Wang et al., ACM MM 2023, arXiv 2308.11175).

The model of SPEC section 3, read top to bottom: interest discovery writes the interest tables
(`set_interests`); the sequence side (`forward`, `seq_output`) encodes a user's distinct interest
tokens and decodes the item sequence against them; the item side (`fused_logits`) scores items by
a dynamic fusion of per-modality similarities; the losses follow (`calculate_loss`).

The sequence side is written plainly here, on padded tensors with torch's Transformer layers.
`forward_path: packed` (the default) computes the same values and gradients faster in packed.py.

API (RecBole style): `forward(item_seq, item_seq_len) -> (s [B, H], reg)`,
`calculate_loss(batch, gather=None) -> loss` for both stages, `full_sort_predict(batch) -> [B, N]`;
`interest_points()` (fine-tuning) or `pretrain_interest_points(...)`, then `set_interests(...)`,
for interest discovery. The interest tables are buffers of the model in both stages.

Host and device: the batch's index tensors stay on the host (`batch['host']` on a GPU, the batch
itself on the CPU), where shapes and positions are planned; packed.py says how that keeps a GPU
step to about one wait.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import packed
from cluster_utils import write_interest_tables
from distributed import max_over_ranks
from model_utils import SeqTransformer, to_device, unique_interests


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
        self.forward_path = config['forward_path']
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

    def freeze_transformer(self):
        """`freeze_trm` of fine-tuning from a pre-trained checkpoint: the position embedding and the
        Transformer keep their pre-trained weights; the adaptors (and ID embeddings) train."""
        for p in [*self.position_embedding.parameters(), *self.trm_model.parameters()]:
            p.requires_grad = False

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
    def forward(self, item_seq, item_seq_len, pad_len=None, tables=None, width_max=None, attention=False):
        """The fine-tuning sequence representation (SPEC 3.2) of a batch of histories.

        Args:
            item_seq: long [B, L] left-aligned item ids, 0 = PAD; item_seq_len: long [B]; on the host
                (device tensors are copied there: the shapes are planned from them).
            pad_len: the original's padded length (the dataset's longest history); only the
                regulariser depends on it.
            tables: {modality: [N, H]} `adapted_tables()`, when the caller has them already.
            width_max, attention: see `seq_output`.
        Returns:
            (s float [B, H] L2-normalised, reg scalar), and with `attention` the dict of `seq_output`.
        """
        item_seq, item_seq_len = item_seq.cpu(), item_seq_len.cpu()
        device = self.position_embedding.weight.device
        tables = self.adapted_tables() if tables is None else tables
        modal_emb = {m: (tables[m], to_device(item_seq, device)) for m in self.modalities}
        lookups, empty_tables = self.host_tables(empty_masks=self.seq_mm_fusion == 'contextual')
        empty = {m: empty_tables[m][item_seq] for m in empty_tables}
        ids = self.interest_ids(item_seq, lookups) if self.modalities else None
        return self.seq_output(item_seq, item_seq_len, modal_emb, empty, ids, self.interest_embeddings, pad_len,
                               width_max, attention)

    def seq_output(self, item_seq, item_seq_len, modal_emb, empty_masks, interest_ids, interest_table,
                   pad_len=None, width_max=None, attention=False):
        """Interest-aware sequence representation (SPEC 3.2), both stages.

        Written plainly below (`forward_path: plain`): an encoder over each row's distinct interest
        tokens, a decoder over the items that cross-attends to them, the last item's output. The
        default `forward_path: packed` computes the same values and gradients on packed tokens,
        faster (packed.py; tests/test_forward.py binds the two).

        Args (item_seq, item_seq_len, empty_masks and interest_ids on the host):
            item_seq: long [B, L] left-aligned item ids, 0 = PAD.
            item_seq_len: long [B].
            modal_emb: {modality: (table float [R, H], index long [B, L])} on the model's device:
                the adapted feature of position (b, l) is table[index[b, l]].
            empty_masks: {modality: bool [B, L]} True where the modality is missing (contextual).
            interest_ids: long [B, X] interest ids of the sequence (0 = PAD interest).
            interest_table: float [K+1, H] interest embeddings (row 0 = PAD).
            pad_len: the padded sequence length of the original code (the longest history of the
                dataset); only the regulariser depends on it.
            width_max: x -> the largest x over the processes that share a global batch (None: this
                batch alone); the regulariser's padded width is that of the whole batch.
            attention: also return what the last decoder layer attended to (plain path; in training
                the weights carry dropout).
        Returns:
            (s float [B, H] L2-normalised, reg scalar tensor); with `attention` also a dict:
            'interest_seq' long [B, Q]: each row's distinct interest ids, then 0 (PAD slots);
            'attention' float [B, heads, Q]: the last decoder layer's cross-attention weights at the
            output position over those slots (the mean over the output positions of contextual
            fusion without the gather quirk).
        """
        if self.forward_path == 'packed' and not attention:
            return packed.seq_output(self, item_seq, item_seq_len, modal_emb, empty_masks, interest_ids,
                                     interest_table, pad_len, width_max)
        if attention and not self.modalities:
            raise ValueError('attention: modal_type none has no interest tokens')
        has_pad = item_seq_len < (item_seq.shape[1] if pad_len is None else pad_len)
        memory, src_mask, interest_seq, reg = self.encode_interests(interest_ids, has_pad, interest_table, width_max)
        x, tgt_mask, out_pos = self.decoder_inputs(item_seq, item_seq_len, modal_emb, empty_masks)
        out, weights = self.decode(x, tgt_mask, memory, src_mask, need_weights=attention)
        rows = torch.arange(len(out), device=out.device).unsqueeze(1)
        s = F.normalize(out[rows, out_pos].mean(1), dim=1)                     # step 6
        if not attention:
            return s, reg
        at_output = weights.transpose(1, 2)[rows, out_pos].mean(1)              # [B, heads, Q]
        return s, reg, {'interest_seq': interest_seq, 'attention': at_output}

    def encode_interests(self, interest_ids, has_pad, interest_table, width_max=None):
        """The encoder over the interest tokens and the regulariser (SPEC 3.2 steps 1-4).

        A row's tokens are its distinct interests (sorted), then PAD slots up to the batch's width Q,
        which counts as the original does: a row's distinct interests, plus the PAD interest when it
        has a padded item (`has_pad`, bool [B]). PAD slots hold the zero PAD interest and are masked
        as keys, but their outputs enter the regulariser, each with its own dropout draw.

        Returns:
            (memory float [B, Q, H], src_mask bool [B, Q] True at PAD slots, interest_seq long [B, Q],
            reg scalar); (None, None, None, 0) without modalities (no interest tokens).
        """
        device = self.position_embedding.weight.device
        if not self.modalities:
            return None, None, None, self.position_embedding.weight.new_zeros(())
        interest_seq, n = unique_interests(interest_ids)                        # [B, Qv], [B]
        q = int((n + has_pad.long()).max())
        if width_max is not None:            # a share of a global batch: the width of the whole batch
            q = width_max(q)
        interest_seq = to_device(F.pad(interest_seq, (0, q - interest_seq.shape[1])), device)
        src_mask = interest_seq == 0
        x = interest_table[interest_seq]                                        # [B, Q, H]
        for layer in self.trm_model.encoder.layers:                             # post-norm layers
            x = layer.norm1(x + layer.dropout1(layer.self_attn(x, x, x, key_padding_mask=src_mask,
                                                               need_weights=False)[0]))
            x = layer.norm2(x + layer.dropout2(self._feed_forward(layer, x)))
        memory = self.trm_model.encoder.norm(x)
        # regulariser: the mean over a row's Q slots times its share n/Q of valid ones, squared
        pooled = memory.sum(1) * to_device(n.float() / q, device).unsqueeze(1)  # [B, H]
        reg = (pooled * pooled).sum() / pooled.shape[1]
        return memory, src_mask, interest_seq, reg

    def decoder_inputs(self, item_seq, item_seq_len, modal_emb, empty_masks):
        """The decoder's tokens (SPEC 3.2 step 5) and the positions read out (step 6).

        A token is an item's adapted features (+ its ID embedding, transductive_ft) + its position:
        the features summed over the modalities (`seq_mm_fusion: add`), or one token per modality and
        item (`contextual`), masked where that modality is missing. The output is the last item's
        token, or with contextual fusion its token of every modality; the original reads only the
        text one (`contextual_gather_quirk`, SPEC 3.2 QUIRK).

        Returns:
            (x float [B, L', H], tgt_mask bool [B, L'] True where not a key, out_pos long [B, P]).
        """
        device = self.position_embedding.weight.device
        l = item_seq.shape[1]
        seq = to_device(item_seq, device)
        pad = seq == 0
        feats = [table[to_device(index, device)] for table, index in (modal_emb[m] for m in self.modalities)]
        extra = self.position_embedding.weight[:l] + (self.item_embedding(seq) if self.use_id else 0)
        last = to_device(item_seq_len - 1, device).clamp(min=0).unsqueeze(1)   # [B, 1]
        if self.seq_mm_fusion == 'add' or not self.modalities:
            x, tgt_mask, out_pos = sum(feats) + extra, pad, last
        else:
            x = torch.cat([f + extra for f in feats], dim=1)                     # [B, M*L, H]
            tgt_mask = torch.cat([pad | to_device(empty_masks[m], device) for m in self.modalities], dim=1)
            blocks = 1 if self.contextual_gather_quirk else len(self.modalities)
            out_pos = last + l * torch.arange(blocks, device=device)
        return self.dropout(self.LayerNorm(x)), tgt_mask, out_pos

    def decode(self, x, tgt_mask, memory, src_mask, need_weights=False):
        """The decoder stack, post-norm layers as torch's nn.TransformerDecoderLayer computes them, written
        out to read the last layer's cross-attention weights (`need_weights`: [B, heads, L', Q]).
        Without interest tokens (memory None) the cross-attention's context is 0. Returns (out
        [B, L', H], weights or None)."""
        weights = None
        for layer in self.trm_model.decoder.layers:
            x = layer.norm1(x + layer.dropout1(layer.self_attn(x, x, x, key_padding_mask=tgt_mask,
                                                               need_weights=False)[0]))
            if memory is None:
                cross = layer.multihead_attn.out_proj.bias
            else:
                cross, weights = layer.multihead_attn(x, memory, memory, key_padding_mask=src_mask,
                                                      need_weights=need_weights, average_attn_weights=False)
            x = layer.norm2(x + layer.dropout2(cross))
            x = layer.norm3(x + layer.dropout3(self._feed_forward(layer, x)))
        return self.trm_model.decoder.norm(x), weights

    @staticmethod
    def _feed_forward(layer, x):
        return layer.linear2(layer.dropout(layer.activation(layer.linear1(x))))

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
    def _all_item_logits(self, batch, width_max=None):
        tables = self.adapted_tables()                                   # [N, H] per modality
        host = batch.get('host', batch)
        s, reg = self(host['item_seq'], host['item_seq_len'], batch.get('pad_len'), tables, width_max)
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
