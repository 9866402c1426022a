"""Write the built-in demo data: ``task.jsonl``, ``chat.jsonl`` and ``prefs.jsonl`` (deterministic, fixed seed).

Run ``python -m rlchat.demo_data.generate`` to rewrite the committed files next to this module, or
``python -m rlchat.demo_data.generate --check`` to verify they are what this code produces (the tests do that).

Everything is templated from the small tables below: no data comes from a hub, and every fact is one a reader can
check. The sets are sized for the laptop demo (a 2-layer, d=64 model with a 4096-token vocabulary on 2 CPU cores):

- **task**: single-digit addition and subtraction phrased eight ways each, the answer a bare number both as the
  assistant message and as ``reference`` (what the verifiable reward checks). Answers are 1-2 tokens, so a tiny
  model's success rate moves visibly within a few PPO iterations.
- **chat**: short conversations for SFT (greetings, small talk, capitals, colours, animal sounds, opposites,
  sequences, spelling, a few multi-turn exchanges) plus examples of the task in its exact format, so that SFT
  teaches the answer format PPO then rewards.
- **prefs**: preference pairs whose chosen reply is correct, polite and on-format, and whose rejected reply is
  wrong, rude or off-format, in the preference format (string prompts and, for some, a message list with a
  system prompt), so a tiny reward model can learn the difference. ~2,200 pairs, about half of them wrong answers:
  enough for a reward model from the SFT trunk to learn which answers are right, and a held-out 10% (~217 pairs)
  large enough for its pairwise accuracy to be measured to +-0.02.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

SEED = 20250101
HERE = Path(__file__).resolve().parent

# ----------------------------------------------------------------------------------------------------------- tables

ADD_TEMPLATES = (
    "What is {a} + {b}?",
    "What is {a} plus {b}?",
    "Add {a} and {b}.",
    "Compute {a} + {b}.",
    "{a} + {b} = ?",
    "What do you get when you add {a} and {b}?",
    "Calculate {a} plus {b}.",
    "What is the sum of {a} and {b}?",
)
SUB_TEMPLATES = (
    "What is {a} - {b}?",
    "What is {a} minus {b}?",
    "Subtract {b} from {a}.",
    "Compute {a} - {b}.",
    "{a} - {b} = ?",
    "What do you get when you take {b} away from {a}?",
    "Calculate {a} minus {b}.",
    "What is the difference between {a} and {b}?",
)
TASK_SYSTEMS = (None, "Answer with just the number.", "You are a math tutor. Reply with the number only.")

CAPITALS = (
    ("France", "Paris"),
    ("Germany", "Berlin"),
    ("Italy", "Rome"),
    ("Spain", "Madrid"),
    ("Portugal", "Lisbon"),
    ("Japan", "Tokyo"),
    ("China", "Beijing"),
    ("India", "New Delhi"),
    ("Canada", "Ottawa"),
    ("Australia", "Canberra"),
    ("Brazil", "Brasília"),
    ("Argentina", "Buenos Aires"),
    ("Mexico", "Mexico City"),
    ("Egypt", "Cairo"),
    ("Kenya", "Nairobi"),
    ("Norway", "Oslo"),
    ("Sweden", "Stockholm"),
    ("Denmark", "Copenhagen"),
    ("Finland", "Helsinki"),
    ("Poland", "Warsaw"),
    ("Greece", "Athens"),
    ("Turkey", "Ankara"),
    ("Russia", "Moscow"),
    ("Ireland", "Dublin"),
    ("the United Kingdom", "London"),
    ("the United States", "Washington, D.C."),
    ("South Korea", "Seoul"),
    ("Thailand", "Bangkok"),
    ("Vietnam", "Hanoi"),
    ("Peru", "Lima"),
    ("Chile", "Santiago"),
    ("Austria", "Vienna"),
    ("Belgium", "Brussels"),
    ("the Netherlands", "Amsterdam"),
    ("Switzerland", "Bern"),
    ("Hungary", "Budapest"),
    ("the Czech Republic", "Prague"),
    ("Nigeria", "Abuja"),
    ("Morocco", "Rabat"),
    ("New Zealand", "Wellington"),
    ("Colombia", "Bogotá"),
    ("Cuba", "Havana"),
)
CAPITAL_TEMPLATES = ("What is the capital of {c}?", "Name the capital of {c}.", "Which city is the capital of {c}?")

COLORS = (
    ("the sky", "blue"),
    ("grass", "green"),
    ("a banana", "yellow"),
    ("snow", "white"),
    ("coal", "black"),
    ("a ripe tomato", "red"),
    ("an orange", "orange"),
    ("a lemon", "yellow"),
    ("milk", "white"),
    ("a strawberry", "red"),
    ("a carrot", "orange"),
    ("a fire truck", "red"),
    ("chocolate", "brown"),
    ("a pumpkin", "orange"),
    ("a lime", "green"),
)
COLOR_TEMPLATES = ("What color is {t}?", "What colour is {t}?")
COLOR_NAMES = ("red", "blue", "green", "yellow", "white", "black", "orange", "brown", "purple", "pink")

ANIMALS = (
    ("dog", "woof"),
    ("cat", "meow"),
    ("cow", "moo"),
    ("sheep", "baa"),
    ("duck", "quack"),
    ("pig", "oink"),
    ("horse", "neigh"),
    ("lion", "roar"),
    ("owl", "hoot"),
    ("frog", "ribbit"),
    ("bee", "buzz"),
    ("snake", "hiss"),
    ("mouse", "squeak"),
    ("rooster", "cock-a-doodle-doo"),
)
ANIMAL_TEMPLATES = ("What sound does a {x} make?", "What does a {x} say?")

# (word, opposite, whether the reverse question has one clear answer)
OPPOSITES = (
    ("hot", "cold", True),
    ("big", "small", True),
    ("up", "down", True),
    ("fast", "slow", True),
    ("happy", "sad", True),
    ("light", "dark", True),
    ("open", "closed", True),
    ("early", "late", True),
    ("full", "empty", True),
    ("hard", "soft", True),
    ("young", "old", False),
    ("wet", "dry", True),
    ("tall", "short", False),
    ("loud", "quiet", True),
    ("rich", "poor", True),
    ("strong", "weak", True),
    ("thick", "thin", True),
    ("clean", "dirty", True),
    ("high", "low", True),
    ("left", "right", False),
    ("in", "out", True),
    ("on", "off", True),
    ("win", "lose", True),
    ("push", "pull", True),
    ("day", "night", True),
)
OPPOSITE_TEMPLATES = ("What is the opposite of {w}?", "Give me the opposite of {w}.")

DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)
WORDS = (
    "cat",
    "dog",
    "sun",
    "tree",
    "book",
    "apple",
    "house",
    "water",
    "happy",
    "green",
    "bird",
    "fish",
    "chair",
    "table",
    "music",
    "river",
    "cloud",
    "bread",
    "smile",
    "light",
)

GREETINGS = (
    "Hi!",
    "Hello!",
    "Hey there.",
    "Good morning!",
    "Good afternoon!",
    "Good evening!",
    "Hi, how are you?",
    "Hello, anyone there?",
    "Hey!",
    "Greetings!",
)
GREETING_REPLIES = (
    "Hello! How can I help you today?",
    "Hi there! What can I do for you?",
    "Hello! What would you like to talk about?",
    "Hi! How can I help?",
    "Hey! What can I help you with today?",
    "Hello! I'm here to help. What do you need?",
)
SMALL_TALK = (
    ("How are you?", "I'm doing well, thank you for asking! How about you?"),
    ("How is your day going?", "It's going well, thanks! How is yours?"),
    ("What is your name?", "I'm a small demo assistant."),
    ("Who are you?", "I'm a small demo assistant trained to answer short questions."),
    ("Thank you!", "You're welcome!"),
    ("Thanks a lot.", "Happy to help!"),
    ("Goodbye!", "Goodbye! Have a great day."),
    ("See you later.", "See you later! Take care."),
    ("Can you help me?", "Of course! What do you need help with?"),
    ("Tell me a joke.", "Why did the scarecrow win an award? Because he was outstanding in his field."),
    ("Tell me something nice.", "You are doing great, and every small step counts."),
    ("I am bored.", "How about a short walk, a good book or learning a new word today?"),
    ("I am tired.", "Rest is important. Maybe take a short break and drink some water."),
    ("What can you do?", "I can answer short questions, do simple arithmetic and chat a little."),
    ("Do you like music?", "I can't listen to music, but I know many people love it."),
    ("What is your favorite color?", "I don't have one, but many people like blue."),
    ("Are you a robot?", "I'm a computer program, a small language model."),
    ("Good night!", "Good night! Sleep well."),
    ("I am happy today.", "That's wonderful to hear! What made your day good?"),
    ("Sorry for the trouble.", "No trouble at all. I'm glad to help."),
    ("Can you keep a secret?", "I don't remember our chats after they end, so your secret is safe."),
    ("What time is it?", "I can't see a clock, but your device can tell you the time."),
    ("Is it going to rain?", "I can't check the weather, but a weather app can tell you."),
    ("Nice to meet you.", "Nice to meet you too!"),
    ("Have a nice day!", "Thank you, you too!"),
)
THANKS = ("Thanks!", "Thank you!", "Great, thanks.", "Perfect, thank you.")
THANKS_REPLIES = ("You're welcome!", "Happy to help!", "Any time!", "Glad I could help!")
CHAT_SYSTEMS = (None, None, None, "You are a friendly assistant.", "You are a helpful assistant. Keep answers short.")
RUDE_REPLIES = (
    "Go away.",
    "Whatever.",
    "Figure it out yourself.",
    "I don't care.",
    "Stop bothering me.",
    "That's a stupid question.",
    "Ask someone else.",
    "Ugh, not this again.",
)
OFF_FORMAT_TEMPLATES = (
    "Let me think about it for a while. Numbers are tricky, and I am not sure, but it might be {x}.",
    "The answer is probably {x} or something close to it.",
    "Hmm, I would guess around {x}, but please double-check.",
    "Math is hard. Maybe {x}?",
)


# ---------------------------------------------------------------------------------------------------------- helpers


def _article(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


def _conversation(rng: random.Random, turns: list[tuple[str, str]], systems: tuple[str | None, ...]) -> list[dict]:
    system = rng.choice(systems)
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": r, "content": c} for r, c in turns]


def arithmetic_problems() -> list[tuple[str, int, int, int]]:
    """Every (op, a, b, answer) of the task: a + b for digits a, b; a - b for digits a >= b (no negatives)."""
    problems = [("+", a, b, a + b) for a in range(10) for b in range(10)]
    problems += [("-", a, b, a - b) for a in range(10) for b in range(a + 1)]
    return problems


def task_prompt(op: str, a: int, b: int, template: int) -> str:
    return (ADD_TEMPLATES if op == "+" else SUB_TEMPLATES)[template].format(a=a, b=b)


def _unique(records: list[dict[str, Any]], key: Callable[[dict[str, Any]], Any]) -> list[dict[str, Any]]:
    """Drop records whose key was seen before (the demo sets contain no exact duplicates)."""
    seen: set[str] = set()
    out = []
    for r in records:
        k = json.dumps(key(r), ensure_ascii=False, sort_keys=True)
        if k not in seen:
            seen.add(k)
            out.append(r)
    return out


# ------------------------------------------------------------------------------------------------------------ task


def _task_candidates() -> list[tuple[str, int, int, int, int, int]]:
    """Every (op, a, b, answer, phrasing, system prompt) combination: 3,720 distinct task records."""
    return [
        (op, a, b, ans, t, s)
        for op, a, b, ans in arithmetic_problems()
        for t in range(len(ADD_TEMPLATES))
        for s in range(len(TASK_SYSTEMS))
    ]


def task_records(rng: random.Random, n: int = 2000, exclude: frozenset = frozenset()) -> list[dict[str, Any]]:
    """``n`` arithmetic records sampled without replacement from every (problem, phrasing, system prompt).

    Args:
        exclude: candidate tuples not to use (the chat set takes its task examples from outside task.jsonl).
    """
    candidates = [c for c in _task_candidates() if c not in exclude]
    out = []
    for op, a, b, ans, t, s in rng.sample(candidates, n):
        system = TASK_SYSTEMS[s]
        msgs = [{"role": "system", "content": system}] if system else []
        msgs += [{"role": "user", "content": task_prompt(op, a, b, t)}, {"role": "assistant", "content": str(ans)}]
        out.append(
            {
                "messages": msgs,
                "reference": str(ans),
                "quality": 1.0,
                "source": "demo:task/arithmetic",
                "meta": {"op": op, "a": a, "b": b, "template": t, "system": s},
            }
        )
    return out


# ------------------------------------------------------------------------------------------------------------ chat


def _fact_pairs() -> list[tuple[str, str, str]]:
    """(category, question, answer) for every templated fact."""
    facts: list[tuple[str, str, str]] = []
    for country, capital in CAPITALS:
        for t in CAPITAL_TEMPLATES:
            facts.append(("capitals", t.format(c=country), f"The capital of {country} is {capital}."))
    for thing, color in COLORS:
        for t in COLOR_TEMPLATES:
            facts.append(("colors", t.format(t=thing), f"{_cap(thing)} is {color}."))
    for animal, sound in ANIMALS:
        for t in ANIMAL_TEMPLATES:
            facts.append(("animals", t.format(x=animal), f"{_cap(_article(animal))} says {sound}."))
    for word, opposite, reversible in OPPOSITES:
        for t in OPPOSITE_TEMPLATES:
            facts.append(("opposites", t.format(w=word), f"The opposite of {word} is {opposite}."))
            if reversible:
                facts.append(("opposites", t.format(w=opposite), f"The opposite of {opposite} is {word}."))
    for i, day in enumerate(DAYS):
        nxt = DAYS[(i + 1) % 7]
        facts.append(("sequences", f"What day comes after {day}?", f"{nxt} comes after {day}."))
        facts.append(("sequences", f"Which day follows {day}?", f"{nxt} follows {day}."))
    for i, month in enumerate(MONTHS):
        nxt = MONTHS[(i + 1) % 12]
        facts.append(("sequences", f"What month comes after {month}?", f"{nxt} comes after {month}."))
        facts.append(("sequences", f"Which month follows {month}?", f"{nxt} follows {month}."))
    for n in range(31):
        facts.append(("sequences", f"What number comes after {n}?", f"{n + 1} comes after {n}."))
        facts.append(("sequences", f"What number comes before {n + 1}?", f"{n} comes before {n + 1}."))
    for word in WORDS:
        spelled = "-".join(word.upper())
        facts.append(("spelling", f"How do you spell {word}?", f"{_cap(word)} is spelled {spelled}."))
        facts.append(("spelling", f"Spell the word {word}.", f"{spelled}."))
    return facts


def chat_records(rng: random.Random) -> list[dict[str, Any]]:
    """General short conversations for SFT, plus task examples in the task's exact format."""
    records: list[dict[str, Any]] = []

    def add(category: str, messages: list[dict], quality: float | None = None) -> None:
        q = round(rng.uniform(0.6, 1.0), 2) if quality is None else quality
        records.append({"messages": messages, "quality": q, "source": f"demo:chat/{category}"})

    facts = _fact_pairs()
    for category, question, answer in facts:
        add(category, _conversation(rng, [("user", question), ("assistant", answer)], CHAT_SYSTEMS))
    for greeting in GREETINGS:
        for reply in rng.sample(GREETING_REPLIES, 3):
            add("greetings", _conversation(rng, [("user", greeting), ("assistant", reply)], CHAT_SYSTEMS))
    for question, answer in SMALL_TALK:
        add("small_talk", _conversation(rng, [("user", question), ("assistant", answer)], CHAT_SYSTEMS))
    # Multi-turn: a greeting, then a question; or a question, an answer and thanks.
    for _ in range(60):
        _, question, answer = rng.choice(facts)
        turns = [
            ("user", rng.choice(GREETINGS)),
            ("assistant", rng.choice(GREETING_REPLIES)),
            ("user", question),
            ("assistant", answer),
        ]
        add("multi_turn", _conversation(rng, turns, CHAT_SYSTEMS))
    for _ in range(60):
        _, question, answer = rng.choice(facts)
        turns = [("user", question), ("assistant", answer), ("user", rng.choice(THANKS))]
        turns.append(("assistant", rng.choice(THANKS_REPLIES)))
        add("multi_turn", _conversation(rng, turns, CHAT_SYSTEMS))
    # The task in its exact format (bare-number answers), so SFT teaches what PPO's reward checks. Drawn from the
    # phrasings task.jsonl does not use, so an SFT model has not memorised PPO's exact prompts.
    task = task_records(random.Random(SEED))
    keys = ("op", "a", "b", "answer", "template", "system")
    used = frozenset(tuple({**r["meta"], "answer": int(r["reference"])}[k] for k in keys) for r in task)
    for rec in task_records(rng, 150, exclude=used):
        records.append({"messages": rec["messages"], "quality": 1.0, "source": "demo:chat/arithmetic"})
    return _unique(records, lambda r: r["messages"])


