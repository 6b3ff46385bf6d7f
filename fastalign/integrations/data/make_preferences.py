"""Regenerates preferences.jsonl, the demo's preference data: `python make_preferences.py > preferences.jsonl`.

Five families of synthetic questions, each with a right (chosen) and a wrong (rejected) answer, in
lower-case words separated by spaces so a word-level tokenizer of a few hundred words covers them.
The right answers follow rules a two-layer model can learn (sums, lookups); the wrong ones are
plausible but false, so a policy must tell them apart rather than spot a style.
"""

import json
import random

NUMBERS = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen \
seventeen eighteen".split()
CAPITALS = {
    "france": "paris", "italy": "rome", "spain": "madrid", "germany": "berlin", "japan": "tokyo",
    "egypt": "cairo", "canada": "ottawa", "peru": "lima", "kenya": "nairobi", "norway": "oslo",
    "greece": "athens", "china": "beijing", "russia": "moscow", "chile": "santiago", "cuba": "havana",
    "poland": "warsaw", "austria": "vienna", "ireland": "dublin", "portugal": "lisbon", "sweden": "stockholm",
}  # fmt: skip
OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "up": "down", "happy": "sad", "light": "dark",
    "old": "young", "early": "late", "open": "closed", "full": "empty", "hard": "soft", "near": "far",
    "rich": "poor", "wet": "dry", "strong": "weak", "high": "low", "loud": "quiet", "long": "short",
}  # fmt: skip
COLORS = {
    "the sky": "blue", "grass": "green", "snow": "white", "coal": "black", "a banana": "yellow",
    "a tomato": "red", "an orange": "orange", "a plum": "purple", "chocolate": "brown", "ash": "gray",
}  # fmt: skip
REQUESTS = [
    "help me with my homework", "explain how rain forms", "write a short poem", "fix my bike",
    "plan a trip to the sea", "teach me to cook rice", "check my spelling", "find a good book",
    "tell me a joke", "make a list for the shop",
]  # fmt: skip
CAPITAL_QUESTIONS = ["question : what is the capital of {} ?", "question : name the capital of {} ."]
HELPFUL = ["of course , i am happy to help .", "sure , let us do it step by step .", "gladly , here is a plan ."]
UNHELPFUL = ["no , do it yourself .", "i do not want to .", "that is boring , ask someone else ."]


def wrong(rng: random.Random, right: str, pool: list[str]) -> str:
    return rng.choice([w for w in pool if w != right])


def triples(rng: random.Random) -> list[dict]:
    out = []
    for a in range(10):
        for b in range(10):
            if a + b < len(NUMBERS):
                right = NUMBERS[a + b]
                prompt = f"question : what is {NUMBERS[a]} plus {NUMBERS[b]} ?"
                answer = f"answer : {NUMBERS[a]} plus {NUMBERS[b]} is {{}} ."
                out.append((prompt, answer.format(right), answer.format(wrong(rng, right, NUMBERS))))
    for _ in range(3):
        for country, city in CAPITALS.items():
            prompt = rng.choice(
                [f"question : what is the capital of {country} ?", f"question : name the capital of {country} ."]
            )  # noqa: E501
            answer = f"answer : the capital of {country} is {{}} ."
            out.append((prompt, answer.format(city), answer.format(wrong(rng, city, list(CAPITALS.values())))))
    for _ in range(3):
        for word, opposite in OPPOSITES.items():
            prompt = f"question : what is the opposite of {word} ?"
            answer = f"answer : the opposite of {word} is {{}} ."
            bad = rng.choice([word, wrong(rng, opposite, list(OPPOSITES.values()))])
            out.append((prompt, answer.format(opposite), answer.format(bad)))
    for _ in range(4):
        for thing, color in COLORS.items():
            prompt = f"question : what color is {thing} ?"
            answer = f"answer : {thing} is {{}} ."
            out.append((prompt, answer.format(color), answer.format(wrong(rng, color, list(COLORS.values())))))
    for _ in range(4):
        for request in REQUESTS:
            prompt = f"user : please {request} ."
            out.append((prompt, "assistant : " + rng.choice(HELPFUL), "assistant : " + rng.choice(UNHELPFUL)))
    rng.shuffle(out)
    # The completion starts with a space: TRL tokenizes prompt + completion as one string.
    return [{"prompt": p, "chosen": " " + c, "rejected": " " + r} for p, c, r in out]


if __name__ == "__main__":
    for row in triples(random.Random(0)):
        print(json.dumps(row))
