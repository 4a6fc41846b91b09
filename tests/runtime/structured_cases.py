"""Twenty prompts, each with a JSON schema its answer must follow, for the real default model
(tests/runtime/test_real_structured.py runs them; tools/structured_check.py runs each in both
modes, streaming and not). Strings and arrays are bounded, so a constrained answer ends well
inside the token budget."""

from __future__ import annotations

NAME = {"type": "string", "minLength": 1, "maxLength": 24}
SHORT = {"type": "string", "maxLength": 40}


def _obj(props: dict, required: list[str] | None = None, **extra) -> dict:
    return {"type": "object", "properties": props, "required": list(props) if required is None else required, **extra}


CASES: list[tuple[str, dict]] = [
    ("Describe a person named Alice who is 30 years old.", _obj({"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 130}})),
    ("List three fruits.", _obj({"fruits": {"type": "array", "items": NAME, "minItems": 3, "maxItems": 3}})),
    ("Is the sky blue?", _obj({"answer": {"type": "boolean"}, "confidence": {"type": "number", "minimum": 0, "maximum": 1}})),
    ("Pick a primary color.", _obj({"color": {"enum": ["red", "yellow", "blue"]}})),
    ("What is the capital of France?", _obj({"country": NAME, "capital": NAME})),
    ("Give me a book recommendation.", _obj({"title": SHORT, "author": NAME, "year": {"type": "integer", "minimum": 1400, "maximum": 2030}})),
    ("Convert 3 kilometers to meters.", _obj({"kilometers": {"type": "number"}, "meters": {"type": "number"}})),
    ("Describe the weather in London today.", _obj({"city": NAME, "temperature_c": {"type": "integer", "minimum": -50, "maximum": 60},
                                                     "condition": {"enum": ["sunny", "cloudy", "rainy", "snowy"]}})),
    ("Name two planets and their order from the sun.",
     _obj({"planets": {"type": "array", "maxItems": 2, "minItems": 2,
                       "items": _obj({"name": NAME, "order": {"type": "integer", "minimum": 1, "maximum": 8}})}})),
    ("Create a user profile for a software engineer.",
     _obj({"username": {"type": "string", "pattern": "^[a-z][a-z0-9_]{2,11}$"}, "role": NAME,
           "skills": {"type": "array", "items": NAME, "maxItems": 3}}, required=["username", "role"])),
    ("Summarize the plot of Romeo and Juliet in one sentence.", _obj({"summary": {"type": "string", "maxLength": 120}})),
    ("Rate the movie Titanic out of 10.", _obj({"movie": NAME, "rating": {"type": "integer", "minimum": 0, "maximum": 10}})),
    ("Give the RGB values of pure green.",
     _obj({"r": {"type": "integer", "minimum": 0, "maximum": 255}, "g": {"type": "integer", "minimum": 0, "maximum": 255},
           "b": {"type": "integer", "minimum": 0, "maximum": 255}})),
    ("Write an address for a house in Paris.",
     _obj({"address": _obj({"street": SHORT, "city": NAME, "postcode": {"type": "string", "pattern": "^[0-9]{5}$"}})})),
    ("What is 12 plus 30?", _obj({"expression": SHORT, "result": {"type": "integer"}})),
    ("Translate 'hello' into Spanish and French.", _obj({"spanish": NAME, "french": NAME})),
    ("Make a shopping list with quantities.",
     {"type": "array", "minItems": 1, "maxItems": 3, "items": _obj({"item": NAME, "quantity": {"type": "integer", "minimum": 1, "maximum": 20}})}),
    ("Is a tomato a fruit or a vegetable?", _obj({"answer": {"enum": ["fruit", "vegetable"]}, "reason": SHORT})),
    ("Describe a cat using a status and an optional nickname.",
     _obj({"animal": {"const": "cat"}, "status": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9},
                                                            {"enum": ["sleeping", "awake"]}]},
           "nickname": {"anyOf": [NAME, {"type": "null"}]}})),
    ("Give two tips for learning to code, each with a priority.",
     {"$defs": {"tip": _obj({"text": SHORT, "priority": {"enum": ["high", "low"]}})},
      **_obj({"tips": {"type": "array", "items": {"$ref": "#/$defs/tip"}, "minItems": 2, "maxItems": 2}})}),
]