# ----------------------------------------------------------------------------------------------------------- prefs


def _wrong_number(rng: random.Random, answer: int) -> int:
    candidates = [x for x in range(max(0, answer - 3), answer + 4) if x != answer]
    return rng.choice(candidates)


PREF_ARITHMETIC = 1040
"""Arithmetic pairs drawn (before de-duplication): half wrong answers, a quarter off-format, a quarter rude."""
PREF_REPEATS = 4
"""Draws per chat fact / greeting / small-talk item (before de-duplication), each a fresh phrasing and rejection."""


def pref_records(rng: random.Random) -> list[dict[str, Any]]:
    """Preference pairs: chosen is correct, polite and on-format; rejected is wrong, rude or off-format."""
    records: list[dict[str, Any]] = []

    def add(category: str, kind: str, prompt: str, chosen: str, rejected: str) -> None:
        rec: dict[str, Any]
        if rng.random() < 0.2:  # some prompts as message lists with a system prompt
            system = "You are a friendly assistant." if category != "arithmetic" else TASK_SYSTEMS[1]
            rec = {
                "prompt": [{"role": "system", "content": system}, {"role": "user", "content": prompt}],
            }
        else:
            rec = {"prompt": prompt}
        rec.update(chosen=chosen, rejected=rejected, quality=round(rng.uniform(0.7, 1.0), 2))
        rec.update(
            safety="rejected_rude" if kind == "rude" else "safe", source=f"demo:prefs/{category}", meta={"kind": kind}
        )
        records.append(rec)

    problems = arithmetic_problems()
    for _ in range(PREF_ARITHMETIC):
        op, a, b, ans = rng.choice(problems)
        prompt = task_prompt(op, a, b, rng.randrange(len(ADD_TEMPLATES)))
        kind = rng.choice(("wrong_answer", "wrong_answer", "off_format", "rude"))
        if kind == "wrong_answer":
            rejected = str(_wrong_number(rng, ans))
        elif kind == "off_format":
            rejected = rng.choice(OFF_FORMAT_TEMPLATES).format(x=ans)
        else:
            rejected = rng.choice(RUDE_REPLIES)
        add("arithmetic", kind, prompt, str(ans), rejected)

    capitals = [c for _, c in CAPITALS]
    for country, capital in CAPITALS:
        for _ in range(2 * PREF_REPEATS):
            wrong = rng.choice([c for c in capitals if c != capital])
            correct = f"The capital of {country} is {capital}."
            q = rng.choice(CAPITAL_TEMPLATES).format(c=country)
            add("capitals", "wrong_answer", q, correct, f"The capital of {country} is {wrong}.")
    for thing, color in COLORS:
        for _ in range(PREF_REPEATS):
            wrong = rng.choice([c for c in COLOR_NAMES if c != color])
            q = rng.choice(COLOR_TEMPLATES).format(t=thing)
            add("colors", "wrong_answer", q, f"{_cap(thing)} is {color}.", f"{_cap(thing)} is {wrong}.")
    sounds = [s for _, s in ANIMALS]
    for animal, sound in ANIMALS:
        for _ in range(PREF_REPEATS):
            wrong = rng.choice([s for s in sounds if s != sound])
            q = rng.choice(ANIMAL_TEMPLATES).format(x=animal)
            subject = _cap(_article(animal))
            add("animals", "wrong_answer", q, f"{subject} says {sound}.", f"{subject} says {wrong}.")
    for word, opposite, reversible in OPPOSITES:
        for w, o in ((word, opposite), (opposite, word)) if reversible else ((word, opposite),):
            for t in OPPOSITE_TEMPLATES:
                add(
                    "opposites",
                    "wrong_answer",
                    t.format(w=w),
                    f"The opposite of {w} is {o}.",
                    f"The opposite of {w} is {w}.",
                )
    for category, question, answer in rng.sample(_fact_pairs(), 80 * PREF_REPEATS):
        add(category, "rude", question, answer, rng.choice(RUDE_REPLIES))
    for greeting in GREETINGS:
        for _ in range(4 * PREF_REPEATS):
            add("greetings", "rude", greeting, rng.choice(GREETING_REPLIES), rng.choice(RUDE_REPLIES))
    for question, answer in SMALL_TALK:
        for _ in range(2 * PREF_REPEATS):
            add("small_talk", "rude", question, answer, rng.choice(RUDE_REPLIES))
    return _unique(records, lambda r: [r["prompt"], r["chosen"], r["rejected"]])


# ------------------------------------------------------------------------------------------------------------- main


def render(records: list[dict[str, Any]]) -> str:
    """JSON Lines text (UTF-8, LF, keys in insertion order)."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def generate() -> dict[str, str]:
    """File name -> content of every demo file. One RNG per file, so each file depends only on its own code."""
    return {
        "task.jsonl": render(task_records(random.Random(SEED))),
        "chat.jsonl": render(chat_records(random.Random(SEED + 1))),
        "prefs.jsonl": render(pref_records(random.Random(SEED + 2))),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(HERE), help="output directory (default: next to this module)")
    parser.add_argument("--check", action="store_true", help="only verify that the files are up to date")
    args = parser.parse_args(argv)
    out = Path(args.out)
    stale = []
    for name, text in generate().items():
        path = out / name
        n = text.count("\n")
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                stale.append(name)
            continue
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8", newline="\n")
        print(f"wrote {path} ({n} records)")
    if stale:
        print(f"out of date: {', '.join(stale)}; run python -m rlchat.demo_data.generate", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
