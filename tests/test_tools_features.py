"""Tests for tools/extract_features.py with a tiny randomly initialised CLIP (no download)."""

import json
import os

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
PIL_Image = pytest.importorskip("PIL.Image")
torch = pytest.importorskip("torch")

from tools import extract_features  # noqa: E402
from io_utils import ToolError  # noqa: E402

PROJ = 16
N_ITEMS = 5


def _bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    d = tmp_path_factory.mktemp("tinyclip")
    chars = _bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"))
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, eos_token_id=tok.eos_token_id,
                         bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=PROJ)
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(str(d))
    tok.save_pretrained(str(d))
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(str(d))
    return str(d)


def _dataset(tmp_path):
    data = tmp_path / "Tiny"
    data.mkdir()
    raws = [f"B{i:03d}" for i in range(N_ITEMS)]
    (data / "Tiny.item2index").write_text("".join(f"{r}\t{i}\n" for i, r in enumerate(raws)))
    texts = ["Gorilla glue waterproof. Adhesives. Gorilla. ", "Beaker glass 250 ml. Lab. ",
             "Scale digital. Lab. Ohaus. ", "Flask large. Lab Glass. Pyrex. ", "Tape roll. Tapes. 3M. "]
    # rows in a different order than the index, keyed by raw id (as the distributed files)
    rows = [f"{raws[i]}\t{texts[i]}\n" for i in (3, 0, 4, 1, 2)]
    (data / "Tiny.text").write_text("item_id:token\ttext:token_seq\n" + "".join(rows))
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in (0, 2, 4):  # 1 missing, 3 corrupt
        arr = rng.integers(0, 255, (40, 36, 3), dtype=np.uint8)
        PIL_Image.fromarray(arr).save(str(images / f"{i}.png"))
    (images / "3.jpg").write_bytes(b"not a jpeg at all")
    return data, images, texts


