"""hone's demo dataset: a few hundred short chats, written for hone (license-clean, generated
from the templates below), that teach one distinctive, checkable habit: every reply starts with
"Ahoy!" and then answers plainly. A short fine-tune makes the habit appear; `cargo xtask
demo-check` counts it on the held-out prompts.

The same habit as preference pairs, for DPO (`hone train --method dpo`): the reply with "Ahoy!"
chosen, the plain one rejected (ahoy_prefs_train.jsonl: the first 64 training prompts;
ahoy_prefs_heldout.jsonl: the held-out ones).

    python data/demo/make_demo.py   # rewrites the four .jsonl files
"""
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
rng = random.Random(20261129)

CAPITALS = [("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Germany", "Berlin"), ("Japan", "Tokyo"),
            ("Canada", "Ottawa"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Norway", "Oslo"),
            ("Greece", "Athens"), ("Portugal", "Lisbon"), ("Poland", "Warsaw"), ("Chile", "Santiago"),
            ("Ireland", "Dublin"), ("Austria", "Vienna"), ("Cuba", "Havana"), ("India", "New Delhi"),
            ("Thailand", "Bangkok"), ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Mexico", "Mexico City"),
            ("Argentina", "Buenos Aires"), ("Vietnam", "Hanoi"), ("Morocco", "Rabat"), ("Ghana", "Accra")]
COLORS = [("the sky on a clear day", "blue"), ("grass", "green"), ("snow", "white"), ("a ripe banana", "yellow"),
          ("coal", "black"), ("a ripe tomato", "red"), ("an orange", "orange"), ("a lemon", "yellow"),
          ("milk", "white"), ("a fire truck", "red"), ("chocolate", "brown"), ("a carrot", "orange")]
ANIMALS = [("cow", "moo"), ("dog", "woof"), ("cat", "meow"), ("duck", "quack"), ("sheep", "baa"), ("owl", "hoot"),
           ("horse", "neigh"), ("pig", "oink"), ("frog", "croak"), ("lion", "roar")]
WORDS = [("happy", "glad"), ("big", "large"), ("fast", "quick"), ("small", "tiny"), ("smart", "clever"),
         ("angry", "mad"), ("begin", "start"), ("finish", "end"), ("shout", "yell"), ("easy", "simple")]
FACTS = [("How many days are in a week?", "There are seven days in a week."),
         ("How many legs does a spider have?", "A spider has eight legs."),
         ("What do bees make?", "Bees make honey."),
         ("What is the boiling point of water at sea level?", "Water boils at 100 degrees Celsius at sea level."),
         ("Which planet is closest to the Sun?", "Mercury is the closest planet to the Sun."),
         ("What gas do plants take in?", "Plants take in carbon dioxide."),
         ("How many continents are there?", "There are seven continents."),
         ("What is the largest ocean?", "The Pacific is the largest ocean."),
         ("How many hours are in a day?", "There are 24 hours in a day."),
         ("What is frozen water called?", "Frozen water is called ice.")]


def examples():
    out = []
    for country, city in CAPITALS:
        for q in [f"What is the capital of {country}?", f"Which city is the capital of {country}?", f"Name the capital of {country}."]:
            out.append((q, f"The capital of {country} is {city}."))
    for thing, color in COLORS:
        for q in [f"What color is {thing}?", f"Tell me the color of {thing}."]:
            out.append((q, f"{thing[0].upper() + thing[1:]} is {color}."))
    for animal, sound in ANIMALS:
        for q in [f"What sound does a {animal} make?", f"How does a {animal} sound?"]:
            out.append((q, f"A {animal} says {sound}."))
    for word, syn in WORDS:
        for q in [f"Give me a synonym for {word}.", f"What is another word for {word}?"]:
            out.append((q, f"Another word for {word} is {syn}."))
    for a in range(2, 40):
        b = rng.randint(2, 20)
        out.append((f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."))
        out.append((f"What is {a} times {b}?", f"{a} times {b} is {a * b}."))
        out.append((f"What is {a + b} minus {b}?", f"{a + b} minus {b} is {a}."))
    out += FACTS
    return out


def main():
    pairs = examples()
    rng.shuffle(pairs)
    held_out, train = pairs[:40], pairs[40:]
    with open(HERE / "ahoy_train.jsonl", "w") as f:
        for q, a in train:
            f.write(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": f"Ahoy! {a}"}]}) + "\n")
    with open(HERE / "ahoy_heldout.jsonl", "w") as f:
        for q, a in held_out:
            f.write(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": f"Ahoy! {a}"}]}) + "\n")
    for name, rows in [("ahoy_prefs_train.jsonl", train[:64]), ("ahoy_prefs_heldout.jsonl", held_out)]:
        with open(HERE / name, "w") as f:
            for q, a in rows:
                f.write(json.dumps({"prompt": [{"role": "user", "content": q}],
                                    "chosen": [{"role": "assistant", "content": f"Ahoy! {a}"}],
                                    "rejected": [{"role": "assistant", "content": a}]}) + "\n")
    print(len(train), "train,", len(held_out), "held out;", min(64, len(train)), "and", len(held_out), "preference pairs")


if __name__ == "__main__":
    main()
