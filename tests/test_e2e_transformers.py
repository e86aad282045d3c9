"""Acceptance test of the foundation: SmolLM2-135M-Instruct through `pumice convert` and the native
runtime, against Hugging Face transformers in float32 on the CPU.

1. `dense`: greedy continuations of several prompts identical token for token (64 tokens), and
   last-position logits within 1e-3 relative error (‖a − b‖ / ‖b‖).
2. `rtn` 8-bit: the same top-1 token on at least 95% of the positions of a real text.
3. perplexity through the `pumice perplexity` code path within 0.5% of transformers' on the
   same windows.
4. chat: Generator.chat's prompt tokens equal `apply_chat_template(..., add_generation_prompt=True)`.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from pumice import Generator

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a small village by the sea,",
    "Photosynthesis is the process by which",
]
GREEDY_TOKENS = 64
PPL_WINDOW = 1024
PPL_WINDOWS = 4

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference(smollm2_dir):
    """transformers' float32 model and tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    model.eval()
    return model, AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def dense_generator(convert_smollm2):
    with Generator(convert_smollm2("dense"), n_ctx=2048) as generator:
        yield generator


def reference_greedy(model, ids: list[int], steps: int) -> list[int]:
    """Greedy decoding with the KV cache, EOS not special (generate()'s min_new_tokens would
    mask EOS logits instead, changing the argmax)."""
    import torch
    tokens: list[int] = []
    past = None
    inputs = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(steps):
            out = model(inputs, past_key_values=past, use_cache=True)
            past = out.past_key_values
            tokens.append(int(out.logits[0, -1].argmax()))
            inputs = torch.tensor([[tokens[-1]]])
    return tokens


def reference_logits(model, ids: list[int]) -> np.ndarray:
    import torch
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().numpy()


def test_dense_greedy_continuations_match(reference, dense_generator):
    model, tokenizer = reference
    for prompt in PROMPTS:
        ids = tokenizer(prompt)["input_ids"]
        assert dense_generator.encode_prompt(prompt) == ids
        expected = reference_greedy(model, ids, GREEDY_TOKENS)
        ours = dense_generator.generate(ids, max_tokens=GREEDY_TOKENS, temperature=0, ignore_eos=True)
        assert ours.token_ids == expected, (
            f"{prompt!r}: first difference at token "
            f"{next(i for i, (a, b) in enumerate(zip(ours.token_ids, expected)) if a != b)}")
        assert ours.text == tokenizer.decode(ids + expected, skip_special_tokens=True)[len(prompt):]


def test_dense_last_position_logits_match(reference, dense_generator):
    model, tokenizer = reference
    session = dense_generator.model.new_session(512)
    for prompt in PROMPTS:
        ids = tokenizer(prompt)["input_ids"]
        session.truncate(0)
        ours = session.forward(ids).astype(np.float64)
        expected = reference_logits(model, ids)[-1]
        error = np.linalg.norm(ours - expected) / np.linalg.norm(expected)
        print(f"e2e: dense logits relative error {error:.2e} ({prompt!r})")
        assert error <= 1e-3, f"{prompt!r}: relative error {error:.2e}"
    session.close()


def test_rtn8_top1_agreement_on_real_text(reference, convert_smollm2, english_text):
    from pumice.runtime.native import NativeModel
    model, tokenizer = reference
    ids = tokenizer(english_text[:6000])["input_ids"][:512]
    expected = reference_logits(model, ids).argmax(axis=1)
    with NativeModel(convert_smollm2("rtn", bits=8, group_size=64)) as rtn:
        ours = rtn.new_session(512).forward(ids, logits_all=True).argmax(axis=1)
    agreement = float((ours == expected).mean())
    print(f"e2e: rtn 8-bit top-1 agreement {agreement:.4f} over {len(ids)} positions")
    assert agreement >= 0.95, f"top-1 agreement {agreement:.3f}"


def reference_perplexity(model, ids: list[int], window: int, windows: int) -> float:
    import torch
    total, count = 0.0, 0
    for w in range(windows):
        chunk = ids[w * window:(w + 1) * window]
        with torch.no_grad():
            logits = model(torch.tensor([chunk])).logits[0].double()
        nll = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(chunk[1:]), reduction="sum")
        total += float(nll)
        count += len(chunk) - 1
    return math.exp(total / count)


def test_perplexity_command_matches_transformers(reference, convert_smollm2, english_text, tmp_path, capsys):
    from pumice.runtime.cli import main
    model, tokenizer = reference
    ids = tokenizer(english_text)["input_ids"]
    expected = reference_perplexity(model, ids, PPL_WINDOW, PPL_WINDOWS)
    text_file = tmp_path / "pydoc.txt"
    text_file.write_text(english_text, encoding="utf-8")
    status = main(["perplexity", str(convert_smollm2("dense")), "--text", str(text_file),
                   "--window", str(PPL_WINDOW), "--max-windows", str(PPL_WINDOWS), "--quiet"])
    output = capsys.readouterr().out
    assert status == 0, output
    ours = float(output.split("perplexity ")[1].split()[0])
    with capsys.disabled():
        print(f"e2e: perplexity pumice {ours:.4f} vs transformers {expected:.4f} "
              f"({abs(ours - expected) / expected:.2e} relative)")
    assert f"over {PPL_WINDOWS * (PPL_WINDOW - 1)} tokens" in output
    assert abs(ours - expected) / expected <= 0.005, f"pumice {ours:.4f} vs transformers {expected:.4f}"


def test_chat_prompt_tokens_match_apply_chat_template(reference, dense_generator):
    _, tokenizer = reference
    conversations = [
        [{"role": "user", "content": "Hello! Who are you?"}],
        [{"role": "system", "content": "You are terse."},
         {"role": "user", "content": "What is 2+2?"},
         {"role": "assistant", "content": "4."},
         {"role": "user", "content": "And times three? Réponds en français 😀"}],
    ]
    for messages in conversations:
        expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if not isinstance(expected, list):  # transformers 5 returns a BatchEncoding
            expected = expected["input_ids"]
        assert dense_generator.chat_prompt(messages) == expected
        result = dense_generator.chat(messages, max_tokens=4, temperature=0)
        assert result.prompt_token_ids == expected
