"""Stop sequences matched on the generated text, across token boundaries and inside a token.

TGI keeps the stop text in the output and, unlike TGI's end-anchored check, a stop string that ends
in the middle of a token's text is found too.
"""

from __future__ import annotations


class StopMatcher:
    __slots__ = ("stops", "keep", "tail")

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.keep = max(len(s) for s in stops) - 1
        self.tail = ""

    def feed(self, text: str) -> bool:
        """Add a token's text; True once any stop sequence has appeared."""
        window = self.tail + text
        if any(s in window for s in self.stops):
            return True
        self.tail = window[-self.keep:] if self.keep else ""
        return False
