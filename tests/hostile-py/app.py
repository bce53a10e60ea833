"""The hostile suite's main cases written in Python: one component, the case
picked by the request's `case` config (the tests give each case its own
manifest and budgets). Each must be contained by the host with the same
typed error as its Rust counterpart in tests/hostile/.
"""

import sys

from tessera_sdk import Strategy, generate, params, response, user
from tessera_sdk.config import Config


def deep(n):
    return deep(n + 1) + 1


class WitWorld(Strategy):
    def run(self, req):
        case = Config.for_request(req).get("case") or ""
        if case == "infinite-loop":
            n = 0
            while True:
                n += 1
        if case == "memory-bomb":
            hoard = []
            while True:
                hoard.append(bytearray(1 << 20))
        if case == "deep-recursion":
            # Past the interpreter's own guard: frames until the C stack or
            # the memory cap gives out.
            sys.setrecursionlimit(1 << 30)
            return response(str(deep(0)))
        if case == "forbidden-model":
            g = generate("smollm2-135m-instruct", user("hi"), params(max_tokens=4))
            return response(g.text)
        if case == "giant-output":
            return response("x" * (4 << 20))
        return response(f"benign: {case or 'no case'}")
