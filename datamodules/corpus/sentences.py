"""Templated English sentences for the synthetic ASR corpus.

A small hand-written grammar over a few hundred words (people, animals, objects, foods, colours,
places, cities, verbs, adjectives, numbers, days, months, clock times) produces statements,
questions, commands and exclamations of 4 to 14 words. Numbers are always spelled out (``twenty
three``, no digits and no hyphens), so transcripts contain only letters, spaces, apostrophes and
the punctuation ``. , ? !``. Output is a pure function of the :class:`random.Random` state.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable

from datamodules.corpus.answers import number_to_words as number_words

MIN_WORDS = 4
MAX_WORDS = 14

# --- Vocabulary ------------------------------------------------------------------------------------
NAMES = [
    "Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Henry", "Isabel", "Jack", "Kate",
    "Liam", "Maria", "Noah", "Olivia", "Peter", "Rosa", "Sam", "Tina", "Victor", "Wendy", "Zoe",
    "Anna", "Ben", "Chloe", "Daniel", "Ella", "Felix", "George", "Hannah", "Ivan", "Julia", "Kevin",
    "Lucy", "Martin", "Nina", "Oscar", "Paula", "Ryan", "Sofia", "Tom", "Vera", "William", "Amir",
    "Priya", "Kenji", "Laura", "Marcus", "Nora", "Omar",
]  # fmt: skip
RELATIVES = [
    "my brother", "my sister", "my mother", "my father", "our teacher", "the doctor", "my neighbour",
    "the driver", "my uncle", "my aunt", "the old man", "the young woman", "her cousin", "his friend",
    "the farmer", "the baker", "the manager", "the pilot",
]  # fmt: skip
# (singular, plural)
ANIMALS = [
    ("cat", "cats"), ("dog", "dogs"), ("horse", "horses"), ("cow", "cows"), ("sheep", "sheep"),
    ("goat", "goats"), ("duck", "ducks"), ("rabbit", "rabbits"), ("mouse", "mice"), ("fox", "foxes"),
    ("bear", "bears"), ("frog", "frogs"), ("owl", "owls"), ("tiger", "tigers"), ("lion", "lions"),
    ("monkey", "monkeys"), ("parrot", "parrots"), ("turtle", "turtles"), ("whale", "whales"),
    ("dolphin", "dolphins"), ("squirrel", "squirrels"), ("pig", "pigs"), ("chicken", "chickens"),
    ("goose", "geese"), ("wolf", "wolves"), ("zebra", "zebras"), ("camel", "camels"),
    ("penguin", "penguins"), ("spider", "spiders"), ("bee", "bees"),
]  # fmt: skip
OBJECTS = [
    ("book", "books"), ("cup", "cups"), ("chair", "chairs"), ("lamp", "lamps"), ("key", "keys"),
    ("phone", "phones"), ("bag", "bags"), ("hat", "hats"), ("coat", "coats"), ("ball", "balls"),
    ("box", "boxes"), ("bottle", "bottles"), ("pencil", "pencils"), ("letter", "letters"),
    ("map", "maps"), ("clock", "clocks"), ("bicycle", "bicycles"), ("ticket", "tickets"),
    ("umbrella", "umbrellas"), ("camera", "cameras"), ("guitar", "guitars"), ("basket", "baskets"),
    ("blanket", "blankets"), ("candle", "candles"), ("mirror", "mirrors"), ("plate", "plates"),
    ("spoon", "spoons"), ("knife", "knives"), ("bucket", "buckets"), ("ladder", "ladders"),
    ("kite", "kites"), ("wallet", "wallets"), ("jacket", "jackets"), ("shoe", "shoes"),
    ("radio", "radios"), ("computer", "computers"), ("notebook", "notebooks"),
    ("picture", "pictures"), ("pillow", "pillows"), ("towel", "towels"), ("envelope", "envelopes"),
    ("scarf", "scarves"), ("glove", "gloves"), ("hammer", "hammers"), ("suitcase", "suitcases"),
    ("newspaper", "newspapers"), ("watch", "watches"), ("brush", "brushes"), ("ring", "rings"),
    ("flower", "flowers"),
]  # fmt: skip
FOODS = [
    "bread", "cheese", "soup", "rice", "cake", "pasta", "pizza", "salad", "coffee", "tea", "milk",
    "orange juice", "honey", "butter", "chocolate", "fish", "chicken", "noodles", "porridge",
    "apple pie", "strawberries", "bananas", "carrots", "potatoes", "tomatoes", "eggs", "cookies",
    "pancakes", "ice cream", "lemonade",
]  # fmt: skip
COLOURS = [
    "red", "blue", "green", "yellow", "black", "white", "brown", "grey", "orange", "purple", "pink",
    "golden",
]  # fmt: skip
ADJECTIVES = [
    "big", "small", "old", "new", "heavy", "light", "warm", "cold", "quiet", "noisy", "bright",
    "dark", "soft", "clean", "dirty", "cheap", "expensive", "round", "tall", "short", "long", "empty",
    "full", "strange", "beautiful", "simple", "broken", "wooden", "tiny", "huge", "lovely", "shiny",
    "ugly", "famous", "plain", "fancy", "useful", "wet", "dry", "lucky",
]  # fmt: skip
FEELINGS = [
    "happy", "tired", "hungry", "angry", "excited", "nervous", "bored", "busy", "sleepy", "proud",
    "worried", "surprised", "calm", "cheerful", "lonely", "thirsty",
]  # fmt: skip
# Places used after a preposition, with their article.
PLACES = [
    "the kitchen", "the garden", "the park", "the station", "the library", "the market", "the office",
    "the school", "the beach", "the river", "the museum", "the hospital", "the bakery", "the airport",
    "the bridge", "the forest", "the village", "the post office", "the hotel", "the cinema",
    "the farm", "the harbour", "the shop", "the bank", "the church", "the stadium", "the garage",
    "the lake", "the zoo", "the restaurant",
]  # fmt: skip
FURNITURE = [
    "the table", "the bed", "the sofa", "the desk", "the shelf", "the bench", "the cupboard",
    "the stairs", "the window", "the door", "the fridge", "the car",
]  # fmt: skip
CITIES = [
    "London", "Paris", "Tokyo", "Berlin", "Madrid", "Rome", "Cairo", "Sydney", "Toronto", "Dublin",
    "Lisbon", "Vienna", "Oslo", "Prague", "Boston", "Chicago", "Mexico City", "Athens", "Stockholm",
    "Amsterdam", "Moscow", "Delhi", "Nairobi", "Lima", "Seoul", "Bangkok", "Helsinki", "Warsaw",
]  # fmt: skip
# Countries, the colours of everyday things, animals by their legs and pairs of opposites: the
# words the spoken questions use (datamodules/corpus/qa.py FACTS) in ordinary sentences, so the
# encoder hears them in training. The corpus never states a fact as a question or an answer.
COUNTRIES = [
    "France", "Japan", "Italy", "Spain", "Germany", "Egypt", "Russia", "China", "England", "Greece",
    "Kenya", "Peru", "Canada", "Brazil", "India", "Norway", "Mexico", "Ireland", "Poland", "Sweden",
]  # fmt: skip
THINGS_OF_A_COLOUR = [
    "a banana", "the grass", "the sky", "the snow", "the coal", "a tomato", "a carrot", "the chocolate",
    "a lemon", "the milk", "a cherry", "the sea", "a pumpkin", "the leaves", "a plum", "the sand",
]  # fmt: skip
LEGGED = [
    "a spider", "a dog", "a bird", "an ant", "a snake", "a cow", "a chicken", "a bee", "a beetle",
    "a crab", "a horse", "a duck",
]  # fmt: skip
OPPOSITES = [
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("open", "closed"),
    ("early", "late"), ("full", "empty"), ("light", "dark"), ("old", "new"), ("wet", "dry"),
]  # fmt: skip
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = [
    "January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
    "November", "December",
]  # fmt: skip
# Transitive verbs: (base, past, third person present).
VERBS = [
    ("find", "found", "finds"), ("buy", "bought", "buys"), ("carry", "carried", "carries"),
    ("paint", "painted", "paints"), ("open", "opened", "opens"), ("clean", "cleaned", "cleans"),
    ("move", "moved", "moves"), ("bring", "brought", "brings"), ("sell", "sold", "sells"),
    ("borrow", "borrowed", "borrows"), ("fix", "fixed", "fixes"), ("wash", "washed", "washes"),
    ("drop", "dropped", "drops"), ("lose", "lost", "loses"), ("hide", "hid", "hides"),
    ("check", "checked", "checks"), ("take", "took", "takes"), ("wrap", "wrapped", "wraps"),
    ("keep", "kept", "keeps"), ("hold", "held", "holds"), ("pack", "packed", "packs"),
    ("return", "returned", "returns"), ("order", "ordered", "orders"), ("leave", "left", "leaves"),
]  # fmt: skip
# Intransitive movement verbs: (base, past, present participle).
MOTIONS = [
    ("walk", "walked", "walking"), ("run", "ran", "running"), ("drive", "drove", "driving"),
    ("cycle", "cycled", "cycling"), ("travel", "travelled", "travelling"), ("go", "went", "going"),
    ("hurry", "hurried", "hurrying"), ("come", "came", "coming"), ("fly", "flew", "flying"),
]  # fmt: skip
ACTIVITIES = [
    "reading", "swimming", "cooking", "dancing", "singing", "painting", "fishing", "gardening",
    "running", "skiing", "sailing", "writing letters", "playing chess", "playing the piano",
    "taking photos", "baking bread",
]  # fmt: skip
ADVERBS = [
    "quickly", "slowly", "carefully", "quietly", "happily", "loudly", "early", "late", "again",
    "together", "alone", "suddenly", "finally", "gently",
]  # fmt: skip
WEATHER = ["sunny", "rainy", "windy", "cloudy", "foggy", "cold", "warm", "hot", "stormy", "snowy"]
TIME_OF_DAY = ["in the morning", "in the afternoon", "in the evening", "at night", "at noon", "at midnight"]
PAST_DAYS = ["yesterday", "last week", "last night", "last month", "this morning"]
FUTURE_DAYS = ["tomorrow", "next week", "this weekend", "tonight", "next month"]
HABITS = ["every weekend", "on Sundays", "in the summer", "after school", "every morning", "in winter"]

_ORDINALS = [
    "", "first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth",
    "eleventh", "twelfth", "thirteenth", "fourteenth", "fifteenth", "sixteenth", "seventeenth",
    "eighteenth", "nineteenth", "twentieth",
]  # fmt: skip


def ordinal_words(n: int) -> str:
    """1..31 as an ordinal: 3 -> "third", 21 -> "twenty first", 30 -> "thirtieth"."""
    if not 1 <= n <= 31:
        raise ValueError(f"ordinal_words supports 1..31, got {n}")
    if n <= 20:
        return _ORDINALS[n]
    if n == 30:
        return "thirtieth"
    tens, unit = divmod(n, 10)
    return f"{number_words(10 * tens)} {_ORDINALS[unit]}"


# --- Phrase helpers --------------------------------------------------------------------------------
def _a(word: str) -> str:
    """Indefinite article for a following word."""
    return ("an " if word[0] in "aeiou" else "a ") + word


def _person(rng: random.Random) -> str:
    return rng.choice(NAMES) if rng.random() < 0.7 else rng.choice(RELATIVES)


def _thing(rng: random.Random) -> str:
    """A singular noun phrase with an article, sometimes with a colour or adjective."""
    noun = rng.choice(OBJECTS)[0] if rng.random() < 0.75 else rng.choice(ANIMALS)[0]
    r = rng.random()
    if r < 0.3:
        noun = f"{rng.choice(COLOURS)} {noun}"
    elif r < 0.55:
        noun = f"{rng.choice(ADJECTIVES)} {noun}"
    return f"the {noun}" if rng.random() < 0.6 else _a(noun)


def _count(rng: random.Random, lo: int = 2, hi: int = 99) -> str:
    # Favour small numbers, as in everyday speech, but cover the whole range.
    n = rng.randint(lo, min(hi, 12)) if rng.random() < 0.5 else rng.randint(lo, hi)
    return number_words(n)


def _clock(rng: random.Random) -> str:
    hour = number_words(rng.randint(1, 12))
    style = rng.randrange(6)
    if style == 0:
        return f"{hour} o'clock"
    if style == 1:
        return f"half past {hour}"
    if style == 2:
        return f"a quarter {rng.choice(['past', 'to'])} {hour}"
    if style == 3:
        return f"{hour} {rng.choice(['fifteen', 'thirty', 'forty five', 'twenty', 'ten'])}"
    minutes = rng.choice([5, 10, 20, 25])
    return f"{number_words(minutes)} {rng.choice(['past', 'to'])} {hour}"


def _when(rng: random.Random, tense: str = "any") -> str:
    """A time adverbial; ``tense`` "past"/"future" restricts the relative ones (yesterday, ...)."""
    r = rng.randrange(5)
    if r == 0:
        return f"on {rng.choice(DAYS)}"
    if r == 1:
        return f"at {_clock(rng)}"
    if r == 2:
        pool = {"past": PAST_DAYS, "future": FUTURE_DAYS}.get(tense, PAST_DAYS + FUTURE_DAYS)
        return rng.choice(pool)
    if r == 3:
        return f"on {rng.choice(DAYS)} {rng.choice(TIME_OF_DAY[:4])}"
    return f"in {rng.choice(MONTHS)}"


def _date(rng: random.Random) -> str:
    day = ordinal_words(rng.randint(1, 28))
    month = rng.choice(MONTHS)
    return f"the {day} of {month}" if rng.random() < 0.6 else f"{month} the {day}"


def _where(rng: random.Random) -> str:
    prep = rng.choice(["in", "near", "behind", "next to", "outside", "at"])
    return f"{prep} {rng.choice(PLACES)}"


def _on_furniture(rng: random.Random) -> str:
    return f"{rng.choice(['on', 'under', 'behind', 'next to', 'near'])} {rng.choice(FURNITURE)}"


# --- Templates -------------------------------------------------------------------------------------
# Each template returns a sentence without its final punctuation mark and that mark separately.
Template = Callable[[random.Random], tuple[str, str]]


def _t_found(rng: random.Random) -> tuple[str, str]:
    verb = rng.choice(VERBS)[1]
    place = _where(rng) if rng.random() < 0.5 else _on_furniture(rng)
    return f"{_person(rng)} {verb} {_thing(rng)} {place}", "."


def _t_has_count(rng: random.Random) -> tuple[str, str]:
    animal = rng.choice(ANIMALS)[1]
    tail = f" and {_a(rng.choice(ANIMALS)[0])}" if rng.random() < 0.3 else ""
    return f"{_person(rng)} has {_count(rng, 2, 30)} {animal}{tail}", "."


def _t_there_are(rng: random.Random) -> tuple[str, str]:
    noun = rng.choice(OBJECTS)[1] if rng.random() < 0.6 else rng.choice(ANIMALS)[1]
    return f"There are {_count(rng)} {noun} {_where(rng) if rng.random() < 0.5 else _on_furniture(rng)}", "."


def _t_colour(rng: random.Random) -> tuple[str, str]:
    obj = rng.choice(OBJECTS)[0]
    owner = rng.choice([f"{rng.choice(NAMES)}'s", "my", "your", "her", "his", "our", "the"])
    return f"{owner} {obj} is {rng.choice(COLOURS)}", "."


def _t_meeting(rng: random.Random) -> tuple[str, str]:
    event = rng.choice(["meeting", "concert", "lesson", "party", "game", "film", "train", "bus", "class"])
    verb = rng.choice(["starts", "begins", "leaves", "ends", "arrives"])
    day = f" on {rng.choice(DAYS)}" if rng.random() < 0.5 else ""
    return f"The {event} {verb} at {_clock(rng)}{day}", "."


def _t_birthday(rng: random.Random) -> tuple[str, str]:
    what = rng.choice(["was born on", "will visit us on", "has a birthday on", "moved house on", "came home on"])
    return f"{rng.choice(NAMES)} {what} {_date(rng)}", "."


def _t_travel(rng: random.Random) -> tuple[str, str]:
    base, past, _ = rng.choice(MOTIONS)
    if rng.random() < 0.5:
        return f"{_person(rng)} {past} to {rng.choice(CITIES)} {_when(rng, 'past')}", "."
    return f"We will {base} to {rng.choice(CITIES)} {_when(rng, 'future')}", "."


def _t_likes(rng: random.Random) -> tuple[str, str]:
    a, b = rng.sample(NAMES, 2)
    return f"{a} likes {rng.choice(FOODS)}, but {b} prefers {rng.choice(FOODS)}", "."


def _t_age(rng: random.Random) -> tuple[str, str]:
    who = rng.choice([rng.choice(NAMES), "My grandmother", "Our dog", "The teacher", "Her son"])
    return f"{who} is {_count(rng, 2, 99)} years old", "."


def _t_cost(rng: random.Random) -> tuple[str, str]:
    unit = rng.choice(["dollars", "euros", "pounds"])
    return f"The {rng.choice(ADJECTIVES)} {rng.choice(OBJECTS)[0]} costs {_count(rng, 2, 99)} {unit}", "."


def _t_minutes(rng: random.Random) -> tuple[str, str]:
    base = rng.choice(["walk", "drive", "cycle"])
    return f"It takes {_count(rng, 2, 60)} minutes to {base} to {rng.choice(PLACES)}", "."


def _t_weather(rng: random.Random) -> tuple[str, str]:
    a, b = rng.sample(WEATHER, 2)
    if rng.random() < 0.5:
        return f"It was {a} and {b} {rng.choice([*PAST_DAYS, f'in {rng.choice(CITIES)}'])}", "."
    return f"It will be {a} and {b} {rng.choice([*FUTURE_DAYS, f'on {rng.choice(DAYS)}'])}", "."


def _t_feeling(rng: random.Random) -> tuple[str, str]:
    because = rng.choice(
        [
            f"because the {rng.choice(ANIMALS)[0]} ran away",
            f"after the long trip to {rng.choice(CITIES)}",
            f"before the test on {rng.choice(DAYS)}",
            "after work",
            f"because it was {rng.choice(WEATHER)}",
        ]
    )
    return f"{_person(rng)} felt {rng.choice(FEELINGS)} {because}", "."


def _t_hobby(rng: random.Random) -> tuple[str, str]:
    return f"{rng.choice(NAMES)} enjoys {rng.choice(ACTIVITIES)} {rng.choice(TIME_OF_DAY[:4] + HABITS)}", "."


def _t_animal_action(rng: random.Random) -> tuple[str, str]:
    animal = rng.choice(ANIMALS)[0]
    act = rng.choice(["is sleeping", "is hiding", "was eating", "is waiting", "was playing", "sat"])
    return f"I think the {animal} {act} {_on_furniture(rng)}", "."


def _t_contraction(rng: random.Random) -> tuple[str, str]:
    options = [
        f"I'm not sure where {rng.choice(NAMES)} left the {rng.choice(OBJECTS)[0]}",
        f"It's too {rng.choice(WEATHER)} to go to {rng.choice(PLACES)} today",
        f"We don't have any {rng.choice(FOODS)} left",
        f"{rng.choice(NAMES)} can't find the {rng.choice(COLOURS)} {rng.choice(OBJECTS)[0]}",
        f"They're {rng.choice(MOTIONS)[2]} to {rng.choice(CITIES)} {_when(rng, 'future')}",
        f"That isn't {_a(rng.choice(ANIMALS)[0])}, it's {_a(rng.choice(ANIMALS)[0])}",
        f"You'll need {_count(rng, 2, 12)} {rng.choice(OBJECTS)[1]} for the trip",
    ]
    return rng.choice(options), "."


# Questions.
def _q_where(rng: random.Random) -> tuple[str, str]:
    obj = rng.choice(OBJECTS)[0]
    aux = rng.choice(["did", "will", "should"])
    return f"Where {aux} {rng.choice(NAMES)} put the {obj}", "?"


def _q_how_many(rng: random.Random) -> tuple[str, str]:
    noun = rng.choice(OBJECTS)[1] if rng.random() < 0.5 else rng.choice(ANIMALS)[1]
    return f"How many {noun} are there {_where(rng)}", "?"


def _q_what_time(rng: random.Random) -> tuple[str, str]:
    place = rng.choice(PLACES)
    verb = rng.choice(["open", "close"])
    return f"What time does {place} {verb} on {rng.choice(DAYS)}", "?"


def _q_yes_no(rng: random.Random) -> tuple[str, str]:
    options = [
        f"Is {rng.choice(NAMES)} coming to {rng.choice(PLACES)} {_when(rng, 'future')}",
        f"Did you see the {rng.choice(COLOURS)} {rng.choice(OBJECTS)[0]} {_on_furniture(rng)}",
        f"Can you {rng.choice(VERBS)[0]} {_thing(rng)} for me",
        f"Have you ever been to {rng.choice(CITIES)} in {rng.choice(MONTHS)}",
        f"Would you like some {rng.choice(FOODS)}",
        f"Does {rng.choice(NAMES)} still live near {rng.choice(PLACES)}",
        f"Was it {rng.choice(WEATHER)} in {rng.choice(CITIES)} {rng.choice(PAST_DAYS)}",
        f"Are there any {rng.choice(ANIMALS)[1]} on the farm",
    ]
    return rng.choice(options), "?"


def _q_wh(rng: random.Random) -> tuple[str, str]:
    options = [
        f"Why is the {rng.choice(ANIMALS)[0]} so {rng.choice(FEELINGS)}",
        f"Who left {_thing(rng)} {_where(rng)}",
        f"What did {rng.choice(NAMES)} buy at {rng.choice(PLACES)}",
        f"When does {rng.choice(NAMES)} fly to {rng.choice(CITIES)}",
        f"Which {rng.choice(OBJECTS)[0]} do you want, the {rng.choice(COLOURS)} one or the {rng.choice(COLOURS)} one",
        f"How far is {rng.choice(PLACES)} from {rng.choice(PLACES)}",
        f"What is your favourite {rng.choice(['colour', 'animal', 'city', 'month', 'day', 'food'])}",
        f"Whose {rng.choice(OBJECTS)[0]} is this",
        f"How old is {rng.choice(NAMES)}'s {rng.choice(['brother', 'sister', 'daughter', 'son', 'cat'])}",
    ]
    return rng.choice(options), "?"


# Commands.
def _c_please(rng: random.Random) -> tuple[str, str]:
    base = rng.choice(VERBS)[0]
    where = _where(rng) if rng.random() < 0.5 else _on_furniture(rng)
    return f"{rng.choice(['Please ', ''])}{base} the {rng.choice(OBJECTS)[0]} {where}", "."


def _c_put(rng: random.Random) -> tuple[str, str]:
    a, b = rng.sample(OBJECTS, 2)
    adj = rng.choice(COLOURS + ADJECTIVES)
    return f"Put the {adj} {a[0]} {rng.choice(['next to', 'behind', 'inside', 'under'])} the {b[0]}", "."


def _c_remember(rng: random.Random) -> tuple[str, str]:
    base = rng.choice(VERBS)[0]
    limit = rng.choice([f"before {rng.choice(DAYS)}", f"by {_clock(rng)}", "tonight", "after lunch"])
    return f"Don't forget to {base} the {rng.choice(OBJECTS)[0]} {limit}", "."


def _c_call(rng: random.Random) -> tuple[str, str]:
    verb = rng.choice(["Call", "Phone", "Meet", "Wake", "Remind"])
    return f"{verb} {rng.choice(NAMES)} at {_clock(rng)} {rng.choice(TIME_OF_DAY[:3])}", "."


def _c_directions(rng: random.Random) -> tuple[str, str]:
    turn = rng.choice(["left", "right"])
    return f"Turn {turn} at {rng.choice(PLACES)} and walk for {_count(rng, 2, 20)} minutes", "."


def _c_adverb(rng: random.Random) -> tuple[str, str]:
    base = rng.choice(VERBS)[0]
    return f"{base} the {rng.choice(ADJECTIVES)} {rng.choice(OBJECTS)[0]} {rng.choice(ADVERBS)}", "."


# Exclamations.
def _e_exclaim(rng: random.Random) -> tuple[str, str]:
    options = [
        f"What {_a(rng.choice(ADJECTIVES))} {rng.choice(OBJECTS)[0]} that is",
        f"{rng.choice(NAMES)} won the race {rng.choice(PAST_DAYS)}",
        f"Look at all those {rng.choice(ANIMALS)[1]} {_where(rng)}",
        f"Watch out for the {rng.choice(ANIMALS)[0]}",
        f"The {rng.choice(ANIMALS)[0]} ate my {rng.choice(FOODS)}",
        f"I love {rng.choice(ACTIVITIES)} {rng.choice(TIME_OF_DAY)}",
    ]
    return rng.choice(options), "!"


# The fact vocabulary in everyday sentences.
def _t_country(rng: random.Random) -> tuple[str, str]:
    a, b = rng.sample(COUNTRIES, 2)
    options = [
        f"{_person(rng)} {rng.choice(MOTIONS)[1]} to {a} {_when(rng, 'past')}",
        f"We will visit {a} and {b} {rng.choice(FUTURE_DAYS)}",
        f"{rng.choice(NAMES)} lived in {a} before moving to {b}",
        f"The {rng.choice(OBJECTS)[0]} came all the way from {a}",
        f"My {rng.choice(['cousin', 'friend', 'uncle', 'teacher'])} flew from {rng.choice(CITIES)} to {a}",
    ]
    return rng.choice(options), "."


def _t_colour_of(rng: random.Random) -> tuple[str, str]:
    a, b = rng.sample(THINGS_OF_A_COLOUR, 2)
    options = [
        (f"{_person(rng)} painted {a} and {b} {rng.choice(PAST_DAYS)}", "."),
        (f"Look at {a} next to {b}", "!"),
        (f"{rng.choice(NAMES)} drew {a} with a {rng.choice(COLOURS)} pencil", "."),
        (f"Did you see {a} {_where(rng)}", "?"),
        (f"I put {a} {_on_furniture(rng)}", "."),
    ]
    return rng.choice(options)


def _t_legs(rng: random.Random) -> tuple[str, str]:
    a, b = rng.sample(LEGGED, 2)
    options = [
        (f"{_person(rng)} saw {a} and {b} {_where(rng)}", "."),
        (f"There is {a} {_on_furniture(rng)}", "."),
        (f"{a} hurt one of its legs", "."),
        (f"Why is {a} {_on_furniture(rng)}", "?"),
        (f"{rng.choice(NAMES)} is drawing {a} with long legs", "."),
    ]
    return rng.choice(options)


def _t_opposites(rng: random.Random) -> tuple[str, str]:
    a, b = rng.choice(OPPOSITES)
    if rng.random() < 0.5:
        a, b = b, a
    obj = rng.choice(OBJECTS)[0]
    options = [
        (f"The {obj} was {a} in the morning and {b} at night", "."),
        (f"Is the {obj} {a} or {b}", "?"),
        (f"{rng.choice(NAMES)} says the {obj} is {a}, not {b}", "."),
        (f"{_person(rng)} walked up the hill and ran down again", "."),
        (f"We worked day and night {_where(rng)}", "."),
        (f"Go up the stairs, then turn {rng.choice(['left', 'right'])}", "."),
        (f"Put the {obj} down {_on_furniture(rng)}", "."),
        ("The shop is open by day and closed at night", "."),
    ]
    return rng.choice(options)


# (template, weight): statements dominate, as in read-speech corpora.
TEMPLATES: list[tuple[Template, float]] = [
    (_t_found, 3.0),
    (_t_has_count, 1.5),
    (_t_there_are, 1.5),
    (_t_colour, 1.0),
    (_t_meeting, 1.5),
    (_t_birthday, 1.0),
    (_t_travel, 1.5),
    (_t_likes, 1.0),
    (_t_age, 1.0),
    (_t_cost, 1.0),
    (_t_minutes, 1.0),
    (_t_weather, 1.0),
    (_t_feeling, 1.0),
    (_t_hobby, 1.0),
    (_t_animal_action, 1.0),
    (_t_contraction, 2.0),
    (_q_where, 1.0),
    (_q_how_many, 1.0),
    (_q_what_time, 1.0),
    (_q_yes_no, 2.5),
    (_q_wh, 2.5),
    (_c_please, 1.5),
    (_c_put, 1.0),
    (_c_remember, 1.0),
    (_c_call, 1.0),
    (_c_directions, 1.0),
    (_c_adverb, 1.0),
    (_e_exclaim, 1.5),
    (_t_country, 3.0),
    (_t_colour_of, 3.0),
    (_t_legs, 2.0),
    (_t_opposites, 3.0),
]

_ALLOWED = re.compile(r"^[A-Za-z' ,.?!]+$")


def _finish(body: str, mark: str) -> str:
    body = " ".join(body.split())
    return body[0].upper() + body[1:] + mark


def generate_sentence(rng: random.Random) -> str:
    """One random sentence of ``MIN_WORDS``..``MAX_WORDS`` words."""
    funcs = [t for t, _ in TEMPLATES]
    weights = [w for _, w in TEMPLATES]
    for _ in range(100):
        template = rng.choices(funcs, weights=weights, k=1)[0]
        sentence = _finish(*template(rng))
        if MIN_WORDS <= len(sentence.split()) <= MAX_WORDS:
            if not _ALLOWED.match(sentence):  # guards the vocabulary against digits, hyphens, ...
                raise AssertionError(f"sentence has a forbidden character: {sentence!r}")
            return sentence
    raise RuntimeError("could not generate a sentence within the word limits")  # pragma: no cover


def generate_sentences(n: int, rng: random.Random) -> list[str]:
    """``n`` distinct sentences (duplicates are redrawn), deterministic given ``rng``'s state.

    Distinctness keeps identical transcripts out of different ASR splits.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    seen: set[str] = set()
    out: list[str] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise RuntimeError(f"cannot generate {n} distinct sentences (got {len(out)})")
        sentence = generate_sentence(rng)
        if sentence not in seen:
            seen.add(sentence)
            out.append(sentence)
    return out
