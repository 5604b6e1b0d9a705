"""The tiny random Llama of the engine-run scripts: one builder, the shapes they need.

2 layers, 4 query heads and 2 KV heads of ``head_dim``, hidden 4·head_dim, MLP 8·head_dim, vocab 256, untied
embeddings, HF's default init (std 0.02) from seed 0, bf16 on disk.
"""
import torch

VOCAB = 256


def build_tiny_llama(path: str, *, head_dim: int = 64, max_positions: int = 1024,
                     attn_weight_gain: float = 1.0) -> None:
    """Write the model to ``path``. ``attn_weight_gain`` scales the q/k/v/o weights: at HF's init the attention
    logits have std ~0.1 and attention is nearly uniform, so errors in it hardly move the tokens (the int8 KV tests
    use 3: see int8_kv_engine_run.ATTN_WEIGHT_GAIN)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=4 * head_dim, intermediate_size=8 * head_dim, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim, max_position_embeddings=max_positions,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    if attn_weight_gain != 1.0:
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                    getattr(layer.self_attn, proj).weight.mul_(attn_weight_gain)
    model.to(torch.bfloat16).save_pretrained(path)
