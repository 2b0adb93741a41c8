"""The hybrid lists' online blender in Redis (``{prefix}:blender``, JSON): saved every
few seconds by the worker, loaded when it starts, so a restarted worker keeps the source
weights its stream taught it. A Redis that is down only delays the save."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from tailstream.models.serving.blend import SOURCES, OnlineBlender
from tailstream.redis_io import Keys

log = logging.getLogger(__name__)


class BlenderStore:
    def __init__(self, redis: Any, prefix: str, timeout_s: float = 2.0) -> None:
        self.redis = redis
        self.key = Keys(prefix).blender
        self.timeout_s = timeout_s
        self.loaded = False
        self._saved_updates = -1

    async def load_into(self, blender: OnlineBlender) -> bool:
        """Replace ``blender``'s state with the stored one (if any); True when loaded."""
        try:
            raw = await asyncio.wait_for(self.redis.get(self.key), self.timeout_s)
        except Exception as exc:  # noqa: BLE001 - start from the starting weights
            log.warning("could not read the blender from redis (%r): starting afresh", exc)
            return False
        self.loaded = True
        if not raw:
            return False
        stored = OnlineBlender.from_state(json.loads(raw))
        blender.w, blender.g2 = stored.w, stored.g2
        blender.updates, blender.offered, blender.hits = (stored.updates, stored.offered,
                                                          stored.hits)
        log.info("blender restored (%d updates): %s", stored.updates, rank1(blender))
        return True

    async def save(self, blender: OnlineBlender) -> None:
        """Write the state if it changed since the last save."""
        if blender.updates == self._saved_updates:
            return
        try:
            await asyncio.wait_for(self.redis.set(self.key, json.dumps(blender.to_state())),
                                   self.timeout_s)
            self._saved_updates = blender.updates
        except Exception as exc:  # noqa: BLE001 - saved again on the next tick
            log.debug("could not save the blender: %r", exc)


def rank1(blender: OnlineBlender) -> dict[str, float]:
    """Each source's weight for a candidate it ranks first (reciprocal rank 1 and the
    first rank bucket).

    >>> rank1(OnlineBlender())["covisitation"]
    5.0
    """
    return {s: round(blender.weight(f"rr_{s}") + blender.weight(f"{s}@0"), 3)
            for s in SOURCES}
