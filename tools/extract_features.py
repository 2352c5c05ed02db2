"""Extract item text/image features of a processed dataset (.feat1CLS/.feat2CLS/.feat3CLS).

Examples:
    python tools/extract_features.py --data datasets/downstream/Scientific --images images/Scientific \
        --model openai/clip-vit-base-patch32 --batch-size 64
    python tools/extract_features.py --data datasets/downstream/Beauty --encoder sentence \
        --model sentence-transformers/all-MiniLM-L6-v2        # text only: feat1CLS, feat2CLS (384-d)

Reads ``{name}.item2index`` (row r of every output = item index r) and ``{name}.text``
(``item_id:token\\ttext:token_seq``, keyed by the raw item id or by the item index)
in ``--data`` (``--name`` defaults to the folder's name) and writes:

* ``{name}.feat1CLS``: text features of each item's text: ``--encoder clip`` (default)
  CLIP's ``get_text_features``; ``--encoder sentence`` a sentence encoder
  (all-MiniLM-L6-v2 by default): last hidden states mean-pooled over the tokens with
  the attention mask, then L2-normalised, as sentence-transformers computes them;
* ``{name}.feat2CLS``: the same after dropping each word with probability
  ``--word-drop`` (0.2, i.e. each word kept with probability 0.8; seeded per item by
  ``--seed``, at least one word kept): the text augmentation pre-training needs;
* ``{name}.feat3CLS`` (CLIP only): image features (``get_image_features``) of each item's image:
  ``{images}/{index}.jpg`` (or .jpeg/.png), else the file named like the url's last
  path part in ``--image-cache`` (urls from ``{name}.image_urls``; nothing is downloaded).

``--suffix MiniLM`` names the files ``.feat1MiniLM`` etc. instead (fine-tune on them
with ``--plm_suffix=feat1MiniLM``). Each file: raw little-endian float32, the
encoder's width in columns (CLIP ``projection_dim``, sentence encoder ``hidden_size``),
no header. An item without text or without a readable image gets a zero row
(= modality missing) and is counted in the summary. Rows are written in order to
``{file}.partial`` with a ``{file}.partial.json`` progress sidecar; a rerun with the
same settings continues after the last complete batch, and the file gets its final
name only when complete.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, List, Optional, Sequence

if __package__ in (None, ""):  # run as a script: make `tools` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
from tqdm import tqdm

from data.dataset import DataError, read_item2index, read_texts
from io_utils import ToolError, atomic_write_text, run_main

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".JPG", ".webp")


class FormatError(ToolError):
    def __init__(self, path: str, lineno: int, msg: str):
        super().__init__(f"{path}:{lineno}: {msg}")


# --------------------------------------------------------------------------- inputs
def read_image_urls(path: str, n: int) -> List[str]:
    urls = [""] * n
    if not os.path.isfile(path):
        return urls
    with open(path, "r", encoding="utf-8") as fp:
        for lineno, line in enumerate(fp, 1):
            line = line.rstrip("\r\n")
            if not line:
                continue
            parts = line.split("\t")
            if len(parts) != 2 or not parts[0].isdigit() or int(parts[0]) >= n:
                raise FormatError(path, lineno, f"expected 'index<TAB>url' with an index below {n}")
            urls[int(parts[0])] = parts[1]
    return urls


def word_drop(text: str, ratio: float, seed: int, index: int) -> str:
    """Drop each word with probability ``ratio`` (deterministic per (seed, item index))."""
    words = text.split()
    if not words or ratio <= 0:
        return text
    rng = np.random.default_rng([seed, index])
    keep = rng.random(len(words)) >= ratio
    if not keep.any():
        keep[rng.integers(len(words))] = True
    return " ".join(w for w, k in zip(words, keep) if k)


def image_path(index: int, images: Optional[str], cache: Optional[str], url: str) -> Optional[str]:
    if images:
        for ext in IMAGE_EXTS:
            p = os.path.join(images, f"{index}{ext}")
            if os.path.isfile(p):
                return p
    if cache and url:
        base = url.split("?")[0].rstrip("/").rsplit("/", 1)[-1]
        p = os.path.join(cache, base)
        if base and os.path.isfile(p):
            return p
    return None


# --------------------------------------------------------------------------- model
def _load_transformers(*names):
    """torch and the named `transformers` classes, or one line saying what to install."""
    try:
        import torch
        import transformers
    except ImportError as e:
        raise ToolError(f"feature extraction needs torch and transformers ({e}); "
                        f"pip install -r requirements-tools.txt") from None
    return torch, [getattr(transformers, n) for n in names]


class Clip:
    def __init__(self, model: str, device: Optional[str] = None):
        self.torch, (AutoTokenizer, CLIPModel) = _load_transformers("AutoTokenizer", "CLIPModel")
        self.name = model
        self.device = device or ("cuda" if self.torch.cuda.is_available() else "cpu")
        try:
            self.model = CLIPModel.from_pretrained(model).to(self.device).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(model)
        except (OSError, ValueError) as e:
            raise ToolError(f"cannot load CLIP model/tokenizer from {model!r}: {str(e).splitlines()[0]}") from None
        self.dim = int(self.model.config.projection_dim)
        limit = int(self.model.config.text_config.max_position_embeddings)
        self.max_len = min(limit, int(getattr(self.tokenizer, "model_max_length", limit) or limit))
        self._image_processor = None

    @staticmethod
    def _out(x):
        return x if hasattr(x, "shape") else x.pooler_output  # transformers 5 returns a model output

    def text_features(self, texts: Sequence[str]) -> np.ndarray:
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_len,
                             return_tensors="pt")
        enc = {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
        with self.torch.no_grad():
            out = self._out(self.model.get_text_features(**enc))
        return out.float().cpu().numpy()

    def image_features(self, images) -> np.ndarray:
        if self._image_processor is None:
            try:
                from transformers import CLIPImageProcessor
                self._image_processor = CLIPImageProcessor.from_pretrained(self.name)
            except (OSError, ValueError) as e:
                raise ToolError(f"cannot load the CLIP image processor from {self.name!r}: "
                                f"{str(e).splitlines()[0]}") from None
        px = self._image_processor(images=list(images), return_tensors="pt")["pixel_values"].to(self.device)
        with self.torch.no_grad():
            out = self._out(self.model.get_image_features(pixel_values=px))
        return out.float().cpu().numpy()


class SentenceEncoder:
    """A sentence-transformers text encoder run through plain transformers: token states
    mean-pooled with the attention mask, then L2-normalised (all-MiniLM-L6-v2's modules)."""

    def __init__(self, model: str, device: Optional[str] = None):
        self.torch, (AutoModel, AutoTokenizer) = _load_transformers("AutoModel", "AutoTokenizer")
        self.name = model
        self.device = device or ("cuda" if self.torch.cuda.is_available() else "cpu")
        pooling = _st_json(model, "1_Pooling/config.json")
        if pooling and not pooling.get("pooling_mode_mean_tokens", False):
            modes = [k for k, v in pooling.items() if k.startswith("pooling_mode_") and v]
            raise ToolError(f"{model}: its 1_Pooling/config.json pools with {', '.join(modes) or 'no mode'}; "
                            f"this tool computes mean pooling only")
        try:
            self.model = AutoModel.from_pretrained(model).to(self.device).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(model)
        except (OSError, ValueError) as e:
            raise ToolError(f"cannot load the sentence encoder/tokenizer from {model!r}: "
                            f"{str(e).splitlines()[0]}") from None
        self.dim = int(self.model.config.hidden_size)
        limit = int(getattr(self.model.config, "max_position_embeddings", 512))
        limit = min(limit, int(getattr(self.tokenizer, "model_max_length", limit) or limit))
        # sentence-transformers truncates at its own max_seq_length (256 for all-MiniLM-L6-v2)
        # and lower-cases first when its config says so
        st_config = _st_json(model, "sentence_bert_config.json") or {}
        st_len = st_config.get("max_seq_length")
        self.max_len = min(limit, int(st_len)) if st_len else limit
        self.lower = bool(st_config.get("do_lower_case", False))

    def text_features(self, texts: Sequence[str]) -> np.ndarray:
        texts = [t.lower() for t in texts] if self.lower else list(texts)
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_len, return_tensors="pt")
        enc = {k: v.to(self.device) for k, v in enc.items()
               if k in ("input_ids", "attention_mask", "token_type_ids")}
        with self.torch.no_grad():
            states = self.model(**enc).last_hidden_state                          # [B, T, H]
            mask = enc["attention_mask"].unsqueeze(-1).to(states.dtype)           # [B, T, 1]
            pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)         # [B, H]
            out = self.torch.nn.functional.normalize(pooled, p=2, dim=1)
        return out.float().cpu().numpy()


