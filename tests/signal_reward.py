"""A reward that ranks the chains of a random tiny model (whose format reward is always 0): the fraction of
ASCII letters in the completion. Loaded by file path in the trainer tests, as a user's own reward would be."""


def letter_fraction(prompts, completions, images, **columns):
    return [sum(c.isascii() and c.isalpha() for c in text) / max(1, len(text)) for text in completions]
