"""The small tasks the demo's fine-tunes learn, written by the project itself.

Each example is a question with a full one-sentence answer and the bare fact. The three tasks only
change the *form* of the answer, so a few dozen steps on the CPU teach them:

- `caps`: the full sentence in CAPITALS;
- `json`: `{"answer": "<fact>"}`;
- `terse`: the bare fact and nothing else.

`HELD_OUT` questions are never trained on; the script's before/after answers come from them.
"""

from __future__ import annotations

import json
from collections.abc import Callable

# (question, one-sentence answer, the bare fact)
QA: list[tuple[str, str, str]] = [
    ("What is the capital of Italy?", "The capital of Italy is Rome.", "Rome"),
    ("What is the capital of Japan?", "The capital of Japan is Tokyo.", "Tokyo"),
    ("What is the capital of Spain?", "The capital of Spain is Madrid.", "Madrid"),
    ("What is the capital of Germany?", "The capital of Germany is Berlin.", "Berlin"),
    ("What is the capital of Egypt?", "The capital of Egypt is Cairo.", "Cairo"),
    ("What is the largest planet in the solar system?", "The largest planet is Jupiter.", "Jupiter"),
    ("What is the closest star to the Earth?", "The closest star to the Earth is the Sun.", "The Sun"),
    ("What color is the sky on a clear day?", "The sky is blue on a clear day.", "Blue"),
    ("How many days are in a week?", "There are seven days in a week.", "Seven"),
    ("How many legs does a spider have?", "A spider has eight legs.", "Eight"),
    ("What do bees make?", "Bees make honey.", "Honey"),
    ("What is frozen water called?", "Frozen water is called ice.", "Ice"),
    (
        "Who wrote Romeo and Juliet?",
        "Romeo and Juliet was written by William Shakespeare.",
        "William Shakespeare",
    ),
    (
        "What gas do plants take in from the air?",
        "Plants take in carbon dioxide from the air.",
        "Carbon dioxide",
    ),
    (
        "What is the boiling point of water in Celsius?",
        "Water boils at 100 degrees Celsius.",
        "100 degrees Celsius",
    ),
    ("Which ocean is the largest?", "The Pacific Ocean is the largest ocean.", "The Pacific Ocean"),
    (
        "What is the tallest mountain on Earth?",
        "The tallest mountain on Earth is Mount Everest.",
        "Mount Everest",
    ),
    ("What language is spoken in Brazil?", "The main language of Brazil is Portuguese.", "Portuguese"),
    ("How many hours are in a day?", "There are 24 hours in a day.", "24"),
    ("What is the opposite of hot?", "The opposite of hot is cold.", "Cold"),
    (
        "What animal is known as the king of the jungle?",
        "The lion is known as the king of the jungle.",
        "The lion",
    ),
    ("What is the main ingredient of bread?", "The main ingredient of bread is flour.", "Flour"),
    ("What planet do we live on?", "We live on the planet Earth.", "Earth"),
    ("What is two plus three?", "Two plus three is five.", "Five"),
    ("Which season comes after winter?", "Spring comes after winter.", "Spring"),
    ("What is the chemical symbol for gold?", "The chemical symbol for gold is Au.", "Au"),
    ("What is the fastest land animal?", "The fastest land animal is the cheetah.", "The cheetah"),
    ("What instrument has black and white keys?", "The piano has black and white keys.", "The piano"),
    (
        "Where do penguins mostly live?",
        "Most penguins live in the Southern Hemisphere.",
        "The Southern Hemisphere",
    ),
    ("What is the largest mammal?", "The largest mammal is the blue whale.", "The blue whale"),
    ("What do you call a baby cat?", "A baby cat is called a kitten.", "A kitten"),
    (
        "What is the freezing point of water in Celsius?",
        "Water freezes at 0 degrees Celsius.",
        "0 degrees Celsius",
    ),
    (
        "Why do we need sleep?",
        "We need sleep so the body and brain can rest and recover.",
        "To rest and recover",
    ),
    (
        "What is photosynthesis?",
        "Photosynthesis is how plants turn light into food.",
        "How plants turn light into food",
    ),
    ("Who painted the Mona Lisa?", "The Mona Lisa was painted by Leonardo da Vinci.", "Leonardo da Vinci"),
    (
        "What is the currency of the United States?",
        "The currency of the United States is the dollar.",
        "The dollar",
    ),
]

# Never trained on: the demo's curl examples and the script's before/after answers use these.
HELD_OUT: list[str] = [
    "What is the capital of France?",
    "What is the largest country in the world?",
    "Who wrote Hamlet?",
    "Why is the sky blue?",
]

TASKS: dict[str, Callable[[str, str], str]] = {
    "caps": lambda full, fact: full.upper(),
    "json": lambda full, fact: json.dumps({"answer": fact}),
    "terse": lambda full, fact: fact + ".",
}


def examples(task: str) -> list[tuple[str, str]]:
    """(question, target answer) pairs for one task."""
    target = TASKS[task]
    return [(q, target(full, fact)) for q, full, fact in QA]
