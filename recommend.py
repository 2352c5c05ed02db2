"""Top-K recommendations of a fine-tuned MISSRec checkpoint for given histories.

    python recommend.py --checkpoint saved/MISSRec-Nov-28-2026_10-02-38.pth --history "12 40 7"
    python recommend.py --checkpoint saved/MISSRec-....pth --data_path=../shared/datasets/downstream/ \\
        --history "12 40 7" --history "3 5" --topk 5 --exclude-history
    python recommend.py --checkpoint saved/MISSRec-....pth --raw --history "B0001 B0002"

A history is a space-separated list of item tokens (the numbers of the .inter
files, oldest first) or, with --raw, of raw item ids from `{D}.item2index`.
The checkpoint's stored config rebuilds the dataset (item numbering, feature
tables) and the model; the state dict is loaded strictly, buffers included, so
the interest tables are those saved with the checkpoint. Items are scored with
`full_sort_predict` as evaluation does (PAD column set to -inf); with
--exclude-history the history's items are not recommended again. For each
history it prints rank, item token, raw id (from `.item2index`), score and the
item text (from `{D}.text`, truncated).
"""
import sys

from inference import main

if __name__ == '__main__':
    sys.exit(main(description=__doc__))
