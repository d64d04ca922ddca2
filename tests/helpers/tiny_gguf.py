"""A tiny random Llama as a GGUF file (the sizes of conftest's TINY, float32 tensors, a BPE
vocabulary w0..w210 without merges), written with gguf-py. Loading it goes through transformers'
GGUF path, which talks on stderr as the embedded models' does: the Llama tokenizer's legacy
notice, "building merges on the fly" with its bar, and the tensor conversion bar."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_tiny_gguf(path: Path, sizes: dict, seed: int = 0) -> Path:
    """sizes: conftest.TINY (hidden_size, intermediate_size, layers, heads, vocab, ...)."""
    import gguf
    rng = np.random.default_rng(seed)
    D, F, L = sizes["hidden_size"], sizes["intermediate_size"], sizes["num_hidden_layers"]
    H, KV, V = sizes["num_attention_heads"], sizes["num_key_value_heads"], sizes["vocab_size"]
    hd = D // H
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(sizes["max_position_embeddings"])
    w.add_embedding_length(D)
    w.add_block_count(L)
    w.add_feed_forward_length(F)
    w.add_head_count(H)
    w.add_head_count_kv(KV)
    w.add_rope_dimension_count(hd)
    w.add_rope_freq_base(sizes["rope_theta"])
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"w{i}" for i in range(V)])
    w.add_token_scores([0.0] * V)
    w.add_token_types([3 if i < 3 else 1 for i in range(V)])    # 3: control (w0 unk, w1 bos, w2 eos)
    w.add_unk_token_id(0)
    w.add_bos_token_id(sizes["bos_token_id"])
    w.add_eos_token_id(sizes["eos_token_id"])

    def rand(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)
    w.add_tensor("token_embd.weight", rand(V, D))
    w.add_tensor("output_norm.weight", np.ones(D, np.float32))
    w.add_tensor("output.weight", rand(V, D))
    for l in range(L):
        p = f"blk.{l}."
        for name, shape in (("attn_q", (H * hd, D)), ("attn_k", (KV * hd, D)), ("attn_v", (KV * hd, D)),
                            ("attn_output", (D, H * hd)), ("ffn_gate", (F, D)), ("ffn_up", (F, D)),
                            ("ffn_down", (D, F))):
            w.add_tensor(p + name + ".weight", rand(*shape))
        w.add_tensor(p + "attn_norm.weight", np.ones(D, np.float32))
        w.add_tensor(p + "ffn_norm.weight", np.ones(D, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)
