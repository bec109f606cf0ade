"""The model: the Transformer (architecture only), its pipeline form, and its parameter groups."""
from megavac.model.transformer import (EXPERT_MODULES, PRESETS, DecoderLayer, EncoderLayer, FamilyExperts, ModelConfig,
                                       Transformer, embed_tokens, init_embedding, key_mask, layer_norm,
                                       parse_expert_modules)

__all__ = ["DecoderLayer", "EXPERT_MODULES", "EncoderLayer", "FamilyExperts", "ModelConfig", "PRESETS", "Transformer",
           "embed_tokens", "init_embedding", "key_mask", "layer_norm", "parse_expert_modules"]
