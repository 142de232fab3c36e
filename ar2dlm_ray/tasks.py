"""Synthetic tasks with exactly checkable answers: two-digit addition and a table of made-up facts.

They measure whether a converted student keeps what its teacher knew: the micro teacher is pretrained
on the train split; arithmetic is evaluated on operand pairs never seen in training (generalisation),
facts on the memorised table itself (retention).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"

# Fraction of the 100 x 100 operand pairs never shown in pretraining.
ARITH_HELDOUT_FRACTION = 0.1

_ONSETS = ["b", "br", "d", "dr", "f", "g", "gl", "k", "kr", "l", "m", "n", "p", "qu", "r", "s", "t", "th",
           "v", "z", "zh", "x"]
_VOWELS = ["a", "e", "i", "o", "u", "ae", "ei", "ou"]
_CODAS = ["", "", "n", "r", "l", "s", "th", "m", "x"]
_COUNTRY_ENDS = ["ia", "land", "ora", "istan", "mark", "ovia"]


@dataclass(frozen=True)
class TaskExample:
    task: str  # "arith" or "facts"
    prompt: str
    answer: str

    @property
    def document(self) -> str:
        """What pretraining sees (the tokenizer appends nothing; the trainer appends EOS)."""
        return self.prompt + self.answer


def _name(rng: random.Random, syllables: int, end: str = "") -> str:
    word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables))
    return (word + end).capitalize()


def _arith(a: int, b: int) -> TaskExample:
    return TaskExample("arith", f"{a}+{b}=", str(a + b))


class TaskSuite:
    """Deterministic given (num_facts, seed)."""

    tasks = ("arith", "facts")

    def __init__(self, num_facts: int, seed: int):
        if num_facts <= 0:
            raise ValueError(f"num_facts must be positive (got {num_facts})")
        self.num_facts = num_facts
        self.seed = seed
        rng = random.Random(f"tasks-{seed}")
        pairs = [(a, b) for a in range(100) for b in range(100)]
        rng.shuffle(pairs)
        n_held = int(len(pairs) * ARITH_HELDOUT_FRACTION)
        self.heldout_pairs = sorted(pairs[:n_held])
        self.train_pairs = sorted(pairs[n_held:])

        # Distinct countries and distinct capitals, so every prompt has exactly one answer.
        countries: list[str] = []
        capitals: list[str] = []
        seen: set[str] = set()
        while len(countries) < num_facts:
            c = _name(rng, rng.choice([1, 2]), rng.choice(_COUNTRY_ENDS))
            if c not in seen:
                seen.add(c)
                countries.append(c)
        while len(capitals) < num_facts:
            c = _name(rng, rng.choice([2, 3]))
            if c not in seen:
                seen.add(c)
                capitals.append(c)
        self.facts = [TaskExample("facts", f"The capital of {c} is", " " + cap) for c, cap in zip(countries, capitals)]

    def train_examples(self) -> list[TaskExample]:
        return [_arith(a, b) for a, b in self.train_pairs] + list(self.facts)

    def _mix(self, arith_pairs, n: int, seed: int) -> list[TaskExample]:
        # Half arithmetic, half facts (round-robin), sampled without replacement while the pool lasts.
        rng = random.Random(f"mix-{self.seed}-{seed}")
        pools = {"arith": [_arith(a, b) for a, b in arith_pairs], "facts": list(self.facts)}
        order = {k: [] for k in pools}
        out = []
        for i in range(n):
            task = self.tasks[i % 2]
            if not order[task]:
                order[task] = rng.sample(pools[task], len(pools[task]))
            out.append(order[task].pop())
        rng.shuffle(out)
        return out

    def heldout_examples(self, n: int, seed: int) -> list[TaskExample]:
        """Evaluation prompts: arithmetic pairs never in training, plus (memorised) facts."""
        return self._mix(self.heldout_pairs, n, seed)

    def validation_examples(self, n: int, seed: int, test: list[TaskExample]) -> list[TaskExample]:
        """Prompts for choosing settings: held-out arithmetic pairs that `test` does not use, plus facts.
        The facts are the same table (retention has no held-out facts to split)."""
        used = {e.prompt for e in test if e.task == "arith"}
        pairs = [p for p in self.heldout_pairs if _arith(*p).prompt not in used]
        return self._mix(pairs, n, seed + 20_000)

    def train_prompts(self, n: int, seed: int) -> list[TaskExample]:
        """Distillation prompts from the train split (no held-out arithmetic pair leaks into training)."""
        return self._mix(self.train_pairs, n, seed + 10_000)


def is_correct(example: TaskExample, generated_text: str) -> bool:
    """Exact match of the answer at the very start of the generation, which must then end
    (end of text, newline, or EOS; padding after EOS is the sampler's business)."""
    if not generated_text.startswith(example.answer):
        return False
    rest = generated_text[len(example.answer):]
    return rest == "" or rest.startswith(("\n", EOS_TOKEN, PAD_TOKEN))
