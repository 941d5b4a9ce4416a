"""Small local models for the ``lowrank finetune`` tests: nothing here downloads anything.

* ``make_tokenizer(directory)``: a byte-level BPE tokenizer trained in-process on the built-in data
  set's text (about 500 tokens), saved as an HF tokenizer.
* ``tiny_llama(seed)`` / ``make_tiny_llama(directory, seed)``: a 2-layer LlamaForCausalLM with random,
  deliberately large weights (so attention is far from uniform and a wrong weight layout shows in
  the logits), in memory or saved as an HF model directory with the tokenizer beside it.
* ``write_tiny_gguf(path, seed)``: the same model and tokenizer as a GGUF file, written the way
  llama.cpp's converter writes a Llama (tensor names, Q/K row permutation, "gpt2" BPE tokenizer), so
  transformers' GGUF loader reads back exactly ``tiny_llama(seed)``.

Imported by the tests as a plain module (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import torch

EOS = "<|endoftext|>"
VOCAB_SIZE = 512  # asked of the trainer; the result is this or a little less (no more merges to learn)

# The tiny model's shape (head_dim 16).
HIDDEN, LAYERS, HEADS, KV_HEADS, INTERMEDIATE, MAX_POSITIONS = 64, 2, 4, 2, 128, 256
ROPE_THETA, RMS_EPS = 10000.0, 1e-5
WEIGHT_STD = 0.2  # large on purpose: with the usual 0.02 attention is ~uniform and Q/K mistakes hide

_GENERIC = [
    "The quick brown fox jumps over the lazy dog.",
    "Fine-tuning adapts a pretrained model to a new task with few parameters.",
    "A low-rank adapter adds two small matrices to a frozen weight.",
    "Numbers like 12, 345 and 6789 appear in text too; so do punctuation marks: (a), [b], {c}!",
    "Hello world\nSecond line\n\n  indented line with    spaces\ttab",
    "Question: What is two plus two?\nAnswer: Four",
]


def _corpus() -> list[str]:
    from lowrank.finetune.data import builtin

    texts = list(_GENERIC)
    for seed in (0, 1, 2):
        ds = builtin(seed=seed)
        texts += [e.prompt + e.completion for e in ds.train + ds.eval]
    return texts


@functools.lru_cache(maxsize=1)
def _backend_json() -> str:
    """The trained ``tokenizers.Tokenizer`` as JSON (trained once per process; training is deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    # GPT-2's byte-level pre-tokenizer (its regex, no prefix space): the same one transformers'
    # GPT2Tokenizer builds for a GGUF "gpt2" vocabulary, so both encode text identically.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[EOS],  # id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: any text encodes
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    return tok.to_str()


def _fast_tokenizer():
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_backend_json()),
        bos_token=EOS,
        eos_token=EOS,
        pad_token=EOS,
        unk_token=EOS,
        add_bos_token=False,
        add_eos_token=False,
    )


def make_tokenizer(directory: str | Path):
    """Train (once per process) and save the tokenizer in ``directory``; returns the tokenizer."""
    tokenizer = _fast_tokenizer()
    tokenizer.save_pretrained(str(directory))
    return tokenizer


def tiny_config(vocab_size: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        intermediate_size=INTERMEDIATE,
        max_position_embeddings=MAX_POSITIONS,
        rms_norm_eps=RMS_EPS,
        rope_theta=ROPE_THETA,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )


def tiny_llama(seed: int = 0):
    """``(model, tokenizer)``: the tiny Llama in memory, fp32, eval mode, weights fixed by ``seed``."""
    from transformers import LlamaForCausalLM

    tokenizer = _fast_tokenizer()
    config = tiny_config(len(tokenizer))
    with torch.random.fork_rng(devices=[]):  # leaves the caller's RNG as it was
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):  # not all ones, so a norm mistake shows too
                    p.copy_(1.0 + 0.1 * torch.randn_like(p))
                else:
                    p.normal_(0.0, WEIGHT_STD)
    return model.float().eval(), tokenizer


def make_tiny_llama(directory: str | Path, seed: int = 0) -> Path:
    """Save ``tiny_llama(seed)`` (safetensors) and its tokenizer in ``directory``; returns it as a Path."""
    directory = Path(directory)
    model, tokenizer = tiny_llama(seed)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(str(directory))
    return directory


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute`` for q/k rows: per head, from HF's rotate-half layout (first
    half of the rotary pairs, then the second) to interleaved pairs. transformers' GGUF loader undoes
    it (``LlamaTensorProcessor._reverse_permute_weights``); ``n_head`` is the KV head count for k."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(model) -> dict[str, np.ndarray]:
    """``{llama.cpp name: fp32 array in torch's [out, in] order}`` for a LlamaForCausalLM."""
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    cfg = model.config
    out = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"]}
    if not cfg.tie_word_embeddings:
        out["output.weight"] = sd["lm_head.weight"]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        out |= {
            f"blk.{i}.attn_norm.weight": sd[p + "input_layernorm.weight"],
            f"blk.{i}.attn_q.weight": _llama_cpp_permute(sd[p + "self_attn.q_proj.weight"], cfg.num_attention_heads),
            f"blk.{i}.attn_k.weight": _llama_cpp_permute(sd[p + "self_attn.k_proj.weight"], cfg.num_key_value_heads),
            f"blk.{i}.attn_v.weight": sd[p + "self_attn.v_proj.weight"],
            f"blk.{i}.attn_output.weight": sd[p + "self_attn.o_proj.weight"],
            f"blk.{i}.ffn_norm.weight": sd[p + "post_attention_layernorm.weight"],
            f"blk.{i}.ffn_gate.weight": sd[p + "mlp.gate_proj.weight"],
            f"blk.{i}.ffn_up.weight": sd[p + "mlp.up_proj.weight"],
            f"blk.{i}.ffn_down.weight": sd[p + "mlp.down_proj.weight"],
        }
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def write_tiny_gguf(path: str | Path, seed: int = 0, name: str = "tiny-llama") -> Path:
    """Write ``tiny_llama(seed)`` with its tokenizer as an F32 GGUF file at ``path``; returns it as a Path."""
    import gguf

    path = Path(path)
    model, tokenizer = tiny_llama(seed)
    cfg = model.config
    backend = tokenizer.backend_tokenizer
    vocab = backend.get_vocab(with_added_tokens=True)
    tokens = sorted(vocab, key=vocab.get)
    assert [vocab[t] for t in tokens] == list(range(len(tokens))), "token ids must be 0..n-1"
    merges = json.loads(backend.to_str())["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]  # newer tokenizers: [a, b] pairs
    eos_id = vocab[EOS]

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name)  # transformers reads a llama file named "...mistral..." as Mistral
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)  # -> config.head_dim
    writer.add_rope_freq_base(ROPE_THETA)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(len(tokens))
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    writer.add_tokenizer_model("gpt2")  # byte-level BPE -> transformers' GPT2Tokenizer
    writer.add_tokenizer_pre("gpt-2")  # a name with no split regex of its own: GPT-2's is kept
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t == EOS else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(eos_id)
    writer.add_eos_token_id(eos_id)
    writer.add_pad_token_id(eos_id)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)

    for tensor_name, array in gguf_tensors(model).items():
        writer.add_tensor(tensor_name, array)  # shape in torch order; gguf reverses it for ggml

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
