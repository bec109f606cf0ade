"""How token sequences are framed; shared by training, validation and decoding."""
from __future__ import annotations

import numpy as np


def source_ids(tag_id: int, tokens, eos_id: int) -> np.ndarray:
    """Encoder input: ``<2xx>`` target-language tag, the sentence, ``</s>``."""
    return np.concatenate([[tag_id], np.asarray(tokens, dtype=np.int64), [eos_id]]).astype(np.int64)


def target_ids(tokens, bos_id: int, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Decoder input ``<s> y`` and output ``y </s>`` (teacher forcing)."""
    t = np.asarray(tokens, dtype=np.int64)
    return np.concatenate([[bos_id], t]), np.concatenate([t, [eos_id]])
