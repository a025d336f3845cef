"""Templated multi-turn conversations: the generated part of the `chat` domain.

`chatterbot-corpus` holds only ~210 K characters of English chat, so the `chat` domain is grown with
conversations built here from templates: a user and an assistant talk through one everyday task
(booking a table, fixing a Wi-Fi connection, planning a trip, ...), with slots (names, places,
times, quantities) and phrasings drawn at random. They are *synthetic*, and labelled so: their
source ids start with `chat-template:`; the chatterbot ones start with `chatterbot:`.

A document is one session of a few conversations, rendered like the chatterbot ones
('User: ...' / 'Assistant: ...' lines, a blank line between conversations).
Session i is drawn from `random.Random(f"chat:{seed}:{i}")`, so it is the same in every process.
"""

from __future__ import annotations

import random
from typing import Callable, Iterator

_CITIES = ["Lisbon", "Nairobi", "Osaka", "Toronto", "Lima", "Oslo", "Hanoi", "Seville", "Dublin", "Accra",
           "Krakow", "Melbourne", "Denver", "Tunis", "Bergen", "Quito"]
_NAMES = ["Maya", "Tom", "Priya", "Diego", "Sofia", "Kwame", "Yuki", "Lars", "Amira", "Noah", "Zofia", "Ravi"]
_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
_TIMES = ["9:00", "10:30", "12:15", "13:00", "15:45", "17:30", "19:00", "20:15"]
_WEATHER = ["sunny", "cloudy", "rainy", "windy", "foggy", "snowy", "stormy", "mild and clear"]
_CUISINES = ["Italian", "Thai", "Ethiopian", "Mexican", "Japanese", "Lebanese", "Indian", "Peruvian"]
_DEVICES = ["laptop", "phone", "printer", "tablet", "smart TV", "router", "desktop computer"]
_PROBLEMS = ["won't connect to the Wi-Fi", "keeps freezing", "is very slow", "won't turn on",
             "shows an error about storage", "has no sound", "keeps restarting"]
_DISHES = {"pancakes": ["flour", "milk", "eggs", "a pinch of salt"],
           "tomato soup": ["tomatoes", "an onion", "garlic", "vegetable stock"],
           "fried rice": ["cooked rice", "eggs", "spring onions", "soy sauce"],
           "lentil curry": ["red lentils", "coconut milk", "curry paste", "spinach"],
           "banana bread": ["ripe bananas", "flour", "butter", "brown sugar"]}
_ITEMS = ["jacket", "pair of headphones", "coffee maker", "backpack", "desk lamp", "pair of running shoes"]
_GENRES = ["mystery", "science fiction", "history", "comedy", "fantasy", "biography"]
_SUBJECTS = ["chemistry", "French", "statistics", "guitar", "programming", "geography"]


def _greeting(rng: random.Random) -> list[str]:
    name = rng.choice(_NAMES)
    remark, reply = rng.choice([("I just wanted to chat for a minute.", "I am happy to chat."),
                                ("I am having a slow day.", "Slow days are fine sometimes."),
                                ("I am new here.", "Welcome!")])
    mood, answer = rng.choice([("Pretty good, thanks for asking.", "Glad to hear it."),
                               ("Busy, but I am getting through it.", "Keep going, you are nearly there."),
                               ("Quiet so far.", "A quiet day can be a good thing.")])
    return [rng.choice(["Hi there!", "Hello!", "Good morning.", "Hey, are you around?"]),
            rng.choice(["Hello! How can I help you today?", "Hi! What can I do for you?", "Good to see you. What's up?"]),
            f"My name is {name}. {remark}",
            f"Nice to meet you, {name}. {reply} " + rng.choice(["How has your week been?", "How is your day going?"]),
            mood, f"{answer} Let me know if you need anything."]


def _weather(rng: random.Random) -> list[str]:
    city, day, sky = rng.choice(_CITIES), rng.choice(_DAYS), rng.choice(_WEATHER)
    low = rng.randint(-5, 20)
    high = low + rng.randint(3, 12)
    return [f"What will the weather be like in {city} on {day}?",
            f"The forecast for {city} on {day} says {sky}, with temperatures between {low} and {high} degrees Celsius.",
            rng.choice(["Should I bring an umbrella?", "Is it a good day for a walk?", "Do I need a warm coat?"]),
            ("Yes, take an umbrella just in case." if sky in ("rainy", "stormy") else
             "A warm coat would be wise." if high < 8 else "It looks fine for being outside, just check again that morning."),
            "Thanks!", rng.choice(["You're welcome. Enjoy your day!", "Any time. Stay dry!"])]


def _restaurant(rng: random.Random) -> list[str]:
    people, day, time, cuisine = rng.randint(2, 8), rng.choice(_DAYS), rng.choice(_TIMES), rng.choice(_CUISINES)
    name = rng.choice(_NAMES)
    other_time = rng.choice([t for t in _TIMES if t != time])
    turns = [f"I'd like to book a table for {people} at an {cuisine} place on {day}." if cuisine[0] in "AEIOU"
             else f"I'd like to book a table for {people} at a {cuisine} place on {day}.",
             f"Sure. What time would you like the table for {people}?", f"Around {time}, please."]
    if rng.random() < 0.5:
        turns += [f"{time} is fully booked, but I can offer {other_time}. Would that work?",
                  rng.choice(["Yes, that works.", "Fine, let's do that."])]
        time = other_time
    turns += ["Great. What name should I put the booking under?", f"{name}.",
              f"Done: a table for {people} on {day} at {time}, under the name {name}.",
              rng.choice(["Perfect, thank you.", "Thanks a lot!"]), "Enjoy your meal!"]
    return turns


