"""Stop strings, cut as the OpenAI API cuts them: the output ends just before the first occurrence of any stop
string (which is not part of it), and a stream never hands out text that later turns out to be part of one.

Text arrives in pieces (one per committed token). `StopMatcher.push` returns what may be handed out now and
whether a stop string was met: the end of the text that could still be the beginning of a stop string is held
back until the next piece decides. Work per piece: its length plus the longest stop string."""

from __future__ import annotations


class StopMatcher:
    def __init__(self, stops: tuple[str, ...] | list[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.longest = max((len(s) for s in self.stops), default=0)
        self.held = ""  # text not handed out yet: a possible beginning of a stop string
        self.stopped = False

    def push(self, text: str) -> tuple[str, bool]:
        """(text to hand out, whether a stop string was met: then nothing more comes)."""
        if self.stopped:
            return "", True
        if not self.stops:
            return text, False
        buf = self.held + text
        # earliest occurrence of any stop string: only where one can end inside the new text
        start = max(0, len(self.held) - self.longest + 1)
        cut = min((i for s in self.stops if (i := buf.find(s, start)) >= 0), default=-1)
        if cut >= 0:
            self.held, self.stopped = "", True
            return buf[:cut], True
        keep = self._possible_start(buf)
        self.held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep], False

    def flush(self) -> str:
        """At the end of the output (no stop string met): what was held back."""
        out, self.held = ("" if self.stopped else self.held), ""
        return out

    def _possible_start(self, buf: str) -> int:
        """Length of the longest end of `buf` that is a proper beginning of some stop string."""
        for k in range(min(len(buf), self.longest - 1), 0, -1):
            tail = buf[len(buf) - k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0