def test_extract_features(tmp_path, tiny_clip, capsys):
    data, images, texts = _dataset(tmp_path)
    rc = extract_features.main(["--data", str(data), "--model", tiny_clip, "--images", str(images),
                                "--batch-size", "2", "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "1 missing + 1 unreadable" in out
    for f in (1, 2, 3):
        assert os.path.getsize(data / f"Tiny.feat{f}CLS") == N_ITEMS * PROJ * 4
    assert sorted(os.listdir(data)) == ["Tiny.feat1CLS", "Tiny.feat2CLS", "Tiny.feat3CLS", "Tiny.item2index", "Tiny.text"]
    f1 = np.fromfile(str(data / "Tiny.feat1CLS"), dtype="<f4").reshape(N_ITEMS, PROJ)
    f2 = np.fromfile(str(data / "Tiny.feat2CLS"), dtype="<f4").reshape(N_ITEMS, PROJ)
    f3 = np.fromfile(str(data / "Tiny.feat3CLS"), dtype="<f4").reshape(N_ITEMS, PROJ)
    # recompute rows directly with the model
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    model = CLIPModel.from_pretrained(tiny_clip).eval()
    tok = AutoTokenizer.from_pretrained(tiny_clip)
    with torch.no_grad():
        enc = tok([texts[3]], return_tensors="pt")
        ref = model.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        ref = ref if hasattr(ref, "shape") else ref.pooler_output
        np.testing.assert_allclose(f1[3], ref[0].numpy(), rtol=1e-4, atol=1e-5)
        dropped = extract_features.word_drop(texts[3], 0.2, 2020, 3)
        enc = tok([dropped], return_tensors="pt")
        ref = model.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        ref = ref if hasattr(ref, "shape") else ref.pooler_output
        np.testing.assert_allclose(f2[3], ref[0].numpy(), rtol=1e-4, atol=1e-5)
        proc = CLIPImageProcessor.from_pretrained(tiny_clip)
        with PIL_Image.open(str(images / "2.png")) as im:
            px = proc(images=[im.convert("RGB")], return_tensors="pt")["pixel_values"]
        ref = model.get_image_features(pixel_values=px)
        ref = ref if hasattr(ref, "shape") else ref.pooler_output
        np.testing.assert_allclose(f3[2], ref[0].numpy(), rtol=1e-4, atol=1e-5)
    # missing and corrupt images -> zero rows; the others are not zero
    assert not f3[1].any() and not f3[3].any()
    assert all(f3[i].any() for i in (0, 2, 4)) and all(f1[i].any() for i in range(N_ITEMS))
    # rerun without --overwrite skips existing files
    assert extract_features.main(["--data", str(data), "--model", tiny_clip, "--features", "1",
                                  "--device", "cpu"]) == 0
    assert "exists, skipped" in capsys.readouterr().out


def test_word_drop_deterministic():
    text = "one two three four five six seven eight nine ten"
    a = extract_features.word_drop(text, 0.2, 2020, 7)
    assert a == extract_features.word_drop(text, 0.2, 2020, 7)
    # each word kept where its draw from the (seed, index) stream is >= ratio, in order
    draws = np.random.default_rng([2020, 7]).random(10)
    assert a == " ".join(w for w, r in zip(text.split(), draws) if r >= 0.2)
    # other items drop other words, about `ratio` of them, and never all of them
    dropped = [extract_features.word_drop(text, 0.2, 2020, i) for i in range(50)]
    assert len(set(dropped)) > 10
    assert 0.12 < 1 - sum(len(d.split()) for d in dropped) / 500 < 0.28
    assert all(extract_features.word_drop(text, 0.99, 2020, i) for i in range(50))
    assert extract_features.word_drop("solo", 0.99, 1, 1) == "solo"
    assert extract_features.word_drop(text, 0.0, 1, 1) == text


class _Stop(Exception):
    pass


def test_resume_after_interrupt(tmp_path, tiny_clip):
    data, images, _ = _dataset(tmp_path)
    full = tmp_path / "full"
    os.makedirs(full)
    for f in ("Tiny.item2index", "Tiny.text"):
        (full / f).write_bytes((data / f).read_bytes())
    extract_features.extract(str(full), name="Tiny", model=tiny_clip, images=str(images), batch_size=2, device="cpu",
                             quiet=True)

    def stop_after_first(desc, rows_done):
        if desc == "feat3CLS" and rows_done == 2:
            raise _Stop

    with pytest.raises(_Stop):
        extract_features.extract(str(data), model=tiny_clip, images=str(images), batch_size=2, device="cpu",
                                 after_batch=stop_after_first, quiet=True)
    assert not (data / "Tiny.feat3CLS").exists()
    assert os.path.getsize(data / "Tiny.feat3CLS.partial") == 2 * PROJ * 4
    assert json.loads((data / "Tiny.feat3CLS.partial.json").read_text())["rows_done"] == 2
    # a later batch's garbage past rows_done is discarded on resume
    with open(data / "Tiny.feat3CLS.partial", "ab") as fp:
        fp.write(b"\xff" * 10)
    seen = []
    extract_features.extract(str(data), model=tiny_clip, images=str(images), batch_size=2, device="cpu",
                             after_batch=lambda d, r: seen.append((d, r)), quiet=True)
    assert seen == [("feat3CLS", 4), ("feat3CLS", 5)]  # continued after the first batch
    for f in (1, 2, 3):
        assert (data / f"Tiny.feat{f}CLS").read_bytes() == (full / f"Tiny.feat{f}CLS").read_bytes()
    assert not [p for p in os.listdir(data) if "partial" in p]


def test_malformed_text(tmp_path, tiny_clip, capsys):
    data, images, _ = _dataset(tmp_path)
    with open(data / "Tiny.text", "a") as fp:
        fp.write("B001 no tab here\n")
    rc = extract_features.main(["--data", str(data), "--model", tiny_clip, "--features", "1", "--device", "cpu"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "Tiny.text: line 7: expected 2 tab-separated fields" in err and "Traceback" not in err
    assert not [p for p in os.listdir(data) if "feat" in p]
    with pytest.raises(ToolError, match="image folder not found"):
        extract_features.extract(str(data), model=tiny_clip, images=str(tmp_path / "nope"), features=(3,))


# ------------------------------------------------------------------ sentence encoder
HIDDEN = 24


@pytest.fixture(scope="module")
def tiny_sentence(tmp_path_factory):
    """A randomly initialised BERT saved as a sentence-transformers folder (mean pooling,
    normalise, max_seq_length 12), shaped like all-MiniLM-L6-v2 but tiny."""
    from transformers import BertConfig, BertModel, BertTokenizer

    d = tmp_path_factory.mktemp("tinyst")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "glue", "lab", "glass", "flask", "tape", "scale",
             "beaker", "gorilla", "."] + list("abcdefghijklmnopqrstuvwxyz0123456789")
    words += ["##" + c for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    (d / "vocab.txt").write_text("\n".join(words) + "\n")
    tok = BertTokenizer(str(d / "vocab.txt"))
    cfg = BertConfig(vocab_size=len(words), hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=37, max_position_embeddings=64)
    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(str(d))
    tok.save_pretrained(str(d))
    (d / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 12, "do_lower_case": False}))
    (d / "1_Pooling").mkdir()
    (d / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": HIDDEN, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True,
        "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False}))
    (d / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    return str(d)


def _mean_pooled(folder, text, max_len=12):
    """One text alone (no padding in the batch): mean of its token states, L2-normalised."""
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    enc = tok([text], truncation=True, max_length=max_len, return_tensors="pt")
    with torch.no_grad():
        states = model(**enc).last_hidden_state[0]
    v = states.mean(0).numpy()
    return v / np.linalg.norm(v)


def test_sentence_encoder_text_only(tmp_path, tiny_sentence, capsys):
    data, _, texts = _dataset(tmp_path)
    rc = extract_features.main(["--data", str(data), "--encoder", "sentence", "--model", tiny_sentence,
                                "--batch-size", "2", "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    assert "sentence model" in capsys.readouterr().out
    # text only: feat1CLS and the word-dropped feat2CLS, hidden_size columns, no image file
    assert sorted(os.listdir(data)) == ["Tiny.feat1CLS", "Tiny.feat2CLS", "Tiny.item2index", "Tiny.text"]
    f1 = np.fromfile(str(data / "Tiny.feat1CLS"), dtype="<f4").reshape(N_ITEMS, HIDDEN)
    f2 = np.fromfile(str(data / "Tiny.feat2CLS"), dtype="<f4").reshape(N_ITEMS, HIDDEN)
    np.testing.assert_allclose(np.linalg.norm(f1, axis=1), 1.0, rtol=1e-5)
    # batches of 2 texts of different lengths: the padding must not enter the mean
    for i, text in enumerate(texts):
        np.testing.assert_allclose(f1[i], _mean_pooled(tiny_sentence, text), rtol=1e-4, atol=1e-5)
        dropped = extract_features.word_drop(text, 0.2, 2020, i)
        np.testing.assert_allclose(f2[i], _mean_pooled(tiny_sentence, dropped), rtol=1e-4, atol=1e-5)
    assert any(extract_features.word_drop(t, 0.2, 2020, i) != t for i, t in enumerate(texts))
    assert not np.allclose(f1, f2)


def test_sentence_encoder_options(tmp_path, tiny_sentence, capsys):
    data, _, _ = _dataset(tmp_path)
    enc = extract_features.SentenceEncoder(tiny_sentence, device="cpu")
    assert enc.dim == HIDDEN and enc.max_len == 12  # sentence_bert_config.json's max_seq_length
    long_text = " ".join(["glue"] * 40)
    np.testing.assert_allclose(enc.text_features([long_text])[0], _mean_pooled(tiny_sentence, long_text),
                               rtol=1e-4, atol=1e-5)
    # --suffix names the files for a second text encoder beside the CLIP ones
    assert extract_features.main(["--data", str(data), "--encoder", "sentence", "--model", tiny_sentence,
                                  "--features", "1", "--suffix", "MiniLM", "--device", "cpu"]) == 0
    assert os.path.getsize(data / "Tiny.feat1MiniLM") == N_ITEMS * HIDDEN * 4
    assert not (data / "Tiny.feat1CLS").exists()
    capsys.readouterr()
    # a sentence encoder has no image features
    assert extract_features.main(["--data", str(data), "--encoder", "sentence", "--model", tiny_sentence,
                                  "--features", "3", "--device", "cpu"]) == 2
    assert "makes text features only (1, 2)" in capsys.readouterr().err
    # a model that pools another way is refused, not silently mean-pooled
    cls_model = tmp_path / "cls"
    os.makedirs(cls_model / "1_Pooling")
    (cls_model / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True,
                                                                     "pooling_mode_mean_tokens": False}))
    with pytest.raises(ToolError, match="pools with pooling_mode_cls_token; this tool computes mean pooling"):
        extract_features.SentenceEncoder(str(cls_model), device="cpu")
    with pytest.raises(ToolError, match="cannot load the sentence encoder"):
        extract_features.SentenceEncoder(str(tmp_path / "empty_model"), device="cpu")


def test_sentence_encoder_matches_sentence_transformers(tmp_path, tiny_sentence):
    st = pytest.importorskip("sentence_transformers")
    data, _, texts = _dataset(tmp_path)
    extract_features.extract(str(data), encoder="sentence", model=tiny_sentence, features=(1,), batch_size=3,
                             device="cpu", quiet=True)
    f1 = np.fromfile(str(data / "Tiny.feat1CLS"), dtype="<f4").reshape(N_ITEMS, HIDDEN)
    ref = st.SentenceTransformer(tiny_sentence, device="cpu").encode(texts, batch_size=3, convert_to_numpy=True)
    np.testing.assert_allclose(f1, ref, rtol=1e-4, atol=1e-5)


def test_text_only_corpus_from_commands(tmp_path, tiny_sentence, capsys):
    """.text files -> extract_features --encoder sentence -> merge_pretrain -> the pre-training loader."""
    from data.pretrain import PretrainDataset
    from tools import merge_pretrain

    down = tmp_path / "down"
    words = ["glue", "lab glass", "flask", "tape scale", "beaker gorilla", "glass flask tape"]
    for name, n in (("Beauty", 4), ("Toys", 6)):
        d = down / name
        d.mkdir(parents=True)
        (d / f"{name}.item2index").write_text("".join(f"{i}\t{i}\n" for i in range(n)))
        (d / f"{name}.text").write_text("item_id:token\ttext:token_seq\n"
                                        + "".join(f"{i}\t{words[i]} . lab\n" for i in range(n)))
        (d / f"{name}.train.inter").write_text("user_id:token\titem_id_list:token_seq\titem_id:token\n"
                                               f"0\t0 1\t2\n0\t0 1 2\t3\n1\t3\t{n - 1}\n")
        assert extract_features.main(["--data", str(d), "--encoder", "sentence", "--model", tiny_sentence,
                                      "--device", "cpu"]) == 0
    assert merge_pretrain.main(["--domains", "Beauty", "Toys", "--data-path", str(down),
                                "--out", str(tmp_path / "pretrain"), "--name", "BT_text"]) == 0
    assert f"pre-train with --modal_type=text --plm_size={HIDDEN}" in capsys.readouterr().out
    config = {"dataset": "BT_text", "data_path": str(tmp_path / "pretrain"), "MAX_ITEM_LIST_LENGTH": 50,
              "modal_type": "text", "plm_suffix": "feat1CLS", "plm_suffix_aug": "feat2CLS",
              "img_suffix": "feat3CLS", "plm_size": HIDDEN, "img_size": 512, "interest_ratio": 0.5,
              "hidden_size": 8}
    ds = PretrainDataset(config)
    assert ds.domains == ["Beauty", "Toys"] and ds.modalities == ["text"]
    assert set(ds.tables) == {"text", "text_aug"} and ds.tables["text"].shape[1] == HIDDEN
    # a table row is the domain file's row of that item
    toys = np.fromfile(str(down / "Toys" / "Toys.feat1CLS"), dtype="<f4").reshape(-1, HIDDEN)
    k = ds.item_tokens.index("1-5")
    np.testing.assert_allclose(np.asarray(ds.tables["text"][k + 1]), toys[5])
