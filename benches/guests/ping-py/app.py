"""The Python twin of benches/guests/ping: answers "pong" after `calls`
list-models host calls, so that the sandbox bench measures a Python
component's start-up and host-call round trip beside the Rust one's."""

from tessera_sdk import Strategy, list_models, response
from tessera_sdk.config import Config


class WitWorld(Strategy):
    def run(self, req):
        for _ in range(Config.for_request(req).parse("calls", 0)):
            list_models()
        return response("pong")
