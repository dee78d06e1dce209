"""BERTScore F1 of each item's first response against its reference, through the bert-score package.

The scorer loads its model lazily (on the first call of score), so a task can be configured without
loading a 750M-parameter DeBERTa. Works offline with a local model directory: bert-score's
``model_type`` accepts a path, and the layer is always given explicitly.

Under transformers 5, bert-score 0.3.13 fails on empty strings (it calls the tokenizer method
``build_inputs_with_special_tokens``, which transformers 5 removed); bert-score itself scores an empty
candidate or reference as 0, so this module scores those pairs as 0 without handing them over.
"""

from __future__ import annotations

import importlib.util
import math
import warnings
from collections.abc import Sequence
from pathlib import Path

from safemerge.errors import ConfigError
from safemerge.evaluation.stats import bootstrap_mean
from safemerge.evaluation.tasks.base import TaskItem, TaskScore

DEFAULT_MODEL = "microsoft/deberta-xlarge-mnli"
DEFAULT_LAYER = 40  # bert-score's tuned layer for deberta-xlarge-mnli
MISSING_PACKAGE = "BERTScore needs the bert-score package: pip install 'safemerge[bertscore]'"
_UNSET_MAX_LENGTH = 10**12  # tokenizers without model_max_length report ~1e30, which bert-score cannot pass on


class BertScoreScorer:
    """Scorer "bertscore": mean F1 over items with a bootstrap interval; no baseline rescaling by default.

    ``rescale_with_baseline`` needs the baseline table bert-score ships for known Hub models (for
    ``lang``); a local directory has none, and is rejected when rescaling is asked for.
    """

    name = "bertscore"

    def __init__(self, model: str = DEFAULT_MODEL, layer: int = DEFAULT_LAYER, batch_size: int = 16,
                 device: str = "cpu", idf: bool = False, rescale_with_baseline: bool = False, lang: str = "en"):
        if importlib.util.find_spec("bert_score") is None:
            raise ConfigError(MISSING_PACKAGE)
        if batch_size < 1:
            raise ConfigError(f"BERTScore batch_size must be at least 1, got {batch_size}")
        self.model = model
        self.layer = layer
        self.batch_size = batch_size
        self.device = device
        self.idf = idf
        self.rescale_with_baseline = rescale_with_baseline
        self.lang = lang
        self._scorer = None
        if rescale_with_baseline:
            _check_baseline(model, lang)

    def score(self, items: Sequence[TaskItem], responses: Sequence[Sequence[str]]) -> TaskScore:
        if len(items) != len(responses):
            raise ValueError(f"{len(items)} items but {len(responses)} response lists")
        candidates = [samples[0] if samples else "" for samples in responses]
        references = [item.reference for item in items]
        precision, recall, f1 = self._score_pairs(candidates, references)
        per_item = [{"id": item.id, "f1": f, "precision": p, "recall": r}
                    for item, p, r, f in zip(items, precision, recall, f1)]
        return TaskScore(metrics={"bertscore_f1": bootstrap_mean(f1)}, primary="bertscore_f1", per_item=per_item)

    def _score_pairs(self, candidates: list[str], references: list[str]) -> tuple[list[float], ...]:
        """(precision, recall, f1) per pair; pairs with an empty side score 0, as in bert-score."""
        n = len(candidates)
        precision, recall, f1 = [0.0] * n, [0.0] * n, [0.0] * n
        scored = [i for i in range(n) if candidates[i].strip() and references[i].strip()]
        if not scored:
            return precision, recall, f1
        scorer = self._load()
        cands = [candidates[i] for i in scored]
        refs = [references[i] for i in scored]
        if self.idf:
            with warnings.catch_warnings():  # "overwriting the previous importance weights" is intended
                warnings.simplefilter("ignore")
                scorer.compute_idf(refs)  # idf over this call's references, as bert_score.score does
        p, r, f = scorer.score(cands, refs, batch_size=self.batch_size)
        for slot, i in enumerate(scored):
            precision[i], recall[i], f1[i] = (_zero_if_nan(float(v[slot])) for v in (p, r, f))
        return precision, recall, f1

    def _load(self):
        if self._scorer is None:
            self._check_layer()
            from bert_score import BERTScorer

            try:
                self._scorer = BERTScorer(
                    model_type=self.model, num_layers=self.layer, device=self.device, idf=self.idf,
                    lang=self.lang if self.rescale_with_baseline else None,
                    rescale_with_baseline=self.rescale_with_baseline, nthreads=0, use_fast_tokenizer=True)
            except OSError as error:
                raise ConfigError(f"BERTScore model {self.model!r} could not be loaded ({error}); "
                                  "give a local model directory or a Hub id available offline") from error
            if self._scorer._tokenizer.model_max_length > _UNSET_MAX_LENGTH:
                raise ConfigError(f"the tokenizer of BERTScore model {self.model!r} has no model_max_length: "
                                  "set it (e.g. 512) in its tokenizer_config.json")
        return self._scorer

    def _check_layer(self) -> None:
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(self.model)
        except OSError as error:
            raise ConfigError(f"BERTScore model {self.model!r} could not be loaded ({error}); "
                              "give a local model directory or a Hub id available offline") from error
        layers = getattr(config, "num_hidden_layers", None)
        if layers is not None and not 0 <= self.layer <= layers:
            raise ConfigError(f"BERTScore layer {self.layer} is out of range for {self.model!r}, "
                              f"which has {layers} layers: choose 0..{layers}")


def _zero_if_nan(value: float) -> float:
    """With idf, a sentence made only of words found in every reference weighs 0 in total: bert-score
    reports its precision or recall as nan (and F1 as 0); 0 keeps the records JSON-clean."""
    return 0.0 if math.isnan(value) else value


def _check_baseline(model: str, lang: str) -> None:
    package = Path(importlib.util.find_spec("bert_score").origin).parent  # found without the slow import
    table = package / "rescale_baseline" / lang / f"{model}.tsv"
    if not table.is_file():
        raise ConfigError(f"bert-score ships no rescaling baseline for model {model!r} and lang {lang!r}: "
                          "set rescale_with_baseline to false or use a model it has a baseline for")
