"""Hot reload: poll aliases/champion.json and load + swap when it names another version.

Polling (stat every serve.reload_poll_s) rather than inotify: it works on every filesystem a registry may
live on (NFS, bind mounts, object-store fuse), and the alias is replaced with os.replace, so a changed
(mtime, size, inode) is a complete new file. A failed load is reported once per alias change, not per poll.
"""

from __future__ import annotations

import asyncio
import logging

from serving.errors import ServingError
from serving.model_holder import CHAMPION, ModelHolder

log = logging.getLogger("serving.watcher")


async def watch_champion(holder: ModelHolder, poll_s: float) -> None:
    """Load the champion now, then follow the alias until cancelled (poll_s = 0: load once, do not watch)."""
    last = object()
    while True:
        signature = holder.registry.alias_signature(CHAMPION)
        if signature != last:
            last = signature
            try:
                model = await holder.reload_champion(source="watch")
                if model is None:
                    log.warning("no champion alias yet", extra={"event": "no_champion",
                                                                "alias": str(holder.registry.alias_path(CHAMPION))})
            except ServingError:
                pass  # already logged and counted by the holder; the old champion keeps serving
            except Exception:  # never let the watcher die: the server would silently stop following the registry
                log.exception("champion reload crashed", extra={"event": "watch_error"})
        if poll_s <= 0:
            return
        await asyncio.sleep(poll_s)
