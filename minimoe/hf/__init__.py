"""transformers interop, both ways: ``from_hf(hf_model) -> Transformer`` and ``to_hf(model) -> hf model``.

``convert`` dispatches on the model family; ``llama`` holds the Llama 3 weight and config mapping shared by every
family; ``moe_models`` adds Mixtral, Qwen3-MoE and OLMoE; ``moe_blocks`` converts single MoE blocks of those and
of DeepSeek-V3 and Llama 4; ``checkpoint`` loads a local checkpoint with its tokenizer (``minimoe trace --hf``).
Conversions follow the tensors and modules where a config flag disagrees with them (``trust``).
Chapters 1 and 2 check every conversion against transformers' own logits.
"""

from minimoe.hf.convert import FAMILIES, config_from_hf, config_to_hf, family_of, from_hf, load_hf, to_hf
from minimoe.hf.moe_blocks import (moe_block_state_to_hf, moe_config_from_hf, moe_config_from_hf_block,
                                   moe_config_of_block, moe_from_hf_block)

__all__ = ["FAMILIES", "config_from_hf", "config_to_hf", "family_of", "from_hf", "load_hf",
           "moe_block_state_to_hf", "moe_config_from_hf", "moe_config_from_hf_block", "moe_config_of_block",
           "moe_from_hf_block", "to_hf"]
