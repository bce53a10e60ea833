// The JavaScript twin of benches/guests/ping: answers "pong" after `calls`
// list-models host calls, so that the sandbox bench measures a JavaScript
// component's start-up and host-call round trip beside the Rust one's.
import { Config, listModels, strategy } from 'tessera-sdk';

export const { run, fit } = strategy({
  run(req) {
    const calls = Config.forRequest(req).parse('calls', 0);
    for (let i = 0; i < calls; i++) listModels();
    return { text: 'pong', annotations: [] };
  },
});
