"""Reading the distributed data format (SPEC 1): `dataset.py` (downstream), `pretrain.py`
(multi-domain pre-training corpus), `loader.py` (batches).

`INTER_HEADER` is the first line of every atomic `.inter` file; it lives here, free of
torch, so that the data tools import it cheaply.
"""
INTER_HEADER = 'user_id:token\titem_id_list:token_seq\titem_id:token'
