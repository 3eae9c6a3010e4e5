"""mr1.memory.embedder: API shape, bucketing, and parity with transformers' PyTorch BertModel."""

import numpy as np
import pytest

from mr1.memory.embedder import MAX_SEQ_LENGTH, bucket, load_embedder

SENTENCES = [
    "Caroline went to the LGBTQ support group on 7 May 2023.",
    "Melanie painted a sunrise over the lake last year.",
    "",
    " ",
    "?",
    "Café Zürich — 東京 🙂",
    "Ünïcödé ß æ ø å — naïve façade, 北京大学, Москва, العربية",
    "a",
    "What did Melanie paint?",
    "The quick brown fox jumps over the lazy dog. " * 60,  # > 256 tokens: truncated
    " ".join(str(i) for i in range(400)),                   # > 256 tokens: truncated
    "tabs\tand\nnewlines\r\n and    spaces",
]


@pytest.fixture(scope="module")
def emb():
    return load_embedder()


def test_encode_shapes_and_norms(emb):
    out = emb.encode(SENTENCES[:3])
    assert out.shape == (3, 384) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    empty = emb.encode([])
    assert empty.shape == (0, 384) and empty.dtype == np.float32
    with pytest.raises(TypeError):
        emb.encode("not a list")


def test_truncates_at_256_and_buckets_lengths(emb):
    lengths = [len(ids) for ids in emb.tokenize(SENTENCES)]
    assert max(lengths) == MAX_SEQ_LENGTH and min(lengths) == 2  # "" -> [CLS] [SEP]
    assert [bucket(n) for n in (1, 8, 9, 100, 256)] == [8, 8, 16, 128, 256]
    # Order and batch split do not change the vectors; repeated shapes do not recompile.
    a = emb.encode(SENTENCES)
    b = emb.encode(SENTENCES[::-1], batch_size=3)[::-1]
    np.testing.assert_allclose(a, b, atol=2e-5)
    before = emb._forward._cache_size()
    emb.encode(SENTENCES[::-1])
    assert emb._forward._cache_size() == before
    # Related sentences are closer than unrelated ones.
    s = emb.encode(["What did Melanie paint?", "Melanie painted a sunrise.", "Stock prices fell."])
    assert s[0] @ s[1] > s[0] @ s[2] + 0.2


def test_load_from_explicit_path(emb):
    from mr1.assets import minilm_dir
    other = load_embedder(path=minilm_dir())
    np.testing.assert_array_equal(other.encode(["hi there"]), emb.encode(["hi there"]))


def test_parity_with_torch_bert(emb):
    torch = pytest.importorskip("torch", reason="torch is the test-only reference")
    from transformers import BertModel

    from mr1.assets import minilm_dir

    model = BertModel.from_pretrained(str(minilm_dir()), add_pooling_layer=False).eval()
    enc = emb.tokenizer(SENTENCES, max_length=MAX_SEQ_LENGTH, truncation=True, padding=True,
                        return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).float()
    ref = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    ref = torch.nn.functional.normalize(ref, p=2, dim=1).numpy()
    ours = emb.encode(SENTENCES)
    o, r = ours.astype(np.float64), ref.astype(np.float64)
    cos = np.sum(o * r, axis=1) / np.linalg.norm(r, axis=1) / np.linalg.norm(o, axis=1)
    print(f"\nembedder parity: min cosine {cos.min():.9f} (1 - min = {1 - cos.min():.2e}), "
          f"max abs diff {np.abs(ours - ref).max():.2e} over {len(SENTENCES)} sentences")
    assert cos.min() >= 0.999, cos
    np.testing.assert_allclose(ours, ref, atol=1e-4)