def _st_json(model: str, filename: str) -> Optional[dict]:
    """A sentence-transformers config file of a local folder or a hub model; None when absent."""
    if os.path.isdir(model):
        path = os.path.join(model, filename)
    else:
        try:
            from transformers.utils import cached_file
            path = cached_file(model, filename, _raise_exceptions_for_missing_entries=False,
                               _raise_exceptions_for_connection_errors=False)
        except Exception:  # offline, unknown repo, older transformers: fall back to the plain model
            path = None
    if not path or not os.path.isfile(path):
        return None
    try:
        with open(path, "r", encoding="utf-8") as fp:
            return json.load(fp)
    except (OSError, ValueError):
        raise ToolError(f"{path}: expected a JSON object") from None


ENCODERS = {"clip": Clip, "sentence": SentenceEncoder}
DEFAULT_MODELS = {"clip": "openai/clip-vit-base-patch32", "sentence": "sentence-transformers/all-MiniLM-L6-v2"}


def load_image(path: Optional[str]):
    """PIL RGB image, or None when the file is missing or unreadable."""
    if path is None:
        return None
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except Exception:  # PIL raises many types for corrupt files
        return None


# ---------------------------------------------------------------------- resumable file
def _run_feature(final: str, n: int, dim: int, batch_size: int, settings: dict,
                 compute: Callable[[int, int], np.ndarray], desc: str,
                 after_batch: Optional[Callable[[str, int], None]] = None) -> None:
    """Fill ``final`` with n x dim float32 rows computed by ``compute(start, stop)``,
    through ``final.partial`` + ``final.partial.json``; resume when the sidecar matches."""
    partial, sidecar = final + ".partial", final + ".partial.json"
    row_bytes = dim * 4
    done = 0
    if os.path.isfile(partial) and os.path.isfile(sidecar):
        try:
            with open(sidecar, "r", encoding="utf-8") as fp:
                state = json.load(fp)
        except (OSError, ValueError):
            state = {}
        if state.get("settings") == settings and isinstance(state.get("rows_done"), int) \
                and os.path.getsize(partial) >= state["rows_done"] * row_bytes:
            done = state["rows_done"]
    mode = "r+b" if done else "wb"
    with open(partial, mode) as fp:
        fp.truncate(done * row_bytes)
        fp.seek(done * row_bytes)
        bar = tqdm(total=n, initial=done, desc=desc, unit=" items", mininterval=1)
        for start in range(done, n, batch_size):
            stop = min(n, start + batch_size)
            rows = np.ascontiguousarray(compute(start, stop), dtype="<f4")
            if rows.shape != (stop - start, dim):
                raise ToolError(f"{desc}: model returned shape {rows.shape}, expected {(stop - start, dim)}")
            fp.write(rows.tobytes())
            fp.flush()
            os.fsync(fp.fileno())
            atomic_write_text(sidecar, json.dumps({"rows_done": stop, "settings": settings}))
            bar.update(stop - start)
            if after_batch is not None:
                after_batch(desc, stop)
        bar.close()
    os.replace(partial, final)
    os.remove(sidecar)


