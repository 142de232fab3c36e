"""Rollout-length curriculum (OPDLM.md §7) against exact arithmetic, and the cosine option."""

import math
from fractions import Fraction

from ar2dlm_ray.config import CurriculumConfig
from ar2dlm_ray.curriculum import generation_length


def test_linear_curriculum_is_the_papers_formula():
    cfg = CurriculumConfig(min_len=100, max_len=4000, warmup_steps=10)
    for s in range(15):
        want = min(4000, 100 + math.floor(Fraction(s, 10) * 3900))
        assert generation_length(s, cfg, 0) == want
    assert generation_length(3, CurriculumConfig(enabled=False), 77) == 77


def test_cosine_curriculum_starts_slow_and_ends_at_max():
    lin = CurriculumConfig(min_len=100, max_len=4000, warmup_steps=100)
    cos = CurriculumConfig(min_len=100, max_len=4000, warmup_steps=100, schedule="cosine")
    lengths = [generation_length(s, cos, 0) for s in range(130)]
    for s, got in enumerate(lengths):
        x = min(1.0, s / 100)
        assert abs(got - (100 + (1 - math.cos(math.pi / 2 * x)) * 3900)) <= 1.0 + 1e-9
        assert got <= generation_length(s, lin, 0)
    assert lengths == sorted(lengths) and lengths[0] == 100 and lengths[100:] == [4000] * 30
    assert lengths[50] < 0.35 * 4000  # halfway through the ramp, under a third of the way
