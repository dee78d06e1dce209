"""BERTScoreScorer on a tiny real BERT saved to disk, checked against a direct computation:
the model's layer-L hidden states, L2-normalised, greedy cosine matching."""

from __future__ import annotations

import importlib.util
import math
import sys

import pytest
import torch

from safemerge.errors import ConfigError
from safemerge.evaluation.tasks.base import TaskItem

needs_bert_score = pytest.mark.skipif(importlib.util.find_spec("bert_score") is None,
                                      reason="bert-score is not installed (pip install 'safemerge[bertscore]')")

WORDS = ["the", "a", "cat", "dog", "sat", "ran", "on", "in", "mat", "park", "big", "small", "red", "blue", "and", "##s", "##ed"]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
LAYERS, LAYER = 3, 2

PAIRS = [  # (candidate, reference)
    ("the cat sat on the mat", "the cat sat on the mat"),
    ("a dog sat on the mat", "the cat sat on the mat"),
    ("big red dogs ran", "small blue cat sat in the park"),
    ("the dogs ran in the park", "the cat sat on the big red mat and the dog ran"),
]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=64)
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=LAYERS,
                                 num_attention_heads=4, intermediate_size=64, max_position_embeddings=64))
    path = tmp_path_factory.mktemp("bert") / "tiny-bert"
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


def direct_scores(path, pairs, idf_refs=None):
    """(P, R, F) per pair computed here from the model's hidden states.

    As in bert-score, [CLS]/[SEP] get weight 0 (they are left out of the averages) but stay in the
    similarity matrix, so a word may be matched to them. With idf_refs, a token's weight is
    log((N+1)/(df+1)) over those N reference sentences (log(N+1) for unseen tokens); otherwise 1."""
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    specials = {tok.cls_token_id, tok.sep_token_id}

    def encode(text):
        ids = tok(text, return_tensors="pt").input_ids
        with torch.no_grad():
            states = model(ids, output_hidden_states=True).hidden_states[LAYER][0]
        return ids[0].tolist(), torch.nn.functional.normalize(states.double(), dim=-1)

    if idf_refs is None:
        def weight(i):
            return 1.0
    else:
        docs = [set(tok(r).input_ids) for r in idf_refs]

        def weight(i):
            return math.log((len(docs) + 1) / (sum(i in d for d in docs) + 1))

    def weighted_mean(ids, best):
        w = torch.tensor([0.0 if i in specials else weight(i) for i in ids], dtype=torch.float64)
        return float((w * best).sum() / w.sum())

    out = []
    for cand, ref in pairs:
        (cids, c), (rids, r) = encode(cand), encode(ref)
        sim = c @ r.T
        p = weighted_mean(cids, sim.max(dim=1).values)
        rc = weighted_mean(rids, sim.max(dim=0).values)
        out.append((p, rc, 2 * p * rc / (p + rc)))
    return out


def items_for(pairs):
    return [TaskItem(id=f"q{k}", prompt="-", reference=ref) for k, (_, ref) in enumerate(pairs)]


@needs_bert_score
def test_f1_matches_direct_computation(tiny_bert):
    from safemerge.evaluation.tasks.bertscore import BertScoreScorer

    scorer = BertScoreScorer(model=str(tiny_bert), layer=LAYER, batch_size=2)
    # the first sample of each item is scored; later samples are ignored
    responses = [[cand, "dog dog dog"] for cand, _ in PAIRS]
    result = scorer.score(items_for(PAIRS), responses)

    expected = direct_scores(tiny_bert, PAIRS)
    assert result.primary == "bertscore_f1"
    assert [r["id"] for r in result.per_item] == ["q0", "q1", "q2", "q3"]
    for record, (p, r, f) in zip(result.per_item, expected):
        assert record["precision"] == pytest.approx(p, abs=1e-5)
        assert record["recall"] == pytest.approx(r, abs=1e-5)
        assert record["f1"] == pytest.approx(f, abs=1e-5)
    assert result.per_item[0]["f1"] == pytest.approx(1.0, abs=1e-5)  # identical strings
    assert min(r["f1"] for r in result.per_item[1:]) < 0.99  # the others are not trivially 1

    estimate = result.metrics["bertscore_f1"]
    assert estimate.value == pytest.approx(sum(f for _, _, f in expected) / len(PAIRS), abs=1e-5)
    assert estimate.n == len(PAIRS) and estimate.low <= estimate.value <= estimate.high


@needs_bert_score
def test_idf_weights_match_direct_computation(tiny_bert):
    from safemerge.evaluation.tasks.bertscore import BertScoreScorer

    result = BertScoreScorer(model=str(tiny_bert), layer=LAYER, idf=True).score(
        items_for(PAIRS), [[cand] for cand, _ in PAIRS])
    expected = direct_scores(tiny_bert, PAIRS, idf_refs=[ref for _, ref in PAIRS])
    for record, (p, r, f) in zip(result.per_item, expected):
        assert (record["precision"], record["recall"], record["f1"]) == pytest.approx((p, r, f), abs=1e-5)


@needs_bert_score
def test_empty_responses_score_zero_and_leave_others_alone(tiny_bert):
    from safemerge.evaluation.tasks.bertscore import BertScoreScorer

    pairs = [("   ", "the cat sat"), ("a dog sat on the mat", "the cat sat on the mat")]
    result = BertScoreScorer(model=str(tiny_bert), layer=LAYER).score(items_for(pairs), [["   "], [pairs[1][0]]])
    assert result.per_item[0] == {"id": "q0", "f1": 0.0, "precision": 0.0, "recall": 0.0}
    assert result.per_item[1]["f1"] == pytest.approx(direct_scores(tiny_bert, pairs[1:])[0][2], abs=1e-5)
    assert BertScoreScorer(model=str(tiny_bert), layer=LAYER).score(items_for(pairs[:1]), [[]]).per_item[0]["f1"] == 0


@needs_bert_score
def test_bad_settings_are_config_errors(tiny_bert, tmp_path):
    from safemerge.evaluation.tasks.bertscore import BertScoreScorer

    items, responses = items_for(PAIRS[:1]), [[PAIRS[0][0]]]
    with pytest.raises(ConfigError, match="layer 7 is out of range"):
        BertScoreScorer(model=str(tiny_bert), layer=7).score(items, responses)
    with pytest.raises(ConfigError, match="no rescaling baseline"):
        BertScoreScorer(model=str(tiny_bert), layer=LAYER, rescale_with_baseline=True)
    with pytest.raises(ConfigError, match="could not be loaded"):
        BertScoreScorer(model=str(tmp_path / "absent"), layer=LAYER).score(items, responses)


def test_missing_package_is_a_config_error(monkeypatch):
    from safemerge.evaluation.tasks.bertscore import BertScoreScorer

    monkeypatch.setitem(sys.modules, "bert_score", None)  # what an environment without it looks like
    with pytest.raises(ConfigError, match=r"pip install 'safemerge\[bertscore\]'"):
        BertScoreScorer()