def extract(data: str, name: Optional[str] = None, model: Optional[str] = None,
            images: Optional[str] = None, image_cache: Optional[str] = None, features: Optional[Sequence[int]] = None,
            batch_size: int = 64, word_drop_ratio: float = 0.2, seed: int = 2020, device: Optional[str] = None,
            overwrite: bool = False, after_batch: Optional[Callable[[str, int], None]] = None,
            quiet: bool = False, encoder: str = "clip", suffix: str = "CLS") -> dict:
    """Write the feature files of one dataset; ``features`` defaults to (1, 2, 3) for
    CLIP and (1, 2) for a sentence encoder (text only)."""
    if encoder not in ENCODERS:
        raise ToolError(f"unknown encoder {encoder!r} (expected {' or '.join(ENCODERS)})")
    model = model or DEFAULT_MODELS[encoder]
    features = tuple(features) if features is not None else ((1, 2, 3) if encoder == "clip" else (1, 2))
    if encoder != "clip" and 3 in features:
        raise ToolError(f"--encoder {encoder} makes text features only (1, 2); image features (3) need --encoder clip")
    if not suffix or not suffix.replace("_", "").isalnum():
        raise ToolError(f"--suffix {suffix!r}: expected letters, digits or '_' (files are named .feat1{{suffix}})")
    name = name or os.path.basename(os.path.normpath(data))
    base = os.path.join(data, name)
    try:
        item2index = read_item2index(base + ".item2index", required=True)
        n = len(item2index)
        if n == 0:
            raise ToolError(f"{base}.item2index: no items")
        text_of = read_texts(base + ".text", item2index, required=True) if {1, 2} & set(features) else None
    except DataError as e:
        raise ToolError(str(e)) from None
    texts = [text_of.get(i) for i in range(n)] if text_of is not None else []
    urls = read_image_urls(base + ".image_urls", n) if 3 in features else []
    if 3 in features:
        if images and not os.path.isdir(images):
            raise ToolError(f"{images}: image folder not found")
        if image_cache and not os.path.isdir(image_cache):
            raise ToolError(f"{image_cache}: image cache folder not found")
        try:
            import PIL  # noqa: F401
        except ImportError:
            raise ToolError("image features need pillow (pip install pillow)") from None
    todo = [f for f in sorted(set(features)) if overwrite or not os.path.isfile(f"{base}.feat{f}{suffix}")]
    summary: dict = {"items": n}
    for f in sorted(set(features) - set(todo)):
        summary[f"feat{f}{suffix}"] = "exists"
        if not quiet:
            print(f"{base}.feat{f}{suffix} exists, skipped (use --overwrite)")
    if not todo:
        return summary
    enc = ENCODERS[encoder](model, device)
    dim = enc.dim
    common = {"model": model, "n_items": n, "dim": dim, "batch_size": batch_size}
    if encoder != "clip":  # CLIP's sidecars keep their old settings, so old partial files still resume
        common["encoder"] = encoder

    def text_compute(drop: bool):
        def compute(start, stop):
            out = np.zeros((stop - start, dim), dtype=np.float32)
            idx = [i for i in range(start, stop) if texts[i] and texts[i].strip()]
            if idx:
                batch = [word_drop(texts[i], word_drop_ratio, seed, i) if drop else texts[i] for i in idx]
                out[[i - start for i in idx]] = enc.text_features(batch)
            return out
        return compute

    missing_images = unreadable_images = 0

    def image_compute(start, stop):
        nonlocal missing_images, unreadable_images
        out = np.zeros((stop - start, dim), dtype=np.float32)
        loaded, idx = [], []
        for i in range(start, stop):
            path = image_path(i, images, image_cache, urls[i])
            if path is None:
                missing_images += 1
                continue
            im = load_image(path)
            if im is None:
                unreadable_images += 1
                continue
            loaded.append(im)
            idx.append(i - start)
        if loaded:
            out[idx] = enc.image_features(loaded)
        return out

    n_no_text = sum(1 for t in texts if not (t and t.strip())) if texts else 0
    for f in todo:
        kind = f"feat{f}{suffix}"
        final = f"{base}.{kind}"
        if f == 1:
            _run_feature(final, n, dim, batch_size, dict(common, kind="text"), text_compute(False),
                         kind, after_batch)
            summary[f"{kind}_zero_rows"] = n_no_text
        elif f == 2:
            _run_feature(final, n, dim, batch_size,
                         dict(common, kind="text_word_drop", word_drop=word_drop_ratio, seed=seed),
                         text_compute(True), kind, after_batch)
            summary[f"{kind}_zero_rows"] = n_no_text
        elif f == 3:
            _run_feature(final, n, dim, batch_size, dict(common, kind="image", images=images, cache=image_cache),
                         image_compute, kind, after_batch)
            summary[f"{kind}_missing_images"] = missing_images
            summary[f"{kind}_unreadable_images"] = unreadable_images
        else:
            raise ToolError(f"unknown feature number {f} (expected 1, 2 or 3)")
    summary["dim"] = dim
    if not quiet:
        msg = [f"{name}: {n} items, {dim} columns, {encoder} model {model} on {enc.device}"]
        if {1, 2} & set(todo):
            msg.append(f"items without text (zero rows): {n_no_text}")
        if 3 in todo:
            msg.append(f"items without image (zero rows): {missing_images} missing + {unreadable_images} unreadable"
                       f" (only counts items processed in this run)")
        print("; ".join(msg))
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="processed dataset folder (holds {name}.text, {name}.item2index)")
    p.add_argument("--name", default=None, help="dataset name (default: the folder's name)")
    p.add_argument("--encoder", choices=sorted(ENCODERS), default="clip",
                   help="clip (text and image, the original's features) or sentence (text only: mean-pooled, "
                        "L2-normalised sentence-transformers model)")
    p.add_argument("--model", default=None,
                   help="model folder or hub name (default openai/clip-vit-base-patch32 for clip, "
                        "sentence-transformers/all-MiniLM-L6-v2 for sentence)")
    p.add_argument("--images", default=None, help="folder with {item_index}.jpg images")
    p.add_argument("--image-cache", default=None, help="folder of images named like the last part of their url")
    p.add_argument("--features", type=int, nargs="+", default=None, choices=[1, 2, 3],
                   help="which files to write: 1 text, 2 word-dropped text, 3 image "
                        "(default 1 2 3 for clip, 1 2 for sentence)")
    p.add_argument("--suffix", default="CLS", help="file names end .feat{1,2,3}SUFFIX (default CLS)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--word-drop", type=float, default=0.2, help="word drop probability for feat2CLS")
    p.add_argument("--seed", type=int, default=2020)
    p.add_argument("--device", default=None, help="torch device (default cuda when available)")
    p.add_argument("--overwrite", action="store_true", help="recompute files that already exist")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    def _run(a):
        args = build_parser().parse_args(a)
        if args.batch_size < 1:
            raise ToolError("--batch-size must be >= 1")
        if not 0 <= args.word_drop < 1:
            raise ToolError("--word-drop must be in [0, 1)")
        features = args.features or ([1, 2, 3] if args.encoder == "clip" else [1, 2])
        if 3 in features and args.encoder == "clip" and not (args.images or args.image_cache):
            raise ToolError("image features (3) need --images and/or --image-cache")
        extract(args.data, args.name, args.model, args.images, args.image_cache, features, args.batch_size,
                args.word_drop, args.seed, args.device, args.overwrite, encoder=args.encoder, suffix=args.suffix)
        return 0
    return run_main(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
