"""A Faust worker whose agent only decodes: the framework's own cost per event.

Run by ``tailstream bench ingest`` as ``python -m tailstream.bench.faust_bare`` with the
settings in ``TAILSTREAM_*`` variables, ``BENCH_EXPECTED`` (events to read) and
``BENCH_OUT`` (where to write ``{"eps": …}``). Same broker options, the same
``take_events`` batching and the same fetch-wait fix as the real worker, nothing else.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, cast

import faust

from tailstream.kafka_io import faust_broker_options
from tailstream.settings import Settings
from tailstream.streams.worker.transport import app_class

BENCH_ENV = ("BENCH_EXPECTED", "BENCH_OUT")


def main() -> int:
    expected = int(os.environ["BENCH_EXPECTED"])
    out = Path(os.environ["BENCH_OUT"])
    settings = Settings.from_env({k: v for k, v in os.environ.items() if k not in BENCH_ENV})
    app = app_class(settings.kafka_fetch_max_wait_ms)(
        settings.app_id, store="memory://", topic_partitions=settings.partitions,
        topic_allow_declare=False, web_enabled=False, value_serializer="raw",
        key_serializer="raw", datadir=str(settings.data_dir / "faust-bare"),
        stream_buffer_maxsize=max(4 * settings.batch_size, 4096),
        **faust_broker_options(settings))
    topic = app.topic(*settings.input_topics, key_type=bytes, value_type=bytes,
                      key_serializer="raw", value_serializer="raw")
    state: dict[str, Any] = {"n": 0, "t0": None}
    loads = json.loads

    @app.agent(topic)
    async def decode(stream: faust.StreamT[bytes]) -> None:
        batches = cast(faust.Stream[bytes], stream).take_events(
            settings.batch_size, within=settings.batch_within_s)
        async for events in batches:
            if state["t0"] is None:
                state["t0"] = time.perf_counter()
            for e in events:
                loads(e.message.value or b"null")
            state["n"] += len(events)
            if state["n"] >= expected:
                eps = state["n"] / (time.perf_counter() - state["t0"])
                out.write_text(json.dumps({"eps": eps, "events": state["n"]}))
                # Measured: leave at once (a clean Faust shutdown from inside an agent
                # waits on the agent itself).
                os._exit(0)

    faust.Worker(app, loglevel="warning", quiet=True).execute_from_commandline()
    return 1  # only reached if the worker stopped before reading everything


if __name__ == "__main__":
    sys.exit(main())