def _travel(rng: random.Random) -> list[str]:
    origin, destination = rng.sample(_CITIES, 2)
    day, nights = rng.choice(_DAYS), rng.randint(2, 10)
    seat = rng.choice(["window", "aisle"])
    return [f"Can you help me plan a trip from {origin} to {destination}?",
            "Of course. When would you like to leave, and how long will you stay?",
            f"I want to leave on {day} and stay {nights} nights.",
            f"Got it: leaving {origin} on {day}, {nights} nights in {destination}. Do you prefer a window or an aisle seat?",
            f"{seat.capitalize()}, please.",
            f"Noted, a {seat} seat. Would you like hotel suggestions in {destination} as well?",
            rng.choice(["Yes, something close to the centre.", "No thanks, I am staying with friends."]),
            "All right. I have saved the plan; you can ask me to change any part of it."]


def _tech_support(rng: random.Random) -> list[str]:
    device, problem = rng.choice(_DEVICES), rng.choice(_PROBLEMS)
    steps = rng.sample(["restart it", "check for software updates", "unplug it for thirty seconds",
                        "free up some storage space", "reset the network settings"], 2)
    fixed = rng.random() < 0.6
    return [f"My {device} {problem}. Can you help?",
            f"I'm sorry to hear that. First, try to {steps[0]}. Did that change anything?",
            "No, it's still the same.",
            f"Okay. Next, please {steps[1]} and tell me what happens.",
            "That fixed it, thank you!" if fixed else "Still no luck.",
            "Great, I'm glad it works again." if fixed else
            f"Then the {device} may need a repair. I can book an appointment with a technician if you like."]


def _recipe(rng: random.Random) -> list[str]:
    dish = rng.choice(sorted(_DISHES))
    ingredients = _DISHES[dish]
    servings = rng.randint(2, 6)
    return [f"How do I make {dish}?",
            f"For {dish} you need {', '.join(ingredients[:-1])} and {ingredients[-1]}. How many people are you cooking for?",
            f"{servings} people.",
            f"Then use enough {ingredients[0]} for {servings} portions, combine everything step by step, and taste as you go.",
            *rng.choice([("How long does it take?", "About thirty to forty minutes in total."),
                         ("Can I make it ahead of time?", "Yes, it keeps well in the fridge for a day or two.")])]


def _shopping_return(rng: random.Random) -> list[str]:
    item, order = rng.choice(_ITEMS), rng.randint(10000, 99999)
    reason = rng.choice(["it arrived damaged", "it is the wrong size", "I changed my mind", "it stopped working"])
    days = rng.randint(3, 40)
    ok = days <= 30
    return [f"I want to return a {item} I bought.", "I can help with that. What is the order number?",
            f"It's {order}.", f"Thanks. Order {order} was delivered {days} days ago. Why are you returning it?",
            f"Because {reason}.",
            ("You are within the 30-day return window, so I have started the return. You will get a shipping label by email."
             if ok else "I'm sorry, the 30-day return window has passed, but I can pass your case to a manager."),
            "Okay, thank you."]


def _meeting(rng: random.Random) -> list[str]:
    person, (day, other_day) = rng.choice(_NAMES), rng.sample(_DAYS[:5], 2)
    time = rng.choice(_TIMES)
    return [f"Can you schedule a meeting with {person} on {day}?",
            f"{person} is busy on {day}. {other_day} at {time} is free for both of you. Shall I book it?",
            "Yes, please, and make it thirty minutes.",
            f"Booked: a thirty-minute meeting with {person} on {other_day} at {time}. I have sent the invitation.",
            rng.choice(["Thanks.", "Perfect."])]


def _recommendation(rng: random.Random) -> list[str]:
    genre, other = rng.sample(_GENRES, 2)
    medium = rng.choice(["book", "film", "podcast"])
    return [f"Can you recommend a good {medium}?", "Sure. What kind of thing do you usually enjoy?",
            f"I like {genre}, but not too long.",
            f"Then try a short {genre} {medium} with a strong first chapter; if it grabs you, there are usually sequels.",
            f"What if I want something different, like {other}?",
            f"{other.capitalize()} is a good change of pace. Start with something well reviewed and light."]


def _study_help(rng: random.Random) -> list[str]:
    subject, minutes = rng.choice(_SUBJECTS), rng.choice([15, 20, 30, 45])
    return [f"I'm struggling to learn {subject}. Any tips?",
            f"Practise a little every day: {minutes} minutes daily works better than one long session a week.",
            "How do I stay motivated?",
            "Set one small goal for each session and keep a note of what you finished.",
            rng.choice(["That makes sense.", "I'll try that.", "Good idea, thanks."]),
            f"Good luck with your {subject}!"]


TOPICS: tuple[Callable[[random.Random], list[str]], ...] = (
    _greeting, _weather, _restaurant, _travel, _tech_support, _recipe, _shopping_return, _meeting,
    _recommendation, _study_help)


def render_conversation(turns) -> str:
    """Alternating speakers, one turn per line: 'User: ...', then 'Assistant: ...', and so on."""
    roles = ("User", "Assistant")
    return "".join(f"{roles[i % 2]}: {' '.join(str(turn).split())}\n" for i, turn in enumerate(turns))


def templated_conversations(seed: int = 0, conversations_per_session: tuple[int, int] = (3, 6)
                            ) -> Iterator[tuple[str, str]]:
    """Endless (source_id, text) sessions; session i depends only on (seed, i)."""
    index = 0
    while True:
        rng = random.Random(f"chat:{seed}:{index}")
        blocks = [render_conversation(rng.choice(TOPICS)(rng)) for _ in range(rng.randint(*conversations_per_session))]
        yield f"chat-template:{seed}:{index:06d}", "\n".join(blocks)
        index += 1
