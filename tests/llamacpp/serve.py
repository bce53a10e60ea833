"""Starts llama.cpp's own HTTP server (the C++ `llama-server` code, run
in-process by the `xllamacpp` package from PyPI, built for AVX2 so it runs
on any x86-64 machine CI may have) on one GGUF file, and prints
`LISTENING <url>` once it accepts requests. Tests start it, talk to it over
HTTP as to any llama.cpp server, and stop it with SIGTERM.

    python serve.py MODEL.gguf [THREADS]
"""
import signal
import sys
import time

import xllamacpp as xlc


def main() -> None:
    model = sys.argv[1]
    threads = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    p = xlc.CommonParams()
    p.model.path = model
    p.n_ctx = 4096
    p.n_parallel = 1
    p.cpuparams.n_threads = threads
    p.cpuparams_batch.n_threads = threads
    p.hostnames = ["127.0.0.1"] if isinstance(p.hostnames, list) else "127.0.0.1"
    p.port = 0
    p.ui = False
    server = xlc.Server(p)
    print("LISTENING", server.listening_address, flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
