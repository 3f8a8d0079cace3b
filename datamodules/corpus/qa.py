"""Templated question families with checkable answers, and the spoken-QA dialogue splits.

Every question belongs to a *family* and a *combination* (its content, e.g. the operand
pair of an addition, or a fact with one phrasing). A stable hash of (seed, family,
combination) marks about 15% of the combinations as held out: training dialogues only use
the others, dev and test only held-out ones, so evaluation asks questions whose content
the models never saw. Dialogues have 1 to 3 turns; a later turn may refer to the previous
answer ("What is that plus two?"), so multi-turn context matters.

A turn is `{"question", "answer", "gold", "family"}`: `answer` is the reference response
in the assistant's style (the stand-in LLM is trained on it), `gold` the short answers the
checker (`datamodules.corpus.answers.check_answer`) accepts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass

from datamodules.corpus.answers import number_to_words as w

HELDOUT_PERCENT = 15
DEFAULT_SPLIT_SIZES = {"train": 1200, "dev": 100, "test": 200}  # dialogues

DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = [
    "January", "February", "March", "April", "May", "June", "July", "August",
    "September", "October", "November", "December",
]  # fmt: skip
ANIMALS = ["cat", "dog", "cow", "horse", "duck", "goat", "sheep", "mouse", "rabbit", "fox", "bear", "frog"]

# The small fact table: (category, subject, answer).
FACTS: list[tuple[str, str, str]] = [
    *[("capital", c, a) for c, a in [
        ("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid"),
        ("Germany", "Berlin"), ("Egypt", "Cairo"), ("Russia", "Moscow"), ("China", "Beijing"),
        ("England", "London"), ("Greece", "Athens"), ("Kenya", "Nairobi"), ("Peru", "Lima"),
    ]],
    *[("color", c, a) for c, a in [
        ("a banana", "yellow"), ("grass", "green"), ("the sky", "blue"), ("snow", "white"),
        ("coal", "black"), ("a tomato", "red"), ("a carrot", "orange"), ("chocolate", "brown"),
        ("a lemon", "yellow"), ("milk", "white"),
    ]],
    *[("legs", c, a) for c, a in [
        ("a spider", "eight"), ("a dog", "four"), ("a bird", "two"), ("an ant", "six"),
        ("a snake", "zero"), ("a cow", "four"), ("a chicken", "two"), ("a bee", "six"),
    ]],
    *[("opposite", c, a) for c, a in [
        ("hot", "cold"), ("up", "down"), ("big", "small"), ("fast", "slow"), ("day", "night"),
        ("happy", "sad"), ("open", "closed"), ("early", "late"), ("full", "empty"), ("light", "dark"),
    ]],
]  # fmt: skip

FACT_PHRASINGS: dict[str, list[tuple[str, str]]] = {
    # category: [(question template, answer template)]; {s} subject, {a} answer
    "capital": [
        ("What is the capital of {s}?", "The capital of {s} is {a}."),
        ("Which city is the capital of {s}?", "The capital of {s} is {a}."),
        ("Can you tell me the capital of {s}?", "The capital of {s} is {a}."),
    ],
    "color": [
        ("What color is {s}?", "{S} is {a}."),
        ("What is the color of {s}?", "{S} is {a}."),
        ("Tell me the color of {s}.", "{S} is {a}."),
    ],
    "legs": [
        ("How many legs does {s} have?", "{S} has {a} legs."),
        ("How many legs has {s} got?", "{S} has {a} legs."),
        ("Tell me how many legs {s} has.", "{S} has {a} legs."),
    ],
    "opposite": [
        ("What is the opposite of {s}?", "The opposite of {s} is {a}."),
        ("Which word means the opposite of {s}?", "The opposite of {s} is {a}."),
        ("Tell me the opposite of {s}.", "The opposite of {s} is {a}."),
    ],
}


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


@dataclass(frozen=True)
class Turn:
    question: str
    answer: str
    gold: tuple[str, ...]
    family: str
    combo: tuple  # the content that decides held-out membership
    value: object = None  # what a follow-up may refer to (a number, a day, a month)

    def as_dict(self) -> dict:
        return {"question": self.question, "answer": self.answer, "gold": list(self.gold), "family": self.family}


def _num_gold(n: int) -> tuple[str, ...]:
    return (str(n),)


# --- the families: each samples a combination, then renders it --------------------------
# A family is a function (rng, previous turn or None) -> Turn | None; None means it does not
# apply (a follow-up after a turn it cannot follow).


def _add(rng: random.Random, prev: Turn | None) -> Turn:
    b = rng.randint(1, 5)
    a = rng.randint(0, 20 - b)
    q = rng.choice(["What is {a} plus {b}?", "How much is {a} plus {b}?", "What do you get when you add {a} and {b}?"])
    return Turn(q.format(a=w(a), b=w(b)), _counting_on(a, b), _num_gold(a + b), "add", (a, b), a + b)


def _counting_on(a: int, b: int) -> str:
    """Addition answered by counting on from `a`: each step a successor seen in training."""
    return f"Counting on from {w(a)}: {_count_steps(a, 1, b)}. {_cap(w(a))} plus {w(b)} is {w(a + b)}."


def _count_steps(start: int, step: int, n: int) -> str:
    """'seven, six, five': the n numbers after `start` going by `step` (+1 or -1)."""
    return ", ".join(w(start + step * i) for i in range(1, n + 1))


def _subtract(rng: random.Random, prev: Turn | None) -> Turn:
    # Small subtrahends, answered by counting back: each step is a predecessor seen in
    # training, so unseen operand pairs are reachable (a one-shot lookup table is not).
    b = rng.randint(1, 5)
    a = rng.randint(b, 20)
    q = rng.choice(["What is {a} minus {b}?", "How much is {a} minus {b}?", "What is {b} taken away from {a}?"])
    answer = f"Counting back from {w(a)}: {_count_steps(a, -1, b)}. {_cap(w(a))} minus {w(b)} is {w(a - b)}."
    return Turn(q.format(a=w(a), b=w(b)), answer, _num_gold(a - b), "subtract", (a, b), a - b)


COMPARE_MAX = 10


def _compare(rng: random.Random, prev: Turn | None) -> Turn:
    # A comparison is a lookup of an order relation (no short steps make it easier for a
    # small model), so its numbers are few and it is drawn more often (FAMILY_WEIGHTS).
    a, b = rng.sample(range(0, COMPARE_MAX + 1), 2)
    kind = rng.choice(["bigger", "smaller"])
    pick = max(a, b) if kind == "bigger" else min(a, b)
    q = rng.choice(["Which is {k}, {a} or {b}?", "Which number is {k}, {a} or {b}?"])
    return Turn(
        q.format(k=kind, a=w(a), b=w(b)), f"{_cap(w(pick))} is {kind}.", _num_gold(pick), "compare", (a, b, kind)
    )


def _cycle_turn(names: list[str], unit: str, rng: random.Random, family: str) -> Turn:
    i = rng.randrange(len(names))
    k = rng.randint(1, 3 if unit == "day" else 2)
    direction = rng.choice(["after", "before"])
    sign = 1 if direction == "after" else -1
    walked = [names[(i + sign * step) % len(names)] for step in range(1, k + 1)]
    if k == 1:
        q = rng.choice([f"What {unit} comes {direction} {{x}}?", f"Which {unit} is {direction} {{x}}?"])
        a = f"The {unit} {direction} {{x}} is {{y}}."
    else:
        q = rng.choice(
            [f"What {unit} is {{k}} {unit}s {direction} {{x}}?", f"Which {unit} comes {{k}} {unit}s {direction} {{x}}?"]
        )
        # The steps are the answer ("Before Thursday come Wednesday, Tuesday and Monday."):
        # each is a neighbour seen in training, so unseen (name, k) pairs are reachable, and
        # the last one named is the answer (no restatement to copy it into).
        a = f"{_cap(direction)} {{x}} come {{steps}}."
    fmt = {"x": names[i], "y": walked[-1], "k": w(k), "steps": ", ".join(walked[:-1]) + " and " + walked[-1]}
    return Turn(q.format(**fmt), a.format(**fmt), (walked[-1],), family, (i, k, direction), walked[-1])


def _weekday(rng: random.Random, prev: Turn | None) -> Turn:
    return _cycle_turn(DAYS, "day", rng, "weekday")


def _month(rng: random.Random, prev: Turn | None) -> Turn:
    return _cycle_turn(MONTHS, "month", rng, "month")


def _count(rng: random.Random, prev: Turn | None) -> Turn:
    n = rng.randint(2, 5)
    items = rng.sample(ANIMALS, n)
    listing = ", ".join(f"a {x}" for x in items[:-1]) + f" and a {items[-1]}"
    q = rng.choice([
        "I have {l}. How many animals do I have?",
        "I saw {l}. How many animals did I see?",
    ]).format(l=listing)  # fmt: skip
    verb = "have" if "have?" in q else "saw"
    return Turn(q, f"You {verb} {w(n)} animals.", _num_gold(n), "count", tuple(items), n)


def _fact(rng: random.Random, prev: Turn | None) -> Turn:
    fact_id = rng.randrange(len(FACTS))
    category, subject, answer = FACTS[fact_id]
    p = rng.randrange(len(FACT_PHRASINGS[category]))
    q, a = FACT_PHRASINGS[category][p]
    fmt = {"s": subject, "S": _cap(subject), "a": answer}
    return Turn(q.format(**fmt), a.format(**fmt), (answer,), "fact", (fact_id, p))


def _followup(rng: random.Random, prev: Turn | None) -> Turn | None:
    """Refers to the previous answer: arithmetic on a number, the next day or month."""
    if prev is None or prev.value is None:
        return None
    if isinstance(prev.value, int):
        r = prev.value
        if r >= 20:
            return None
        b = rng.randint(1, min(5, 20 - r))
        q = rng.choice(["What is that plus {b}?", "And if you add {b} to that?"]).format(b=w(b))
        return Turn(q, _counting_on(r, b), _num_gold(r + b), "followup", ("add", r, b), r + b)
    names, unit = (DAYS, "day") if prev.value in DAYS else (MONTHS, "month")
    i = names.index(prev.value)
    nxt = names[(i + 1) % len(names)]
    q = rng.choice([f"And which {unit} comes after that?", f"What {unit} is after that one?"])
    return Turn(q, f"The {unit} after {prev.value} is {nxt}.", (nxt,), "followup", (unit, i), nxt)


FAMILIES: dict[str, Callable[[random.Random, Turn | None], Turn | None]] = {  # name -> sampler
    "add": _add,
    "subtract": _subtract,
    "compare": _compare,
    "weekday": _weekday,
    "month": _month,
    "count": _count,
    "fact": _fact,
}

# More ways to ask each fact, for the stand-in LLM's text training only (never in the spoken
# corpus or its held-out tests): a fact asked many ways is learnt as subject -> answer, so a
# held-out phrasing of a known fact still reaches it. With the three phrasings alone the
# stand-in can learn each (phrasing, subject) pair by heart and answer a held-out pair with
# another subject's fact ("Tell me the opposite of big." -> "The opposite of hot is cold.").
FACT_PARAPHRASES: dict[str, list[str]] = {
    "capital": [
        "Name the capital of {s}.", "What's the capital city of {s}?", "Do you know the capital of {s}?",
        "I want to know the capital of {s}.", "Which city is the capital city of {s}?", "Say the capital of {s}.",
    ],
    "color": [
        "Name the color of {s}.", "Which color is {s}?", "Do you know the color of {s}?",
        "What's the color of {s}?", "Say the color of {s}.", "I want to know the color of {s}.",
    ],
    "legs": [
        "How many legs are there on {s}?", "Count the legs of {s}.", "Do you know how many legs {s} has?",
        "What number of legs does {s} have?", "Say how many legs {s} has.", "I want to know how many legs {s} has.",
    ],
    "opposite": [
        "Name the opposite of {s}.", "What's the opposite of {s}?", "Do you know the opposite of {s}?",
        "Say the opposite of {s}.", "What word is the opposite of {s}?", "I want to know the opposite of {s}.",
    ],
}  # fmt: skip


def paraphrase_fact(rng: random.Random, turn: Turn) -> Turn:
    """`turn` (a fact question) asked with one of `FACT_PARAPHRASES`; other turns unchanged."""
    if turn.family != "fact":
        return turn
    category, subject, _ = FACTS[turn.combo[0]]
    question = rng.choice(FACT_PARAPHRASES[category]).format(s=subject)
    return dataclasses.replace(turn, question=question[:1].upper() + question[1:])


FOLLOWUP_PROB = 0.4
# Sampling weights: comparisons, the one lookup family, are drawn twice as often.
FAMILY_WEIGHTS = {name: 2.0 if name == "compare" else 1.0 for name in FAMILIES}


def is_heldout(seed: int, family: str, combo: tuple) -> bool:
    """Stable membership of a combination in the held-out set (~HELDOUT_PERCENT %).

    Atomic facts are never held out, only what must be computed from them: a single
    neighbour ("the month before February") is knowledge, like a capital, while "two
    months before February" is a combination. Facts hold out a phrasing, never the fact.
    """
    if family in ("weekday", "month") and combo[1] == 1:
        return False
    if family == "followup" and combo[0] in ("day", "month"):
        return False
    if family == "fact":
        # Every fact keeps >= 2 phrasings in training: a third of the facts hold out one.
        fact_id, phrasing = combo
        h = _stable_hash(seed, "fact", fact_id)
        n_phrasings = len(FACT_PHRASINGS[FACTS[fact_id][0]])
        return h % 3 == 0 and phrasing == (h // 3) % n_phrasings
    return _stable_hash(seed, family, combo) % 100 < HELDOUT_PERCENT


def _stable_hash(*parts: object) -> int:
    return int.from_bytes(hashlib.sha1(repr(parts).encode()).digest()[:8], "little")


def sample_turn(rng: random.Random, seed: int, heldout: bool | None, prev: Turn | None = None) -> Turn:
    """Draw one turn whose combination is (not) held out, as `heldout` asks; `None` takes any
    combination (the text of a pretrained LLM's knowledge, not the spoken corpus)."""
    for _ in range(10_000):
        if prev is not None and rng.random() < FOLLOWUP_PROB:
            turn = _followup(rng, prev)
        else:
            name = rng.choices(list(FAMILY_WEIGHTS), weights=list(FAMILY_WEIGHTS.values()))[0]
            turn = FAMILIES[name](rng, prev)
        if turn is not None and (heldout is None or is_heldout(seed, turn.family, turn.combo) == heldout):
            return turn
    raise RuntimeError("could not draw a turn; the held-out share is broken")


def sample_dialogue(rng: random.Random, seed: int, heldout: bool | None, max_turns: int = 3) -> list[Turn]:
    """1..max_turns turns. A held-out dialogue has at least one held-out turn (its first),
    and all its turns are held-out ones: nothing in it was seen in training. `heldout=None`
    draws from every combination."""
    n = rng.randint(1, max_turns)
    turns: list[Turn] = []
    for _ in range(n):
        turns.append(sample_turn(rng, seed, heldout, turns[-1] if turns else None))
    return turns


def build_qa_splits(seed: int, sizes: dict[str, int] | None = None) -> dict[str, list[dict]]:
    """The spoken-QA dialogues: train from seen combinations, dev/test from held-out ones.

    Returns {"train"|"dev"|"test": [{"id", "turns": [turn dicts]}]}; deterministic in `seed`.
    """
    sizes = sizes or DEFAULT_SPLIT_SIZES
    out: dict[str, list[dict]] = {}
    for split, n in sizes.items():
        rng = random.Random(f"qa-{seed}-{split}")
        heldout = split != "train"
        out[split] = [
            {"id": f"qa-{split}-{i:06d}", "turns": [t.as_dict() for t in sample_dialogue(rng, seed, heldout)]}
            for i in range(n)
        ]
    return out
