"""The model: the Transformer (architecture only), its pipeline form, and its parameter groups."""
from megavac.model.transformer import (PRESETS, DecoderLayer, EncoderLayer, ModelConfig, Transformer, embed_tokens,
                                       init_embedding, key_mask)

__all__ = ["DecoderLayer", "EncoderLayer", "ModelConfig", "PRESETS", "Transformer", "embed_tokens", "init_embedding",
           "key_mask"]
