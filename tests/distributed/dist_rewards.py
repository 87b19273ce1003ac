"""A reward with signal for a random tiny model (RePIC's rewards are all 0 on its gibberish)."""


def length_parity(row, text: str, prompt) -> float:
    """Deterministic, varies within a group: (characters mod 3) / 2."""
    return (len(text) % 3) / 2
