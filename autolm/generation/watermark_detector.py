"""WatermarkDetector: transformers' z-score test for the green-list watermark (watermark.WatermarkingConfig). It
replays the generator's green lists over a text's n-grams and counts how many tokens are green. SynthID's Bayesian
detector (a trained classifier) is not here."""

from __future__ import annotations

import collections
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from ..errors import GenerationError
from .watermark import WatermarkingConfig, WatermarkLogitsProcessor, as_watermarking_config


@dataclass
class WatermarkDetectorOutput:
    """Per row of the batch (numpy arrays): tokens scored, green tokens, their fraction, the z-score, its one-sided
    p-value, the prediction (z > threshold) and the confidence (1 - p)."""

    num_tokens_scored: np.ndarray | None = None
    num_green_tokens: np.ndarray | None = None
    green_fraction: np.ndarray | None = None
    z_score: np.ndarray | None = None
    p_value: np.ndarray | None = None
    prediction: np.ndarray | None = None
    confidence: np.ndarray | None = None


class WatermarkDetector:
    """Detects the green-list watermark in token ids. It needs what generation used: the model config (for
    vocab_size and bos_token_id), the device (the green lists are drawn there) and the same watermarking config.
    With ignore_repeated_ngrams each distinct n-gram counts once; max_cache_size bounds the cache of green-list
    look-ups."""

    def __init__(
        self,
        model_config,
        device,
        watermarking_config: WatermarkingConfig | dict,
        ignore_repeated_ngrams: bool = False,
        max_cache_size: int = 128,
    ):
        config = as_watermarking_config(watermarking_config)
        if not isinstance(config, WatermarkingConfig):
            raise GenerationError(
                "WatermarkDetector detects WatermarkingConfig's green-list watermark, "
                f"got {type(config).__name__} (SynthID's Bayesian detector is not in autolm)"
            )
        config.validate()
        encoder_decoder = getattr(model_config, "is_encoder_decoder", False)
        self.bos_token_id = (
            model_config.decoder_start_token_id if encoder_decoder else model_config.bos_token_id
        )
        self.greenlist_ratio = config.greenlist_ratio
        self.ignore_repeated_ngrams = ignore_repeated_ngrams
        self.processor = WatermarkLogitsProcessor(model_config.vocab_size, device, **config.to_dict())
        self._green = lru_cache(maxsize=max_cache_size)(self._is_green)

    def _is_green(self, prefix: tuple[int, ...], target: int, device: str) -> bool:
        ids = torch.tensor(prefix, dtype=torch.long, device=device)
        return bool((self.processor._get_greenlist_ids(ids) == target).any())

    def _score_ngrams_in_passage(self, input_ids: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Tokens scored and green tokens per row: every n-gram (context_width + 1 tokens, or context_width with
        'selfhash') scores its last token."""
        selfhash = int(self.processor.seeding_scheme == "selfhash")
        n = self.processor.context_width + 1 - selfhash
        scored, green = np.zeros(input_ids.shape[0]), np.zeros(input_ids.shape[0])
        device = str(input_ids.device)
        for row, ids in enumerate(input_ids.tolist()):
            counts = collections.Counter(tuple(ids[i : i + n]) for i in range(len(ids) - n + 1))
            hits = {g: self._green(g if selfhash else g[:-1], g[-1], device) for g in counts}
            if self.ignore_repeated_ngrams:
                scored[row], green[row] = len(counts), sum(hits.values())
            else:
                scored[row] = sum(counts.values())
                green[row] = sum(freq * hits[g] for g, freq in counts.items())
        return scored, green

    def _compute_z_score(self, green_token_count: np.ndarray, total_num_tokens: np.ndarray) -> np.ndarray:
        expected = self.greenlist_ratio
        return (green_token_count - expected * total_num_tokens) / np.sqrt(
            total_num_tokens * expected * (1 - expected)
        )

    def _compute_pval(self, x, loc=0, scale=1) -> np.ndarray:
        z = (x - loc) / scale
        return 0.5 * torch.special.erfc(torch.as_tensor(z / np.sqrt(2))).numpy()

    def __call__(
        self, input_ids: torch.Tensor, z_threshold: float = 3.0, return_dict: bool = False
    ) -> WatermarkDetectorOutput | np.ndarray:
        """Per row: True where the z-score of the green count is above z_threshold; with return_dict the whole
        WatermarkDetectorOutput. A leading BOS (on every row or none) is dropped; pass the new tokens only, the
        prompt dilutes the count."""
        if input_ids.dim() != 2:
            raise GenerationError(f"input_ids must be (batch, length), got {tuple(input_ids.shape)}")
        bos = self.bos_token_id
        has_bos = (
            input_ids[:, 0] == bos if bos is not None else torch.zeros_like(input_ids[:, 0], dtype=torch.bool)
        )
        if bool(has_bos.any()) != bool(has_bos.all()):
            raise GenerationError(
                "input_ids: some rows start with the BOS token and some do not; tokenize every row alike"
            )
        if bool(has_bos.all()):
            input_ids = input_ids[:, 1:]
        width = self.processor.context_width
        if input_ids.shape[-1] - width < 1:
            raise GenerationError(
                f"input_ids must have at least one token to score after the first {width} "
                f"(context_width), got {input_ids.shape[-1]} tokens"
            )
        scored, green = self._score_ngrams_in_passage(input_ids)
        z_score = self._compute_z_score(green, scored)
        prediction = z_score > z_threshold
        if not return_dict:
            return prediction
        p_value = self._compute_pval(z_score)
        return WatermarkDetectorOutput(
            num_tokens_scored=scored,
            num_green_tokens=green,
            green_fraction=green / scored,
            z_score=z_score,
            p_value=p_value,
            prediction=prediction,
            confidence=1 - p_value,
        )
