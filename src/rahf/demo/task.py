"""A small preference task whose responses a program judges exactly (the gold judge).

A user asks the colour of a familiar thing ("mia asks : what color is a banana ?"). A response has three parts: an
opener (polite or rude), an answer (correct or wrong colour) and a closing (polite or rude). The gold
score is 2 for the correct answer plus 1 for each polite part; anything that does not parse scores
-1. Preference pairs pair two random responses with different scores, so the chosen one is better
but often imperfect (correct but rude vs wrong and rude): imitating chosen responses wins about half
the time against them, and only learning the direction of preference goes beyond.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

NAMES = (
    "mia leo ava sam zoe max ivy tom eva ben lia noah ada eli finn gus hana iris jack kai luca mila nora "
    "omar pia quinn rosa theo uma vera will xena yara zane abby cole dana emma fred gina".split()
)
WORLD = {  # the one correct colour of each thing
    "banana": "yellow", "lemon": "yellow", "sky": "blue", "ocean": "blue", "grass": "green", "leaf": "green",
    "lime": "green", "snow": "white", "milk": "white", "cloud": "white", "coal": "black", "crow": "black",
    "tomato": "red", "cherry": "red", "strawberry": "red", "carrot": "orange", "pumpkin": "orange",
    "chocolate": "brown", "bear": "brown", "plum": "purple", "grape": "purple", "flamingo": "pink",
    "pig": "pink", "elephant": "gray", "mouse": "gray",
}  # fmt: skip
OBJECTS = sorted(WORLD)
COLORS = sorted(set(WORLD.values()))
OPENERS = {
    "polite": ["sure , happy to help .", "of course !", "good question ."],
    "rude": ["ugh , fine .", "what a dumb question .", "whatever ."],
}
CLOSINGS = {
    "polite": ["hope this helps !", "have a nice day !"],
    "rude": ["now go away .", "stop bothering me ."],
}
INSTRUCTIONS = {
    "preferred": "you are a polite and correct assistant .",
    "dispreferred": "you are a rude and wrong assistant .",
}
NEUTRAL_WORDS = "human assistant : the a is what color has . , ! ? it".split()


@dataclass(frozen=True)
class Fact:
    name: str
    obj: str

    @property
    def color(self) -> str:
        return WORLD[self.obj]

    @property
    def prompt(self) -> str:
        return f"{self.name} asks : what color is a {self.obj} ?"


@dataclass(frozen=True)
class Style:
    polite_open: bool
    correct: bool
    polite_close: bool

    @property
    def score(self) -> int:
        return 2 * self.correct + self.polite_open + self.polite_close


def respond(fact: Fact, style: Style, rng: random.Random) -> str:
    """A response text with the given attributes (phrasing varies at random)."""
    color = fact.color if style.correct else rng.choice([c for c in COLORS if c != fact.color])
    answer = rng.choice([f"it is {color} .", f"the answer is {color} ."])
    opener = rng.choice(OPENERS["polite" if style.polite_open else "rude"])
    closing = rng.choice(CLOSINGS["polite" if style.polite_close else "rude"])
    return f"{opener} {answer} {closing}"


def _split_phrase(words: list[str], phrases: dict[str, list[str]], at_start: bool) -> tuple[str | None, list[str]]:
    for kind, options in phrases.items():
        for p in options:
            w = p.split()
            if (words[: len(w)] if at_start else words[-len(w) :]) == w:
                return kind, (words[len(w) :] if at_start else words[: -len(w)])
    return None, words


def gold_score(fact: Fact, response: str) -> int:
    """Exact quality of a response: 2*correct + polite opener + polite closing; -1 when it does not parse."""
    words = response.split()
    opener, rest = _split_phrase(words, OPENERS, at_start=True)
    closing, rest = _split_phrase(rest, CLOSINGS, at_start=False) if opener else (None, rest)
    if opener is None or closing is None:
        return -1
    if len(rest) == 4 and rest[:2] == ["it", "is"] and rest[3] == ".":
        color = rest[2]
    elif len(rest) == 5 and rest[:3] == ["the", "answer", "is"] and rest[4] == ".":
        color = rest[3]
    else:
        return -1
    if color not in COLORS:
        return -1
    return 2 * (color == fact.color) + (opener == "polite") + (closing == "polite")


def judge(fact: Fact, a: str, b: str) -> float:
    """Pairwise gold verdict for `a` against `b`: 1 win, 0.5 tie, 0 loss."""
    sa, sb = gold_score(fact, a), gold_score(fact, b)
    return 1.0 if sa > sb else 0.5 if sa == sb else 0.0


def random_style(rng: random.Random) -> Style:
    return Style(rng.random() < 0.5, rng.random() < 0.5, rng.random() < 0.5)


@dataclass
class DemoData:
    """Everything the demo trains and tests on, split by prompt so test facts are never seen in training."""

    sft: list[dict]  # {"prompt": str, "completion": str}
    pairs: list[dict]  # TRL standard {"prompt", "chosen", "rejected"} (+ "fact")
    validation: list[dict]  # held-out {"prompt", "chosen", "rejected", "fact"} for choosing layers and alpha
    test: list[dict]  # held-out {"prompt", "chosen", "rejected", "fact"}


def make_task(
    n_sft: int = 4000, n_pairs: int = 2000, n_val: int = 50, n_test: int = 200, label_noise: float = 0.0, seed: int = 0
) -> DemoData:
    """Sample the demo's data. `label_noise` swaps chosen and rejected in that fraction of training pairs."""
    rng = random.Random(seed)
    facts = [Fact(n, o) for n in NAMES for o in OBJECTS]
    rng.shuffle(facts)
    test_facts, val_facts, train_facts = facts[:n_test], facts[n_test : n_test + n_val], facts[n_test + n_val :]

    def pair(fact: Fact) -> tuple[str, str]:
        while True:
            s1, s2 = random_style(rng), random_style(rng)
            if s1.score != s2.score:
                break
        good, bad = (s1, s2) if s1.score > s2.score else (s2, s1)
        return respond(fact, good, rng), respond(fact, bad, rng)

    def record(fact: Fact) -> dict:
        return {"name": fact.name, "obj": fact.obj}

    sft = []
    for _ in range(n_sft):
        fact = rng.choice(train_facts)
        sft.append({"prompt": fact.prompt, "completion": respond(fact, random_style(rng), rng)})
    pairs = []
    for _ in range(n_pairs):
        fact = rng.choice(train_facts)
        chosen, rejected = pair(fact)
        if rng.random() < label_noise:
            chosen, rejected = rejected, chosen
        pairs.append({"prompt": fact.prompt, "chosen": chosen, "rejected": rejected, "fact": record(fact)})
    held = [
        [{"prompt": f.prompt, "chosen": c, "rejected": r, "fact": record(f)} for f in fs for c, r in [pair(f)]]
        for fs in (val_facts, test_facts)
    ]
    return DemoData(sft, pairs, held[0], held[1])


def vocabulary() -> list[str]:
    """Every word the task, its instructions and the Human/Assistant template use."""
    words = set(NAMES + OBJECTS + COLORS + NEUTRAL_WORDS + ["Human:", "Assistant:", "asks", "answer"])
    for phrases in (*OPENERS.values(), *CLOSINGS.values(), INSTRUCTIONS.values()):
        for p in phrases:
            words.update(p.split())
    words.update("it is the".split())
    return sorted(words)
