"""`ar2dlm bench weights` at a tiny size: it runs, reports every field, and each transport leaves the
receiver with exactly the publisher's weights."""

from __future__ import annotations

import json

import pytest
import torch

from ar2dlm_ray.cli import main
from ar2dlm_ray.cluster.bench_weights import _digest, _model, qwen3_shapes


def test_qwen3_shapes_at_full_size():
    shapes = qwen3_shapes(0.6e9)
    # Qwen3-0.6B has 596M parameters: 0.6e9 widens its tensors by 0.3 %.
    assert shapes["embed_tokens"] == (152439, 1027) and shapes["layers_27_down_proj"] == (1027, 3082)
    assert abs(sum(torch.Size(s).numel() for s in shapes.values()) - 0.6e9) < 0.01e9


def test_digest_tells_models_apart():
    # The equality check below rests on this digest; it must see a single changed value.
    shapes = qwen3_shapes(1e5)
    torch.manual_seed(0)
    a, b = _model(shapes, torch.bfloat16, random=True), _model(shapes, torch.bfloat16, random=False)
    b.load_state_dict(a.state_dict())
    assert _digest(a) == _digest(b)
    with torch.no_grad():
        b.layers_3_v_proj.view(-1)[-1] += 1
    assert _digest(a) != _digest(b)


@pytest.mark.slow
def test_bench_weights_tiny(tmp_path, capsys):
    out = tmp_path / "weights.json"
    assert main(["bench", "weights", "--params", "2e6", "--repeats", "1", "--json", "--out", str(out)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert json.loads(out.read_text()) == result
    assert result["params"] > 1.9e6 and result["bytes"] == 2 * result["params"]
    assert result["raw_gloo_gb_s"] > 0
    for name in ("object_store", "collective"):
        m = result[name]
        for key in ("publish_blocks_s", "end_to_end_s", "gb_s", "vs_raw"):
            assert m[key] > 0, (name, key)
        assert m["identical"] is True, f"{name}: the receiver's weights differ from the publisher's"
